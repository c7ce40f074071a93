package client_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/internal/testpki"
	"github.com/keybroker/keybroker/pop"
)

// issue has the daemon make a CSR for the version of s, has inter issue it,
// and imports the chain [leaf, inter].
func issue(t *testing.T, c *client.Client, name string, version uint32, inter *testpki.CA) []byte {
	t.Helper()
	ctx := context.Background()
	csr, err := c.API().CreateCertificateRequest(ctx, &kbv1.CreateCertificateRequestRequest{Name: name, Version: version, CommonName: "client-" + name})
	if err != nil {
		t.Fatal(err)
	}
	leaf := inter.SignCSR(t, csr.CsrDer, time.Time{})
	if _, err := c.API().ImportCertificate(ctx, &kbv1.ImportCertificateRequest{Name: name, Version: csr.Version, CertificateChain: [][]byte{leaf, inter.Cert.Raw}}); err != nil {
		t.Fatal(err)
	}
	return leaf
}

// mtlsServer requires a client certificate that chains to root and
// records the x5t#S256 of the leaf it saw.
func mtlsServer(t *testing.T, root *testpki.CA, v uint16, seen *atomic.Value) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen.Store(pop.X5TS256(r.TLS.PeerCertificates[0].Raw))
		io.WriteString(w, "ok")
	}))
	srv.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: root.Pool(), MinVersion: v, MaxVersion: v}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func mtlsGet(srv *httptest.Server, v uint16, cfg *tls.Config) error {
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	cfg.RootCAs, cfg.MinVersion, cfg.MaxVersion = pool, v, v
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get(srv.URL)
	if err != nil {
		return err
	}
	return resp.Body.Close()
}

// TestTLSCertificateImportedChain: a CA-issued chain (root → intermediate →
// the key) imported into the daemon is what the SDK's tls.Certificate
// presents; a Go TLS 1.3 and 1.2 server that requires client certificates
// from the root accepts it, and the handshake signs in the daemon.
func TestTLSCertificateImportedChain(t *testing.T) {
	c := dial(t)
	ctx := context.Background()
	root := testpki.NewCA(t, "root")
	inter := root.Intermediate(t, "issuing CA")
	for _, alg := range []kbv1.Algorithm{kbv1.Algorithm_ALGORITHM_ES256, kbv1.Algorithm_ALGORITHM_PS256, kbv1.Algorithm_ALGORITHM_RS256} {
		s := newKey(t, c, alg)
		if _, err := s.TLSCertificate(ctx); !errors.Is(err, client.ErrNoCertificate) {
			t.Errorf("%v: TLSCertificate before an import: %v, want ErrNoCertificate", alg, err)
		}
		leaf := issue(t, c, s.Name(), 0, inter)
		cert, err := s.TLSCertificate(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(cert.Certificate) != 2 || cert.Leaf == nil || string(cert.Leaf.Raw) != string(leaf) || cert.PrivateKey != s {
			t.Fatalf("%v: tls.Certificate of %d certificates, leaf %v, key %T", alg, len(cert.Certificate), cert.Leaf != nil, cert.PrivateKey)
		}
		for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
			var seen atomic.Value
			srv := mtlsServer(t, root, v, &seen)
			if err := mtlsGet(srv, v, &tls.Config{Certificates: []tls.Certificate{cert}}); err != nil {
				t.Fatalf("%v TLS %x: %v", alg, v, err)
			}
			if seen.Load() != pop.X5TS256(leaf) {
				t.Errorf("%v TLS %x: server saw %v, want the imported leaf", alg, v, seen.Load())
			}
			// Without the intermediate the server cannot build the path:
			// the chain is what makes it work.
			bare := cert
			bare.Certificate = cert.Certificate[:1]
			if err := mtlsGet(srv, v, &tls.Config{Certificates: []tls.Certificate{bare}}); err == nil {
				t.Errorf("%v TLS %x: the leaf alone was accepted; the test proves nothing", alg, v)
			}
		}
	}
}

// TestGetClientCertificateFollowsRotation: the client presents the ACTIVE
// version's chain, and after a rotation the new version's.
func TestGetClientCertificateFollowsRotation(t *testing.T) {
	c := dial(t)
	ctx := context.Background()
	root := testpki.NewCA(t, "root")
	inter := root.Intermediate(t, "issuing CA")
	s := newKey(t, c, kbv1.Algorithm_ALGORITHM_ES256)
	v1 := issue(t, c, s.Name(), 1, inter)
	if _, err := c.API().RotateKey(ctx, &kbv1.RotateKeyRequest{Name: s.Name()}); err != nil {
		t.Fatal(err)
	}
	// The retired version keeps its chain; the new ACTIVE one has none yet.
	var seen atomic.Value
	srv := mtlsServer(t, root, tls.VersionTLS13, &seen)
	cfg := func() *tls.Config { return &tls.Config{GetClientCertificate: c.GetClientCertificate(s.Name())} }
	if err := mtlsGet(srv, tls.VersionTLS13, cfg()); err == nil {
		t.Error("handshake succeeded although the ACTIVE version has no certificate")
	}
	if cert, err := s.TLSCertificate(ctx); err != nil || string(cert.Leaf.Raw) != string(v1) {
		t.Errorf("version 1's chain after rotation: %v", err)
	}
	v2 := issue(t, c, s.Name(), 2, inter)
	if err := mtlsGet(srv, tls.VersionTLS13, cfg()); err != nil {
		t.Fatal(err)
	}
	if seen.Load() != pop.X5TS256(v2) {
		t.Errorf("server saw %v, want version 2's leaf", seen.Load())
	}
	active, err := c.TLSCertificate(ctx, s.Name())
	if err != nil || string(active.Leaf.Raw) != string(v2) || active.PrivateKey.(*client.Signer).Version() != 2 {
		t.Errorf("Client.TLSCertificate after rotation: %v", err)
	}
}
