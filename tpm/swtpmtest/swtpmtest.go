// Package swtpmtest runs swtpm, the software TPM 2.0, for tests of the tpm
// backend. Each Sim is one swtpm process with its own state directory,
// serving TPM commands on a unix socket; it is killed when the test ends,
// after a check that the test left no transient objects or sessions loaded.
// Only _test.go files may import this package.
//
// swtpm serves one connection at a time on its command socket: while a
// backend holds its connection open, a second client (such as the leak
// check) waits. Close every backend before the test's cleanup runs.
package swtpmtest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// InstallHint is the fix printed when swtpm is missing.
const InstallHint = "install swtpm: scripts/install-deps.sh (apt-get install swtpm swtpm-tools)"

// readyTimeout bounds the wait for a fresh swtpm to answer.
const readyTimeout = 10 * time.Second

// Sim is a running swtpm.
type Sim struct {
	// Socket is the unix socket swtpm serves TPM commands on
	// (tpm.Config.Socket).
	Socket string
	// StateDir holds swtpm's persistent state (its seeds, so its SRK).
	StateDir string

	bin  string
	ctrl string
	log  string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has been waited for
}

// Start runs a fresh swtpm with an empty state directory and waits until it
// answers TPM2_GetRandom. It fails the test, never skips it, when swtpm is
// not installed. The process is killed when the test ends.
func Start(t testing.TB) *Sim {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		t.Fatalf("swtpmtest: %v; %s", err, InstallHint)
	}
	// Unix socket paths are limited to 107 bytes: t.TempDir() names are
	// too long, so the sockets go in a short directory of their own.
	sockDir, err := os.MkdirTemp("", "swtpm")
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	s := &Sim{
		Socket:   filepath.Join(sockDir, "tpm.sock"),
		StateDir: t.TempDir(),
		bin:      bin,
		ctrl:     filepath.Join(sockDir, "ctrl.sock"),
		log:      filepath.Join(sockDir, "swtpm.log"),
	}
	t.Cleanup(func() {
		s.checkLeaks(t)
		s.Kill()
		os.RemoveAll(sockDir)
	})
	s.start(t, s.getRandom)
	return s
}

// Restart starts swtpm again on the same state directory and socket, after
// Kill: the same TPM, power-cycled (transient objects and sessions gone).
// It waits for swtpm's control channel rather than a TPM command: swtpm
// serves one command connection at a time, and a backend retrying in the
// background may take it as soon as the socket appears.
func (s *Sim) Restart(t testing.TB) {
	t.Helper()
	s.start(t, s.ctrlReady)
}

// Kill sends SIGKILL to swtpm and waits for it to exit. It does nothing when
// swtpm is not running.
func (s *Sim) Kill() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	<-done
}

// Pause stops swtpm with SIGSTOP: it accepts connections but answers no
// command, like a hung TPM. Resume undoes it.
func (s *Sim) Pause(t testing.TB) {
	t.Helper()
	s.signal(t, syscall.SIGSTOP)
}

// Resume continues a paused swtpm with SIGCONT.
func (s *Sim) Resume(t testing.TB) {
	t.Helper()
	s.signal(t, syscall.SIGCONT)
}

func (s *Sim) signal(t testing.TB, sig os.Signal) {
	t.Helper()
	s.mu.Lock()
	cmd := s.cmd
	s.mu.Unlock()
	if cmd == nil {
		t.Fatalf("swtpmtest: swtpm is not running")
	}
	if err := cmd.Process.Signal(sig); err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
}

func (s *Sim) start(t testing.TB, ready func() error) {
	t.Helper()
	s.mu.Lock()
	if s.cmd != nil {
		s.mu.Unlock()
		t.Fatalf("swtpmtest: swtpm is already running")
	}
	// A killed swtpm leaves its socket files behind.
	os.Remove(s.Socket)
	os.Remove(s.ctrl)
	cmd := exec.Command(s.bin, "socket", "--tpm2",
		"--tpmstate", "dir="+s.StateDir,
		"--server", "type=unixio,path="+s.Socket,
		"--ctrl", "type=unixio,path="+s.ctrl,
		"--flags", "not-need-init,startup-clear",
		"--log", "file="+s.log)
	cmd.Stdout, cmd.Stderr = nil, nil
	if err := cmd.Start(); err != nil {
		s.mu.Unlock()
		t.Fatalf("swtpmtest: starting swtpm: %v", err)
	}
	done := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(done)
	}()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()

	deadline := time.Now().Add(readyTimeout)
	var err error
	for time.Now().Before(deadline) {
		select {
		case <-done:
			s.mu.Lock()
			s.cmd = nil
			s.mu.Unlock()
			t.Fatalf("swtpmtest: swtpm exited at start (%v); log:\n%s", waitErr, s.logTail())
		default:
		}
		if err = ready(); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Kill()
	t.Fatalf("swtpmtest: swtpm was not ready within %v: %v; log:\n%s", readyTimeout, err, s.logTail())
}

