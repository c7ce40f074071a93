package main

import (
	"bytes"
	"context"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/examples/internal/demo"
	"github.com/keybroker/keybroker/examples/internal/demotest"
	"github.com/keybroker/keybroker/examples/internal/testservers"
	"github.com/keybroker/keybroker/internal/testdaemon"
	"github.com/keybroker/keybroker/pop"
)

func TestMain(m *testing.M) { testdaemon.Main(m) }

// TestFlow runs the flow with each key type and checks the nonce dance:
// AS 400 then 200, RS 401 then 200, then one round trip with the kept
// nonce; and that the token's cnf.jkt is the key's thumbprint.
func TestFlow(t *testing.T) {
	c := demotest.Client(t)
	for _, alg := range []kbv1.Algorithm{kbv1.Algorithm_ALGORITHM_ES256, kbv1.Algorithm_ALGORITHM_ES384, kbv1.Algorithm_ALGORITHM_PS256, kbv1.Algorithm_ALGORITHM_RS256} {
		t.Run(alg.String(), func(t *testing.T) {
			s := demotest.Key(t, c, alg)
			p := demotest.Printer(t)
			res, err := flow(context.Background(), p, demotest.Env(t, p), s)
			if err != nil {
				t.Fatal(err)
			}
			if cnf := res.Claims.Cnf; cnf.JKT != s.KeyID() || cnf.Kid != "" || cnf.JWK != nil || cnf.X5TS256 != "" {
				t.Errorf("cnf %s, want jkt:%s only", cnf, s.KeyID())
			}
			if got := res.ASTrace.Statuses(); !slices.Equal(got, []int{400, 200}) {
				t.Errorf("AS answered %v, want [400 200] (use_dpop_nonce, then the token)", got)
			}
			if got := res.RSTrace.Statuses(); !slices.Equal(got, []int{401, 200, 200}) {
				t.Errorf("RS answered %v, want [401 200 200] (use_dpop_nonce, the retry, the second call)", got)
			}
			for _, tr := range []*demo.Trace{res.ASTrace, res.RSTrace} {
				h := tr.Hops()
				if h[0].ProofNonce != "" || h[0].DPoPNonce == "" || h[1].ProofNonce != h[0].DPoPNonce {
					t.Errorf("proof nonces %q then %q, server nonce %q: want none, then the server's", h[0].ProofNonce, h[1].ProofNonce, h[0].DPoPNonce)
				}
			}
			if as, rs := res.ASTrace.Hops()[0].DPoPNonce, res.RSTrace.Hops()[0].DPoPNonce; as == rs {
				t.Errorf("AS and RS gave the same nonce %q", as)
			}
		})
	}
}

