// Package pop holds the wire formats of OAuth proof-of-possession: public
// JSON Web Keys (RFC 7517, RFC 7518 §6), their RFC 7638 thumbprints and RFC
// 9278 thumbprint URIs, the JOSE encoding of ECDSA signatures (RFC 7518
// §3.4), compact JWS signing and strict verification (RFC 7515), DPoP proofs
// (RFC 9449), MSAL Signed HTTP Requests and req_cnf values, and the RFC 8705
// certificate thumbprint.
//
// It is pure Go, uses only the standard library and never touches hardware.
// Signing goes through the Signer interface, which the daemon's keyring and
// the SDK implement; apart from NewSoftwareSigner, for tests and examples,
// nothing here holds a private key. So anyone may import it: the
// daemon, its SDK, and clients or resource servers that verify what
// keybroker signs.
package pop

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
)

// Errors returned by this package wrap one of these; match with errors.Is.
var (
	// ErrUnsupportedKey means the key type or curve is valid but not one this
	// package handles (only RSA, P-256 and P-384 are).
	ErrUnsupportedKey = errors.New("pop: unsupported key")
	// ErrInvalidKey means a key or JWK is malformed: bad encoding, a point
	// not on its curve, a missing or extra member.
	ErrInvalidKey = errors.New("pop: invalid key")
	// ErrInvalidSignature means a signature is not well-formed: an ECDSA
	// signature that is not a valid DER or JOSE encoding for the curve (a DER
	// signature in a JWS, say), or an RSA signature not as long as the
	// modulus.
	ErrInvalidSignature = errors.New("pop: invalid signature encoding")
)

// Key type ("kty") and curve ("crv") names, RFC 7518 §6.1 and §6.2.1.1.
const (
	ktyRSA  = "RSA"
	ktyEC   = "EC"
	crvP256 = "P-256"
	crvP384 = "P-384"
)

// maxRSABits bounds the modulus accepted from a JWK, so an untrusted JWK
// cannot make us do arithmetic on an arbitrarily large number. 16384 bits is
// the largest size in common use.
const maxRSABits = 16384

// thumbprintURIPrefix is the RFC 9278 §3 URI prefix for SHA-256 thumbprints.
const thumbprintURIPrefix = "urn:ietf:params:oauth:jwk-thumbprint:sha-256:"

// b64 is base64url without padding (RFC 7515 §2). Strict rejects encodings
// with non-zero trailing bits, but encoding/base64 still skips CR and LF
// while decoding, so b64.DecodeString alone accepts many spellings of one
// value. Decode anything received with decodeB64, which accepts only the
// canonical one.
var b64 = base64.RawURLEncoding.Strict()

// decodeB64 decodes s, base64url without padding, accepting only the
// canonical encoding: every character in the base64url alphabet (A-Z a-z
// 0-9 - _; no padding, CR, LF or other whitespace) and no non-zero trailing
// bits, so that encoding the result gives back exactly s.
func decodeB64(s string) ([]byte, error) {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return nil, fmt.Errorf("character %q at offset %d is not in the base64url alphabet", c, i)
		}
	}
	b, err := b64.DecodeString(s)
	if err != nil {
		return nil, err
	}
	if b64.EncodeToString(b) != s { // cannot happen after the checks above; kept as the definition
		return nil, errors.New("not the canonical base64url encoding")
	}
	return b, nil
}

// JWK is a public JSON Web Key (RFC 7517 §4, RFC 7518 §6) for an RSA or EC
// key. It has no members for private key material, so a JWK can never carry
// a private key; unmarshalling JSON that contains "d", "p" and so on simply
// drops them.
//
// Build one with NewJWK; check one received from elsewhere with PublicKey.
type JWK struct {
	Kty string `json:"kty"`
	Use string `json:"use,omitempty"`
	Alg string `json:"alg,omitempty"`
	Kid string `json:"kid,omitempty"`
	Crv string `json:"crv,omitempty"`
	X   string `json:"x,omitempty"`
	Y   string `json:"y,omitempty"`
	N   string `json:"n,omitempty"`
	E   string `json:"e,omitempty"`
}

