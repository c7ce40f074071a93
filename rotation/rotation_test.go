package rotation

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keybroker/keybroker/kms"
)

// t0 is day 0 of every test: version 1 becomes ACTIVE then.
var t0 = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// day is t0 plus n days.
func day(n int) time.Time { return t0.Add(time.Duration(n) * kms.Day) }

// testPolicy has a different length for every field, so that a test fails
// when one is used in place of another (DefaultPolicy's period and overlap
// are both 90 days).
var testPolicy = kms.Policy{
	RotationPeriod: 30 * kms.Day,
	Overlap:        45 * kms.Day,
	Lead:           5 * kms.Day,
	DestroyDelay:   11 * kms.Day,
}

// hw is a fake hardware identity for a new version, as the keyring passes
// to Apply, Rotate and Revoke: only Handle, Kid and PublicKey are set.
func hw(id string) *Version {
	return &Version{Kid: "kid-" + id, Handle: kms.Handle("handle-" + id), PublicKey: []byte("pub-" + id)}
}

// ver is version n in state s with a fake identity; times are the caller's.
func ver(n uint32, s kms.State) Version {
	v := *hw(fmt.Sprint(n))
	v.Version, v.State = n, s
	return v
}

// key is a key under policy p with versions vs.
func key(p kms.Policy, vs ...Version) Key {
	return Key{Schema: 1, Tenant: "acme", Name: "signing", Alg: kms.ES256, Backend: "fake", Created: t0, Policy: p, Versions: vs}
}

// active1 is version 1, ACTIVE since t0.
func active1() Version {
	v := ver(1, kms.StateActive)
	v.Created, v.Activated = t0, t0
	return v
}

// unchanged fails if k differs from its snapshot before (the functions
// under test must not modify the record they are given).
func unchanged(t testing.TB, what string, before, k Key) {
	t.Helper()
	if !reflect.DeepEqual(before, k) {
		t.Errorf("%s modified its input record:\n got %+v\nwant %+v", what, k.Versions, before.Versions)
	}
}

// states is k's version states, "1:active 2:pending".
func states(k Key) string {
	var b strings.Builder
	for i, v := range k.Versions {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%d:%v", v.Version, v.State)
	}
	return b.String()
}

// ---- the two-year simulation ----

// event is a transition applied by the simulation, At after t0.
type event struct {
	At      time.Duration
	Action  Action
	Version uint32
}

func (e event) String() string {
	if e.At%kms.Day == 0 {
		return fmt.Sprintf("day %d: %v v%d", e.At/kms.Day, e.Action, e.Version)
	}
	return fmt.Sprintf("day %d+%v: %v v%d", e.At/kms.Day, e.At%kms.Day, e.Action, e.Version)
}

func ev(d int, a Action, n uint32) event { return event{time.Duration(d) * kms.Day, a, n} }

// seen is what the simulation observed of one version at its ticks: the
// first tick it was in each situation.
type seen struct {
	pending     time.Time // first seen PENDING
	active      time.Time // first seen ACTIVE
	stopActive  time.Time // first seen not ACTIVE after being ACTIVE
	unpublished time.Time // first seen unpublished after being published
	published   bool      // seen published at some tick
}

// sim drives one key through Due and Apply, the way the keyring's Advance
// does, and checks the invariants at every tick.
type sim struct {
	t      *testing.T
	k      Key
	events []event
	steps  []Step // every step applied, in order
	seen   map[uint32]*seen
	kids   map[string]uint32 // every kid ever given, to its version
	maxVer uint32            // the highest version number ever seen
	newID  int
}

func newSim(t *testing.T, k Key) *sim {
	s := &sim{t: t, k: k, seen: map[uint32]*seen{}, kids: map[string]uint32{}}
	s.observe(t0)
	return s
}

// advance applies every transition due at now, in order, as one Advance
// does; it returns the steps applied.
func (s *sim) advance(now time.Time) []Step {
	t := s.t
	t.Helper()
	var applied []Step
	for range 64 {
		st, ok := Due(s.k, now)
		if !ok {
			return applied
		}
		if st.Due.After(now) {
			t.Fatalf("%v: Due returned %+v, due after now", now, st)
		}
		if n := len(s.steps); n > 0 && st.Due.Before(s.steps[n-1].Due) {
			t.Fatalf("%v: step %+v is due before the previous step %+v", now, st, s.steps[n-1])
		}
		var nv *Version
		if st.Action == Prepare {
			s.newID++
			nv = hw(fmt.Sprintf("sim-%d", s.newID))
		}
		before := s.k.Clone()
		next, err := Apply(s.k, st, now, nv)
		if err != nil {
			t.Fatalf("%v: Apply(%+v) on %s: %v", now, st, states(s.k), err)
		}
		unchanged(t, "Apply", before, s.k)
		if err := Check(next); err != nil {
			t.Fatalf("%v: after %v: Check: %v (%s)", now, st.Action, err, states(next))
		}
		n := st.Version
		if st.Action == Prepare {
			if len(next.Versions) != len(s.k.Versions)+1 {
				t.Fatalf("%v: Prepare: %d versions, want %d", now, len(next.Versions), len(s.k.Versions)+1)
			}
			n = next.Versions[len(next.Versions)-1].Version
		} else if len(next.Versions) != len(s.k.Versions) {
			t.Fatalf("%v: %v changed the number of versions from %d to %d", now, st.Action, len(s.k.Versions), len(next.Versions))
		}
		s.checkTimes(now, st.Action, next.Versions[next.Index(n)])
		s.k = next
		s.steps = append(s.steps, st)
		applied = append(applied, st)
		s.events = append(s.events, event{now.Sub(t0), st.Action, n})
	}
	t.Fatalf("%v: more than 64 transitions due at once: %v", now, s.events)
	return nil
}

