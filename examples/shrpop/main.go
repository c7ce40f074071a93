// Command shrpop gets an access token bound to a keybroker key the way MSAL
// SHR PoP and MSAuth 1.0 AT-POP do, and uses it:
//
//  1. The client is registered at the AS with the key's public JWK
//     (private_key_jwt client authentication; out of band).
//  2. Token request: grant_type=client_credentials, a client assertion
//     signed by the key, token_type=pop and req_cnf — the key's
//     {"kid": thumbprint} (MSAL SHR PoP) or its public JWK (MSAuth 1.0
//     AT-POP), from Signer.ReqCnf.
//  3. The AS answers with a JWT access token whose cnf is {"kid": …} or
//     {"jwk": …}.
//  4. The client calls the RS with "Authorization: PoP <SHR>"
//     (Signer.PoPAuthorization): a JWS over the token, the method, host,
//     path and time, signed in hardware by the same key.
//  5. The RS verifies the SHR, the token's signature, issuer, audience and
//     lifetime, and that the SHR's key is the one the token's cnf names.
//
// Then it shows the RS refusing the token when another key signs the SHR.
//
// Run `make run` in one terminal and `go run ./examples/shrpop` in another
// (from the repository root, or with KEYBROKER_SOCKET set). It starts its
// own test AS and RS on loopback (examples/internal/testservers).
package main

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/examples/internal/demo"
	"github.com/keybroker/keybroker/examples/internal/testservers"
	"github.com/keybroker/keybroker/pop"
)

const clientID = "shrpop-example"

// reqCnfForm selects which req_cnf the client sends.
type reqCnfForm string

const (
	kidForm reqCnfForm = "kid" // MSAL SHR PoP: {"kid": thumbprint, "xms_ksl": "uhw"}
	jwkForm reqCnfForm = "jwk" // MSAuth 1.0 AT-POP: the public JWK
)

func main() {
	if err := run(context.Background(), os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "shrpop:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, w io.Writer) error {
	p := demo.NewPrinter(w)
	c, target, err := demo.Dial()
	if err != nil {
		return err
	}
	defer c.Close()
	s, err := demo.Key(ctx, c, "example-shrpop", kbv1.Algorithm_ALGORITHM_RS256)
	if err != nil {
		return err
	}
	p.Section("keybrokerd at %s, key %q (%s, kid %s)", target, s.Name(), s.JOSE().Alg(), s.KeyID())
	env, err := testservers.Start(testservers.Config{Logger: p.ServerLog()})
	if err != nil {
		return err
	}
	defer env.Close()
	p.Info("test AS %s, test RS %s", env.AS.Issuer(), env.RS.URL())

	var last *result
	for _, f := range []reqCnfForm{kidForm, jwkForm} {
		p.Section("req_cnf %s form", f)
		if last, err = flow(ctx, p, env, c, s, f); err != nil {
			return err
		}
	}

	p.Section("the binding at work")
	other, err := demo.Key(ctx, c, "example-shrpop-other", kbv1.Algorithm_ALGORITHM_ES256)
	if err != nil {
		return err
	}
	p.Step("Present the same token in an SHR signed by another key, %q (kid %s)", other.Name(), other.KeyID())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, env.RS.URL()+"/api/hello", nil)
	if err != nil {
		return err
	}
	resp, err := callRS(ctx, env.HTTPClient(), other, last.Token, req)
	if err != nil {
		return err
	}
	p.Info("RS: %d %s: %s", resp.Status, resp.Code, resp.Description)
	if resp.Status == http.StatusOK {
		return errors.New("the RS accepted an SHR signed by a key the token is not bound to")
	}
	return nil
}

// result is what one run of the flow got.
type result struct {
	Token    string
	Claims   *testservers.Claims // decoded for display; the RS verifies
	Response *demo.Response
}

