package keyring

import (
	"bytes"
	"errors"
	"slices"
	"time"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
)

// EventKind says what happened to a key version (or key, for
// EventPolicy).
type EventKind int

// Event kinds. A version's state events are named by the state it
// entered; a version first seen in a state (v1 of a new key, made ACTIVE
// at once) gets that state's event.
const (
	EventPending EventKind = iota + 1
	EventActive
	EventRetired
	EventExpired
	EventRevoked
	EventDestroyed
	EventPolicy      // the key's rotation policy changed
	EventCertificate // a version's certificate chain was imported or replaced
)

var eventNames = [...]string{"", "pending", "active", "retired", "expired", "revoked", "destroyed", "policy", "certificate"}

func (k EventKind) String() string {
	if k > 0 && int(k) < len(eventNames) {
		return eventNames[k]
	}
	return "unknown"
}

// ParseEventKind reads an EventKind's String.
func ParseEventKind(s string) (EventKind, bool) {
	i := slices.Index(eventNames[1:], s)
	return EventKind(i + 1), i >= 0
}

// EventKinds are the names ParseEventKind reads, in order.
func EventKinds() []string { return slices.Clone(eventNames[1:]) }

var stateEvents = map[kms.State]EventKind{
	kms.StatePending: EventPending, kms.StateActive: EventActive, kms.StateRetired: EventRetired,
	kms.StateExpired: EventExpired, kms.StateRevoked: EventRevoked, kms.StateDestroyed: EventDestroyed,
}

// Event is a change of a key as this replica installed it, or (Snapshot)
// a version as it is when a watch starts. Everything in it is public.
type Event struct {
	Kind     EventKind
	Snapshot bool
	Tenant   string
	Name     string
	Alg      kms.Algorithm
	// Version, Kid, State and JWK are the version's (zero for
	// EventPolicy).
	Version uint32
	Kid     string
	State   kms.State
	JWK     pop.JWK
	// Time is when the version entered State (the record's time), or
	// when this replica saw a policy or certificate change.
	Time time.Time
	// X5TS256 and CertExpires describe the version's imported
	// certificate ("": none).
	X5TS256     string
	CertExpires time.Time
	Policy      kms.Policy
}

// versionEvent describes v of k as kind.
func (k *key) versionEvent(kind EventKind, v *version, now time.Time) Event {
	return Event{Kind: kind, Tenant: k.rec.Tenant, Name: k.rec.Name, Alg: k.rec.Alg, Version: v.Version.Version, Kid: v.Kid,
		State: v.State, JWK: v.jwk, Time: stateTime(v, now), X5TS256: v.x5t, CertExpires: v.certExpires, Policy: k.rec.Policy}
}

func stateTime(v *version, now time.Time) time.Time {
	t := map[kms.State]time.Time{kms.StatePending: v.Created, kms.StateActive: v.Activated, kms.StateRetired: v.Retired,
		kms.StateExpired: v.Expired, kms.StateRevoked: v.Revoked, kms.StateDestroyed: v.Destroyed}[v.State]
	if t.IsZero() {
		return now
	}
	return t
}

// snapshot is one event per version of k, by its state.
func (k *key) snapshot(now time.Time) []Event {
	out := make([]Event, 0, len(k.versions))
	for _, v := range k.versions {
		ev := k.versionEvent(stateEvents[v.State], v, now)
		ev.Snapshot = true
		out = append(out, ev)
	}
	return out
}

// changes compares two snapshots of a key (old nil: a key new to this
// replica) and returns what happened between them, versions in ascending
// order, then the policy. Comparing records rather than hooking each
// writer makes every path — an RPC, the scheduler, another replica's
// change seen through the store — produce the same events, once. When
// records are skipped (another replica's changes arriving together), a
// version that went through several states reports only the last.
func changes(old, cur *key, now time.Time) []Event {
	var out []Event
	for _, v := range cur.versions {
		var was *version
		if old != nil {
			if i := slices.IndexFunc(old.versions, func(o *version) bool { return o.Version.Version == v.Version.Version }); i >= 0 {
				was = old.versions[i]
			}
		}
		switch {
		case was == nil || was.State != v.State:
			out = append(out, cur.versionEvent(stateEvents[v.State], v, now))
		case !sameChain(was.Certificates, v.Certificates) && len(v.Certificates) > 0:
			ev := cur.versionEvent(EventCertificate, v, now)
			ev.Time = now
			out = append(out, ev)
		}
	}
	if old != nil && old.rec.Policy != cur.rec.Policy {
		out = append(out, Event{Kind: EventPolicy, Tenant: cur.rec.Tenant, Name: cur.rec.Name, Alg: cur.rec.Alg, Time: now, Policy: cur.rec.Policy})
	}
	return out
}

