package tpm

import (
	"context"
	"crypto"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/kms/kmstest"
	"github.com/keybroker/keybroker/tpm/swtpmtest"
)

// spyConn counts the commands sent to the TPM, and can replace the
// response to one of them after the TPM ran it, as if the response were
// lost or the TPM had asked to retry.
type spyConn struct {
	conn
	mu     sync.Mutex
	counts map[tpm2.TPMCC]int
	// fail, when not 0, is the command whose next response is replaced
	// by failRC.
	fail   tpm2.TPMCC
	failRC tpm2.TPMRC
}

func (s *spyConn) roundTrip(cmd []byte, deadline time.Time) ([]byte, error) {
	cc := tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:]))
	rsp, err := s.conn.roundTrip(cmd, deadline)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counts[cc]++
	if err == nil && cc == s.fail {
		s.fail = 0
		return response(s.failRC), nil
	}
	return rsp, err
}

func (s *spyConn) count(cc tpm2.TPMCC) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[cc]
}

func (s *spyConn) failNext(cc tpm2.TPMCC, rc tpm2.TPMRC) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail, s.failRC = cc, rc
}

// spy puts a spyConn under b's current connection.
func spy(t *testing.T, b *Backend) *spyConn {
	t.Helper()
	var s *spyConn
	withTPM(t, b, func(*link) {
		s = &spyConn{conn: b.conn, counts: make(map[tpm2.TPMCC]int)}
		b.conn = s
	})
	return s
}

// checkSessions checks that the HMAC sessions loaded in the TPM are
// exactly the backend's reusable ones, at most the limit, and returns how
// many there are.
func checkSessions(t *testing.T, b *Backend) int {
	t.Helper()
	n := 0
	withTPM(t, b, func(l *link) {
		loaded := make(map[tpm2.TPMHandle]bool)
		for _, h := range loadedHandles(t, l, tpm2.TPMHTHMACSession) {
			loaded[h] = true
		}
		for e := b.lru.Front(); e != nil; e = e.Next() {
			if o := e.Value.(*object); o.sess != nil {
				n++
				if !loaded[o.sess.Handle()] {
					t.Errorf("the session 0x%08x of %s is not loaded in the TPM", uint32(o.sess.Handle()), o.id)
				}
			}
		}
		if len(loaded) != n {
			t.Errorf("%d HMAC sessions loaded in the TPM, the backend holds %d", len(loaded), n)
		}
		if limit := min(maxKeySessions, b.cfg.LoadedObjects-2); n > limit {
			t.Errorf("%d reusable sessions, want at most %d", n, limit)
		}
	})
	return n
}

