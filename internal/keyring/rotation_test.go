package keyring

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
	"github.com/keybroker/keybroker/softhsm"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// clock is a settable time for the keyring's Now.
type clock struct{ ns atomic.Int64 }

func newClock(t time.Time) *clock    { c := &clock{}; c.set(t); return c }
func (c *clock) set(t time.Time)     { c.ns.Store(t.UnixNano()) }
func (c *clock) now() time.Time      { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) add(d time.Duration) { c.ns.Add(int64(d)) }

// fixture is a keyring on a real SoftHSM2 token with a settable clock.
type fixture struct {
	tok   *softhsm.Token
	db    string
	clock *clock
	hsm   *hsm.Backend
	store store.Store
	ring  *Keyring
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{tok: softhsmtest.NewToken(t), db: filepath.Join(t.TempDir(), "kb.db"), clock: newClock(t0)}
	f.open(t)
	t.Cleanup(f.close)
	return f
}

// open starts the keyring as the daemon does: load, reconcile, advance.
func (f *fixture) open(t *testing.T) {
	t.Helper()
	f.hsm = openHSM(t, f.tok)
	f.store = openStore(t, f.db)
	ring, err := New(Options{Backend: f.hsm, Store: f.store, Now: f.clock.now})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ring.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := ring.Advance(context.Background(), f.clock.now()); err != nil {
		t.Fatal(err)
	}
	f.ring = ring
}

func (f *fixture) close() {
	if f.store != nil {
		f.store.Close()
		f.hsm.Close()
		f.store, f.hsm = nil, nil
	}
}

// hardwareObjects counts the key pairs on the token.
func (f *fixture) hardwareObjects(t *testing.T) int {
	t.Helper()
	objs, err := f.hsm.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return len(objs)
}

func jwks(t *testing.T, r *Keyring, tenant string) map[string]pop.JWK {
	t.Helper()
	b, err := r.JWKS(context.Background(), tenant)
	if err != nil {
		t.Fatal(err)
	}
	var set pop.JWKS
	if err := json.Unmarshal(b, &set); err != nil {
		t.Fatal(err)
	}
	m := map[string]pop.JWK{}
	for _, k := range set.Keys {
		m[k.Kid] = k
	}
	return m
}

func countState(k KeyInfo, s kms.State) int {
	n := 0
	for _, v := range k.Versions {
		if v.State == s {
			n++
		}
	}
	return n
}

type signed struct {
	at     time.Time
	kid    string
	digest []byte
	sig    []byte
}

