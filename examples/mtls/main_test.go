package main

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/examples/internal/demo"
	"github.com/keybroker/keybroker/examples/internal/demotest"
	"github.com/keybroker/keybroker/examples/internal/testservers"
	"github.com/keybroker/keybroker/internal/testdaemon"
	"github.com/keybroker/keybroker/pop"
)

func TestMain(m *testing.M) { testdaemon.Main(m) }

var algs = []kbv1.Algorithm{kbv1.Algorithm_ALGORITHM_ES256, kbv1.Algorithm_ALGORITHM_ES384, kbv1.Algorithm_ALGORITHM_PS256, kbv1.Algorithm_ALGORITHM_RS256}

// TestVanilla runs the single-call flow with each key type.
func TestVanilla(t *testing.T) {
	c := demotest.Client(t)
	for _, alg := range algs {
		t.Run(alg.String(), func(t *testing.T) {
			s := demotest.Key(t, c, alg)
			p := demotest.Printer(t)
			env := demotest.Env(t, p)
			res, err := vanilla(context.Background(), p, env, c, s)
			if err != nil {
				t.Fatal(err)
			}
			if res.X5TS256 != pop.X5TS256(res.Cert.Certificate[0]) || res.Claims.Cnf.X5TS256 != res.X5TS256 {
				t.Errorf("token cnf %s, certificate x5t#S256 %s", res.Claims.Cnf, pop.X5TS256(res.Cert.Certificate[0]))
			}
			if !res.Claims.Audience.Contains(env.RS.Audience()) || !strings.Contains(res.Response.Body, `"binding":"mtls"`) {
				t.Errorf("aud %v, RS said %s", res.Claims.Audience, res.Response.Body)
			}
		})
	}
}

