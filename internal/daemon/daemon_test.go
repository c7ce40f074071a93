package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

func TestMain(m *testing.M) { softhsmtest.Main(m) }

// TestServeHealthReflectionStop starts a daemon in-process on real
// SoftHSM2: health is SERVING, reflection lists the API, and cancelling the
// context stops it and removes the socket.
func TestServeHealthReflectionStop(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	dir, err := os.MkdirTemp("", "kbd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	cfg := config.Default()
	cfg.Socket = filepath.Join(dir, "kb.sock")
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.PKCS11.Module = tok.ModulePath
	cfg.PKCS11.TokenLabel = tok.Label
	cfg.PKCS11.PINFile = tok.PINFile
	d, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx) }()

	conn, err := grpc.NewClient("unix:"+cfg.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ccancel()
	hc := healthpb.NewHealthClient(conn)
	for _, svc := range []string{"", kbv1.KeyBroker_ServiceDesc.ServiceName} {
		resp, err := hc.Check(cctx, &healthpb.HealthCheckRequest{Service: svc}, grpc.WaitForReady(true))
		if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health %q: %v %v", svc, resp, err)
		}
	}
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(cctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, s := range resp.GetListServicesResponse().GetService() {
		found = found || s.Name == "keybroker.v1.KeyBroker"
	}
	if !found {
		t.Errorf("reflection does not list keybroker.v1.KeyBroker: %v", resp)
	}

	ccancel() // ends the reflection stream, so the graceful stop need not wait for it
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if _, err := os.Stat(cfg.Socket); !os.IsNotExist(err) {
		t.Errorf("socket still there after stop: %v", err)
	}
}

func TestNewRefusesInvalidConfig(t *testing.T) {
	cfg := config.Default()
	cfg.Backend = "nope"
	if _, err := New(cfg, nil); err == nil {
		t.Fatal("New accepted an invalid config")
	}
}

// TestNewClassifiesStartErrors: a PIN the token refuses is ErrPINRefused,
// and a configuration or PIN file at fault is ErrConfig, so that main exits
// with a status systemd does not restart on (a retried wrong PIN locks the
// token); a token that is missing is neither (it may come back).
func TestNewClassifiesStartErrors(t *testing.T) {
	tok, own := softhsmtest.NewToken(t), softhsmtest.NewToken(t)
	dir := t.TempDir()
	base := config.Default()
	base.Socket = filepath.Join(dir, "kb.sock")
	base.StateDir = filepath.Join(dir, "state")
	base.PKCS11.Module, base.PKCS11.TokenLabel, base.PKCS11.PINFile = tok.ModulePath, tok.Label, tok.PINFile
	wrongPIN := filepath.Join(dir, "wrong.pin")
	if err := os.WriteFile(wrongPIN, []byte("not-the-pin-1234\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name       string
		edit       func(*config.Config)
		pin, confg bool
	}{
		{"wrong PIN", func(c *config.Config) { c.PKCS11.PINFile = wrongPIN }, true, false},
		{"wrong PIN of a tenant's own token", func(c *config.Config) {
			c.Tenants = []config.Tenant{{Name: "t", Identities: config.Identities{UIDs: []uint32{uint32(os.Getuid())}}, Roles: []string{"signer", "admin"},
				PKCS11: &config.TenantToken{TokenLabel: own.Label, PINFile: wrongPIN}}}
		}, true, false},
		{"no PIN file", func(c *config.Config) { c.PKCS11.PINFile = filepath.Join(dir, "nope") }, false, true},
		{"invalid", func(c *config.Config) { c.Limits.CallTimeout = -1 }, false, true},
		{"no such token", func(c *config.Config) { c.PKCS11.TokenLabel = "no-such-token" }, false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := base
			c.edit(&cfg)
			_, err := New(cfg, nil)
			if err == nil {
				t.Fatal("New succeeded")
			}
			if errors.Is(err, ErrPINRefused) != c.pin || errors.Is(err, ErrConfig) != c.confg {
				t.Errorf("New: %v; ErrPINRefused %v (want %v), ErrConfig %v (want %v)",
					err, errors.Is(err, ErrPINRefused), c.pin, errors.Is(err, ErrConfig), c.confg)
			}
		})
	}
}
