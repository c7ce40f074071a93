package server

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// assertionClaims are the claims of a client assertion, decoded from the
// payload jwx verified.
type assertionClaims struct {
	Iss, Sub, Aud, Jti string
	Iat, Exp           int64
	Nbf                *int64
}

// TestClientAssertion: an RFC 7523 assertion from the daemon on SoftHSM2
// verifies under the version's JWK (jwx v3), claim by claim and header
// member by member, for the ACTIVE version and for one named by version.
func TestClientAssertion(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	for _, alg := range []kbv1.Algorithm{kbv1.Algorithm_ALGORITHM_ES256, kbv1.Algorithm_ALGORITHM_PS256} {
		name := strings.ToLower(strings.TrimPrefix(alg.String(), "ALGORITHM_"))
		if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: name, Algorithm: alg}); err != nil {
			t.Fatal(err)
		}
		before := time.Now().Unix()
		resp, err := s.client.CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: name,
			ClientId: "app-123", Audience: "https://login.example.com/tenant/oauth2/v2.0/token", NotBefore: true})
		if err != nil {
			t.Fatal(err)
		}
		pk, err := s.client.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		algName := algName(alg)
		var c assertionClaims
		if err := json.Unmarshal(jwxVerify(t, resp.Assertion, algName, []byte(pk.Jwk)), &c); err != nil {
			t.Fatal(err)
		}
		var hdr map[string]any
		b64json(t, strings.Split(resp.Assertion, ".")[0], &hdr)
		if len(hdr) != 3 || hdr["alg"] != algName || hdr["typ"] != "JWT" || hdr["kid"] != pk.Kid {
			t.Errorf("%s: header %v, want alg, typ JWT and kid %s only", name, hdr, pk.Kid)
		}
		if c.Iss != "app-123" || c.Sub != "app-123" || c.Aud != "https://login.example.com/tenant/oauth2/v2.0/token" {
			t.Errorf("%s: iss %q sub %q aud %q", name, c.Iss, c.Sub, c.Aud)
		}
		if c.Iat < before || c.Iat > time.Now().Unix() || c.Exp != c.Iat+300 || c.Nbf == nil || *c.Nbf != c.Iat {
			t.Errorf("%s: iat %d (called at %d), exp %d, nbf %v: want exp = iat+300 and nbf = iat", name, c.Iat, before, c.Exp, c.Nbf)
		}
		if c.Jti != resp.Jti || len(c.Jti) < 22 || resp.ExpireTime.AsTime().Unix() != c.Exp {
			t.Errorf("%s: jti %q (response %q), exp %d (response %v)", name, c.Jti, resp.Jti, c.Exp, resp.ExpireTime.AsTime())
		}
		if resp.Kid != pk.Kid || resp.Version != 1 {
			t.Errorf("%s: response kid %s version %d", name, resp.Kid, resp.Version)
		}
	}

	// A lifetime within bounds, no nbf, http to a loopback AS, version 1
	// named after a rotation.
	if _, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "es256"}); err != nil {
		t.Fatal(err)
	}
	v1, _ := s.client.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: "es256", Version: 1})
	resp, err := s.client.CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: "es256", Version: 1,
		ClientId: "app", Audience: "http://127.0.0.1:9/token", Lifetime: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	var c assertionClaims
	json.Unmarshal(jwxVerify(t, resp.Assertion, "ES256", []byte(v1.Jwk)), &c)
	if c.Exp != c.Iat+3600 || c.Nbf != nil || resp.Version != 1 || resp.Kid != v1.Kid {
		t.Errorf("1h assertion by version 1: exp-iat %d, nbf %v, version %d kid %s", c.Exp-c.Iat, c.Nbf, resp.Version, resp.Kid)
	}
}

// TestClientAssertionJTIUnique: 2,000 assertions, no jti twice.
func TestClientAssertionJTIUnique(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	const n, workers = 2000, 8
	results := make(chan string, n)
	for range workers {
		go func() {
			for range n / workers {
				r, err := s.client.CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: "k", ClientId: "c", Audience: "https://as.example/token"})
				if err != nil {
					results <- "error: " + err.Error()
					continue
				}
				var c assertionClaims
				b64json(t, strings.Split(r.Assertion, ".")[1], &c)
				results <- c.Jti
			}
		}()
	}
	seen := map[string]bool{}
	for range n {
		jti := <-results
		if strings.HasPrefix(jti, "error: ") || jti == "" {
			t.Fatal(jti)
		}
		if seen[jti] {
			t.Fatalf("jti %s repeated", jti)
		}
		seen[jti] = true
	}
}

// TestClientAssertionBadInput: each bad field is INVALID_ARGUMENT naming
// it, whether or not the key exists, and nothing reaches the hardware.
func TestClientAssertionBadInput(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	good := func() *kbv1.CreateClientAssertionRequest {
		return &kbv1.CreateClientAssertionRequest{Name: "k", ClientId: "c", Audience: "https://as.example/token"}
	}
	before := s.backend.calls.Load()
	for _, tc := range []struct {
		field string
		edit  func(*kbv1.CreateClientAssertionRequest)
	}{
		{"client_id", func(r *kbv1.CreateClientAssertionRequest) { r.ClientId = "" }},
		{"client_id", func(r *kbv1.CreateClientAssertionRequest) { r.ClientId = "a\x00b" }},
		{"audience", func(r *kbv1.CreateClientAssertionRequest) { r.Audience = "" }},
		{"audience", func(r *kbv1.CreateClientAssertionRequest) { r.Audience = "as.example/token" }},
		{"audience", func(r *kbv1.CreateClientAssertionRequest) { r.Audience = "http://as.example/token" }},
		{"audience", func(r *kbv1.CreateClientAssertionRequest) { r.Audience = "https://as.example/token#f" }},
		{"lifetime", func(r *kbv1.CreateClientAssertionRequest) { r.Lifetime = durationpb.New(0) }},
		{"lifetime", func(r *kbv1.CreateClientAssertionRequest) { r.Lifetime = durationpb.New(-time.Minute) }},
		{"lifetime", func(r *kbv1.CreateClientAssertionRequest) { r.Lifetime = durationpb.New(time.Hour + time.Second) }},
		{"lifetime", func(r *kbv1.CreateClientAssertionRequest) { r.Lifetime = &durationpb.Duration{Seconds: 1, Nanos: -5} }},
	} {
		for _, key := range []string{"k", "absent"} {
			req := good()
			req.Name = key
			tc.edit(req)
			_, err := s.client.CreateClientAssertion(ctx, req)
			if st := status.Convert(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "invalid "+tc.field+":") {
				t.Errorf("%s %v on key %s: %v, want InvalidArgument naming %s", tc.field, req, key, err, tc.field)
			}
		}
	}
	if _, err := s.client.CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: "absent", ClientId: "c", Audience: "https://as.example/t"}); status.Code(err) != codes.NotFound {
		t.Errorf("absent key: %v, want NotFound", err)
	}
	if n := s.backend.calls.Load() - before; n != 0 {
		t.Errorf("%d hardware calls for refused requests", n)
	}
}

// TestClientAssertionNeedsSigner: an admin-only tenant may not sign
// assertions.
func TestClientAssertionNeedsSigner(t *testing.T) {
	s := newStackWith(t, []TenantPolicy{{Name: "t1", Identities: (&stack{}).tenantsForTest()[0].Identities, Roles: RoleAdmin}})
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	_, err := s.client.CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: "k", ClientId: "c", Audience: "https://as.example/t"})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("admin-only tenant: %v, want PermissionDenied", err)
	}
}
