package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
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

// TestFlow runs the flow with each key type and both req_cnf forms, and
// checks the token's cnf names the key.
func TestFlow(t *testing.T) {
	c := demotest.Client(t)
	for _, alg := range []kbv1.Algorithm{kbv1.Algorithm_ALGORITHM_ES256, kbv1.Algorithm_ALGORITHM_RS256, kbv1.Algorithm_ALGORITHM_PS256} {
		s := demotest.Key(t, c, alg)
		for _, f := range []reqCnfForm{kidForm, jwkForm} {
			t.Run(alg.String()+"/"+string(f), func(t *testing.T) {
				p := demotest.Printer(t)
				env := demotest.Env(t, p)
				res, err := flow(context.Background(), p, env, c, s, f)
				if err != nil {
					t.Fatal(err)
				}
				cnf := res.Claims.Cnf
				switch f {
				case kidForm:
					if cnf.Kid != s.KeyID() || cnf.JWK != nil {
						t.Errorf("cnf %s: want {\"kid\":%q}", demo.JSON(cnf), s.KeyID())
					}
				case jwkForm:
					if cnf.JWK == nil || cnf.Kid != "" {
						t.Fatalf("cnf %s: want a jwk", demo.JSON(cnf))
					}
					if tp, err := cnf.JWK.Thumbprint(); err != nil || tp != s.KeyID() {
						t.Errorf("cnf.jwk thumbprint %s (%v), want %s", tp, err, s.KeyID())
					}
				}
				var body struct {
					Binding  string `json:"binding"`
					ClientID string `json:"client_id"`
				}
				json.Unmarshal([]byte(res.Response.Body), &body)
				if body.Binding != "pop" || body.ClientID != clientID {
					t.Errorf("RS said %s", res.Response.Body)
				}
			})
		}
	}
}