// TestTwoYearSimulation runs the default policy for two years at one-hour
// ticks on a real token and checks the invariants of docs/design.md at every tick.
func TestTwoYearSimulation(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.ring.CreateKey(ctx, "t", "sim", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	const overlap, lead = 90 * kms.Day, 7 * kms.Day
	type life struct{ published, activeFrom, activeUntil, lastPublished time.Time }
	lives := map[string]*life{}
	lastSign := map[string]time.Time{}
	var sigs []signed // oldest first; checked and dropped at t + overlap
	end := t0.Add(2 * 365 * kms.Day)
	ticks := 0
	for now := t0; !now.After(end); now = now.Add(time.Hour) {
		ticks++
		f.clock.set(now)
		if err := f.ring.Advance(ctx, now); err != nil {
			t.Fatalf("%v: Advance: %v", now, err)
		}
		k, err := f.ring.GetKey(ctx, "t", "sim")
		if err != nil {
			t.Fatal(err)
		}
		if n := countState(k, kms.StateActive); n != 1 {
			t.Fatalf("%v: %d ACTIVE versions", now, n)
		}
		set := jwks(t, f.ring, "t")
		if len(set) > 3 {
			t.Fatalf("%v: JWKS holds %d versions", now, len(set))
		}
		for kid := range set {
			l := lives[kid]
			if l == nil {
				l = &life{published: now}
				lives[kid] = l
			}
			l.lastPublished = now
		}
		l := lives[k.ActiveKid]
		if l.activeFrom.IsZero() {
			l.activeFrom = now
		}
		l.activeUntil = now

		// Sign with the active version; the signature must verify against
		// every JWKS served for the next 90 days.
		digest := make([]byte, 32)
		rand.Read(digest)
		sig, err := f.ring.Sign(ctx, "t", SignRequest{Name: "sim", Digest: digest})
		if err != nil {
			t.Fatalf("%v: Sign: %v", now, err)
		}
		if sig.Kid != k.ActiveKid {
			t.Fatalf("%v: Sign used %s, active is %s", now, sig.Kid, k.ActiveKid)
		}
		sigs = append(sigs, signed{now, sig.Kid, digest, sig.Signature})
		lastSign[sig.Kid] = now
		for kid, at := range lastSign {
			if now.Sub(at) <= overlap {
				if _, ok := set[kid]; !ok {
					t.Fatalf("%v: kid %s signed at %v is not in the JWKS", now, kid, at)
				}
			}
		}
		// Verify, against today's JWKS, the signatures whose 90 days end now.
		for len(sigs) > 0 && now.Sub(sigs[0].at) >= overlap {
			s := sigs[0]
			sigs = sigs[1:]
			jwk, ok := set[s.kid]
			if !ok {
				t.Fatalf("%v: kid %s of a signature made at %v has left the JWKS", now, s.kid, s.at)
			}
			pub, err := jwk.PublicKey()
			if err != nil {
				t.Fatal(err)
			}
			if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), s.digest, s.sig) {
				t.Fatalf("%v: signature made at %v does not verify against the JWKS", now, s.at)
			}
		}
		// The HSM holds exactly the versions that are not DESTROYED.
		if ticks%24 == 0 {
			if got, want := f.hardwareObjects(t), len(k.Versions)-countState(k, kms.StateDestroyed); got != want {
				t.Fatalf("%v: %d hardware objects, want %d (versions not destroyed)", now, got, want)
			}
		}
	}
	k, _ := f.ring.GetKey(ctx, "t", "sim")
	// 2 years / 90 days: v1..v9 active at some point, v10 pending.
	if len(k.Versions) < 9 {
		t.Fatalf("only %d versions after two years", len(k.Versions))
	}
	for kid, l := range lives {
		if l.activeFrom.IsZero() {
			continue // still PENDING at the end
		}
		if l != lives[kids(k)[0]] && l.activeFrom.Sub(l.published) < lead {
			t.Errorf("kid %s published %v, active %v: less than 7 days ahead", kid, l.published, l.activeFrom)
		}
		if l.lastPublished.Before(end) && l.lastPublished.Sub(l.activeUntil) < overlap {
			t.Errorf("kid %s active until %v, published until %v: less than 90 days after", kid, l.activeUntil, l.lastPublished)
		}
	}
	st := f.ring.Stats()
	if st.Rotations != int64(countState(k, kms.StateActive)+countState(k, kms.StateRetired)+countState(k, kms.StateExpired)+countState(k, kms.StateDestroyed)-1) {
		t.Errorf("rotation counter %d does not match the %d versions that became active after v1", st.Rotations, len(k.Versions))
	}
	if st.RotationFailures != 0 {
		t.Errorf("%d rotation failures", st.RotationFailures)
	}
	if next := st.NextRotation["t/sim"]; !next.After(end) {
		t.Errorf("next rotation %v is not after the end %v", next, end)
	}
}

// kids returns the kids of k's versions in version order.
func kids(k KeyInfo) []string {
	var out []string
	for _, v := range k.Versions {
		out = append(out, v.Kid)
	}
	return out
}

func TestConcurrentRotateKeyIfActive(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	const n = 100
	var wg sync.WaitGroup
	var rotated atomic.Int64
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, r, err := f.ring.RotateKey(ctx, "t", "k", 1)
			if err != nil {
				t.Error(err)
			}
			if r {
				rotated.Add(1)
			}
		}()
	}
	wg.Wait()
	k, _ := f.ring.GetKey(ctx, "t", "k")
	if rotated.Load() != 1 || len(k.Versions) != 2 || k.ActiveVersion != 2 {
		t.Errorf("%d calls rotated, %d versions, active v%d; want 1, 2, v2", rotated.Load(), len(k.Versions), k.ActiveVersion)
	}
	if got := f.hardwareObjects(t); got != 2 {
		t.Errorf("%d hardware objects, want 2", got)
	}
}