func sameChain(a, b [][]byte) bool { return slices.EqualFunc(a, b, bytes.Equal) }

// listener receives the events of a tenant ("": every tenant) and key
// ("": every key).
type listener struct {
	tenant, name string
	f            func(Event)
}

func (l *listener) wants(tenant, name string) bool {
	return (l.tenant == "" || l.tenant == tenant) && (l.name == "" || l.name == name)
}

// publishLocked hands the events of a change to the listeners; r.mu is
// held, so listeners see changes in the order they were installed.
func (r *Keyring) publishLocked(old, cur *key) {
	if len(r.listeners) == 0 {
		return
	}
	evs := changes(old, cur, r.now().UTC())
	for l := range r.listeners {
		if !l.wants(cur.rec.Tenant, cur.rec.Name) {
			continue
		}
		for _, ev := range evs {
			l.f(ev)
		}
	}
}

// Listen calls f with every event of tenant ("": every tenant) and key
// name ("": every key) from now on. f is called in order, by whoever
// installs the change (an RPC, the scheduler, the store's watch), with
// the keyring's lock held: it must return at once and must not call the
// keyring — queue the event or drop it. snapshot is the current state,
// one event per version, taken atomically with the registration: no
// change is missed or seen twice. stop ends the calls; once it returns, f
// is not called again.
func (r *Keyring) Listen(tenant, name string, f func(Event)) (snapshot []Event, stop func()) {
	l := &listener{tenant: tenant, name: name, f: f}
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now().UTC()
	tenants := []string{tenant}
	if tenant == "" {
		tenants = nil
		for t := range r.names {
			tenants = append(tenants, t)
		}
		slices.Sort(tenants)
	}
	for _, t := range tenants {
		for _, n := range r.names[t] {
			if name == "" || name == n {
				snapshot = append(snapshot, r.keys[keyID{t, n}].snapshot(now)...)
			}
		}
	}
	r.listeners[l] = struct{}{}
	return snapshot, func() {
		r.mu.Lock()
		delete(r.listeners, l)
		r.mu.Unlock()
	}
}

// Watcher is a bounded queue of a tenant's events (see Watch).
type Watcher struct {
	// C delivers the events in order.
	C    <-chan Event
	over chan struct{}
	stop func()
}

// Overflow is closed when the watcher fell more than its buffer behind:
// events after that are dropped, and its reader must start again.
func (w *Watcher) Overflow() <-chan struct{} { return w.over }

// Stop ends the watch.
func (w *Watcher) Stop() { w.stop() }

// Watch validates name ("" every key) and starts a watch of the tenant's
// events, buffered up to buf: a reader that falls further behind is cut
// off (Overflow), never waited for, so that a slow watcher cannot hold a
// rotation, and with it the keyring's lock that Sign reads under.
func (r *Keyring) Watch(tenant, name string, buf int) ([]Event, *Watcher, error) {
	if tenant == "" {
		return nil, nil, errors.New("watch: no tenant") // "" would be every tenant's
	}
	if name != "" {
		if err := kms.ValidateName(name); err != nil {
			return nil, nil, err
		}
	}
	if err := r.fresh(); err != nil {
		return nil, nil, err
	}
	ch := make(chan Event, buf)
	w := &Watcher{C: ch, over: make(chan struct{})}
	overflowed := false // only touched by f, under r.mu
	snap, stop := r.Listen(tenant, name, func(ev Event) {
		if overflowed {
			return
		}
		select {
		case ch <- ev:
		default:
			overflowed = true
			close(w.over)
		}
	})
	w.stop = stop
	return snap, w, nil
}
