package pop

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"

	// Register SHA-384 and SHA-512 for crypto.Hash.New.
	_ "crypto/sha256"
	_ "crypto/sha512"
)

// More errors, matched like the ones in jwk.go with errors.Is. Header and
// claim problems are a *HeaderError or a *ClaimError (errors.As), which may
// also wrap one of these.
var (
	// ErrUnsupportedAlg means a JWS "alg" this package does not accept:
	// "none", a symmetric algorithm, or an unknown name.
	ErrUnsupportedAlg = errors.New("pop: unsupported algorithm")
	// ErrMalformedJWS means a compact JWS or its JSON does not parse.
	ErrMalformedJWS = errors.New("pop: malformed JWS")
	// ErrVerification means a well-formed signature does not verify. It is
	// deliberately vague, like crypto/rsa's.
	ErrVerification = errors.New("pop: signature verification failed")
	// ErrInvalidURL means a URL is not an absolute http or https URL.
	ErrInvalidURL = errors.New("pop: invalid URL")
)

// JWS "alg" values (RFC 7518 §3.1) that this package signs and verifies.
// ES512 can only be verified through VerifyJWS with an *ecdsa.PublicKey on
// P-521, since JWK here covers P-256 and P-384 only.
const (
	AlgES256 = "ES256"
	AlgES384 = "ES384"
	AlgES512 = "ES512"
	AlgRS256 = "RS256"
	AlgRS384 = "RS384"
	AlgRS512 = "RS512"
	AlgPS256 = "PS256"
	AlgPS384 = "PS384"
	AlgPS512 = "PS512"
)

// minRSABits is the smallest RSA modulus accepted for RS* and PS*: RFC 7518
// §3.3 and §3.5 require 2048 bits or more.
const minRSABits = 2048

// Signer is a key that signs JWS signing input. The daemon (through its
// keyring) and the Go SDK both implement it, so they share the builders in
// this package. Implementations must be safe for concurrent use.
type Signer interface {
	// Alg is the JWS "alg" the key signs with: ES256, ES384, RS256, PS256,
	// or RS384, RS512, PS384, PS512.
	Alg() string
	// JWK is the public key. The implementation sets Kid and, if it likes,
	// Alg (which must then equal Alg()).
	JWK() JWK
	// Sign returns the JWS signature (RFC 7518 §3) over signingInput, the
	// ASCII bytes BASE64URL(header) "." BASE64URL(payload): for ECDSA the
	// raw r||s with each half left-padded to the curve size (not DER), for
	// RS* RSASSA-PKCS1-v1_5, for PS* RSASSA-PSS with MGF1 over the same hash
	// and a salt as long as the hash.
	Sign(ctx context.Context, signingInput []byte) ([]byte, error)
}

// sigKind is the signature scheme behind an alg.
type sigKind int

const (
	kindECDSA sigKind = iota + 1
	kindPKCS1v15
	kindPSS
)

// algorithm is one row of RFC 7518 §3.1.
type algorithm struct {
	name  string
	kind  sigKind
	hash  crypto.Hash
	curve elliptic.Curve // ECDSA only: RFC 7518 §3.4 ties the curve to the alg
}

var algorithms = map[string]algorithm{
	AlgES256: {AlgES256, kindECDSA, crypto.SHA256, elliptic.P256()},
	AlgES384: {AlgES384, kindECDSA, crypto.SHA384, elliptic.P384()},
	AlgES512: {AlgES512, kindECDSA, crypto.SHA512, elliptic.P521()},
	AlgRS256: {AlgRS256, kindPKCS1v15, crypto.SHA256, nil},
	AlgRS384: {AlgRS384, kindPKCS1v15, crypto.SHA384, nil},
	AlgRS512: {AlgRS512, kindPKCS1v15, crypto.SHA512, nil},
	AlgPS256: {AlgPS256, kindPSS, crypto.SHA256, nil},
	AlgPS384: {AlgPS384, kindPSS, crypto.SHA384, nil},
	AlgPS512: {AlgPS512, kindPSS, crypto.SHA512, nil},
}

// HeaderError is a JWS header member that SignJWS refuses or that a
// verifier rejects.
type HeaderError struct {
	Member string // the header member, such as "alg", "crit", "jwk" or "typ"
	Reason string
	err    error
}

func (e *HeaderError) Error() string {
	return "pop: JWS header " + strconv.Quote(e.Member) + ": " + e.Reason
}

