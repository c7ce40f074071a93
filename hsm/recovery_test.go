package hsm

import (
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/kms/kmstest"
	"github.com/keybroker/keybroker/softhsm/p11kittest"
)

// startP11Kit serves a SoftHSM2 token through p11-kit server, in a short
// directory (the socket path must fit in sun_path).
func startP11Kit(t *testing.T) *p11kittest.Server {
	t.Helper()
	if _, err := exec.LookPath("p11-kit"); err != nil {
		t.Fatal("p11-kit is not installed: run scripts/install-deps.sh (apt-get install p11-kit)")
	}
	dir, err := os.MkdirTemp("", "p11k")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return p11kittest.Start(t, dir)
}

// TestRecoversFromHSMRestart: the HSM process is killed under load and
// comes back 3 s later. Calls fail fast with ErrUnavailable meanwhile (none
// blocks past its deadline), Probe reports the outage, and signing resumes
// without reopening the Backend.
func TestRecoversFromHSMRestart(t *testing.T) {
	srv := startP11Kit(t)
	t.Setenv("P11_KIT_SERVER_ADDRESS", srv.Address())
	b, err := Open(Config{ModulePath: p11kittest.ClientModule, TokenLabel: srv.Token.Label, PIN: srv.Token.PIN, MaxSessions: 8, PoolWaitTimeout: time.Second}, nil)
	if err != nil {
		t.Fatalf("Open through p11-kit: %v", err)
	}
	defer b.Close()
	ctx := context.Background()
	h, pub, err := b.Generate(ctx, kms.Partition{Tenant: "t"}, kms.KeySpec{Alg: kms.ES256, Label: "k/v1"})
	if err != nil {
		t.Fatal(err)
	}
	const deadline = time.Second
	load := startSignLoad(b, h, pub, deadline, 4)
	time.Sleep(300 * time.Millisecond)
	srv.Kill()
	killed := time.Now()
	// Probe reports the outage within a second.
	var probeDown time.Duration
	for time.Since(killed) < 2*time.Second {
		// With a deadline, as the daemon's probes have: a module that
		// never answers must fail the test, not hang it.
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := b.Probe(pctx)
		cancel()
		if err != nil {
			probeDown = time.Since(killed)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(3*time.Second - time.Since(killed))
	srv.Start()
	restarted := time.Now()
	lastOK := load.waitOKAfter(restarted, 10*time.Second)
	load.halt()
	t.Logf("probe down after %v; %d failed calls; slowest call %v; signing back %v after restart", probeDown, load.failures.Load(), load.slowest, lastOK.Sub(restarted))
	if load.badError != nil {
		t.Fatalf("unexpected error: %v", load.badError)
	}
	if probeDown == 0 || probeDown > time.Second {
		t.Errorf("Probe did not report the outage within 1 s (took %v)", probeDown)
	}
	if load.failures.Load() == 0 {
		t.Error("no call failed while the HSM was down")
	}
	if load.slowest > deadline+time.Second {
		t.Errorf("a call took %v, past its %v deadline", load.slowest, deadline)
	}
	if !lastOK.After(restarted) || lastOK.Sub(restarted) > 5*time.Second {
		t.Errorf("signing did not resume within 5 s of the restart (last success %v after)", lastOK.Sub(restarted))
	}
	if err := b.Probe(ctx); err != nil {
		t.Errorf("Probe after recovery: %v", err)
	}
}

// TestHungHSM: the HSM process stops answering (SIGSTOP). Calls return at
// their deadline with ErrUnavailable, Probe fails, and everything works
// again once it continues.
func TestHungHSM(t *testing.T) {
	srv := startP11Kit(t)
	t.Setenv("P11_KIT_SERVER_ADDRESS", srv.Address())
	b, err := Open(Config{ModulePath: p11kittest.ClientModule, TokenLabel: srv.Token.Label, PIN: srv.Token.PIN, MaxSessions: 8, PoolWaitTimeout: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	h, _, err := b.Generate(ctx, kms.Partition{Tenant: "t"}, kms.KeySpec{Alg: kms.ES256, Label: "k/v1"})
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	pgid := -srv.PID()
	syscall.Kill(pgid, syscall.SIGSTOP)
	defer syscall.Kill(pgid, syscall.SIGCONT)
	const deadline = 500 * time.Millisecond
	// Stopped for a few calls in make test, for 30 s in make soak.
	hold := time.Duration(0)
	if os.Getenv("KEYBROKER_SOAK") != "" {
		hold = 30 * time.Second
	}
	stopped := time.Now()
	for i := 0; i < 3 || time.Since(stopped) < hold; i++ {
		cctx, cancel := context.WithTimeout(ctx, deadline)
		start := time.Now()
		_, err := b.Sign(cctx, kms.Partition{Tenant: "t"}, h, digest[:], crypto.SHA256)
		took := time.Since(start)
		cancel()
		if !errors.Is(err, kms.ErrUnavailable) {
			t.Fatalf("Sign to a hung HSM: %v, want ErrUnavailable", err)
		}
		if took > deadline+time.Second {
			t.Fatalf("Sign to a hung HSM took %v with a %v deadline", took, deadline)
		}
	}
	pctx, cancel := context.WithTimeout(ctx, deadline)
	if err := b.Probe(pctx); err == nil {
		t.Error("Probe of a hung HSM succeeded")
	}
	cancel()
	syscall.Kill(pgid, syscall.SIGCONT)
	var last error
	for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(50 * time.Millisecond) {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, last = b.Sign(cctx, kms.Partition{Tenant: "t"}, h, digest[:], crypto.SHA256)
		cancel()
		if last == nil {
			return
		}
	}
	t.Fatalf("signing did not resume after SIGCONT: %v", last)
}

// TestHungThenRestartedHSM: the HSM process hangs (SIGSTOP) under load,
// then is killed and started again, as a supervisor does with a hung
// service. Calls stuck in the module during the hang must not keep the
// backend from reconnecting: signing resumes within 5 s of the restart,
// and no call overruns its deadline by more than a second.
func TestHungThenRestartedHSM(t *testing.T) {
	srv := startP11Kit(t)
	t.Setenv("P11_KIT_SERVER_ADDRESS", srv.Address())
	b, err := Open(Config{ModulePath: p11kittest.ClientModule, TokenLabel: srv.Token.Label, PIN: srv.Token.PIN, MaxSessions: 8, PoolWaitTimeout: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	h, pub, err := b.Generate(context.Background(), kms.Partition{Tenant: "t"}, kms.KeySpec{Alg: kms.ES256, Label: "k/v1"})
	if err != nil {
		t.Fatal(err)
	}
	const deadline = 500 * time.Millisecond
	load := startSignLoad(b, h, pub, deadline, 4)
	time.Sleep(200 * time.Millisecond)
	pgid := -srv.PID()
	syscall.Kill(pgid, syscall.SIGSTOP)
	time.Sleep(2 * time.Second)
	srv.Kill() // SIGKILL reaches a stopped process
	srv.Start()
	restarted := time.Now()
	lastOK := load.waitOKAfter(restarted, 10*time.Second)
	load.halt()
	t.Logf("slowest call %v; signing back %v after the restart", load.slowest, lastOK.Sub(restarted))
	if load.badError != nil {
		t.Errorf("unexpected error: %v", load.badError)
	}
	if !lastOK.After(restarted) || lastOK.Sub(restarted) > 5*time.Second {
		t.Errorf("signing did not resume within 5 s of the restart (last success %v after)", lastOK.Sub(restarted))
	}
	if load.slowest > deadline+time.Second {
		t.Errorf("a call took %v, past its %v deadline", load.slowest, deadline)
	}
}

// signLoad signs with h from several goroutines, each call bounded by
// deadline, and keeps what the tests check: the last verified signature,
// the slowest call, the failures that say unavailable or busy, and any
// other error or bad signature.
type signLoad struct {
	mu       sync.Mutex
	lastOK   time.Time
	slowest  time.Duration
	badError error
	failures atomic.Int64
	stop     chan struct{}
	wg       sync.WaitGroup
}

func startSignLoad(b *Backend, h kms.Handle, pub crypto.PublicKey, deadline time.Duration, workers int) *signLoad {
	l := &signLoad{stop: make(chan struct{})}
	digest := sha256.Sum256([]byte("x"))
	for range workers {
		l.wg.Go(func() {
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), deadline)
				start := time.Now()
				sig, err := b.Sign(ctx, kms.Partition{Tenant: "t"}, h, digest[:], crypto.SHA256)
				took := time.Since(start)
				cancel()
				l.mu.Lock()
				l.slowest = max(l.slowest, took)
				switch {
				case err == nil:
					if kmstest.Verify(pub, digest[:], sig, crypto.SHA256) != nil {
						l.badError = errors.New("a signature does not verify")
					}
					l.lastOK = time.Now()
				case errors.Is(err, kms.ErrUnavailable) || errors.Is(err, kms.ErrResourceExhausted):
					l.failures.Add(1)
				default:
					l.badError = err
				}
				l.mu.Unlock()
				if err != nil {
					time.Sleep(10 * time.Millisecond)
				}
			}
		})
	}
	return l
}

// waitOKAfter waits up to limit for a signature made after t, and returns
// the time of the last one.
func (l *signLoad) waitOKAfter(t time.Time, limit time.Duration) time.Time {
	for start := time.Now(); time.Since(start) < limit; time.Sleep(20 * time.Millisecond) {
		l.mu.Lock()
		last := l.lastOK
		l.mu.Unlock()
		if last.After(t) {
			return last
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastOK
}

func (l *signLoad) halt() {
	close(l.stop)
	l.wg.Wait()
}