// PublishedJWK is a JWK as a published JWK Set carries it: with the key's
// certificate chain when it has one (RFC 7517 §4.7 x5c, standard base64
// DER, leaf first; §4.9 x5t#S256), so that a relying party can match a
// client certificate to it (RFC 8705 self_signed_tls_client_auth). JWK
// stays the bare key, as thumbprints, DPoP headers and req_cnf use it.
type PublishedJWK struct {
	JWK
	X5c     []string `json:"x5c,omitempty"`
	X5tS256 string   `json:"x5t#S256,omitempty"`
}

// WithChain is j published with a certificate chain (DER, leaf first); an
// empty chain adds nothing.
func (j JWK) WithChain(chain [][]byte) PublishedJWK {
	p := PublishedJWK{JWK: j}
	if len(chain) == 0 {
		return p
	}
	p.X5c = make([]string, len(chain))
	for i, c := range chain {
		p.X5c[i] = base64.StdEncoding.EncodeToString(c)
	}
	p.X5tS256 = X5TS256(chain[0])
	return p
}

// PublishedJWKS is the JWK Set a relying party fetches: JWKS with the
// keys' certificate chains.
type PublishedJWKS struct {
	Keys []PublishedJWK `json:"keys"`
}

// MarshalJSON writes a nil Keys as an empty array, as JWKS does.
func (s PublishedJWKS) MarshalJSON() ([]byte, error) {
	type plain PublishedJWKS
	if s.Keys == nil {
		s.Keys = []PublishedJWK{}
	}
	return json.Marshal(plain(s))
}

// JWKS is a JWK Set (RFC 7517 §5).
type JWKS struct {
	Keys []JWK `json:"keys"`
}

// MarshalJSON encodes the set, writing a nil Keys as an empty array: RFC 7517
// §5.1 requires "keys" to be an array, never null.
func (s JWKS) MarshalJSON() ([]byte, error) {
	type plain JWKS // drops the method, so json.Marshal does not recurse
	if s.Keys == nil {
		s.Keys = []JWK{}
	}
	return json.Marshal(plain(s))
}

// NewJWK returns the public JWK of pub, which must be an *rsa.PublicKey or an
// *ecdsa.PublicKey on P-256 or P-384. Only kty and the key members are set;
// the caller fills in Use, Alg and Kid as needed.
//
// RSA n and e are minimal big-endian octet strings (RFC 7518 §6.3.1); EC x
// and y are the full coordinate length, 32 or 48 bytes, leading zeros kept
// (RFC 7518 §6.2.1.2).
func NewJWK(pub crypto.PublicKey) (JWK, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if k == nil {
			return JWK{}, fmt.Errorf("%w: nil *rsa.PublicKey", ErrInvalidKey)
		}
		if err := checkRSA(k.N, k.E); err != nil {
			return JWK{}, err
		}
		return JWK{
			Kty: ktyRSA,
			N:   b64.EncodeToString(k.N.Bytes()),
			E:   b64.EncodeToString(big.NewInt(int64(k.E)).Bytes()),
		}, nil
	case *ecdsa.PublicKey:
		if k == nil {
			return JWK{}, fmt.Errorf("%w: nil *ecdsa.PublicKey", ErrInvalidKey)
		}
		crv, size, err := curveName(k.Curve)
		if err != nil {
			return JWK{}, err
		}
		// Bytes checks the point is on the curve and returns the SEC 1
		// §2.3.3 uncompressed form 04 || X || Y, coordinates full length.
		pt, err := k.Bytes()
		if err != nil {
			return JWK{}, fmt.Errorf("%w: %v", ErrInvalidKey, err)
		}
		if len(pt) != 1+2*size {
			return JWK{}, fmt.Errorf("%w: %s point length: got %d, want %d", ErrInvalidKey, crv, len(pt), 1+2*size)
		}
		return JWK{
			Kty: ktyEC,
			Crv: crv,
			X:   b64.EncodeToString(pt[1 : 1+size]),
			Y:   b64.EncodeToString(pt[1+size:]),
		}, nil
	default:
		return JWK{}, fmt.Errorf("%w: key type %T, want *rsa.PublicKey or *ecdsa.PublicKey", ErrUnsupportedKey, pub)
	}
}

