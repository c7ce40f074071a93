// Package storetest is the conformance suite every metadata store backend
// passes: the same tests run against bbolt (internal/store) and against a
// real etcd cluster (internal/store/etcd).
package storetest

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
)

// Run runs the suite; open returns a new, empty store for each test.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	for _, tc := range []struct {
		name string
		f    func(*testing.T, store.Store)
	}{
		{"Empty", testEmpty},
		{"CreateRoundTrip", testCreateRoundTrip},
		{"CreateSetsSchema", testCreateSetsSchema},
		{"CreateDuplicate", testCreateDuplicate},
		{"Update", testUpdate},
		{"UpdateStaleRevision", testUpdateStale},
		{"ConcurrentUpdatesOneWins", testConcurrentUpdates},
		{"KidNeverReused", testKidReuse},
		{"Order", testOrder},
		{"Intents", testIntents},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.f(t, open(t)) })
	}
}

var ctx = context.Background()

var T0 = time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)

// TestKey is a key with every field set to a value that is not its zero.
func TestKey(tenant, name string) store.Key {
	return store.Key{
		Tenant:  tenant,
		Name:    name,
		Alg:     kms.PS256,
		Bits:    3072,
		Backend: "pkcs11",
		Created: T0,
		Versions: []store.Version{
			{
				Version:   1,
				Kid:       "kid-1-" + tenant + "-" + name,
				State:     kms.StateRetired,
				Handle:    kms.Handle{0x00, 0x01, 0xfe, 0xff, 0x10},
				PublicKey: []byte{0x30, 0x82, 0x01, 0x22, 0x00, 0xff},
				Created:   T0,
				// Opaque to the store: the keyring checks chains.
				Certificates: [][]byte{{0x30, 0x82, 0x00, 0xff}, {0x30, 0x01, 0x00}},
			},
			{
				Version:   2,
				Kid:       "kid-2-" + tenant + "-" + name,
				State:     kms.StateActive,
				Handle:    kms.Handle("\x00handle\xff"),
				PublicKey: []byte{0x30, 0x59, 0x01},
				Created:   T0.Add(36 * time.Hour),
			},
		},
	}
}

// EqualKeys fails unless got and want are the same keys in the same order.
// Times are compared with Equal; Schema must be the store's, and Rev is
// not compared (each backend counts its own).
func EqualKeys(t testing.TB, got, want []store.Key) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d keys %v, want %d", len(got), Names(got), len(want))
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Schema != 1 {
			t.Errorf("key %d: Schema %d, want 1", i, g.Schema)
		}
		if g.Rev <= 0 {
			t.Errorf("key %d: Rev %d, want > 0", i, g.Rev)
		}
		if !g.Created.Equal(w.Created) {
			t.Errorf("key %d: Created %v, want %v", i, g.Created, w.Created)
		}
		if len(g.Versions) != len(w.Versions) {
			t.Errorf("key %d: %d versions, want %d", i, len(g.Versions), len(w.Versions))
			continue
		}
		for j := range w.Versions {
			gv, wv := g.Versions[j], w.Versions[j]
			if !gv.Created.Equal(wv.Created) {
				t.Errorf("key %d version %d: Created %v, want %v", i, j, gv.Created, wv.Created)
			}
			gv.Created, wv.Created = time.Time{}, time.Time{}
			if !reflect.DeepEqual(gv, wv) {
				t.Errorf("key %d version %d:\n got %+v\nwant %+v", i, j, gv, wv)
			}
		}
		g.Schema, w.Schema, g.Rev, w.Rev = 0, 0, 0, 0
		g.Created, w.Created = time.Time{}, time.Time{}
		g.Versions, w.Versions = nil, nil
		if !reflect.DeepEqual(g, w) {
			t.Errorf("key %d:\n got %+v\nwant %+v", i, g, w)
		}
	}
}

// Names lists keys as tenant/name.
func Names(keys []store.Key) []string {
	var out []string
	for _, k := range keys {
		out = append(out, k.Tenant+"/"+k.Name)
	}
	return out
}

// Keys returns s.Keys or fails the test.
func Keys(t testing.TB, s store.Store) []store.Key {
	t.Helper()
	ks, err := s.Keys(ctx)
	if err != nil {
		t.Fatalf("Keys: %v", err)
	}
	return ks
}

func create(t *testing.T, s store.Store, k store.Key) int64 {
	t.Helper()
	rev, err := s.CreateKey(ctx, k)
	if err != nil {
		t.Fatalf("CreateKey(%s/%s): %v", k.Tenant, k.Name, err)
	}
	if rev <= 0 {
		t.Fatalf("CreateKey(%s/%s): revision %d, want > 0", k.Tenant, k.Name, rev)
	}
	return rev
}