func signAndVerify(t *testing.T, b *Backend, p kms.Partition, h kms.Handle, pub crypto.PublicKey) {
	t.Helper()
	d := digest(t, crypto.SHA256)
	sig, err := b.Sign(context.Background(), p, h, d, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := kmstest.Verify(pub, d, sig, crypto.SHA256); err != nil {
		t.Fatal(err)
	}
}

// signWhenBack signs with h until the TPM answers again, within 5 s, and
// verifies the signature; an error for which outage is false fails t at
// once.
func signWhenBack(t *testing.T, b *Backend, p kms.Partition, h kms.Handle, pub crypto.PublicKey, outage func(error) bool) {
	t.Helper()
	d := digest(t, crypto.SHA256)
	deadline := time.Now().Add(5 * time.Second)
	for {
		sig, err := b.Sign(context.Background(), p, h, d, crypto.SHA256)
		if err == nil {
			if err := kmstest.Verify(pub, d, sig, crypto.SHA256); err != nil {
				t.Fatal(err)
			}
			return
		}
		if !outage(err) || time.Now().After(deadline) {
			t.Fatalf("Sign after the TPM came back: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSessionReuse: many signatures with one key start one session, not
// one each.
func TestSessionReuse(t *testing.T) {
	b, _ := start(t)
	ctx := context.Background()
	h, pub, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	s := spy(t, b)
	const n = 200
	for range n {
		signAndVerify(t, b, tenantA, h, pub)
	}
	// One for TPM2_Load's one-use session, one for the key's.
	if got := s.count(tpm2.TPMCCStartAuthSession); got > 2 {
		t.Errorf("%d signatures sent %d TPM2_StartAuthSession, want at most 2", n, got)
	}
	if got := s.count(tpm2.TPMCCSign); got != n {
		t.Errorf("%d signatures sent %d TPM2_Sign", n, got)
	}
	if got := checkSessions(t, b); got != 1 {
		t.Errorf("%d reusable sessions, want 1", got)
	}
}

// TestSessionEviction signs with more keys than the LRU holds, in an
// interleaved order: every signature verifies, a key signing again while
// loaded reuses its session, and the sessions the TPM holds are always
// exactly the cached keys' ones, within the limit. (With LoadedObjects
// above swtpm's 3 transient slots, TPM2_Load fails with
// TPM_RC_OBJECT_MEMORY and is sent again, so it counts more loads.)
func TestSessionEviction(t *testing.T) {
	for _, loaded := range []int{3, 4, 6} {
		t.Run(map[int]string{3: "loaded3", 4: "loaded4", 6: "loaded6"}[loaded], func(t *testing.T) {
			sim := swtpmtest.Start(t)
			b := open(t, sim, t.TempDir(), func(c *Config) { c.LoadedObjects = loaded })
			ctx := context.Background()
			type k struct {
				p   kms.Partition
				h   kms.Handle
				pub crypto.PublicKey
			}
			var keys []k
			for i := range 6 {
				p := tenantA
				if i%3 == 2 {
					p = tenantB
				}
				h, pub, err := b.Generate(ctx, p, es256)
				if err != nil {
					t.Fatal(err)
				}
				keys = append(keys, k{p, h, pub})
			}
			s := spy(t, b)
			signs := 0
			for r := range 4 {
				for i := range keys {
					// Each key twice in a row now and then, the
					// order shifting every round.
					key := keys[(i*(r+1))%len(keys)]
					signAndVerify(t, b, key.p, key.h, key.pub)
					started := s.count(tpm2.TPMCCStartAuthSession)
					signAndVerify(t, b, key.p, key.h, key.pub)
					if got := s.count(tpm2.TPMCCStartAuthSession); got != started {
						t.Errorf("round %d key %d: signing again with the loaded key started %d sessions", r, i, got-started)
					}
					signs += 2
					checkSessions(t, b)
				}
			}
			t.Logf("%d signatures: %d TPM2_StartAuthSession, %d TPM2_Load", signs, s.count(tpm2.TPMCCStartAuthSession), s.count(tpm2.TPMCCLoad))
		})
	}
}

// TestSessionFailure: when a command with a reusable session fails,
// possibly after the TPM ran it and rolled the session's nonce, the session
// is flushed and never used again; the next command starts another.
func TestSessionFailure(t *testing.T) {
	b, _ := start(t)
	ctx := context.Background()
	h, pub, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, b, tenantA, h, pub)
	s := spy(t, b)

	// TPM_RC_RETRY after the TPM signed: the backend retries with a fresh
	// session, the reused one being out of step.
	s.failNext(tpm2.TPMCCSign, tpm2.TPMRCRetry)
	signAndVerify(t, b, tenantA, h, pub)
	if got := s.count(tpm2.TPMCCSign); got != 2 {
		t.Errorf("%d TPM2_Sign, want 2", got)
	}
	if got := s.count(tpm2.TPMCCStartAuthSession); got != 1 {
		t.Errorf("%d TPM2_StartAuthSession, want 1", got)
	}
	checkSessions(t, b)

	// An error for the client: the next call still signs.
	s.failNext(tpm2.TPMCCSign, tpm2.TPMRCCanceled)
	if _, err := b.Sign(ctx, tenantA, h, digest(t, crypto.SHA256), crypto.SHA256); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Sign with TPM_RC_CANCELED: got %v, want ErrUnavailable", err)
	}
	checkSessions(t, b)
	signAndVerify(t, b, tenantA, h, pub)

	// The session flushed behind the backend's back.
	withTPM(t, b, func(l *link) {
		for _, o := range b.objs {
			if o.sess != nil {
				if _, err := (tpm2.FlushContext{FlushHandle: o.sess.Handle()}).Execute(l); err != nil {
					t.Fatal(err)
				}
			}
		}
	})
	signAndVerify(t, b, tenantA, h, pub)
	if got := checkSessions(t, b); got != 1 {
		t.Errorf("%d reusable sessions, want 1", got)
	}
}

// TestSessionRestart: after swtpm restarts, the old sessions are forgotten
// and signing starts new ones.
func TestSessionRestart(t *testing.T) {
	sim := swtpmtest.Start(t)
	b := open(t, sim, t.TempDir(), func(c *Config) { c.Timeout = time.Second })
	ctx := context.Background()
	h, pub, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, b, tenantA, h, pub)
	for cycle := range 2 {
		sim.Kill()
		sim.Restart(t)
		signWhenBack(t, b, tenantA, h, pub, func(err error) bool { return errors.Is(err, kms.ErrUnavailable) })
		for range 5 {
			signAndVerify(t, b, tenantA, h, pub)
		}
		if got := checkSessions(t, b); got != 1 {
			t.Errorf("cycle %d: %d reusable sessions, want 1", cycle, got)
		}
	}
}

// loadedHandles returns the handles of type ht the TPM has loaded.
func loadedHandles(t *testing.T, l *link, ht tpm2.TPMHT) []tpm2.TPMHandle {
	t.Helper()
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 64}.Execute(l)
	if err != nil {
		t.Fatal(err)
	}
	hs, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		t.Fatal(err)
	}
	return hs.Handle
}
