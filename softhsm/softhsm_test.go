package softhsm_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/keybroker/keybroker/softhsm"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

func TestMain(m *testing.M) { softhsmtest.Main(m) }

// showSlots runs `softhsm2-util --show-slots` with env (nil: this process's
// environment) and returns how many initialised tokens carry each label.
func showSlots(t *testing.T, env []string) map[string]int {
	t.Helper()
	cmd := exec.Command("softhsm2-util", "--show-slots")
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --show-slots: %v\n%s", err, out)
	}
	labels := map[string]int{}
	for _, line := range strings.Split(string(out), "\n") {
		if l, ok := strings.CutPrefix(strings.TrimSpace(line), "Label:"); ok && strings.TrimSpace(l) != "" {
			labels[strings.TrimSpace(l)]++
		}
	}
	return labels
}

// tokenEnv is the environment softhsm2-util needs to see tok's tokens.
func tokenEnv(tok *softhsm.Token) []string {
	return append(os.Environ(), tok.Env())
}

// tokenDirs returns the number of token directories softhsm2-util made in dir.
func tokenDirs(t *testing.T, dir string) int {
	t.Helper()
	es, err := os.ReadDir(filepath.Join(dir, "tokens"))
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

func provision(t *testing.T, dir, label string) *softhsm.Token {
	t.Helper()
	tok, err := softhsm.Provision(dir, label)
	if err != nil {
		t.Fatalf("Provision(%q, %q): %v", dir, label, err)
	}
	return tok
}

func TestModulePath(t *testing.T) {
	p, err := softhsm.ModulePath()
	if err != nil {
		t.Fatalf("ModulePath: %v", err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatalf("ModulePath() = %q: %v", p, err)
	}
	if !fi.Mode().IsRegular() || filepath.Base(p) != "libsofthsm2.so" {
		t.Errorf("ModulePath() = %q (mode %v), want a regular file named libsofthsm2.so", p, fi.Mode())
	}
}

func TestProvisionCreatesToken(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tok := provision(t, dir, "kb-create")

	module, err := softhsm.ModulePath()
	if err != nil {
		t.Fatal(err)
	}
	want := softhsm.Token{
		Dir:        dir,
		ConfigPath: filepath.Join(dir, "softhsm2.conf"),
		Label:      "kb-create",
		PIN:        tok.PIN,
		PINFile:    filepath.Join(dir, "kb-create.pin"),
		ModulePath: module,
	}
	if *tok != want {
		t.Errorf("Provision: got %#v, want %#v", *tok, want)
	}
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(tok.PIN) {
		t.Errorf("PIN: got %d characters, want 32 lowercase hex characters", len(tok.PIN))
	}
	if got, want := tok.Env(), "SOFTHSM2_CONF="+tok.ConfigPath; got != want {
		t.Errorf("Env: got %q, want %q", got, want)
	}

	conf, err := os.ReadFile(tok.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{
		"directories.tokendir = " + filepath.Join(dir, "tokens"),
		"objectstore.backend = file",
		"log.level = ERROR",
	} {
		if !strings.Contains(string(conf), line+"\n") {
			t.Errorf("config %s lacks line %q:\n%s", tok.ConfigPath, line, conf)
		}
	}

	if got := showSlots(t, tokenEnv(tok))["kb-create"]; got != 1 {
		t.Errorf("tokens labelled kb-create: got %d, want 1", got)
	}
	for _, p := range []string{filepath.Join(dir, "tokens"), tok.ConfigPath} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if perm := fi.Mode().Perm(); perm&0o077 != 0 {
			t.Errorf("mode of %s: got %v, want no access for group and others", p, perm)
		}
	}
}

func TestProvisionCreatesDir(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "a", "b")
	tok := provision(t, dir, "kb-mkdir")
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o700 {
		t.Errorf("mode of %s: got %v, want %v", dir, got, os.FileMode(0o700))
	}
	if got := showSlots(t, tokenEnv(tok))["kb-mkdir"]; got != 1 {
		t.Errorf("tokens labelled kb-mkdir: got %d, want 1", got)
	}
}

func TestProvisionRelativeDir(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	tok := provision(t, "rel", "kb-rel")
	if want := filepath.Join(dir, "rel"); tok.Dir != want {
		t.Errorf("Dir: got %q, want %q", tok.Dir, want)
	}
	t.Chdir(t.TempDir()) // the config must not depend on the working directory
	if got := showSlots(t, tokenEnv(tok))["kb-rel"]; got != 1 {
		t.Errorf("tokens labelled kb-rel: got %d, want 1", got)
	}
}

func TestPINFile(t *testing.T) {
	t.Parallel()
	tok := provision(t, t.TempDir(), "kb-pinfile")
	fi, err := os.Stat(tok.PINFile)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("mode of %s: got %v, want %v", tok.PINFile, got, os.FileMode(0o600))
	}
	b, err := os.ReadFile(tok.PINFile)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != tok.PIN {
		t.Errorf("PIN file holds %d bytes that differ from the PIN (%d bytes)", len(b), len(tok.PIN))
	}
}