// TestConcurrentRotateKeyCoalesces: calls without a guard that overlap a
// running rotation join it.
func TestConcurrentRotateKeyCoalesces(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.RS256, Bits: 4096}, kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	// Hold the key's writer lock so every call queues behind one flight.
	unlock := f.ring.lockKey(keyID{"t", "k"})
	const n = 50
	var wg sync.WaitGroup
	var rotated atomic.Int64
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, r, err := f.ring.RotateKey(ctx, "t", "k", 0)
			if err != nil {
				t.Error(err)
			}
			if r {
				rotated.Add(1)
			}
		}()
	}
	// Wait until one call is in flight and the rest have joined it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		f.ring.mu.RLock()
		inFlight := f.ring.rotating[flightKey{keyID{"t", "k"}, 0}] != nil
		f.ring.mu.RUnlock()
		if inFlight || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // let the other calls reach the flight
	unlock()
	wg.Wait()
	k, _ := f.ring.GetKey(ctx, "t", "k")
	if rotated.Load() != 1 || len(k.Versions) != 2 {
		t.Errorf("%d calls rotated, %d versions; want 1 and 2", rotated.Load(), len(k.Versions))
	}
}

// waitFlight waits until a RotateKey of key k with guard ifActive is in
// flight.
func waitFlight(t *testing.T, r *Keyring, k string, ifActive uint32) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r.mu.RLock()
		f := r.rotating[flightKey{keyID{"t", k}, ifActive}]
		r.mu.RUnlock()
		if f != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no RotateKey of %s with guard %d in flight after 10 s", k, ifActive)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestRotateKeyJoinsOnlyItsOwnGuard: a call does not join a rotation asked
// with another guard, which may decide not to rotate (found by review: a
// correctly guarded call, or an unguarded one, was dropped when it met a
// stale-guarded call in flight). Nor does it take the first caller's
// cancel for its own.
func TestRotateKeyJoinsOnlyItsOwnGuard(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for _, name := range []string{"a", "b", "c"} {
		if _, err := f.ring.CreateKey(ctx, "t", name, kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
			t.Fatal(err)
		}
	}
	type result struct {
		rotated bool
		err     error
	}
	rotate := func(ctx context.Context, name string, ifActive uint32) chan result {
		ch := make(chan result, 1)
		go func() {
			_, rotated, err := f.ring.RotateKey(ctx, "t", name, ifActive)
			ch <- result{rotated, err}
		}()
		return ch
	}
	for _, c := range []struct {
		name  string
		guard uint32 // of the second call; the first one's is stale (7)
	}{{"a", 1}, {"b", 0}} {
		unlock := f.ring.lockKey(keyID{"t", c.name}) // the scheduler, say, holds the key
		stale := rotate(ctx, c.name, 7)
		waitFlight(t, f.ring, c.name, 7)
		second := rotate(ctx, c.name, c.guard)
		waitFlight(t, f.ring, c.name, c.guard)
		unlock()
		if r := <-stale; r.err != nil || r.rotated {
			t.Errorf("%s: the stale guard: rotated=%v err=%v, want no rotation", c.name, r.rotated, r.err)
		}
		if r := <-second; r.err != nil || !r.rotated {
			t.Errorf("%s: guard %d: rotated=%v err=%v, want a rotation", c.name, c.guard, r.rotated, r.err)
		}
		if k, _ := f.ring.GetKey(ctx, "t", c.name); k.ActiveVersion != 2 {
			t.Errorf("%s: active v%d, want v2", c.name, k.ActiveVersion)
		}
	}

	// The first caller gives up; the one that joined it still rotates.
	unlock := f.ring.lockKey(keyID{"t", "c"})
	gone, cancel := context.WithCancel(ctx)
	first := rotate(gone, "c", 1)
	waitFlight(t, f.ring, "c", 1)
	joined := rotate(ctx, "c", 1)
	time.Sleep(20 * time.Millisecond) // let it find the flight
	cancel()
	unlock()
	if r := <-first; !errors.Is(r.err, context.Canceled) {
		t.Errorf("the canceled call: rotated=%v err=%v, want context.Canceled", r.rotated, r.err)
	}
	if r := <-joined; r.err != nil || !r.rotated {
		t.Errorf("the call that joined it: rotated=%v err=%v, want its own rotation", r.rotated, r.err)
	}
	if k, _ := f.ring.GetKey(ctx, "t", "c"); k.ActiveVersion != 2 {
		t.Errorf("c: active v%d, want v2", k.ActiveVersion)
	}
}

