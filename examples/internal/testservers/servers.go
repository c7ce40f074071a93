// Package testservers is a small OAuth 2.0 authorization server (AS) and
// resource server (RS) for keybroker's examples and their tests. Both are
// httptest servers on loopback, each with a plain TLS listener and a mutual
// TLS alias (RFC 8705 §5). They issue and accept only sender-constrained
// access tokens — DPoP (RFC 9449), MSAL SHR PoP and MSAuth 1.0 AT-POP
// ("Authorization: PoP"), and certificate-bound tokens (RFC 8705) — and
// check what a real AS and RS check: client authentication, proofs,
// freshness, nonces, replay, and that the key or certificate that proves
// possession is the one the token's "cnf" names.
//
// The AS signs its JWT access tokens (RFC 9068) with a P-256 key held in
// this process's memory (pop.NewSoftwareSigner): fine for a test server,
// never for a real one. Only the examples import this package.
package testservers

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"time"
)

// Config configures both servers.
type Config struct {
	// Now is the servers' clock; nil means time.Now.
	Now func() time.Time
	// Logger gets one line per decision (never a token or a proof); nil
	// discards.
	Logger *slog.Logger
	// TokenLifetime is how long access tokens live; 0 means 10 minutes.
	TokenLifetime time.Duration
}

func (c Config) now() time.Time {
	if c.Now == nil {
		return time.Now()
	}
	return c.Now()
}

func (c Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}

// Windows the servers allow, and how often their DPoP nonces change.
const (
	defaultTokenLifetime = 10 * time.Minute
	proofMaxAge          = 60 * time.Second // DPoP "iat" (RFC 9449 §11.1)
	clockLeeway          = 5 * time.Second
	nonceRotation        = 5 * time.Minute
	maxAssertionLifetime = 10 * time.Minute // private_key_jwt "exp" - now
	maxBody              = 64 << 10
)

// Env is an AS and an RS that trusts it. The RS is registered at the AS as
// a resource (RFC 8707) and is the default audience of its tokens.
type Env struct {
	AS *AS
	RS *RS

	mu         sync.Mutex
	roots      *x509.CertPool
	transports []*http.Transport
}

// Start starts an AS and an RS on loopback. Close them with Close.
func Start(cfg Config) (*Env, error) {
	as, err := newAS(cfg)
	if err != nil {
		return nil, err
	}
	rs, err := newRS(cfg, as.Issuer(), as.JWKS())
	if err != nil {
		as.close()
		return nil, err
	}
	as.registerResource(rs.Audience(), true)
	roots := x509.NewCertPool()
	for _, s := range []*httptest.Server{as.plain, as.mtls, rs.plain, rs.mtls} {
		roots.AddCert(s.Certificate())
	}
	return &Env{AS: as, RS: rs, roots: roots}, nil
}

// Close closes the clients' idle connections and stops both servers,
// waiting for requests in flight.
func (e *Env) Close() {
	e.mu.Lock()
	for _, t := range e.transports {
		t.CloseIdleConnections()
	}
	e.mu.Unlock()
	e.AS.close()
	e.RS.close()
}

// Transport returns an HTTP transport that trusts the servers' TLS
// certificate and presents certs, if any, as its client certificate. Each
// call makes a new transport, so connections made with different
// certificates are never shared.
func (e *Env) Transport(certs ...tls.Certificate) *http.Transport {
	t := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: e.roots, Certificates: certs, MinVersion: tls.VersionTLS12},
		// One connection per transport keeps "the same certificate, the same
		// connection" easy to reason about in the mTLS examples.
		MaxConnsPerHost: 1,
	}
	e.mu.Lock()
	e.transports = append(e.transports, t)
	e.mu.Unlock()
	return t
}

// HTTPClient is an http.Client over Transport(certs...).
func (e *Env) HTTPClient(certs ...tls.Certificate) *http.Client {
	return &http.Client{Transport: e.Transport(certs...), Timeout: 30 * time.Second}
}

// newTLSServer makes, without starting it, a loopback TLS server of
// handler(origin), origin being its "https://127.0.0.1:port". With mtls it
// demands a client certificate but does not check who issued it (RFC 8705
// §2.2: self-signed certificates are matched by the handler against what
// was registered, not chained to a CA). Start it with StartTLS.
func newTLSServer(handler func(origin string) http.Handler, mtls bool, log *slog.Logger) (*httptest.Server, string) {
	srv := httptest.NewUnstartedServer(nil) // listens on 127.0.0.1
	origin := "https://" + srv.Listener.Addr().String()
	srv.Config.Handler = handler(origin)
	srv.TLS = &tls.Config{MinVersion: tls.VersionTLS12}
	if mtls {
		srv.TLS.ClientAuth = tls.RequireAnyClientCert
	}
	srv.Config.ErrorLog = slog.NewLogLogger(log.Handler(), slog.LevelWarn)
	srv.Config.ReadHeaderTimeout = 10 * time.Second
	return srv, origin
}

// readBody reads at most maxBody bytes of r's body.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	if r.Body == nil {
		return []byte{}, nil
	}
	return io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
}
