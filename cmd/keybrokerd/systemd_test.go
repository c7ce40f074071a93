package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// notifySocket listens where NOTIFY_SOCKET will point, as systemd does.
func notifySocket(t *testing.T) (path string, notes <-chan string) {
	t.Helper()
	path = filepath.Join(shortDir(t), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ch := make(chan string, 1024)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(ch)
				return
			}
			ch <- string(buf[:n])
		}
	}()
	return path, ch
}

// waitNote returns the first notification with the line want, failing
// on timeout; the notifications before it are returned too.
func waitNote(t *testing.T, notes <-chan string, want string, timeout time.Duration) (skipped []string) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m, ok := <-notes:
			if !ok {
				t.Fatalf("notify socket closed waiting for %s", want)
			}
			for _, l := range strings.Split(m, "\n") {
				if l == want {
					return skipped
				}
			}
			skipped = append(skipped, m)
		case <-deadline:
			t.Fatalf("no %s within %v (got %q)", want, timeout, skipped)
		}
	}
}

// launch starts the daemon without waiting for it.
func launch(t *testing.T, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{cmd: cmd, stdout: new(syncBuffer), stderr: new(syncBuffer), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

func health(ctl, sock string) string {
	out, _ := exec.Command(ctl, "--socket", sock, "health").CombinedOutput()
	return strings.TrimSpace(string(out))
}

// TestSystemdNotify runs the daemon under a fake systemd: READY=1 comes
// only once the backend is probed and the socket serves, WATCHDOG=1 pings
// come while it is healthy, SIGHUP gives RELOADING=1 then READY=1 (a valid
// file applies: a new tenant's caller is served; an invalid one is refused
// with every problem in the log and the old one keeps serving), and
// SIGTERM gives STOPPING=1 and exit 0.
func TestSystemdNotify(t *testing.T) {
	daemon, ctl := binaries(t)
	notifyPath, notes := notifySocket(t)
	other := fmt.Sprintf("tenants:\n  - name: other\n    identities: {uids: [%d]}\n    roles: [signer]\n", os.Getuid()+1)
	_, sock, cfgPath := daemonConfig(t, "notify", other)
	base, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(daemon, "--config", cfgPath)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notifyPath, "WATCHDOG_USEC=300000")
	p := launch(t, cmd)

	select {
	case m := <-notes:
		if !strings.Contains(m, "READY=1") {
			t.Fatalf("first notification %q, want READY=1", m)
		}
	case <-p.done:
		t.Fatalf("keybrokerd exited: %v\n%s", p.err, p.stderr)
	case <-time.After(30 * time.Second):
		t.Fatalf("no READY=1 within 30s\n%s", p.stderr)
	}
	// READY=1 means serving: the very first health check answers.
	if got := health(ctl, sock); got != "SERVING" {
		t.Fatalf("health right after READY=1: %q, want SERVING", got)
	}
	for i := 0; i < 2; i++ {
		waitNote(t, notes, "WATCHDOG=1", 2*time.Second)
	}
	// This uid is not a tenant yet.
	if out, err := exec.Command(ctl, "--socket", sock, "keys", "list").CombinedOutput(); err == nil {
		t.Fatalf("keys list before the reload succeeded: %s", out)
	}

	// A valid file that adds a tenant for this uid.
	mine := fmt.Sprintf("  - name: mine\n    identities: {uids: [%d]}\n    roles: [signer, admin]\n", os.Getuid())
	if err := os.WriteFile(cfgPath, append(append([]byte{}, base...), mine...), 0o600); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGHUP)
	waitNote(t, notes, "RELOADING=1", 5*time.Second)
	if skipped := waitNote(t, notes, "READY=1", 5*time.Second); len(skipped) > 0 {
		for _, m := range skipped {
			if m != "WATCHDOG=1" {
				t.Errorf("between RELOADING=1 and READY=1: %q", m)
			}
		}
	}
	ctlRun(t, ctl, sock, "keys", "create", "after-reload", "--alg", "ES256")

	// An invalid file: three problems, all logged; the old config serves.
	bad := string(base) + mine + "    quota: {signs_per_second: -5}\nlog:\n  level: loud\nhealth:\n  probe_interval: 1ns\n"
	if err := os.WriteFile(cfgPath, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGHUP)
	waitNote(t, notes, "RELOADING=1", 5*time.Second)
	waitNote(t, notes, "READY=1", 5*time.Second)
	// The log line may land just after READY=1: give it a moment.
	wants := []string{"configuration reload refused", "tenants[1] (mine).quota: values must not be negative", "log.level: got", "health.probe_interval: got 1ns"}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		all := true
		for _, want := range wants {
			all = all && strings.Contains(p.stderr.String(), want)
		}
		if all {
			break
		}
	}
	logged := p.stderr.String()
	for _, want := range wants {
		if !strings.Contains(logged, want) {
			t.Errorf("log does not list %q\n%s", want, logged)
		}
	}
	if out := ctlRun(t, ctl, sock, "keys", "list"); !strings.Contains(out, "after-reload") {
		t.Errorf("after a refused reload, keys list = %q", out)
	}

	p.cmd.Process.Signal(syscall.SIGTERM)
	waitNote(t, notes, "STOPPING=1", 5*time.Second)
	select {
	case <-p.done:
		if p.err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", p.err, p.stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("keybrokerd did not exit within 10s of SIGTERM")
	}
}