// PublicKey parses and validates j, returning an *rsa.PublicKey or an
// *ecdsa.PublicKey. It rejects unknown key types and curves, members of the
// other key type, base64url that is padded or not canonical, EC coordinates
// that are not exactly the curve's length or not a point on the curve, and
// RSA n or e with a leading zero octet, an even or too small e, or a modulus
// over 16384 bits. Use, Alg and Kid are not checked.
func (j JWK) PublicKey() (crypto.PublicKey, error) {
	switch j.Kty {
	case ktyRSA:
		if j.Crv != "" || j.X != "" || j.Y != "" {
			return nil, fmt.Errorf("%w: RSA JWK has EC members crv, x or y", ErrInvalidKey)
		}
		n, err := decodeUint("n", j.N)
		if err != nil {
			return nil, err
		}
		e, err := decodeUint("e", j.E)
		if err != nil {
			return nil, err
		}
		// rsa.PublicKey.E is an int; crypto/rsa accepts at most 2^31-1.
		if len(e) > 4 {
			return nil, fmt.Errorf("%w: RSA e length: got %d bytes, want at most 4", ErrInvalidKey, len(e))
		}
		ev := int(new(big.Int).SetBytes(e).Int64())
		nv := new(big.Int).SetBytes(n)
		if err := checkRSA(nv, ev); err != nil {
			return nil, err
		}
		return &rsa.PublicKey{N: nv, E: ev}, nil
	case ktyEC:
		if j.N != "" || j.E != "" {
			return nil, fmt.Errorf("%w: EC JWK has RSA members n or e", ErrInvalidKey)
		}
		var curve elliptic.Curve
		switch j.Crv {
		case crvP256:
			curve = elliptic.P256()
		case crvP384:
			curve = elliptic.P384()
		case "":
			return nil, fmt.Errorf("%w: EC JWK has no crv", ErrInvalidKey)
		default:
			return nil, fmt.Errorf("%w: curve %q, want %q or %q", ErrUnsupportedKey, j.Crv, crvP256, crvP384)
		}
		size := (curve.Params().BitSize + 7) / 8
		x, err := decodeCoord("x", j.X, size)
		if err != nil {
			return nil, err
		}
		y, err := decodeCoord("y", j.Y, size)
		if err != nil {
			return nil, err
		}
		pt := make([]byte, 0, 1+2*size)
		pt = append(pt, 4) // SEC 1 §2.3.3 uncompressed point
		pt = append(pt, x...)
		pt = append(pt, y...)
		k, err := ecdsa.ParseUncompressedPublicKey(curve, pt)
		if err != nil {
			return nil, fmt.Errorf("%w: %s point: %v", ErrInvalidKey, j.Crv, err)
		}
		return k, nil
	case "":
		return nil, fmt.Errorf("%w: JWK has no kty", ErrInvalidKey)
	default:
		return nil, fmt.Errorf("%w: kty %q, want %q or %q", ErrUnsupportedKey, j.Kty, ktyRSA, ktyEC)
	}
}

// Thumbprint returns the RFC 7638 SHA-256 thumbprint of pub, base64url
// without padding. pub is anything NewJWK accepts.
func Thumbprint(pub crypto.PublicKey) (string, error) {
	j, err := NewJWK(pub)
	if err != nil {
		return "", err
	}
	return j.thumbprint(), nil
}

// Thumbprint returns the RFC 7638 SHA-256 thumbprint of j, base64url without
// padding. It validates j first (see PublicKey), so a JWK that does not hold
// a usable key has no thumbprint. Use, Alg and Kid do not affect the result.
func (j JWK) Thumbprint() (string, error) {
	// PublicKey accepts kty and crv only as exact names and n, e, x and y
	// only in their one canonical base64url encoding (decodeB64, decodeUint,
	// decodeCoord), so the members hashed here are exactly the ones NewJWK
	// would produce and the result equals Thumbprint(j.PublicKey()).
	if _, err := j.PublicKey(); err != nil {
		return "", err
	}
	return j.thumbprint(), nil
}