// TestExchange runs the two-leg flow with each key type.
func TestExchange(t *testing.T) {
	c := demotest.Client(t)
	for _, alg := range algs {
		t.Run(alg.String(), func(t *testing.T) {
			s := demotest.Key(t, c, alg)
			p := demotest.Printer(t)
			env := demotest.Env(t, p)
			res, err := exchange(context.Background(), p, env, c, s)
			if err != nil {
				t.Fatal(err)
			}
			leg1, err := testservers.DecodeToken(res.Leg1)
			if err != nil {
				t.Fatal(err)
			}
			if !leg1.Audience.Contains(env.AS.Issuer()) || !res.Claims.Audience.Contains(env.RS.Audience()) {
				t.Errorf("leg 1 aud %v, final aud %v: want the AS, then the RS", leg1.Audience, res.Claims.Audience)
			}
			if leg1.Cnf.X5TS256 != res.X5TS256 || res.Claims.Cnf.X5TS256 != res.X5TS256 {
				t.Errorf("leg 1 cnf %s, final cnf %s: want both x5t#S256:%s", leg1.Cnf, res.Claims.Cnf, res.X5TS256)
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
	for _, want := range []string{"Leg 2", `"binding":"mtls"`, "RS: 401 invalid_token"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

type setup struct {
	ctx   context.Context
	c     *client.Client
	p     *demo.Printer
	env   *testservers.Env
	s     *client.Signer
	res   *result
	other *client.Signer
	cert2 *http.Client // presents the other key's certificate
	x5t2  string
}

// bound runs a flow, and makes a second key with its own certificate.
func bound(t *testing.T, flow func(context.Context, *demo.Printer, *testservers.Env, *client.Client, *client.Signer) (*result, error)) *setup {
	t.Helper()
	x := &setup{ctx: context.Background(), c: demotest.Client(t), p: demotest.Printer(t)}
	x.env = demotest.Env(t, x.p)
	x.s = demotest.Key(t, x.c, kbv1.Algorithm_ALGORITHM_ES256)
	var err error
	if x.res, err = flow(x.ctx, x.p, x.env, x.c, x.s); err != nil {
		t.Fatal(err)
	}
	x.other = demotest.Key(t, x.c, kbv1.Algorithm_ALGORITHM_ES256)
	cert, x5t, err := certificate(x.ctx, x.p, x.c, x.other)
	if err != nil {
		t.Fatal(err)
	}
	x.cert2, x.x5t2 = x.env.HTTPClient(cert), x5t
	return x
}

func (x *setup) call(t *testing.T, hc *http.Client, url, token string) *demo.Response {
	t.Helper()
	resp, err := callRS(x.ctx, hc, url, token)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// TestWrongCertificate: the token over a connection with a different
// keybroker key's certificate is refused, for both flows' tokens.
func TestWrongCertificate(t *testing.T) {
	for name, flow := range map[string]func(context.Context, *demo.Printer, *testservers.Env, *client.Client, *client.Signer) (*result, error){
		"vanilla": vanilla, "exchange": exchange,
	} {
		t.Run(name, func(t *testing.T) {
			x := bound(t, flow)
			resp := x.call(t, x.cert2, x.env.RS.MTLSURL()+"/api/hello", x.res.Token)
			demotest.Refused(t, resp, http.StatusUnauthorized, "bound to certificate x5t#S256 "+x.res.X5TS256, "connection's certificate is "+x.x5t2)
			// The right certificate still works.
			if resp := x.call(t, x.res.HTTP, x.env.RS.MTLSURL()+"/api/hello", x.res.Token); resp.Status != http.StatusOK {
				t.Fatalf("right certificate: %+v", resp)
			}
		})
	}
}

// TestNoCertificate: the token without mutual TLS is refused, and so is a
// certificate-bound token presented as DPoP or PoP.
func TestNoCertificate(t *testing.T) {
	x := bound(t, vanilla)
	demotest.Refused(t, x.call(t, x.env.HTTPClient(), x.env.RS.URL()+"/api/hello", x.res.Token), http.StatusUnauthorized, "no client certificate")
	// The plain listener, even from a client that has the certificate:
	// the server never asked for it.
	demotest.Refused(t, x.call(t, x.res.HTTP, x.env.RS.URL()+"/api/hello", x.res.Token), http.StatusUnauthorized, "no client certificate")

	// As DPoP, with proofs by the certificate's own key, after the nonce
	// retry: refused for the binding.
	hc := &http.Client{Transport: &client.DPoPTransport{
		Signer: x.s.JOSE(),
		Token:  func(context.Context) (string, error) { return x.res.Token, nil },
		Base:   x.res.HTTP.Transport,
	}}
	req, _ := http.NewRequestWithContext(x.ctx, http.MethodGet, x.env.RS.MTLSURL()+"/api/hello", nil)
	resp, err := demo.Do(hc, req)
	if err != nil {
		t.Fatal(err)
	}
	demotest.Refused(t, resp, http.StatusUnauthorized, "not DPoP-bound")
	// As PoP, in an SHR by that key.
	req, _ = http.NewRequestWithContext(x.ctx, http.MethodGet, x.env.RS.MTLSURL()+"/api/hello", nil)
	authz, err := x.s.PoPAuthorization(x.ctx, x.res.Token, req, "")
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", authz)
	resp, err = demo.Do(x.res.HTTP, req)
	if err != nil {
		t.Fatal(err)
	}
	demotest.Refused(t, resp, http.StatusUnauthorized, "not PoP-bound")
}

// TestTokenRequestChecks: the AS refuses certificates that are not
// registered, mTLS client authentication without client_id, and token
// requests without any binding.
func TestTokenRequestChecks(t *testing.T) {
	x := bound(t, vanilla)
	form := url.Values{"grant_type": {"client_credentials"}, "client_id": {clientID}}
	expect := func(t *testing.T, hc *http.Client, tokenURL string, form url.Values, code, says string) {
		t.Helper()
		_, err := demo.RequestToken(x.ctx, hc, tokenURL, form)
		var oe *demo.OAuthError
		if !errors.As(err, &oe) || oe.Code != code || !strings.Contains(oe.Description, says) {
			t.Fatalf("got %v, want %s saying %q", err, code, says)
		}
	}
	expect(t, x.cert2, x.env.AS.MTLSTokenURL(), form, "invalid_client", "is not registered for client")
	expect(t, x.res.HTTP, x.env.AS.MTLSTokenURL(), url.Values{"grant_type": {"client_credentials"}}, "invalid_request", "client_id is required")
	expect(t, x.res.HTTP, x.env.AS.TokenURL(), form, "invalid_client", "no client authentication")
	expect(t, x.res.HTTP, x.env.AS.MTLSTokenURL(), url.Values{"grant_type": {"client_credentials"}, "client_id": {clientID}, "resource": {"https://elsewhere.example"}}, "invalid_target", "not registered")
	expect(t, x.res.HTTP, x.env.AS.MTLSTokenURL(), url.Values{"grant_type": {"password"}, "client_id": {clientID}}, "unsupported_grant_type", "client_credentials only")
}

// TestExchangeChecks: leg 2 is refused over another certificate — even one
// registered for the same client — or without mutual TLS; a leg-1 token is
// not accepted by the RS (it is for the AS); and a token for the RS is not
// accepted as a jwt-pop assertion.
func TestExchangeChecks(t *testing.T) {
	x := bound(t, exchange)
	if err := x.env.AS.RegisterClient(testservers.Client{ID: clientID, X5TS256: []string{x.res.X5TS256, x.x5t2}}); err != nil {
		t.Fatal(err)
	}
	leg2 := func(hc *http.Client, tokenURL, assertion string) error {
		_, err := demo.RequestToken(x.ctx, hc, tokenURL, url.Values{
			"grant_type": {"client_credentials"}, "client_id": {clientID},
			"client_assertion_type": {testservers.ClientAssertionJWTPoP}, "client_assertion": {assertion},
		})
		return err
	}
	for _, tc := range []struct {
		name      string
		hc        *http.Client
		tokenURL  string
		assertion string
		says      string
	}{
		{"other certificate", x.cert2, x.env.AS.MTLSTokenURL(), x.res.Leg1, "bound to certificate x5t#S256 " + x.res.X5TS256 + ", the connection's certificate is " + x.x5t2},
		{"no mutual TLS", x.env.HTTPClient(), x.env.AS.TokenURL(), x.res.Leg1, "needs mutual TLS"},
		{"token for the RS", x.res.HTTP, x.env.AS.MTLSTokenURL(), x.res.Token, "access token aud"},
		{"not a token", x.res.HTTP, x.env.AS.MTLSTokenURL(), "a.b.c", "client assertion"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := leg2(tc.hc, tc.tokenURL, tc.assertion)
			var oe *demo.OAuthError
			if !errors.As(err, &oe) || oe.Code != "invalid_client" || !strings.Contains(oe.Description, tc.says) {
				t.Fatalf("got %v, want invalid_client saying %q", err, tc.says)
			}
		})
	}
	// The same leg 2 over the right certificate still works.
	if err := leg2(x.res.HTTP, x.env.AS.MTLSTokenURL(), x.res.Leg1); err != nil {
		t.Fatalf("leg 2 over the right certificate: %v", err)
	}
	demotest.Refused(t, x.call(t, x.res.HTTP, x.env.RS.MTLSURL()+"/api/hello", x.res.Leg1), http.StatusUnauthorized, "access token aud")
}