// Unwrap returns the underlying error, such as ErrUnsupportedAlg or
// ErrInvalidKey, if there is one.
func (e *HeaderError) Unwrap() error { return e.err }

// JWSOptions are the options of SignJWS.
type JWSOptions struct {
	// Header holds extra header members, such as "typ". It must not set
	// "alg" (always taken from the Signer), "crit" or "b64" (no extensions
	// are supported). A "kid" must equal the signer's JWK().Kid, when the
	// signer has one; a "jwk" must be the signer's public key with no
	// private members.
	Header map[string]any
	// OmitKid leaves out the "kid" member that is otherwise set from the
	// signer's JWK().Kid (when that is not empty).
	OmitKid bool
	// EmbedJWK sets the "jwk" member (RFC 7515 §4.1.3) to the signer's
	// public key: kty and the key members only, no kid, alg or use.
	EmbedJWK bool
}

// signerKey is what SignJWS needs to know about a Signer, checked before
// anything is signed.
type signerKey struct {
	alg algorithm
	jwk JWK // kty and key members only
	kid string
	pub crypto.PublicKey
}

// inspectSigner checks that s names a supported alg and a valid public key
// of the type and size the alg needs, so a misconfigured signer fails here
// and not on hardware or at a server.
func inspectSigner(s Signer) (signerKey, error) {
	if s == nil {
		return signerKey{}, errors.New("pop: nil Signer")
	}
	name := s.Alg()
	a, ok := algorithms[name]
	if !ok {
		return signerKey{}, fmt.Errorf("%w: signer alg %q", ErrUnsupportedAlg, name)
	}
	j := s.JWK()
	if j.Alg != "" && j.Alg != name {
		return signerKey{}, fmt.Errorf("%w: signer JWK alg: got %q, want %q (its Alg)", ErrInvalidKey, j.Alg, name)
	}
	pub, err := j.PublicKey()
	if err != nil {
		return signerKey{}, fmt.Errorf("pop: signer JWK: %w", err)
	}
	if reason := keyMismatch(a, pub); reason != "" {
		return signerKey{}, fmt.Errorf("%w: signer: %s", ErrUnsupportedKey, reason)
	}
	return signerKey{alg: a, jwk: publicMembers(j), kid: j.Kid, pub: pub}, nil
}

// keyMismatch says why pub cannot be used with a, or returns "".
func keyMismatch(a algorithm, pub crypto.PublicKey) string {
	switch a.kind {
	case kindECDSA:
		k, ok := pub.(*ecdsa.PublicKey)
		if !ok || k == nil {
			return fmt.Sprintf("%s needs an ECDSA key, got %s", a.name, keyLabel(pub))
		}
		if k.Curve != a.curve {
			return fmt.Sprintf("%s needs a %s key, got %s", a.name, curveLabel(a.curve), keyLabel(pub))
		}
	case kindPKCS1v15, kindPSS:
		k, ok := pub.(*rsa.PublicKey)
		if !ok || k == nil || k.N == nil {
			return fmt.Sprintf("%s needs an RSA key, got %s", a.name, keyLabel(pub))
		}
		if bits := k.N.BitLen(); bits < minRSABits {
			return fmt.Sprintf("%s needs an RSA key of at least %d bits (RFC 7518 §3.3), got %d", a.name, minRSABits, bits)
		}
	}
	return ""
}

// keyLabel names a public key's type for an error message.
func keyLabel(pub crypto.PublicKey) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k == nil || k.Curve == nil {
			return "an ECDSA key without a curve"
		}
		return "an ECDSA " + curveLabel(k.Curve) + " key"
	case *rsa.PublicKey:
		if k == nil || k.N == nil {
			return "an empty RSA key"
		}
		return fmt.Sprintf("an RSA %d-bit key", k.N.BitLen())
	case nil:
		return "no key"
	default:
		return fmt.Sprintf("%T", pub)
	}
}

// publicMembers returns j with only kty and the key members: the form
// embedded in DPoP proofs (RFC 9449 §4.2) and SHR "cnf" claims.
func publicMembers(j JWK) JWK {
	return JWK{Kty: j.Kty, Crv: j.Crv, X: j.X, Y: j.Y, N: j.N, E: j.E}
}

