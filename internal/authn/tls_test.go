package authn_test

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io/fs"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/keybroker/keybroker/internal/authn"
)

func TestMTLS(t *testing.T) {
	ca := newCA(t, "keybroker test CA")
	unknown := newCA(t, "unknown CA")
	certFile, keyFile, caFile := serverFiles(t, t.TempDir(), ca, ca)

	cfg, err := authn.ServerTLS(certFile, keyFile, caFile)
	if err != nil {
		t.Fatalf("ServerTLS: %v", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rec := serve(t, lis, credentials.NewTLS(cfg))
	target := lis.Addr().String()

	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	client := func(certs ...tls.Certificate) credentials.TransportCredentials {
		return credentials.NewTLS(&tls.Config{RootCAs: roots, Certificates: certs, MinVersion: tls.VersionTLS12})
	}

	t.Run("known CA", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			tmpl *x509.Certificate
			want authn.Identity
		}{{
			name: "SPIFFE",
			tmpl: &x509.Certificate{
				Subject:  pkix.Name{CommonName: "workload-a"},
				URIs:     []*url.URL{mustURL(t, "spiffe://example.org/ns/a/sa/b"), mustURL(t, "https://example.org/not-spiffe")},
				DNSNames: []string{"a.example"},
			},
			want: authn.Identity{SPIFFEID: "spiffe://example.org/ns/a/sa/b", SPIFFEURIs: []string{"spiffe://example.org/ns/a/sa/b"}, DNSNames: []string{"a.example"}, CommonName: "workload-a"},
		}, {
			name: "DNS",
			tmpl: &x509.Certificate{DNSNames: []string{"B.example", "c.example"}},
			want: authn.Identity{DNSNames: []string{"B.example", "c.example"}},
		}, {
			name: "CN only",
			tmpl: &x509.Certificate{Subject: pkix.Name{CommonName: "svc-c"}},
			want: authn.Identity{CommonName: "svc-c"},
		}, {
			// X509-SVID section 2: exactly one SPIFFE ID, or none.
			name: "two SPIFFE IDs",
			tmpl: &x509.Certificate{
				Subject: pkix.Name{CommonName: "ambiguous"},
				URIs:    []*url.URL{mustURL(t, "spiffe://example.org/a"), mustURL(t, "spiffe://example.org/b")},
			},
			want: authn.Identity{SPIFFEURIs: []string{"spiffe://example.org/a", "spiffe://example.org/b"}, CommonName: "ambiguous"},
		}, {
			name: "invalid SPIFFE ID",
			tmpl: &x509.Certificate{
				Subject: pkix.Name{CommonName: "bad"},
				URIs:    []*url.URL{mustURL(t, "spiffe://example.org:8443/a")},
			},
			want: authn.Identity{SPIFFEURIs: []string{"spiffe://example.org:8443/a"}, CommonName: "bad"},
		}} {
			t.Run(tc.name, func(t *testing.T) {
				l := ca.issue(t, tc.tmpl, true)
				if err := check(t, target, client(l.tls())); err != nil {
					t.Fatalf("Check: %v", err)
				}
				c := rec.last(t)
				if !c.ok {
					t.Fatal("FromContext: ok = false, want true")
				}
				if !sameIdentity(c.id, tc.want) {
					t.Errorf("FromContext = %+v, want %+v", c.id, tc.want)
				}
			})
		}
	})

	// The identity of a real handshake resolves to the tenant of its
	// SPIFFE ID alone if it has one, and is named by what matched.
	t.Run("resolve", func(t *testing.T) {
		r, err := authn.NewResolver([]authn.Rule{
			{Tenant: "spiffe", SPIFFEIDs: []string{"spiffe://example.org/w"}},
			{Tenant: "svc", DNSNames: []string{"w.example"}, CommonNames: []string{"workload"}},
		})
		if err != nil {
			t.Fatalf("NewResolver: %v", err)
		}
		for _, tc := range []struct {
			name               string
			tmpl               *x509.Certificate
			wantTenant, wantID string
			wantOK             bool
		}{{
			name: "SPIFFE ID",
			tmpl: &x509.Certificate{
				Subject:  pkix.Name{CommonName: "workload"},
				URIs:     []*url.URL{mustURL(t, "spiffe://example.org/w")},
				DNSNames: []string{"w.example"},
			},
			wantTenant: "spiffe", wantID: "spiffe://example.org/w", wantOK: true,
		}, {
			name: "unmapped SPIFFE ID",
			tmpl: &x509.Certificate{
				Subject:  pkix.Name{CommonName: "workload"},
				URIs:     []*url.URL{mustURL(t, "spiffe://example.org/other")},
				DNSNames: []string{"w.example"},
			},
			wantID: "spiffe://example.org/other",
		}, {
			name: "two SPIFFE IDs",
			tmpl: &x509.Certificate{
				Subject: pkix.Name{CommonName: "workload"},
				URIs:    []*url.URL{mustURL(t, "spiffe://example.org/w"), mustURL(t, "spiffe://example.org/x")},
			},
			wantID: "spiffe://example.org/w,spiffe://example.org/x",
		}, {
			name: "invalid SPIFFE ID",
			tmpl: &x509.Certificate{
				Subject: pkix.Name{CommonName: "workload"},
				URIs:    []*url.URL{mustURL(t, "spiffe://example.org:8443/w")},
			},
			wantID: "spiffe://example.org:8443/w",
		}, {
			name: "second DNS SAN",
			tmpl: &x509.Certificate{
				Subject:  pkix.Name{CommonName: "workload"},
				URIs:     []*url.URL{mustURL(t, "https://example.org/w")},
				DNSNames: []string{"x.example", "W.example"},
			},
			wantTenant: "svc", wantID: "dns:W.example", wantOK: true,
		}, {
			name: "CN",
			tmpl: &x509.Certificate{
				Subject:  pkix.Name{CommonName: "workload"},
				DNSNames: []string{"x.example"},
			},
			wantTenant: "svc", wantID: "cn:workload", wantOK: true,
		}} {
			t.Run(tc.name, func(t *testing.T) {
				l := ca.issue(t, tc.tmpl, true)
				if err := check(t, target, client(l.tls())); err != nil {
					t.Fatalf("Check: %v", err)
				}
				c := rec.last(t)
				if !c.ok {
					t.Fatal("FromContext: ok = false, want true")
				}
				tenant, id, ok := r.Resolve(c.id)
				if tenant != tc.wantTenant || id != tc.wantID || ok != tc.wantOK {
					t.Errorf("Resolve(%+v) = %q, %q, %v; want %q, %q, %v", c.id, tenant, id, ok, tc.wantTenant, tc.wantID, tc.wantOK)
				}
			})
		}
	})

	t.Run("unknown CA", func(t *testing.T) {
		l := unknown.issue(t, &x509.Certificate{
			Subject: pkix.Name{CommonName: "workload-a"},
			URIs:    []*url.URL{mustURL(t, "spiffe://example.org/ns/a/sa/b")},
		}, true)
		err := check(t, target, client(l.tls()))
		if status.Code(err) != codes.Unavailable {
			t.Errorf("Check: got %v, want code Unavailable", err)
		}
		if n := rec.count(); n != 0 {
			t.Errorf("interceptor ran %d times, want 0", n)
		}
	})

	t.Run("no client certificate", func(t *testing.T) {
		err := check(t, target, client())
		if status.Code(err) != codes.Unavailable {
			t.Errorf("Check: got %v, want code Unavailable", err)
		}
		if n := rec.count(); n != 0 {
			t.Errorf("interceptor ran %d times, want 0", n)
		}
	})
}

