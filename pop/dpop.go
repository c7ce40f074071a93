package pop

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// ClaimError is a claim (or the parameter that becomes one) that a builder
// refuses or a verifier rejects. A verifier's *ClaimError with Claim
// "nonce" means the server should answer with a fresh nonce (RFC 9449 §8,
// "use_dpop_nonce").
type ClaimError struct {
	Claim  string // the claim, such as "htu", "iat", "ath" or "nonce"
	Reason string
	err    error
}

func (e *ClaimError) Error() string {
	return "pop: claim " + strconv.Quote(e.Claim) + ": " + e.Reason
}

// Unwrap returns the underlying error, such as ErrInvalidURL, if there is
// one.
func (e *ClaimError) Unwrap() error { return e.err }

// DPoP JWT type (RFC 9449 §4.2) and the default window for its "iat".
const (
	dpopTyp           = "dpop+jwt"
	defaultDPoPMaxAge = 60 * time.Second
)

// jtiBytes is the size of a generated jti: 128 random bits, more than the
// 96 RFC 9449 §4.2 asks for.
const jtiBytes = 16

// NormalizeHTU returns the form of an http or https URL used for the DPoP
// "htu" claim (RFC 9449 §4.2, §4.3): scheme and host lower-cased, the
// scheme's default port dropped, "/" for an empty path, the path as sent
// (escaped form, not decoded, dot segments kept), and no userinfo, query or
// fragment. For example
// "HTTPS://Resource.Example.ORG:443/protectedresource?x=1#frag" becomes
// "https://resource.example.org/protectedresource".
func NormalizeHTU(raw string) (string, error) {
	r, err := parseRequestURL(raw)
	if err != nil {
		return "", err
	}
	return r.scheme + "://" + r.host + r.path, nil
}

// requestURL is an http or https URL split into the parts PoP signs.
type requestURL struct {
	scheme   string // "http" or "https"
	host     string // lower-case host, ":port" only when not the default
	hostname string // lower-case host without port, IPv6 in brackets
	port     string // the effective port
	path     string // escaped path, "/" if empty
	rawQuery string // as in the URL, without "?"
}

// parseRequestURL parses and normalizes an absolute http or https URL.
func parseRequestURL(raw string) (requestURL, error) {
	if raw == "" {
		return requestURL{}, fmt.Errorf("%w: empty", ErrInvalidURL)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return requestURL{}, fmt.Errorf("%w: %v", ErrInvalidURL, err)
	}
	var defaultPort string
	switch u.Scheme { // url.Parse lower-cases the scheme
	case "https":
		defaultPort = "443"
	case "http":
		defaultPort = "80"
	case "":
		return requestURL{}, fmt.Errorf("%w: %q is not absolute", ErrInvalidURL, raw)
	default:
		return requestURL{}, fmt.Errorf("%w: scheme %q, want http or https", ErrInvalidURL, u.Scheme)
	}
	if u.Opaque != "" || u.Host == "" {
		return requestURL{}, fmt.Errorf("%w: %q has no host", ErrInvalidURL, raw)
	}
	hostname := strings.ToLower(u.Hostname())
	if hostname == "" {
		return requestURL{}, fmt.Errorf("%w: %q has no host", ErrInvalidURL, raw)
	}
	if strings.Contains(hostname, ":") {
		hostname = "[" + hostname + "]" // IPv6 literal, RFC 3986 §3.2.2
	}
	host, port := hostname, u.Port()
	switch port {
	case "", defaultPort: // an empty port means the default, RFC 3986 §6.2.3
		port = defaultPort
	default:
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return requestURL{}, fmt.Errorf("%w: port %q, want 1 to 65535", ErrInvalidURL, port)
		}
		host += ":" + port
	}
	path := u.EscapedPath()
	if path == "" {
		path = "/"
	}
	return requestURL{scheme: u.Scheme, host: host, hostname: hostname, port: port, path: path, rawQuery: u.RawQuery}, nil
}

// ATH returns the DPoP "ath" claim for an access token (RFC 9449 §4.2):
// base64url(SHA-256(ASCII(accessToken))).
func ATH(accessToken string) string {
	sum := sha256.Sum256([]byte(accessToken))
	return b64.EncodeToString(sum[:])
}