// SignJWS returns a compact JWS (RFC 7515 §7.1) of payload signed by s. The
// header is o.Header plus "alg" from s.Alg(), "kid" from s.JWK().Kid unless
// o.OmitKid, and "jwk" if o.EmbedJWK. Refused header members are reported
// as a *HeaderError before anything is signed.
//
// The signature s returns is verified under s.JWK() before SignJWS returns
// it, so a backend that returns DER instead of r||s, uses a PSS salt other
// than the hash length, or signs with another key fails here, not at the
// server.
func SignJWS(ctx context.Context, s Signer, payload []byte, o JWSOptions) (string, error) {
	sk, err := inspectSigner(s)
	if err != nil {
		return "", err
	}
	hdr := make(map[string]any, len(o.Header)+3)
	for name, v := range o.Header {
		switch name {
		case "alg":
			return "", &HeaderError{Member: name, Reason: "set from the Signer's Alg; do not set it in JWSOptions.Header", err: ErrUnsupportedAlg}
		case "crit":
			return "", &HeaderError{Member: name, Reason: "critical extensions (RFC 7515 §4.1.11) are not supported"}
		case "b64":
			return "", &HeaderError{Member: name, Reason: "unencoded payloads (RFC 7797) are not supported"}
		case "kid":
			if o.OmitKid {
				return "", &HeaderError{Member: name, Reason: "set in Header while OmitKid is true"}
			}
			kid, ok := v.(string)
			if !ok {
				return "", &HeaderError{Member: name, Reason: fmt.Sprintf("got %T, want a string", v)}
			}
			if sk.kid != "" && kid != sk.kid {
				return "", &HeaderError{Member: name, Reason: fmt.Sprintf("got %q, want the signer's kid %q", kid, sk.kid)}
			}
		case "jwk":
			if err := sameKey(v, sk); err != nil {
				return "", err
			}
		}
		hdr[name] = v
	}
	if !o.OmitKid && sk.kid != "" {
		hdr["kid"] = sk.kid
	}
	if o.EmbedJWK {
		hdr["jwk"] = sk.jwk
	}
	return signCompact(ctx, s, sk, hdr, payload)
}

// sameKey checks that v, a "jwk" header member from a caller, is sk's
// public key and has no private members.
func sameKey(v any, sk signerKey) error {
	raw, err := marshalJSON(v)
	if err != nil {
		return &HeaderError{Member: "jwk", Reason: fmt.Sprintf("does not encode as JSON: %v", err)}
	}
	j, _, err := publicJWK(raw)
	if err != nil {
		return err
	}
	if got, want := j.thumbprint(), sk.jwk.thumbprint(); got != want {
		return &HeaderError{Member: "jwk", Reason: fmt.Sprintf("key with thumbprint %s, want the signer's %s", got, want)}
	}
	return nil
}

// signCompact signs hdr (to which it adds "alg") and payload with s and
// checks the signature before returning the compact JWS.
func signCompact(ctx context.Context, s Signer, sk signerKey, hdr map[string]any, payload []byte) (string, error) {
	hdr["alg"] = sk.alg.name
	hj, err := marshalJSON(hdr)
	if err != nil {
		return "", fmt.Errorf("pop: JWS header: %w", err)
	}
	input := b64.EncodeToString(hj) + "." + b64.EncodeToString(payload)
	if err := ctx.Err(); err != nil {
		return "", err
	}
	sig, err := s.Sign(ctx, []byte(input))
	if err != nil {
		return "", fmt.Errorf("pop: sign %s: %w", sk.alg.name, err)
	}
	if err := verifySignature(sk.alg, sk.pub, []byte(input), sig); err != nil {
		return "", fmt.Errorf("pop: the signer's %s signature does not verify under its JWK (DER instead of r||s? PSS salt not the hash length? another key?): %w", sk.alg.name, err)
	}
	return input + "." + b64.EncodeToString(sig), nil
}

