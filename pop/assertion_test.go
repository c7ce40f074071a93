package pop

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func assertionSigner(t *testing.T) Signer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewSoftwareSigner(key, AlgES256)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestNewClientAssertion(t *testing.T) {
	s := assertionSigner(t)
	now := time.Unix(1_700_000_000, 0)
	x5t := X5TS256([]byte("certificate"))
	a, jti, err := NewClientAssertion(context.Background(), s, ClientAssertionParams{
		ClientID: "client-1", Audience: "https://as.example.com/token", Now: now, NotBefore: true, X5TS256: x5t,
	})
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := s.JWK().PublicKey()
	hdr, payload, err := VerifyJWS(a, pub)
	if err != nil {
		t.Fatal(err)
	}
	var h struct {
		Alg, Typ, Kid string
		X5T           string `json:"x5t#S256"`
	}
	raw, _ := json.Marshal(hdr)
	json.Unmarshal(raw, &h)
	if h.Alg != "ES256" || h.Typ != "JWT" || h.X5T != x5t {
		t.Errorf("header %s", raw)
	}
	var c map[string]any
	json.Unmarshal(payload, &c)
	want := map[string]any{"iss": "client-1", "sub": "client-1", "aud": "https://as.example.com/token", "jti": jti,
		"iat": float64(now.Unix()), "nbf": float64(now.Unix()), "exp": float64(now.Unix() + 300)}
	if len(c) != len(want) {
		t.Errorf("claims %v, want %v", c, want)
	}
	for k, v := range want {
		if c[k] != v {
			t.Errorf("claim %s: got %v, want %v", k, c[k], v)
		}
	}
	if b, err := decodeB64(jti); err != nil || len(b) != jtiBytes {
		t.Errorf("jti %q is not %d random bytes", jti, jtiBytes)
	}
}

func TestNewClientAssertionRefuses(t *testing.T) {
	s := assertionSigner(t)
	now := time.Now()
	ok := ClientAssertionParams{ClientID: "c", Audience: "https://as.example/token", Now: now}
	for _, tc := range []struct {
		name  string
		edit  func(*ClientAssertionParams)
		claim string
	}{
		{"empty client id", func(p *ClientAssertionParams) { p.ClientID = "" }, "iss"},
		{"control character", func(p *ClientAssertionParams) { p.ClientID = "a\nb" }, "iss"},
		{"long client id", func(p *ClientAssertionParams) { p.ClientID = strings.Repeat("a", 257) }, "iss"},
		{"empty audience", func(p *ClientAssertionParams) { p.Audience = "" }, "aud"},
		{"relative audience", func(p *ClientAssertionParams) { p.Audience = "/token" }, "aud"},
		{"http audience", func(p *ClientAssertionParams) { p.Audience = "http://as.example/token" }, "aud"},
		{"ftp audience", func(p *ClientAssertionParams) { p.Audience = "ftp://as.example/token" }, "aud"},
		{"userinfo", func(p *ClientAssertionParams) { p.Audience = "https://u:p@as.example/token" }, "aud"},
		{"fragment", func(p *ClientAssertionParams) { p.Audience = "https://as.example/token#x" }, "aud"},
		{"no host", func(p *ClientAssertionParams) { p.Audience = "https:///token" }, "aud"},
		{"negative lifetime", func(p *ClientAssertionParams) { p.Lifetime = -time.Second }, "exp"},
		{"long lifetime", func(p *ClientAssertionParams) { p.Lifetime = time.Hour + time.Second }, "exp"},
		{"sub-second lifetime", func(p *ClientAssertionParams) { p.Lifetime = time.Millisecond }, "exp"},
		{"zero now", func(p *ClientAssertionParams) { p.Now = time.Time{} }, "iat"},
	} {
		p := ok
		tc.edit(&p)
		_, _, err := NewClientAssertion(context.Background(), s, p)
		var ce *ClaimError
		if !errors.As(err, &ce) || ce.Claim != tc.claim {
			t.Errorf("%s: %v, want a ClaimError for %s", tc.name, err, tc.claim)
		}
	}
	p := ok
	p.X5TS256 = "not a hash"
	var he *HeaderError
	if _, _, err := NewClientAssertion(context.Background(), s, p); !errors.As(err, &he) || he.Member != "x5t#S256" {
		t.Errorf("bad x5t#S256: %v", err)
	}
	// Loopback hosts may use http (tests, a local AS); the edges are valid.
	for _, aud := range []string{"http://127.0.0.1:8080/token", "http://localhost/token", "http://[::1]:9/t", "https://as.example"} {
		p := ok
		p.Audience, p.Lifetime = aud, time.Hour
		if _, _, err := NewClientAssertion(context.Background(), s, p); err != nil {
			t.Errorf("audience %s, lifetime 1h: %v", aud, err)
		}
	}
}
