package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/keybroker/keybroker/pop"
)

// DPoPTransport is an http.RoundTripper that sends each request with a
// fresh RFC 9449 DPoP proof made by Signer (a keybroker key, via
// Signer.JOSE). With an access token it also sends "Authorization: DPoP
// <token>" and binds the proof to it ("ath"). When a server asks for a
// nonce — a 400 {"error":"use_dpop_nonce"} from an authorization server or a
// 401 whose WWW-Authenticate has a DPoP challenge with error="use_dpop_nonce"
// (possibly among other challenges), with a DPoP-Nonce header — it retries
// once with that nonce, and it keeps the newest nonce of each origin for the
// next requests.
//
// Redirects: a request that http.Client makes to follow a redirect (one
// whose Response field is set) gets the token and a proof only if its origin
// — scheme, host and port — is the origin of the request that started the
// chain. A redirect to another host or port, or from https to http, is sent
// as http.Client made it, with no Authorization header, no DPoP proof and no
// call to Token, so neither the access token nor a proof of the key reaches
// the redirect target. Requests not made by http.Client's redirect handling
// are always sent with DPoP.
type DPoPTransport struct {
	Signer pop.Signer
	// Token returns the access token to send; nil sends none (token
	// requests to an authorization server).
	Token func(ctx context.Context) (string, error)
	// Base does the HTTP; nil means http.DefaultTransport.
	Base http.RoundTripper

	mu     sync.Mutex
	nonces map[string]string // by origin
}

// origin returns u's origin, scheme://host:port, lower-cased and with the
// scheme's default port made explicit, so that equal origins compare equal.
func origin(u *url.URL) string {
	scheme := strings.ToLower(u.Scheme)
	port := u.Port()
	if port == "" {
		switch scheme {
		case "https":
			port = "443"
		case "http":
			port = "80"
		}
	}
	return scheme + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port)
}

// sameOriginAsFirst reports whether req goes to the origin of the first
// request of its redirect chain. net/http sets Request.Response on the
// requests it makes to follow a redirect, and that response's Request is
// the one redirected; a request without Response starts a chain.
func sameOriginAsFirst(req *http.Request) bool {
	first := req
	for i := 0; first.Response != nil; i++ {
		prev := first.Response.Request
		if prev == nil || prev.URL == nil || i > 100 {
			return false // cannot tell where the chain started: be safe
		}
		first = prev
	}
	return first == req || origin(first.URL) == origin(req.URL)
}

func (t *DPoPTransport) nonce(o string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nonces[o]
}

func (t *DPoPTransport) remember(o, n string) {
	if n == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nonces == nil {
		t.nonces = map[string]string{}
	}
	t.nonces[o] = n
}

// RoundTrip implements http.RoundTripper. The request is not modified; its
// body is closed on every path, errors included.
func (t *DPoPTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	if req.URL == nil {
		closeBody(req.Body)
		return nil, errors.New("dpop: request has no URL")
	}
	if !sameOriginAsFirst(req) {
		return base.RoundTrip(req)
	}
	token := ""
	if t.Token != nil {
		var err error
		if token, err = t.Token(req.Context()); err != nil {
			closeBody(req.Body)
			return nil, fmt.Errorf("dpop: access token: %w", err)
		}
	}
	method := req.Method
	if method == "" {
		method = http.MethodGet // as net/http sends it
	}
	o := origin(req.URL)
	send := func(r *http.Request) (*http.Response, error) {
		proof, err := pop.NewDPoPProof(r.Context(), t.Signer, pop.DPoPParams{
			Method: method, URL: r.URL.String(), AccessToken: token, Nonce: t.nonce(o), Now: time.Now(),
		})
		if err != nil {
			closeBody(r.Body)
			return nil, fmt.Errorf("dpop: proof: %w", err)
		}
		r.Header.Set("DPoP", proof)
		if token != "" {
			r.Header.Set("Authorization", "DPoP "+token)
		}
		resp, err := base.RoundTrip(r)
		if err != nil {
			return nil, err
		}
		t.remember(o, resp.Header.Get("DPoP-Nonce"))
		return resp, nil
	}
	resp, err := send(cloneRequest(req, req.Body))
	if err != nil {
		return nil, err
	}
	if resp.Header.Get("DPoP-Nonce") == "" || !wantsNonce(resp) {
		return resp, nil
	}
	// One retry with the new nonce, if the body can be sent again.
	var body io.ReadCloser
	if req.Body != nil && req.Body != http.NoBody {
		if req.GetBody == nil {
			return resp, nil
		}
		if body, err = req.GetBody(); err != nil {
			return resp, nil
		}
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	return send(cloneRequest(req, body))
}

func closeBody(b io.ReadCloser) {
	if b != nil {
		b.Close()
	}
}

func cloneRequest(r *http.Request, body io.ReadCloser) *http.Request {
	c := r.Clone(r.Context())
	c.Body = body
	if body == nil && r.Body != nil {
		c.Body = r.Body
	}
	return c
}

// wantsNonce reports whether resp asks for a DPoP nonce (RFC 9449 §8, §9).
// A 400's JSON body is read and put back.
func wantsNonce(resp *http.Response) bool {
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		for _, v := range resp.Header.Values("WWW-Authenticate") {
			if dpopNonceChallenge(v) {
				return true
			}
		}
	case http.StatusBadRequest:
		b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(b))
		var e struct {
			Error string `json:"error"`
		}
		return err == nil && json.Unmarshal(b, &e) == nil && e.Error == "use_dpop_nonce"
	}
	return false
}

