package deploy

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/keybroker/keybroker/internal/config"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// binaries builds keybrokerd and keybrokerctl once per test process.
func binaries(t *testing.T) (daemon, ctl string) {
	t.Helper()
	buildOnce.Do(func() {
		if binDir, buildErr = os.MkdirTemp("", "kbbin"); buildErr != nil {
			return
		}
		out, err := exec.Command("go", "build", "-o", binDir+"/", "github.com/keybroker/keybroker/cmd/keybrokerd", "github.com/keybroker/keybroker/cmd/keybrokerctl").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "keybrokerd"), filepath.Join(binDir, "keybrokerctl")
}

var jsonArray = regexp.MustCompile(`"([^"]*)"`)

// dockerfileArgs returns ENTRYPOINT + CMD of the Dockerfile's last stage.
func dockerfileArgs(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("container/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var entry, cmd []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "FROM ") {
			entry, cmd = nil, nil
		}
		for prefix, dst := range map[string]*[]string{"ENTRYPOINT ": &entry, "CMD ": &cmd} {
			if v, ok := strings.CutPrefix(line, prefix); ok {
				*dst = nil
				for _, m := range jsonArray.FindAllStringSubmatch(v, -1) {
					*dst = append(*dst, m[1])
				}
			}
		}
	}
	return append(entry, cmd...)
}

func shortTemp(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kbc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// containerConfig rewrites a container configuration's paths into dir.
func containerConfig(t *testing.T, name, dir string, paths map[string]string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("container", name))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for from, to := range paths {
		s = strings.ReplaceAll(s, from, to)
	}
	s = strings.ReplaceAll(s, "127.0.0.1:9464", freePort(t))
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return path
}

// service runs a container's entrypoint script until the test ends.
func service(t *testing.T, script string, env []string, socket string) {
	t.Helper()
	cmd := exec.Command(filepath.Join("container", script))
	cmd.Env = append(os.Environ(), env...)
	out := new(strings.Builder)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			return
		}
		select {
		case <-done:
			t.Fatalf("%s exited:\n%s", script, out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no socket after 20s:\n%s", script, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runDaemon runs keybrokerd with the image's arguments (the config path
// rewritten), creates a key and signs with it through keybrokerctl, and
// stops it with SIGTERM.
func runDaemon(t *testing.T, daemon, ctl, cfgPath, sock string, env []string) {
	t.Helper()
	args := dockerfileArgs(t)[1:]
	for i, a := range args {
		if strings.HasPrefix(a, "/etc/keybroker/") {
			args[i] = cfgPath
		}
	}
	cmd := exec.Command(daemon, args...)
	cmd.Env = append(os.Environ(), env...)
	out := new(strings.Builder)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("keybrokerd exit: %v\n%s", err, out)
			}
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			t.Error("keybrokerd did not stop within 10s")
		}
	}()
	ctlCmd := func(args ...string) (string, error) {
		c := exec.Command(ctl, append([]string{"--socket", sock}, args...)...)
		b, err := c.CombinedOutput()
		return string(b), err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if o, err := ctlCmd("health"); err == nil && strings.TrimSpace(o) == "SERVING" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("keybrokerd not healthy after 30s:\n%s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, args := range [][]string{
		{"keys", "create", "demo", "--alg", "ES256"},
		{"sign", "demo", "--digest", strings.Repeat("ab", 32)},
		{"jwks"},
	} {
		if o, err := ctlCmd(args...); err != nil {
			t.Errorf("keybrokerctl %v: %v\n%s", args, err, o)
		}
	}
}

// TestContainerPKCS11 runs what the compose setup runs, without Docker:
// softhsm.sh (token + p11-kit server), then keybrokerd with the image's
// flags and keybroker-pkcs11.yaml through p11-kit-client.so.
func TestContainerPKCS11(t *testing.T) {
	for _, tool := range []string{"softhsm2-util", "p11-kit"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: run scripts/install-deps.sh", tool)
		}
	}
	daemon, ctl := binaries(t)
	dir := shortTemp(t)
	pin := filepath.Join(dir, "pkcs11.pin")
	if err := os.WriteFile(pin, []byte("1234\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p11sock := filepath.Join(dir, "p11", "p11kit.sock")
	checkHealthcheck(t, "softhsm", "/run/p11-kit/p11kit.sock", p11sock, false)
	service(t, "softhsm.sh", []string{"KEYBROKER_PIN_FILE=" + pin, "SOFTHSM_TOKENS=" + filepath.Join(dir, "softhsm", "tokens"), "P11KIT_SOCKET=" + p11sock}, p11sock)
	checkHealthcheck(t, "softhsm", "/run/p11-kit/p11kit.sock", p11sock, true)
	sock := filepath.Join(dir, "run", "keybroker.sock")
	cfg := containerConfig(t, "keybroker-pkcs11.yaml", dir, map[string]string{
		"/run/keybroker/keybroker.sock": sock,
		"/var/lib/keybroker":            filepath.Join(dir, "state"),
		"/run/secrets/pkcs11.pin":       pin,
	})
	runDaemon(t, daemon, ctl, cfg, sock, []string{"P11_KIT_SERVER_ADDRESS=unix:path=" + p11sock})
}

// TestContainerTPM runs swtpm.sh, then keybrokerd with keybroker-tpm.yaml.
func TestContainerTPM(t *testing.T) {
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Fatalf("swtpm not found: run scripts/install-deps.sh")
	}
	daemon, ctl := binaries(t)
	dir := shortTemp(t)
	tpmsock := filepath.Join(dir, "swtpm", "swtpm.sock")
	checkHealthcheck(t, "swtpm", "/run/swtpm/swtpm.sock", tpmsock, false)
	service(t, "swtpm.sh", []string{"SWTPM_STATE=" + filepath.Join(dir, "tpmstate"), "SWTPM_SOCKET=" + tpmsock}, tpmsock)
	checkHealthcheck(t, "swtpm", "/run/swtpm/swtpm.sock", tpmsock, true)
	sock := filepath.Join(dir, "run", "keybroker.sock")
	cfg := containerConfig(t, "keybroker-tpm.yaml", dir, map[string]string{
		"/run/keybroker/keybroker.sock": sock,
		"/var/lib/keybroker":            filepath.Join(dir, "state"),
		"/run/swtpm/swtpm.sock":         tpmsock,
	})
	runDaemon(t, daemon, ctl, cfg, sock, nil)
}

