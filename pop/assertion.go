package pop

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"
)

// Client assertion lifetimes ("exp" - "iat"). RFC 7523 §3 asks for an
// expiry "that limits the time window during which the JWT can be used"
// without a number; 5 minutes is what common clients send (MSAL, Spring),
// and an hour bounds the replay window an AS must remember jti values for.
const (
	DefaultAssertionLifetime = 5 * time.Minute
	MaxAssertionLifetime     = time.Hour
	// maxClientID bounds "iss"/"sub": RFC 6749 gives no limit, and no
	// real client id is longer.
	maxClientID = 256
)

// ClientAssertionParams describe an RFC 7523 client assertion, the JWT a
// client sends as "client_assertion" with client_assertion_type
// "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" (private_key_jwt,
// OpenID Connect Core §9).
type ClientAssertionParams struct {
	// ClientID is the OAuth client_id, sent as both "iss" and "sub" (RFC
	// 7523 §3, rules 1 and 2, for client authentication). It must be
	// 1 to 256 VSCHARs (RFC 6749 Appendix A.1).
	ClientID string
	// Audience is "aud": the authorization server's token endpoint or
	// issuer URL, sent as given. It must be an absolute https URL (http
	// only for a loopback host) without userinfo or fragment.
	Audience string
	// Now is "iat"; it must not be zero.
	Now time.Time
	// Lifetime is "exp" - "iat": 0 means DefaultAssertionLifetime; at
	// most MaxAssertionLifetime.
	Lifetime time.Duration
	// NotBefore adds "nbf" = "iat".
	NotBefore bool
	// JTI is the assertion's unique id; if empty, 128 random bits,
	// base64url.
	JTI string
	// X5TS256, when set, is the header's "x5t#S256" (RFC 7515 §4.1.8): the
	// thumbprint of a certificate for the signing key, for an AS that
	// registered the certificate rather than the key.
	X5TS256 string
}

// Check reports the first parameter NewClientAssertion would refuse, as a
// *ClaimError naming the claim ("iss", "aud", "exp", "iat", "jti") or a
// *HeaderError ("x5t#S256"). Callers may check before choosing a signer.
func (p ClientAssertionParams) Check() error {
	if err := checkClientID(p.ClientID); err != nil {
		return &ClaimError{Claim: "iss", Reason: "client id " + err.Error()}
	}
	if err := checkAudience(p.Audience); err != nil {
		return &ClaimError{Claim: "aud", Reason: reason(err), err: err}
	}
	if p.Now.IsZero() {
		return &ClaimError{Claim: "iat", Reason: "ClientAssertionParams.Now is zero"}
	}
	if p.Lifetime < 0 || p.Lifetime > MaxAssertionLifetime {
		return &ClaimError{Claim: "exp", Reason: fmt.Sprintf("lifetime: got %v, want more than 0 and at most %v", p.Lifetime, MaxAssertionLifetime)}
	}
	if p.Lifetime != 0 && p.Lifetime < time.Second {
		return &ClaimError{Claim: "exp", Reason: fmt.Sprintf("lifetime: got %v, want at least 1s (NumericDate is in seconds)", p.Lifetime)}
	}
	if p.X5TS256 != "" {
		if h, err := decodeB64(p.X5TS256); err != nil || len(h) != 32 {
			return &HeaderError{Member: "x5t#S256", Reason: "not base64url of a SHA-256 hash"}
		}
	}
	return nil
}

// checkClientID: 1 to maxClientID VSCHARs (%x20-7E).
func checkClientID(id string) error {
	if id == "" {
		return fmt.Errorf("is empty")
	}
	if len(id) > maxClientID {
		return fmt.Errorf("is %d bytes, want at most %d", len(id), maxClientID)
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x20 || id[i] > 0x7e {
			return fmt.Errorf("has byte 0x%02x at %d, want printable ASCII (RFC 6749 Appendix A.1)", id[i], i)
		}
	}
	return nil
}

// checkAudience: an absolute https URL, or http to a loopback host (a
// test or a local AS: nothing crosses a network in the clear).
func checkAudience(raw string) error {
	if raw == "" {
		return fmt.Errorf("%w: empty", ErrInvalidURL)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidURL, err)
	}
	switch {
	case u.Scheme == "":
		return fmt.Errorf("%w: %q is not absolute", ErrInvalidURL, raw)
	case u.Scheme != "https" && u.Scheme != "http":
		return fmt.Errorf("%w: scheme %q, want https", ErrInvalidURL, u.Scheme)
	case u.Opaque != "" || u.Hostname() == "":
		return fmt.Errorf("%w: %q has no host", ErrInvalidURL, raw)
	case u.User != nil:
		return fmt.Errorf("%w: %q has userinfo", ErrInvalidURL, raw)
	case u.Fragment != "" || strings.HasSuffix(raw, "#"):
		return fmt.Errorf("%w: %q has a fragment", ErrInvalidURL, raw)
	case u.Scheme == "http" && !isLoopback(u.Hostname()):
		return fmt.Errorf("%w: scheme http to %q, want https (http only for a loopback host)", ErrInvalidURL, u.Hostname())
	}
	return nil
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// NewClientAssertion returns an RFC 7523 §2.2 client assertion signed by s:
// header {"alg":s.Alg(),"typ":"JWT","kid":s.JWK().Kid} (and "x5t#S256"
// when p.X5TS256 is set), claims iss = sub = p.ClientID, aud, jti, iat,
// exp and, with p.NotBefore, nbf. Bad parameters are reported as by Check,
// before anything is signed. It returns the jti too, for callers that log
// or cache it.
func NewClientAssertion(ctx context.Context, s Signer, p ClientAssertionParams) (assertion, jti string, err error) {
	sk, err := inspectSigner(s)
	if err != nil {
		return "", "", err
	}
	if err := p.Check(); err != nil {
		return "", "", err
	}
	lifetime := p.Lifetime
	if lifetime == 0 {
		lifetime = DefaultAssertionLifetime
	}
	jti = p.JTI
	if jti == "" {
		var b [jtiBytes]byte
		rand.Read(b[:]) // never fails (crypto/rand, Go 1.24+)
		jti = b64.EncodeToString(b[:])
	}
	iat := p.Now.Unix()
	claims := map[string]any{
		"iss": p.ClientID,
		"sub": p.ClientID,
		"aud": p.Audience,
		"jti": jti,
		"iat": iat,
		"exp": iat + int64(lifetime/time.Second),
	}
	if p.NotBefore {
		claims["nbf"] = iat
	}
	payload, err := marshalJSON(claims)
	if err != nil {
		return "", "", fmt.Errorf("pop: client assertion claims: %w", err)
	}
	hdr := map[string]any{"typ": "JWT"}
	if sk.kid != "" {
		hdr["kid"] = sk.kid
	}
	if p.X5TS256 != "" {
		hdr["x5t#S256"] = p.X5TS256
	}
	assertion, err = signCompact(ctx, s, sk, hdr, payload)
	if err != nil {
		return "", "", err
	}
	return assertion, jti, nil
}
