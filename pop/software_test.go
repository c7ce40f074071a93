package pop

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"testing"
	"time"
)

func TestSoftwareSigner(t *testing.T) {
	ctx := context.Background()
	f := fixtures()
	for _, tc := range []struct {
		alg string
		key crypto.Signer
	}{
		{"ES256", f.p256}, {"ES384", f.p384},
		{"RS256", f.rsa2048}, {"RS384", f.rsa2048}, {"RS512", f.rsa2048},
		{"PS256", f.rsa2048}, {"PS384", f.rsa2048}, {"PS512", f.rsa2048},
	} {
		t.Run(tc.alg, func(t *testing.T) {
			s, err := NewSoftwareSigner(tc.key, tc.alg)
			if err != nil {
				t.Fatalf("NewSoftwareSigner: %v", err)
			}
			tp, err := Thumbprint(tc.key.Public())
			if err != nil {
				t.Fatal(err)
			}
			if j := s.JWK(); s.Alg() != tc.alg || j.Alg != tc.alg || j.Kid != tp {
				t.Errorf("Alg %q, JWK %+v; want alg %s, kid %s", s.Alg(), j, tc.alg, tp)
			}
			// Enough ECDSA signatures that some r or s has a leading zero
			// byte (about 1 in 128 each), which must still be padded.
			n := 1
			if tc.alg[0] == 'E' {
				n = 300
			}
			for i := 0; i < n; i++ {
				jws, err := SignJWS(ctx, s, []byte("payload"), JWSOptions{})
				if err != nil {
					t.Fatalf("SignJWS: %v", err)
				}
				if !refVerify(t, jws, tc.key.Public()) {
					t.Fatalf("independent verifier rejects %s", jws)
				}
			}
		})
	}
}

// The software signer works with the DPoP and SHR builders end to end.
func TestSoftwareSignerProofs(t *testing.T) {
	ctx := context.Background()
	now := time.Unix(1_700_000_000, 0)
	s, err := NewSoftwareSigner(fixtures().p256, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	proof, err := NewDPoPProof(ctx, s, DPoPParams{Method: "POST", URL: "https://as.example/token", Now: now})
	if err != nil {
		t.Fatal(err)
	}
	c, err := VerifyDPoPProof(proof, DPoPCheck{Method: "POST", URL: "https://as.example/token", Now: now})
	if err != nil || c.Thumbprint != s.JWK().Kid {
		t.Errorf("DPoP: got %+v, %v; want thumbprint %s", c, err, s.JWK().Kid)
	}
	shr, err := NewSignedHTTPRequest(ctx, s, SHRParams{AccessToken: "t", Method: "GET", URL: "https://rs.example/", Now: now})
	if err != nil {
		t.Fatal(err)
	}
	sc, err := VerifySignedHTTPRequest(shr, SHRCheck{AccessToken: "t", Method: "GET", URL: "https://rs.example/", Now: now})
	if err != nil || sc.Thumbprint != s.JWK().Kid {
		t.Errorf("SHR: got %+v, %v; want thumbprint %s", sc, err, s.JWK().Kid)
	}
}

func TestSoftwareSignerRejects(t *testing.T) {
	f := fixtures()
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		key  crypto.Signer
		alg  string
		want error
	}{
		{"none", f.p256, "none", ErrUnsupportedAlg},
		{"HS256", f.p256, "HS256", ErrUnsupportedAlg},
		{"lower-case es256", f.p256, "es256", ErrUnsupportedAlg},
		{"ES384 with P-256", f.p256, "ES384", ErrUnsupportedKey},
		{"ES256 with P-384", f.p384, "ES256", ErrUnsupportedKey},
		{"ES256 with RSA", f.rsa2048, "ES256", ErrUnsupportedKey},
		{"RS256 with EC", f.p256, "RS256", ErrUnsupportedKey},
		{"RS256 with RSA 1024", f.rsa1024, "RS256", ErrUnsupportedKey},
		{"ES512 with P-521", f.p521, "ES512", ErrUnsupportedKey},
		{"Ed25519", edKey, "ES256", ErrUnsupportedKey},
	} {
		if s, err := NewSoftwareSigner(tc.key, tc.alg); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, %v; want %v", tc.name, s, err, tc.want)
		}
	}
	if _, err := NewSoftwareSigner(nil, "ES256"); err == nil {
		t.Error("nil key: got no error")
	}

	s, err := NewSoftwareSigner(f.p256, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if sig, err := s.Sign(ctx, []byte("x")); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled Sign: got %x, %v; want context.Canceled", sig, err)
	}
}
