package kms

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"fmt"
	"strings"
)

// Algorithm is a JOSE signature algorithm (RFC 7518 §3.1). It fixes the key
// type, the default hash and, for RSA, the default padding.
type Algorithm int

// The supported algorithms. The zero value is invalid.
const (
	AlgUnknown Algorithm = iota
	ES256
	ES384
	RS256
	PS256
)

var algNames = [...]string{AlgUnknown: "unknown", ES256: "ES256", ES384: "ES384", RS256: "RS256", PS256: "PS256"}

// Algorithms lists every supported algorithm.
func Algorithms() []Algorithm { return []Algorithm{ES256, ES384, RS256, PS256} }

func (a Algorithm) String() string {
	if a.Valid() {
		return algNames[a]
	}
	return fmt.Sprintf("Algorithm(%d)", int(a))
}

// ParseAlgorithm parses a JOSE name such as "ES256" (case-insensitive).
func ParseAlgorithm(s string) (Algorithm, error) {
	// ASCII only: strings.EqualFold would accept look-alikes such as "eſ256".
	upper := strings.ToUpper(s)
	for _, a := range Algorithms() {
		if upper == a.String() && len(upper) == len(s) {
			return a, nil
		}
	}
	return AlgUnknown, &FieldError{Field: "algorithm", Reason: fmt.Sprintf("got %q, want ES256, ES384, RS256 or PS256", s)}
}

// Valid reports whether a is a supported algorithm.
func (a Algorithm) Valid() bool { return a > AlgUnknown && int(a) < len(algNames) }

// IsRSA reports whether a uses an RSA key.
func (a Algorithm) IsRSA() bool { return a == RS256 || a == PS256 }

// IsEC reports whether a uses an EC key.
func (a Algorithm) IsEC() bool { return a == ES256 || a == ES384 }

// Hash is the hash the algorithm signs with (RFC 7518 §3.1).
func (a Algorithm) Hash() crypto.Hash {
	if a == ES384 {
		return crypto.SHA384
	}
	return crypto.SHA256
}

// Curve is the EC curve of an ES* algorithm, nil otherwise.
func (a Algorithm) Curve() elliptic.Curve {
	switch a {
	case ES256:
		return elliptic.P256()
	case ES384:
		return elliptic.P384()
	}
	return nil
}

// MatchesPublicKey reports whether pub is a key that a (with bits for RSA)
// describes.
func (a Algorithm) MatchesPublicKey(pub crypto.PublicKey, bits int) bool {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return a.IsEC() && k.Curve == a.Curve()
	case *rsa.PublicKey:
		return a.IsRSA() && k.N.BitLen() == bits
	}
	return false
}

// MarshalText encodes the JOSE name, so stored records stay readable.
func (a Algorithm) MarshalText() ([]byte, error) {
	if !a.Valid() {
		return nil, fmt.Errorf("invalid algorithm %d", int(a))
	}
	return []byte(a.String()), nil
}

// UnmarshalText parses the JOSE name.
func (a *Algorithm) UnmarshalText(b []byte) error {
	v, err := ParseAlgorithm(string(b))
	if err != nil {
		return err
	}
	*a = v
	return nil
}
