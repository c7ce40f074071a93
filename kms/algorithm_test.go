package kms

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"math/big"
	"strings"
	"testing"
)

func TestAlgorithmString(t *testing.T) {
	for a, want := range map[Algorithm]string{
		ES256:         "ES256",
		ES384:         "ES384",
		RS256:         "RS256",
		PS256:         "PS256",
		AlgUnknown:    "Algorithm(0)",
		Algorithm(5):  "Algorithm(5)",
		Algorithm(-3): "Algorithm(-3)",
	} {
		if got := a.String(); got != want {
			t.Errorf("Algorithm(%d).String() = %q, want %q", int(a), got, want)
		}
	}
}

func TestAlgorithmProperties(t *testing.T) {
	for _, tc := range []struct {
		alg        Algorithm
		valid, rsa bool
		ec         bool
		hash       crypto.Hash
		curve      elliptic.Curve
	}{
		{ES256, true, false, true, crypto.SHA256, elliptic.P256()},
		{ES384, true, false, true, crypto.SHA384, elliptic.P384()},
		{RS256, true, true, false, crypto.SHA256, nil},
		{PS256, true, true, false, crypto.SHA256, nil},
		{AlgUnknown, false, false, false, crypto.SHA256, nil},
		{Algorithm(5), false, false, false, crypto.SHA256, nil},
		{Algorithm(-1), false, false, false, crypto.SHA256, nil},
	} {
		if got := tc.alg.Valid(); got != tc.valid {
			t.Errorf("%v.Valid() = %v, want %v", tc.alg, got, tc.valid)
		}
		if got := tc.alg.IsRSA(); got != tc.rsa {
			t.Errorf("%v.IsRSA() = %v, want %v", tc.alg, got, tc.rsa)
		}
		if got := tc.alg.IsEC(); got != tc.ec {
			t.Errorf("%v.IsEC() = %v, want %v", tc.alg, got, tc.ec)
		}
		if tc.valid {
			if got := tc.alg.Hash(); got != tc.hash {
				t.Errorf("%v.Hash() = %v, want %v", tc.alg, got, tc.hash)
			}
		}
		if got := tc.alg.Curve(); got != tc.curve {
			t.Errorf("%v.Curve() = %v, want %v", tc.alg, got, tc.curve)
		}
	}
	want := []Algorithm{ES256, ES384, RS256, PS256}
	got := Algorithms()
	if len(got) != len(want) {
		t.Fatalf("Algorithms() = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("Algorithms()[%d] = %v, want %v", i, got[i], want[i])
		}
	}
}

