package pop

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"
)

// Signed HTTP Request (MSAL PoP, draft-ietf-oauth-signed-http-request-03)
// JWT type, and the default window for its "ts": 5 minutes, as
// Microsoft.IdentityModel's validator.
const (
	shrTyp           = "pop"
	defaultSHRMaxAge = 5 * time.Minute
)

// SHRList is the value of the SHR "q" and "h" claims
// (draft-ietf-oauth-signed-http-request-03 §3.1, §3.2): the names covered,
// in order, and base64url(SHA-256) of their "name=value" or "name: value"
// lines. It encodes as the JSON array [[names…],hash].
type SHRList struct {
	Names []string
	Hash  string
}

// MarshalJSON encodes l as [[names…],hash].
func (l SHRList) MarshalJSON() ([]byte, error) {
	names := l.Names
	if names == nil {
		names = []string{}
	}
	return marshalJSON([]any{names, l.Hash})
}

// UnmarshalJSON decodes [[names…],hash], requiring exactly that shape.
func (l *SHRList) UnmarshalJSON(b []byte) error {
	var parts []json.RawMessage
	if err := json.Unmarshal(b, &parts); err != nil || parts == nil {
		return errors.New("pop: SHR list: want [[names...],hash]")
	}
	if len(parts) != 2 {
		return fmt.Errorf("pop: SHR list: got %d elements, want 2", len(parts))
	}
	var names []string
	if !bytes.HasPrefix(parts[0], []byte("[")) || json.Unmarshal(parts[0], &names) != nil {
		return errors.New("pop: SHR list: first element is not an array of strings")
	}
	if names == nil {
		names = []string{}
	}
	var hash string
	if !bytes.HasPrefix(parts[1], []byte(`"`)) || json.Unmarshal(parts[1], &hash) != nil {
		return errors.New("pop: SHR list: second element is not a string")
	}
	l.Names, l.Hash = names, hash
	return nil
}

// hashString is base64url(SHA-256(s)), no padding.
func hashString(s string) string {
	sum := sha256.Sum256([]byte(s))
	return b64.EncodeToString(sum[:])
}

// SHRQuery returns the "q" claim covering the query parameters names, in
// that order, of rawQuery (a URL's query without "?", as url.URL.RawQuery):
// the hash is over "n1=v1&n2=v2…". Names and values are taken as they appear
// in rawQuery, not decoded, as Microsoft.IdentityModel's verifier does. Each
// name must appear in rawQuery exactly once (the draft's §7.5 forbids
// covering a repeated parameter) with a non-empty value and no second "=".
func SHRQuery(names []string, rawQuery string) (SHRList, error) {
	type param struct {
		value string
		count int
		ok    bool
	}
	params := map[string]*param{}
	for _, pair := range strings.Split(rawQuery, "&") {
		if pair == "" {
			continue
		}
		name, value, eq := strings.Cut(pair, "=")
		p := params[name]
		if p == nil {
			p = &param{}
			params[name] = p
		}
		p.count++
		p.value, p.ok = value, eq && value != "" && !strings.Contains(value, "=")
	}
	var buf strings.Builder
	seen := map[string]bool{}
	for i, name := range names {
		p := params[name]
		switch {
		case name == "":
			return SHRList{}, &ClaimError{Claim: "q", Reason: "empty parameter name"}
		case seen[name]:
			return SHRList{}, &ClaimError{Claim: "q", Reason: fmt.Sprintf("parameter %q listed twice", name)}
		case p == nil:
			return SHRList{}, &ClaimError{Claim: "q", Reason: fmt.Sprintf("parameter %q is not in the query", name)}
		case p.count > 1:
			return SHRList{}, &ClaimError{Claim: "q", Reason: fmt.Sprintf("parameter %q appears %d times; a repeated parameter cannot be covered", name, p.count)}
		case !p.ok:
			return SHRList{}, &ClaimError{Claim: "q", Reason: fmt.Sprintf("parameter %q is not name=value with a non-empty value", name)}
		}
		seen[name] = true
		if i > 0 {
			buf.WriteByte('&')
		}
		buf.WriteString(name + "=" + p.value)
	}
	return SHRList{Names: append([]string{}, names...), Hash: hashString(buf.String())}, nil
}

