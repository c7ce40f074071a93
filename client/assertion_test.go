package client_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/pop"
)

// TestClientAssertion: the SDK's assertions verify under the key's public
// key and carry the options; the Signer's is signed by its own version
// after a rotation, the Client's by the new ACTIVE one.
func TestClientAssertion(t *testing.T) {
	c := dial(t)
	ctx := context.Background()
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	a, err := c.ClientAssertion(ctx, s.Name(), "app", "https://as.example/token", client.AssertionLifetime(time.Minute), client.AssertionNotBefore())
	if err != nil {
		t.Fatal(err)
	}
	hdr, payload, err := pop.VerifyJWS(a, s.Public())
	if err != nil {
		t.Fatal(err)
	}
	var claims struct {
		Iss, Sub, Aud string
		Iat, Exp, Nbf int64
	}
	json.Unmarshal(payload, &claims)
	if claims.Iss != "app" || claims.Sub != "app" || claims.Aud != "https://as.example/token" || claims.Exp-claims.Iat != 60 || claims.Nbf != claims.Iat {
		t.Errorf("claims %+v", claims)
	}
	if string(hdr["kid"]) != `"`+s.KeyID()+`"` {
		t.Errorf("kid %s, want %s", hdr["kid"], s.KeyID())
	}

	if _, err := c.API().RotateKey(ctx, &kbv1.RotateKeyRequest{Name: s.Name()}); err != nil {
		t.Fatal(err)
	}
	old, err := s.ClientAssertion(ctx, "app", "https://as.example/token")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := pop.VerifyJWS(old, s.Public()); err != nil {
		t.Errorf("the Signer's assertion after rotation: %v", err)
	}
	active, err := c.ClientAssertion(ctx, s.Name(), "app", "https://as.example/token")
	if err != nil {
		t.Fatal(err)
	}
	s2, err := c.Signer(ctx, s.Name())
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := pop.VerifyJWS(active, s2.Public()); err != nil || s2.Version() != 2 {
		t.Errorf("the Client's assertion after rotation does not verify under version %d: %v", s2.Version(), err)
	}
	if _, err := c.ClientAssertion(ctx, s.Name(), "", "https://as.example/token"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("empty client id: %v", err)
	}
}
