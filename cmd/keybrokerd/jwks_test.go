package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/pop"
)

// freeAddr is a loopback address that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// pinnedClient trusts only the certificate in certFile, as
// `curl --cacert certFile` does.
func pinnedClient(t *testing.T, certFile string) *http.Client {
	t.Helper()
	pem, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("%s holds no certificate", certFile)
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

type fetched struct {
	status int
	header http.Header
	body   string
}

func fetch(t *testing.T, c *http.Client, url string, header ...string) fetched {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fetched{resp.StatusCode, resp.Header, string(b)}
}

func jwkSet(t *testing.T, f fetched) []pop.JWK {
	t.Helper()
	if f.status != 200 || f.header.Get("Content-Type") != "application/jwk-set+json" {
		t.Fatalf("%d %s: %s", f.status, f.header.Get("Content-Type"), f.body)
	}
	var set pop.JWKS
	if err := json.Unmarshal([]byte(f.body), &set); err != nil {
		t.Fatalf("not a JWK Set: %v: %s", err, f.body)
	}
	return set.Keys
}

func kidsOf(keys []pop.JWK) []string {
	var out []string
	for _, k := range keys {
		out = append(out, k.Kid)
	}
	return out
}

// TestJWKSOverHTTPS: a keybrokerd process on real SoftHSM2 publishes, over
// HTTPS with a certificate the client pins, the JWKS of the tenant that
// opts in: a key created over gRPC is there as GetPublicKey gives it, a
// second fetch with its ETag is 304, the tenant that does not opt in is
// the same 404 as an unknown one, and a rotation's new kid appears.
func TestJWKSOverHTTPS(t *testing.T) {
	daemon, ctl := binaries(t)
	certDir := t.TempDir()
	if err := ensureDevCert(certDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := devCertPaths(certDir)
	addr := freeAddr(t)
	extra := fmt.Sprintf(`tenants:
  - name: pub
    identities: {uids: [%d]}
    roles: [signer, admin]
    publish_jwks: true
  - name: quiet
    identities: {spiffe_ids: ["spiffe://test/quiet"]}
    roles: [signer]
jwks:
  address: %s
  cert_file: %s
  key_file: %s
`, os.Getuid(), addr, certFile, keyFile)
	_, sock, cfgPath := daemonConfig(t, "jwks", extra)
	p := start(t, daemon, ctl, sock, "--config", cfgPath)

	conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kb := kbv1.NewKeyBrokerClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := kb.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "web", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	pub, err := kb.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: "web"})
	if err != nil {
		t.Fatal(err)
	}
	var want pop.JWK
	if err := json.Unmarshal([]byte(pub.GetJwk()), &want); err != nil {
		t.Fatalf("GetPublicKey's JWK %q: %v", pub.GetJwk(), err)
	}

	c := pinnedClient(t, certFile)
	base := "https://" + addr + "/tenants/pub"
	first := fetch(t, c, base+"/jwks.json")
	if got := jwkSet(t, first); len(got) != 1 || got[0] != want {
		t.Fatalf("JWKS %+v, want GetPublicKey's %+v", got, want)
	}
	if rpc, err := kb.GetJWKS(ctx, &kbv1.GetJWKSRequest{}); err != nil || rpc.GetJwks() != first.body {
		t.Errorf("GetJWKS = %q (%v), HTTPS = %q: want the same bytes", rpc.GetJwks(), err, first.body)
	}
	if got := jwkSet(t, fetch(t, c, base+"/keys/web/jwks.json")); len(got) != 1 || got[0] != want {
		t.Errorf("key web's JWKS %+v, want %+v", got, want)
	}
	if cc := first.header.Get("Cache-Control"); cc != "public, max-age=3600" {
		t.Errorf("Cache-Control %q, want the default cap of 1h (half the 7-day lead is longer)", cc)
	}
	etag := first.header.Get("ETag")
	if again := fetch(t, c, base+"/jwks.json", "If-None-Match", etag); again.status != 304 || again.body != "" {
		t.Errorf("If-None-Match %s: %d %q, want 304 and no body", etag, again.status, again.body)
	}

	unknown := fetch(t, c, "https://"+addr+"/tenants/nobody/jwks.json")
	quiet := fetch(t, c, "https://"+addr+"/tenants/quiet/jwks.json")
	if unknown.status != 404 || quiet.status != 404 || quiet.body != unknown.body {
		t.Errorf("tenant that does not publish: %d %q; unknown tenant: %d %q; want the same 404", quiet.status, quiet.body, unknown.status, unknown.body)
	}
	if bad := fetch(t, c, base+"/keys/web%2F..%2F..%2Fquiet/jwks.json"); bad.status != 400 {
		t.Errorf("encoded slashes: %d, want 400", bad.status)
	}

	rot, err := kb.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "web"})
	if err != nil {
		t.Fatal(err)
	}
	newKid := rot.GetKey().GetActiveKid()
	if newKid == "" || newKid == want.Kid {
		t.Fatalf("rotation: active kid %q, was %q", newKid, want.Kid)
	}
	for _, url := range []string{base + "/jwks.json", base + "/keys/web/jwks.json"} {
		after := fetch(t, c, url, "If-None-Match", etag)
		if kids := kidsOf(jwkSet(t, after)); !slices.Contains(kids, newKid) || !slices.Contains(kids, want.Kid) {
			t.Errorf("%s after the rotation: kids %v, want the new %s and the retired %s", url, kids, newKid, want.Kid)
		}
	}

	// Another certificate than the pinned one is refused by the client:
	// the check above was a real verification.
	otherDir := t.TempDir()
	if err := ensureDevCert(otherDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	other, _ := devCertPaths(otherDir)
	if _, err := pinnedClient(t, other).Get(base + "/jwks.json"); err == nil {
		t.Error("a client pinned to another certificate was served")
	}
	p.stop(t)
}

