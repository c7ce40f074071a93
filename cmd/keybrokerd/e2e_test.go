package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/softhsm"
)

// binaries builds keybrokerd and keybrokerctl once per test process.
func binaries(t *testing.T) (daemon, ctl string) {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/keybroker/keybroker/cmd/keybrokerd", "github.com/keybroker/keybroker/cmd/keybrokerctl")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return filepath.Join(dir, "keybrokerd"), filepath.Join(dir, "keybrokerctl")
}

// shortDir returns a directory whose paths fit a unix socket.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kbe2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

type proc struct {
	cmd    *exec.Cmd
	stdout *syncBuffer
	stderr *syncBuffer
	done   chan struct{} // closed when the process has exited
	err    error         // its exit status, once done is closed
}

// syncBuffer is a bytes.Buffer safe for the writer goroutine of exec.Cmd
// and the test reading it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs the daemon and waits until keybrokerctl health answers.
func start(t *testing.T, daemon, ctl, sock string, args ...string) *proc {
	t.Helper()
	return startEnv(t, daemon, ctl, sock, nil, args...)
}

// startEnv is start with extra environment variables for the daemon.
func startEnv(t *testing.T, daemon, ctl, sock string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(daemon, args...), stdout: new(syncBuffer), stderr: new(syncBuffer), done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command(ctl, "--socket", sock, "health").CombinedOutput()
		if err == nil && strings.TrimSpace(string(out)) == "SERVING" {
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("keybrokerd exited early: %v\nstderr:\n%s", p.err, p.stderr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("keybrokerd not healthy after 30s: %s\nstderr:\n%s", out, p.stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends SIGTERM and checks the daemon exits 0 within 10 s.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
		if p.err != nil {
			t.Fatalf("keybrokerd exit after SIGTERM: %v\nstderr:\n%s", p.err, p.stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("keybrokerd did not stop within 10s of SIGTERM")
	}
}

func ctlRun(t *testing.T, ctl, sock string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, ctl, append([]string{"--socket", sock}, args...)...).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("keybrokerctl %v: %v\n%s%s", args, err, out, stderr)
	}
	return string(out)
}

type signOut struct {
	Signature string `json:"signature"`
	Kid       string `json:"kid"`
	Version   uint32 `json:"version"`
}

// TestEndToEnd: build both binaries, start the daemon on a fresh token,
// create a key with the CLI, sign, restart, sign again with the same kid,
// and verify both signatures.
func TestEndToEnd(t *testing.T) {
	daemon, ctl := binaries(t)
	tok, sock, cfgPath := daemonConfig(t, "e2e", "log:\n  level: debug\n")

	p := start(t, daemon, ctl, sock, "--config", cfgPath)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode: %v (%v), want 0660", fi.Mode().Perm(), err)
	}
	ctlRun(t, ctl, sock, "keys", "create", "e2e-key", "--alg", "ES256")
	pemOut := ctlRun(t, ctl, sock, "pubkey", "e2e-key", "--format", "pem")
	block, _ := pem.Decode([]byte(pemOut))
	if block == nil {
		t.Fatalf("pubkey output is not PEM: %q", pemOut)
	}
	pubAny, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pub := pubAny.(*ecdsa.PublicKey)

	sign := func(msg string) signOut {
		d := sha256.Sum256([]byte(msg))
		out := ctlRun(t, ctl, sock, "--output", "json", "sign", "e2e-key", "--digest", fmt.Sprintf("%x", d))
		var s signOut
		if err := json.Unmarshal([]byte(out), &s); err != nil {
			t.Fatalf("sign output %q: %v", out, err)
		}
		sig, err := base64.RawURLEncoding.DecodeString(s.Signature)
		if err != nil {
			t.Fatal(err)
		}
		if !ecdsa.VerifyASN1(pub, d[:], sig) {
			t.Fatalf("signature over %q does not verify", msg)
		}
		return s
	}
	first := sign("before restart")
	p.stop(t)
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind after stop: %v", err)
	}
	if strings.Contains(p.stderr.String(), tok.PIN) {
		t.Error("daemon log contains the PIN")
	}

	p = start(t, daemon, ctl, sock, "--config", cfgPath)
	second := sign("after restart")
	if first.Kid == "" || second.Kid != first.Kid || second.Version != 1 {
		t.Errorf("kid before restart %q, after %q (v%d); want the same", first.Kid, second.Kid, second.Version)
	}
	p.stop(t)
	if strings.Contains(p.stderr.String(), tok.PIN) {
		t.Error("daemon log contains the PIN")
	}
}