// TestRun runs the program as `go run` does, against the test daemon.
func TestRun(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{"400 Bad Request", `error="use_dpop_nonce"`, `"binding":"dpop"`, "RS: 401 invalid_token", "RS: 401 invalid_dpop_proof"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

type setup struct {
	ctx context.Context
	c   *client.Client
	env *testservers.Env
	s   *client.Signer
	res *result
}

func bound(t *testing.T) *setup {
	t.Helper()
	ctx := context.Background()
	c := demotest.Client(t)
	p := demotest.Printer(t)
	env := demotest.Env(t, p)
	s := demotest.Key(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	res, err := flow(ctx, p, env, s)
	if err != nil {
		t.Fatal(err)
	}
	return &setup{ctx: ctx, c: c, env: env, s: s, res: res}
}

// send sends a GET to the RS with these Authorization and DPoP headers.
func (x *setup) send(t *testing.T, authz, proof string) *demo.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(x.ctx, http.MethodGet, x.env.RS.URL()+"/api/hello", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", authz)
	if proof != "" {
		req.Header.Set("DPoP", proof)
	}
	resp, err := demo.Do(x.env.HTTPClient(), req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// TestWrongKey: proofs signed by a second keybroker key, with the token
// bound to the first, are refused — after the nonce retry, for the key.
func TestWrongKey(t *testing.T) {
	x := bound(t)
	other := demotest.Key(t, x.c, kbv1.Algorithm_ALGORITHM_ES256)
	hc, trace := rsClient(x.env, other.JOSE(), x.res.Token, demotest.Printer(t))
	resp, err := get(x.ctx, hc, x.env.RS.URL()+"/api/hello")
	if err != nil {
		t.Fatal(err)
	}
	demotest.Refused(t, resp, http.StatusUnauthorized, "bound to key "+x.s.KeyID(), "signed by key "+other.KeyID())
	if resp.Code != "invalid_token" {
		t.Errorf("error %q, want invalid_token", resp.Code)
	}
	// A new transport: the RS asked it for a nonce first, and refused the
	// retry for the key, not the nonce.
	if h := trace.Hops(); len(h) != 2 || h[1].ProofNonce == "" {
		t.Errorf("RS answered %v, want a nonce challenge and a refusal with the nonce", trace.Statuses())
	}
}

// TestWrongRequest: a proof made for another URL (path, host) or method
// is refused, though its key, token and nonce are right.
func TestWrongRequest(t *testing.T) {
	x := bound(t)
	nonce := currentNonce(t, x)
	for _, tc := range []struct {
		name, method, url, want string
	}{
		{"other path", "GET", x.env.RS.URL() + "/api/other", `claim "htu"`},
		{"other host", "GET", x.env.AS.Issuer() + "/api/hello", `claim "htu"`},
		{"other scheme", "GET", strings.Replace(x.env.RS.URL(), "https:", "http:", 1) + "/api/hello", `claim "htu"`},
		{"other method", "POST", x.env.RS.URL() + "/api/hello", `claim "htm"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proof, err := pop.NewDPoPProof(x.ctx, x.s.JOSE(), pop.DPoPParams{Method: tc.method, URL: tc.url, AccessToken: x.res.Token, Nonce: nonce, Now: time.Now()})
			if err != nil {
				t.Fatal(err)
			}
			resp := x.send(t, "DPoP "+x.res.Token, proof)
			demotest.Refused(t, resp, http.StatusUnauthorized, tc.want)
			if resp.Code != "invalid_dpop_proof" {
				t.Errorf("error %q, want invalid_dpop_proof", resp.Code)
			}
		})
	}
	// The same proof for the right URL passes.
	proof, err := pop.NewDPoPProof(x.ctx, x.s.JOSE(), pop.DPoPParams{Method: "GET", URL: x.env.RS.URL() + "/api/hello", AccessToken: x.res.Token, Nonce: nonce, Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if resp := x.send(t, "DPoP "+x.res.Token, proof); resp.Status != http.StatusOK {
		t.Fatalf("a right proof: %+v", resp)
	}
}

// currentNonce learns the RS's nonce from the challenge to a proof
// without one.
func currentNonce(t *testing.T, x *setup) string {
	t.Helper()
	proof, err := pop.NewDPoPProof(x.ctx, x.s.JOSE(), pop.DPoPParams{Method: "GET", URL: x.env.RS.URL() + "/api/hello", AccessToken: x.res.Token, Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(x.ctx, http.MethodGet, x.env.RS.URL()+"/api/hello", nil)
	req.Header.Set("Authorization", "DPoP "+x.res.Token)
	req.Header.Set("DPoP", proof)
	resp, err := x.env.HTTPClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	n := resp.Header.Get("DPoP-Nonce")
	if resp.StatusCode != http.StatusUnauthorized || n == "" {
		t.Fatalf("proof without nonce: %s, DPoP-Nonce %q", resp.Status, n)
	}
	return n
}

// TestReplay: the RS refuses a request sent again with the same proof (the
// same jti), and the AS refuses a token request with a used proof.
func TestReplay(t *testing.T) {
	x := bound(t)
	hops := x.res.RSTrace.Hops()
	last := hops[len(hops)-1]
	resp, err := replay(x.ctx, x.env, last)
	if err != nil {
		t.Fatal(err)
	}
	demotest.Refused(t, resp, http.StatusUnauthorized, "already used", "replayed proof")

	// At the AS: the proof of the successful token request, with a fresh
	// client assertion.
	assertion, err := demo.ClientAssertion(x.ctx, x.s.JOSE(), clientID, x.env.AS.TokenURL(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	form := url.Values{"grant_type": {"client_credentials"}, "client_assertion_type": {testservers.ClientAssertionJWTBearer}, "client_assertion": {assertion}}
	req, _ := http.NewRequestWithContext(x.ctx, http.MethodPost, x.env.AS.TokenURL(), strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("DPoP", x.res.ASTrace.Hops()[1].Header.Get("DPoP"))
	r, err := demo.Do(x.env.HTTPClient(), req)
	if err != nil {
		t.Fatal(err)
	}
	demotest.Refused(t, r, http.StatusBadRequest, "replayed proof")
}

// TestPresentation: a DPoP-bound token must come with a proof: as Bearer,
// or as DPoP without a proof, it is refused.
func TestPresentation(t *testing.T) {
	x := bound(t)
	demotest.Refused(t, x.send(t, "Bearer "+x.res.Token, ""), http.StatusUnauthorized, "bound to a key")
	demotest.Refused(t, x.send(t, "DPoP "+x.res.Token, ""), http.StatusUnauthorized, "got 0 DPoP headers")
	// A proof for another token (ath) is refused too.
	proof, err := pop.NewDPoPProof(x.ctx, x.s.JOSE(), pop.DPoPParams{Method: "GET", URL: x.env.RS.URL() + "/api/hello", AccessToken: "another-token", Nonce: currentNonce(t, x), Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	demotest.Refused(t, x.send(t, "DPoP "+x.res.Token, proof), http.StatusUnauthorized, `claim "ath"`)
}

// TestASProofChecks: the AS checks the proof's htu too.
func TestASProofChecks(t *testing.T) {
	x := bound(t)
	assertion, err := demo.ClientAssertion(x.ctx, x.s.JOSE(), clientID, x.env.AS.TokenURL(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// A transport whose proofs are for the RS, sent to the AS.
	rt := &client.DPoPTransport{Signer: x.s.JOSE(), Base: redirect{to: x.env.AS.TokenURL(), base: x.env.Transport()}}
	_, err = demo.RequestToken(x.ctx, &http.Client{Transport: rt}, x.env.RS.URL()+"/token", url.Values{
		"grant_type": {"client_credentials"}, "client_assertion_type": {testservers.ClientAssertionJWTBearer}, "client_assertion": {assertion},
	})
	if err == nil || !strings.Contains(err.Error(), "invalid_dpop_proof") || !strings.Contains(err.Error(), `claim "htu"`) {
		t.Fatalf("proof for another URL at the AS: %v, want invalid_dpop_proof htu", err)
	}
}

// redirect sends every request to another URL, after the proof was made.
type redirect struct {
	to   string
	base http.RoundTripper
}

func (r redirect) RoundTrip(req *http.Request) (*http.Response, error) {
	u, err := url.Parse(r.to)
	if err != nil {
		return nil, err
	}
	req = req.Clone(req.Context())
	req.URL, req.Host = u, u.Host
	return r.base.RoundTrip(req)
}
