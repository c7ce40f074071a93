package daemon

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/testpki"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

// counting counts every call into the hardware.
type counting struct {
	kms.Backend
	calls atomic.Int64
}

func (c *counting) Generate(ctx context.Context, p kms.Partition, s kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	c.calls.Add(1)
	return c.Backend.Generate(ctx, p, s)
}

func (c *counting) Sign(ctx context.Context, p kms.Partition, h kms.Handle, d []byte, o crypto.SignerOpts) ([]byte, error) {
	c.calls.Add(1)
	return c.Backend.Sign(ctx, p, h, d, o)
}

func (c *counting) Destroy(ctx context.Context, p kms.Partition, h kms.Handle) error {
	c.calls.Add(1)
	return c.Backend.Destroy(ctx, p, h)
}

func (c *counting) Probe(ctx context.Context) error {
	c.calls.Add(1)
	return c.Backend.Probe(ctx)
}

// jwksClient trusts pool only and offers TLS 1.0 up to maxVersion (0:
// the newest), so that the server is the one to refuse old versions.
func jwksClient(pool *x509.CertPool, maxVersion uint16) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS10, MaxVersion: maxVersion}}}
}

func get(t *testing.T, c *http.Client, url string) (int, string, http.Header) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b), resp.Header
}

// TestJWKSListener: an in-process daemon on real SoftHSM2 serves the JWK
// Set of the tenant that publishes over TLS 1.2+, with no hardware call;
// a reload turns publishing off and on and puts a renewed certificate in
// force; a certificate that does not load is refused and the old one kept.
func TestJWKSListener(t *testing.T) {
	ca := testpki.NewCA(t, "jwks")
	dir := t.TempDir()
	certFile, keyFile, _ := ca.ServerFiles(t, dir)
	var hw *counting
	r := startDaemon(t, func(c *config.Config) {
		c.Health.ProbeInterval = time.Hour // no probe among the counted calls
		c.JWKS = config.JWKS{Address: freePort(t), CertFile: certFile, KeyFile: keyFile, MaxAge: time.Hour}
		c.Tenants = []config.Tenant{
			{Name: "pub", Identities: config.Identities{UIDs: []uint32{uint32(os.Getuid())}}, Roles: []string{config.RoleSigner, config.RoleAdmin}, PublishJWKS: true},
			{Name: "quiet", Identities: config.Identities{SPIFFEIDs: []string{"spiffe://test/quiet"}}, Roles: []string{config.RoleSigner}},
		}
	}, Options{WrapBackend: func(b kms.Backend) kms.Backend { hw = &counting{Backend: b}; return hw }})
	ctx := ctx10(t)
	if _, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.Keyring().CreateKey(ctx, "quiet", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	addr := r.d.JWKSAddr()
	if addr == "" {
		t.Fatal("JWKSAddr is empty once Ready")
	}
	base := "https://" + addr
	c := jwksClient(ca.Pool(), 0)
	want, err := r.client.GetJWKS(ctx, &kbv1.GetJWKSRequest{})
	if err != nil {
		t.Fatal(err)
	}
	calls := hw.calls.Load()
	for range 100 {
		code, body, _ := get(t, c, base+"/tenants/pub/jwks.json")
		if code != 200 || body != want.GetJwks() {
			t.Fatalf("GET: %d %q, want 200 and GetJWKS's %q", code, body, want.GetJwks())
		}
		if code, _, _ := get(t, c, base+"/tenants/pub/keys/k/jwks.json"); code != 200 {
			t.Fatalf("GET key k: %d", code)
		}
	}
	if n := hw.calls.Load() - calls; n != 0 {
		t.Errorf("%d hardware calls for 200 JWKS requests, want 0", n)
	}
	_, unknown, _ := get(t, c, base+"/tenants/nobody/jwks.json")
	if code, body, _ := get(t, c, base+"/tenants/quiet/jwks.json"); code != 404 || body != unknown {
		t.Errorf("tenant that does not publish: %d %q, want 404 %q", code, body, unknown)
	}

	// TLS 1.1 and older are refused.
	if _, err := jwksClient(ca.Pool(), tls.VersionTLS11).Get(base + "/tenants/pub/jwks.json"); err == nil || !strings.Contains(err.Error(), "protocol version") {
		t.Errorf("a TLS 1.1 client: %v, want the server's protocol version alert", err)
	}
	if code, _, _ := get(t, jwksClient(ca.Pool(), tls.VersionTLS12), base+"/tenants/pub/jwks.json"); code != 200 {
		t.Errorf("a TLS 1.2 client: %d", code)
	}
	// Headers beyond the bound: 431, and the daemon goes on.
	req, _ := http.NewRequest("GET", base+"/tenants/pub/jwks.json", nil)
	req.Header.Set("X-Big", strings.Repeat("x", 64<<10))
	if resp, err := c.Do(req); err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("64 KiB of headers: %v %v, want 431", resp, err)
	} else {
		resp.Body.Close()
	}

	reload := func(edit func(*config.Config)) error {
		return r.d.Reload(func() (config.Config, error) {
			next := r.cfg
			next.Tenants = append([]config.Tenant(nil), r.cfg.Tenants...)
			edit(&next)
			return next, nil
		})
	}
	// Publishing follows a reload, both ways.
	if err := reload(func(c *config.Config) { c.Tenants[0].PublishJWKS = false; c.Tenants[1].PublishJWKS = true }); err != nil {
		t.Fatal(err)
	}
	if code, body, _ := get(t, c, base+"/tenants/pub/jwks.json"); code != 404 || body != unknown {
		t.Errorf("after opting out: %d %q", code, body)
	}
	if code, _, _ := get(t, c, base+"/tenants/quiet/keys/k/jwks.json"); code != 200 {
		t.Errorf("after opting in: %d", code)
	}

	// A renewed certificate, from another CA, in force after a reload
	// (which also puts the started tenants back); an unreadable one
	// refuses the reload and keeps the last.
	ca2 := testpki.NewCA(t, "jwks-renewed")
	dir2 := t.TempDir()
	cert2, key2, _ := ca2.ServerFiles(t, dir2)
	for _, p := range [][2]string{{cert2, certFile}, {key2, keyFile}} {
		if err := os.Rename(p[0], p[1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := reload(func(*config.Config) {}); err != nil {
		t.Fatal(err)
	}
	c2 := jwksClient(ca2.Pool(), 0)
	if code, _, _ := get(t, c2, base+"/tenants/pub/jwks.json"); code != 200 {
		t.Errorf("with the renewed certificate: %d", code)
	}
	if _, err := jwksClient(ca.Pool(), 0).Get(base + "/tenants/pub/jwks.json"); err == nil {
		t.Error("the old certificate is still served after the reload")
	}
	if err := os.WriteFile(keyFile, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	err = reload(func(*config.Config) {})
	if err == nil || !strings.Contains(err.Error(), "jwks: cert_file") {
		t.Errorf("reload with a broken key file: %v, want it refused naming jwks", err)
	}
	if code, _, _ := get(t, c2, base+"/tenants/pub/jwks.json"); code != 200 {
		t.Errorf("after a refused reload: %d, want the last certificate to serve", code)
	}
}

// TestJWKSStartFailures: a certificate that does not load fails New with a
// message naming jwks; an address in use fails Serve, and nothing is left
// serving.
func TestJWKSStartFailures(t *testing.T) {
	tok := newTokenConfig(t)
	ca := testpki.NewCA(t, "jwks")
	certFile, keyFile, caFile := ca.ServerFiles(t, t.TempDir())

	cfg := tok
	cfg.JWKS = config.JWKS{Address: freePort(t), CertFile: caFile + ".missing", KeyFile: keyFile, MaxAge: time.Hour}
	if _, err := New(cfg, nil); err == nil || !strings.Contains(err.Error(), "jwks: cert_file "+caFile+".missing") {
		t.Errorf("New with a missing certificate: %v", err)
	}
	cfg.JWKS.CertFile, cfg.JWKS.KeyFile = certFile, caFile // a key that is not the certificate's
	if _, err := New(cfg, nil); err == nil || !strings.Contains(err.Error(), "jwks: cert_file") {
		t.Errorf("New with a mismatched key: %v", err)
	}

	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg.JWKS = config.JWKS{Address: busy.Addr().String(), CertFile: certFile, KeyFile: keyFile, MaxAge: time.Hour}
	d, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = d.Serve(ctx)
	if err == nil || !strings.Contains(err.Error(), "jwks: listen tcp "+busy.Addr().String()) || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("Serve on a busy address: %v, want jwks: listen ... address already in use", err)
	}
	if ctx.Err() != nil {
		t.Error("Serve waited for the context instead of failing")
	}
	if _, err := os.Stat(cfg.Socket); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}

// newTokenConfig is a valid configuration on a fresh token.
func newTokenConfig(t *testing.T) config.Config {
	t.Helper()
	dir := shortTempDir(t)
	r := config.Default()
	tok := softhsmtest.NewToken(t)
	r.Socket = filepath.Join(dir, "kb.sock")
	r.StateDir = filepath.Join(dir, "state")
	r.PKCS11.Module, r.PKCS11.TokenLabel, r.PKCS11.PINFile = tok.ModulePath, tok.Label, tok.PINFile
	return r
}
