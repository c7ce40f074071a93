package testservers

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"mime"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/keybroker/keybroker/pop"
)

// Token request parameter values this AS understands.
const (
	GrantClientCredentials = "client_credentials"
	// ClientAssertionJWTBearer is private_key_jwt client authentication
	// (RFC 7523 §2.2): a JWT signed by a key registered for the client.
	ClientAssertionJWTBearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
	// ClientAssertionJWTPoP is the second leg of the mTLS token exchange:
	// the client assertion is an access token this AS issued to the client
	// for itself, bound to the certificate of the connection it arrives on.
	ClientAssertionJWTPoP = "urn:ietf:params:oauth:client-assertion-type:jwt-pop"
	// TokenTypePoP asks for a token bound to the key in req_cnf (MSAL SHR
	// PoP, MSAuth 1.0 AT-POP).
	TokenTypePoP = "pop"
)

// Client is a registered client (RFC 7591 metadata, reduced to what this AS
// uses). A client authenticates with private_key_jwt when it has JWKS, and
// with self_signed_tls_client_auth when it has X5TS256.
type Client struct {
	ID string
	// JWKS are the public keys of its private_key_jwt client assertions.
	JWKS []pop.JWK
	// X5TS256 are the x5t#S256 of its self-signed client certificates
	// (RFC 8705 §2.2).
	X5TS256 []string
}

// AS is the authorization server. Its token endpoint is TokenURL on a plain
// TLS listener and MTLSTokenURL on a listener that demands a client
// certificate (RFC 8705 §5 mtls_endpoint_aliases). It grants
// client_credentials only, and only sender-constrained tokens:
//
//   - with a DPoP header (RFC 9449 §5): after a nonce challenge, a token
//     with cnf.jkt, token_type "DPoP";
//   - with token_type=pop and req_cnf: cnf.kid (req_cnf {"kid": …}) or
//     cnf.jwk (req_cnf a JWK), token_type "pop";
//   - otherwise over mutual TLS: cnf.x5t#S256 of the client certificate,
//     token_type "Bearer" (RFC 8705 §3).
type AS struct {
	cfg         Config
	log         *slog.Logger
	signer      pop.Signer
	verifier    *tokenVerifier // of its own tokens, for jwt-pop assertions
	plain, mtls *httptest.Server
	issuer      string // the plain listener's origin
	mtlsOrigin  string
	nonces      *nonceSource
	replay      replayCache

	mu              sync.Mutex
	clients         map[string]Client
	resources       map[string]bool
	defaultResource string
}

func newAS(cfg Config) (*AS, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	signer, err := pop.NewSoftwareSigner(key, pop.AlgES256)
	if err != nil {
		return nil, err
	}
	a := &AS{
		cfg:       cfg,
		log:       cfg.logger().With("server", "AS"),
		signer:    signer,
		nonces:    newNonceSource(nonceRotation),
		clients:   map[string]Client{},
		resources: map[string]bool{},
	}
	a.plain, a.issuer = newTLSServer(a.handler, false, a.log)
	a.mtls, a.mtlsOrigin = newTLSServer(a.handler, true, a.log)
	if a.verifier, err = newTokenVerifier(a.issuer, a.JWKS()); err != nil {
		a.close()
		return nil, err
	}
	a.resources[a.issuer] = true // tokens for itself: jwt-pop client assertions
	a.plain.StartTLS()
	a.mtls.StartTLS()
	return a, nil
}

func (a *AS) close() {
	a.plain.Close()
	a.mtls.Close()
}

// Issuer is the AS's issuer identifier, its plain listener's URL.
func (a *AS) Issuer() string { return a.issuer }

// TokenURL is the token endpoint.
func (a *AS) TokenURL() string { return a.issuer + "/token" }

// MTLSTokenURL is the token endpoint's mutual TLS alias.
func (a *AS) MTLSTokenURL() string { return a.mtlsOrigin + "/token" }

// JWKS is the AS's token signing key set, as served at Issuer()/jwks.
func (a *AS) JWKS() pop.JWKS {
	j := a.signer.JWK()
	j.Use = "sig"
	return pop.JWKS{Keys: []pop.JWK{j}}
}

