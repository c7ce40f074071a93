package daemon

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/softhsm/p11kittest"
	"github.com/keybroker/keybroker/tpm/swtpmtest"
)

func startP11kitHSM(t *testing.T, dir string) *p11kittest.Server {
	t.Helper()
	h := p11kittest.Start(t, dir)
	t.Setenv("P11_KIT_SERVER_ADDRESS", h.Address())
	return h
}

// waitHealth polls health every 10 ms until it is want, and returns how
// long that took; it fails the test after limit.
func waitHealth(t *testing.T, r *running, want healthpb.HealthCheckResponse_ServingStatus, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		resp, err := r.health.Check(ctx10(t), &healthpb.HealthCheckRequest{})
		if err == nil && resp.Status == want {
			return time.Since(start)
		}
		if time.Since(start) > limit {
			t.Fatalf("health %v (%v) after %v, want %v", resp.GetStatus(), err, limit, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFrozenHardwareHealth: the HSM (p11-kit server) or the TPM (swtpm)
// stops answering (SIGSTOP), with no call in flight and the default health
// configuration. Health turns NOT_SERVING within 1 s; continued (SIGCONT),
// it is SERVING again within 1 s and signs.
func TestFrozenHardwareHealth(t *testing.T) {
	for _, backend := range []string{"pkcs11", "tpm"} {
		t.Run(backend, func(t *testing.T) {
			var freeze, thaw func()
			edit := func(*config.Config) {}
			switch backend {
			case "pkcs11":
				dir := shortTempDir(t)
				hsm := startP11kitHSM(t, dir)
				freeze = func() { hsm.Signal(syscall.SIGSTOP) }
				thaw = func() { hsm.Signal(syscall.SIGCONT) }
				edit = func(c *config.Config) {
					c.PKCS11.Module, c.PKCS11.TokenLabel, c.PKCS11.PINFile = p11kittest.ClientModule, hsm.Token.Label, hsm.Token.PINFile
				}
			case "tpm":
				sim := swtpmtest.Start(t)
				freeze, thaw = func() { sim.Pause(t) }, func() { sim.Resume(t) }
				edit = func(c *config.Config) {
					c.Backend, c.TPM.Device, c.TPM.Socket = "tpm", "", sim.Socket
				}
			}
			r := startDaemon(t, edit, Options{})
			if r.cfg.Health != config.Default().Health {
				t.Fatalf("health config %+v, want the default", r.cfg.Health)
			}
			if _, err := r.client.CreateKey(ctx10(t), &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
				t.Fatal(err)
			}
			waitHealth(t, r, healthpb.HealthCheckResponse_SERVING, time.Second)

			freeze()
			down := waitHealth(t, r, healthpb.HealthCheckResponse_NOT_SERVING, time.Second)
			time.Sleep(2 * time.Second) // frozen for a while: probes pile up
			thaw()
			up := waitHealth(t, r, healthpb.HealthCheckResponse_SERVING, time.Second)
			if _, err := r.client.Sign(ctx10(t), &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)}); err != nil {
				t.Fatalf("Sign after the thaw: %v", err)
			}
			t.Logf("NOT_SERVING %v after the freeze, SERVING %v after the thaw", down, up)
		})
	}
}

// shortTempDir is a temporary directory with a path short enough for unix
// sockets.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kbf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// signer signs with key "k" from several goroutines, each digest unique,
// and remembers the SHA-256 of every digest whose signature it got back
// after mark was set.
type signer struct {
	r      *running
	next   atomic.Uint64
	mark   atomic.Bool
	mu     sync.Mutex
	after  []string // audit.DigestSHA256 of digests signed in calls started after mark
	errs   map[codes.Code]int
	stop   chan struct{}
	wg     sync.WaitGroup
	signed atomic.Int64
}

func startSigning(t *testing.T, r *running, workers int) *signer {
	s := &signer{r: r, errs: map[codes.Code]int{}, stop: make(chan struct{})}
	for range workers {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			for {
				select {
				case <-s.stop:
					return
				default:
				}
				digest := make([]byte, 32)
				binary.BigEndian.PutUint64(digest, s.next.Add(1))
				marked := s.mark.Load()
				_, err := r.client.Sign(ctx10(t), &kbv1.SignRequest{Name: "k", Digest: digest})
				s.mu.Lock()
				if err == nil {
					s.signed.Add(1)
					if marked {
						s.after = append(s.after, audit.DigestSHA256(digest))
					}
				} else {
					s.errs[status.Code(err)]++
				}
				s.mu.Unlock()
				if err != nil {
					time.Sleep(5 * time.Millisecond)
				}
			}
		}()
	}
	return s
}

func (s *signer) halt() {
	close(s.stop)
	s.wg.Wait()
}

// signDigests returns the digest hashes of the OK Sign records in the log
// file at path.
func signDigests(t *testing.T, path string) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, audit.MaxLineBytes+1)
	for sc.Scan() {
		var rec audit.Record
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("audit line %q: %v", sc.Bytes(), err)
		}
		if rec.Method == "/keybroker.v1.KeyBroker/Sign" && rec.Code == "OK" {
			out[rec.DigestSHA256] = true
		}
	}
	return out
}

