// Command mtls gets certificate-bound access tokens (RFC 8705) with a
// keybroker key as the TLS client key: the daemon makes a self-signed
// certificate for the key (CreateSelfSignedCertificate), and crypto/tls
// signs the handshake through client.Signer, so the private key stays in
// hardware.
//
// The vanilla flow, one token request:
//
//  1. The client registers the certificate's x5t#S256 at the AS
//     (self_signed_tls_client_auth, RFC 8705 §2.2; out of band).
//  2. Token request over mutual TLS to the AS's mTLS endpoint alias: the
//     certificate authenticates the client, and the AS binds the token to
//     it: cnf {"x5t#S256": base64url(SHA-256(certificate DER))}.
//  3. RS call over mutual TLS with the same certificate and
//     "Authorization: Bearer <token>"; the RS requires the connection's
//     certificate to have the token's x5t#S256.
//
// The two-leg token exchange:
//
//  1. Leg 1 as above, but for the AS itself (resource=<issuer>): a
//     certificate-bound token that will serve as a client assertion.
//  2. Leg 2, over the same certificate: client_assertion_type
//     urn:ietf:params:oauth:client-assertion-type:jwt-pop,
//     client_assertion=<leg 1 token>. The AS checks the assertion is its
//     own, for itself, and bound to this connection's certificate, and
//     issues the final token for the RS, bound to the same certificate.
//  3. RS call as above.
//
// Then it shows the RS refusing the token over another key's certificate.
//
// Run `make run` in one terminal and `go run ./examples/mtls` in another
// (from the repository root, or with KEYBROKER_SOCKET set). It starts its
// own test AS and RS on loopback (examples/internal/testservers).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/examples/internal/demo"
	"github.com/keybroker/keybroker/examples/internal/testservers"
	"github.com/keybroker/keybroker/pop"
)

const clientID = "mtls-example"

func main() {
	if err := run(context.Background(), os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "mtls:", err)
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
	s, err := demo.Key(ctx, c, "example-mtls", kbv1.Algorithm_ALGORITHM_ES256)
	if err != nil {
		return err
	}
	p.Section("keybrokerd at %s, key %q (%s, kid %s)", target, s.Name(), s.JOSE().Alg(), s.KeyID())
	env, err := testservers.Start(testservers.Config{Logger: p.ServerLog()})
	if err != nil {
		return err
	}
	defer env.Close()
	p.Info("test AS %s (mTLS alias %s), test RS %s (mTLS %s)", env.AS.Issuer(), env.AS.MTLSTokenURL(), env.RS.URL(), env.RS.MTLSURL())

	p.Section("vanilla: one token request over mutual TLS")
	res, err := vanilla(ctx, p, env, c, s)
	if err != nil {
		return err
	}
	p.Section("two-leg token exchange: a bound token as the client assertion")
	if _, err := exchange(ctx, p, env, c, s); err != nil {
		return err
	}

	p.Section("the binding at work")
	other, err := demo.Key(ctx, c, "example-mtls-other", kbv1.Algorithm_ALGORITHM_ES256)
	if err != nil {
		return err
	}
	p.Step("Send the vanilla token over a connection with another key's certificate (%q)", other.Name())
	cert, _, err := certificate(ctx, p, c, other)
	if err != nil {
		return err
	}
	resp, err := callRS(ctx, env.HTTPClient(cert), env.RS.MTLSURL()+"/api/hello", res.Token)
	if err != nil {
		return err
	}
	p.Info("RS: %d %s: %s", resp.Status, resp.Code, resp.Description)
	if resp.Status == http.StatusOK {
		return errors.New("the RS accepted a token over a certificate it is not bound to")
	}
	return nil
}

// result is what a flow got.
type result struct {
	Cert     tls.Certificate
	X5TS256  string
	HTTP     *http.Client // presents Cert
	Leg1     string       // the exchange's leg 1 token (its client assertion)
	Token    string       // the token for the RS
	Claims   *testservers.Claims
	Response *demo.Response
}

// certificate has the daemon make a self-signed client certificate for s
// and returns it as a tls.Certificate whose private key is s.
func certificate(ctx context.Context, p *demo.Printer, c *client.Client, s *client.Signer) (tls.Certificate, string, error) {
	resp, err := c.API().CreateSelfSignedCertificate(ctx, &kbv1.CreateSelfSignedCertificateRequest{
		Name: s.Name(), Kid: s.KeyID(), CommonName: clientID,
	})
	if err != nil {
		return tls.Certificate{}, "", err
	}
	der := resp.GetCertificateDer()
	if x5t := pop.X5TS256(der); resp.GetX5TS256() != x5t {
		return tls.Certificate{}, "", fmt.Errorf("daemon says x5t#S256 %s, the certificate's is %s", resp.GetX5TS256(), x5t)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	p.Info("certificate %q, valid until %s, x5t#S256 %s", leaf.Subject.CommonName, leaf.NotAfter.Format("2006-01-02"), resp.GetX5TS256())
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: s, Leaf: leaf}, resp.GetX5TS256(), nil
}