func TestRotatePromotesPending(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	k, _ := f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
	f.clock.add(84 * kms.Day)
	if err := f.ring.Advance(ctx, f.clock.now()); err != nil {
		t.Fatal(err)
	}
	k, _ = f.ring.GetKey(ctx, "t", "k")
	if len(k.Versions) != 2 || k.Versions[1].State != kms.StatePending {
		t.Fatalf("after 84 days: %+v, want v2 PENDING", k.Versions)
	}
	pendingKid := k.Versions[1].Kid
	k, rotated, err := f.ring.RotateKey(ctx, "t", "k", 0)
	if err != nil || !rotated {
		t.Fatal(rotated, err)
	}
	if len(k.Versions) != 2 || k.ActiveKid != pendingKid || k.Versions[0].State != kms.StateRetired {
		t.Errorf("RotateKey did not promote the PENDING version: %+v", k.Versions)
	}
}

func TestRevokeAndSignStates(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	k, _ := f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
	v1 := k.ActiveKid
	k, err := f.ring.RevokeKeyVersion(ctx, "t", "k", VersionRef{Kid: v1})
	if err != nil {
		t.Fatal(err)
	}
	if k.ActiveVersion != 2 || k.Versions[0].State != kms.StateRevoked || countState(k, kms.StateActive) != 1 {
		t.Fatalf("after revoking the active version: %+v", k)
	}
	if _, ok := jwks(t, f.ring, "t")[v1]; ok {
		t.Error("revoked kid still in the JWKS")
	}
	d := make([]byte, 32)
	_, err = f.ring.Sign(ctx, "t", SignRequest{Name: "k", Ref: VersionRef{Kid: v1}, Digest: d})
	var ce *kms.ClientError
	if !errors.As(err, &ce) || !errors.Is(err, kms.ErrFailedPrecondition) || ce.Reason != ReasonNotUsable || ce.Meta["state"] != "REVOKED" {
		t.Fatalf("Sign with a revoked version: %v", err)
	}
	sig, err := f.ring.Sign(ctx, "t", SignRequest{Name: "k", Digest: d})
	if err != nil || sig.Version != 2 {
		t.Fatalf("Sign after revoke: %v, v%d", err, sig.Version)
	}
	// Revoking again changes nothing; revoking needs a version.
	if k2, err := f.ring.RevokeKeyVersion(ctx, "t", "k", VersionRef{Version: 1}); err != nil || len(k2.Versions) != 2 {
		t.Errorf("second revoke: %v, %d versions", err, len(k2.Versions))
	}
	if _, err := f.ring.RevokeKeyVersion(ctx, "t", "k", VersionRef{}); !errors.Is(err, kms.ErrInvalidArgument) {
		t.Errorf("revoke without a version: %v", err)
	}
	// A PENDING version cannot sign; after the destroy delay the revoked
	// object is gone from the hardware.
	f.clock.add(84 * kms.Day)
	f.ring.Advance(ctx, f.clock.now())
	k, _ = f.ring.GetKey(ctx, "t", "k")
	pending := k.Versions[len(k.Versions)-1]
	if pending.State != kms.StatePending {
		t.Fatalf("want a PENDING version, got %+v", k.Versions)
	}
	_, err = f.ring.Sign(ctx, "t", SignRequest{Name: "k", Ref: VersionRef{Version: pending.Version}, Digest: d})
	if !errors.As(err, &ce) || ce.Meta["state"] != "PENDING" {
		t.Errorf("Sign with a PENDING version: %v", err)
	}
	if k.Versions[0].State != kms.StateDestroyed {
		t.Errorf("revoked version after the destroy delay: %v", k.Versions[0].State)
	}
	if got := f.hardwareObjects(t); got != 2 {
		t.Errorf("%d hardware objects, want 2 (active and pending)", got)
	}
	_, err = f.ring.Sign(ctx, "t", SignRequest{Name: "k", Ref: VersionRef{Version: 1}, Digest: d})
	if !errors.As(err, &ce) || ce.Meta["state"] != "DESTROYED" {
		t.Errorf("Sign with a destroyed version: %v", err)
	}
}

