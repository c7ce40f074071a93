package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/internal/store/etcd"
	"github.com/keybroker/keybroker/internal/store/storetest"
	"github.com/keybroker/keybroker/internal/testetcd"
	"github.com/keybroker/keybroker/kms"
)

var ctx = context.Background()

var prefixes atomic.Int64

func open(t *testing.T, c *testetcd.Cluster) *etcd.Store {
	t.Helper()
	return openTimeout(t, c, 2*time.Second)
}

// openTimeout opens a store under a prefix of its own, whose intents name
// a replica "test" with a lease that needs to exist only for IntentLive.
func openTimeout(t *testing.T, c *testetcd.Cluster, timeout time.Duration) *etcd.Store {
	t.Helper()
	s, err := etcd.Open(etcd.Config{Endpoints: c.Endpoints(), Prefix: fmt.Sprintf("/kb-test-%d/", prefixes.Add(1)),
		DialTimeout: 2 * time.Second, RequestTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	s.SetOwner("test", 1)
	t.Cleanup(func() { s.Close() })
	return s
}

// TestConformance runs the store suite on a real 3-member etcd cluster,
// each test under its own prefix.
func TestConformance(t *testing.T) {
	c := testetcd.Start(t, 3)
	storetest.Run(t, func(t *testing.T) store.Store { return open(t, c) })
}

// TestFencedWrites: a fenced write commits only while the election key it
// compares is the one this replica created.
func TestFencedWrites(t *testing.T) {
	c := testetcd.Start(t, 1)
	s := open(t, c)
	k := storetest.TestKey("t1", "k")
	rev, err := s.CreateKey(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	k.Rev = rev
	k.Policy.RotationPeriod = time.Hour
	if _, err := s.UpdateKey(store.Fenced(ctx), k); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("fenced write while not leading: %v, want ErrNotLeader", err)
	}

	sess, err := concurrency.NewSession(s.Client(), concurrency.WithTTL(5))
	if err != nil {
		t.Fatal(err)
	}
	e := concurrency.NewElection(sess, s.Prefix()+"election/")
	if err := e.Campaign(ctx, "me"); err != nil {
		t.Fatal(err)
	}
	s.Lead(e.Key(), e.Rev())
	if k.Rev, err = s.UpdateKey(store.Fenced(ctx), k); err != nil {
		t.Fatalf("fenced write while leading: %v", err)
	}

	// The lease ends (as when the replica paused past its TTL): the
	// election key is gone, and a step started before cannot commit.
	if err := sess.Close(); err != nil {
		t.Fatal(err)
	}
	k.Policy.RotationPeriod = 2 * time.Hour
	if _, err := s.UpdateKey(store.Fenced(ctx), k); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("fenced write after the lease ended: %v, want ErrNotLeader", err)
	}
	got, err := s.Key(ctx, "t1", "k")
	if err != nil {
		t.Fatal(err)
	}
	if got.Policy.RotationPeriod != time.Hour || got.Rev != k.Rev {
		t.Errorf("record after the refused write: period %v rev %d, want 1h rev %d", got.Policy.RotationPeriod, got.Rev, k.Rev)
	}
	// An unfenced write (an admin call on any replica) still commits.
	if _, err := s.UpdateKey(ctx, k); err != nil {
		t.Errorf("unfenced write: %v", err)
	}
}

// TestUnavailable: with etcd gone, reads and writes fail within the
// request timeout as kms.ErrUnavailable, and a write is never reported as
// committed.
func TestUnavailable(t *testing.T) {
	c := testetcd.Start(t, 1)
	s := open(t, c)
	k := storetest.TestKey("t1", "k")
	rev, err := s.CreateKey(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	c.Kill(0)
	start := time.Now()
	if _, err := s.Keys(ctx); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Keys with etcd down: %v, want ErrUnavailable", err)
	}
	k.Rev = rev
	if _, err := s.UpdateKey(ctx, k); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("UpdateKey with etcd down: %v, want ErrUnavailable", err)
	}
	if _, err := s.CreateKey(ctx, storetest.TestKey("t1", "k2")); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("CreateKey with etcd down: %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("three calls with etcd down took %v; each should end at its 2 s timeout", d)
	}
	c.Restart(0)
	c.WaitHealthy(30 * time.Second)
	// The same client heals: no reopening.
	var got []store.Key
	for deadline := time.Now().Add(15 * time.Second); ; {
		if got, err = s.Keys(ctx); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("Keys 15 s after etcd came back: %v", err)
	}
	if len(got) != 1 || got[0].Rev != rev {
		t.Errorf("after etcd came back: %v, want t1/k unchanged at rev %d", storetest.Names(got), rev)
	}
}

// TestKeysSince: a read from a revision returns only what changed after it.
func TestKeysSince(t *testing.T) {
	c := testetcd.Start(t, 1)
	s := open(t, c)
	a := storetest.TestKey("t1", "a")
	ra, err := s.CreateKey(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	keys, at, err := s.KeysSince(ctx, 0)
	if err != nil || len(keys) != 1 || at < ra {
		t.Fatalf("KeysSince(0) = %v at %d, %v", storetest.Names(keys), at, err)
	}
	b := storetest.TestKey("t1", "b")
	if _, err := s.CreateKey(ctx, b); err != nil {
		t.Fatal(err)
	}
	keys, _, err = s.KeysSince(ctx, at)
	if err != nil || len(keys) != 1 || keys[0].Name != "b" {
		t.Fatalf("KeysSince(%d) = %v, %v; want only t1/b", at, storetest.Names(keys), err)
	}
}

// TestLeaseAliveAndEmpty: the helpers Reconcile and migration use.
func TestLeaseAliveAndEmpty(t *testing.T) {
	c := testetcd.Start(t, 1)
	s := open(t, c)
	if empty, err := s.IsEmpty(ctx); err != nil || !empty {
		t.Fatalf("IsEmpty of a new prefix: %v, %v", empty, err)
	}
	if err := s.PutIntent(ctx, store.Intent{Tenant: "t", Handle: kms.Handle{1}}); err != nil {
		t.Fatal(err)
	}
	if empty, err := s.IsEmpty(ctx); err != nil || empty {
		t.Fatalf("IsEmpty with an intent: %v, %v", empty, err)
	}
	l, err := s.Client().Grant(ctx, 30)
	if err != nil {
		t.Fatal(err)
	}
	if alive, err := s.LeaseAlive(ctx, int64(l.ID)); err != nil || !alive {
		t.Errorf("LeaseAlive of a granted lease: %v, %v", alive, err)
	}
	if _, err := s.Client().Revoke(ctx, l.ID); err != nil {
		t.Fatal(err)
	}
	if alive, err := s.LeaseAlive(ctx, int64(l.ID)); err != nil || alive {
		t.Errorf("LeaseAlive of a revoked lease: %v, %v", alive, err)
	}
}