// enroll makes s's certificate and registers it for the client.
func enroll(ctx context.Context, p *demo.Printer, env *testservers.Env, c *client.Client, s *client.Signer) (*result, error) {
	p.Step("CreateSelfSignedCertificate for key %q; the TLS private key is the client.Signer", s.Name())
	cert, x5t, err := certificate(ctx, p, c, s)
	if err != nil {
		return nil, err
	}
	p.Step("Register client %q at the AS (out of band): self_signed_tls_client_auth, x5t#S256 %s", clientID, x5t)
	if err := env.AS.RegisterClient(testservers.Client{ID: clientID, X5TS256: []string{x5t}}); err != nil {
		return nil, err
	}
	return &result{Cert: cert, X5TS256: x5t, HTTP: env.HTTPClient(cert)}, nil
}

// vanilla runs the single-call flow with key s.
func vanilla(ctx context.Context, p *demo.Printer, env *testservers.Env, c *client.Client, s *client.Signer) (*result, error) {
	res, err := enroll(ctx, p, env, c, s)
	if err != nil {
		return nil, err
	}
	p.Step("POST %s over mutual TLS: grant_type=client_credentials, client_id", env.AS.MTLSTokenURL())
	tr, err := demo.RequestToken(ctx, res.HTTP, env.AS.MTLSTokenURL(), url.Values{
		"grant_type": {testservers.GrantClientCredentials},
		"client_id":  {clientID},
	})
	if err != nil {
		return nil, fmt.Errorf("token request: %w", err)
	}
	if res.Claims, err = checkToken(p, tr, res.X5TS256); err != nil {
		return nil, err
	}
	res.Token = tr.AccessToken
	return res, present(ctx, p, env, res)
}

// exchange runs the two-leg flow with key s.
func exchange(ctx context.Context, p *demo.Printer, env *testservers.Env, c *client.Client, s *client.Signer) (*result, error) {
	res, err := enroll(ctx, p, env, c, s)
	if err != nil {
		return nil, err
	}
	p.Step("Leg 1: POST %s over mutual TLS, resource=%s (a token for the AS itself)", env.AS.MTLSTokenURL(), env.AS.Issuer())
	leg1, err := demo.RequestToken(ctx, res.HTTP, env.AS.MTLSTokenURL(), url.Values{
		"grant_type": {testservers.GrantClientCredentials},
		"client_id":  {clientID},
		"resource":   {env.AS.Issuer()},
	})
	if err != nil {
		return nil, fmt.Errorf("leg 1: %w", err)
	}
	if _, err := checkToken(p, leg1, res.X5TS256); err != nil {
		return nil, err
	}
	res.Leg1 = leg1.AccessToken

	p.Step("Leg 2: POST %s over the same certificate, client_assertion_type=jwt-pop, client_assertion=<leg 1 token>", env.AS.MTLSTokenURL())
	tr, err := demo.RequestToken(ctx, res.HTTP, env.AS.MTLSTokenURL(), url.Values{
		"grant_type":            {testservers.GrantClientCredentials},
		"client_id":             {clientID},
		"client_assertion_type": {testservers.ClientAssertionJWTPoP},
		"client_assertion":      {res.Leg1},
	})
	if err != nil {
		return nil, fmt.Errorf("leg 2: %w", err)
	}
	if res.Claims, err = checkToken(p, tr, res.X5TS256); err != nil {
		return nil, err
	}
	res.Token = tr.AccessToken
	return res, present(ctx, p, env, res)
}

// checkToken prints a token response and checks it is bound to x5t.
func checkToken(p *demo.Printer, tr *demo.TokenResponse, x5t string) (*testservers.Claims, error) {
	claims, err := testservers.DecodeToken(tr.AccessToken)
	if err != nil {
		return nil, err
	}
	p.Info("access_token %s, token_type %s, aud %s, cnf %s", demo.Short(tr.AccessToken), tr.TokenType, strings.Join(claims.Audience, " "), claims.Cnf)
	if claims.Cnf.X5TS256 != x5t {
		return nil, fmt.Errorf("token cnf %s, want x5t#S256 %s", claims.Cnf, x5t)
	}
	return claims, nil
}

// present calls the RS's mTLS listener with the token, over the
// certificate it is bound to.
func present(ctx context.Context, p *demo.Printer, env *testservers.Env, res *result) error {
	p.Step("GET %s/api/hello over mutual TLS with the same certificate, Authorization: Bearer <token>", env.RS.MTLSURL())
	resp, err := callRS(ctx, res.HTTP, env.RS.MTLSURL()+"/api/hello", res.Token)
	if err != nil {
		return err
	}
	res.Response = resp
	if err := resp.Err(); err != nil {
		return fmt.Errorf("RS: %w", err)
	}
	p.Info("RS: %d %s", resp.Status, resp.Body)
	return nil
}

func callRS(ctx context.Context, hc *http.Client, url, token string) (*demo.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	return demo.Do(hc, req)
}
