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
	"sync"
	"testing"

	"github.com/miekg/pkcs11"

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
//
// The token is initialised in this process (C_InitToken on the free slot),
// not by softhsm2-util: libsofthsm2 reads the token directory only at
// C_Initialize, so a token made by another process stays invisible to a
// PKCS#11 context already open here, while one made in-process is visible at
// once, to contexts open now and later.
func NewToken(t testing.TB) *softhsm.Token {
	t.Helper()
	tok, create := NewTokenLater(t)
	create()
	return tok
}

// NewTokenLater is NewToken in two steps, for a token that appears while
// the code under test runs (a token plugged in): it returns the token's
// label, PIN and PIN file, and create, which initialises the token.
func NewTokenLater(t testing.TB) (tok *softhsm.Token, create func()) {
	t.Helper()
	if dir == "" {
		t.Fatalf("softhsmtest: Main was not called; add `func TestMain(m *testing.M) { softhsmtest.Main(m) }` to the package's tests")
	}
	want := filepath.Join(dir, configName)
	if got := os.Getenv("SOFTHSM2_CONF"); got != want {
		t.Fatalf("softhsmtest: SOFTHSM2_CONF: got %q, want %q (set by softhsmtest.Main; libsofthsm2 reads it once per process)", got, want)
	}
	// The first token of the process is made by softhsm.Provision, which
	// also writes the configuration and the token directory.
	baseOnce.Do(func() { base, baseErr = softhsm.Provision(dir, "softhsmtest-base") })
	if errors.Is(baseErr, softhsm.ErrNotInstalled) {
		t.Fatalf("softhsmtest: this test needs SoftHSM2: %v", baseErr)
	}
	if baseErr != nil {
		t.Fatalf("softhsmtest: %v", baseErr)
	}
	tok = &softhsm.Token{
		Dir:        base.Dir,
		ConfigPath: base.ConfigPath,
		Label:      "t-" + randomHex(t, 8),
		PIN:        randomHex(t, 16),
		ModulePath: base.ModulePath,
	}
	tok.PINFile = filepath.Join(dir, tok.Label+".pin")
	if err := os.WriteFile(tok.PINFile, []byte(tok.PIN), 0o600); err != nil {
		t.Fatalf("softhsmtest: %v", err)
	}
	soPIN := randomHex(t, 16)
	return tok, func() {
		t.Helper()
		if err := initToken(tok, soPIN); err != nil {
			t.Fatalf("softhsmtest: %v", err)
		}
		t.Cleanup(func() {
			if err := tok.Delete(); err != nil {
				t.Errorf("softhsmtest: %v", err)
			}
		})
	}
}

var (
	baseOnce sync.Once
	base     *softhsm.Token
	baseErr  error
	initMu   sync.Mutex
)

// initToken initialises tok on the free slot of the module, in-process.
func initToken(tok *softhsm.Token, soPIN string) error {
	initMu.Lock()
	defer initMu.Unlock()
	p := pkcs11.New(tok.ModulePath)
	if p == nil {
		return fmt.Errorf("cannot load %s", tok.ModulePath)
	}
	defer p.Destroy()
	// Already initialised means a context is open in this process (crypto11
	// keeps one per module): use it and leave it initialised.
	err := p.Initialize()
	if err == nil {
		defer p.Finalize()
	} else if !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return fmt.Errorf("C_Initialize: %w", err)
	}
	slots, err := p.GetSlotList(false)
	if err != nil {
		return fmt.Errorf("C_GetSlotList: %w", err)
	}
	for _, slot := range slots {
		info, err := p.GetTokenInfo(slot)
		if err != nil || info.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			continue
		}
		if err := p.InitToken(slot, soPIN, tok.Label); err != nil {
			return fmt.Errorf("C_InitToken: %w", err)
		}
		s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return fmt.Errorf("C_OpenSession: %w", err)
		}
		defer p.CloseSession(s)
		if err := p.Login(s, pkcs11.CKU_SO, soPIN); err != nil {
			return fmt.Errorf("C_Login (SO): %w", err)
		}
		defer p.Logout(s)
		if err := p.InitPIN(s, tok.PIN); err != nil {
			return fmt.Errorf("C_InitPIN: %w", err)
		}
		return nil
	}
	return errors.New("no free slot")
}

func randomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("softhsmtest: %v", err)
	}
	return hex.EncodeToString(b)
}