// dpopNonceChallenge reports whether a WWW-Authenticate value holds a DPoP
// challenge (scheme matched case-insensitively) with the auth-param
// error=use_dpop_nonce, the value a token or a quoted-string. The value may
// list several challenges (RFC 9110 §11.6.1), such as
// `Bearer realm="rs", DPoP error="use_dpop_nonce"`. It is a lenient parser:
// an element it does not understand is skipped up to the next comma.
func dpopNonceChallenge(v string) bool {
	scheme := ""
	for i := 0; i < len(v); {
		i = skipOWS(v, i)
		if i >= len(v) {
			break
		}
		if v[i] == ',' {
			i++
			continue
		}
		name, j := readToken(v, i)
		if name == "" {
			i = skipElement(v, i)
			continue
		}
		k := skipOWS(v, j)
		if k < len(v) && v[k] == '=' { // auth-param of the current challenge
			val, ok, end := readParamValue(v, skipOWS(v, k+1))
			if ok && strings.EqualFold(scheme, "DPoP") && strings.EqualFold(name, "error") && val == "use_dpop_nonce" {
				return true
			}
			i = skipElement(v, end)
			continue
		}
		scheme, i = name, k // a new challenge; its first param follows
	}
	return false
}

func skipOWS(s string, i int) int {
	for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
		i++
	}
	return i
}

// isTchar reports whether c is a token character (RFC 9110 §5.6.2).
func isTchar(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

func readToken(s string, i int) (string, int) {
	j := i
	for j < len(s) && isTchar(s[j]) {
		j++
	}
	return s[i:j], j
}

// readParamValue reads a token or a quoted-string at s[i:].
func readParamValue(s string, i int) (val string, ok bool, end int) {
	if i < len(s) && s[i] == '"' {
		var b strings.Builder
		for j := i + 1; j < len(s); j++ {
			switch c := s[j]; c {
			case '"':
				return b.String(), true, j + 1
			case '\\':
				if j+1 < len(s) {
					j++
					b.WriteByte(s[j])
				}
			default:
				b.WriteByte(c)
			}
		}
		return "", false, len(s) // unterminated
	}
	tok, j := readToken(s, i)
	return tok, tok != "", j
}

// skipElement returns the index of the next comma at or after i that is not
// inside a quoted-string, or len(s).
func skipElement(s string, i int) int {
	for quoted := false; i < len(s); i++ {
		switch s[i] {
		case '"':
			quoted = !quoted
		case '\\':
			if quoted {
				i++
			}
		case ',':
			if !quoted {
				return i
			}
		}
	}
	return len(s)
}

// ReqCnf returns both req_cnf forms for the signer's key: MSAuth 1.0 AT-POP
// (the public JWK) and MSAL SHR PoP ({"kid": thumbprint}, marked as
// hardware-held).
func (s *Signer) ReqCnf() (jwkForm, kidForm string, err error) {
	jwkForm, err = pop.ReqCnfJWK(s.jwk)
	if err != nil {
		return "", "", err
	}
	return jwkForm, pop.ReqCnfKid(s.kid, pop.KSLHardware), nil
}

// PoPAuthorization returns the "Authorization: PoP <SHR>" header value that
// presents accessToken, bound to this key, on req (method, URL; nonce from
// the server's last WWW-Authenticate or Authentication-Info, if any).
func (s *Signer) PoPAuthorization(ctx context.Context, accessToken string, req *http.Request, nonce string) (string, error) {
	if req == nil || req.URL == nil {
		return "", errors.New("client: PoPAuthorization needs a request")
	}
	method := req.Method
	if method == "" {
		method = http.MethodGet // as net/http sends it
	}
	shr, err := pop.NewSignedHTTPRequest(ctx, s.JOSE(), pop.SHRParams{
		AccessToken: accessToken, Method: method, URL: req.URL.String(), Nonce: nonce, Now: time.Now(),
	})
	if err != nil {
		return "", err
	}
	return pop.PoPAuthorization(shr), nil
}
