package daemon

import (
	"crypto/sha256"
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/testpki"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

// TestTenantTokenDownKeepsDaemonServing: when one tenant's own PKCS#11
// token is unreachable, health stays SERVING and the systemd watchdog keeps
// being pinged (they follow the shared token), the other tenants are
// served, and the failure is logged and shown in keybroker_tenant_token_up.
func TestTenantTokenDownKeepsDaemonServing(t *testing.T) {
	notes := fakeNotifySocket(t)
	t.Setenv("WATCHDOG_USEC", "400000") // pings every 200 ms
	t.Setenv("WATCHDOG_PID", "")
	own := softhsmtest.NewToken(t)
	var fb *flaky
	r := startDaemon(t, func(c *config.Config) {
		c.Health.ProbeInterval = time.Hour
		c.Admin.Address = "127.0.0.1:0"
		c.Tenants = []config.Tenant{
			{Name: "me", Identities: config.Identities{UIDs: []uint32{uint32(os.Getuid())}}, Roles: []string{"signer", "admin"}},
			{Name: "usbhsm", Identities: config.Identities{UIDs: []uint32{uint32(os.Getuid()) + 1}}, Roles: []string{"signer"},
				PKCS11: &config.TenantToken{TokenLabel: own.Label, PINFile: own.PINFile}},
		}
	}, Options{WrapBackend: func(b kms.Backend) kms.Backend {
		rt := b.(*kms.Router)
		fb = &flaky{Backend: rt.ByTenant["usbhsm"]}
		rt.ByTenant["usbhsm"] = fb
		return rt
	}})
	ctx := ctx10(t)
	if _, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	const upMetric = `keybroker_tenant_token_up{tenant="usbhsm"}`
	if m := scrape(t, r.d.AdminAddr()); !strings.Contains(m, upMetric+" 1") {
		t.Errorf("metrics lack %s 1:\n%s", upMetric, grep(m, "tenant_token"))
	}

	fb.down.Store(true) // tenant usbhsm's own token is unplugged
	waitLog(t, r, "tenant's own PKCS#11 token unreachable")
	checkHealth(t, r, healthpb.HealthCheckResponse_SERVING)
	for len(notes) > 0 {
		<-notes
	}
	pings := 0
	for deadline := time.After(time.Second); pings == 0; {
		select {
		case m := <-notes:
			if hasLine(m, "WATCHDOG=1") {
				pings++
			}
		case <-deadline:
			t.Fatal("no WATCHDOG=1 while one tenant's own token is down: systemd would kill the daemon for every tenant")
		}
	}
	if m := scrape(t, r.d.AdminAddr()); !strings.Contains(m, upMetric+" 0") {
		t.Errorf("metrics lack %s 0:\n%s", upMetric, grep(m, "tenant_token"))
	}
	d := sha256.Sum256([]byte("x"))
	if _, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d[:]}); err != nil {
		t.Errorf("tenant me (shared token) Sign: %v", err)
	}

	fb.down.Store(false)
	waitLog(t, r, "tenant's own PKCS#11 token reachable again")
	if m := scrape(t, r.d.AdminAddr()); !strings.Contains(m, upMetric+" 1") {
		t.Errorf("metrics lack %s 1 after the token came back:\n%s", upMetric, grep(m, "tenant_token"))
	}
}

func waitLog(t *testing.T, r *running, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(r.log.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("log does not say %q within 5s:\n%s", want, r.log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestTenantTokenMissingAtStart: a tenant's own token that is not there
// when the daemon starts does not stop it: the other tenants are served at
// once, that tenant's calls are UNAVAILABLE, and once the token appears
// the daemon opens it in the background and serves that tenant too,
// without a restart.
func TestTenantTokenMissingAtStart(t *testing.T) {
	own, plugIn := softhsmtest.NewTokenLater(t)
	ca := testpki.NewCA(t, "clients")
	var addr string
	r := startDaemon(t, func(c *config.Config) {
		certFile, keyFile, caFile := ca.ServerFiles(t, filepath.Dir(c.Socket))
		addr = freePort(t)
		c.TCP = config.TCP{Address: addr, CertFile: certFile, KeyFile: keyFile, ClientCAFile: caFile}
		c.Tenants = []config.Tenant{
			{Name: "me", Identities: config.Identities{UIDs: []uint32{uint32(os.Getuid())}}, Roles: []string{"signer", "admin"}},
			{Name: "late", Identities: config.Identities{SPIFFEIDs: []string{"spiffe://test/late"}}, Roles: []string{"signer", "admin"},
				PKCS11: &config.TenantToken{TokenLabel: own.Label, PINFile: own.PINFile}},
		}
	}, Options{})
	ctx := ctx10(t)
	d := sha256.Sum256([]byte("x"))
	if _, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d[:]}); err != nil {
		t.Fatalf("tenant me (shared token) Sign: %v", err)
	}
	checkHealth(t, r, healthpb.HealthCheckResponse_SERVING)

	cert, _, _ := ca.Issue(t, testpki.Leaf{CommonName: "late", URIs: []string{"spiffe://test/late"}})
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(
		&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: ca.Pool(), ServerName: "localhost"})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	late := kbv1.NewKeyBrokerClient(conn)
	_, err = late.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}, grpc.WaitForReady(true))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("tenant late CreateKey with its token missing: %v, want UNAVAILABLE", err)
	}
	waitLog(t, r, "tenant's own PKCS#11 token cannot be opened")

	plugIn()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err = late.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
		if err == nil {
			break
		}
		if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			t.Fatalf("tenant late CreateKey after its token appeared: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := late.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d[:]}); err != nil {
		t.Errorf("tenant late Sign: %v", err)
	}
	waitLog(t, r, "tenant's own PKCS#11 token opened")
}
