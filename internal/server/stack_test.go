package server

import (
	"context"
	"crypto"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/authn"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
	"github.com/keybroker/keybroker/tpm"
	"github.com/keybroker/keybroker/tpm/swtpmtest"
)

func TestMain(m *testing.M) { softhsmtest.Main(m) }

// counting wraps a backend and counts the calls that reach it; fail, when
// set, replaces every hardware call's result with an error.
type counting struct {
	kms.Backend
	calls atomic.Int64
	fail  atomic.Pointer[error]
}

func (c *counting) Generate(ctx context.Context, p kms.Partition, s kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	c.calls.Add(1)
	if err := c.fail.Load(); err != nil {
		return nil, nil, *err
	}
	return c.Backend.Generate(ctx, p, s)
}

func (c *counting) Sign(ctx context.Context, p kms.Partition, h kms.Handle, d []byte, o crypto.SignerOpts) ([]byte, error) {
	c.calls.Add(1)
	if err := c.fail.Load(); err != nil {
		return nil, *err
	}
	return c.Backend.Sign(ctx, p, h, d, o)
}

func (c *counting) Destroy(ctx context.Context, p kms.Partition, h kms.Handle) error {
	c.calls.Add(1)
	return c.Backend.Destroy(ctx, p, h)
}

// stack is a server on real SoftHSM2, reached over a unix socket.
type stack struct {
	svc     *Server
	backend *counting
	client  kbv1.KeyBrokerClient
	conn    *grpc.ClientConn
}

// newStack serves the test process's uid as tenant t1 with both roles.
func newStack(t testing.TB) *stack {
	t.Helper()
	return newStackWith(t, []TenantPolicy{{Name: "t1", Identities: authn.Rule{UIDs: []uint32{uint32(os.Getuid())}}, Roles: RoleSigner | RoleAdmin}})
}

func newStackWith(t testing.TB, tenants []TenantPolicy) *stack {
	t.Helper()
	tok := softhsmtest.NewToken(t)
	hb, err := hsm.Open(hsm.Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 8, PoolWaitTimeout: 10 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hb.Close() })
	return newStackOn(t, tenants, hb)
}

// newStackOnTPM is newStack on a fresh swtpm.
func newStackOnTPM(t testing.TB) *stack {
	t.Helper()
	sim := swtpmtest.Start(t)
	tb, err := tpm.Open(context.Background(), tpm.Config{Socket: sim.Socket, StateDir: t.TempDir(), Timeout: 10 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tb.Close() })
	return newStackOn(t, []TenantPolicy{{Name: "t1", Identities: authn.Rule{UIDs: []uint32{uint32(os.Getuid())}}, Roles: RoleSigner | RoleAdmin}}, tb)
}

func newStackOn(t testing.TB, tenants []TenantPolicy, backend kms.Backend) *stack {
	t.Helper()
	var err error
	b := &counting{Backend: backend}
	var ringBackend kms.Backend = b
	if at, ok := backend.(kms.Attester); ok {
		// Keep the optional capability visible through the wrapper.
		ringBackend = struct {
			*counting
			kms.Attester
		}{b, at}
	}
	st, err := store.Open(filepath.Join(t.TempDir(), "keybroker.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	ring, err := keyring.New(keyring.Options{Backend: ringBackend, BackendName: "test", Store: st})
	if err != nil {
		t.Fatal(err)
	}
	access, err := NewAccess(tenants)
	if err != nil {
		t.Fatal(err)
	}
	svc := New(Options{Ring: ring, Access: access})
	g := grpc.NewServer(append(svc.ServerOptions(), grpc.Creds(authn.UnixCredentials()), grpc.UnaryInterceptor(svc.UnaryInterceptor))...)
	kbv1.RegisterKeyBrokerServer(g, svc)

	// Unix socket paths are limited to 107 bytes; t.TempDir can be longer.
	dir, err := os.MkdirTemp("", "kb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &stack{svc: svc, backend: b, client: kbv1.NewKeyBrokerClient(conn), conn: conn}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// tenantsForTest is the single tenant of newStack: this process's uid.
func (*stack) tenantsForTest() []TenantPolicy {
	return []TenantPolicy{{Name: "t1", Identities: authn.Rule{UIDs: []uint32{uint32(os.Getuid())}}, Roles: RoleSigner | RoleAdmin}}
}
