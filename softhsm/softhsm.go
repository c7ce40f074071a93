// Package softhsm provisions SoftHSM2 tokens for dev mode and tests.
//
// It drives the softhsm2-util command line tool with a private configuration
// file (SOFTHSM2_CONF) so that tokens live in a directory of the caller's
// choosing and never in the system-wide /var/lib/softhsm. It does not load
// libsofthsm2.so itself; callers hand Token.ModulePath and Token.PINFile to the
// PKCS#11 backend. Only dev-mode wiring, tests and test helpers
// (softhsm/softhsmtest) may import it; production code talks to a real HSM.
package softhsm

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"
)

// ErrNotInstalled reports that SoftHSM2 (libsofthsm2.so or softhsm2-util) is
// missing on this machine.
var ErrNotInstalled = errors.New("softhsm: SoftHSM2 is not installed")

// installHint says how to fix ErrNotInstalled.
const installHint = "install it with `sudo apt-get install softhsm2` or `scripts/install-deps.sh softhsm2`"

// utilName is the SoftHSM2 administration tool.
const utilName = "softhsm2-util"

// envConf is the variable libsofthsm2 and softhsm2-util read their
// configuration file from.
const envConf = "SOFTHSM2_CONF"

// maxLabelLen is the size of CK_TOKEN_INFO.label (PKCS#11 v2.40 base spec,
// section 3.2, "CK_TOKEN_INFO"): 32 bytes, padded with blanks.
const maxLabelLen = 32

// modulePaths are the places distributions install libsofthsm2.so, most
// likely first.
var modulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",                       // Debian, Ubuntu, Arch, Alpine
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",      // Debian/Ubuntu multiarch
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",     // Debian/Ubuntu multiarch
	"/usr/lib64/pkcs11/libsofthsm2.so",                      // Fedora, RHEL
	"/usr/lib64/softhsm/libsofthsm2.so",                     // openSUSE
	"/usr/lib/pkcs11/libsofthsm2.so",                        // Fedora, 32-bit
	"/usr/local/lib/softhsm/libsofthsm2.so",                 // source builds, Homebrew on Intel macOS
	"/opt/homebrew/lib/softhsm/libsofthsm2.so",              // Homebrew on Apple silicon
	"/home/linuxbrew/.linuxbrew/lib/softhsm/libsofthsm2.so", // Homebrew on Linux
}

// ModulePath returns the path of libsofthsm2.so, searching the usual
// Debian/Ubuntu/Fedora/Homebrew locations. If none exists it returns an error
// wrapping ErrNotInstalled that says how to install SoftHSM2.
func ModulePath() (string, error) {
	for _, p := range modulePaths {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w: libsofthsm2.so not found in %s; %s",
		ErrNotInstalled, strings.Join(modulePaths, ", "), installHint)
}

// utilPath returns the path of softhsm2-util, or an error wrapping
// ErrNotInstalled.
func utilPath() (string, error) {
	p, err := exec.LookPath(utilName)
	if err != nil {
		return "", fmt.Errorf("%w: %s not found on PATH; %s", ErrNotInstalled, utilName, installHint)
	}
	return p, nil
}

// Token is a provisioned SoftHSM2 token.
type Token struct {
	Dir        string // the directory holding everything below
	ConfigPath string // the SOFTHSM2_CONF file: Dir/softhsm2.conf, tokens in Dir/tokens
	Label      string
	PIN        string // user PIN; never log it
	PINFile    string // Dir/<Label>.pin, mode 0600, the PIN without a trailing newline
	ModulePath string // libsofthsm2.so
}

// Env returns "SOFTHSM2_CONF=<ConfigPath>" for a child process environment.
func (t *Token) Env() string {
	return envConf + "=" + t.ConfigPath
}

// String names the token without its PIN, so that printing a Token with %v
// or a logger does not leak the PIN.
func (t *Token) String() string {
	return fmt.Sprintf("softhsm token %q in %s", t.Label, t.Dir)
}

