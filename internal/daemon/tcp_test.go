package daemon

import (
	"context"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/testpki"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

// freePort returns a loopback address that was free a moment ago.
func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestTenantsOverBothListeners: a daemon with two tenants, one reached over
// the unix socket by uid, one over TCP by client certificate; each sees
// only its keys, an unmapped certificate is refused, and every call is in
// an audit log that verifies.
func TestTenantsOverBothListeners(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	dir, err := os.MkdirTemp("", "kbd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ca := testpki.NewCA(t, "clients")
	certFile, keyFile, caFile := ca.ServerFiles(t, dir)
	cfg := config.Default()
	cfg.Socket = filepath.Join(dir, "kb.sock")
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.PKCS11.Module, cfg.PKCS11.TokenLabel, cfg.PKCS11.PINFile = tok.ModulePath, tok.Label, tok.PINFile
	cfg.TCP = config.TCP{Address: freePort(t), CertFile: certFile, KeyFile: keyFile, ClientCAFile: caFile}
	cfg.Tenants = []config.Tenant{
		{Name: "local", Identities: config.Identities{UIDs: []uint32{uint32(os.Getuid())}}, Roles: []string{config.RoleSigner, config.RoleAdmin}},
		{Name: "remote", Identities: config.Identities{SPIFFEIDs: []string{"spiffe://test/remote"}}, Roles: []string{config.RoleSigner, config.RoleAdmin}},
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	d, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx) }()
	stop := sync.OnceFunc(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		d.Close()
	})
	defer stop()

	cctx, ccancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer ccancel()
	unixConn, err := grpc.NewClient("unix:"+cfg.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer unixConn.Close()
	local := kbv1.NewKeyBrokerClient(unixConn)
	dialTLS := func(leaf testpki.Leaf) kbv1.KeyBrokerClient {
		cert, _, _ := ca.Issue(t, leaf)
		conn, err := grpc.NewClient(cfg.TCP.Address, grpc.WithTransportCredentials(credentials.NewTLS(
			&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: ca.Pool(), ServerName: "localhost"})))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return kbv1.NewKeyBrokerClient(conn)
	}
	remote := dialTLS(testpki.Leaf{CommonName: "r", URIs: []string{"spiffe://test/remote"}})
	stranger := dialTLS(testpki.Leaf{CommonName: "s", URIs: []string{"spiffe://test/stranger"}})

	if _, err := local.CreateKey(cctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}, grpc.WaitForReady(true)); err != nil {
		t.Fatal(err)
	}
	var remoteErr error
	for i := 0; i < 50; i++ { // the TCP listener starts with Serve
		if _, remoteErr = remote.GetJWKS(cctx, &kbv1.GetJWKSRequest{}); status.Code(remoteErr) != codes.Unavailable {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if remoteErr != nil {
		t.Fatalf("remote over mTLS: %v", remoteErr)
	}
	if _, err := remote.GetKey(cctx, &kbv1.GetKeyRequest{Name: "k"}); status.Code(err) != codes.NotFound {
		t.Errorf("remote sees local's key: %v", err)
	}
	if _, err := remote.CreateKey(cctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Errorf("remote creates its own k: %v", err)
	}
	if _, err := stranger.GetJWKS(cctx, &kbv1.GetJWKSRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("unmapped certificate: %v, want Unauthenticated", err)
	}
	lk, err := local.ListKeys(cctx, &kbv1.ListKeysRequest{})
	if err != nil || len(lk.Keys) != 1 {
		t.Errorf("local ListKeys: %v %v", lk, err)
	}

	stop()
	f, err := os.Open(cfg.AuditPath())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	head, err := audit.ReadHead(cfg.AuditPath() + ".head")
	if err != nil {
		t.Fatal(err)
	}
	n, err := audit.Verify(f, &head)
	if err != nil || n < 6 {
		t.Errorf("audit log: %d records, %v", n, err)
	}
}