func TestMatchesPublicKey(t *testing.T) {
	ecKey := func(c elliptic.Curve) *ecdsa.PublicKey {
		// Only the curve is inspected; no point is needed.
		return &ecdsa.PublicKey{Curve: c}
	}
	rsaKey := func(bits int) *rsa.PublicKey {
		n := new(big.Int).Lsh(big.NewInt(1), uint(bits-1))
		return &rsa.PublicKey{N: n.Add(n, big.NewInt(1)), E: 65537}
	}
	for _, tc := range []struct {
		name string
		alg  Algorithm
		pub  crypto.PublicKey
		bits int
		want bool
	}{
		{"ES256 P-256", ES256, ecKey(elliptic.P256()), 0, true},
		{"ES256 P-384", ES256, ecKey(elliptic.P384()), 0, false},
		{"ES384 P-384", ES384, ecKey(elliptic.P384()), 0, true},
		{"ES384 P-256", ES384, ecKey(elliptic.P256()), 0, false},
		{"RS256 EC", RS256, ecKey(elliptic.P256()), 0, false},
		{"RS256 2048", RS256, rsaKey(2048), 2048, true},
		{"PS256 3072", PS256, rsaKey(3072), 3072, true},
		{"RS256 size mismatch", RS256, rsaKey(2048), 3072, false},
		{"ES256 RSA", ES256, rsaKey(2048), 2048, false},
		{"ed25519", ES256, ed25519.PublicKey(make([]byte, 32)), 0, false},
		{"nil", RS256, nil, 2048, false},
	} {
		if got := tc.alg.MatchesPublicKey(tc.pub, tc.bits); got != tc.want {
			t.Errorf("%s: MatchesPublicKey = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestParseAlgorithm(t *testing.T) {
	for in, want := range map[string]Algorithm{
		"ES256": ES256, "es256": ES256, "Es256": ES256,
		"ES384": ES384, "es384": ES384,
		"RS256": RS256, "rs256": RS256, "rS256": RS256,
		"PS256": PS256, "ps256": PS256,
	} {
		got, err := ParseAlgorithm(in)
		if err != nil || got != want {
			t.Errorf("ParseAlgorithm(%q) = %v, %v; want %v, nil", in, got, err, want)
		}
	}
	for _, in := range []string{"", "unknown", "Algorithm(0)", "ES512", "HS256", "EdDSA", " ES256", "ES256 ", "ES256\x00", "RS384", "eſ256", "Pſ256", "ＥＳ256"} {
		got, err := ParseAlgorithm(in)
		if got != AlgUnknown {
			t.Errorf("ParseAlgorithm(%q) = %v, want AlgUnknown", in, got)
		}
		fe := wantFieldError(t, err, "algorithm")
		if fe != nil && !strings.Contains(fe.Reason, "want ES256, ES384, RS256 or PS256") {
			t.Errorf("ParseAlgorithm(%q) reason %q does not list the algorithms", in, fe.Reason)
		}
	}
}

func TestAlgorithmText(t *testing.T) {
	for _, a := range Algorithms() {
		b, err := a.MarshalText()
		if err != nil {
			t.Fatalf("%v.MarshalText: %v", a, err)
		}
		if string(b) != a.String() {
			t.Errorf("%v.MarshalText() = %q, want %q", a, b, a.String())
		}
		var back Algorithm
		if err := back.UnmarshalText(b); err != nil || back != a {
			t.Errorf("UnmarshalText(%q) = %v, %v; want %v", b, back, err, a)
		}
		// Through JSON, as the store writes it.
		j, err := json.Marshal(struct{ A Algorithm }{a})
		if err != nil {
			t.Fatal(err)
		}
		if want := `{"A":"` + a.String() + `"}`; string(j) != want {
			t.Errorf("json.Marshal = %s, want %s", j, want)
		}
		var s struct{ A Algorithm }
		if err := json.Unmarshal(j, &s); err != nil || s.A != a {
			t.Errorf("json.Unmarshal(%s) = %v, %v; want %v", j, s.A, err, a)
		}
	}
	for _, a := range []Algorithm{AlgUnknown, Algorithm(5), Algorithm(-1)} {
		if b, err := a.MarshalText(); err == nil {
			t.Errorf("Algorithm(%d).MarshalText() = %q, nil; want an error", int(a), b)
		}
		if _, err := json.Marshal(struct{ A Algorithm }{a}); err == nil {
			t.Errorf("json.Marshal of Algorithm(%d) succeeded, want an error", int(a))
		}
	}
	for _, in := range []string{"", "unknown", "ES512", "1"} {
		a := PS256
		if err := a.UnmarshalText([]byte(in)); err == nil {
			t.Errorf("UnmarshalText(%q) = nil, want an error", in)
		}
		if a != PS256 {
			t.Errorf("failed UnmarshalText(%q) changed the value to %v", in, a)
		}
	}
	var s struct{ A Algorithm }
	if err := json.Unmarshal([]byte(`{"A":"HS256"}`), &s); err == nil {
		t.Errorf("json.Unmarshal of HS256 succeeded: %v", s.A)
	}
	if err := json.Unmarshal([]byte(`{"A":1}`), &s); err == nil {
		t.Errorf("json.Unmarshal of a number succeeded: %v", s.A)
	}
}
