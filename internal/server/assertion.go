package server

import (
	"context"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
)

// assertionFields are the request fields behind the claims
// pop.ClientAssertionParams checks.
var assertionFields = map[string]string{"iss": "client_id", "sub": "client_id", "aud": "audience", "exp": "lifetime"}

// CreateClientAssertion signs an RFC 7523 client assertion
// (private_key_jwt) for the client id with the version named or the
// ACTIVE one. The request is checked whole before the key is looked up,
// so a bad field is INVALID_ARGUMENT whatever the key, and nothing is
// signed.
func (s *Server) CreateClientAssertion(ctx context.Context, req *kbv1.CreateClientAssertionRequest) (*kbv1.CreateClientAssertionResponse, error) {
	p := pop.ClientAssertionParams{ClientID: req.GetClientId(), Audience: req.GetAudience(), Now: time.Now(), NotBefore: req.GetNotBefore()}
	if l := req.GetLifetime(); l != nil {
		if err := l.CheckValid(); err != nil || l.AsDuration() == 0 {
			return nil, &kms.FieldError{Field: "lifetime", Reason: "want at least 1s and at most 1h (unset: 5m)"}
		}
		p.Lifetime = l.AsDuration()
	}
	if err := p.Check(); err != nil {
		return nil, inputError("client_id", assertionFields, err)
	}
	vs, err := s.signer(ctx, req)
	if err != nil {
		return nil, err
	}
	// An AS that registered the version's certificate rather than its
	// key finds it by x5t#S256 (RFC 7515 §4.1.8).
	p.X5TS256 = vs.X5TS256()
	a, jti, err := pop.NewClientAssertion(ctx, vs.JOSE(), p)
	if err != nil {
		return nil, inputError("client_id", assertionFields, err)
	}
	lifetime := p.Lifetime
	if lifetime == 0 {
		lifetime = pop.DefaultAssertionLifetime
	}
	return &kbv1.CreateClientAssertionResponse{
		Assertion: a, Kid: vs.Kid(), Version: vs.Version(), Jti: jti,
		ExpireTime: timestamppb.New(time.Unix(p.Now.Unix(), 0).Add(lifetime)), X5TS256: p.X5TS256,
	}, nil
}
