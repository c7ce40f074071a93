package tpm

import (
	"context"
	"crypto"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/kms/kmstest"
	"github.com/keybroker/keybroker/tpm/swtpmtest"
)

// cancelConn cancels a call's context at its n-th TPM command: before the
// command is sent (the caller gives up while the command is in flight) or
// after its response came back (between two commands).
type cancelConn struct {
	conn
	mu       sync.Mutex
	n        int
	inFlight bool
	cancel   context.CancelFunc
	sent     []tpm2.TPMCC
}

// arm makes the n-th command from now cancel the context of cancel.
func (c *cancelConn) arm(n int, inFlight bool, cancel context.CancelFunc) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n, c.inFlight, c.cancel, c.sent = n, inFlight, cancel, nil
}

// fired reports whether the armed cancel ran, and the commands sent since
// arm.
func (c *cancelConn) fired() (bool, []tpm2.TPMCC) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cancel == nil, c.sent
}

func (c *cancelConn) step(before bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cancel != nil && c.inFlight == before && c.n == len(c.sent) {
		c.cancel()
		c.cancel = nil
	}
}

func (c *cancelConn) roundTrip(cmd []byte, deadline time.Time) ([]byte, error) {
	c.mu.Lock()
	c.sent = append(c.sent, tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:])))
	c.mu.Unlock()
	c.step(true)
	rsp, err := c.conn.roundTrip(cmd, deadline)
	c.step(false)
	return rsp, err
}

// checkObjects checks that the transient objects loaded in the TPM are
// exactly those the backend holds.
func checkObjects(t *testing.T, b *Backend) {
	t.Helper()
	withTPM(t, b, func(l *link) {
		ours := make(map[tpm2.TPMHandle]bool)
		for _, o := range b.objs {
			ours[o.handle] = true
		}
		for _, h := range loadedHandles(t, l, tpm2.TPMHTTransient) {
			if !ours[h] {
				t.Errorf("transient object 0x%08x is loaded in the TPM, not in the backend", uint32(h))
			}
			delete(ours, h)
		}
		for h := range ours {
			t.Errorf("the backend holds object 0x%08x, which the TPM has not loaded", uint32(h))
		}
	})
}

// TestCancelledCallLeavesNothingLoaded cancels Sign and Attest at each of
// their TPM commands in turn, between two commands and while one is in
// flight, in a state where they evict objects, load a parent and a key
// (with a one-use session) and start a reusable session. Every time, the
// call fails with the cancellation or completes, the connection is kept,
// and the TPM holds exactly the objects and sessions the backend knows of.
func TestCancelledCallLeavesNothingLoaded(t *testing.T) {
	sim := swtpmtest.Start(t)
	b := open(t, sim, t.TempDir(), func(c *Config) { c.LoadedObjects = 3 })
	ctx := context.Background()
	hA, pubA, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	hB, pubB, err := b.Generate(ctx, tenantB, es256)
	if err != nil {
		t.Fatal(err)
	}
	var cc *cancelConn
	withTPM(t, b, func(*link) { cc = &cancelConn{conn: b.conn}; b.conn = cc })
	ops := []struct {
		name string
		run  func(context.Context) error
	}{
		{"sign", func(ctx context.Context) error {
			_, err := b.Sign(ctx, tenantA, hA, digest(t, crypto.SHA256), crypto.SHA256)
			return err
		}},
		{"attest", func(ctx context.Context) error {
			_, err := b.Attest(ctx, tenantA, hA, []byte("nonce"))
			return err
		}},
	}
	trials := 0
	for _, op := range ops {
		for _, inFlight := range []bool{false, true} {
			for n := 1; ; n++ {
				if n > 40 {
					t.Fatalf("%s: still cancelling after %d commands", op.name, n-1)
				}
				// Tenant B's parent and key loaded, with a session:
				// the operation on tenant A's key evicts them.
				signAndVerify(t, b, tenantB, hB, pubB)
				cctx, cancel := context.WithCancel(ctx)
				cc.arm(n, inFlight, cancel)
				err := op.run(cctx)
				cancel()
				fired, sent := cc.fired()
				if !fired {
					break // the operation sends fewer than n commands
				}
				trials++
				if err != nil && !errors.Is(err, context.Canceled) {
					t.Errorf("%s cancelled at command %d (%v, in flight %v): got %v, want context.Canceled", op.name, n, sent[n-1], inFlight, err)
				}
				if err != nil && !errors.Is(err, kms.ErrUnavailable) {
					t.Errorf("%s cancelled at command %d: %v does not wrap ErrUnavailable", op.name, n, err)
				}
				if b.conn != cc {
					t.Fatalf("%s cancelled at command %d (%v, in flight %v) dropped the connection", op.name, n, sent[n-1], inFlight)
				}
				checkSessions(t, b)
				checkObjects(t, b)
			}
		}
	}
	t.Logf("%d cancelled calls", trials)
	signAndVerify(t, b, tenantA, hA, pubA)
	if b.conn != cc {
		t.Error("the connection was dropped")
	}
}

