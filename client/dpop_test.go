package client_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/pop"
)

const redirectToken = "SECRET-ACCESS-TOKEN"

// seenHeaders records the DPoP-related headers of the last request.
type seenHeaders struct {
	calls         atomic.Int64
	authorization atomic.Value
	dpop          atomic.Value
}

func (s *seenHeaders) record(r *http.Request) {
	s.calls.Add(1)
	s.authorization.Store(r.Header.Get("Authorization"))
	s.dpop.Store(r.Header.Get("DPoP"))
}

// TestDPoPTransportCrossOriginRedirect: http.Client follows a 302 to another
// host, and to plain http from https; the target gets neither the access
// token nor a DPoP proof (whose ath would be bound to the token).
func TestDPoPTransportCrossOriginRedirect(t *testing.T) {
	c := dial(t)
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	var seen seenHeaders
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen.record(r)
		io.WriteString(w, "target")
	}))
	defer target.Close()
	redirect := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target.URL+"/steal", http.StatusFound)
	})
	rs := httptest.NewServer(redirect)
	defer rs.Close()
	rsTLS := httptest.NewTLSServer(redirect)
	defer rsTLS.Close()

	for _, tc := range []struct {
		name, url string
		base      http.RoundTripper
	}{
		// target listens on 127.0.0.1; "localhost" makes the redirect cross-host.
		{"other host", strings.Replace(rs.URL, "127.0.0.1", "localhost", 1) + "/r", nil},
		{"https to http", rsTLS.URL + "/r", rsTLS.Client().Transport},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seen.authorization.Store("unset")
			var tokenCalls atomic.Int64
			hc := &http.Client{Transport: &client.DPoPTransport{Signer: s.JOSE(), Base: tc.base,
				Token: func(context.Context) (string, error) { tokenCalls.Add(1); return redirectToken, nil }}}
			resp, err := hc.Get(tc.url)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) != "target" {
				t.Fatalf("body %q, want the redirect target's", body)
			}
			if a := seen.authorization.Load(); a != "" {
				t.Errorf("redirect target received Authorization %q", a)
			}
			if p := seen.dpop.Load().(string); p != "" {
				claims, _ := pop.VerifyDPoPProof(p, pop.DPoPCheck{Method: "GET", URL: target.URL + "/steal", Now: time.Now()})
				t.Errorf("redirect target received a DPoP proof (claims %+v)", claims)
			}
			if n := tokenCalls.Load(); n != 1 {
				t.Errorf("Token called %d times, want 1 (for the first request only)", n)
			}
		})
	}
}

// TestDPoPTransportSameOriginRedirect: a redirect within the origin still
// carries the token and a proof for the new URL.
func TestDPoPTransportSameOriginRedirect(t *testing.T) {
	c := dial(t)
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/old" {
			http.Redirect(w, r, "/new", http.StatusFound)
			return
		}
		_, err := pop.VerifyDPoPProof(r.Header.Get("DPoP"), pop.DPoPCheck{Method: "GET", URL: "http://" + r.Host + "/new", AccessToken: redirectToken, Now: time.Now()})
		if err != nil || r.Header.Get("Authorization") != "DPoP "+redirectToken {
			http.Error(w, "unbound: "+errString(err), http.StatusUnauthorized)
			return
		}
		io.WriteString(w, "ok")
	}))
	defer srv.Close()
	hc := &http.Client{Transport: &client.DPoPTransport{Signer: s.JOSE(),
		Token: func(context.Context) (string, error) { return redirectToken, nil }}}
	resp, err := hc.Get(srv.URL + "/old")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "ok" {
		t.Fatalf("status %d body %q, want 200 ok", resp.StatusCode, body)
	}
}

