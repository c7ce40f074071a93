// Package p11kittest serves a SoftHSM2 token through `p11-kit server`, for
// tests: a network HSM in a process of its own, which a test can stop,
// continue, kill and start again, and which several daemons share (each
// connection gets its own server process over the same token files).
package p11kittest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keybroker/keybroker/softhsm"
)

// ClientModule is the PKCS#11 module that reaches a p11-kit server (the
// server's socket is in P11_KIT_SERVER_ADDRESS).
const ClientModule = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"

// Server is SoftHSM2 behind p11-kit server.
type Server struct {
	t     testing.TB
	Token *softhsm.Token
	Sock  string
	cmd   *exec.Cmd
}

// Start provisions a token (label "remote") under dir and serves it on
// dir/p11.sock; it is killed when the test ends.
func Start(t testing.TB, dir string) *Server {
	t.Helper()
	if _, err := os.Stat(ClientModule); err != nil {
		t.Fatalf("%s missing: run scripts/install-deps.sh (apt-get install p11-kit)", ClientModule)
	}
	tok, err := softhsm.Provision(filepath.Join(dir, "hsm"), "remote")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, Token: tok, Sock: filepath.Join(dir, "p11.sock")}
	s.Start()
	t.Cleanup(func() {
		s.Signal(syscall.SIGCONT)
		s.Kill()
	})
	return s
}

// Address is the P11_KIT_SERVER_ADDRESS value that reaches the server.
func (s *Server) Address() string { return "unix:path=" + s.Sock }

// Start starts the server (again) and waits until it serves the token.
func (s *Server) Start() {
	s.t.Helper()
	os.Remove(s.Sock)
	s.cmd = exec.Command("p11-kit", "server", "-f", "--provider", s.Token.ModulePath, "-n", s.Sock, "pkcs11:token="+s.Token.Label)
	s.cmd.Env = append(os.Environ(), s.Token.Env())
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // it forks per connection
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("p11-kit server (scripts/install-deps.sh installs p11-kit): %v", err)
	}
	for i := 0; i < 250; i++ {
		probe := exec.Command("pkcs11-tool", "--module", ClientModule, "-L")
		probe.Env = append(os.Environ(), "P11_KIT_SERVER_ADDRESS="+s.Address())
		if out, err := probe.CombinedOutput(); err == nil && strings.Contains(string(out), s.Token.Label) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.t.Fatal("p11-kit server did not serve the token within 5 s")
}

// PID is the server's process id, which is also its process group's.
func (s *Server) PID() int { return s.cmd.Process.Pid }

// Signal sends sig to the server and the processes it forked.
func (s *Server) Signal(sig syscall.Signal) {
	if s.cmd != nil {
		syscall.Kill(-s.cmd.Process.Pid, sig)
	}
}

// Kill kills the server and the processes it forked.
func (s *Server) Kill() {
	if s.cmd != nil {
		s.Signal(syscall.SIGKILL)
		s.cmd.Wait()
		s.cmd = nil
	}
}