// DPoPParams describe the request a DPoP proof is for.
type DPoPParams struct {
	// Method is the HTTP method, sent as "htm" exactly as given (methods are
	// case-sensitive, RFC 9110 §9.1). It must be a non-empty token.
	Method string
	// URL is the request URL; "htu" is NormalizeHTU(URL).
	URL string
	// AccessToken, when set, is bound with "ath" = ATH(AccessToken). Set it
	// or ATH, not both.
	AccessToken string
	// ATH is a precomputed "ath": base64url of a SHA-256 hash.
	ATH string
	// Nonce is the server's latest DPoP-Nonce, sent as "nonce" if set.
	Nonce string
	// Now is the time of the proof; "iat" is Now in whole seconds. It must
	// not be zero.
	Now time.Time
	// JTI is the proof's unique id; if empty, 128 random bits, base64url.
	JTI string
	// Extra holds more claims. It must not set jti, htm, htu, iat, ath or
	// nonce.
	Extra map[string]any
}

// NewDPoPProof returns a DPoP proof JWT (RFC 9449 §4.2) signed by s, with
// header {"typ":"dpop+jwt","alg":s.Alg(),"jwk":<kty and key members of
// s.JWK()>} and claims jti, htm, htu, iat, and ath and nonce when set. Bad
// parameters are reported as a *ClaimError before anything is signed.
func NewDPoPProof(ctx context.Context, s Signer, p DPoPParams) (string, error) {
	sk, err := inspectSigner(s)
	if err != nil {
		return "", err
	}
	if err := checkToken(p.Method); err != nil {
		return "", &ClaimError{Claim: "htm", Reason: "method " + err.Error()}
	}
	htu, err := NormalizeHTU(p.URL)
	if err != nil {
		return "", &ClaimError{Claim: "htu", Reason: reason(err), err: err}
	}
	if p.Now.IsZero() {
		return "", &ClaimError{Claim: "iat", Reason: "DPoPParams.Now is zero"}
	}
	ath := p.ATH
	switch {
	case p.AccessToken != "" && p.ATH != "":
		return "", &ClaimError{Claim: "ath", Reason: "both AccessToken and ATH are set; set one"}
	case p.AccessToken != "":
		ath = ATH(p.AccessToken)
	case p.ATH != "":
		if h, err := decodeB64(p.ATH); err != nil || len(h) != sha256.Size {
			return "", &ClaimError{Claim: "ath", Reason: fmt.Sprintf("ATH %q is not base64url of a %d-byte SHA-256 hash", p.ATH, sha256.Size)}
		}
	}
	jti := p.JTI
	if jti == "" {
		var b [jtiBytes]byte
		rand.Read(b[:]) // never fails (crypto/rand, Go 1.24+)
		jti = b64.EncodeToString(b[:])
	}
	claims := make(map[string]any, len(p.Extra)+6)
	for name, v := range p.Extra {
		switch name {
		case "jti", "htm", "htu", "iat", "ath", "nonce":
			return "", &ClaimError{Claim: name, Reason: "set by NewDPoPProof; DPoPParams.Extra must not set it"}
		}
		claims[name] = v
	}
	claims["jti"] = jti
	claims["htm"] = p.Method
	claims["htu"] = htu
	claims["iat"] = p.Now.Unix()
	if ath != "" {
		claims["ath"] = ath
	}
	if p.Nonce != "" {
		claims["nonce"] = p.Nonce
	}
	payload, err := marshalJSON(claims)
	if err != nil {
		return "", fmt.Errorf("pop: DPoP claims: %w", err)
	}
	hdr := map[string]any{"typ": dpopTyp, "jwk": sk.jwk}
	return signCompact(ctx, s, sk, hdr, payload)
}

// DPoPClaims are the checked contents of a DPoP proof.
type DPoPClaims struct {
	JTI   string // for the caller's replay check (RFC 9449 §11.1)
	HTM   string
	HTU   string // as sent, not normalized
	ATH   string
	Nonce string
	IAT   int64
	// JWK is the proof key from the header, as sent (public members only).
	JWK JWK
	// Thumbprint is JWK's RFC 7638 thumbprint: compare it with the access
	// token's "cnf"."jkt" (RFC 9449 §6.1).
	Thumbprint string
}