// mu serialises Provision and Delete within this process: softhsm2-util
// happily creates two tokens with the same label, so the check for an
// existing token and its creation must not interleave. Processes sharing one
// dir must not provision concurrently.
var mu sync.Mutex

// Provision creates the token label under dir (created with mode 0700) if it
// does not exist yet, or reuses it: when dir's token directory already holds a
// token with that label and its PIN file exists, Provision returns it
// unchanged (same PIN). Several tokens may be provisioned in the same dir;
// they share one configuration file and token directory.
//
// A new token gets a random user PIN, written to the PIN file, and a random SO
// PIN that is thrown away. softhsm2-util runs with SOFTHSM2_CONF set to the
// token's configuration in its own environment only; the environment of this
// process is left alone. Errors never contain a PIN.
//
// libsofthsm2 reads the token directory at C_Initialize: a process that has
// the module loaded sees a token provisioned later only after C_Finalize and
// C_Initialize.
func Provision(dir, label string) (*Token, error) {
	if err := checkLabel(label); err != nil {
		return nil, err
	}
	if dir == "" {
		return nil, errors.New("softhsm: empty directory")
	}
	util, err := utilPath()
	if err != nil {
		return nil, err
	}
	module, err := ModulePath()
	if err != nil {
		return nil, err
	}
	dir, err = filepath.Abs(dir) // the tokendir in the config must not depend on the cwd
	if err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}

	mu.Lock()
	defer mu.Unlock()

	t := &Token{
		Dir:        dir,
		ConfigPath: filepath.Join(dir, "softhsm2.conf"),
		Label:      label,
		PINFile:    filepath.Join(dir, label+".pin"),
		ModulePath: module,
	}
	tokenDir := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokenDir, 0o700); err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	if err := writeConfig(t.ConfigPath, tokenDir); err != nil {
		return nil, err
	}

	n, err := countLabel(util, t, label)
	if err != nil {
		return nil, err
	}
	switch {
	case n > 1:
		return nil, fmt.Errorf("softhsm: %d tokens labelled %q in %s; delete them with `SOFTHSM2_CONF=%s %s --delete-token --serial <serial>`",
			n, label, tokenDir, t.ConfigPath, utilName)
	case n == 1:
		pin, err := os.ReadFile(t.PINFile)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("softhsm: token %q exists in %s but its PIN file %s is missing; delete the token with `SOFTHSM2_CONF=%s %s --delete-token --token %s`",
				label, tokenDir, t.PINFile, t.ConfigPath, utilName, label)
		}
		if err != nil {
			return nil, fmt.Errorf("softhsm: reading PIN file: %w", err)
		}
		t.PIN = string(pin)
		return t, nil
	}

	// A new token. The PIN file is written first, so that a token never
	// exists without one; a PIN file without a token is simply overwritten
	// on the next Provision.
	if t.PIN, err = randomPIN(); err != nil {
		return nil, err
	}
	soPIN, err := randomPIN()
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(t.PINFile, []byte(t.PIN), 0o600); err != nil {
		return nil, err
	}
	_, err = run(util, t, []string{t.PIN, soPIN},
		"--init-token", "--free", "--label", label, "--so-pin", soPIN, "--pin", t.PIN)
	if err != nil {
		_ = os.Remove(t.PINFile)
		return nil, fmt.Errorf("softhsm: initializing token %q: %w", label, err)
	}
	return t, nil
}

// Delete removes the token and its PIN file. Deleting a token that is
// already gone only removes the PIN file.
func (t *Token) Delete() error {
	util, err := utilPath()
	if err != nil {
		return err
	}
	mu.Lock()
	defer mu.Unlock()

	n, err := countLabel(util, t, t.Label)
	if err != nil {
		return err
	}
	if n > 0 {
		// With n > 1 softhsm2-util refuses ("Found multiple matching
		// tokens") and the error says so.
		if _, err := run(util, t, []string{t.PIN}, "--delete-token", "--token", t.Label); err != nil {
			return fmt.Errorf("softhsm: deleting token %q: %w", t.Label, err)
		}
	}
	if err := os.Remove(t.PINFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("softhsm: %w", err)
	}
	return nil
}

