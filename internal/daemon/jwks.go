package daemon

// The JWKS listener: tenants' JWK Sets over HTTPS for relying parties
// (jwks.address; see internal/jwkshttp and docs/operations.md "Publishing
// JWKS over HTTPS").

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/jwkshttp"
)

// Bounds of the JWKS listener. A request is a GET with a few headers; a
// client that trickles its headers or never reads the answer is cut off.
const (
	jwksReadHeaderTimeout = 5 * time.Second
	jwksReadTimeout       = 10 * time.Second
	jwksWriteTimeout      = 10 * time.Second
	jwksIdleTimeout       = 2 * time.Minute
	// jwksMaxHeaderBytes bounds the request line and headers (net/http
	// answers 431 past it); If-None-Match alone is bounded lower, by
	// jwkshttp.MaxIfNoneMatch.
	jwksMaxHeaderBytes = 16 << 10
)

// jwksServer is the HTTPS server of the JWKS listener.
type jwksServer struct {
	cert atomic.Pointer[tls.Certificate] // replaced on reload
	srv  *http.Server

	// published caches, per configuration in force, the tenants that
	// publish: asked on every request.
	published atomic.Pointer[publishedSet]

	mu  sync.Mutex
	lis net.Listener
}

type publishedSet struct {
	cfg   *config.Config
	names map[string]bool
}

// newJWKS loads the certificate and builds the server; it listens in
// serveJWKS.
func (d *Daemon) newJWKS(cfg config.Config) (*jwksServer, error) {
	j := &jwksServer{}
	cert, err := loadJWKSCert(cfg.JWKS)
	if err != nil {
		return nil, err
	}
	j.cert.Store(cert)
	h := jwkshttp.New(jwkshttp.Options{
		Source:    d.ring,
		Published: func(tenant string) bool { return j.publishes(d.live.Load(), tenant) },
		MaxAge:    func() time.Duration { return d.live.Load().JWKS.MaxAge },
		Log:       d.log,
	})
	j.srv = &http.Server{
		Handler: h,
		TLSConfig: &tls.Config{
			MinVersion:     tls.VersionTLS12,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return j.cert.Load(), nil },
		},
		ReadHeaderTimeout: jwksReadHeaderTimeout,
		ReadTimeout:       jwksReadTimeout,
		WriteTimeout:      jwksWriteTimeout,
		IdleTimeout:       jwksIdleTimeout,
		MaxHeaderBytes:    jwksMaxHeaderBytes,
		// TLS handshake failures from scanners are not the operator's
		// problem: debug level.
		ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelDebug),
	}
	return j, nil
}

// loadJWKSCert reads the listener's certificate and key.
func loadJWKSCert(c config.JWKS) (*tls.Certificate, error) {
	path, err := config.ResolvePath(c.CertFile)
	if err != nil {
		return nil, fmt.Errorf("jwks.cert_file: %w", err)
	}
	keyPath, err := config.ResolvePath(c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("jwks.key_file: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(path, keyPath)
	if err != nil {
		return nil, fmt.Errorf("jwks: cert_file %s, key_file %s: %w", c.CertFile, c.KeyFile, err)
	}
	return &cert, nil
}

// publishes reports whether tenant has publish_jwks in cfg.
func (j *jwksServer) publishes(cfg *config.Config, tenant string) bool {
	ps := j.published.Load()
	if ps == nil || ps.cfg != cfg {
		ps = &publishedSet{cfg: cfg, names: map[string]bool{}}
		for _, t := range cfg.Tenants {
			if t.PublishJWKS {
				ps.names[t.Name] = true
			}
		}
		j.published.Store(ps)
	}
	return ps.names[tenant]
}

// serveJWKS listens on jwks.address and serves in the background; a
// serving error other than a stop goes to errc.
func (d *Daemon) serveJWKS(errc chan<- error) error {
	if d.jwks == nil {
		return nil
	}
	lis, err := net.Listen("tcp", d.cfg.JWKS.Address)
	if err != nil {
		return fmt.Errorf("jwks: %w", err)
	}
	d.jwks.mu.Lock()
	d.jwks.lis = lis
	d.jwks.mu.Unlock()
	go func() {
		if err := d.jwks.srv.ServeTLS(lis, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("jwks: %w", err)
		}
	}()
	d.log.Info("serving JWKS", "url", "https://"+lis.Addr().String()+"/tenants/{tenant}/jwks.json")
	return nil
}

// stopJWKS lets requests in flight finish for a second, then closes.
func (d *Daemon) stopJWKS() {
	if d.jwks == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := d.jwks.srv.Shutdown(ctx); err != nil {
		d.jwks.srv.Close()
	}
}

// reloadJWKSCert re-reads the JWKS certificate from the paths the daemon
// started with (a renewed certificate needs no restart). It returns a
// function that puts it in force, or the problem.
func (d *Daemon) reloadJWKSCert() (apply func(), err error) {
	if d.jwks == nil {
		return func() {}, nil
	}
	cert, err := loadJWKSCert(d.cfg.JWKS)
	if err != nil {
		return nil, err
	}
	return func() { d.jwks.cert.Store(cert) }, nil
}

// JWKSAddr is the JWKS listener's address once Ready, or "" when
// jwks.address is not set.
func (d *Daemon) JWKSAddr() string {
	if d.jwks == nil {
		return ""
	}
	d.jwks.mu.Lock()
	defer d.jwks.mu.Unlock()
	if d.jwks.lis == nil {
		return ""
	}
	return d.jwks.lis.Addr().String()
}
