package testservers

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/keybroker/keybroker/pop"
)

// AccessTokenType is the JWT "typ" of access tokens (RFC 9068 §2.1).
const AccessTokenType = "at+jwt"

// Confirmation is an access token's "cnf" claim (RFC 7800 §3.1). The AS
// sets exactly one member.
type Confirmation struct {
	// JKT is the RFC 7638 thumbprint of the DPoP proof key (RFC 9449 §6.1).
	JKT string `json:"jkt,omitempty"`
	// Kid is the RFC 7638 thumbprint of the SHR key (MSAL SHR PoP, from a
	// req_cnf {"kid": …}).
	Kid string `json:"kid,omitempty"`
	// JWK is the SHR key itself (RFC 7800 §3.2; MSAuth 1.0 AT-POP, from a
	// req_cnf that is a JWK).
	JWK *pop.JWK `json:"jwk,omitempty"`
	// X5TS256 is the client certificate's SHA-256 thumbprint (RFC 8705
	// §3.1).
	X5TS256 string `json:"x5t#S256,omitempty"`
}

// String summarizes c for logs, as "member:value"; a JWK is shown by its
// key type and thumbprint.
func (c Confirmation) String() string {
	var parts []string
	if c.JKT != "" {
		parts = append(parts, "jkt:"+c.JKT)
	}
	if c.Kid != "" {
		parts = append(parts, "kid:"+c.Kid)
	}
	if c.JWK != nil {
		tp, err := c.JWK.Thumbprint()
		if err != nil {
			tp = "invalid"
		}
		parts = append(parts, "jwk:{"+c.JWK.Kty+" key, thumbprint "+tp+"}")
	}
	if c.X5TS256 != "" {
		parts = append(parts, "x5t#S256:"+c.X5TS256)
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, " ")
}

func (c Confirmation) members() int {
	n := 0
	for _, set := range []bool{c.JKT != "", c.Kid != "", c.JWK != nil, c.X5TS256 != ""} {
		if set {
			n++
		}
	}
	return n
}

// Claims are the claims of an access token (RFC 9068 §2.2).
type Claims struct {
	Issuer   string       `json:"iss"`
	Subject  string       `json:"sub"`
	Audience Audience     `json:"aud"`
	ClientID string       `json:"client_id"`
	IssuedAt int64        `json:"iat"`
	Expiry   int64        `json:"exp"`
	JTI      string       `json:"jti"`
	Cnf      Confirmation `json:"cnf"`
}

// Audience is an "aud" claim: one string or an array (RFC 7519 §4.1.3). It
// encodes as a string when it has one member.
type Audience []string

// MarshalJSON implements json.Marshaler.
func (a Audience) MarshalJSON() ([]byte, error) {
	if len(a) == 1 {
		return json.Marshal(a[0])
	}
	return json.Marshal([]string(a))
}

// UnmarshalJSON implements json.Unmarshaler.
func (a *Audience) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		*a = Audience{s}
		return nil
	}
	var l []string
	if err := json.Unmarshal(b, &l); err != nil {
		return errors.New(`"aud" is neither a string nor an array of strings`)
	}
	*a = l
	return nil
}

// Contains reports whether aud is one of a's members.
func (a Audience) Contains(aud string) bool {
	for _, m := range a {
		if m == aud {
			return true
		}
	}
	return false
}

// DecodeToken returns an access token's claims WITHOUT verifying anything.
// It is for printing what the AS issued; clients should treat access tokens
// as opaque, and servers must verify them.
func DecodeToken(token string) (*Claims, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, fmt.Errorf("access token: got %d parts, want 3", len(parts))
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, fmt.Errorf("access token payload: %w", err)
	}
	var c Claims
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("access token payload: %w", err)
	}
	return &c, nil
}

