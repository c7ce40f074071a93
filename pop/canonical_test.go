package pop

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// nonCanonicalB64 are values that base64.RawURLEncoding.Strict() decodes
// without error (it skips CR and LF) or that are otherwise not the one
// canonical base64url spelling of anything non-empty. "\n" and "\r\n"
// decode to zero bytes, which used to make decodeUint index out of range.
var nonCanonicalB64 = []string{
	"", "\n", "\r\n", "\r", "\n\n\n\n", "=", "==", "A", "AA==", "AAA=",
	"AAA\n", "\nAQAB", "AQAB\n", "AQ\r\nAB", "AQAB=", " AQAB", "AQAB ", "AQ\tAB",
	"AQ+B", "AQ/B", "AR", "\x00", "AQ\x00B", "\u00e9",
}

// mutations returns non-canonical spellings derived from a valid value v.
func mutations(v string) []string {
	if v == "" {
		return nil
	}
	mid := len(v) / 2
	return []string{
		v + "\n", "\n" + v, v[:mid] + "\n" + v[mid:], v[:mid] + "\r\n" + v[mid:],
		v + "=", v + "==", v[:mid] + " " + v[mid:], flipTrailingBits(v),
	}
}

// TestJWKMembersNeverPanic: every JWK member, set to every non-canonical
// value, is rejected with an error — never a panic, never accepted — by
// PublicKey, Thumbprint and the verifiers that read a JWK from a header
// (DPoP "jwk") or claim (SHR "cnf.jwk").
func TestJWKMembersNeverPanic(t *testing.T) {
	f := fixtures()
	now := time.Unix(1_700_000_000, 0)
	for _, kc := range []struct {
		name string
		pub  any
		own  []string // members the key type uses
	}{
		{"RSA", &f.rsa2048.PublicKey, []string{"kty", "n", "e"}},
		{"P-256", &f.p256.PublicKey, []string{"kty", "crv", "x", "y"}},
		{"P-384", &f.p384.PublicKey, []string{"kty", "crv", "x", "y"}},
	} {
		base, err := NewJWK(kc.pub)
		if err != nil {
			t.Fatal(err)
		}
		for _, member := range []string{"kty", "crv", "x", "y", "n", "e"} {
			own := slices.Contains(kc.own, member)
			values := append([]string(nil), nonCanonicalB64...)
			values = append(values, mutations(field(&base, member))...)
			for _, v := range values {
				if v == "" && !own {
					continue // an absent member of the other key type is fine
				}
				j := base
				*fieldPtr(&j, member) = v
				label := fmt.Sprintf("%s/%s=%q", kc.name, member, v)
				mustErr(t, label+"/PublicKey", func() error { _, err := j.PublicKey(); return err })
				mustErr(t, label+"/Thumbprint", func() error { _, err := j.Thumbprint(); return err })
				jm := map[string]string{}
				for _, m := range []string{"kty", "crv", "x", "y", "n", "e"} {
					if s := field(&j, m); s != "" || m == member {
						jm[m] = s
					}
				}
				dpop := unsignedJWS(t, map[string]any{"typ": "dpop+jwt", "alg": "ES256", "jwk": jm},
					map[string]any{"jti": "j", "htm": "GET", "htu": "https://rs.example/", "iat": now.Unix()})
				mustErr(t, label+"/VerifyDPoPProof", func() error {
					_, err := VerifyDPoPProof(dpop, DPoPCheck{Method: "GET", URL: "https://rs.example/", Now: now})
					return err
				})
				shr := unsignedJWS(t, map[string]any{"typ": "pop", "alg": "ES256", "kid": "k"},
					map[string]any{"at": "t", "ts": now.Unix(), "m": "GET", "u": "rs.example", "cnf": map[string]any{"jwk": jm}})
				mustErr(t, label+"/VerifySignedHTTPRequest", func() error {
					_, err := VerifySignedHTTPRequest(shr, SHRCheck{Method: "GET", URL: "https://rs.example/", Now: now})
					return err
				})
			}
		}
	}
}

// TestDecodeB64Canonical: decodeB64 accepts exactly the strings that
// re-encode to themselves.
func TestDecodeB64Canonical(t *testing.T) {
	for _, s := range append(nonCanonicalB64, mutations("l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs")...) {
		if b, err := decodeB64(s); err == nil && b64.EncodeToString(b) != s {
			t.Errorf("decodeB64(%q) accepted a non-canonical encoding", s)
		}
	}
	for _, s := range []string{"", "AQAB", "AA", "AAA", "-_-_", "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs"} {
		b, err := decodeB64(s)
		if err != nil || b64.EncodeToString(b) != s {
			t.Errorf("decodeB64(%q) = %x, %v; want the canonical round trip", s, b, err)
		}
	}
}