// DPoPCheck is what a server knows about the request a proof came with.
type DPoPCheck struct {
	Method string // the request's method; "htm" must equal it exactly
	URL    string // the request's URL; "htu" must match it after NormalizeHTU
	// AccessToken, when set, must be bound by "ath" (required then).
	AccessToken string
	// Nonce, when set, must equal the "nonce" claim (required then).
	Nonce string
	// Now is the server's time; it must not be zero.
	Now time.Time
	// MaxAge is how old "iat" may be; 0 means 60 seconds.
	MaxAge time.Duration
	// Leeway is the clock skew allowed either side of the window.
	Leeway time.Duration
}

// VerifyDPoPProof checks a DPoP proof as an authorization or resource
// server does (RFC 9449 §4.3): a JWT with typ "dpop+jwt", an asymmetric
// supported alg (see VerifyJWS), a "jwk" header with no private members
// (inspected in the raw JSON), a signature that verifies under that jwk,
// "htm" equal to c.Method, "htu" equal to c.URL after NormalizeHTU of both,
// "iat" no older than MaxAge and not in the future (each with Leeway), "ath"
// binding c.AccessToken when that is set, and "nonce" equal to c.Nonce when
// that is set. Header problems are a *HeaderError and claim problems a
// *ClaimError.
//
// It does not track jti values: the caller must reject a jti it has seen
// within the window (RFC 9449 §11.1), and compare the returned Thumbprint
// with the access token's cnf.jkt.
func VerifyDPoPProof(proof string, c DPoPCheck) (*DPoPClaims, error) {
	if c.Now.IsZero() {
		return nil, errors.New("pop: DPoPCheck.Now is zero")
	}
	if err := checkToken(c.Method); err != nil {
		return nil, fmt.Errorf("pop: DPoPCheck.Method %s", err)
	}
	wantHTU, err := NormalizeHTU(c.URL)
	if err != nil {
		return nil, fmt.Errorf("pop: DPoPCheck.URL: %w", err)
	}
	maxAge, err := window(c.MaxAge, c.Leeway, defaultDPoPMaxAge)
	if err != nil {
		return nil, fmt.Errorf("pop: DPoPCheck: %w", err)
	}

	header, payload, input, sig, err := ParseJWS(proof)
	if err != nil {
		return nil, err
	}
	if err := requireTyp(header, dpopTyp); err != nil {
		return nil, err
	}
	a, err := headerAlg(header)
	if err != nil {
		return nil, err
	}
	raw, ok := header["jwk"]
	if !ok {
		return nil, &HeaderError{Member: "jwk", Reason: "missing"}
	}
	jwk, pub, err := publicJWK(raw)
	if err != nil {
		return nil, err
	}
	if jwk.Alg != "" && jwk.Alg != a.name {
		return nil, &HeaderError{Member: "jwk", Reason: fmt.Sprintf("alg %q does not match the header alg %q", jwk.Alg, a.name)}
	}
	if _, err := verifyParsed(header, input, sig, pub); err != nil {
		return nil, err
	}

	claims, err := decodeObject(payload)
	if err != nil {
		return nil, fmt.Errorf("%w: payload: %v", ErrMalformedJWS, err)
	}
	out := &DPoPClaims{JWK: jwk, Thumbprint: jwk.thumbprint()}
	for _, f := range []struct {
		name     string
		dst      *string
		required bool
	}{
		{"jti", &out.JTI, true}, {"htm", &out.HTM, true}, {"htu", &out.HTU, true},
		{"ath", &out.ATH, false}, {"nonce", &out.Nonce, false},
	} {
		v, ok, err := stringMember(claims, f.name)
		if err != nil {
			return nil, &ClaimError{Claim: f.name, Reason: reason(err)}
		}
		if f.required && !ok {
			return nil, &ClaimError{Claim: f.name, Reason: "missing"}
		}
		if f.required && v == "" {
			return nil, &ClaimError{Claim: f.name, Reason: "empty"}
		}
		*f.dst = v
	}
	if out.IAT, err = numericDate(claims, "iat"); err != nil {
		return nil, err
	}
	if out.HTM != c.Method {
		return nil, &ClaimError{Claim: "htm", Reason: fmt.Sprintf("got %q, want %q", out.HTM, c.Method)}
	}
	if got, err := NormalizeHTU(out.HTU); err != nil {
		return nil, &ClaimError{Claim: "htu", Reason: reason(err), err: err}
	} else if got != wantHTU {
		return nil, &ClaimError{Claim: "htu", Reason: fmt.Sprintf("got %q, want %q", got, wantHTU)}
	}
	if err := checkAge("iat", out.IAT, c.Now, maxAge, c.Leeway); err != nil {
		return nil, err
	}
	if c.AccessToken != "" {
		if out.ATH == "" {
			return nil, &ClaimError{Claim: "ath", Reason: "missing, but the request carries an access token"}
		}
		if subtle.ConstantTimeCompare([]byte(out.ATH), []byte(ATH(c.AccessToken))) != 1 {
			return nil, &ClaimError{Claim: "ath", Reason: "does not match the access token"}
		}
	}
	if c.Nonce != "" {
		if out.Nonce == "" {
			return nil, &ClaimError{Claim: "nonce", Reason: "missing, but the server requires a nonce"}
		}
		if subtle.ConstantTimeCompare([]byte(out.Nonce), []byte(c.Nonce)) != 1 {
			return nil, &ClaimError{Claim: "nonce", Reason: "not the server's current nonce"}
		}
	}
	return out, nil
}

