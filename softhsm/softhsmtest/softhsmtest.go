// Package softhsmtest provides SoftHSM2 tokens to tests.
//
// libsofthsm2 reads SOFTHSM2_CONF once per process, at C_Initialize, so all
// tokens of one test process share one configuration and token directory: a
// package calls Main from its TestMain, and each test takes a fresh token with
// NewToken. It also scans the token directory only at C_Initialize, so a
// PKCS#11 context sees the tokens provisioned before it was opened (or before
// its last C_Finalize + C_Initialize), not later ones. Only _test.go files may
// import this package.
package softhsmtest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/keybroker/keybroker/softhsm"
)

// dir is the process-wide token directory; Main sets it before any test runs.
var dir string

// configName matches softhsm.Token.ConfigPath.
const configName = "softhsm2.conf"

// Main is called from a package's TestMain:
//
//	func TestMain(m *testing.M) { softhsmtest.Main(m) }
//
// It creates one temporary directory for the whole test process, points
// SOFTHSM2_CONF in the process environment at its configuration file, runs
// the tests, removes the directory and exits with the tests' exit code.
func Main(m *testing.M) {
	d, err := os.MkdirTemp("", "softhsmtest-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "softhsmtest: %v\n", err)
		os.Exit(1)
	}
	dir = d
	if err := os.Setenv("SOFTHSM2_CONF", filepath.Join(dir, configName)); err != nil {
		fmt.Fprintf(os.Stderr, "softhsmtest: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	if err := os.RemoveAll(dir); err != nil {
		fmt.Fprintf(os.Stderr, "softhsmtest: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// NewToken provisions a fresh token with a unique label in the process-wide
// directory and deletes it when the test ends. It fails the test, rather than
// skipping it, when SoftHSM2 is missing or Main was not called.
func NewToken(t testing.TB) *softhsm.Token {
	t.Helper()
	if dir == "" {
		t.Fatalf("softhsmtest: Main was not called; add `func TestMain(m *testing.M) { softhsmtest.Main(m) }` to the package's tests")
	}
	want := filepath.Join(dir, configName)
	if got := os.Getenv("SOFTHSM2_CONF"); got != want {
		t.Fatalf("softhsmtest: SOFTHSM2_CONF: got %q, want %q (set by softhsmtest.Main; libsofthsm2 reads it once per process)", got, want)
	}
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("softhsmtest: %v", err)
	}
	tok, err := softhsm.Provision(dir, "t-"+hex.EncodeToString(b[:]))
	if errors.Is(err, softhsm.ErrNotInstalled) {
		t.Fatalf("softhsmtest: this test needs SoftHSM2: %v", err)
	}
	if err != nil {
		t.Fatalf("softhsmtest: %v", err)
	}
	t.Cleanup(func() {
		if err := tok.Delete(); err != nil {
			t.Errorf("softhsmtest: %v", err)
		}
	})
	return tok
}