// TestRetiredSignsWhenNamed: during the overlap the previous version signs
// when asked by kid, and the default is the new one.
func TestRetiredSignsWhenNamed(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	k, _ := f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.PS256}, kms.Policy{})
	v1 := k.ActiveKid
	if _, _, err := f.ring.RotateKey(ctx, "t", "k", 0); err != nil {
		t.Fatal(err)
	}
	d := make([]byte, 32)
	s1, err := f.ring.Sign(ctx, "t", SignRequest{Name: "k", Ref: VersionRef{Kid: v1}, Digest: d})
	if err != nil || s1.Kid != v1 || s1.Version != 1 {
		t.Fatalf("Sign by retired kid: %v %+v", err, s1)
	}
	s2, err := f.ring.Sign(ctx, "t", SignRequest{Name: "k", Digest: d})
	if err != nil || s2.Version != 2 {
		t.Fatalf("default Sign after rotate: %v v%d", err, s2.Version)
	}
	pk, _ := f.ring.PublicKey(ctx, "t", "k", VersionRef{Version: 1})
	if err := verifyPSS(pk.Key, d, s1.Signature); err != nil {
		t.Fatal(err)
	}
}

// TestDowntimeAcrossDeadlines: the daemon stopped across an activation and
// a destroy deadline applies both, in order, when it starts again.
func TestDowntimeAcrossDeadlines(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
	for day := 1; day <= 175; day++ {
		f.clock.set(t0.Add(time.Duration(day) * kms.Day))
		if err := f.ring.Advance(ctx, f.clock.now()); err != nil {
			t.Fatal(err)
		}
	}
	k, _ := f.ring.GetKey(ctx, "t", "k")
	want := []kms.State{kms.StateRetired, kms.StateActive, kms.StatePending}
	for i, v := range k.Versions {
		if v.State != want[i] {
			t.Fatalf("day 175: v%d is %v, want %v", v.Version, v.State, want[i])
		}
	}
	f.close() // the daemon stops at day 175 ...
	f.clock.set(t0.Add(215 * kms.Day))
	f.open(t) // ... and starts at day 215: v3 activation (180), v1 expiry (180), v1 destroy (210)
	k, _ = f.ring.GetKey(ctx, "t", "k")
	want = []kms.State{kms.StateDestroyed, kms.StateRetired, kms.StateActive}
	for i, v := range k.Versions {
		if v.State != want[i] {
			t.Errorf("day 215: v%d is %v, want %v", v.Version, v.State, want[i])
		}
	}
	v1, v2 := k.Versions[0], k.Versions[1]
	if !v1.Expired.Equal(t0.Add(180*kms.Day)) || !v1.Destroyed.Equal(t0.Add(215*kms.Day)) {
		t.Errorf("v1 expired %v destroyed %v; want the expiry at its due time and the destroy at start", v1.Expired, v1.Destroyed)
	}
	// v2 signed until the daemon stopped being able to activate v3: it
	// stays published for the whole overlap from then.
	if !v2.Retired.Equal(t0.Add(215 * kms.Day)) {
		t.Errorf("v2 retired %v, want at start (day 215)", v2.Retired)
	}
	if got := f.hardwareObjects(t); got != 2 {
		t.Errorf("%d hardware objects, want 2", got)
	}
	if countState(k, kms.StateActive) != 1 {
		t.Error("not exactly one ACTIVE version")
	}
}

// TestReconcileRemovesOrphans: a hardware key whose creation was
// interrupted between generation and commit (a crash) is removed at the
// next start, at whichever step it stopped.
func TestReconcileRemovesOrphans(t *testing.T) {
	for _, step := range []string{"before-generate", "after-generate", "before-commit"} {
		t.Run(step, func(t *testing.T) {
			f := newFixture(t)
			ctx := context.Background()
			if _, err := f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
				t.Fatal(err)
			}
			// A keyring that "crashes" at step while creating a second key.
			crashing, err := New(Options{Backend: f.hsm, Store: f.store, Now: f.clock.now, Failpoint: func(s string) {
				if s == step {
					panic("crash at " + s)
				}
			}})
			if err != nil {
				t.Fatal(err)
			}
			func() {
				defer func() { recover() }()
				crashing.CreateKey(ctx, "t", "orphan", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
				t.Fatal("the failpoint did not fire")
			}()
			want := 2
			if step == "before-generate" {
				want = 1
			}
			if got := f.hardwareObjects(t); got != want {
				t.Fatalf("%d hardware objects after the crash, want %d", got, want)
			}
			// The next start.
			f.close()
			f.open(t)
			if got := f.hardwareObjects(t); got != 1 {
				t.Errorf("%d hardware objects after reconcile, want 1", got)
			}
			if in, err := f.store.Intents(context.Background()); err != nil || len(in) != 0 {
				t.Errorf("intents after reconcile: %v, %v; want none", in, err)
			}
			if _, err := f.ring.Sign(ctx, "t", SignRequest{Name: "k", Digest: make([]byte, 32)}); err != nil {
				t.Errorf("Sign after reconcile: %v", err)
			}
		})
	}
}

