package keyring

import (
	"context"
	"testing"

	"github.com/keybroker/keybroker/kms"
)

// TestRotationWithStoreFailure: the store cannot be written when a
// rotation falls due (a read-only or full state directory looks the same to
// the keyring: the transaction fails). The rotation is abandoned cleanly —
// the new hardware key is removed, the failure counted — the ACTIVE
// version keeps signing, and once the store works again the rotation
// happens.
func TestRotationWithStoreFailure(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	k, err := f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
	if err != nil {
		t.Fatal(err)
	}
	f.store.Close() // every write fails from here
	f.clock.add(84 * kms.Day)
	if err := f.ring.Advance(ctx, f.clock.now()); err == nil {
		t.Fatal("Advance succeeded with a broken store")
	}
	if got := f.ring.Stats().RotationFailures; got != 1 {
		t.Errorf("rotation failures counter %d, want 1", got)
	}
	if got := f.hardwareObjects(t); got != 1 {
		t.Errorf("%d hardware objects after the failed rotation, want 1 (the new key removed)", got)
	}
	sig, err := f.ring.Sign(ctx, "t", SignRequest{Name: "k", Digest: make([]byte, 32)})
	if err != nil || sig.Kid != k.ActiveKid {
		t.Fatalf("Sign during the store failure: %v (kid %s, want %s)", err, sig.Kid, k.ActiveKid)
	}
	// The store comes back (the daemon restarts on a healthy disk): the
	// record is whole and the rotation proceeds.
	f.hsm.Close()
	f.store = nil
	f.open(t)
	got, err := f.ring.GetKey(ctx, "t", "k")
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Versions) != 2 || got.Versions[1].State != kms.StatePending || got.ActiveKid != k.ActiveKid {
		t.Errorf("after recovery: %+v, want v1 ACTIVE and v2 PENDING", got.Versions)
	}
}
