package client_test

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/internal/testdaemon"
	"github.com/keybroker/keybroker/pop"
)

func TestMain(m *testing.M) { testdaemon.Main(m) }

func dial(t *testing.T) *client.Client {
	t.Helper()
	c, err := client.Dial("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

var keyCount atomic.Int64

// newKey creates a key with a unique name and returns its signer.
func newKey(t *testing.T, c *client.Client, alg kbv1.Algorithm) *client.Signer {
	t.Helper()
	ctx := context.Background()
	name := strings.ToLower(strings.TrimPrefix(alg.String(), "ALGORITHM_")) + "-" + string(rune('a'+keyCount.Add(1)))
	if _, err := c.API().CreateKey(ctx, &kbv1.CreateKeyRequest{Name: name, Algorithm: alg}); err != nil {
		t.Fatal(err)
	}
	s, err := c.Signer(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestTLSClientAuth: TLS 1.3 and 1.2 handshakes whose client key is a
// keybroker key; the server sees the certificate whose x5t#S256 the API
// reported.
func TestTLSClientAuth(t *testing.T) {
	c := dial(t)
	ctx := context.Background()
	for _, alg := range []kbv1.Algorithm{kbv1.Algorithm_ALGORITHM_ES256, kbv1.Algorithm_ALGORITHM_PS256, kbv1.Algorithm_ALGORITHM_RS256} {
		s := newKey(t, c, alg)
		cert, err := c.API().CreateSelfSignedCertificate(ctx, &kbv1.CreateSelfSignedCertificateRequest{Name: s.Name(), CommonName: "client-" + s.Name()})
		if err != nil {
			t.Fatal(err)
		}
		if cert.X5TS256 != pop.X5TS256(cert.CertificateDer) || cert.Kid != s.KeyID() {
			t.Fatalf("certificate x5t#S256 %q kid %q; want %q %q", cert.X5TS256, cert.Kid, pop.X5TS256(cert.CertificateDer), s.KeyID())
		}
		for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
			var seen atomic.Value
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				seen.Store(pop.X5TS256(r.TLS.PeerCertificates[0].Raw))
				io.WriteString(w, "ok")
			}))
			srv.TLS = &tls.Config{ClientAuth: tls.RequireAnyClientCert, MinVersion: v, MaxVersion: v}
			srv.StartTLS()
			pool := x509.NewCertPool()
			pool.AddCert(srv.Certificate())
			hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
				RootCAs:      pool,
				Certificates: []tls.Certificate{{Certificate: [][]byte{cert.CertificateDer}, PrivateKey: s}},
				MinVersion:   v, MaxVersion: v,
			}}}
			resp, err := hc.Get(srv.URL)
			if err != nil {
				t.Fatalf("%v TLS %x: %v", alg, v, err)
			}
			resp.Body.Close()
			srv.Close()
			if seen.Load() != cert.X5TS256 {
				t.Errorf("%v TLS %x: server saw x5t#S256 %v, API reported %s", alg, v, seen.Load(), cert.X5TS256)
			}
		}
	}
}

// TestDPoPTransportNonce: the server demands a nonce; the transport retries
// once with it and the proof's ath matches the token.
func TestDPoPTransportNonce(t *testing.T) {
	c := dial(t)
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	const token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		url := "http://" + r.Host + r.URL.Path
		claims, err := pop.VerifyDPoPProof(r.Header.Get("DPoP"), pop.DPoPCheck{Method: r.Method, URL: url, AccessToken: token, Nonce: "server-nonce-1", Now: time.Now()})
		if err != nil {
			w.Header().Set("DPoP-Nonce", "server-nonce-1")
			w.Header().Set("WWW-Authenticate", `DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		if r.Header.Get("Authorization") != "DPoP "+token || claims.ATH != "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo" || claims.Thumbprint != s.KeyID() {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		io.WriteString(w, "protected")
	}))
	defer srv.Close()
	tr := &client.DPoPTransport{Signer: s.JOSE(), Token: func(context.Context) (string, error) { return token, nil }}
	hc := &http.Client{Transport: tr}
	resp, err := hc.Get(srv.URL + "/resource?x=1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "protected" || calls.Load() != 2 {
		t.Fatalf("status %d body %q after %d calls; want 200 protected after 2 (401 use_dpop_nonce, retry)", resp.StatusCode, body, calls.Load())
	}
	// The nonce is remembered: the next request needs one call.
	resp, err = hc.Get(srv.URL + "/resource")
	if err != nil || resp.StatusCode != 200 || calls.Load() != 3 {
		t.Fatalf("second request: %v %v after %d calls, want 200 after 3", err, resp.StatusCode, calls.Load())
	}
	resp.Body.Close()
}

// TestDPoPTransportASNonce: an authorization server's 400 use_dpop_nonce
// (JSON) triggers one retry with the body sent again.
func TestDPoPTransportASNonce(t *testing.T) {
	c := dial(t)
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_PS256)
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		body, _ := io.ReadAll(r.Body)
		_, err := pop.VerifyDPoPProof(r.Header.Get("DPoP"), pop.DPoPCheck{Method: "POST", URL: "http://" + r.Host + "/token", Nonce: "as-nonce", Now: time.Now()})
		if err != nil {
			w.Header().Set("DPoP-Nonce", "as-nonce")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			json.NewEncoder(w).Encode(map[string]string{"error": "use_dpop_nonce"})
			return
		}
		if string(body) != "grant_type=client_credentials" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		io.WriteString(w, `{"access_token":"t","token_type":"DPoP"}`)
	}))
	defer srv.Close()
	hc := &http.Client{Transport: &client.DPoPTransport{Signer: s.JOSE()}}
	resp, err := hc.Post(srv.URL+"/token", "application/x-www-form-urlencoded", strings.NewReader("grant_type=client_credentials"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || calls.Load() != 2 {
		t.Fatalf("status %d after %d calls, want 200 after 2", resp.StatusCode, calls.Load())
	}
}

func TestSignerChecksDigestLocally(t *testing.T) {
	c := dial(t)
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_ES384)
	if _, err := s.SignContext(context.Background(), make([]byte, 32), cryptoSHA384{}); err == nil || !strings.Contains(err.Error(), "digest length") {
		t.Fatalf("short digest: %v", err)
	}
}

func TestDialTargets(t *testing.T) {
	if _, err := client.Dial("example.org:443"); err == nil {
		t.Error("TCP without TLS accepted")
	}
	if _, err := client.Dial("/tmp/x.sock", client.WithTLS(&tls.Config{})); err == nil {
		t.Error("TLS to a unix socket accepted")
	}

}

type cryptoSHA384 struct{}

func (cryptoSHA384) HashFunc() crypto.Hash { return crypto.SHA384 }