// ParseJWS splits a compact JWS (RFC 7515 §7.1) and decodes its parts
// without verifying anything but their form: three parts in canonical
// base64url without padding (only A-Z a-z 0-9 - _, so no CR, LF or
// padding), a header that is a JSON object with no duplicate member names and
// a string "alg". signingInput is the ASCII bytes the signature covers.
func ParseJWS(compact string) (header map[string]json.RawMessage, payload []byte, signingInput []byte, sig []byte, err error) {
	if n := strings.Count(compact, ".") + 1; n != 3 {
		return nil, nil, nil, nil, fmt.Errorf("%w: got %d parts, want 3", ErrMalformedJWS, n)
	}
	h, rest, _ := strings.Cut(compact, ".")
	p, s, _ := strings.Cut(rest, ".")
	hj, err := decodeB64(h)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("%w: header is not base64url without padding: %v", ErrMalformedJWS, err)
	}
	if payload, err = decodeB64(p); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("%w: payload is not base64url without padding: %v", ErrMalformedJWS, err)
	}
	if sig, err = decodeB64(s); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("%w: signature is not base64url without padding: %v", ErrMalformedJWS, err)
	}
	if header, err = decodeObject(hj); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("%w: header: %v", ErrMalformedJWS, err)
	}
	if _, ok, err := stringMember(header, "alg"); err != nil {
		return nil, nil, nil, nil, &HeaderError{Member: "alg", Reason: reason(err), err: ErrMalformedJWS}
	} else if !ok {
		return nil, nil, nil, nil, &HeaderError{Member: "alg", Reason: "missing", err: ErrMalformedJWS}
	}
	return header, payload, []byte(h + "." + p), sig, nil
}

// VerifyJWS verifies a compact JWS under pub, an *ecdsa.PublicKey or an
// *rsa.PublicKey, and returns its header and payload. It is strict:
//
//   - "alg" must be one of the Alg* constants and match pub: ES256 a P-256
//     key, ES384 P-384, ES512 P-521, RS* and PS* an RSA key of 2048 bits or
//     more. "none" and symmetric algorithms are rejected.
//   - An ECDSA signature must be exactly r||s (RFC 7518 §3.4); DER is
//     rejected with ErrInvalidSignature.
//   - PS* must use a salt as long as the hash (RFC 7518 §3.5), so
//     maximum-length salts are rejected.
//   - "crit" is rejected: no extensions are understood.
//
// A signature that does not verify gives ErrVerification.
func VerifyJWS(compact string, pub crypto.PublicKey) (header map[string]json.RawMessage, payload []byte, err error) {
	header, payload, input, sig, err := ParseJWS(compact)
	if err != nil {
		return nil, nil, err
	}
	if _, err := verifyParsed(header, input, sig, pub); err != nil {
		return nil, nil, err
	}
	return header, payload, nil
}

// verifyParsed checks the header's "alg" and "crit" and the signature, and
// returns the algorithm.
func verifyParsed(header map[string]json.RawMessage, input, sig []byte, pub crypto.PublicKey) (algorithm, error) {
	a, err := headerAlg(header)
	if err != nil {
		return algorithm{}, err
	}
	if _, ok := header["crit"]; ok {
		return algorithm{}, &HeaderError{Member: "crit", Reason: "no critical extensions are understood (RFC 7515 §4.1.11)"}
	}
	if reason := keyMismatch(a, pub); reason != "" {
		return algorithm{}, &HeaderError{Member: "alg", Reason: reason, err: ErrUnsupportedKey}
	}
	if err := verifySignature(a, pub, input, sig); err != nil {
		return algorithm{}, err
	}
	return a, nil
}

// headerAlg returns the supported algorithm a parsed header names.
func headerAlg(header map[string]json.RawMessage) (algorithm, error) {
	name, ok, err := stringMember(header, "alg")
	if err != nil {
		return algorithm{}, &HeaderError{Member: "alg", Reason: reason(err), err: ErrMalformedJWS}
	}
	if !ok {
		return algorithm{}, &HeaderError{Member: "alg", Reason: "missing", err: ErrMalformedJWS}
	}
	a, ok := algorithms[name]
	if !ok {
		return algorithm{}, &HeaderError{Member: "alg", Reason: fmt.Sprintf("%q is not accepted; want an asymmetric algorithm such as ES256, RS256 or PS256", name), err: ErrUnsupportedAlg}
	}
	return a, nil
}

// verifySignature verifies a JWS signature over input.
func verifySignature(a algorithm, pub crypto.PublicKey, input, sig []byte) error {
	h := a.hash.New()
	h.Write(input)
	digest := h.Sum(nil)
	switch a.kind {
	case kindECDSA:
		k := pub.(*ecdsa.PublicKey)
		der, err := ECDSAJOSEToDER(sig, k.Curve) // checks len(sig) == 2*size
		if err != nil {
			return err
		}
		if !ecdsa.VerifyASN1(k, digest, der) {
			return ErrVerification
		}
	case kindPKCS1v15, kindPSS:
		k := pub.(*rsa.PublicKey)
		if want := (k.N.BitLen() + 7) / 8; len(sig) != want {
			return fmt.Errorf("%w: RSA signature length: got %d, want %d", ErrInvalidSignature, len(sig), want)
		}
		var err error
		if a.kind == kindPSS {
			err = rsa.VerifyPSS(k, a.hash, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: a.hash})
		} else {
			err = rsa.VerifyPKCS1v15(k, a.hash, digest, sig)
		}
		if err != nil {
			return ErrVerification
		}
	}
	return nil
}