// TestThumbprintNotMalleable: a DPoP proof or SHR, correctly signed, whose
// embedded JWK spells x with a newline (which encoding/base64 skips) is
// rejected, so one key cannot present two RFC 7638 thumbprints; and such a
// JWK has no thumbprint of its own.
func TestThumbprintNotMalleable(t *testing.T) {
	ctx := context.Background()
	now := time.Unix(1_700_000_000, 0)
	s := newTestSigner(t, "ES256", fixtures().p256)
	canon, err := s.jwk.Thumbprint()
	if err != nil {
		t.Fatal(err)
	}
	x := s.jwk.X[:10] + "\n" + s.jwk.X[10:]
	bad := JWK{Kty: "EC", Crv: "P-256", X: x, Y: s.jwk.Y}
	if tp, err := bad.Thumbprint(); err == nil {
		t.Errorf("JWK with a newline in x: thumbprint %s (canonical %s), want an error", tp, canon)
	}
	jm := map[string]any{"kty": "EC", "crv": "P-256", "x": x, "y": s.jwk.Y}

	proof := craftJWS(t, "ES256", s.priv, signOK, map[string]any{"typ": "dpop+jwt", "alg": "ES256", "jwk": jm},
		map[string]any{"jti": "j", "htm": "GET", "htu": "https://rs.example/", "iat": now.Unix()})
	if c, err := VerifyDPoPProof(proof, DPoPCheck{Method: "GET", URL: "https://rs.example/", Now: now}); err == nil {
		t.Errorf("DPoP proof with a newline in jwk.x verified, jkt %s (canonical %s)", c.Thumbprint, canon)
	} else if !errors.Is(err, ErrInvalidKey) {
		t.Errorf("DPoP proof with a newline in jwk.x: got %v, want ErrInvalidKey", err)
	}

	shr, err := NewSignedHTTPRequest(ctx, s, SHRParams{AccessToken: "t", Method: "GET", URL: "https://rs.example/", Now: now})
	if err != nil {
		t.Fatal(err)
	}
	p := decodeSegment(t, shr, 1)
	p["cnf"] = map[string]any{"jwk": jm}
	shr = craftJWS(t, "ES256", s.priv, signOK, decodeSegment(t, shr, 0), p)
	if _, err := VerifySignedHTTPRequest(shr, SHRCheck{Method: "GET", URL: "https://rs.example/", Now: now}); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("SHR with a newline in cnf.jwk.x: got %v, want ErrInvalidKey", err)
	}

	// A caller's precomputed ath gets the same treatment.
	ath := ATH("t")
	if _, err := NewDPoPProof(ctx, s, DPoPParams{Method: "GET", URL: "https://rs.example/", ATH: ath[:5] + "\n" + ath[5:], Now: now}); err == nil {
		t.Error("NewDPoPProof accepted an ATH with a newline")
	}
}

// TestParseJWSRejectsNonAlphabet: a character outside A-Z a-z 0-9 - _ in any
// segment of an otherwise valid compact JWS is refused, CR and LF included.
func TestParseJWSRejectsNonAlphabet(t *testing.T) {
	s := newTestSigner(t, "ES256", fixtures().p256)
	now := time.Unix(1_700_000_000, 0)
	good, err := NewDPoPProof(context.Background(), s, DPoPParams{Method: "GET", URL: "https://rs.example/", Now: now})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, _, err := ParseJWS(good); err != nil {
		t.Fatalf("ParseJWS(valid proof): %v", err)
	}
	parts := strings.Split(good, ".")
	for i := range parts {
		for _, ins := range []string{"\r\n", "\n", "\r", " ", "\t", "=", "+", "/", "\x00"} {
			p := append([]string(nil), parts...)
			p[i] = p[i][:8] + ins + p[i][8:]
			bad := strings.Join(p, ".")
			if _, _, _, _, err := ParseJWS(bad); !errors.Is(err, ErrMalformedJWS) {
				t.Errorf("segment %d with %q: ParseJWS err %v, want ErrMalformedJWS", i, ins, err)
			}
			if _, err := VerifyDPoPProof(bad, DPoPCheck{Method: "GET", URL: "https://rs.example/", Now: now}); err == nil {
				t.Errorf("segment %d with %q: VerifyDPoPProof accepted it", i, ins)
			}
		}
	}
}

// mustErr runs f, failing the test if it panics or returns nil.
func mustErr(t *testing.T, label string, f func() error) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Errorf("%s: panic: %v", label, r)
		}
	}()
	if err := f(); err == nil {
		t.Errorf("%s: accepted, want an error", label)
	}
}

// unsignedJWS encodes header and payload with a dummy signature: enough to
// reach the JWK checks, which come before signature verification.
func unsignedJWS(t *testing.T, header, payload any) string {
	t.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	p, err := json.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	return b64.EncodeToString(h) + "." + b64.EncodeToString(p) + "." + b64.EncodeToString(make([]byte, 64))
}

func field(j *JWK, name string) string { return *fieldPtr(j, name) }

func fieldPtr(j *JWK, name string) *string {
	switch name {
	case "kty":
		return &j.Kty
	case "crv":
		return &j.Crv
	case "x":
		return &j.X
	case "y":
		return &j.Y
	case "n":
		return &j.N
	case "e":
		return &j.E
	}
	panic("no JWK member " + name)
}
