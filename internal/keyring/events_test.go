package keyring

import (
	"context"
	"testing"
	"time"

	"github.com/keybroker/keybroker/kms"
)

// TestEventsOncePerChange: events come from comparing the record installed
// with the one it replaces, so the same record installed twice (a
// writer's own, then the store's watch) gives them once, and a record
// from another replica (Apply) gives them as a local change would. A full
// watcher is cut off; the writer does not wait for it.
func TestEventsOncePerChange(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	if _, err := f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	var got []Event
	snap, stop := f.ring.Listen("t", "", func(ev Event) { got = append(got, ev) })
	defer stop()
	if len(snap) != 1 || snap[0].Kind != EventActive || !snap[0].Snapshot || snap[0].Kid == "" || snap[0].JWK.Kid != snap[0].Kid {
		t.Fatalf("snapshot %+v", snap)
	}
	if _, _, err := f.ring.RotateKey(ctx, "t", "k", 0); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Kind != EventRetired || got[0].Version != 1 || got[1].Kind != EventActive || got[1].Version != 2 {
		t.Fatalf("rotation events %+v", got)
	}
	// The record as stored, installed again: nothing new.
	rec, err := f.store.Key(ctx, "t", "k")
	if err != nil {
		t.Fatal(err)
	}
	if err := f.ring.Apply(rec); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("the same record again gave events: %+v", got[2:])
	}
	// A watcher of 1 that nobody reads: the next changes do not wait.
	_, w, err := f.ring.Watch("t", "k", 1)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	for _, overlap := range []time.Duration{48 * time.Hour, 72 * time.Hour} {
		if _, err := f.ring.UpdatePolicy(ctx, "t", "k", func(p kms.Policy) kms.Policy { p.Overlap = overlap; return p }); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-w.Overflow():
	default:
		t.Fatal("a watcher two events behind with a buffer of 1 was not cut off")
	}
	if ev := <-w.C; ev.Kind != EventPolicy || ev.Policy.Overlap != 48*time.Hour {
		t.Fatalf("buffered event %+v", ev)
	}
	if len(got) != 4 || got[3].Kind != EventPolicy {
		t.Fatalf("listener events %+v", got[2:])
	}
	// Another replica's revocation of v1, as its record arrives.
	rec, err = f.store.Key(ctx, "t", "k")
	if err != nil {
		t.Fatal(err)
	}
	other := rec.Clone()
	other.Versions[0].State, other.Versions[0].Revoked = kms.StateRevoked, f.clock.now()
	other.Rev++
	if err := f.ring.Apply(other); err != nil {
		t.Fatal(err)
	}
	if len(got) != 5 || got[4].Kind != EventRevoked || got[4].Version != 1 || !got[4].Time.Equal(f.clock.now()) {
		t.Fatalf("applied record's events %+v", got[4:])
	}

	if _, _, err := f.ring.Watch("t", "Bad Name", 1); err == nil {
		t.Fatal("Watch took a bad key name")
	}
}