var jwksURLLine = regexp.MustCompile(`(?m)^\s*jwks url\s+(\S+)$`)
var curlLine = regexp.MustCompile(`(?m)^\s*curl --cacert (\S+) (\S+)$`)

// TestDevModeJWKS: dev mode publishes the dev tenant's JWKS over HTTPS
// with a certificate it makes on the first run and keeps, prints the URL
// and a curl command that work, and the demo key is in the set.
func TestDevModeJWKS(t *testing.T) {
	daemon, ctl := binaries(t)
	dir := shortDir(t)
	sock := filepath.Join(dir, "dev", "keybroker.sock")
	addr := freeAddr(t)
	var certs [][]byte
	for i := range 2 {
		p := start(t, daemon, ctl, sock, "--dev", "--dev-dir", filepath.Join(dir, "dev"), "--jwks-address", addr)
		out := p.stdout.String()
		m, cm := jwksURLLine.FindStringSubmatch(out), curlLine.FindStringSubmatch(out)
		if m == nil || cm == nil {
			t.Fatalf("run %d: no JWKS URL or curl command in the dev banner:\n%s", i, out)
		}
		if want := "https://" + addr + "/tenants/dev/jwks.json"; m[1] != want || cm[2] != want {
			t.Errorf("run %d: URL %q, curl %q; want %q", i, m[1], cm[2], want)
		}
		kid := thumbprintLine.FindStringSubmatch(out)
		if kid == nil {
			t.Fatalf("run %d: no thumbprint in the banner", i)
		}
		if kids := kidsOf(jwkSet(t, fetch(t, pinnedClient(t, cm[1]), m[1]))); !slices.Contains(kids, kid[1]) {
			t.Errorf("run %d: the dev JWKS holds %v, not the demo key's %s", i, kids, kid[1])
		}
		cert, err := os.ReadFile(cm[1])
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, cert)
		if !strings.HasPrefix(cm[1], filepath.Join(dir, "dev", devJWKSDir)) {
			t.Errorf("certificate %s is not in the dev dir", cm[1])
		}
		p.stop(t)
	}
	if !bytes.Equal(certs[0], certs[1]) {
		t.Error("the dev certificate was made again on the second run: a pinned client would break")
	}
	_, keyFile := devCertPaths(filepath.Join(dir, "dev", devJWKSDir))
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("dev certificate key: %v %v, want mode 0600", fi.Mode().Perm(), err)
	}
}

// TestDevCertRenewed: a dev certificate within a day of its end, or
// unreadable, is made again; a good one is kept.
func TestDevCertRenewed(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	if err := ensureDevCert(dir, now); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := devCertPaths(dir)
	read := func() string {
		b, err := os.ReadFile(certFile)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	first := read()
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	leaf := pair.Leaf
	if leaf.VerifyHostname("127.0.0.1") != nil || leaf.VerifyHostname("localhost") != nil || leaf.VerifyHostname("::1") != nil {
		t.Errorf("the dev certificate is not for 127.0.0.1, ::1 and localhost: %v %v", leaf.IPAddresses, leaf.DNSNames)
	}
	if leaf.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("dev certificate key: %v, want ECDSA", leaf.PublicKeyAlgorithm)
	}
	if err := ensureDevCert(dir, now.Add(devCertValidity-48*time.Hour)); err != nil || read() != first {
		t.Errorf("a certificate two days from its end was made again (%v)", err)
	}
	if err := ensureDevCert(dir, now.Add(devCertValidity-12*time.Hour)); err != nil || read() == first {
		t.Errorf("a certificate 12 hours from its end was kept (%v)", err)
	}
	second := read()
	if err := os.WriteFile(keyFile, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := ensureDevCert(dir, now); err != nil || read() == second {
		t.Errorf("a certificate with an unreadable key was kept (%v)", err)
	}
}