// checkTimes checks the timestamps of version v, which action has just
// moved at now: the record itself must show the lead, overlap and destroy
// delay respected.
func (s *sim) checkTimes(now time.Time, a Action, v Version) {
	t, p := s.t, s.k.Policy
	t.Helper()
	var stamp time.Time
	switch a {
	case Prepare:
		stamp = v.Created
	case Activate:
		stamp = v.Activated
		if got := v.Activated.Sub(v.Created); got < p.Lead {
			t.Errorf("%v: version %d: activated %v after it was created, want at least %v", now, v.Version, got, p.Lead)
		}
	case Expire:
		// Expired is when the overlap ended, which may be before now.
		stamp = v.Expired
		if got := v.Expired.Sub(v.Retired); got < p.Overlap {
			t.Errorf("%v: version %d: expired %v after it was retired, want at least %v", now, v.Version, got, p.Overlap)
		}
		if v.Expired.After(now) {
			t.Errorf("%v: version %d: expired in the future, at %v", now, v.Version, v.Expired)
		}
		return
	case Destroy:
		stamp = v.Destroyed
		if got := v.Destroyed.Sub(v.Expired); got < p.DestroyDelay {
			t.Errorf("%v: version %d: destroyed %v after it expired, want at least %v", now, v.Version, got, p.DestroyDelay)
		}
	}
	if !stamp.Equal(now) {
		t.Errorf("%v: %v of version %d recorded at %v, want now", now, a, v.Version, stamp)
	}
}

// observe checks the invariants of the record at now.
func (s *sim) observe(now time.Time) {
	t := s.t
	t.Helper()
	k, p := s.k, s.k.Policy
	if err := Check(k); err != nil {
		t.Fatalf("%v: Check: %v (%s)", now, err, states(k))
	}
	published := 0
	for _, v := range k.Versions {
		if v.State.Published() {
			published++
		}
		if owner, ok := s.kids[v.Kid]; ok && owner != v.Version {
			t.Fatalf("%v: version %d has kid %q of version %d", now, v.Version, v.Kid, owner)
		}
		s.kids[v.Kid] = v.Version
		o := s.seen[v.Version]
		if o == nil {
			if v.Version <= s.maxVer {
				t.Fatalf("%v: new version %d is not above every earlier version (%d)", now, v.Version, s.maxVer)
			}
			s.maxVer = v.Version
			o = &seen{}
			s.seen[v.Version] = o
		}
		if v.State == kms.StatePending && o.pending.IsZero() {
			o.pending = now
		}
		if v.State == kms.StateActive && o.active.IsZero() {
			o.active = now
			// Version 1 is created ACTIVE; every later version must
			// have been seen published as PENDING for the lead time.
			if v.Version > 1 {
				if o.pending.IsZero() {
					t.Errorf("%v: version %d became ACTIVE without being PENDING first", now, v.Version)
				} else if got := now.Sub(o.pending); got < p.Lead {
					t.Errorf("%v: version %d became ACTIVE after being PENDING for %v, want at least %v", now, v.Version, got, p.Lead)
				}
			}
		}
		if v.State != kms.StateActive && !o.active.IsZero() && o.stopActive.IsZero() {
			o.stopActive = now
		}
		if v.State.Published() {
			o.published = true
		} else if o.published && o.unpublished.IsZero() {
			o.unpublished = now
			if !o.stopActive.IsZero() {
				if got := now.Sub(o.stopActive); got < p.Overlap {
					t.Errorf("%v: version %d unpublished %v after it stopped being ACTIVE, want at least %v", now, v.Version, got, p.Overlap)
				}
			}
		}
		if v.State.Published() && !o.unpublished.IsZero() {
			t.Errorf("%v: version %d published again (%v) after being unpublished at %v", now, v.Version, v.State, o.unpublished)
		}
	}
	if published > 3 {
		t.Fatalf("%v: %d published versions, want at most 3 (%s)", now, published, states(k))
	}
}

// run advances and observes at every hour from (excluded) to until
// (included); at each day in wantStates, it checks the version states.
func (s *sim) run(from, until time.Time, wantStates map[int]string) {
	s.t.Helper()
	for now := from.Add(time.Hour); !now.After(until); now = now.Add(time.Hour) {
		s.advance(now)
		s.observe(now)
		if d := now.Sub(t0); d%kms.Day == 0 {
			if want, ok := wantStates[int(d/kms.Day)]; ok {
				if got := states(s.k); got != want {
					s.t.Errorf("day %d: states %q, want %q", d/kms.Day, got, want)
				}
			}
		}
	}
}

// wantEvents fails unless the simulation applied exactly want, in order.
func (s *sim) wantEvents(want []event) {
	s.t.Helper()
	if !slices.Equal(s.events, want) {
		s.t.Errorf("transitions:\n got %v\nwant %v", s.events, want)
	}
}

