package jwkshttp_test

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/keybroker/keybroker/kms"
)

// benchClients is the number of concurrent clients of the issue's
// benchmark row (≥ 20,000 requests/s at 16 clients).
const benchClients = 16

// benchFixture is a tenant with three keys, one of them rotated: a set of
// four JWKs (~900 bytes).
func benchFixture(b *testing.B) *fixture {
	f := newFixture(b)
	f.publish.Store("acme", true)
	for _, n := range []string{"a", "b", "c"} {
		f.create(b, "acme", n, kms.Policy{})
	}
	if _, _, err := f.ring.RotateKey(b.Context(), "acme", "a", 0); err != nil {
		b.Fatal(err)
	}
	return f
}

// discard is a minimal http.ResponseWriter.
type discard struct{ h http.Header }

func (d *discard) Header() http.Header         { return d.h }
func (d *discard) Write(p []byte) (int, error) { return len(p), nil }
func (d *discard) WriteHeader(int)             {}

// BenchmarkHandler: the handler alone, in process, all CPUs.
func BenchmarkHandler(b *testing.B) {
	f := benchFixture(b)
	h := f.srv.Config.Handler
	for _, tc := range []struct{ name, path string }{
		{"tenant", "/tenants/acme/jwks.json"},
		{"key", "/tenants/acme/keys/a/jwks.json"},
	} {
		b.Run(tc.name, func(b *testing.B) {
			calls := f.backend.calls.Load()
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				req := httptest.NewRequest("GET", tc.path, nil)
				w := &discard{h: http.Header{}}
				for pb.Next() {
					clear(w.h)
					h.ServeHTTP(w, req)
				}
			})
			if n := f.backend.calls.Load() - calls; n != 0 {
				b.Fatalf("%d backend calls", n)
			}
		})
	}
}

// BenchmarkJWKSHTTPS: 16 clients, each on its own kept-alive TLS 1.3
// connection over loopback, fetch the tenant's set (200 with the body) or
// revalidate it (If-None-Match, 304). It reports requests per second.
// "baseline" serves the same bytes from a handler that does nothing else:
// the ceiling of net/http and TLS on the machine, clients included.
func BenchmarkJWKSHTTPS(b *testing.B) {
	f := benchFixture(b)
	b.Run("handler", func(b *testing.B) { benchHTTPS(b, f, f.srv.Config.Handler) })
	body := f.do(b, "GET", "/tenants/acme/jwks.json").body
	b.Run("baseline", func(b *testing.B) {
		benchHTTPS(b, f, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("If-None-Match") != "" {
				w.WriteHeader(304)
				return
			}
			w.Header().Set("Content-Type", "application/jwk-set+json")
			io.WriteString(w, body)
		}))
	})
}

func benchHTTPS(b *testing.B, f *fixture, h http.Handler) {
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = &tls.Config{MinVersion: tls.VersionTLS12}
	srv.Config.ReadHeaderTimeout = 5 * time.Second
	srv.StartTLS()
	b.Cleanup(srv.Close)
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	url := srv.URL + "/tenants/acme/jwks.json"
	etag := f.do(b, "GET", "/tenants/acme/jwks.json").header.Get("ETag")
	for _, tc := range []struct {
		name   string
		inm    string
		status int
	}{
		{"200", "", 200},
		{"304", etag, 304},
	} {
		b.Run(tc.name, func(b *testing.B) {
			clients := make([]*http.Client, benchClients)
			for i := range clients {
				clients[i] = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, MaxIdleConnsPerHost: 1}}
			}
			work := make(chan struct{}, b.N)
			for range b.N {
				work <- struct{}{}
			}
			close(work)
			calls := f.backend.calls.Load()
			b.ResetTimer()
			var wg sync.WaitGroup
			for _, c := range clients {
				wg.Go(func() {
					req, _ := http.NewRequest("GET", url, nil)
					if tc.inm != "" {
						req.Header.Set("If-None-Match", tc.inm)
					}
					for range work {
						resp, err := c.Do(req)
						if err != nil {
							b.Error(err)
							return
						}
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						if resp.StatusCode != tc.status {
							b.Errorf("status %d, want %d", resp.StatusCode, tc.status)
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
			if n := f.backend.calls.Load() - calls; n != 0 {
				b.Fatalf("%d backend calls", n)
			}
			for _, c := range clients {
				c.CloseIdleConnections()
			}
		})
	}
}