// TestReconcileLeavesOtherKeys: keys this store never meant to create are
// never destroyed — another daemon's on a shared token, or this daemon's
// own after its state directory was lost (found by review: a start with an
// empty state directory destroyed every key on the token).
func TestReconcileLeavesOtherKeys(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	k, err := f.ring.CreateKey(ctx, "t", "prod", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
	if err != nil {
		t.Fatal(err)
	}
	// Objects made outside this keyring, with keybroker labels.
	for _, tenant := range []string{"t", "other"} {
		if _, _, err := f.hsm.Generate(ctx, kms.Partition{Tenant: tenant}, kms.KeySpec{Alg: kms.ES256, Label: "elsewhere/v1"}); err != nil {
			t.Fatal(err)
		}
	}
	// A second daemon on the same token with a fresh state directory.
	fresh := openStore(t, filepath.Join(t.TempDir(), "fresh.db"))
	defer fresh.Close()
	other, err := New(Options{Backend: f.hsm, Store: fresh})
	if err != nil {
		t.Fatal(err)
	}
	if n, err := other.Reconcile(ctx); err != nil || n != 0 {
		t.Fatalf("Reconcile with a fresh store removed %d (%v), want 0", n, err)
	}
	// And this daemon's own reconcile leaves the foreign objects too.
	if n, err := f.ring.Reconcile(ctx); err != nil || n != 0 {
		t.Fatalf("Reconcile removed %d (%v), want 0", n, err)
	}
	if got := f.hardwareObjects(t); got != 3 {
		t.Errorf("%d hardware objects, want 3", got)
	}
	sig, err := f.ring.Sign(ctx, "t", SignRequest{Name: "prod", Digest: make([]byte, 32)})
	if err != nil || sig.Kid != k.ActiveKid {
		t.Errorf("Sign with the first daemon's key after the second one started: %v", err)
	}
}

func TestPolicyValidation(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	bad := kms.DefaultPolicy()
	bad.Lead = bad.RotationPeriod
	if _, err := f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.ES256}, bad); !errors.Is(err, kms.ErrInvalidArgument) {
		t.Fatalf("CreateKey with lead = period: %v", err)
	}
	if got := f.hardwareObjects(t); got != 0 {
		t.Errorf("a refused CreateKey left %d hardware objects", got)
	}
	f.ring.CreateKey(ctx, "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
	k, err := f.ring.UpdatePolicy(ctx, "t", "k", func(p kms.Policy) kms.Policy { p.RotationPeriod = 30 * kms.Day; return p })
	if err != nil || k.Policy.RotationPeriod != 30*kms.Day || k.Policy.Overlap != 90*kms.Day {
		t.Fatalf("UpdatePolicy: %v %+v", err, k.Policy)
	}
	if !k.NextRotation.Equal(t0.Add(30 * kms.Day)) {
		t.Errorf("next rotation %v, want day 30", k.NextRotation)
	}
	_, err = f.ring.UpdatePolicy(ctx, "t", "k", func(p kms.Policy) kms.Policy { p.Overlap = -1; return p })
	if !errors.Is(err, kms.ErrInvalidArgument) {
		t.Errorf("UpdatePolicy with a negative overlap: %v", err)
	}
	if k, _ := f.ring.GetKey(ctx, "t", "k"); k.Policy.Overlap != 90*kms.Day {
		t.Errorf("a refused update changed the policy: %+v", k.Policy)
	}
}

func verifyPSS(pub crypto.PublicKey, digest, sig []byte) error {
	return verifyWith(pub, digest, sig)
}

func verifyWith(pub crypto.PublicKey, digest, sig []byte) error {
	return rsa.VerifyPSS(pub.(*rsa.PublicKey), crypto.SHA256, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
}