// TestComposeCommands: the compose file runs the daemon with flags it
// knows, and its config paths are the image's.
func TestComposeCommands(t *testing.T) {
	daemon, _ := binaries(t)
	b, err := os.ReadFile("compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s+command: \[(.*)\]$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("compose.yaml: no command for the keybroker service")
	}
	var args []string
	for _, a := range jsonArray.FindAllStringSubmatch(string(m[1]), -1) {
		// ${VAR:-default} as compose interpolates it with VAR unset.
		args = append(args, regexp.MustCompile(`\$\{[A-Z_]+:-([^}]*)\}`).ReplaceAllString(a[1], "$1"))
	}
	checkFlags(t, daemon, "compose.yaml", args)
	checkFlags(t, daemon, "Dockerfile", dockerfileArgs(t)[1:])
	for _, a := range append(args, dockerfileArgs(t)...) {
		if strings.HasPrefix(a, "/etc/keybroker/") {
			if _, err := os.Stat(filepath.Join("container", filepath.Base(a))); err != nil {
				t.Errorf("%s is not a file the image copies from deploy/container: %v", a, err)
			}
		}
	}
}

// composeFile is what the tests read of compose.yaml.
type composeFile struct {
	Services map[string]struct {
		DependsOn map[string]struct {
			Condition string `yaml:"condition"`
		} `yaml:"depends_on"`
		Restart     string            `yaml:"restart"`
		Environment map[string]string `yaml:"environment"`
		Healthcheck struct {
			Test []string `yaml:"test"`
		} `yaml:"healthcheck"`
	} `yaml:"services"`
}

func readCompose(t *testing.T) composeFile {
	t.Helper()
	b, err := os.ReadFile("compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var c composeFile
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("compose.yaml: %v", err)
	}
	return c
}

// checkHealthcheck runs the compose healthcheck of service (its test
// command, with path where the test serves the socket) and checks that it
// passes, or fails, as want says.
func checkHealthcheck(t *testing.T, service, path, local string, want bool) {
	t.Helper()
	test := readCompose(t).Services[service].Healthcheck.Test
	if len(test) < 2 || test[0] != "CMD" {
		t.Fatalf("compose.yaml: %s: healthcheck test %q, want [\"CMD\", ...]", service, test)
	}
	args := append([]string(nil), test[1:]...)
	found := false
	for i, a := range args {
		if a == path {
			args[i], found = local, true
		}
	}
	if !found {
		t.Fatalf("compose.yaml: %s: healthcheck %q does not check %s", service, test, path)
	}
	err := exec.Command(args[0], args[1:]...).Run()
	if (err == nil) != want {
		t.Errorf("compose.yaml: %s healthcheck %q: %v, want passing %v", service, args, err, want)
	}
}

// TestComposeWaitsForHealthyServices: keybroker starts only once softhsm
// and swtpm are healthy (their sockets are there, where its configurations
// look for them), not merely started, and is restarted when it fails.
func TestComposeWaitsForHealthyServices(t *testing.T) {
	c := readCompose(t)
	kb := c.Services["keybroker"]
	for _, dep := range []string{"softhsm", "swtpm"} {
		if got := kb.DependsOn[dep].Condition; got != "service_healthy" {
			t.Errorf("keybroker depends on %s with condition %q, want service_healthy", dep, got)
		}
	}
	if kb.Restart != "on-failure" {
		t.Errorf("keybroker restart: %q, want on-failure", kb.Restart)
	}
	p11, ok := strings.CutPrefix(kb.Environment["P11_KIT_SERVER_ADDRESS"], "unix:path=")
	if !ok {
		t.Fatalf("keybroker P11_KIT_SERVER_ADDRESS: %q", kb.Environment["P11_KIT_SERVER_ADDRESS"])
	}
	tpmCfg, err := config.Load(filepath.Join("container", "keybroker-tpm.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for service, sock := range map[string]string{"softhsm": p11, "swtpm": tpmCfg.TPM.Socket} {
		if test := c.Services[service].Healthcheck.Test; !slices.Contains(test, sock) {
			t.Errorf("%s healthcheck %q does not check %s, where keybroker looks for it", service, test, sock)
		}
	}
}