func (s *Sim) logTail() string {
	b, _ := os.ReadFile(s.log)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// Raw TPM 2.0 commands (TCG TPM 2.0 Part 3): this package speaks the wire
// format itself so that it does not depend on the code it tests.
const (
	tagNoSessions    = 0x8001 // TPM_ST_NO_SESSIONS
	ccGetRandom      = 0x17B  // TPM_CC_GetRandom
	ccGetCapability  = 0x17A  // TPM_CC_GetCapability
	capHandles       = 1      // TPM_CAP_HANDLES
	htTransient      = 0x80000000
	htLoadedSession  = 0x02000000
	htPolicySession  = 0x03000000
	maxHandlesListed = 64
)

func command(cc uint32, params ...uint32) []byte {
	b := make([]byte, 10, 10+4*len(params))
	binary.BigEndian.PutUint16(b, tagNoSessions)
	binary.BigEndian.PutUint32(b[6:], cc)
	for _, p := range params {
		b = binary.BigEndian.AppendUint32(b, p)
	}
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	return b
}

// roundTrip sends one command on a fresh connection and returns the
// response parameters after checking the response code.
func (s *Sim) roundTrip(cmd []byte, timeout time.Duration) ([]byte, error) {
	c, err := net.DialTimeout("unix", s.Socket, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(cmd); err != nil {
		return nil, err
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(c, hdr); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(hdr[2:])
	if size < 10 || size > 1<<16 {
		return nil, fmt.Errorf("response size %d", size)
	}
	rest := make([]byte, size-10)
	if _, err := io.ReadFull(c, rest); err != nil {
		return nil, err
	}
	if rc := binary.BigEndian.Uint32(hdr[6:]); rc != 0 {
		return nil, fmt.Errorf("response code 0x%x", rc)
	}
	return rest, nil
}

func (s *Sim) getRandom() error {
	// TPM2_GetRandom(bytesRequested = 1): a UINT16 parameter.
	cmd := command(ccGetRandom)
	cmd = append(cmd, 0, 1)
	binary.BigEndian.PutUint32(cmd[2:], uint32(len(cmd)))
	rsp, err := s.roundTrip(cmd, time.Second)
	if err != nil {
		return err
	}
	if len(rsp) != 3 {
		return fmt.Errorf("TPM2_GetRandom: %d-byte response", len(rsp))
	}
	return nil
}

// ctrlReady asks swtpm's control channel for its capabilities
// (CMD_GET_CAPABILITY, swtpm's ioctl protocol, not a TPM or mssim command).
// swtpm starts the TPM (not-need-init, startup-clear) before it serves it.
func (s *Sim) ctrlReady() error {
	c, err := net.DialTimeout("unix", s.ctrl, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte{0, 0, 0, 1}); err != nil {
		return err
	}
	rsp := make([]byte, 8) // ptm_res result, ptm_cap capabilities
	if _, err := io.ReadFull(c, rsp); err != nil {
		return err
	}
	if res := binary.BigEndian.Uint32(rsp); res != 0 {
		return fmt.Errorf("CMD_GET_CAPABILITY: result 0x%x", res)
	}
	return nil
}

// Handles lists the handles of one type (first octet of hr, e.g.
// 0x80000000 for transient objects) loaded in the TPM.
func (s *Sim) Handles(hr uint32) ([]uint32, error) {
	rsp, err := s.roundTrip(command(ccGetCapability, capHandles, hr, maxHandlesListed), 2*time.Second)
	if err != nil {
		return nil, err
	}
	// TPMI_YES_NO moreData, TPM_CAP capability, TPML_HANDLE (count, handles).
	if len(rsp) < 9 {
		return nil, errors.New("short TPM2_GetCapability response")
	}
	n := binary.BigEndian.Uint32(rsp[5:])
	if uint32(len(rsp)-9) != 4*n {
		return nil, fmt.Errorf("TPM2_GetCapability: %d handles in %d bytes", n, len(rsp)-9)
	}
	hs := make([]uint32, n)
	for i := range hs {
		hs[i] = binary.BigEndian.Uint32(rsp[9+4*i:])
	}
	return hs, nil
}

// TransientHandles returns the transient objects loaded in the TPM, failing
// the test when it cannot ask.
func (s *Sim) TransientHandles(t testing.TB) []uint32 {
	t.Helper()
	hs, err := s.Handles(htTransient)
	if err != nil {
		t.Fatalf("swtpmtest: listing transient handles: %v", err)
	}
	return hs
}

// checkLeaks reports transient objects and sessions still loaded when the
// test ends: a closed backend must leave none.
func (s *Sim) checkLeaks(t testing.TB) {
	s.mu.Lock()
	running := s.cmd != nil
	s.mu.Unlock()
	if !running || t.Failed() {
		return
	}
	var leaks []string
	for _, hr := range []uint32{htTransient, htLoadedSession, htPolicySession} {
		hs, err := s.Handles(hr)
		if err != nil {
			t.Errorf("swtpmtest: checking for leaked handles: %v (is a backend still open?)", err)
			return
		}
		for _, h := range hs {
			leaks = append(leaks, fmt.Sprintf("0x%08x", h))
		}
	}
	if len(leaks) > 0 {
		t.Errorf("swtpmtest: handles left loaded in the TPM: %s", strings.Join(leaks, ", "))
	}
}