// RegisterClient registers (or replaces) a client.
func (a *AS) RegisterClient(c Client) error {
	if c.ID == "" {
		return fmt.Errorf("register client: empty client_id")
	}
	for _, j := range c.JWKS {
		if _, err := j.PublicKey(); err != nil {
			return fmt.Errorf("register client %q: %w", c.ID, err)
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.clients[c.ID] = c
	a.log.Info("client registered", "client_id", c.ID, "jwks", len(c.JWKS), "x5t#S256", c.X5TS256)
	return nil
}

func (a *AS) registerResource(uri string, isDefault bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.resources[uri] = true
	if isDefault {
		a.defaultResource = uri
	}
}

func (a *AS) client(id string) (Client, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.clients[id]
	return c, ok
}

func (a *AS) handler(origin string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /token", func(w http.ResponseWriter, r *http.Request) { a.token(w, r, origin) })
	mux.HandleFunc("GET /jwks", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, a.JWKS()) })
	mux.HandleFunc("GET /.well-known/oauth-authorization-server", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{ // RFC 8414
			"issuer":                                     a.Issuer(),
			"token_endpoint":                             a.TokenURL(),
			"jwks_uri":                                   a.Issuer() + "/jwks",
			"grant_types_supported":                      []string{GrantClientCredentials},
			"token_endpoint_auth_methods_supported":      []string{"private_key_jwt", "self_signed_tls_client_auth"},
			"dpop_signing_alg_values_supported":          []string{pop.AlgES256, pop.AlgES384, pop.AlgRS256, pop.AlgPS256},
			"tls_client_certificate_bound_access_tokens": true,
			"mtls_endpoint_aliases":                      map[string]string{"token_endpoint": a.MTLSTokenURL()},
		})
	})
	return mux
}

// oauthError is a token endpoint error response (RFC 6749 §5.2).
type oauthError struct {
	status      int
	code        string
	description string
	dpopNonce   string // set with use_dpop_nonce
}

func (e *oauthError) Error() string { return e.code + ": " + e.description }

func invalidRequest(format string, args ...any) *oauthError {
	return &oauthError{http.StatusBadRequest, "invalid_request", fmt.Sprintf(format, args...), ""}
}

func invalidClient(format string, args ...any) *oauthError {
	return &oauthError{http.StatusUnauthorized, "invalid_client", fmt.Sprintf(format, args...), ""}
}