// A TLS server that accepts client certificates without verifying them
// has PeerCertificates but no verified chain: no identity.
func TestFromContextUnverifiedTLS(t *testing.T) {
	ca := newCA(t, "keybroker test CA")
	certFile, keyFile, caFile := serverFiles(t, t.TempDir(), ca, ca)
	cfg, err := authn.ServerTLS(certFile, keyFile, caFile)
	if err != nil {
		t.Fatalf("ServerTLS: %v", err)
	}
	cfg.ClientAuth = tls.RequireAnyClientCert
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rec := serve(t, lis, credentials.NewTLS(cfg))

	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	l := ca.issue(t, &x509.Certificate{Subject: pkix.Name{CommonName: "svc-c"}}, true)
	creds := credentials.NewTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{l.tls()}})
	if err := check(t, lis.Addr().String(), creds); err != nil {
		t.Fatalf("Check: %v", err)
	}
	if c := rec.last(t); c.ok {
		t.Errorf("FromContext = %+v, true; want ok = false", c.id)
	}
}

func TestServerTLSConfig(t *testing.T) {
	ca := newCA(t, "keybroker test CA")
	clientCA := newCA(t, "client CA")
	certFile, keyFile, caFile := serverFiles(t, t.TempDir(), ca, clientCA)
	cfg, err := authn.ServerTLS(certFile, keyFile, caFile)
	if err != nil {
		t.Fatalf("ServerTLS: %v", err)
	}
	if cfg.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Errorf("ClientAuth = %v, want RequireAndVerifyClientCert", cfg.ClientAuth)
	}
	if cfg.MinVersion != tls.VersionTLS12 {
		t.Errorf("MinVersion = %#x, want %#x", cfg.MinVersion, tls.VersionTLS12)
	}
	if len(cfg.Certificates) != 1 {
		t.Fatalf("got %d certificates, want 1", len(cfg.Certificates))
	}
	want := x509.NewCertPool()
	want.AddCert(clientCA.cert)
	if cfg.ClientCAs == nil || !cfg.ClientCAs.Equal(want) {
		t.Error("ClientCAs is not the client CA bundle")
	}
}

