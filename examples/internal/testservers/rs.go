package testservers

import (
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"

	"github.com/keybroker/keybroker/pop"
)

// RS is the resource server: everything under /api/ on URL (plain TLS) and
// on MTLSURL (a listener that demands a client certificate). It accepts
// only access tokens from its AS, for its audience, presented the way their
// cnf says:
//
//   - cnf.jkt: "Authorization: DPoP <token>" and a DPoP proof (RFC 9449
//     §7) of that key, with ath, this RS's nonce, htm/htu of this request
//     and a jti not seen before;
//   - cnf.kid or cnf.jwk: "Authorization: PoP <SHR>" whose "at" is the
//     token, signed by that key, with m/u/p of this request and a fresh ts;
//   - cnf.x5t#S256: "Authorization: Bearer <token>" on a connection whose
//     client certificate has that thumbprint (RFC 8705 §3).
type RS struct {
	cfg         Config
	log         *slog.Logger
	verifier    *tokenVerifier
	plain, mtls *httptest.Server
	origin      string // the plain listener's; also the audience
	mtlsOrigin  string
	nonces      *nonceSource
	replay      replayCache
}

func newRS(cfg Config, issuer string, jwks pop.JWKS) (*RS, error) {
	v, err := newTokenVerifier(issuer, jwks)
	if err != nil {
		return nil, err
	}
	s := &RS{cfg: cfg, log: cfg.logger().With("server", "RS"), verifier: v, nonces: newNonceSource(nonceRotation)}
	s.plain, s.origin = newTLSServer(s.handler, false, s.log)
	s.mtls, s.mtlsOrigin = newTLSServer(s.handler, true, s.log)
	s.plain.StartTLS()
	s.mtls.StartTLS()
	return s, nil
}

func (s *RS) close() {
	s.plain.Close()
	s.mtls.Close()
}

// URL is the plain TLS listener's URL.
func (s *RS) URL() string { return s.origin }

// MTLSURL is the mutual TLS listener's URL.
func (s *RS) MTLSURL() string { return s.mtlsOrigin }

// Audience is the "aud" this RS requires in access tokens.
func (s *RS) Audience() string { return s.origin }

// Scheme names, as RFC 9449 §7.1, MSAL and RFC 6750 spell them.
const (
	schemeDPoP   = "DPoP"
	schemePoP    = "PoP"
	schemeBearer = "Bearer"
)

// rsError is a refusal: a WWW-Authenticate challenge (RFC 6750 §3, RFC
// 9449 §7.1).
type rsError struct {
	scheme      string // "" challenges with every scheme
	code        string // invalid_request, invalid_token, invalid_dpop_proof, use_dpop_nonce
	description string
	dpopNonce   string // with use_dpop_nonce
}

func (e *rsError) Error() string { return e.code + ": " + e.description }

func refuse(scheme, code, format string, args ...any) *rsError {
	return &rsError{scheme: scheme, code: code, description: fmt.Sprintf(format, args...)}
}

// grant is what an accepted request may do.
type grant struct {
	claims  *Claims
	binding string
}

func (s *RS) handler(origin string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		now := s.cfg.now()
		body, err := readBody(w, r)
		if err != nil {
			http.Error(w, "request body too large", http.StatusRequestEntityTooLarge)
			return
		}
		g, e := s.authorize(r, origin, body, now)
		if e != nil {
			s.log.Info("request refused", "method", r.Method, "path", r.URL.Path, "error", e.code, "reason", e.description)
			writeChallenge(w, e)
			return
		}
		s.log.Info("request allowed", "method", r.Method, "path", r.URL.Path, "client_id", g.claims.ClientID, "binding", g.binding, "cnf", g.claims.Cnf.String())
		writeJSON(w, http.StatusOK, map[string]any{
			"message":   "hello, " + g.claims.ClientID,
			"client_id": g.claims.ClientID,
			"binding":   g.binding,
		})
	})
	return mux
}

func (s *RS) authorize(r *http.Request, origin string, body []byte, now time.Time) (*grant, *rsError) {
	authz := r.Header.Values("Authorization")
	switch len(authz) {
	case 0:
		return nil, &rsError{description: "no access token"}
	case 1:
	default:
		return nil, refuse("", "invalid_request", "got %d Authorization headers, want 1", len(authz))
	}
	scheme, cred, _ := strings.Cut(authz[0], " ")
	cred = strings.TrimSpace(cred)
	if cred == "" {
		return nil, refuse("", "invalid_request", "empty credentials")
	}
	switch {
	case strings.EqualFold(scheme, schemeDPoP):
		return s.dpop(r, origin, cred, now)
	case strings.EqualFold(scheme, schemePoP):
		return s.shr(r, origin, cred, body, now)
	case strings.EqualFold(scheme, schemeBearer):
		return s.bearer(r, cred, now)
	default:
		return nil, refuse("", "invalid_request", "authorization scheme %q: want DPoP, PoP or Bearer", scheme)
	}
}