// SHRHeaders returns the "h" claim covering the header fields names, in
// that order: the names lower-cased, and the hash over "n1: v1\nn2: v2…"
// with lower-case names and values as they are in h. Each field must be in h
// exactly once (matched case-insensitively; the draft's §7.5 forbids
// covering a repeated one), with no CR or LF, and not be Authorization,
// which carries the SHR itself (§4.1).
func SHRHeaders(names []string, h http.Header) (SHRList, error) {
	lower := make([]string, 0, len(names))
	var buf strings.Builder
	seen := map[string]bool{}
	for i, name := range names {
		ln := strings.ToLower(name)
		if err := checkToken(ln); err != nil {
			return SHRList{}, &ClaimError{Claim: "h", Reason: "header name " + err.Error()}
		}
		if seen[ln] {
			return SHRList{}, &ClaimError{Claim: "h", Reason: fmt.Sprintf("header %q listed twice", ln)}
		}
		seen[ln] = true
		if ln == "authorization" {
			return SHRList{}, &ClaimError{Claim: "h", Reason: "the Authorization header carries the SHR and cannot be covered"}
		}
		var values []string
		for k, vs := range h {
			if strings.EqualFold(k, ln) {
				values = append(values, vs...)
			}
		}
		switch {
		case len(values) == 0:
			return SHRList{}, &ClaimError{Claim: "h", Reason: fmt.Sprintf("header %q is not in the request", ln)}
		case len(values) > 1:
			return SHRList{}, &ClaimError{Claim: "h", Reason: fmt.Sprintf("header %q has %d values; a repeated header cannot be covered", ln, len(values))}
		case strings.ContainsAny(values[0], "\r\n"):
			return SHRList{}, &ClaimError{Claim: "h", Reason: fmt.Sprintf("header %q value has CR or LF", ln)}
		}
		if i > 0 {
			buf.WriteByte('\n')
		}
		buf.WriteString(ln + ": " + values[0])
		lower = append(lower, ln)
	}
	return SHRList{Names: lower, Hash: hashString(buf.String())}, nil
}

// SHRParams describe the request a Signed HTTP Request is for.
type SHRParams struct {
	AccessToken string // "at"; required
	Method      string // "m", upper-cased; a non-empty token
	// URL is the request URL: "u" is its host (":port" only when not the
	// scheme's default) and "p" its path (escaped form, "/" if empty).
	URL   string
	Nonce string // "nonce" from the server's nextnonce, sent if set
	// Now is the time of the request; "ts" is Now in whole seconds. It must
	// not be zero.
	Now time.Time
	// Headers and SignedHeaders: when SignedHeaders is not empty, "h" covers
	// those fields of Headers, in order (see SHRHeaders).
	Headers       http.Header
	SignedHeaders []string
	// Body and HashBody: when HashBody is set, "b" is base64url(SHA-256(Body)).
	Body     []byte
	HashBody bool
	// QueryParams: when not empty, "q" covers those parameters of URL's
	// query, in order (see SHRQuery). Empty means no "q": the query is then
	// not signed, as in MSAL's own SHRs.
	QueryParams []string
}

// NewSignedHTTPRequest returns a Signed HTTP Request (MSAL PoP) signed by s:
// header {"alg":s.Alg(),"kid":<RFC 7638 thumbprint of s.JWK()>,"typ":"pop"}
// and claims at, ts, m, u, p, q, h and b as asked for, nonce when set, and
// cnf {"jwk":<kty and key members of s.JWK()>}. Present it with
// PoPAuthorization. Bad parameters are reported as a *ClaimError before
// anything is signed.
func NewSignedHTTPRequest(ctx context.Context, s Signer, p SHRParams) (string, error) {
	sk, err := inspectSigner(s)
	if err != nil {
		return "", err
	}
	if p.AccessToken == "" {
		return "", &ClaimError{Claim: "at", Reason: "SHRParams.AccessToken is empty"}
	}
	if err := checkToken(p.Method); err != nil {
		return "", &ClaimError{Claim: "m", Reason: "method " + err.Error()}
	}
	u, err := parseRequestURL(p.URL)
	if err != nil {
		return "", &ClaimError{Claim: "u", Reason: reason(err), err: err}
	}
	if p.Now.IsZero() {
		return "", &ClaimError{Claim: "ts", Reason: "SHRParams.Now is zero"}
	}
	claims := map[string]any{
		"at":  p.AccessToken,
		"ts":  p.Now.Unix(),
		"m":   strings.ToUpper(p.Method),
		"u":   u.host,
		"p":   u.path,
		"cnf": map[string]any{"jwk": sk.jwk},
	}
	if len(p.QueryParams) > 0 {
		q, err := SHRQuery(p.QueryParams, u.rawQuery)
		if err != nil {
			return "", err
		}
		claims["q"] = q
	}
	if len(p.SignedHeaders) > 0 {
		h, err := SHRHeaders(p.SignedHeaders, p.Headers)
		if err != nil {
			return "", err
		}
		claims["h"] = h
	}
	if p.HashBody {
		claims["b"] = hashString(string(p.Body))
	}
	if p.Nonce != "" {
		claims["nonce"] = p.Nonce
	}
	payload, err := marshalJSON(claims)
	if err != nil {
		return "", fmt.Errorf("pop: SHR claims: %w", err)
	}
	hdr := map[string]any{"kid": sk.jwk.thumbprint(), "typ": shrTyp}
	return signCompact(ctx, s, sk, hdr, payload)
}