func TestProvisionReusesToken(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	first := provision(t, dir, "kb-reuse")
	second := provision(t, dir, "kb-reuse")
	if *second != *first {
		t.Errorf("second Provision: got %v, want the first token unchanged", second)
	}
	if second.PIN != first.PIN {
		t.Error("second Provision changed the PIN")
	}
	if got := showSlots(t, tokenEnv(first))["kb-reuse"]; got != 1 {
		t.Errorf("tokens labelled kb-reuse: got %d, want 1", got)
	}
	if got := tokenDirs(t, dir); got != 1 {
		t.Errorf("token directories: got %d, want 1", got)
	}
}

func TestProvisionTwoLabels(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	a := provision(t, dir, "kb-a")
	b := provision(t, dir, "kb-b")
	if a.ConfigPath != b.ConfigPath {
		t.Errorf("ConfigPath: got %q and %q, want one shared file", a.ConfigPath, b.ConfigPath)
	}
	if a.PIN == b.PIN {
		t.Error("two tokens got the same PIN")
	}
	if a.PINFile == b.PINFile {
		t.Errorf("two tokens share PIN file %s", a.PINFile)
	}
	labels := showSlots(t, tokenEnv(a))
	if labels["kb-a"] != 1 || labels["kb-b"] != 1 {
		t.Errorf("tokens by label: got %v, want kb-a and kb-b once each", labels)
	}
	// Reusing the first after creating the second still finds it.
	if again := provision(t, dir, "kb-a"); again.PIN != a.PIN {
		t.Error("Provision of kb-a after kb-b changed its PIN")
	}
	if got := tokenDirs(t, dir); got != 2 {
		t.Errorf("token directories: got %d, want 2", got)
	}
}

func TestDelete(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	keep := provision(t, dir, "kb-keep")
	tok := provision(t, dir, "kb-delete")
	if err := tok.Delete(); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	labels := showSlots(t, tokenEnv(tok))
	if labels["kb-delete"] != 0 {
		t.Errorf("after Delete, tokens labelled kb-delete: got %d, want 0", labels["kb-delete"])
	}
	if labels["kb-keep"] != 1 {
		t.Errorf("after deleting another token, tokens labelled kb-keep: got %d, want 1", labels["kb-keep"])
	}
	if _, err := os.Stat(tok.PINFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after Delete, stat PIN file: got %v, want not exist", err)
	}
	if _, err := os.Stat(keep.PINFile); err != nil {
		t.Errorf("PIN file of the other token: %v", err)
	}
	if err := tok.Delete(); err != nil {
		t.Errorf("second Delete: got %v, want nil", err)
	}
	// The label can be provisioned again, with a new PIN.
	again := provision(t, dir, "kb-delete")
	if again.PIN == tok.PIN {
		t.Error("re-provisioning a deleted token reused its PIN")
	}
}