// checkLabel rejects labels softhsm2-util cannot round-trip: it pads labels
// with blanks and matches --token against the trimmed label, and the label
// also names the PIN file.
func checkLabel(label string) error {
	switch {
	case label == "":
		return errors.New("softhsm: empty token label")
	case len(label) > maxLabelLen:
		return fmt.Errorf("softhsm: token label %q: got %d bytes, want at most %d", label, len(label), maxLabelLen)
	case !utf8.ValidString(label):
		return fmt.Errorf("softhsm: token label %q is not valid UTF-8", label)
	case strings.TrimSpace(label) != label:
		return fmt.Errorf("softhsm: token label %q has leading or trailing blanks", label)
	case label == "." || label == "..":
		return fmt.Errorf("softhsm: token label %q is not a valid file name", label)
	}
	for _, r := range label {
		if r == '/' || r == '\\' || unicode.IsControl(r) {
			return fmt.Errorf("softhsm: token label %q contains %q", label, r)
		}
	}
	return nil
}

// writeConfig writes the SoftHSM2 configuration file unless it already holds
// exactly that content; the library reads it once per process, so it is
// replaced atomically and only when needed.
func writeConfig(path, tokenDir string) error {
	// Keys as in softhsm2.conf(5).
	conf := "# Written by keybroker/softhsm; shared by all tokens in this directory.\n" +
		"directories.tokendir = " + tokenDir + "\n" +
		"objectstore.backend = file\n" +
		"log.level = ERROR\n"
	if old, err := os.ReadFile(path); err == nil && string(old) == conf {
		return nil
	}
	return writeFileAtomic(path, []byte(conf), 0o600)
}

// writeFileAtomic writes data to a temporary file next to path and renames it
// into place.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return fmt.Errorf("softhsm: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("softhsm: writing %s: %w", path, err)
	}
	return nil
}

// randomPIN returns 16 random bytes as 32 hex characters; softhsm2-util
// accepts PINs of 4 to 255 characters.
func randomPIN() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("softhsm: generating PIN: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// countLabel returns how many initialised tokens in t's token directory are
// labelled label, from the "Label:" lines of `softhsm2-util --show-slots`.
func countLabel(util string, t *Token, label string) (int, error) {
	out, err := run(util, t, nil, "--show-slots")
	if err != nil {
		return 0, fmt.Errorf("softhsm: listing tokens: %w", err)
	}
	n := 0
	for _, l := range labels(out) {
		if l == label {
			n++
		}
	}
	return n, nil
}

// labels returns the non-empty token labels in `softhsm2-util --show-slots`
// output. Each slot has a line like
//
//	Label:            mytoken
//
// with the label padded to 32 bytes; the free slot has an empty label.
func labels(showSlots []byte) []string {
	var ls []string
	sc := bufio.NewScanner(bytes.NewReader(showSlots))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "Label:")
		if !ok {
			continue
		}
		if l := strings.TrimSpace(rest); l != "" {
			ls = append(ls, l)
		}
	}
	return ls
}

// run runs softhsm2-util with t's configuration and returns its stdout. On
// failure the error holds its stderr with every one of secrets replaced by
// "<redacted>". Stdin is empty, so softhsm2-util cannot hang prompting for a
// PIN.
func run(util string, t *Token, secrets []string, args ...string) ([]byte, error) {
	cmd := exec.Command(util, args...)
	cmd.Env = childEnv(os.Environ(), t.Env())
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		// Not cmd.String() or args: they hold the PINs.
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = strings.TrimSpace(stdout.String())
		}
		for _, s := range secrets {
			if s != "" {
				msg = strings.ReplaceAll(msg, s, "<redacted>")
			}
		}
		return nil, fmt.Errorf("%s %s: %w: %s", utilName, args[0], err, msg)
	}
	return stdout.Bytes(), nil
}

// childEnv returns env with any SOFTHSM2_CONF replaced by conf.
func childEnv(env []string, conf string) []string {
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if !strings.HasPrefix(kv, envConf+"=") {
			out = append(out, kv)
		}
	}
	return append(out, conf)
}