// SHRClaims are the checked contents of a Signed HTTP Request.
type SHRClaims struct {
	AccessToken string   // "at": validate it, then check its cnf names Thumbprint
	TS          int64    // "ts"
	Method      string   // "m"
	Host        string   // "u"
	Path        string   // "p"
	Query       *SHRList // "q", nil if absent
	Headers     *SHRList // "h", nil if absent
	BodyHash    string   // "b", empty if absent
	Nonce       string   // "nonce"
	JWK         JWK      // "cnf"."jwk", as sent (public members only)
	// Thumbprint is JWK's RFC 7638 thumbprint, equal to the header's kid.
	// The resource server must check it equals the kid in the access
	// token's cnf.
	Thumbprint string
}

// SHRCheck is what a resource server knows about the request an SHR came
// with.
type SHRCheck struct {
	// AccessToken, when set, must equal "at". When empty, "at" is only
	// returned, for the caller to validate.
	AccessToken string
	Method      string // "m" must equal it upper-cased
	// URL is the request URL: "u" must be its host (with or without the
	// port), "p" its path, and a "q" must match its query.
	URL string
	// Now is the server's time; it must not be zero.
	Now time.Time
	// MaxAge is how old "ts" may be; 0 means 5 minutes.
	MaxAge time.Duration
	// Leeway is the clock skew allowed either side of the window.
	Leeway time.Duration
	// Nonce, when set, must equal the "nonce" claim (required then).
	Nonce string
	// Headers, when not nil, are the request's headers: an "h" must match.
	Headers http.Header
	// Body, when not nil, is the request body: a "b" must match.
	Body []byte
}