// thumbprint hashes the RFC 7638 §3.2 canonical JSON of a validated j: only
// the required members, in lexicographic order, no whitespace. Base64url
// values need no JSON escaping.
func (j JWK) thumbprint() string {
	var canon string
	switch j.Kty {
	case ktyRSA:
		canon = `{"e":"` + j.E + `","kty":"RSA","n":"` + j.N + `"}`
	case ktyEC:
		canon = `{"crv":"` + j.Crv + `","kty":"EC","x":"` + j.X + `","y":"` + j.Y + `"}`
	}
	sum := sha256.Sum256([]byte(canon))
	return b64.EncodeToString(sum[:])
}

// ThumbprintURI returns the RFC 9278 URI for a SHA-256 thumbprint tp, as
// returned by Thumbprint: "urn:ietf:params:oauth:jwk-thumbprint:sha-256:" + tp.
func ThumbprintURI(tp string) string {
	return thumbprintURIPrefix + tp
}

// checkRSA applies the checks crypto/rsa makes of a public key: n positive,
// e odd and in [3, 2^31-1]; and bounds n at maxRSABits.
func checkRSA(n *big.Int, e int) error {
	if n == nil || n.Sign() <= 0 {
		return fmt.Errorf("%w: RSA modulus n is missing or not positive", ErrInvalidKey)
	}
	if bits := n.BitLen(); bits > maxRSABits {
		return fmt.Errorf("%w: RSA modulus size: got %d bits, want at most %d", ErrInvalidKey, bits, maxRSABits)
	}
	if e < 3 || e > 1<<31-1 || e%2 == 0 {
		return fmt.Errorf("%w: RSA exponent e: got %d, want an odd number in [3, 2^31-1]", ErrInvalidKey, e)
	}
	return nil
}

// curveName maps a supported curve to its JWK crv name and coordinate size.
func curveName(c elliptic.Curve) (string, int, error) {
	switch c {
	case elliptic.P256():
		return crvP256, 32, nil
	case elliptic.P384():
		return crvP384, 48, nil
	case nil:
		return "", 0, fmt.Errorf("%w: ECDSA key has no curve", ErrInvalidKey)
	default:
		return "", 0, fmt.Errorf("%w: curve %s, want %s or %s", ErrUnsupportedKey, curveLabel(c), crvP256, crvP384)
	}
}

// decodeUint decodes a JWK base64urlUInt (RFC 7518 §2): canonical base64url
// (decodeB64) of at least one octet, no leading zero octet.
func decodeUint(name, s string) ([]byte, error) {
	if s == "" {
		return nil, fmt.Errorf("%w: RSA JWK has no %s", ErrInvalidKey, name)
	}
	b, err := decodeB64(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not base64url without padding, canonically encoded: %v", ErrInvalidKey, name, err)
	}
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: %s is empty, want at least one octet", ErrInvalidKey, name)
	}
	if b[0] == 0 {
		return nil, fmt.Errorf("%w: %s has a leading zero octet, want minimal big-endian", ErrInvalidKey, name)
	}
	return b, nil
}

// decodeCoord decodes an EC coordinate, canonical base64url (decodeB64) of
// exactly size bytes (RFC 7518 §6.2.1.2, §6.2.1.3).
func decodeCoord(name, s string, size int) ([]byte, error) {
	if s == "" {
		return nil, fmt.Errorf("%w: EC JWK has no %s", ErrInvalidKey, name)
	}
	b, err := decodeB64(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not base64url without padding, canonically encoded: %v", ErrInvalidKey, name, err)
	}
	if len(b) != size {
		return nil, fmt.Errorf("%w: %s length: got %d bytes, want %d", ErrInvalidKey, name, len(b), size)
	}
	return b, nil
}

// curveLabel names c for an error message, even for a curve without Params.
func curveLabel(c elliptic.Curve) string {
	if p := c.Params(); p != nil && p.Name != "" {
		return p.Name
	}
	return fmt.Sprintf("%T", c)
}
