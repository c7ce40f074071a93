package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// keybrokerd is the daemon built for the tests.
func keybrokerd(t *testing.T) string {
	t.Helper()
	d, _ := binaries(t)
	return d
}

func systemdAnalyze(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze not found: install the systemd package (scripts/install-deps.sh systemd)")
	}
	return p
}

// unitDir copies the units and the PKCS#11 drop-in into a temporary
// directory, with ExecStart pointing at a freshly built keybrokerd
// (systemd-analyze verify checks that the binary exists).
func unitDir(t *testing.T, daemon string, dropIn bool) string {
	t.Helper()
	dir := t.TempDir()
	files := []string{"keybroker.service", "keybroker.socket"}
	if dropIn {
		files = append(files, "keybroker.service.d/pkcs11.conf")
		os.Mkdir(filepath.Join(dir, "keybroker.service.d"), 0o755)
	}
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join("systemd", f))
		if err != nil {
			t.Fatal(err)
		}
		b = bytes.ReplaceAll(b, []byte("/usr/bin/keybrokerd"), []byte(daemon))
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

var exposure = regexp.MustCompile(`Overall exposure level for keybroker\.service: ([0-9.]+)`)

// TestSystemdUnits: systemd-analyze verify accepts the units, with and
// without the PKCS#11 drop-in, without a single warning; `systemd-analyze
// security` rates the service at most 2.5, and docs/operations.md records the
// level measured.
func TestSystemdUnits(t *testing.T) {
	sa := systemdAnalyze(t)
	daemon := keybrokerd(t)
	readme, err := os.ReadFile("../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, dropIn := range []bool{false, true} {
		dir := unitDir(t, daemon, dropIn)
		cmd := exec.Command(sa, "verify", "./keybroker.service", "./keybroker.socket")
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("systemd-analyze verify (drop-in %v): %v\n%s", dropIn, err, out)
		}
		cmd = exec.Command(sa, "security", "--offline=true", "./keybroker.service")
		cmd.Dir = dir
		out, err = cmd.CombinedOutput()
		m := exposure.FindSubmatch(out)
		if m == nil {
			t.Fatalf("systemd-analyze security (drop-in %v): %v, no exposure level in:\n%s", dropIn, err, out)
		}
		level, _ := strconv.ParseFloat(string(m[1]), 64)
		if level > 2.5 {
			t.Errorf("exposure level %v (drop-in %v), want at most 2.5:\n%s", level, dropIn, out)
		}
		if want := "exposure level " + string(m[1]); !bytes.Contains(readme, []byte(want)) {
			t.Errorf("docs/operations.md does not record %q (drop-in %v)", want, dropIn)
		}
	}
}

// execStart returns the arguments of the last ExecStart= in a unit file.
func execStart(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var args []string
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "ExecStart="); ok && v != "" {
			args = strings.Fields(v)
		}
	}
	if len(args) == 0 {
		t.Fatalf("%s: no ExecStart=", path)
	}
	return args
}

// TestUnitCommandLines: keybrokerd understands every flag the units pass
// (a flag it does not know exits 2 before --help is reached).
func TestUnitCommandLines(t *testing.T) {
	daemon := keybrokerd(t)
	for _, unit := range []string{"systemd/keybroker.service", "systemd/keybroker.service.d/pkcs11.conf"} {
		args := execStart(t, unit)
		if args[0] != "/usr/bin/keybrokerd" {
			t.Errorf("%s: ExecStart runs %s", unit, args[0])
		}
		checkFlags(t, daemon, unit, args[1:])
	}
}

func checkFlags(t *testing.T, daemon, where string, args []string) {
	t.Helper()
	out, err := exec.Command(daemon, append(args, "--help")...).CombinedOutput()
	if err != nil {
		t.Errorf("%s: keybrokerd %s: %v\n%s", where, strings.Join(args, " "), err, out)
	}
}

// TestUnitDoesNotRestartRefusedStarts: the exit statuses keybrokerd uses
// for a start that cannot succeed when tried again (a configuration it
// refuses: 78, a PKCS#11 token refusing the PIN: 78, see
// cmd/keybrokerd TestWrongPIN; a usage error: 2) are in the unit's
// RestartPreventExitStatus=, so Restart=on-failure does not retry them.
func TestUnitDoesNotRestartRefusedStarts(t *testing.T) {
	daemon := keybrokerd(t)
	b, err := os.ReadFile("systemd/keybroker.service")
	if err != nil {
		t.Fatal(err)
	}
	prevent := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "RestartPreventExitStatus="); ok {
			for _, f := range strings.Fields(v) {
				prevent[f] = true
			}
		}
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("backend: nope\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"--config", bad}, {"--no-such-flag"}} {
		err := exec.Command(daemon, args...).Run()
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("keybrokerd %v: %v, want a failing exit", args, err)
		}
		if code := strconv.Itoa(ee.ExitCode()); !prevent[code] {
			t.Errorf("keybrokerd %v exits %s, which RestartPreventExitStatus= (%v) does not list: systemd would restart it", args, code, prevent)
		}
	}
	if !prevent["78"] {
		t.Error("RestartPreventExitStatus= does not list 78, keybrokerd's status for a PIN the token refuses")
	}
}