// TestProvisionStalePINFile: a PIN file without its token is replaced.
func TestProvisionStalePINFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	stale := filepath.Join(dir, "kb-stale.pin")
	if err := os.WriteFile(stale, []byte("stale-pin"), 0o644); err != nil {
		t.Fatal(err)
	}
	tok := provision(t, dir, "kb-stale")
	if tok.PIN == "stale-pin" {
		t.Error("Provision took the PIN from a PIN file that had no token")
	}
	b, err := os.ReadFile(stale)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != tok.PIN {
		t.Error("PIN file does not hold the new PIN")
	}
	fi, err := os.Stat(stale)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("mode of %s: got %v, want %v", stale, got, os.FileMode(0o600))
	}
	if got := showSlots(t, tokenEnv(tok))["kb-stale"]; got != 1 {
		t.Errorf("tokens labelled kb-stale: got %d, want 1", got)
	}
}

func TestProvisionMissingPINFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tok := provision(t, dir, "kb-nopin")
	if err := os.Remove(tok.PINFile); err != nil {
		t.Fatal(err)
	}
	_, err := softhsm.Provision(dir, "kb-nopin")
	if err == nil {
		t.Fatal("Provision of a token whose PIN file is gone: got nil error")
	}
	if strings.Contains(err.Error(), tok.PIN) {
		t.Errorf("error contains the PIN: %v", err)
	}
	for _, want := range []string{tok.PINFile, "--delete-token"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if got := showSlots(t, tokenEnv(tok))["kb-nopin"]; got != 1 {
		t.Errorf("tokens labelled kb-nopin: got %d, want 1 (no second token)", got)
	}
}

// TestDuplicateLabels: softhsm2-util lets two tokens share a label; Provision
// and Delete must refuse to pick one, without leaking the PIN.
func TestDuplicateLabels(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tok := provision(t, dir, "kb-dup")
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", "kb-dup", "--so-pin", "12345678", "--pin", "87654321")
	cmd.Env = tokenEnv(tok)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	_, err := softhsm.Provision(dir, "kb-dup")
	if err == nil {
		t.Error("Provision with two tokens labelled kb-dup: got nil error")
	} else if strings.Contains(err.Error(), tok.PIN) {
		t.Errorf("Provision error contains the PIN: %v", err)
	}
	err = tok.Delete()
	if err == nil {
		t.Error("Delete with two tokens labelled kb-dup: got nil error")
	} else if strings.Contains(err.Error(), tok.PIN) {
		t.Errorf("Delete error contains the PIN: %v", err)
	}
	if _, err := os.Stat(tok.PINFile); err != nil {
		t.Errorf("failed Delete removed the PIN file: %v", err)
	}
}

func TestProvisionBadLabel(t *testing.T) {
	t.Parallel()
	for _, label := range []string{
		"",
		strings.Repeat("x", 33),
		" lead",
		"trail ",
		"a/b",
		"..",
		"new\nline",
	} {
		dir := t.TempDir()
		if tok, err := softhsm.Provision(dir, label); err == nil {
			t.Errorf("Provision(%q): got %v, want an error", label, tok)
		}
		if es, _ := os.ReadDir(dir); len(es) != 0 {
			t.Errorf("Provision(%q) left %d entries in %s", label, len(es), dir)
		}
	}
	// 32 bytes is the longest label PKCS#11 allows.
	label := strings.Repeat("x", 32)
	tok := provision(t, t.TempDir(), label)
	if got := showSlots(t, tokenEnv(tok))[label]; got != 1 {
		t.Errorf("tokens labelled %q: got %d, want 1", label, got)
	}
}

func TestProvisionLeavesEnvironment(t *testing.T) {
	t.Parallel()
	before, set := os.LookupEnv("SOFTHSM2_CONF")
	provision(t, t.TempDir(), "kb-env")
	after, setAfter := os.LookupEnv("SOFTHSM2_CONF")
	if after != before || setAfter != set {
		t.Errorf("SOFTHSM2_CONF: got %q (set %v), want %q (set %v)", after, setAfter, before, set)
	}
}