func testEmpty(t *testing.T, s store.Store) {
	if ks := Keys(t, s); len(ks) != 0 {
		t.Errorf("new store has keys %v", Names(ks))
	}
	if _, err := s.Key(ctx, "t1", "k"); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Key in an empty store: %v, want ErrNotFound", err)
	}
	if in, err := s.Intents(ctx); err != nil || len(in) != 0 {
		t.Errorf("Intents in an empty store: %v, %v", in, err)
	}
}

func testCreateRoundTrip(t *testing.T, s store.Store) {
	want := TestKey("t1", "signing")
	rev := create(t, s, want)
	EqualKeys(t, Keys(t, s), []store.Key{want})
	got, err := s.Key(ctx, "t1", "signing")
	if err != nil {
		t.Fatalf("Key: %v", err)
	}
	if got.Rev != rev {
		t.Errorf("Key: Rev %d, want %d (CreateKey's)", got.Rev, rev)
	}
	EqualKeys(t, []store.Key{got}, []store.Key{want})
	if _, err := s.Key(ctx, "t2", "signing"); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Key in another tenant: %v, want ErrNotFound", err)
	}
}

// testCreateSetsSchema: the store sets the schema, whatever the caller
// passed.
func testCreateSetsSchema(t *testing.T, s store.Store) {
	k := TestKey("t1", "k")
	k.Schema = 99
	create(t, s, k)
	if got := Keys(t, s)[0].Schema; got != 1 {
		t.Errorf("Schema %d, want 1", got)
	}
}

func testCreateDuplicate(t *testing.T, s store.Store) {
	first := TestKey("t1", "k")
	create(t, s, first)
	second := TestKey("t1", "k")
	second.Alg, second.Bits = kms.ES256, 0
	if _, err := s.CreateKey(ctx, second); !errors.Is(err, kms.ErrAlreadyExists) {
		t.Fatalf("second CreateKey: got %v, want ErrAlreadyExists", err)
	}
	EqualKeys(t, Keys(t, s), []store.Key{first})
	other := TestKey("t2", "k")
	create(t, s, other)
	EqualKeys(t, Keys(t, s), []store.Key{first, other})
}

func testUpdate(t *testing.T, s store.Store) {
	k := TestKey("t1", "k")
	k.Rev = 1
	if _, err := s.UpdateKey(ctx, k); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("UpdateKey of a missing key: got %v, want ErrNotFound", err)
	}
	if ks := Keys(t, s); len(ks) != 0 {
		t.Fatalf("failed UpdateKey created %v", Names(ks))
	}
	rev := create(t, s, k)
	other := TestKey("t2", "k")
	create(t, s, other)

	updated := TestKey("t1", "k")
	updated.Rev = rev
	updated.Versions[1].State = kms.StateRetired
	updated.Versions = append(updated.Versions, store.Version{
		Version: 3, Kid: "kid-3", State: kms.StatePending,
		Handle: kms.Handle{3}, PublicKey: []byte{3, 3}, Created: T0.Add(72 * time.Hour),
	})
	next, err := s.UpdateKey(ctx, updated)
	if err != nil {
		t.Fatalf("UpdateKey: %v", err)
	}
	if next <= rev {
		t.Errorf("UpdateKey: revision %d, want > %d", next, rev)
	}
	// Replaced, not merged; the other tenant's key is untouched.
	EqualKeys(t, Keys(t, s), []store.Key{updated, other})
	if got, _ := s.Key(ctx, "t1", "k"); got.Rev != next {
		t.Errorf("Key after UpdateKey: Rev %d, want %d", got.Rev, next)
	}
	for _, k := range []store.Key{TestKey("t1", "nope"), TestKey("t3", "k")} {
		k.Rev = next
		if _, err := s.UpdateKey(ctx, k); !errors.Is(err, kms.ErrNotFound) {
			t.Errorf("UpdateKey(%s/%s): got %v, want ErrNotFound", k.Tenant, k.Name, err)
		}
	}
	EqualKeys(t, Keys(t, s), []store.Key{updated, other})
}

// testUpdateStale: an update from a revision that is no longer current is
// refused and changes nothing.
func testUpdateStale(t *testing.T, s store.Store) {
	k := TestKey("t1", "k")
	k.Rev = create(t, s, k)
	a := k
	a.Policy.RotationPeriod = time.Hour
	if _, err := s.UpdateKey(ctx, a); err != nil {
		t.Fatal(err)
	}
	b := k // read at the old revision
	b.Policy.RotationPeriod = 2 * time.Hour
	if _, err := s.UpdateKey(ctx, b); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("UpdateKey from a stale revision: %v, want ErrConflict", err)
	}
	EqualKeys(t, Keys(t, s), []store.Key{a})
}