// defaultTimeline is every transition in two years under DefaultPolicy
// (docs/design.md "Key model and rotation", continued past day 210). At days
// 180, 270, ... Activate and Expire are due at the same instant; Next
// orders Activate first.
var defaultTimeline = []event{
	ev(83, Prepare, 2),
	ev(90, Activate, 2),
	ev(173, Prepare, 3),
	ev(180, Activate, 3),
	ev(180, Expire, 1),
	ev(210, Destroy, 1),
	ev(263, Prepare, 4),
	ev(270, Activate, 4),
	ev(270, Expire, 2),
	ev(300, Destroy, 2),
	ev(353, Prepare, 5),
	ev(360, Activate, 5),
	ev(360, Expire, 3),
	ev(390, Destroy, 3),
	ev(443, Prepare, 6),
	ev(450, Activate, 6),
	ev(450, Expire, 4),
	ev(480, Destroy, 4),
	ev(533, Prepare, 7),
	ev(540, Activate, 7),
	ev(540, Expire, 5),
	ev(570, Destroy, 5),
	ev(623, Prepare, 8),
	ev(630, Activate, 8),
	ev(630, Expire, 6),
	ev(660, Destroy, 6),
	ev(713, Prepare, 9),
	ev(720, Activate, 9),
	ev(720, Expire, 7),
}

// designStates is the docs/design.md timeline as version states after each day's
// transitions.
var designStates = map[int]string{
	0:   "1:active",
	82:  "1:active",
	83:  "1:active 2:pending",
	89:  "1:active 2:pending",
	90:  "1:retired 2:active",
	172: "1:retired 2:active",
	173: "1:retired 2:active 3:pending",
	180: "1:expired 2:retired 3:active",
	209: "1:expired 2:retired 3:active",
	210: "1:destroyed 2:retired 3:active",
	730: "1:destroyed 2:destroyed 3:destroyed 4:destroyed 5:destroyed 6:destroyed 7:expired 8:retired 9:active",
}

func TestSimulateTwoYears(t *testing.T) {
	s := newSim(t, key(kms.DefaultPolicy(), active1()))
	s.run(t0, day(730), designStates)
	s.wantEvents(defaultTimeline)

	// The record's timestamps tell the same story as the events.
	want := map[uint32]Version{
		1: {Created: day(0), Activated: day(0), Retired: day(90), Expired: day(180), Destroyed: day(210)},
		2: {Created: day(83), Activated: day(90), Retired: day(180), Expired: day(270), Destroyed: day(300)},
		3: {Created: day(173), Activated: day(180), Retired: day(270), Expired: day(360), Destroyed: day(390)},
		9: {Created: day(713), Activated: day(720)},
	}
	for n, w := range want {
		i := s.k.Index(n)
		if i < 0 {
			t.Errorf("no version %d", n)
			continue
		}
		v := s.k.Versions[i]
		got := [...]time.Time{v.Created, v.Activated, v.Retired, v.Expired, v.Destroyed}
		exp := [...]time.Time{w.Created, w.Activated, w.Retired, w.Expired, w.Destroyed}
		if got != exp {
			t.Errorf("version %d: created, activated, retired, expired, destroyed =\n %v\nwant %v", n, got, exp)
		}
	}
	// Kids come from the hardware identity given to Prepare.
	if got, want := s.k.Versions[s.k.Index(2)].Kid, "kid-sim-1"; got != want {
		t.Errorf("version 2 kid %q, want %q", got, want)
	}
	if len(s.kids) != 9 {
		t.Errorf("%d distinct kids, want 9", len(s.kids))
	}
}