func (a *AS) token(w http.ResponseWriter, r *http.Request, origin string) {
	resp, nonce, e := a.issue(w, r, origin)
	if nonce != "" { // RFC 9449 §8.2: a fresh nonce may come with any response
		w.Header().Set("DPoP-Nonce", nonce)
	}
	w.Header().Set("Cache-Control", "no-store")
	if e != nil {
		a.log.Info("token request refused", "error", e.code, "reason", e.description)
		writeJSON(w, e.status, map[string]string{"error": e.code, "error_description": e.description})
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// issue handles a token request: it returns the response, the DPoP nonce
// to send (DPoP requests only), or the error.
func (a *AS) issue(w http.ResponseWriter, r *http.Request, origin string) (map[string]any, string, *oauthError) {
	now := a.cfg.now()
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/x-www-form-urlencoded" {
		return nil, "", invalidRequest("Content-Type: got %q, want application/x-www-form-urlencoded", r.Header.Get("Content-Type"))
	}
	body, err := readBody(w, r)
	if err != nil {
		return nil, "", invalidRequest("body: %v", err)
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		return nil, "", invalidRequest("body: %v", err)
	}
	for name, v := range form {
		if len(v) != 1 { // RFC 6749 §3.1
			return nil, "", invalidRequest("parameter %q sent %d times", name, len(v))
		}
	}
	if gt := form.Get("grant_type"); gt != GrantClientCredentials {
		return nil, "", &oauthError{http.StatusBadRequest, "unsupported_grant_type", fmt.Sprintf("grant_type %q: this AS grants client_credentials only", gt), ""}
	}

	// DPoP first (RFC 9449 §5, §8): a nonce challenge must not cost the
	// client its one-time client assertion.
	var cnf Confirmation
	tokenType, nonce := "", ""
	if proofs := r.Header.Values("DPoP"); len(proofs) > 0 {
		nonce = a.nonces.at(now)
		pc, e := a.checkDPoP(proofs, r, origin, now)
		if e != nil {
			return nil, nonce, e
		}
		cnf.JKT, tokenType = pc.Thumbprint, "DPoP"
	}

	client, e := a.authenticate(r, form, origin, now)
	if e != nil {
		return nil, nonce, e
	}

	peer := peerCertificate(r)
	switch tt := form.Get("token_type"); {
	case tt == TokenTypePoP && tokenType != "":
		return nil, nonce, invalidRequest("a DPoP proof and token_type=pop: one binding per token")
	case tt == TokenTypePoP:
		var ksl string
		if cnf, ksl, err = parseReqCnf(form.Get("req_cnf")); err != nil {
			return nil, nonce, invalidRequest("req_cnf: %v", err)
		}
		tokenType = "pop"
		if ksl != "" {
			a.log.Info("req_cnf key storage", "client_id", client.ID, "xms_ksl", ksl)
		}
	case tt != "":
		return nil, nonce, invalidRequest("token_type %q: want %q or none", tt, TokenTypePoP)
	case form.Has("req_cnf"):
		return nil, nonce, invalidRequest("req_cnf without token_type=pop")
	case tokenType != "": // DPoP
	case peer != nil: // RFC 8705 §3: bind to the client certificate
		cnf.X5TS256, tokenType = pop.X5TS256(peer.Raw), "Bearer"
	default:
		return nil, nonce, invalidRequest("this AS issues only sender-constrained tokens: send a DPoP proof, token_type=pop with req_cnf, or use mutual TLS at %s", a.MTLSTokenURL())
	}

	aud := form.Get("resource") // RFC 8707
	a.mu.Lock()
	if aud == "" {
		aud = a.defaultResource
	}
	known := a.resources[aud]
	a.mu.Unlock()
	if !known {
		return nil, nonce, &oauthError{http.StatusBadRequest, "invalid_target", fmt.Sprintf("resource %q is not registered", aud), ""}
	}

	lifetime := a.cfg.TokenLifetime
	if lifetime == 0 {
		lifetime = defaultTokenLifetime
	}
	claims := Claims{
		Issuer: a.Issuer(), Subject: client.ID, Audience: Audience{aud}, ClientID: client.ID,
		IssuedAt: now.Unix(), Expiry: now.Add(lifetime).Unix(), JTI: randomID(), Cnf: cnf,
	}
	tok, err := issueToken(r.Context(), a.signer, claims)
	if err != nil {
		return nil, nonce, &oauthError{http.StatusInternalServerError, "server_error", "signing failed", ""}
	}
	a.log.Info("token issued", "client_id", client.ID, "aud", aud, "token_type", tokenType, "cnf", cnf.String(), "jti", claims.JTI)
	return map[string]any{"access_token": tok, "token_type": tokenType, "expires_in": int(lifetime / time.Second)}, nonce, nil
}

// checkDPoP checks the DPoP proof of a token request (RFC 9449 §4.3) and
// demands this AS's current nonce.
func (a *AS) checkDPoP(proofs []string, r *http.Request, origin string, now time.Time) (*pop.DPoPClaims, *oauthError) {
	bad := func(format string, args ...any) *oauthError {
		return &oauthError{http.StatusBadRequest, "invalid_dpop_proof", fmt.Sprintf(format, args...), ""}
	}
	if len(proofs) != 1 {
		return nil, bad("got %d DPoP headers, want 1", len(proofs))
	}
	pc, nonceOnly, err := a.nonces.verifyDPoP(proofs[0], pop.DPoPCheck{
		Method: r.Method, URL: origin + r.URL.RequestURI(), Now: now, MaxAge: proofMaxAge, Leeway: clockLeeway,
	})
	if nonceOnly {
		return nil, &oauthError{http.StatusBadRequest, "use_dpop_nonce", "Authorization server requires nonce in DPoP proof", a.nonces.at(now)}
	}
	if err != nil {
		return nil, bad("%v", err)
	}
	if !a.replay.add("dpop:"+pc.Thumbprint+":"+pc.JTI, time.Unix(pc.IAT, 0).Add(proofMaxAge+clockLeeway), now) {
		return nil, bad("jti %q was already used: replayed proof", pc.JTI)
	}
	return pc, nil
}

// authenticate authenticates the client (RFC 6749 §2.3): private_key_jwt,
// a jwt-pop assertion over mutual TLS, or self_signed_tls_client_auth.
func (a *AS) authenticate(r *http.Request, form url.Values, origin string, now time.Time) (Client, *oauthError) {
	if r.Header.Get("Authorization") != "" || form.Has("client_secret") {
		return Client{}, invalidClient("client secrets are not accepted: use private_key_jwt or mutual TLS")
	}
	id := form.Get("client_id")
	peer := peerCertificate(r)
	switch typ := form.Get("client_assertion_type"); typ {
	case ClientAssertionJWTBearer:
		return a.privateKeyJWT(form.Get("client_assertion"), id, origin, now)
	case ClientAssertionJWTPoP:
		return a.jwtPoP(form.Get("client_assertion"), id, peer, now)
	case "":
		if form.Has("client_assertion") {
			return Client{}, invalidRequest("client_assertion without client_assertion_type")
		}
		if peer != nil {
			return a.selfSignedTLS(id, peer, now)
		}
		return Client{}, invalidClient("no client authentication: use private_key_jwt, or mutual TLS at %s", a.MTLSTokenURL())
	default:
		return Client{}, invalidClient("client_assertion_type %q is not supported", typ)
	}
}

// privateKeyJWT checks a private_key_jwt client assertion (RFC 7523 §3,
// OpenID Connect Core §9).
func (a *AS) privateKeyJWT(assertion, id, origin string, now time.Time) (Client, *oauthError) {
	header, payload, _, _, err := pop.ParseJWS(assertion)
	if err != nil {
		return Client{}, invalidClient("client assertion: %v", err)
	}
	var typ, kid string
	if unmarshalMember(header, "typ", &typ) != nil || unmarshalMember(header, "kid", &kid) != nil {
		return Client{}, invalidClient("client assertion header: typ and kid must be strings")
	}
	if typ != "" && !strings.EqualFold(typ, "JWT") && !strings.EqualFold(typ, "client-authentication+jwt") {
		return Client{}, invalidClient("client assertion typ %q: not a client assertion", typ)
	}
	// Read (unverified) to find the client; every claim is checked below,
	// once the signature is.
	var c struct {
		Iss string   `json:"iss"`
		Sub string   `json:"sub"`
		Aud Audience `json:"aud"`
		Exp int64    `json:"exp"`
		Iat int64    `json:"iat"`
		JTI string   `json:"jti"`
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return Client{}, invalidClient("client assertion claims: %v", err)
	}
	if c.Iss == "" || c.Iss != c.Sub {
		return Client{}, invalidClient("client assertion: iss %q and sub %q must both be the client_id", c.Iss, c.Sub)
	}
	if id != "" && id != c.Iss {
		return Client{}, invalidClient("client_id %q but the client assertion is from %q", id, c.Iss)
	}
	client, ok := a.client(c.Iss)
	if !ok || len(client.JWKS) == 0 {
		return Client{}, invalidClient("client %q is not registered for private_key_jwt", c.Iss)
	}
	verified := false
	for _, j := range client.JWKS {
		if tp, _ := j.Thumbprint(); kid != "" && kid != j.Kid && kid != tp {
			continue
		}
		pub, err := j.PublicKey()
		if err != nil {
			continue
		}
		if _, _, err := pop.VerifyJWS(assertion, pub); err == nil {
			verified = true
			break
		}
	}
	if !verified {
		return Client{}, invalidClient("client assertion is not signed by a key registered for %q", c.Iss)
	}
	switch exp := time.Unix(c.Exp, 0); {
	case !c.Aud.Contains(a.Issuer()) && !c.Aud.Contains(origin+"/token"):
		return Client{}, invalidClient("client assertion aud %q: want the issuer or the token endpoint", []string(c.Aud))
	case c.Exp == 0 || !now.Before(exp.Add(clockLeeway)):
		return Client{}, invalidClient("client assertion expired or has no exp")
	case exp.Sub(now) > maxAssertionLifetime+clockLeeway:
		return Client{}, invalidClient("client assertion lives too long: exp is more than %v away", maxAssertionLifetime)
	case c.Iat != 0 && time.Unix(c.Iat, 0).After(now.Add(clockLeeway)):
		return Client{}, invalidClient("client assertion iat is in the future")
	case c.JTI == "":
		return Client{}, invalidClient("client assertion has no jti")
	case !a.replay.add("assertion:"+c.Iss+":"+c.JTI, exp.Add(clockLeeway), now):
		return Client{}, invalidClient("client assertion jti %q was already used: replayed assertion", c.JTI)
	}
	return client, nil
}

// jwtPoP checks the second leg of the mTLS token exchange: the assertion
// is an access token from this AS for this AS, bound to the certificate of
// this very connection.
func (a *AS) jwtPoP(assertion, id string, peer *x509.Certificate, now time.Time) (Client, *oauthError) {
	if peer == nil {
		return Client{}, invalidClient("a jwt-pop client assertion needs mutual TLS: use %s", a.MTLSTokenURL())
	}
	c, err := a.verifier.verify(assertion, a.Issuer(), now)
	if err != nil {
		return Client{}, invalidClient("client assertion: %v", err)
	}
	if c.Cnf.X5TS256 == "" {
		return Client{}, invalidClient("client assertion is not certificate-bound (no cnf x5t#S256)")
	}
	if got := pop.X5TS256(peer.Raw); !equal(c.Cnf.X5TS256, got) {
		return Client{}, invalidClient("client assertion is bound to certificate x5t#S256 %s, the connection's certificate is %s", c.Cnf.X5TS256, got)
	}
	if id != "" && id != c.ClientID {
		return Client{}, invalidClient("client_id %q but the client assertion was issued to %q", id, c.ClientID)
	}
	client, ok := a.client(c.ClientID)
	if !ok {
		return Client{}, invalidClient("client %q is not registered", c.ClientID)
	}
	return client, nil
}

// selfSignedTLS is self_signed_tls_client_auth (RFC 8705 §2.2): the
// connection's certificate must be one registered for client_id.
func (a *AS) selfSignedTLS(id string, peer *x509.Certificate, now time.Time) (Client, *oauthError) {
	if id == "" {
		return Client{}, invalidRequest("client_id is required with mutual TLS client authentication (RFC 8705 §2)")
	}
	client, ok := a.client(id)
	if !ok || len(client.X5TS256) == 0 {
		return Client{}, invalidClient("client %q is not registered for self_signed_tls_client_auth", id)
	}
	tp := pop.X5TS256(peer.Raw)
	if !slices.ContainsFunc(client.X5TS256, func(s string) bool { return equal(s, tp) }) {
		return Client{}, invalidClient("certificate x5t#S256 %s is not registered for client %q", tp, id)
	}
	if now.Before(peer.NotBefore) || now.After(peer.NotAfter) {
		return Client{}, invalidClient("client certificate is outside its validity period")
	}
	return client, nil
}

// parseReqCnf reads a req_cnf: base64url of a public JWK (MSAuth 1.0
// AT-POP) or of {"kid": thumbprint[, "xms_ksl": …]} (MSAL SHR PoP). It
// returns the token's cnf and the key storage location claimed, if any.
func parseReqCnf(s string) (Confirmation, string, error) {
	if s == "" {
		return Confirmation{}, "", fmt.Errorf("missing: token_type=pop needs req_cnf")
	}
	b, err := base64.RawURLEncoding.Strict().DecodeString(s)
	if err != nil {
		return Confirmation{}, "", fmt.Errorf("not base64url without padding: %v", err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return Confirmation{}, "", fmt.Errorf("not a JSON object: %v", err)
	}
	if _, isJWK := m["kty"]; isJWK {
		for _, private := range []string{"d", "p", "q", "dp", "dq", "qi", "oth", "k"} {
			if _, ok := m[private]; ok {
				return Confirmation{}, "", fmt.Errorf("JWK has the private member %q", private)
			}
		}
		var j pop.JWK
		if err := json.Unmarshal(b, &j); err != nil {
			return Confirmation{}, "", err
		}
		if _, err := j.PublicKey(); err != nil {
			return Confirmation{}, "", err
		}
		pub := pop.JWK{Kty: j.Kty, Crv: j.Crv, X: j.X, Y: j.Y, N: j.N, E: j.E}
		return Confirmation{JWK: &pub}, "", nil
	}
	var k struct {
		Kid string `json:"kid"`
		KSL string `json:"xms_ksl"`
	}
	if err := json.Unmarshal(b, &k); err != nil {
		return Confirmation{}, "", err
	}
	if tp, err := base64.RawURLEncoding.Strict().DecodeString(k.Kid); err != nil || len(tp) != sha256.Size {
		return Confirmation{}, "", fmt.Errorf("kid %q is not an RFC 7638 SHA-256 thumbprint", k.Kid)
	}
	if k.KSL != "" && k.KSL != pop.KSLSoftware && k.KSL != pop.KSLHardware {
		return Confirmation{}, "", fmt.Errorf("xms_ksl %q: want %q or %q", k.KSL, pop.KSLSoftware, pop.KSLHardware)
	}
	return Confirmation{Kid: k.Kid}, k.KSL, nil
}

func peerCertificate(r *http.Request) *x509.Certificate {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return nil
	}
	return r.TLS.PeerCertificates[0]
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