// daemonConfig provisions a SoftHSM2 token in a fresh short directory and
// writes a daemon configuration for it, with extra YAML appended; it returns
// the token, the socket path and the configuration file.
func daemonConfig(t *testing.T, label, extra string) (*softhsm.Token, string, string) {
	t.Helper()
	dir := shortDir(t)
	tok, err := softhsm.Provision(filepath.Join(dir, "hsm"), label)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "kb.sock")
	cfgPath := filepath.Join(dir, "keybroker.yaml")
	cfg := fmt.Sprintf("socket: %s\nstate_dir: %s\npkcs11:\n  module: %s\n  token_label: %s\n  pin_file: %s\n  softhsm2_conf: %s\n  max_sessions: 4\n%s",
		sock, filepath.Join(dir, "state"), tok.ModulePath, tok.Label, tok.PINFile, tok.ConfigPath, extra)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return tok, sock, cfgPath
}

var thumbprintLine = regexp.MustCompile(`(?m)^\s*thumbprint\s+(\S+)$`)

// TestDevModeReusesToken is what a second `make run` does: the same token,
// the same demo key and kid.
func TestDevModeReusesToken(t *testing.T) {
	daemon, ctl := binaries(t)
	dir := shortDir(t)
	sock := filepath.Join(dir, "dev", "keybroker.sock")
	var kids []string
	for i := 0; i < 2; i++ {
		p := start(t, daemon, ctl, sock, "--dev", "--dev-dir", filepath.Join(dir, "dev"), "--jwks-address", freeAddr(t))
		m := thumbprintLine.FindStringSubmatch(p.stdout.String())
		if m == nil {
			t.Fatalf("run %d: no thumbprint in dev banner:\n%s", i, p.stdout)
		}
		kids = append(kids, m[1])
		keys := ctlRun(t, ctl, sock, "--output", "json", "keys", "get", "demo")
		if !strings.Contains(keys, m[1]) {
			t.Errorf("run %d: keys get demo does not show kid %s: %s", i, m[1], keys)
		}
		p.stop(t)
	}
	if kids[0] != kids[1] {
		t.Errorf("demo kid changed across dev runs: %s then %s", kids[0], kids[1])
	}
	if !strings.Contains(strings.Join(kids, ""), kids[0]) || len(kids[0]) != 43 {
		t.Errorf("thumbprint %q is not a base64url SHA-256", kids[0])
	}
}

// TestConfigProblemsListedAtOnce: an invalid file is refused with every
// problem, exit code 78 (EX_CONFIG: systemd does not restart it), before
// touching any hardware; a bad flag is a usage error, exit code 2.
func TestConfigProblemsListedAtOnce(t *testing.T) {
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "bad.yaml")
	os.WriteFile(cfgPath, []byte("backend: nope\nlog:\n  level: loud\nlimits:\n  call_timeout: -1s\n"), 0o600)
	var stdout, stderr bytes.Buffer
	code := run([]string{"--config", cfgPath}, &stdout, &stderr)
	if code != exitConfig {
		t.Errorf("exit code %d, want %d", code, exitConfig)
	}
	for _, want := range []string{"backend:", "log.level:", "limits.call_timeout:"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr does not list %q:\n%s", want, stderr.String())
		}
	}
	if code := run([]string{"--config", filepath.Join(dir, "missing.yaml")}, &stdout, &stderr); code != exitConfig {
		t.Errorf("missing config file: exit code %d, want %d", code, exitConfig)
	}
	if code := run([]string{"--no-such-flag"}, &stdout, &stderr); code != exitUsage {
		t.Errorf("unknown flag: exit code %d, want %d", code, exitUsage)
	}
}