// TestSimulateDowntime stops the daemon after day last and starts it again
// at day resume: one Advance then applies everything that fell due, in due
// order, and the simulation continues with the invariants intact.
func TestSimulateDowntime(t *testing.T) {
	for _, tc := range []struct {
		name         string
		last, resume int
		wantSteps    []Step // applied by the Advance at resume
		wantStates   string // after it
		check        func(t *testing.T, k Key)
		until        int
		wantEvents   []event // from resume on
		laterStates  map[int]string
	}{
		{
			// v2 is PENDING since day 83; it becomes ACTIVE at restart,
			// and the schedule restarts from there.
			name: "pending", last: 85, resume: 215,
			wantSteps:  []Step{{Activate, 2, day(90)}},
			wantStates: "1:retired 2:active",
			check: func(t *testing.T, k Key) {
				v1, v2 := k.Versions[k.Index(1)], k.Versions[k.Index(2)]
				if !v1.Retired.Equal(day(215)) || !v2.Activated.Equal(day(215)) {
					t.Errorf("v1 retired %v, v2 activated %v; want both at day 215", v1.Retired, v2.Activated)
				}
				if got, ok := Next(k); !ok || got != (Step{Prepare, 0, day(215 + 83)}) {
					t.Errorf("Next = %+v, %v; want Prepare at day 298", got, ok)
				}
			},
			until: 400,
			wantEvents: []event{
				ev(298, Prepare, 3),
				ev(305, Activate, 3),
				ev(305, Expire, 1),
				ev(335, Destroy, 1),
				ev(388, Prepare, 4),
				ev(395, Activate, 4),
				ev(395, Expire, 2),
			},
		},
		{
			// Down from day 175 to 215: v3's activation (180), v1's expiry
			// (180) and v1's destruction (210) are all due at restart.
			name: "several due", last: 175, resume: 215,
			wantSteps:  []Step{{Activate, 3, day(180)}, {Expire, 1, day(180)}, {Destroy, 1, day(210)}},
			wantStates: "1:destroyed 2:retired 3:active",
			check: func(t *testing.T, k Key) {
				v1 := k.Versions[k.Index(1)]
				// Expire records when the overlap ended, not the restart.
				if !v1.Expired.Equal(day(180)) || !v1.Destroyed.Equal(day(215)) {
					t.Errorf("v1 expired %v, destroyed %v; want days 180 and 215", v1.Expired, v1.Destroyed)
				}
				if v2 := k.Versions[k.Index(2)]; !v2.Retired.Equal(day(215)) {
					t.Errorf("v2 retired %v, want day 215", v2.Retired)
				}
			},
			until: 400,
			wantEvents: []event{
				ev(298, Prepare, 4),
				ev(305, Activate, 4),
				ev(305, Expire, 2),
				ev(335, Destroy, 2),
				ev(388, Prepare, 5),
				ev(395, Activate, 5),
				ev(395, Expire, 3),
			},
		},
		{
			// Down from day 82, before v2 was prepared: v2 is generated
			// late, at restart, and must still be published for the lead
			// time before it activates (day 222, not day 90).
			name: "late prepare", last: 82, resume: 215,
			wantSteps:  []Step{{Prepare, 0, day(83)}},
			wantStates: "1:active 2:pending",
			check: func(t *testing.T, k Key) {
				if got, ok := Next(k); !ok || got != (Step{Activate, 2, day(222)}) {
					t.Errorf("Next = %+v, %v; want Activate v2 at day 222", got, ok)
				}
				if got := NextRotation(k); !got.Equal(day(222)) {
					t.Errorf("NextRotation = %v, want day 222", got)
				}
				if st, at, ok := VersionNext(k, k.Versions[k.Index(2)]); !ok || st != kms.StateActive || !at.Equal(day(222)) {
					t.Errorf("VersionNext(v2) = %v, %v, %v; want active at day 222", st, at, ok)
				}
			},
			until: 400,
			wantEvents: []event{
				ev(222, Activate, 2),
				ev(305, Prepare, 3),
				ev(312, Activate, 3),
				ev(312, Expire, 1),
				ev(342, Destroy, 1),
				ev(395, Prepare, 4),
			},
			laterStates: map[int]string{221: "1:active 2:pending", 222: "1:retired 2:active"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSim(t, key(kms.DefaultPolicy(), active1()))
			s.run(t0, day(tc.last), designStates)
			var before []event
			for _, e := range defaultTimeline {
				if e.At <= time.Duration(tc.last)*kms.Day {
					before = append(before, e)
				}
			}
			s.wantEvents(before)

			got := s.advance(day(tc.resume))
			if !slices.Equal(got, tc.wantSteps) {
				t.Errorf("steps at day %d:\n got %+v\nwant %+v", tc.resume, got, tc.wantSteps)
			}
			s.observe(day(tc.resume))
			if got := states(s.k); got != tc.wantStates {
				t.Errorf("after restart: states %q, want %q", got, tc.wantStates)
			}
			tc.check(t, s.k)

			s.events = nil
			s.run(day(tc.resume), day(tc.until), tc.laterStates)
			s.wantEvents(tc.wantEvents)
		})
	}
}

// ---- Next and Due ----