// testConcurrentUpdates: writers that read the same revision race; exactly
// one commits, and every other one gets ErrConflict.
func testConcurrentUpdates(t *testing.T, s store.Store) {
	k := TestKey("t1", "k")
	k.Rev = create(t, s, k)
	const n = 16
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			u := k
			u.Policy.RotationPeriod = time.Duration(i+1) * time.Hour
			_, errs[i] = s.UpdateKey(ctx, u)
		}()
	}
	wg.Wait()
	won := -1
	for i, err := range errs {
		switch {
		case err == nil && won >= 0:
			t.Errorf("writers %d and %d both committed from revision %d", won, i, k.Rev)
		case err == nil:
			won = i
		case !errors.Is(err, store.ErrConflict):
			t.Errorf("writer %d: %v, want ErrConflict", i, err)
		}
	}
	if won < 0 {
		t.Fatal("no writer committed")
	}
	if got := Keys(t, s)[0].Policy.RotationPeriod; got != time.Duration(won+1)*time.Hour {
		t.Errorf("stored rotation period %v, want the winner's %v", got, time.Duration(won+1)*time.Hour)
	}
}

// testKidReuse: a kid belongs to one key version forever; a write that
// gives it to another is refused whole.
func testKidReuse(t *testing.T, s store.Store) {
	a := TestKey("t1", "a")
	a.Rev = create(t, s, a)
	b := TestKey("t1", "b")
	b.Versions[1].Kid = a.Versions[1].Kid
	if _, err := s.CreateKey(ctx, b); !errors.Is(err, store.ErrKidReused) {
		t.Fatalf("CreateKey with another key's kid: %v, want ErrKidReused", err)
	}
	if _, err := s.Key(ctx, "t1", "b"); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("refused CreateKey left a record: %v", err)
	}
	// Its other kid was not registered either: a key may take it.
	c := TestKey("t1", "c")
	c.Versions[0].Kid = b.Versions[0].Kid
	create(t, s, c)

	// The same key keeps its kids across updates; another version of it
	// may not take one.
	u := a
	u.Versions = append(u.Versions, store.Version{Version: 3, Kid: a.Versions[0].Kid, State: kms.StatePending,
		Handle: kms.Handle{3}, PublicKey: []byte{3}, Created: T0})
	if _, err := s.UpdateKey(ctx, u); !errors.Is(err, store.ErrKidReused) {
		t.Fatalf("UpdateKey giving version 1's kid to version 3: %v, want ErrKidReused", err)
	}
	u.Versions[2].Kid = "kid-3-new"
	if _, err := s.UpdateKey(ctx, u); err != nil {
		t.Fatalf("UpdateKey with a new kid: %v", err)
	}
}

func testOrder(t *testing.T, s store.Store) {
	// Tenants and names chosen so that sorting the joined "tenant/name"
	// strings, or names alone, would give another order.
	for _, id := range [][2]string{{"b", "a"}, {"a-x", "a"}, {"a", "z"}, {"a", "b.2"}, {"ab", "0"}, {"a", "b"}, {"a", "b-1"}} {
		create(t, s, TestKey(id[0], id[1]))
	}
	want := []string{"a/b", "a/b-1", "a/b.2", "a/z", "a-x/a", "ab/0", "b/a"}
	got := Keys(t, s)
	if !reflect.DeepEqual(Names(got), want) {
		t.Fatalf("Keys order: got %v, want %v", Names(got), want)
	}
	for _, k := range got {
		if k.Versions[0].Kid != "kid-1-"+k.Tenant+"-"+k.Name {
			t.Errorf("%s/%s carries kid %q", k.Tenant, k.Name, k.Versions[0].Kid)
		}
	}
}

func testIntents(t *testing.T, s store.Store) {
	ins := []store.Intent{
		{Tenant: "t1", Handle: kms.Handle{1, 0, 0xff}, Label: "kb-1", Created: T0},
		{Tenant: "t1", Handle: kms.Handle{2}, Label: "kb-2", Created: T0},
		{Tenant: "t2", Handle: kms.Handle{1, 0, 0xff}, Label: "kb-3", Created: T0},
	}
	for _, in := range ins {
		if err := s.PutIntent(ctx, in); err != nil {
			t.Fatalf("PutIntent: %v", err)
		}
	}
	got, err := s.Intents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(ins) {
		t.Fatalf("Intents: %d, want %d: %+v", len(got), len(ins), got)
	}
	for _, in := range ins {
		found := false
		for _, g := range got {
			if g.Tenant == in.Tenant && string(g.Handle) == string(in.Handle) && g.Label == in.Label && g.Created.Equal(in.Created) {
				found = true
			}
		}
		if !found {
			t.Errorf("intent %+v missing from %+v", in, got)
		}
	}
	if err := s.DeleteIntent(ctx, "t1", kms.Handle{1, 0, 0xff}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteIntent(ctx, "t1", kms.Handle{9}); err != nil {
		t.Errorf("DeleteIntent of a missing intent: %v", err)
	}
	got, _ = s.Intents(ctx)
	if len(got) != 2 {
		t.Fatalf("after DeleteIntent: %+v, want the other 2", got)
	}
	for _, g := range got {
		if g.Tenant == "t1" && string(g.Handle) == "\x01\x00\xff" {
			t.Errorf("deleted intent still listed: %+v", g)
		}
	}
}