// checkToken checks an HTTP method is a non-empty token (RFC 9110 §5.6.2).
func checkToken(s string) error {
	if s == "" {
		return errors.New("is empty")
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0 {
			continue
		}
		return fmt.Errorf("%q has %q at %d; want token characters (RFC 9110 §5.6.2)", s, c, i)
	}
	return nil
}

// window applies a default maximum age and checks the durations.
func window(maxAge, leeway, def time.Duration) (time.Duration, error) {
	if maxAge < 0 || leeway < 0 {
		return 0, fmt.Errorf("MaxAge %s and Leeway %s: want neither negative", maxAge, leeway)
	}
	if maxAge == 0 {
		maxAge = def
	}
	return maxAge, nil
}

// numericDate reads a required NumericDate claim (RFC 7519 §2), seconds
// since the epoch; a fractional value is truncated towards the past.
func numericDate(claims map[string]json.RawMessage, name string) (int64, error) {
	raw, ok := claims[name]
	if !ok {
		return 0, &ClaimError{Claim: name, Reason: "missing"}
	}
	if len(raw) == 0 || (raw[0] != '-' && (raw[0] < '0' || raw[0] > '9')) {
		return 0, &ClaimError{Claim: name, Reason: "not a JSON number"}
	}
	if v, err := strconv.ParseInt(string(raw), 10, 64); err == nil {
		return v, nil
	}
	f, err := strconv.ParseFloat(string(raw), 64)
	// 2^53 seconds is far beyond any real date and exact in a float64.
	if err != nil || math.IsInf(f, 0) || math.Abs(f) > 1<<53 {
		return 0, &ClaimError{Claim: name, Reason: fmt.Sprintf("%s is not a usable NumericDate", raw)}
	}
	return int64(math.Floor(f)), nil
}

// checkAge checks that the time sec (a claim named name) is no later than
// now+leeway and no earlier than now-maxAge-leeway.
func checkAge(name string, sec int64, now time.Time, maxAge, leeway time.Duration) error {
	t := time.Unix(sec, 0)
	if ahead := t.Sub(now); ahead > leeway {
		return &ClaimError{Claim: name, Reason: fmt.Sprintf("%d is %s in the future (leeway %s)", sec, ahead, leeway)}
	}
	if age := now.Sub(t); age-leeway > maxAge {
		return &ClaimError{Claim: name, Reason: fmt.Sprintf("%d is %s old (max age %s, leeway %s)", sec, age, maxAge, leeway)}
	}
	return nil
}