// flow runs steps 1–5 with key s and the req_cnf form f.
func flow(ctx context.Context, p *demo.Printer, env *testservers.Env, c *client.Client, s *client.Signer, f reqCnfForm) (*result, error) {
	p.Step("Register client %q at the AS (out of band): private_key_jwt, public key %s", clientID, s.KeyID())
	if err := env.AS.RegisterClient(testservers.Client{ID: clientID, JWKS: []pop.JWK{s.JOSE().JWK()}}); err != nil {
		return nil, err
	}

	p.Step("req_cnf from the SDK (Signer.ReqCnf), checked against the daemon's GetConfirmation")
	jwkReqCnf, kidReqCnf, err := s.ReqCnf()
	if err != nil {
		return nil, err
	}
	conf, err := c.API().GetConfirmation(ctx, &kbv1.GetConfirmationRequest{Name: s.Name(), Kid: s.KeyID()})
	if err != nil {
		return nil, err
	}
	if conf.GetReqCnfKid() != kidReqCnf || conf.GetReqCnfJwk() != jwkReqCnf || conf.GetThumbprint() != s.KeyID() {
		return nil, fmt.Errorf("SDK and daemon disagree on req_cnf: %q %q vs %q %q", kidReqCnf, jwkReqCnf, conf.GetReqCnfKid(), conf.GetReqCnfJwk())
	}
	reqCnf := kidReqCnf
	if f == jwkForm {
		reqCnf = jwkReqCnf
	}
	raw, _ := base64.RawURLEncoding.DecodeString(reqCnf)
	p.Info("req_cnf = base64url(%s)", raw)

	p.Step("POST %s: client_credentials, token_type=pop, req_cnf, client assertion signed in hardware", env.AS.TokenURL())
	assertion, err := demo.ClientAssertion(ctx, s.JOSE(), clientID, env.AS.TokenURL(), time.Now())
	if err != nil {
		return nil, err
	}
	hc := env.HTTPClient()
	tr, err := demo.RequestToken(ctx, hc, env.AS.TokenURL(), url.Values{
		"grant_type":            {testservers.GrantClientCredentials},
		"client_id":             {clientID},
		"client_assertion_type": {testservers.ClientAssertionJWTBearer},
		"client_assertion":      {assertion},
		"token_type":            {testservers.TokenTypePoP},
		"req_cnf":               {reqCnf},
	})
	if err != nil {
		return nil, fmt.Errorf("token request: %w", err)
	}
	if !strings.EqualFold(tr.TokenType, testservers.TokenTypePoP) {
		return nil, fmt.Errorf("token_type %q, want pop", tr.TokenType)
	}
	claims, err := testservers.DecodeToken(tr.AccessToken)
	if err != nil {
		return nil, err
	}
	p.Info("access_token %s, token_type %s, cnf %s", demo.Short(tr.AccessToken), tr.TokenType, claims.Cnf)

	p.Step("GET %s/api/hello with Authorization: PoP <SHR signed by %q>", env.RS.URL(), s.Name())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, env.RS.URL()+"/api/hello", nil)
	if err != nil {
		return nil, err
	}
	authz, err := s.PoPAuthorization(ctx, tr.AccessToken, req, "")
	if err != nil {
		return nil, err
	}
	shr := demo.Claims(strings.TrimPrefix(authz, "PoP "))
	shr["at"] = demo.Short(tr.AccessToken)
	shr["cnf"] = fmt.Sprintf("{jwk: the public key, thumbprint %s}", s.KeyID())
	p.Info("SHR claims %s", demo.JSON(shr))
	req.Header.Set("Authorization", authz)
	resp, err := demo.Do(hc, req)
	if err != nil {
		return nil, err
	}
	if err := resp.Err(); err != nil {
		return nil, fmt.Errorf("RS: %w", err)
	}
	p.Info("RS: %d %s", resp.Status, resp.Body)
	return &result{Token: tr.AccessToken, Claims: claims, Response: resp}, nil
}

// callRS sends req with "Authorization: PoP <SHR>", the SHR binding token
// to req's method and URL and signed by s.
func callRS(ctx context.Context, hc *http.Client, s *client.Signer, token string, req *http.Request) (*demo.Response, error) {
	authz, err := s.PoPAuthorization(ctx, token, req, "")
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", authz)
	return demo.Do(hc, req)
}