// TestDPoPTransportChallengeForms: the nonce challenge is found among other
// challenges, with a token or quoted error value and any scheme case; other
// schemes' errors and unrelated 401s give no retry, and there is at most one.
func TestDPoPTransportChallengeForms(t *testing.T) {
	c := dial(t)
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	for _, tc := range []struct {
		header    string
		wantCalls int64
	}{
		{`DPoP error="use_dpop_nonce"`, 2},
		{`Bearer realm="rs", DPoP error="use_dpop_nonce", algs="ES256"`, 2},
		{`Bearer realm="a, DPoP b", DPoP algs="ES256 PS256", error=use_dpop_nonce`, 2},
		{`dpop error=use_dpop_nonce`, 2},
		{`Basic dXNlcjpwdw==, DPOP  error = "use_dpop_nonce"`, 2},
		{`Bearer error="use_dpop_nonce"`, 1},
		{`DPoP error="invalid_token"`, 1},
		{`Bearer realm="DPoP error=\"use_dpop_nonce\""`, 1},
		{`DPoP error="use_dpop_nonce`, 1},
	} {
		t.Run(tc.header, func(t *testing.T) {
			var calls atomic.Int64
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				_, err := pop.VerifyDPoPProof(r.Header.Get("DPoP"), pop.DPoPCheck{Method: "GET", URL: "http://" + r.Host + "/", AccessToken: "t", Nonce: "n1", Now: time.Now()})
				if calls.Add(1) > 2 || err != nil {
					w.Header().Set("DPoP-Nonce", "n1")
					w.Header().Set("WWW-Authenticate", tc.header)
					w.WriteHeader(http.StatusUnauthorized)
					return
				}
				io.WriteString(w, "ok")
			}))
			defer srv.Close()
			hc := &http.Client{Transport: &client.DPoPTransport{Signer: s.JOSE(), Token: func(context.Context) (string, error) { return "t", nil }}}
			resp, err := hc.Get(srv.URL + "/")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			wantStatus := 200
			if tc.wantCalls == 1 {
				wantStatus = 401
			}
			if calls.Load() != tc.wantCalls || resp.StatusCode != wantStatus {
				t.Errorf("%d calls, status %d; want %d, %d", calls.Load(), resp.StatusCode, tc.wantCalls, wantStatus)
			}
		})
	}
}

// TestDPoPTransportEmptyMethod: Method "" means GET, in DPoPTransport and
// in PoPAuthorization.
func TestDPoPTransportEmptyMethod(t *testing.T) {
	c := dial(t)
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := pop.VerifyDPoPProof(r.Header.Get("DPoP"), pop.DPoPCheck{Method: "GET", URL: "http://" + r.Host + "/", Now: time.Now()}); err != nil {
			http.Error(w, err.Error(), http.StatusUnauthorized)
		}
	}))
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL+"/", nil)
	req.Method = ""
	resp, err := (&http.Client{Transport: &client.DPoPTransport{Signer: s.JOSE()}}).Do(req)
	if err != nil {
		t.Fatalf("Method \"\": %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("Method \"\": status %d", resp.StatusCode)
	}

	authz, err := s.PoPAuthorization(context.Background(), "at", req, "")
	if err != nil {
		t.Fatalf("PoPAuthorization with Method \"\": %v", err)
	}
	if _, err := pop.VerifySignedHTTPRequest(strings.TrimPrefix(authz, "PoP "), pop.SHRCheck{Method: "GET", URL: srv.URL + "/", Now: time.Now()}); err != nil {
		t.Fatalf("SHR for Method \"\" does not verify as GET: %v", err)
	}
}

// closeTracker is a request body that records Close.
type closeTracker struct {
	io.Reader
	closed atomic.Bool
}

func (b *closeTracker) Close() error { b.closed.Store(true); return nil }

// badSigner is a pop.Signer whose JWK is unusable, so no proof can be made.
type badSigner struct{}

func (badSigner) Alg() string                                  { return pop.AlgES256 }
func (badSigner) JWK() pop.JWK                                 { return pop.JWK{Kty: "EC"} }
func (badSigner) Sign(context.Context, []byte) ([]byte, error) { return nil, errors.New("no") }

// TestDPoPTransportClosesBodyOnError: when the token or the proof cannot be
// had, RoundTrip still closes the request body, as http.RoundTripper
// requires.
func TestDPoPTransportClosesBodyOnError(t *testing.T) {
	c := dial(t)
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	for _, tc := range []struct {
		name string
		tr   *client.DPoPTransport
	}{
		{"token error", &client.DPoPTransport{Signer: s.JOSE(), Token: func(context.Context) (string, error) { return "", errors.New("no token") }}},
		{"proof error", &client.DPoPTransport{Signer: badSigner{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := &closeTracker{Reader: strings.NewReader("payload")}
			req, _ := http.NewRequest("POST", "http://127.0.0.1:1/token", body)
			if _, err := tc.tr.RoundTrip(req); err == nil {
				t.Fatal("RoundTrip succeeded, want an error")
			}
			if !body.closed.Load() {
				t.Error("request body not closed")
			}
		})
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}
