// Package testdaemon starts an in-process keybrokerd on a fresh SoftHSM2
// token for tests of the SDK and the examples. Test code only; the calling
// package's TestMain must run softhsmtest.Main.
package testdaemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/daemon"
	"github.com/keybroker/keybroker/softhsm"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

// Daemon is a running in-process keybrokerd.
type Daemon struct {
	Socket string
	Config config.Config
}

// Start serves the test process's uid (tenant "default", both roles) on a
// unix socket until the test ends. edit, if given, adjusts the config.
func Start(t testing.TB, edit ...func(*config.Config)) *Daemon {
	t.Helper()
	tok := softhsmtest.NewToken(t)
	dir, err := os.MkdirTemp("", "kbt") // unix socket paths are short
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Socket = filepath.Join(dir, "kb.sock")
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.PKCS11.Module, cfg.PKCS11.TokenLabel, cfg.PKCS11.PINFile = tok.ModulePath, tok.Label, tok.PINFile
	for _, f := range edit {
		f(&cfg)
	}
	d, err := daemon.New(cfg, nil)
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	lis, err := d.Listen()
	if err != nil {
		d.Close()
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.ServeListener(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("testdaemon: %v", err)
		}
		d.Close()
		os.RemoveAll(dir)
	})
	return &Daemon{Socket: cfg.Socket, Config: cfg}
}

// shared is the daemon Main started.
var shared *Daemon

// Shared is the daemon Main started for the whole process (nil without
// Main), for tests that read its state directory or audit log.
func Shared() *Daemon { return shared }

// Main runs a package's tests and examples against one daemon for the whole
// process, on a token provisioned under a temporary directory, with
// KEYBROKER_SOCKET pointing at it (so client.Dial("") finds it). Call it
// from TestMain instead of softhsmtest.Main.
func Main(m *testing.M) {
	code, err := runMain(m)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testdaemon: %v\n", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func runMain(m *testing.M) (int, error) {
	dir, err := os.MkdirTemp("", "kbm")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	tok, err := softhsm.Provision(filepath.Join(dir, "hsm"), "testdaemon")
	if err != nil {
		return 0, err
	}
	cfg := config.Default()
	cfg.Socket = filepath.Join(dir, "kb.sock")
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.PKCS11.Module, cfg.PKCS11.TokenLabel, cfg.PKCS11.PINFile = tok.ModulePath, tok.Label, tok.PINFile
	cfg.PKCS11.SoftHSM2Conf = tok.ConfigPath
	d, err := daemon.New(cfg, nil)
	if err != nil {
		return 0, err
	}
	defer d.Close()
	lis, err := d.Listen()
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.ServeListener(ctx, lis) }()
	os.Setenv("KEYBROKER_SOCKET", cfg.Socket)
	shared = &Daemon{Socket: cfg.Socket, Config: cfg}
	code := m.Run()
	cancel()
	if err := <-done; err != nil {
		return code, err
	}
	return code, nil
}