// dpop checks a DPoP-bound token and its proof (RFC 9449 §7.1, §4.3).
func (s *RS) dpop(r *http.Request, origin, token string, now time.Time) (*grant, *rsError) {
	proofs := r.Header.Values("DPoP")
	if len(proofs) != 1 {
		return nil, refuse(schemeDPoP, "invalid_dpop_proof", "got %d DPoP headers, want 1", len(proofs))
	}
	pc, nonceOnly, err := s.nonces.verifyDPoP(proofs[0], pop.DPoPCheck{
		Method: r.Method, URL: origin + r.URL.RequestURI(), AccessToken: token,
		Now: now, MaxAge: proofMaxAge, Leeway: clockLeeway,
	})
	if nonceOnly {
		e := refuse(schemeDPoP, "use_dpop_nonce", "Resource server requires nonce in DPoP proof")
		e.dpopNonce = s.nonces.at(now)
		return nil, e
	}
	if err != nil {
		return nil, refuse(schemeDPoP, "invalid_dpop_proof", "%v", err)
	}
	if !s.replay.add(pc.Thumbprint+":"+pc.JTI, time.Unix(pc.IAT, 0).Add(proofMaxAge+clockLeeway), now) {
		return nil, refuse(schemeDPoP, "invalid_dpop_proof", "jti %q was already used: replayed proof", pc.JTI)
	}
	c, err := s.verifier.verify(token, s.Audience(), now)
	if err != nil {
		return nil, refuse(schemeDPoP, "invalid_token", "%v", err)
	}
	if c.Cnf.JKT == "" {
		return nil, refuse(schemeDPoP, "invalid_token", "the token is not DPoP-bound (no cnf.jkt)")
	}
	if !equal(c.Cnf.JKT, pc.Thumbprint) {
		return nil, refuse(schemeDPoP, "invalid_token", "the token is bound to key %s (cnf.jkt), the proof is signed by key %s", c.Cnf.JKT, pc.Thumbprint)
	}
	return &grant{claims: c, binding: "dpop"}, nil
}

// shr checks a Signed HTTP Request and the PoP token inside it.
func (s *RS) shr(r *http.Request, origin, shr string, body []byte, now time.Time) (*grant, *rsError) {
	sc, err := pop.VerifySignedHTTPRequest(shr, pop.SHRCheck{
		Method: r.Method, URL: origin + r.URL.RequestURI(), Now: now, Leeway: clockLeeway,
		Headers: r.Header, Body: body,
	})
	if err != nil {
		return nil, refuse(schemePoP, "invalid_token", "signed HTTP request: %v", err)
	}
	c, err := s.verifier.verify(sc.AccessToken, s.Audience(), now)
	if err != nil {
		return nil, refuse(schemePoP, "invalid_token", "%v", err)
	}
	var want string
	switch {
	case c.Cnf.Kid != "":
		want = c.Cnf.Kid
	case c.Cnf.JWK != nil:
		if want, err = c.Cnf.JWK.Thumbprint(); err != nil {
			return nil, refuse(schemePoP, "invalid_token", "token cnf.jwk: %v", err)
		}
	default:
		return nil, refuse(schemePoP, "invalid_token", "the token is not PoP-bound (no cnf.kid or cnf.jwk)")
	}
	if !equal(want, sc.Thumbprint) {
		return nil, refuse(schemePoP, "invalid_token", "the token is bound to key %s (cnf), the SHR is signed by key %s", want, sc.Thumbprint)
	}
	return &grant{claims: c, binding: "pop"}, nil
}

// bearer checks a certificate-bound token (RFC 8705 §3). A token bound to
// a key is refused here: presenting it as Bearer would drop the proof.
func (s *RS) bearer(r *http.Request, token string, now time.Time) (*grant, *rsError) {
	c, err := s.verifier.verify(token, s.Audience(), now)
	if err != nil {
		return nil, refuse(schemeBearer, "invalid_token", "%v", err)
	}
	if c.Cnf.X5TS256 == "" {
		return nil, refuse(schemeBearer, "invalid_token", "the token is bound to a key, not a certificate: present it with DPoP or PoP")
	}
	peer := peerCertificate(r)
	if peer == nil {
		return nil, refuse(schemeBearer, "invalid_token", "the token is certificate-bound and this connection has no client certificate (use %s)", s.mtlsOrigin)
	}
	if got := pop.X5TS256(peer.Raw); !equal(c.Cnf.X5TS256, got) {
		return nil, refuse(schemeBearer, "invalid_token", "the token is bound to certificate x5t#S256 %s, the connection's certificate is %s", c.Cnf.X5TS256, got)
	}
	return &grant{claims: c, binding: "mtls"}, nil
}

// writeChallenge answers 401 (400 for invalid_request) with
// WWW-Authenticate.
func writeChallenge(w http.ResponseWriter, e *rsError) {
	schemes := []string{e.scheme}
	if e.scheme == "" {
		schemes = []string{schemeDPoP, schemePoP, schemeBearer}
	}
	for _, sc := range schemes {
		var params []string
		if e.code != "" { // RFC 6750 §3.1: no error code when no credentials came
			params = append(params, fmt.Sprintf("error=%q", e.code), fmt.Sprintf("error_description=%q", quotable(e.description)))
		}
		if sc == schemeDPoP {
			params = append(params, `algs="ES256 ES384 RS256 PS256"`)
		}
		w.Header().Add("WWW-Authenticate", strings.TrimSpace(sc+" "+strings.Join(params, ", ")))
	}
	if e.dpopNonce != "" {
		w.Header().Set("DPoP-Nonce", e.dpopNonce)
	}
	w.Header().Set("Cache-Control", "no-store")
	status := http.StatusUnauthorized
	if e.code == "invalid_request" {
		status = http.StatusBadRequest
	}
	writeJSON(w, status, map[string]string{"error": e.code, "error_description": e.description})
}

// quotable makes s fit an RFC 6750 §3 quoted error_description: printable
// ASCII without '"' or '\'.
func quotable(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r == '"':
			return '\''
		case r == '\\':
			return '/'
		case r < 0x20 || r > 0x7e:
			return '?'
		}
		return r
	}, s)
}