// VerifySignedHTTPRequest checks a Signed HTTP Request: typ "pop", an
// asymmetric supported alg (see VerifyJWS), a "cnf"."jwk" with no private
// members whose thumbprint is the header's kid and under which the
// signature verifies, "at" (see SHRCheck.AccessToken), "m", "u", "p", "ts"
// within MaxAge (and Leeway) of Now, "q" when present, "h" and "b" when
// present and given in c, and "nonce" when c.Nonce is set. Header problems
// are a *HeaderError and claim problems a *ClaimError.
func VerifySignedHTTPRequest(shr string, c SHRCheck) (*SHRClaims, error) {
	if c.Now.IsZero() {
		return nil, errors.New("pop: SHRCheck.Now is zero")
	}
	if err := checkToken(c.Method); err != nil {
		return nil, fmt.Errorf("pop: SHRCheck.Method %s", err)
	}
	want, err := parseRequestURL(c.URL)
	if err != nil {
		return nil, fmt.Errorf("pop: SHRCheck.URL: %w", err)
	}
	maxAge, err := window(c.MaxAge, c.Leeway, defaultSHRMaxAge)
	if err != nil {
		return nil, fmt.Errorf("pop: SHRCheck: %w", err)
	}

	header, payload, input, sig, err := ParseJWS(shr)
	if err != nil {
		return nil, err
	}
	if err := requireTyp(header, shrTyp); err != nil {
		return nil, err
	}
	claims, err := decodeObject(payload)
	if err != nil {
		return nil, fmt.Errorf("%w: payload: %v", ErrMalformedJWS, err)
	}
	cnfRaw, ok := claims["cnf"]
	if !ok {
		return nil, &ClaimError{Claim: "cnf", Reason: "missing"}
	}
	cnf, err := decodeObject(cnfRaw)
	if err != nil {
		return nil, &ClaimError{Claim: "cnf", Reason: reason(err)}
	}
	jwkRaw, ok := cnf["jwk"]
	if !ok {
		return nil, &ClaimError{Claim: "cnf", Reason: `no "jwk"`}
	}
	jwk, pub, err := publicJWK(jwkRaw)
	if err != nil {
		var he *HeaderError
		if errors.As(err, &he) { // report it as the claim it is here
			return nil, &ClaimError{Claim: "cnf", Reason: "jwk: " + he.Reason, err: he.err}
		}
		return nil, err
	}
	tp := jwk.thumbprint()
	if kid, _, err := stringMember(header, "kid"); err != nil {
		return nil, &HeaderError{Member: "kid", Reason: reason(err)}
	} else if kid != tp {
		return nil, &HeaderError{Member: "kid", Reason: fmt.Sprintf("got %q, want the cnf.jwk thumbprint %q", kid, tp)}
	}
	a, err := verifyParsed(header, input, sig, pub)
	if err != nil {
		return nil, err
	}
	if jwk.Alg != "" && jwk.Alg != a.name {
		return nil, &ClaimError{Claim: "cnf", Reason: fmt.Sprintf("jwk alg %q does not match the header alg %q", jwk.Alg, a.name)}
	}

	out := &SHRClaims{JWK: jwk, Thumbprint: tp}
	for _, f := range []struct {
		name     string
		dst      *string
		required bool
	}{
		{"at", &out.AccessToken, true}, {"m", &out.Method, true}, {"u", &out.Host, true},
		{"p", &out.Path, true}, {"b", &out.BodyHash, false}, {"nonce", &out.Nonce, false},
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
	if out.TS, err = numericDate(claims, "ts"); err != nil {
		return nil, err
	}
	for _, f := range []struct {
		name string
		dst  **SHRList
	}{{"q", &out.Query}, {"h", &out.Headers}} {
		raw, ok := claims[f.name]
		if !ok {
			continue
		}
		var l SHRList
		if err := json.Unmarshal(raw, &l); err != nil {
			return nil, &ClaimError{Claim: f.name, Reason: reason(err)}
		}
		*f.dst = &l
	}

	if c.AccessToken != "" && subtle.ConstantTimeCompare([]byte(out.AccessToken), []byte(c.AccessToken)) != 1 {
		return nil, &ClaimError{Claim: "at", Reason: "not the access token the request was checked for"}
	}
	if wantM := strings.ToUpper(c.Method); out.Method != wantM {
		return nil, &ClaimError{Claim: "m", Reason: fmt.Sprintf("got %q, want %q", out.Method, wantM)}
	}
	if !strings.EqualFold(out.Host, want.host) && !strings.EqualFold(out.Host, want.hostname+":"+want.port) {
		return nil, &ClaimError{Claim: "u", Reason: fmt.Sprintf("got %q, want %q", out.Host, want.host)}
	}
	if out.Path != want.path {
		return nil, &ClaimError{Claim: "p", Reason: fmt.Sprintf("got %q, want %q", out.Path, want.path)}
	}
	if err := checkAge("ts", out.TS, c.Now, maxAge, c.Leeway); err != nil {
		return nil, err
	}
	if out.Query != nil {
		got, err := SHRQuery(out.Query.Names, want.rawQuery)
		if err != nil {
			return nil, err
		}
		if got.Hash != out.Query.Hash {
			return nil, &ClaimError{Claim: "q", Reason: "does not match the request's query"}
		}
	}
	if out.Headers != nil && c.Headers != nil {
		got, err := SHRHeaders(out.Headers.Names, c.Headers)
		if err != nil {
			return nil, err
		}
		if !slices.Equal(got.Names, out.Headers.Names) || got.Hash != out.Headers.Hash {
			return nil, &ClaimError{Claim: "h", Reason: "does not match the request's headers"}
		}
	}
	if _, ok := claims["b"]; ok && c.Body != nil && out.BodyHash != hashString(string(c.Body)) {
		return nil, &ClaimError{Claim: "b", Reason: "does not match the request body"}
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