func TestServerTLSErrors(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, "keybroker test CA")
	certFile, keyFile, caFile := serverFiles(t, dir, ca, ca)
	other := ca.issue(t, &x509.Certificate{Subject: pkix.Name{CommonName: "other"}}, false)
	otherKey := writeFile(t, dir, "other-key.pem", keyPEM(t, other.key))
	missing := filepath.Join(dir, "missing.pem")
	garbage := writeFile(t, dir, "garbage.pem", []byte("not PEM at all\n"))
	badCert := writeFile(t, dir, "bad-cert.pem", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	badKey := writeFile(t, dir, "bad-key.pem", []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))

	for _, tc := range []struct {
		name                string
		cert, key, clientCA string
		wantIn              []string // file names the error must contain
		wantNotExist        bool
	}{
		{"missing cert", missing, keyFile, caFile, []string{missing}, true},
		{"garbage cert", garbage, keyFile, caFile, []string{garbage}, false},
		{"bad cert", badCert, keyFile, caFile, []string{badCert}, false},
		{"key as cert", keyFile, keyFile, caFile, []string{keyFile}, false},
		{"missing key", certFile, missing, caFile, []string{missing}, true},
		{"garbage key", certFile, garbage, caFile, []string{garbage}, false},
		{"bad key", certFile, badKey, caFile, []string{badKey}, false},
		{"cert as key", certFile, certFile, caFile, []string{certFile}, false},
		{"key of another cert", certFile, otherKey, caFile, []string{certFile, otherKey}, false},
		{"missing CA", certFile, keyFile, missing, []string{missing}, true},
		{"garbage CA", certFile, keyFile, garbage, []string{garbage}, false},
		{"bad CA", certFile, keyFile, badCert, []string{badCert}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := authn.ServerTLS(tc.cert, tc.key, tc.clientCA)
			if err == nil {
				t.Fatalf("ServerTLS = %v, nil; want error", cfg)
			}
			for _, name := range tc.wantIn {
				if !strings.Contains(err.Error(), name) {
					t.Errorf("error %q does not name %s", err, name)
				}
			}
			if got := errors.Is(err, fs.ErrNotExist); got != tc.wantNotExist {
				t.Errorf("errors.Is(%v, fs.ErrNotExist) = %v, want %v", err, got, tc.wantNotExist)
			}
		})
	}
}

func sameIdentity(a, b authn.Identity) bool {
	return a.Unix == b.Unix && a.UID == b.UID && a.GID == b.GID && a.PID == b.PID &&
		a.SPIFFEID == b.SPIFFEID && slices.Equal(a.SPIFFEURIs, b.SPIFFEURIs) &&
		slices.Equal(a.DNSNames, b.DNSNames) && a.CommonName == b.CommonName
}
