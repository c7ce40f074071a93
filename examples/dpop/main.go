// Command dpop gets a DPoP-bound access token (RFC 9449) for a keybroker
// key and uses it, with the server nonces a real deployment demands:
//
//  1. The client is registered at the AS with the key's public JWK
//     (private_key_jwt client authentication; out of band).
//  2. Token request through client.DPoPTransport: every request carries a
//     DPoP proof signed in hardware. The AS first answers 400
//     {"error":"use_dpop_nonce"} with a DPoP-Nonce header; the transport
//     retries once with that nonce in a new proof. The token's cnf.jkt is
//     the key's RFC 7638 thumbprint.
//  3. RS call through a second DPoPTransport that sends the token
//     ("Authorization: DPoP <token>", proof with ath). The RS demands its
//     own nonce (401, WWW-Authenticate: DPoP error="use_dpop_nonce"); the
//     transport retries. The RS checks the proof (signature, htm, htu, iat,
//     ath, nonce, unused jti), the token, and cnf.jkt == the proof key's
//     thumbprint.
//  4. A second call needs one round trip: the transport kept the nonce.
//
// Then it shows the RS refusing a proof signed by another key and a
// replayed proof.
//
// Run `make run` in one terminal and `go run ./examples/dpop` in another
// (from the repository root, or with KEYBROKER_SOCKET set). It starts its
// own test AS and RS on loopback (examples/internal/testservers).
package main

import (
	"context"
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

const clientID = "dpop-example"

func main() {
	if err := run(context.Background(), os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "dpop:", err)
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
	s, err := demo.Key(ctx, c, "example-dpop", kbv1.Algorithm_ALGORITHM_ES256)
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

	res, err := flow(ctx, p, env, s)
	if err != nil {
		return err
	}

	p.Section("the binding at work")
	other, err := demo.Key(ctx, c, "example-dpop-other", kbv1.Algorithm_ALGORITHM_ES256)
	if err != nil {
		return err
	}
	p.Step("Send the token with proofs signed by another key, %q (kid %s)", other.Name(), other.KeyID())
	hc, _ := rsClient(env, other.JOSE(), res.Token, p)
	resp, err := get(ctx, hc, env.RS.URL()+"/api/hello")
	if err != nil {
		return err
	}
	p.Info("RS: %d %s: %s", resp.Status, resp.Code, resp.Description)
	if resp.Status == http.StatusOK {
		return errors.New("the RS accepted a proof from a key the token is not bound to")
	}

	p.Step("Replay the last request, token and proof as they were sent")
	resp, err = replay(ctx, env, res.RSTrace.Hops()[len(res.RSTrace.Hops())-1])
	if err != nil {
		return err
	}
	p.Info("RS: %d %s: %s", resp.Status, resp.Code, resp.Description)
	if resp.Status == http.StatusOK {
		return errors.New("the RS accepted a replayed proof")
	}
	return nil
}

// result is what one run of the flow got.
type result struct {
	Token            string
	Claims           *testservers.Claims // decoded for display; the RS verifies
	Response         *demo.Response      // of the first RS call
	ASTrace, RSTrace *demo.Trace
}

// flow runs steps 1–4 with key s.
func flow(ctx context.Context, p *demo.Printer, env *testservers.Env, s *client.Signer) (*result, error) {
	p.Step("Register client %q at the AS (out of band): private_key_jwt, public key %s", clientID, s.KeyID())
	if err := env.AS.RegisterClient(testservers.Client{ID: clientID, JWKS: []pop.JWK{s.JOSE().JWK()}}); err != nil {
		return nil, err
	}

	p.Step("POST %s through client.DPoPTransport (proofs signed in hardware)", env.AS.TokenURL())
	asTrace := &demo.Trace{Base: env.Transport(), P: p}
	asClient := &http.Client{Transport: &client.DPoPTransport{Signer: s.JOSE(), Base: asTrace}}
	assertion, err := demo.ClientAssertion(ctx, s.JOSE(), clientID, env.AS.TokenURL(), time.Now())
	if err != nil {
		return nil, err
	}
	tr, err := demo.RequestToken(ctx, asClient, env.AS.TokenURL(), url.Values{
		"grant_type":            {testservers.GrantClientCredentials},
		"client_id":             {clientID},
		"client_assertion_type": {testservers.ClientAssertionJWTBearer},
		"client_assertion":      {assertion},
	})
	if err != nil {
		return nil, fmt.Errorf("token request: %w", err)
	}
	if !strings.EqualFold(tr.TokenType, "DPoP") {
		return nil, fmt.Errorf("token_type %q, want DPoP", tr.TokenType)
	}
	claims, err := testservers.DecodeToken(tr.AccessToken)
	if err != nil {
		return nil, err
	}
	p.Info("access_token %s, token_type %s, cnf %s", demo.Short(tr.AccessToken), tr.TokenType, claims.Cnf)
	p.Info("cnf.jkt is the key's thumbprint: %v", claims.Cnf.JKT == s.KeyID())

	p.Step("GET %s/api/hello through a DPoPTransport with the token", env.RS.URL())
	rsc, rsTrace := rsClient(env, s.JOSE(), tr.AccessToken, p)
	resp, err := get(ctx, rsc, env.RS.URL()+"/api/hello")
	if err != nil {
		return nil, err
	}
	if err := resp.Err(); err != nil {
		return nil, fmt.Errorf("RS: %w", err)
	}
	p.Info("RS: %d %s", resp.Status, resp.Body)

	p.Step("GET it again: the transport kept the RS's nonce")
	again, err := get(ctx, rsc, env.RS.URL()+"/api/hello")
	if err != nil {
		return nil, err
	}
	if err := again.Err(); err != nil {
		return nil, fmt.Errorf("RS, second call: %w", err)
	}
	p.Info("RS: %d", again.Status)
	return &result{Token: tr.AccessToken, Claims: claims, Response: resp, ASTrace: asTrace, RSTrace: rsTrace}, nil
}

// rsClient sends token with DPoP proofs signed by s, through a Trace.
func rsClient(env *testservers.Env, s pop.Signer, token string, p *demo.Printer) (*http.Client, *demo.Trace) {
	trace := &demo.Trace{Base: env.Transport(), P: p}
	return &http.Client{Transport: &client.DPoPTransport{
		Signer: s,
		Token:  func(context.Context) (string, error) { return token, nil },
		Base:   trace,
	}}, trace
}

func get(ctx context.Context, hc *http.Client, url string) (*demo.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	return demo.Do(hc, req)
}

// replay sends a request again with the headers it was sent with.
func replay(ctx context.Context, env *testservers.Env, h demo.Hop) (*demo.Response, error) {
	req, err := http.NewRequestWithContext(ctx, h.Method, h.URL, nil)
	if err != nil {
		return nil, err
	}
	req.Header = h.Header.Clone()
	return demo.Do(env.HTTPClient(), req)
}