// TestCancelledInitKeepsConnection: a call cancelled while it initialises
// the TPM on a new connection keeps that connection, and the next call
// finishes the initialisation on it.
func TestCancelledInitKeepsConnection(t *testing.T) {
	b, _ := start(t)
	ctx := context.Background()
	h, pub, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	var cc *cancelConn
	withTPM(t, b, func(*link) {
		cc = &cancelConn{conn: b.conn}
		b.conn, b.ready = cc, false
	})
	for n := 1; n <= 2; n++ {
		cctx, cancel := context.WithCancel(ctx)
		cc.arm(n, false, cancel)
		_, err := b.Sign(cctx, tenantA, h, digest(t, crypto.SHA256), crypto.SHA256)
		cancel()
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Sign cancelled at command %d of the initialisation: got %v, want context.Canceled", n, err)
		}
		if b.conn != cc {
			t.Fatalf("Sign cancelled at command %d of the initialisation dropped the connection", n)
		}
	}
	signAndVerify(t, b, tenantA, h, pub)
	if b.conn != cc || !b.ready {
		t.Error("the next call did not initialise the TPM on the same connection")
	}
	checkSessions(t, b)
	checkObjects(t, b)
}

// TestCancelledCallersDoNotDisturbOthers: while four callers sign and
// attest with contexts cancelled at random moments, a fifth caller that
// never cancels never fails, the connection is never dropped, and nothing
// is left loaded.
func TestCancelledCallersDoNotDisturbOthers(t *testing.T) {
	sim := swtpmtest.Start(t)
	b := open(t, sim, t.TempDir(), func(c *Config) { c.LoadedObjects = 3 })
	ctx := context.Background()
	hA, pubA, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	hB, _, err := b.Generate(ctx, tenantB, es256)
	if err != nil {
		t.Fatal(err)
	}
	s := spy(t, b)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var cancelled, completed atomic.Int32
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 2))
			for {
				select {
				case <-stop:
					return
				default:
				}
				cctx, cancel := context.WithCancel(ctx)
				timer := time.AfterFunc(time.Duration(r.IntN(2000))*time.Microsecond, cancel)
				p, h := tenantA, hA
				if r.IntN(2) == 0 {
					p, h = tenantB, hB
				}
				var err error
				if r.IntN(4) == 0 {
					_, err = b.Attest(cctx, p, h, []byte("nonce"))
				} else {
					_, err = b.Sign(cctx, p, h, make([]byte, 32), crypto.SHA256)
				}
				timer.Stop()
				cancel()
				switch {
				case err == nil:
					completed.Add(1)
				case errors.Is(err, context.Canceled):
					cancelled.Add(1)
				default:
					t.Errorf("cancelled caller: got %v, want context.Canceled", err)
				}
			}
		}()
	}
	var signs, fails int
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end) && fails < 10; {
		d := digest(t, crypto.SHA256)
		sig, err := b.Sign(ctx, tenantA, hA, d, crypto.SHA256)
		if err == nil {
			err = kmstest.Verify(pubA, d, sig, crypto.SHA256)
		}
		if err != nil {
			fails++
			t.Errorf("the caller that never cancels failed: %v", err)
		}
		signs++
	}
	close(stop)
	wg.Wait()
	t.Logf("%d signatures by the caller that never cancels; other callers: %d cancelled, %d completed; %d TPM2_StartAuthSession",
		signs, cancelled.Load(), completed.Load(), s.count(tpm2.TPMCCStartAuthSession))
	if cancelled.Load() == 0 {
		t.Error("no call was cancelled: the test proves nothing")
	}
	if b.conn != s {
		t.Error("the connection was dropped")
	}
	checkSessions(t, b)
	checkObjects(t, b)
}

// listenBacklog0 listens on a unix socket with a listen backlog of 0: one
// connection waits to be accepted, and the next connect fails with EAGAIN.
func listenBacklog0(t *testing.T) (net.Listener, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "tpmdial")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	ln, err := net.FileListener(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	waiting, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { waiting.Close() })
	if c, err := net.Dial("unix", path); !errors.Is(err, syscall.EAGAIN) {
		if c != nil {
			c.Close()
		}
		t.Fatalf("second connect to a full backlog: got %v, want EAGAIN", err)
	}
	return ln, path
}

// TestDialRetriesFullBacklog: a connect refused with EAGAIN because the
// TPM server's listen backlog is full is retried until the deadline.
func TestDialRetriesFullBacklog(t *testing.T) {
	ln, path := listenBacklog0(t)
	cfg := Config{Socket: path}

	// Nobody accepts: the dial gives up at the deadline, with EAGAIN.
	began := time.Now()
	_, err := dial(context.Background(), cfg, began.Add(200*time.Millisecond))
	took := time.Since(began)
	if !errors.Is(err, syscall.EAGAIN) {
		t.Errorf("dial to a full backlog: got %v, want EAGAIN", err)
	}
	if took < 150*time.Millisecond || took > time.Second {
		t.Errorf("dial to a full backlog gave up after %v, want about 200ms", took)
	}

	// A cancelled context ends the retries.
	cctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, err := dial(cctx, cfg, time.Now().Add(5*time.Second)); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled dial: got %v, want context.Canceled", err)
	}

	// The server accepts the waiting connection: the dial gets through.
	go func() {
		time.Sleep(100 * time.Millisecond)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	c, err := dial(context.Background(), cfg, time.Now().Add(5*time.Second))
	if err != nil {
		t.Fatalf("dial once the backlog drains: %v", err)
	}
	c.Close()
}