// verifyAudit verifies the log at path against its head, as keybrokerctl
// does, and returns the result.
func verifyAudit(t *testing.T, path string) audit.Result {
	t.Helper()
	head, err := audit.ReadHead(path + ".head")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	res, err := audit.VerifyLog(bytes.NewReader(b), &head)
	if err != nil {
		t.Fatalf("audit verify: %v", err)
	}
	return res
}

// TestAuditLogDeleted: the audit file is unlinked while clients sign. No
// signature is returned whose record is not in the file at the configured
// path: calls fail UNAVAILABLE, health turns NOT_SERVING, and the daemon,
// without a restart, starts a new file whose first record says what was
// lost, and signs again.
func TestAuditLogDeleted(t *testing.T) {
	r := startDaemon(t, nil, Options{})
	path := r.cfg.AuditPath()
	if _, err := r.client.CreateKey(ctx10(t), &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	s := startSigning(t, r, 4)
	time.Sleep(200 * time.Millisecond)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	// Every call that starts from now on writes its record after the
	// unlink: if it succeeds, that record must be in the new file.
	s.mark.Store(true)
	removed := time.Now()
	waitHealth(t, r, healthpb.HealthCheckResponse_NOT_SERVING, 2*time.Second)
	waitHealth(t, r, healthpb.HealthCheckResponse_SERVING, 2*time.Second)
	for s.signed.Load() == 0 || time.Since(removed) < time.Second {
		time.Sleep(20 * time.Millisecond)
	}
	s.halt()
	r.stop()

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.errs[codes.Unavailable] == 0 {
		t.Errorf("no call failed UNAVAILABLE around the unlink (errors %v)", s.errs)
	}
	for c, n := range s.errs {
		if c != codes.Unavailable {
			t.Errorf("%d calls failed with %v, want only UNAVAILABLE", n, c)
		}
	}
	inFile := signDigests(t, path)
	missing := 0
	for _, d := range s.after {
		if !inFile[d] {
			missing++
		}
	}
	if missing > 0 || len(s.after) == 0 {
		t.Errorf("%d of %d signatures returned after the unlink have no record in the new file", missing, len(s.after))
	}
	res := verifyAudit(t, path)
	if len(res.Breaks) != 1 || res.Breaks[0].Line != 1 || !strings.Contains(res.Breaks[0].Reason, "deleted") {
		t.Fatalf("audit verify: %+v, want one break at line 1 saying the file was deleted", res)
	}
	if !strings.Contains(r.log.String(), "audit log recovered in a new segment") {
		t.Errorf("the log does not say the audit log recovered:\n%s", r.log)
	}
}

// TestAuditDiskFull: the audit log on a small filesystem that fills up.
// Signing fails closed (UNAVAILABLE; exactly as many OK records as
// signatures returned), health is NOT_SERVING while it lasts, and within
// 1 s of space coming back it is SERVING and signing, with no torn line
// and a log that verifies without a break.
func TestAuditDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts a small tmpfs to fill it up: run it as root (make test does, in CI)")
	}
	fs := shortTempDir(t)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", fs).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", fs).Run() })
	path := filepath.Join(fs, "audit.jsonl")
	r := startDaemon(t, func(c *config.Config) { c.Audit.Path = path }, Options{})
	if _, err := r.client.CreateKey(ctx10(t), &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	s := startSigning(t, r, 4)
	time.Sleep(100 * time.Millisecond)
	filler := filepath.Join(fs, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	for _, err := f.Write(make([]byte, 4096)); err == nil; _, err = f.Write(make([]byte, 4096)) {
	}
	for _, err := f.Write([]byte{0}); err == nil; _, err = f.Write([]byte{0}) {
	}
	f.Close()
	waitHealth(t, r, healthpb.HealthCheckResponse_NOT_SERVING, 2*time.Second)
	time.Sleep(500 * time.Millisecond)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	up := waitHealth(t, r, healthpb.HealthCheckResponse_SERVING, time.Second)
	before := s.signed.Load()
	for s.signed.Load() == before {
		if time.Since(freed) > time.Second {
			t.Fatal("no signature within 1 s of space coming back")
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	s.halt()
	r.stop()

	if s.errs[codes.Unavailable] == 0 {
		t.Errorf("no call failed UNAVAILABLE while the disk was full (errors %v)", s.errs)
	}
	res := verifyAudit(t, path)
	if len(res.Breaks) != 0 || res.Unanchored() {
		t.Errorf("audit verify: %+v, want a clean log", res)
	}
	if n := len(signDigests(t, path)); int64(n) != s.signed.Load() {
		t.Errorf("%d OK Sign records, %d signatures returned", n, s.signed.Load())
	}
	t.Logf("SERVING %v after space came back; %d signatures, %d refused", up, s.signed.Load(), s.errs[codes.Unavailable])
}
