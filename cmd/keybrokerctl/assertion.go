package main

import (
	"github.com/spf13/cobra"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/pop"
)

// assertionFlags are the flags of "client-assertion".
type assertionFlags struct {
	versionFlags
	clientID, audience string
	lifetime           durationFlag
	notBefore          bool
}

// request checks the flags and returns the CreateClientAssertion request
// for key name. keybrokerd checks the client id and audience in full.
func (f *assertionFlags) request(name string) (*kbv1.CreateClientAssertionRequest, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	switch {
	case f.clientID == "":
		return nil, usageErrorf("--client-id: required")
	case f.audience == "":
		return nil, usageErrorf("--audience: required")
	case f.lifetime.d > pop.MaxAssertionLifetime:
		return nil, usageErrorf("--lifetime: got %s, want at most 1h", f.lifetime.String())
	}
	return &kbv1.CreateClientAssertionRequest{
		Name: name, Version: f.version, Kid: f.kid, ClientId: f.clientID, Audience: f.audience,
		Lifetime: f.lifetime.proto(), NotBefore: f.notBefore,
	}, nil
}

func newClientAssertionCmd(a *app) *cobra.Command {
	var f assertionFlags
	cmd := &cobra.Command{
		Use:   "client-assertion NAME --client-id ID --audience URL [--lifetime D] [--nbf]",
		Short: "Make a client assertion (RFC 7523, private_key_jwt) for a token request",
		Long: `Make an RFC 7523 client assertion with a key's active version, or the one
--version or --kid names, and print the JWT: send it to the token endpoint
as client_assertion, with client_assertion_type
urn:ietf:params:oauth:client-assertion-type:jwt-bearer.

--client-id is the OAuth client id, both "iss" and "sub". --audience is
"aud": the authorization server's token endpoint or issuer URL, https
(http only for a loopback host). --lifetime is exp - iat, such as 5m or
1h (default 5m, at most 1h); --nbf adds "nbf". Every call has a new
random "jti". The header has "kid", and "x5t#S256" when the version has
an imported certificate.

With --output json it prints the CreateClientAssertionResponse: the
assertion, the kid and version that signed, its jti and expiry.`,
		Args: cobra.ExactArgs(1),
		RunE: rpc[*kbv1.CreateClientAssertionRequest, *kbv1.CreateClientAssertionResponse]{
			request: func(_ *cobra.Command, args []string) (*kbv1.CreateClientAssertionRequest, error) {
				return f.request(args[0])
			},
			call: kbv1.KeyBrokerClient.CreateClientAssertion,
			text: func(_ *kbv1.CreateClientAssertionRequest, resp *kbv1.CreateClientAssertionResponse) error {
				return a.printValue(resp.GetAssertion())
			},
		}.runE(a),
	}
	fs := cmd.Flags()
	fs.StringVar(&f.clientID, "client-id", "", "the OAuth client `ID`: iss and sub (required)")
	fs.StringVar(&f.audience, "audience", "", "the authorization server's token endpoint or issuer `URL`: aud (required)")
	fs.Var(&f.lifetime, "lifetime", "validity `D` of the assertion, as 5m or 1h (default 5m, at most 1h)")
	fs.BoolVar(&f.notBefore, "nbf", false, `add "nbf" (= "iat")`)
	f.register(fs)
	return cmd
}
