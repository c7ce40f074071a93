package client

import (
	"context"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// AssertionOption adjusts a client assertion (ClientAssertion).
type AssertionOption func(*kbv1.CreateClientAssertionRequest)

// AssertionLifetime sets "exp" - "iat" (default 5 minutes, at most 1 hour).
func AssertionLifetime(d time.Duration) AssertionOption {
	return func(r *kbv1.CreateClientAssertionRequest) { r.Lifetime = durationpb.New(d) }
}

// AssertionNotBefore adds "nbf" (equal to "iat").
func AssertionNotBefore() AssertionOption {
	return func(r *kbv1.CreateClientAssertionRequest) { r.NotBefore = true }
}

// ClientAssertion returns an RFC 7523 client assertion (private_key_jwt)
// signed by the ACTIVE version of key name: a JWT with iss = sub =
// clientID, aud = audience (the authorization server's token endpoint or
// issuer URL), a fresh jti, iat and exp. Send it as the token request's
// client_assertion with client_assertion_type
// urn:ietf:params:oauth:client-assertion-type:jwt-bearer. Make a new one
// for every token request: the AS may refuse a jti it has seen.
func (c *Client) ClientAssertion(ctx context.Context, name, clientID, audience string, opts ...AssertionOption) (string, error) {
	return c.clientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: name, ClientId: clientID, Audience: audience}, opts)
}

// ClientAssertion is Client.ClientAssertion signed by the Signer's
// version (which must still be ACTIVE or RETIRED).
func (s *Signer) ClientAssertion(ctx context.Context, clientID, audience string, opts ...AssertionOption) (string, error) {
	return s.c.clientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: s.name, Kid: s.kid, ClientId: clientID, Audience: audience}, opts)
}

func (c *Client) clientAssertion(ctx context.Context, req *kbv1.CreateClientAssertionRequest, opts []AssertionOption) (string, error) {
	for _, o := range opts {
		o(req)
	}
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	resp, err := c.api.CreateClientAssertion(ctx, req)
	if err != nil {
		return "", err
	}
	return resp.GetAssertion(), nil
}