func TestFlagsOverrideConfig(t *testing.T) {
	var stderr bytes.Buffer
	o, err := parseFlags([]string{"--socket", "/tmp/x.sock", "--max-sessions", "3", "--log-level", "debug"}, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	cfg := configDefaultForTest()
	o.apply(&cfg)
	if cfg.Socket != "/tmp/x.sock" || cfg.PKCS11.MaxSessions != 3 || cfg.Log.Level != "debug" {
		t.Errorf("flags not applied: %+v", cfg)
	}
	if cfg.PKCS11.TokenLabel != "from-file" || cfg.StateDir != "/from/file" {
		t.Errorf("unset flags overrode the file: %+v", cfg)
	}
	for _, bad := range [][]string{{"--dev", "--config", "x"}, {"extra"}, {"--max-sessions", "x"}} {
		if _, err := parseFlags(bad, &stderr); err == nil {
			t.Errorf("parseFlags(%v) succeeded", bad)
		}
	}
}

func configDefaultForTest() config.Config {
	cfg := config.Default()
	cfg.PKCS11.TokenLabel = "from-file"
	cfg.StateDir = "/from/file"
	return cfg
}

// TestWrongPIN: a wrong PIN at start is one login attempt, a clear error,
// and exit code 78 (EX_CONFIG), which the unit's RestartPreventExitStatus=
// lists — never a retry loop (PIN counters lock), in the process or by
// systemd.
func TestWrongPIN(t *testing.T) {
	daemon, _ := binaries(t)
	tok, _, cfgPath := daemonConfig(t, "pin", "")
	if err := os.WriteFile(tok.PINFile, []byte("not-the-pin-1234"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, daemon, "--config", cfgPath)
	out, err := cmd.CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != exitConfig {
		t.Fatalf("keybrokerd with a wrong PIN: %v, want exit status %d\n%s", err, exitConfig, out)
	}
	if ctx.Err() != nil {
		t.Fatal("keybrokerd kept running with a wrong PIN")
	}
	if !strings.Contains(string(out), "CKR_PIN_INCORRECT") || strings.Count(string(out), "CKR_PIN_INCORRECT") != 1 {
		t.Errorf("want exactly one login failure in the log:\n%s", out)
	}
	if strings.Contains(string(out), "not-the-pin-1234") {
		t.Error("the log contains the PIN")
	}
}

// TestModuleCannotStart: a PKCS#11 module that cannot read its own
// configuration or storage (SoftHSM2 answers C_Initialize with
// CKR_GENERAL_ERROR) is exit code 78, never retried, and the log names the
// file SoftHSM2 could not read.
func TestModuleCannotStart(t *testing.T) {
	daemon, _ := binaries(t)
	for _, tc := range []struct {
		name    string
		breakIt func(tok *softhsm.Token) (want string)
	}{
		{"configuration file missing", func(tok *softhsm.Token) string {
			if err := os.Rename(tok.ConfigPath, tok.ConfigPath+".away"); err != nil {
				t.Fatal(err)
			}
			return "SoftHSM2 cannot read its configuration file: open " + tok.ConfigPath
		}},
		{"token directory missing", func(tok *softhsm.Token) string {
			conf, err := os.ReadFile(tok.ConfigPath)
			if err != nil {
				t.Fatal(err)
			}
			dir := softhsmTokenDirForTest(t, conf)
			if err := os.Rename(dir, dir+".away"); err != nil {
				t.Fatal(err)
			}
			return "SoftHSM2 cannot read its token directory"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok, _, cfgPath := daemonConfig(t, "module", "")
			want := tc.breakIt(tok)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, daemon, "--config", cfgPath).CombinedOutput()
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != exitConfig {
				t.Fatalf("keybrokerd: %v, want exit status %d\n%s", err, exitConfig, out)
			}
			if !strings.Contains(string(out), want) {
				t.Errorf("the log does not say %q:\n%s", want, out)
			}
		})
	}
}

// softhsmTokenDirForTest is directories.tokendir of a SoftHSM2
// configuration file.
func softhsmTokenDirForTest(t *testing.T, conf []byte) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^directories\.tokendir\s*=\s*(\S+)`).FindSubmatch(conf)
	if m == nil {
		t.Fatalf("no directories.tokendir in:\n%s", conf)
	}
	return string(m[1])
}