func TestNotInstalled(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	dir := t.TempDir()
	_, err := softhsm.Provision(dir, "kb-missing")
	if !errors.Is(err, softhsm.ErrNotInstalled) {
		t.Fatalf("Provision without softhsm2-util on PATH: got %v, want ErrNotInstalled", err)
	}
	for _, hint := range []string{"softhsm2-util", "apt-get install softhsm2", "scripts/install-deps.sh"} {
		if !strings.Contains(err.Error(), hint) {
			t.Errorf("error %q does not mention %q", err, hint)
		}
	}
	if err := (&softhsm.Token{Dir: dir, Label: "kb-missing"}).Delete(); !errors.Is(err, softhsm.ErrNotInstalled) {
		t.Errorf("Delete without softhsm2-util on PATH: got %v, want ErrNotInstalled", err)
	}
}

// TestInitFailureRedactsPINs puts a fake softhsm2-util on PATH that fails
// --init-token and echoes its arguments, PINs included, to stderr.
func TestInitFailureRedactsPINs(t *testing.T) {
	bin := t.TempDir()
	argsFile := filepath.Join(t.TempDir(), "args")
	script := `#!/bin/sh
if [ "$1" = "--show-slots" ]; then
	echo "Available slots:"
	exit 0
fi
printf '%s\n' "$@" > "` + argsFile + `"
echo "ERROR: rejected init with $*" >&2
exit 1
`
	if err := os.WriteFile(filepath.Join(bin, "softhsm2-util"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin)

	dir := t.TempDir()
	_, err := softhsm.Provision(dir, "kb-fail")
	if err == nil {
		t.Fatal("Provision with a failing softhsm2-util: got nil error")
	}
	b, rerr := os.ReadFile(argsFile)
	if rerr != nil {
		t.Fatalf("fake softhsm2-util was not run with --init-token: %v", rerr)
	}
	args := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	secrets := map[string]string{}
	for i, a := range args {
		if (a == "--pin" || a == "--so-pin") && i+1 < len(args) {
			secrets[a] = args[i+1]
		}
	}
	if len(secrets) != 2 {
		t.Fatalf("fake softhsm2-util got args %q, want --pin and --so-pin", args)
	}
	for flag, pin := range secrets {
		if strings.Contains(err.Error(), pin) {
			t.Errorf("error contains the %s value: %v", flag, err)
		}
	}
	if !strings.Contains(err.Error(), "ERROR: rejected init") {
		t.Errorf("error %q does not include softhsm2-util's stderr", err)
	}
	if _, serr := os.Stat(filepath.Join(dir, "kb-fail.pin")); !errors.Is(serr, os.ErrNotExist) {
		t.Errorf("after a failed Provision, stat PIN file: got %v, want not exist", serr)
	}
}

func TestTokenStringHidesPIN(t *testing.T) {
	tok := &softhsm.Token{Label: "kb-str", PIN: "0123456789abcdef"}
	if s := tok.String(); strings.Contains(s, tok.PIN) || !strings.Contains(s, "kb-str") {
		t.Errorf("String() = %q, want the label and not the PIN", s)
	}
}

func TestNewToken(t *testing.T) {
	var tok *softhsm.Token
	t.Run("use", func(t *testing.T) {
		tok = softhsmtest.NewToken(t)
		other := softhsmtest.NewToken(t)
		if tok.Label == other.Label || tok.ConfigPath != other.ConfigPath {
			t.Errorf("two NewToken calls: labels %q, %q and configs %q, %q; want distinct labels, one config",
				tok.Label, other.Label, tok.ConfigPath, other.ConfigPath)
		}
		if got := os.Getenv("SOFTHSM2_CONF"); got != tok.ConfigPath {
			t.Errorf("SOFTHSM2_CONF: got %q, want %q", got, tok.ConfigPath)
		}
		// nil Env: the process environment, as libsofthsm2 in this process sees it.
		if got := showSlots(t, nil)[tok.Label]; got != 1 {
			t.Errorf("tokens labelled %q: got %d, want 1", tok.Label, got)
		}
	})
	if tok == nil {
		t.Fatal("subtest did not get a token")
	}
	if got := showSlots(t, nil)[tok.Label]; got != 0 {
		t.Errorf("after the test ended, tokens labelled %q: got %d, want 0", tok.Label, got)
	}
	if _, err := os.Stat(tok.PINFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after the test ended, stat PIN file: got %v, want not exist", err)
	}
}