// privateMembers are the JWK members that carry private or symmetric key
// material (RFC 7518 §6.2.2, §6.3.2, §6.4.1). A JWK that travels with a
// token or proof must have none of them.
var privateMembers = []string{"d", "p", "q", "dp", "dq", "qi", "oth", "k"}

// publicJWK decodes a JWK received in a header or claim. It inspects the raw
// JSON, since the JWK type would silently drop private members, rejects
// duplicate members, reads members by their exact names, and validates the
// key.
func publicJWK(raw json.RawMessage) (JWK, crypto.PublicKey, error) {
	obj, err := decodeObject(raw)
	if err != nil {
		return JWK{}, nil, &HeaderError{Member: "jwk", Reason: reason(err), err: ErrInvalidKey}
	}
	for _, m := range privateMembers {
		if _, ok := obj[m]; ok {
			return JWK{}, nil, &HeaderError{Member: "jwk", Reason: fmt.Sprintf("has the private member %q", m), err: ErrInvalidKey}
		}
	}
	var j JWK
	for _, f := range []struct {
		name string
		dst  *string
	}{
		{"kty", &j.Kty}, {"use", &j.Use}, {"alg", &j.Alg}, {"kid", &j.Kid},
		{"crv", &j.Crv}, {"x", &j.X}, {"y", &j.Y}, {"n", &j.N}, {"e", &j.E},
	} {
		v, _, err := stringMember(obj, f.name)
		if err != nil {
			return JWK{}, nil, &HeaderError{Member: "jwk", Reason: reason(err), err: ErrInvalidKey}
		}
		*f.dst = v
	}
	pub, err := j.PublicKey()
	if err != nil {
		return JWK{}, nil, &HeaderError{Member: "jwk", Reason: reason(err), err: err}
	}
	return j, pub, nil
}

// decodeObject decodes a JSON object into its members. Unlike
// json.Unmarshal into a map it rejects duplicate member names (RFC 7515 §4,
// RFC 7519 §4), so two parsers cannot disagree about which value counts,
// and it rejects invalid UTF-8 and trailing data.
func decodeObject(b []byte) (map[string]json.RawMessage, error) {
	if !utf8.Valid(b) {
		return nil, errors.New("invalid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a JSON object")
	}
	obj := make(map[string]json.RawMessage)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		name, ok := tok.(string)
		if !ok {
			return nil, errors.New("member name is not a string")
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		if _, dup := obj[name]; dup {
			return nil, fmt.Errorf("duplicate member %q", name)
		}
		obj[name] = v
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON object")
	}
	return obj, nil
}

// stringMember returns obj[name] as a string; ok is false if it is absent.
func stringMember(obj map[string]json.RawMessage, name string) (s string, ok bool, err error) {
	raw, ok := obj[name]
	if !ok {
		return "", false, nil
	}
	if len(raw) == 0 || raw[0] != '"' {
		return "", true, fmt.Errorf("%q is not a JSON string", name)
	}
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", true, fmt.Errorf("%q: %v", name, err)
	}
	return s, true, nil
}

// reason is err's message for a HeaderError or ClaimError, without the
// package prefix the outer error repeats.
func reason(err error) string {
	return strings.TrimPrefix(err.Error(), "pop: ")
}

// marshalJSON encodes v compactly without escaping <, > and &.
func marshalJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// requireTyp checks the "typ" header member is exactly want.
func requireTyp(header map[string]json.RawMessage, want string) error {
	typ, ok, err := stringMember(header, "typ")
	switch {
	case err != nil:
		return &HeaderError{Member: "typ", Reason: reason(err)}
	case !ok:
		return &HeaderError{Member: "typ", Reason: "missing"}
	case typ != want:
		return &HeaderError{Member: "typ", Reason: fmt.Sprintf("got %q, want %q", typ, want)}
	}
	return nil
}