// TestRun runs the program as `go run` does, against the test daemon.
func TestRun(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{`"binding":"pop"`, "token issued", "RS: 401 invalid_token"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

type setup struct {
	ctx   context.Context
	c     *client.Client
	env   *testservers.Env
	s     *client.Signer
	token string
	hc    *http.Client
}

// bound gets a token bound to a fresh key with req_cnf form f.
func bound(t *testing.T, f reqCnfForm) *setup {
	t.Helper()
	ctx := context.Background()
	c := demotest.Client(t)
	p := demotest.Printer(t)
	env := demotest.Env(t, p)
	s := demotest.Key(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	res, err := flow(ctx, p, env, c, s, f)
	if err != nil {
		t.Fatal(err)
	}
	return &setup{ctx: ctx, c: c, env: env, s: s, token: res.Token, hc: env.HTTPClient()}
}

func (x *setup) get(t *testing.T, path string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(x.ctx, http.MethodGet, x.env.RS.URL()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	return req
}

func (x *setup) do(t *testing.T, req *http.Request) *demo.Response {
	t.Helper()
	resp, err := demo.Do(x.hc, req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// TestWrongKey: an SHR signed by a second keybroker key, carrying the
// token bound to the first, is refused for both cnf forms.
func TestWrongKey(t *testing.T) {
	for _, f := range []reqCnfForm{kidForm, jwkForm} {
		t.Run(string(f), func(t *testing.T) {
			x := bound(t, f)
			other := demotest.Key(t, x.c, kbv1.Algorithm_ALGORITHM_ES256)
			resp, err := callRS(x.ctx, x.hc, other, x.token, x.get(t, "/api/hello"))
			if err != nil {
				t.Fatal(err)
			}
			demotest.Refused(t, resp, http.StatusUnauthorized, "bound to key "+x.s.KeyID(), "signed by key "+other.KeyID())
		})
	}
}

// TestWrongRequest: an SHR made for another request (path, host, method)
// or too long ago is refused.
func TestWrongRequest(t *testing.T) {
	x := bound(t, kidForm)
	for _, tc := range []struct {
		name, method, url string
		now               time.Time
		want              string
	}{
		{"other path", "GET", x.env.RS.URL() + "/api/other", time.Now(), `claim "p"`},
		{"other host", "GET", x.env.AS.Issuer() + "/api/hello", time.Now(), `claim "u"`},
		{"other method", "POST", x.env.RS.URL() + "/api/hello", time.Now(), `claim "m"`},
		{"stale ts", "GET", x.env.RS.URL() + "/api/hello", time.Now().Add(-10 * time.Minute), `claim "ts"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			shr, err := pop.NewSignedHTTPRequest(x.ctx, x.s.JOSE(), pop.SHRParams{AccessToken: x.token, Method: tc.method, URL: tc.url, Now: tc.now})
			if err != nil {
				t.Fatal(err)
			}
			req := x.get(t, "/api/hello")
			req.Header.Set("Authorization", pop.PoPAuthorization(shr))
			demotest.Refused(t, x.do(t, req), http.StatusUnauthorized, tc.want)
		})
	}
	// The same request, properly signed, still passes.
	resp, err := callRS(x.ctx, x.hc, x.s, x.token, x.get(t, "/api/hello"))
	if err != nil || resp.Status != http.StatusOK {
		t.Fatalf("proper SHR: %v %+v", err, resp)
	}
}

// TestTokenChecks: the RS checks the token inside the SHR, not just the
// SHR: a token as Bearer, a token minted by the attacker for its own key,
// and a token for another audience are refused.
func TestTokenChecks(t *testing.T) {
	x := bound(t, kidForm)

	req := x.get(t, "/api/hello")
	req.Header.Set("Authorization", "Bearer "+x.token)
	demotest.Refused(t, x.do(t, req), http.StatusUnauthorized, "bound to a key")

	// The attacker copies the token's claims, names its own key in cnf and
	// signs with its own key under the AS's kid.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	attacker, err := pop.NewSoftwareSigner(key, pop.AlgES256)
	if err != nil {
		t.Fatal(err)
	}
	claims, err := testservers.DecodeToken(x.token)
	if err != nil {
		t.Fatal(err)
	}
	claims.Cnf = testservers.Confirmation{Kid: attacker.JWK().Kid}
	payload, _ := json.Marshal(claims)
	asKid := x.env.AS.JWKS().Keys[0].Kid
	forged, err := pop.SignJWS(x.ctx, kidAs{attacker, asKid}, payload, pop.JWSOptions{Header: map[string]any{"typ": testservers.AccessTokenType}})
	if err != nil {
		t.Fatal(err)
	}
	shr, err := pop.NewSignedHTTPRequest(x.ctx, attacker, pop.SHRParams{AccessToken: forged, Method: "GET", URL: x.env.RS.URL() + "/api/hello", Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	req = x.get(t, "/api/hello")
	req.Header.Set("Authorization", pop.PoPAuthorization(shr))
	demotest.Refused(t, x.do(t, req), http.StatusUnauthorized, "access token signature")

	// A token for the AS itself (resource=issuer) is not for this RS.
	s := x.s
	assertion, err := demo.ClientAssertion(x.ctx, s.JOSE(), clientID, x.env.AS.TokenURL(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	_, kidReqCnf, _ := s.ReqCnf()
	tr, err := demo.RequestToken(x.ctx, x.hc, x.env.AS.TokenURL(), url.Values{
		"grant_type": {"client_credentials"}, "client_assertion_type": {testservers.ClientAssertionJWTBearer},
		"client_assertion": {assertion}, "token_type": {"pop"}, "req_cnf": {kidReqCnf}, "resource": {x.env.AS.Issuer()},
	})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := callRS(x.ctx, x.hc, s, tr.AccessToken, x.get(t, "/api/hello"))
	if err != nil {
		t.Fatal(err)
	}
	demotest.Refused(t, resp, http.StatusUnauthorized, "access token aud")
}

// kidAs is a signer that claims another kid.
type kidAs struct {
	pop.Signer
	kid string
}

func (k kidAs) JWK() pop.JWK {
	j := k.Signer.JWK()
	j.Kid = k.kid
	return j
}

// TestTokenRequestChecks: the AS refuses PoP token requests that a real
// one would.
func TestTokenRequestChecks(t *testing.T) {
	ctx := context.Background()
	c := demotest.Client(t)
	env := demotest.Env(t, demotest.Printer(t))
	s := demotest.Key(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	other := demotest.Key(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	if err := env.AS.RegisterClient(testservers.Client{ID: clientID, JWKS: []pop.JWK{s.JOSE().JWK()}}); err != nil {
		t.Fatal(err)
	}
	jwkReqCnf, kidReqCnf, _ := s.ReqCnf()
	b64 := func(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
	var jwk map[string]any
	raw, _ := base64.RawURLEncoding.DecodeString(jwkReqCnf)
	json.Unmarshal(raw, &jwk)
	jwk["d"] = "AAAA"
	private, _ := json.Marshal(jwk)
	// An assertion used once, successfully.
	replayed, _ := demo.ClientAssertion(ctx, s.JOSE(), clientID, env.AS.TokenURL(), time.Now())
	if _, err := demo.RequestToken(ctx, env.HTTPClient(), env.AS.TokenURL(), url.Values{
		"grant_type": {"client_credentials"}, "client_assertion_type": {testservers.ClientAssertionJWTBearer},
		"client_assertion": {replayed}, "token_type": {"pop"}, "req_cnf": {kidReqCnf},
	}); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name     string
		signer   pop.Signer // signs the client assertion; nil: none
		edit     func(url.Values)
		code     string
		describe string
	}{
		{"no req_cnf", s.JOSE(), func(v url.Values) { v.Del("req_cnf") }, "invalid_request", "needs req_cnf"},
		{"req_cnf not base64url", s.JOSE(), func(v url.Values) { v.Set("req_cnf", "{not base64}") }, "invalid_request", "base64url"},
		{"req_cnf kid not a thumbprint", s.JOSE(), func(v url.Values) { v.Set("req_cnf", b64(`{"kid":"abc"}`)) }, "invalid_request", "thumbprint"},
		{"req_cnf with a private key", s.JOSE(), func(v url.Values) { v.Set("req_cnf", b64(string(private))) }, "invalid_request", "private member"},
		{"req_cnf bad xms_ksl", s.JOSE(), func(v url.Values) { v.Set("req_cnf", b64(`{"kid":"`+s.KeyID()+`","xms_ksl":"cloud"}`)) }, "invalid_request", "xms_ksl"},
		{"req_cnf without token_type", s.JOSE(), func(v url.Values) { v.Del("token_type") }, "invalid_request", "req_cnf without token_type"},
		{"no client authentication", nil, nil, "invalid_client", "no client authentication"},
		{"assertion by an unregistered key", other.JOSE(), nil, "invalid_client", "not signed by a key registered"},
		{"replayed assertion", s.JOSE(), func(v url.Values) { v.Set("client_assertion", replayed) }, "invalid_client", "replayed"},
		{"client secret", s.JOSE(), func(v url.Values) { v.Set("client_secret", "hunter2") }, "invalid_client", "secrets are not accepted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			form := url.Values{"grant_type": {"client_credentials"}, "client_id": {clientID}, "token_type": {"pop"}, "req_cnf": {kidReqCnf}}
			if tc.signer != nil {
				a, err := demo.ClientAssertion(ctx, tc.signer, clientID, env.AS.TokenURL(), time.Now())
				if err != nil {
					t.Fatal(err)
				}
				form.Set("client_assertion_type", testservers.ClientAssertionJWTBearer)
				form.Set("client_assertion", a)
			}
			if tc.edit != nil {
				tc.edit(form)
			}
			_, err := demo.RequestToken(ctx, env.HTTPClient(), env.AS.TokenURL(), form)
			var oe *demo.OAuthError
			if !errors.As(err, &oe) || oe.Code != tc.code || !strings.Contains(oe.Description, tc.describe) {
				t.Fatalf("got %v, want %s saying %q", err, tc.code, tc.describe)
			}
		})
	}
}