// issueToken signs claims as a JWT access token (RFC 9068 §2.1).
func issueToken(ctx context.Context, s pop.Signer, c Claims) (string, error) {
	payload, err := json.Marshal(c)
	if err != nil {
		return "", err
	}
	return pop.SignJWS(ctx, s, payload, pop.JWSOptions{Header: map[string]any{"typ": AccessTokenType}})
}

// tokenVerifier checks access tokens as RFC 9068 §4 asks: typ "at+jwt", a
// signature by a key of the issuer's JWKS (selected by kid), the issuer, the
// audience, the lifetime, and the presence of the claims the RS relies on.
// It checks that the token is bound (one cnf member) but not what to: that
// depends on how the token was presented.
type tokenVerifier struct {
	issuer string
	keys   map[string]crypto.PublicKey // by kid
}

func newTokenVerifier(issuer string, jwks pop.JWKS) (*tokenVerifier, error) {
	v := &tokenVerifier{issuer: issuer, keys: map[string]crypto.PublicKey{}}
	for _, j := range jwks.Keys {
		pub, err := j.PublicKey()
		if err != nil {
			return nil, fmt.Errorf("issuer key %q: %w", j.Kid, err)
		}
		v.keys[j.Kid] = pub
	}
	return v, nil
}

func (v *tokenVerifier) verify(token, audience string, now time.Time) (*Claims, error) {
	header, _, _, _, err := pop.ParseJWS(token)
	if err != nil {
		return nil, fmt.Errorf("access token: %w", err)
	}
	var typ, kid string
	if err := unmarshalMember(header, "typ", &typ); err != nil || !strings.EqualFold(strings.TrimPrefix(typ, "application/"), AccessTokenType) {
		return nil, fmt.Errorf("access token typ: got %q, want %q", typ, AccessTokenType)
	}
	if err := unmarshalMember(header, "kid", &kid); err != nil {
		return nil, fmt.Errorf("access token kid: %w", err)
	}
	pub, ok := v.keys[kid]
	if !ok {
		return nil, fmt.Errorf("access token kid %q: not a key of issuer %s", kid, v.issuer)
	}
	_, payload, err := pop.VerifyJWS(token, pub)
	if err != nil {
		return nil, fmt.Errorf("access token signature: %w", err)
	}
	var c Claims
	dec := json.NewDecoder(bytes.NewReader(payload))
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("access token claims: %w", err)
	}
	switch {
	case subtle.ConstantTimeCompare([]byte(c.Issuer), []byte(v.issuer)) != 1:
		return nil, fmt.Errorf("access token iss: got %q, want %q", c.Issuer, v.issuer)
	case !c.Audience.Contains(audience):
		return nil, fmt.Errorf("access token aud: got %q, want %q", []string(c.Audience), audience)
	case c.Expiry == 0 || c.IssuedAt == 0 || c.Subject == "" || c.ClientID == "" || c.JTI == "":
		return nil, errors.New("access token: exp, iat, sub, client_id and jti are required")
	case !now.Before(time.Unix(c.Expiry, 0).Add(clockLeeway)):
		return nil, fmt.Errorf("access token expired at %s", time.Unix(c.Expiry, 0).UTC().Format(time.RFC3339))
	case time.Unix(c.IssuedAt, 0).After(now.Add(clockLeeway)):
		return nil, errors.New("access token iat is in the future")
	case c.Cnf.members() != 1:
		return nil, fmt.Errorf("access token cnf: got %d confirmation members, want 1 (this RS accepts only sender-constrained tokens)", c.Cnf.members())
	}
	return &c, nil
}

// unmarshalMember decodes obj[name] into v; a missing member leaves v as
// it is.
func unmarshalMember(obj map[string]json.RawMessage, name string, v any) error {
	raw, ok := obj[name]
	if !ok {
		return nil
	}
	return json.Unmarshal(raw, v)
}

// randomID returns 128 random bits, base64url.
func randomID() string {
	var b [16]byte
	rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// equal compares two strings in constant time.
func equal(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }
