package pop

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"
)

// PROTOCOLS.md req_cnf vectors, byte for byte.
func TestReqCnfKidVectors(t *testing.T) {
	for _, tc := range []struct{ ksl, want string }{
		{"", "eyJraWQiOiJOemJMc1hoOHVEQ2NkLTZNTndYRjRXXzdub1dYRlpBZkhreFpzUkdDOVhzIn0"},
		{KSLSoftware, "eyJraWQiOiJOemJMc1hoOHVEQ2NkLTZNTndYRjRXXzdub1dYRlpBZkhreFpzUkdDOVhzIiwieG1zX2tzbCI6InN3In0"},
	} {
		if got := ReqCnfKid(rfc7638TP, tc.ksl); got != tc.want {
			t.Errorf("ReqCnfKid(ksl %q): got %s, want %s", tc.ksl, got, tc.want)
		}
	}
	if got, want := string(mustB64(t, ReqCnfKid(rfc7638TP, KSLHardware))), `{"kid":"`+rfc7638TP+`","xms_ksl":"uhw"}`; got != want {
		t.Errorf("ReqCnfKid(uhw) decodes to %s, want %s", got, want)
	}
}

func TestReqCnfJWK(t *testing.T) {
	for _, tc := range []struct {
		name string
		jwk  JWK
		want string
	}{
		{"RSA", JWK{Kty: "RSA", N: rfc7638N, E: rfc7638E, Alg: "RS256", Kid: rfc7638TP, Use: "sig"},
			`{"kty":"RSA","n":"` + rfc7638N + `","e":"AQAB","alg":"RS256","kid":"` + rfc7638TP + `"}`},
		{"EC", JWK{Kty: "EC", Crv: "P-256", X: rfc9449X, Y: rfc9449Y, Alg: "ES256", Kid: rfc9449TP},
			`{"kty":"EC","crv":"P-256","x":"` + rfc9449X + `","y":"` + rfc9449Y + `","alg":"ES256","kid":"` + rfc9449TP + `"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ReqCnfJWK(tc.jwk)
			if err != nil {
				t.Fatalf("ReqCnfJWK: %v", err)
			}
			if strings.ContainsAny(got, "=+/") {
				t.Errorf("req_cnf %q is not base64url without padding", got)
			}
			if want := base64.RawURLEncoding.EncodeToString([]byte(tc.want)); got != want {
				t.Errorf("req_cnf: got %s (%s), want %s", got, mustB64(t, got), tc.want)
			}
		})
	}
	good := JWK{Kty: "RSA", N: rfc7638N, E: rfc7638E, Alg: "RS256", Kid: "k"}
	for _, tc := range []struct {
		name string
		mod  func(*JWK)
		want error
	}{
		{"no kid", func(j *JWK) { j.Kid = "" }, ErrInvalidKey},
		{"no alg", func(j *JWK) { j.Alg = "" }, ErrUnsupportedAlg},
		{"alg none", func(j *JWK) { j.Alg = "none" }, ErrUnsupportedAlg},
		{"ES256 on RSA", func(j *JWK) { j.Alg = "ES256" }, ErrUnsupportedKey},
		{"bad key", func(j *JWK) { j.N = "AA" }, ErrInvalidKey},
	} {
		j := good
		tc.mod(&j)
		if got, err := ReqCnfJWK(j); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %q, %v; want %v", tc.name, got, err, tc.want)
		}
	}
}

func TestX5TS256(t *testing.T) {
	// SHA-256("abc"), base64url, computed with coreutils.
	if got, want := X5TS256([]byte("abc")), "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"; got != want {
		t.Errorf("X5TS256(abc): got %s, want %s", got, want)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "client"}, NotBefore: time.Unix(0, 0), NotAfter: time.Unix(1e9, 0)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &fixtures().p256.PublicKey, fixtures().p256)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(der)
	if got := X5TS256(der); got != base64.RawURLEncoding.EncodeToString(sum[:]) || len(got) != 43 {
		t.Errorf("X5TS256(cert): got %s", got)
	}
}