func TestNext(t *testing.T) {
	p := testPolicy // period 30d, overlap 45d, lead 5d, destroy delay 11d
	pending := func(n uint32, created time.Time) Version {
		v := ver(n, kms.StatePending)
		v.Created = created
		return v
	}
	retired := func(n uint32, at time.Time) Version {
		v := ver(n, kms.StateRetired)
		v.Retired = at
		return v
	}
	expired := func(n uint32, at time.Time) Version {
		v := ver(n, kms.StateExpired)
		v.Expired = at
		return v
	}
	revoked := func(n uint32, at time.Time) Version {
		v := ver(n, kms.StateRevoked)
		v.Revoked = at
		return v
	}
	activeAt := func(n uint32, at time.Time) Version {
		v := ver(n, kms.StateActive)
		v.Created, v.Activated = at, at
		return v
	}
	for _, tc := range []struct {
		name string
		k    Key
		want Step
		ok   bool
	}{
		{"active only", key(p, active1()), Step{Prepare, 0, day(25)}, true},
		{"pending in time", key(p, active1(), pending(2, day(25))), Step{Activate, 2, day(30)}, true},
		{"pending early", key(p, active1(), pending(2, day(3))), Step{Activate, 2, day(30)}, true},
		// Prepared late: activation waits for the lead time.
		{"pending late", key(p, active1(), pending(2, day(28))), Step{Activate, 2, day(33)}, true},
		{"pending after the period", key(p, active1(), pending(2, day(100))), Step{Activate, 2, day(105)}, true},
		{"retired expires first", key(p, retired(1, day(-40)), activeAt(2, day(0))), Step{Expire, 1, day(5)}, true},
		{"prepare before expiry", key(p, retired(1, day(0)), activeAt(2, day(0))), Step{Prepare, 0, day(25)}, true},
		{"expired", key(p, expired(1, day(-8)), activeAt(2, day(0))), Step{Destroy, 1, day(3)}, true},
		{"revoked", key(p, revoked(1, day(-9)), activeAt(2, day(0))), Step{Destroy, 1, day(2)}, true},
		{"earliest of several", key(p, expired(1, day(10)), retired(2, day(-30)), revoked(3, day(20)), activeAt(4, day(0))), Step{Expire, 2, day(15)}, true},
		// Without an ACTIVE version a key never rotates by itself, but
		// revoked versions are still destroyed.
		{"no active, revoked", key(p, revoked(1, day(0))), Step{Destroy, 1, day(11)}, true},
		{"no active, pending", key(p, pending(2, day(0))), Step{}, false},
		{"only destroyed", key(p, ver(1, kms.StateDestroyed)), Step{}, false},
		{"no versions", key(p), Step{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := Next(tc.k)
			if got != tc.want || ok != tc.ok {
				t.Errorf("Next = %+v, %v; want %+v, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestDue(t *testing.T) {
	k := key(testPolicy, active1()) // Prepare due at day 25
	if s, ok := Due(k, day(25).Add(-time.Nanosecond)); ok {
		t.Errorf("Due a nanosecond early = %+v, true; want false", s)
	}
	want := Step{Prepare, 0, day(25)}
	for _, now := range []time.Time{day(25), day(26), day(1000)} {
		if s, ok := Due(k, now); !ok || s != want {
			t.Errorf("Due(%v) = %+v, %v; want %+v, true", now, s, ok, want)
		}
	}
	if s, ok := Due(key(testPolicy), day(1000)); ok {
		t.Errorf("Due(no versions) = %+v, true; want false", s)
	}
}

// ---- Apply ----

func TestApply(t *testing.T) {
	p := testPolicy
	now := day(40)
	active := active1()
	pending := ver(2, kms.StatePending)
	pending.Created = day(25)
	retired := ver(1, kms.StateRetired)
	retired.Created, retired.Activated, retired.Retired = day(-30), day(-30), day(0)
	active2 := ver(2, kms.StateActive)
	active2.Created, active2.Activated = day(-5), day(0)
	expired := retired
	expired.State, expired.Expired = kms.StateExpired, day(20)
	revoked := ver(3, kms.StateRevoked)
	revoked.Created, revoked.Revoked = day(20), day(21)
	destroyed := expired
	destroyed.State, destroyed.Destroyed = kms.StateDestroyed, day(31)

	// set returns v with f applied.
	set := func(v Version, f func(*Version)) Version {
		f(&v)
		return v
	}
	for _, tc := range []struct {
		name string
		k    Key
		s    Step
		nv   *Version
		want Key // ignored when err
		err  error
	}{
		{
			name: "prepare",
			k:    key(p, active),
			s:    Step{Prepare, 0, day(25)},
			// The number, state and times are Apply's, whatever nv says.
			nv: &Version{Version: 7, State: kms.StateActive, Kid: "kid-new", Handle: kms.Handle("h-new"), PublicKey: []byte("pub-new"), Activated: day(1)},
			want: key(p, active, Version{Version: 2, State: kms.StatePending, Kid: "kid-new", Handle: kms.Handle("h-new"), PublicKey: []byte("pub-new"),
				Created: now, Activated: day(1)}),
		},
		{name: "prepare without nv", k: key(p, active), s: Step{Prepare, 0, day(25)}, err: ErrNotApplicable},
		{name: "prepare with pending", k: key(p, active, pending), s: Step{Prepare, 0, day(25)}, nv: hw("x"), err: ErrNotApplicable},
		{name: "prepare without active", k: key(p, revoked), s: Step{Prepare, 0, day(25)}, nv: hw("x"), err: ErrNotApplicable},

		{
			name: "activate",
			k:    key(p, active, pending),
			s:    Step{Activate, 2, day(30)},
			want: key(p,
				set(active, func(v *Version) { v.State, v.Retired = kms.StateRetired, now }),
				set(pending, func(v *Version) { v.State, v.Activated = kms.StateActive, now })),
		},
		{name: "activate unknown version", k: key(p, active, pending), s: Step{Activate, 3, day(30)}, err: ErrNotApplicable},
		{name: "activate the active version", k: key(p, active, pending), s: Step{Activate, 1, day(30)}, err: ErrNotApplicable},
		{name: "activate a retired version", k: key(p, retired, active2), s: Step{Activate, 1, day(30)}, err: ErrNotApplicable},
		{name: "activate without active", k: key(p, revoked, set(pending, func(v *Version) { v.Version = 4 })), s: Step{Activate, 4, day(30)}, err: ErrNotApplicable},

		{
			name: "expire",
			k:    key(p, retired, active2),
			s:    Step{Expire, 1, day(35)},
			// Expired is the step's due time, not now.
			want: key(p, set(retired, func(v *Version) { v.State, v.Expired = kms.StateExpired, day(35) }), active2),
		},
		{
			name: "expire due in the future",
			k:    key(p, retired, active2),
			s:    Step{Expire, 1, day(45)},
			// A due time after now is never recorded: now is.
			want: key(p, set(retired, func(v *Version) { v.State, v.Expired = kms.StateExpired, now }), active2),
		},
		{
			name: "expire without due time",
			k:    key(p, retired, active2),
			s:    Step{Action: Expire, Version: 1},
			want: key(p, set(retired, func(v *Version) { v.State, v.Expired = kms.StateExpired, now }), active2),
		},
		{name: "expire unknown version", k: key(p, retired, active2), s: Step{Expire, 3, day(45)}, err: ErrNotApplicable},
		{name: "expire the active version", k: key(p, retired, active2), s: Step{Expire, 2, day(45)}, err: ErrNotApplicable},
		{name: "expire an expired version", k: key(p, expired, active2), s: Step{Expire, 1, day(45)}, err: ErrNotApplicable},

		{
			name: "destroy expired",
			k:    key(p, expired, active2),
			s:    Step{Destroy, 1, day(31)},
			want: key(p, set(expired, func(v *Version) { v.State, v.Destroyed = kms.StateDestroyed, now }), active2),
		},
		{
			name: "destroy revoked",
			k:    key(p, active2, revoked),
			s:    Step{Destroy, 3, day(32)},
			want: key(p, active2, set(revoked, func(v *Version) { v.State, v.Destroyed = kms.StateDestroyed, now })),
		},
		{name: "destroy unknown version", k: key(p, expired, active2), s: Step{Destroy, 9, day(31)}, err: ErrNotApplicable},
		{name: "destroy a retired version", k: key(p, retired, active2), s: Step{Destroy, 1, day(31)}, err: ErrNotApplicable},
		{name: "destroy the active version", k: key(p, expired, active2), s: Step{Destroy, 2, day(31)}, err: ErrNotApplicable},
		{name: "destroy a pending version", k: key(p, active, pending), s: Step{Destroy, 2, day(31)}, err: ErrNotApplicable},
		{name: "destroy twice", k: key(p, destroyed, active2), s: Step{Destroy, 1, day(31)}, err: ErrNotApplicable},

		{name: "none", k: key(p, active, pending), s: Step{None, 0, day(0)}, err: ErrNotApplicable},
		{name: "unknown action", k: key(p, active, pending), s: Step{Action(42), 2, day(0)}, nv: hw("x"), err: ErrNotApplicable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := tc.k.Clone()
			got, err := Apply(tc.k, tc.s, now, tc.nv)
			unchanged(t, "Apply", before, tc.k)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("Apply = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Apply:\n got %+v\nwant %+v", got.Versions, tc.want.Versions)
			}
			if err := Check(got); err != nil {
				t.Errorf("Check(result): %v", err)
			}
		})
	}
}

// ---- Rotate and Revoke ----

func TestRotate(t *testing.T) {
	p := testPolicy
	now := day(12)
	active := active1()
	retiredActive := active
	retiredActive.State, retiredActive.Retired = kms.StateRetired, now
	pending := ver(2, kms.StatePending)
	pending.Created = day(10)
	promoted := pending
	promoted.State, promoted.Activated = kms.StateActive, now
	fresh := Version{Version: 2, State: kms.StateActive, Kid: "kid-new", Handle: kms.Handle("handle-new"), PublicKey: []byte("pub-new"), Created: now, Activated: now}
	// v3 was PENDING, then revoked and destroyed: its number stays taken.
	gone := ver(3, kms.StateDestroyed)
	gone.Created, gone.Revoked, gone.Destroyed = day(1), day(2), day(3)
	fresh4 := fresh
	fresh4.Version = 4

	for _, tc := range []struct {
		name string
		k    Key
		nv   *Version
		want Key
		err  bool
	}{
		{name: "promotes pending", k: key(p, active, pending), want: key(p, retiredActive, promoted)},
		// nv is not needed, and not added, when there is a PENDING version.
		{name: "promotes pending, ignores nv", k: key(p, active, pending), nv: hw("new"), want: key(p, retiredActive, promoted)},
		{name: "adds nv", k: key(p, active), nv: hw("new"), want: key(p, retiredActive, fresh)},
		{name: "adds nv after a destroyed version", k: key(p, active, gone), nv: hw("new"), want: key(p, retiredActive, gone, fresh4)},
		{name: "needs nv", k: key(p, active), err: true},
		{name: "no active", k: key(p, gone), nv: hw("new"), err: true},
		{name: "no active, pending", k: key(p, pending), nv: hw("new"), err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := tc.k.Clone()
			got, err := Rotate(tc.k, now, tc.nv)
			unchanged(t, "Rotate", before, tc.k)
			if tc.err {
				if !errors.Is(err, ErrNotApplicable) {
					t.Fatalf("Rotate = %v, want ErrNotApplicable", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Rotate: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Rotate:\n got %+v\nwant %+v", got.Versions, tc.want.Versions)
			}
			if err := Check(got); err != nil {
				t.Errorf("Check(result): %v", err)
			}
		})
	}
}

func TestRevoke(t *testing.T) {
	p := testPolicy
	now := day(12)
	active := active1()
	pending := ver(2, kms.StatePending)
	pending.Created = day(10)
	retired := ver(1, kms.StateRetired)
	retired.Created, retired.Activated, retired.Retired = day(-30), day(-30), day(0)
	active2 := ver(2, kms.StateActive)
	active2.Created, active2.Activated = day(-5), day(0)
	expired := retired
	expired.State, expired.Expired = kms.StateExpired, day(5)
	alreadyRevoked := retired
	alreadyRevoked.State, alreadyRevoked.Revoked = kms.StateRevoked, day(3)
	destroyed := expired
	destroyed.State, destroyed.Destroyed = kms.StateDestroyed, day(8)

	revokedAt := func(v Version) Version {
		v.State, v.Revoked = kms.StateRevoked, now
		return v
	}
	activated := func(v Version) Version {
		v.State, v.Activated = kms.StateActive, now
		return v
	}
	fresh := func(n uint32) Version {
		return Version{Version: n, State: kms.StateActive, Kid: "kid-new", Handle: kms.Handle("handle-new"), PublicKey: []byte("pub-new"), Created: now, Activated: now}
	}

	for _, tc := range []struct {
		name string
		k    Key
		n    uint32
		nv   *Version
		want Key
		err  bool
	}{
		{name: "active promotes pending", k: key(p, active, pending), n: 1, want: key(p, revokedAt(active), activated(pending))},
		{name: "active promotes pending, ignores nv", k: key(p, active, pending), n: 1, nv: hw("new"), want: key(p, revokedAt(active), activated(pending))},
		{name: "active with nv", k: key(p, active), n: 1, nv: hw("new"), want: key(p, revokedAt(active), fresh(2))},
		{name: "active with nv after destroyed", k: key(p, destroyed, active2), n: 2, nv: hw("new"), want: key(p, destroyed, revokedAt(active2), fresh(3))},
		{name: "active needs nv", k: key(p, active), n: 1, err: true},
		// The ACTIVE version stays; the next rotation prepares a new one.
		{name: "pending", k: key(p, active, pending), n: 2, want: key(p, active, revokedAt(pending))},
		{name: "retired", k: key(p, retired, active2), n: 1, want: key(p, revokedAt(retired), active2)},
		{name: "expired", k: key(p, expired, active2), n: 1, want: key(p, revokedAt(expired), active2)},
		// Revoked keeps its first revocation time.
		{name: "already revoked", k: key(p, alreadyRevoked, active2), n: 1, want: key(p, alreadyRevoked, active2)},
		{name: "destroyed", k: key(p, destroyed, active2), n: 1, err: true},
		{name: "unknown version", k: key(p, retired, active2), n: 3, nv: hw("new"), err: true},
		{name: "version 0", k: key(p, retired, active2), n: 0, nv: hw("new"), err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := tc.k.Clone()
			got, err := Revoke(tc.k, tc.n, now, tc.nv)
			unchanged(t, "Revoke", before, tc.k)
			if tc.err {
				if !errors.Is(err, ErrNotApplicable) {
					t.Fatalf("Revoke = %v, want ErrNotApplicable", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Revoke: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Revoke:\n got %+v\nwant %+v", got.Versions, tc.want.Versions)
			}
			if err := Check(got); err != nil {
				t.Errorf("Check(result): %v", err)
			}
		})
	}
}

func TestNeedsNewVersion(t *testing.T) {
	p := testPolicy
	active := active1()
	pending := ver(2, kms.StatePending)
	retired := ver(1, kms.StateRetired)
	active2 := ver(2, kms.StateActive)
	revoked := ver(3, kms.StateRevoked)
	withPending := key(p, active, pending)
	noPending := key(p, retired, active2, revoked)
	for _, tc := range []struct {
		name   string
		k      Key
		revoke uint32
		want   bool
	}{
		{"rotate, pending", withPending, 0, false},
		{"rotate, no pending", noPending, 0, true},
		{"revoke active, pending", withPending, 1, false},
		{"revoke pending", withPending, 2, false},
		{"revoke active, no pending", noPending, 2, true},
		{"revoke retired", noPending, 1, false},
		{"revoke revoked", noPending, 3, false},
		{"revoke unknown, no pending", noPending, 9, false},
		{"revoke unknown, pending", withPending, 9, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := NeedsNewVersion(tc.k, tc.revoke); got != tc.want {
				t.Errorf("NeedsNewVersion(%s, %d) = %v, want %v", states(tc.k), tc.revoke, got, tc.want)
			}
			// It predicts whether Rotate or Revoke fails for want of nv.
			var err error
			if tc.revoke == 0 {
				_, err = Rotate(tc.k, day(1), nil)
			} else {
				_, err = Revoke(tc.k, tc.revoke, day(1), nil)
			}
			if needs := err != nil && strings.Contains(err.Error(), "new version is needed"); needs != tc.want {
				t.Errorf("without nv: err %v, but NeedsNewVersion = %v", err, tc.want)
			}
		})
	}
}

// ---- Check ----

func TestCheck(t *testing.T) {
	p := testPolicy
	v := ver
	for _, tc := range []struct {
		name string
		k    Key
		want string // substring of the error; "" for none
	}{
		{"active", key(p, v(1, kms.StateActive)), ""},
		{"active and pending", key(p, v(1, kms.StateActive), v(2, kms.StatePending)), ""},
		{"every state", key(p, v(1, kms.StateDestroyed), v(2, kms.StateRevoked), v(3, kms.StateExpired), v(4, kms.StateRetired), v(5, kms.StateActive), v(6, kms.StatePending)), ""},
		{"gap in numbers", key(p, v(1, kms.StateRetired), v(5, kms.StateActive)), ""},
		{"no versions", key(p), "0 active and 0 pending"},
		{"no active", key(p, v(1, kms.StateRetired), v(2, kms.StatePending)), "0 active and 1 pending"},
		{"two active", key(p, v(1, kms.StateActive), v(2, kms.StateActive)), "2 active and 0 pending"},
		{"two pending", key(p, v(1, kms.StateActive), v(2, kms.StatePending), v(3, kms.StatePending)), "1 active and 2 pending"},
		{"out of order", key(p, v(2, kms.StateRetired), v(1, kms.StateActive)), "out of order at 1"},
		{"duplicate", key(p, v(1, kms.StateRetired), v(1, kms.StateActive)), "out of order at 1"},
		{"no state", key(p, v(1, kms.StateActive), v(2, kms.StateUnknown)), "version 2 has no state"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Check(tc.k)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Check(%s) = %v, want nil", states(tc.k), err)
			case tc.want != "" && err == nil:
				t.Errorf("Check(%s) = nil, want an error containing %q", states(tc.k), tc.want)
			case tc.want != "" && !strings.Contains(err.Error(), tc.want):
				t.Errorf("Check(%s) = %v, want an error containing %q", states(tc.k), err, tc.want)
			}
		})
	}
}

// ---- VersionNext and NextRotation ----

func TestVersionNext(t *testing.T) {
	p := testPolicy // period 30d, overlap 45d, lead 5d, destroy delay 11d
	active := active1()
	pending := ver(2, kms.StatePending)
	pending.Created = day(24)
	late := pending
	late.Created = day(29)
	retired := ver(1, kms.StateRetired)
	retired.Retired = day(3)
	active2 := ver(2, kms.StateActive)
	active2.Created, active2.Activated = day(0), day(3)
	expired := retired
	expired.State, expired.Expired = kms.StateExpired, day(48)
	revoked := ver(3, kms.StateRevoked)
	revoked.Revoked = day(7)
	destroyed := expired
	destroyed.State, destroyed.Destroyed = kms.StateDestroyed, day(59)

	for _, tc := range []struct {
		name string
		k    Key
		v    Version
		next kms.State
		at   time.Time
		ok   bool
	}{
		{"pending", key(p, active, pending), pending, kms.StateActive, day(30), true},
		{"pending late", key(p, active, late), late, kms.StateActive, day(34), true},
		{"pending without active", key(p, revoked, pending), pending, kms.StateUnknown, time.Time{}, false},
		{"active with pending", key(p, active, pending), active, kms.StateRetired, day(30), true},
		{"active with late pending", key(p, active, late), active, kms.StateRetired, day(34), true},
		{"active alone", key(p, retired, active2), active2, kms.StateRetired, day(33), true},
		{"retired", key(p, retired, active2), retired, kms.StateExpired, day(48), true},
		{"expired", key(p, expired, active2), expired, kms.StateDestroyed, day(59), true},
		{"revoked", key(p, active2, revoked), revoked, kms.StateDestroyed, day(18), true},
		{"destroyed", key(p, destroyed, active2), destroyed, kms.StateUnknown, time.Time{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			next, at, ok := VersionNext(tc.k, tc.v)
			if next != tc.next || !at.Equal(tc.at) || ok != tc.ok {
				t.Errorf("VersionNext = %v, %v, %v; want %v, %v, %v", next, at, ok, tc.next, tc.at, tc.ok)
			}
		})
	}
}

func TestNextRotation(t *testing.T) {
	p := testPolicy
	active := active1()
	pending := ver(2, kms.StatePending)
	pending.Created = day(20)
	late := pending
	late.Created = day(40)
	revoked := ver(1, kms.StateRevoked)
	for _, tc := range []struct {
		name string
		k    Key
		want time.Time
	}{
		{"active alone", key(p, active), day(30)},
		{"with pending", key(p, active, pending), day(30)},
		{"with late pending", key(p, active, late), day(45)},
		{"no active", key(p, revoked, pending), time.Time{}},
		{"no versions", key(p), time.Time{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := NextRotation(tc.k); !got.Equal(tc.want) {
				t.Errorf("NextRotation = %v, want %v", got, tc.want)
			}
			// It agrees with the Activate step Next schedules, if any.
			if s, ok := Next(tc.k); ok && s.Action == Activate && !s.Due.Equal(tc.want) {
				t.Errorf("Next = %+v, NextRotation = %v; want the same time", s, tc.want)
			}
		})
	}
}

// ---- version numbers ----

// TestVersionNumbersNeverReused: a new version's number is above every
// version ever recorded, including destroyed ones, whichever way it is made.
func TestVersionNumbersNeverReused(t *testing.T) {
	p := testPolicy
	// v6 was PENDING, revoked and destroyed; v5 is ACTIVE.
	gone := func(n uint32) Version {
		v := ver(n, kms.StateDestroyed)
		v.Destroyed = day(-1)
		return v
	}
	active5 := ver(5, kms.StateActive)
	active5.Created, active5.Activated = day(-1), day(-1)
	k := key(p, gone(1), gone(2), gone(4), active5, gone(6))
	if got := k.NextVersion(); got != 7 {
		t.Errorf("NextVersion = %d, want 7", got)
	}
	newest := func(what string, k Key, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		v := k.Versions[len(k.Versions)-1]
		if v.Version != 7 || v.Kid != "kid-new" {
			t.Errorf("%s: new version %d kid %q, want 7 kid-new", what, v.Version, v.Kid)
		}
		if err := Check(k); err != nil {
			t.Errorf("%s: Check: %v", what, err)
		}
	}
	next, err := Apply(k, Step{Prepare, 0, day(0)}, day(0), hw("new"))
	newest("Apply(Prepare)", next, err)
	next, err = Rotate(k, day(0), hw("new"))
	newest("Rotate", next, err)
	next, err = Revoke(k, 5, day(0), hw("new"))
	newest("Revoke", next, err)
}

func TestActionString(t *testing.T) {
	for a, want := range map[Action]string{None: "none", Prepare: "prepare", Activate: "activate", Expire: "expire", Destroy: "destroy", Action(9): "Action(9)"} {
		if got := a.String(); got != want {
			t.Errorf("Action(%d).String() = %q, want %q", int(a), got, want)
		}
	}
}