// TestSocketActivation passes the daemon a listening unix socket as
// systemd does (fd 3, LISTEN_FDS=1, LISTEN_PID of the daemon itself: the
// shell's $$ survives its exec) and checks it serves there, does not
// create its configured socket, and leaves the passed one in place.
func TestSocketActivation(t *testing.T) {
	daemon, ctl := binaries(t)
	_, sock, cfgPath := daemonConfig(t, "activate", "")
	passed := filepath.Join(shortDir(t), "activated.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: passed, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	defer f.Close()
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"`, daemon, "--config", cfgPath)
	cmd.ExtraFiles = []*os.File{f} // fd 3
	p := launch(t, cmd)
	deadline := time.Now().Add(30 * time.Second)
	for health(ctl, passed) != "SERVING" {
		if time.Now().After(deadline) {
			t.Fatalf("not serving on the passed socket after 30s\n%s", p.stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ctlRun(t, ctl, passed, "keys", "create", "k", "--alg", "ES256")
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("the daemon created its configured socket too: %v", err)
	}
	if !strings.Contains(p.stderr.String(), "socket activation") {
		t.Errorf("log does not mention socket activation:\n%s", p.stderr)
	}
	p.stop(t)
	if _, err := os.Stat(passed); err != nil {
		t.Errorf("the passed socket was removed (it belongs to systemd): %v", err)
	}
}

// TestSIGTERMDuringSigns: SIGTERM while 100 Signs are in flight; every call
// completes or gets UNAVAILABLE, and the daemon exits 0 within 10 s.
func TestSIGTERMDuringSigns(t *testing.T) {
	daemon, ctl := binaries(t)
	_, sock, cfgPath := daemonConfig(t, "drain", "")
	p := start(t, daemon, ctl, sock, "--config", cfgPath)
	ctlRun(t, ctl, sock, "keys", "create", "k", "--alg", "ES256")

	const callers = 100
	var conns []*grpc.ClientConn
	for i := 0; i < 4; i++ {
		conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conns = append(conns, conn)
	}
	digest := sha256.Sum256([]byte("drain"))
	var ok, unavailable atomic.Int64
	var mu sync.Mutex
	var bad []error
	var wg sync.WaitGroup
	started := make(chan struct{}, callers)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := 0; i < callers; i++ {
		c := kbv1.NewKeyBrokerClient(conns[i%len(conns)])
		wg.Add(1)
		go func() {
			defer wg.Done()
			started <- struct{}{}
			for ctx.Err() == nil {
				_, err := c.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: digest[:]})
				switch status.Code(err) {
				case codes.OK:
					ok.Add(1)
					continue
				case codes.Unavailable:
					unavailable.Add(1)
				default:
					mu.Lock()
					bad = append(bad, err)
					mu.Unlock()
				}
				return
			}
		}()
	}
	for i := 0; i < callers; i++ {
		<-started
	}
	for ok.Load() < 2*callers {
		if ctx.Err() != nil {
			t.Fatalf("only %d signatures before the deadline", ok.Load())
		}
		time.Sleep(time.Millisecond)
	}
	sent := time.Now()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", p.err, p.stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("keybrokerd did not exit within 10s of SIGTERM")
	}
	took := time.Since(sent)
	wg.Wait()
	for _, err := range bad {
		t.Errorf("a Sign during shutdown got %v, want OK or UNAVAILABLE", err)
	}
	if unavailable.Load() != callers {
		t.Errorf("%d callers ended with UNAVAILABLE, want all %d", unavailable.Load(), callers)
	}
	t.Logf("%d signatures, %d UNAVAILABLE, exit %v after SIGTERM", ok.Load(), unavailable.Load(), took)
}
