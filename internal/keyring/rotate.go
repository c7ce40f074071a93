package keyring

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/rotation"
)

// stats are the rotation counters, ready for the metrics endpoint.
type stats struct {
	rotations atomic.Int64 // versions that became ACTIVE
	failures  atomic.Int64 // transitions that failed (retried at the next tick)
}

// Stats is a snapshot of the rotation counters.
type Stats struct {
	Rotations        int64
	RotationFailures int64
	// NextRotation of every key, by "tenant/name".
	NextRotation map[string]time.Time
}

// Stats returns the rotation counters and each key's next rotation time.
func (r *Keyring) Stats() Stats {
	s := Stats{Rotations: r.stats.rotations.Load(), RotationFailures: r.stats.failures.Load(), NextRotation: map[string]time.Time{}}
	r.mu.RLock()
	for id, k := range r.keys {
		s.NextRotation[id.tenant+"/"+id.name] = rotation.NextRotation(k.rec)
	}
	r.mu.RUnlock()
	return s
}

// lockKey serializes the writers of one key (scheduler, RotateKey, Revoke,
// UpdatePolicy). Readers and Sign never take it.
func (r *Keyring) lockKey(id keyID) func() {
	m, _ := r.ops.LoadOrStore(id, new(sync.Mutex))
	mu := m.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

func (r *Keyring) current(id keyID) *key {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.keys[id]
}

// Advance applies every transition due at now, key by key, earliest first
// (so deadlines missed while the daemon was down are applied in order).
// Each transition is one store transaction; a failed one is counted, logged
// and retried at the next call.
func (r *Keyring) Advance(ctx context.Context, now time.Time) error {
	r.mu.RLock()
	ids := make([]keyID, 0, len(r.keys))
	for id := range r.keys {
		ids = append(ids, id)
	}
	r.mu.RUnlock()
	sort.Slice(ids, func(i, j int) bool {
		return ids[i].tenant < ids[j].tenant || ids[i].tenant == ids[j].tenant && ids[i].name < ids[j].name
	})
	var errs []error
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := r.advanceKey(ctx, id, now); err != nil {
			r.stats.failures.Add(1)
			r.log.Error("rotation failed; retrying at the next tick", "tenant", id.tenant, "key", id.name, "err", err)
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// maxStepsPerAdvance bounds the transitions applied to one key in one
// Advance; a key down for years needs a handful, never hundreds.
const maxStepsPerAdvance = 64

func (r *Keyring) advanceKey(ctx context.Context, id keyID, now time.Time) error {
	defer r.lockKey(id)()
	for range maxStepsPerAdvance {
		k := r.current(id)
		if k == nil {
			return nil
		}
		step, ok := rotation.Due(k.rec, now)
		if !ok {
			return nil
		}
		if err := r.apply(ctx, k, step, now); err != nil {
			return fmt.Errorf("%v version %d: %w", step.Action, step.Version, err)
		}
	}
	return fmt.Errorf("more than %d transitions due at once", maxStepsPerAdvance)
}

// apply does the hardware work of one step, then commits its record.
func (r *Keyring) apply(ctx context.Context, k *key, step rotation.Step, now time.Time) error {
	rec := k.rec
	p := kms.Partition{Tenant: rec.Tenant}
	var nv *store.Version
	switch step.Action {
	case rotation.Prepare:
		v, err := r.generate(ctx, rec)
		if err != nil {
			return err
		}
		nv = &v
	case rotation.Destroy:
		v := rec.Versions[rec.Index(step.Version)]
		// Hardware first: a crash after this and before the commit leaves
		// a record whose next Destroy finds the object already gone.
		if err := r.backend.Destroy(ctx, p, v.Handle); err != nil && !errors.Is(err, kms.ErrNotFound) {
			return err
		}
	}
	next, err := rotation.Apply(rec, step, now, nv)
	if err != nil {
		if nv != nil {
			r.destroyOrphan(ctx, p, nv.Handle)
		}
		return err
	}
	if _, err := r.record(ctx, next, nv, r.store.UpdateKey); err != nil {
		return err
	}
	if step.Action == rotation.Activate {
		r.stats.rotations.Add(1)
	}
	r.log.Info("key version "+step.Action.String()+"d", "tenant", rec.Tenant, "key", rec.Name, "version", versionOf(step, next), "due", step.Due)
	return nil
}

func versionOf(step rotation.Step, k store.Key) uint32 {
	if step.Action == rotation.Prepare {
		return k.Versions[len(k.Versions)-1].Version
	}
	return step.Version
}

// flight is a RotateKey in progress; concurrent calls on the key with the
// same guard wait for it and share its result instead of rotating again.
type flight struct {
	done chan struct{}
	info KeyInfo
	err  error
}

// flightKey names a flight: the key, and the guard (if_active_version, 0
// for none) it was asked with. A call with another guard asks something
// else: it does not join, it waits for the key lock and decides for itself.
type flightKey struct {
	id       keyID
	ifActive uint32
}

// RotateKey rotates now: the PENDING version (or a new one) becomes ACTIVE
// and the ACTIVE one RETIRED. ifActive, when not 0, makes the call
// idempotent: the key is rotated only if ifActive is still the ACTIVE
// version. Calls with the same ifActive arriving while another rotation of
// the same key runs join it; rotated reports whether this call rotated the
// key.
func (r *Keyring) RotateKey(ctx context.Context, tenant, name string, ifActive uint32) (info KeyInfo, rotated bool, err error) {
	if _, err := r.lookup(tenant, name); err != nil {
		return KeyInfo{}, false, err
	}
	id := keyID{tenant, name}
	fk := flightKey{id, ifActive}
	for {
		r.mu.Lock()
		f := r.rotating[fk]
		if f == nil {
			break // with r.mu held
		}
		r.mu.Unlock()
		select {
		case <-f.done:
			if isContextErr(f.err) && ctx.Err() == nil {
				continue // the leader's deadline or cancel, not ours: try again
			}
			return f.info, false, f.err
		case <-ctx.Done():
			return KeyInfo{}, false, ctx.Err()
		}
	}
	f := &flight{done: make(chan struct{})}
	r.rotating[fk] = f
	r.mu.Unlock()
	defer func() {
		f.info, f.err = info, err
		r.mu.Lock()
		delete(r.rotating, fk)
		r.mu.Unlock()
		close(f.done)
	}()

	defer r.lockKey(id)()
	err = retryConflicts(func() error {
		info, rotated, err = r.rotateLocked(ctx, id, ifActive)
		return err
	})
	return info, rotated, err
}

// retryConflicts runs f again while its commit loses to another replica's
// (store.ErrConflict, after which the keyring holds the winner's record), a
// few times: each run decides again, on the record that won.
func retryConflicts(f func() error) error {
	var err error
	for range 8 {
		if err = f(); !errors.Is(err, store.ErrConflict) {
			return err
		}
	}
	return err
}

func (r *Keyring) rotateLocked(ctx context.Context, id keyID, ifActive uint32) (KeyInfo, bool, error) {
	tenant, name := id.tenant, id.name
	k := r.current(id)
	if ifActive != 0 && (k.active == nil || k.active.Version.Version != ifActive) {
		return k.info(), false, nil
	}
	now := r.now().UTC()
	var nv *store.Version
	if rotation.NeedsNewVersion(k.rec, 0) {
		v, err := r.generate(ctx, k.rec)
		if err != nil {
			return KeyInfo{}, false, err
		}
		nv = &v
	}
	next, err := rotation.Rotate(k.rec, now, nv)
	if err != nil {
		if nv != nil {
			r.destroyOrphan(ctx, kms.Partition{Tenant: tenant}, nv.Handle)
		}
		return KeyInfo{}, false, err
	}
	nk, err := r.record(ctx, next, nv, r.store.UpdateKey)
	if err != nil {
		return KeyInfo{}, false, err
	}
	r.stats.rotations.Add(1)
	r.log.Info("key rotated", "tenant", tenant, "key", name, "version", nk.active.Version.Version, "kid", nk.active.Kid)
	return nk.info(), true, nil
}

// RevokeKeyVersion withdraws a version at once: out of the JWKS, unusable.
// If it was the ACTIVE one, the PENDING version (or a new one) becomes
// ACTIVE in the same transaction.
func (r *Keyring) RevokeKeyVersion(ctx context.Context, tenant, name string, ref VersionRef) (KeyInfo, error) {
	_, err := r.lookup(tenant, name)
	if err != nil {
		return KeyInfo{}, err
	}
	if ref.Version == 0 && ref.Kid == "" {
		return KeyInfo{}, &kms.FieldError{Field: "version", Reason: "give the version or the kid to revoke"}
	}
	id := keyID{tenant, name}
	defer r.lockKey(id)()
	var info KeyInfo
	err = retryConflicts(func() error {
		info, err = r.revokeLocked(ctx, id, ref)
		return err
	})
	return info, err
}

func (r *Keyring) revokeLocked(ctx context.Context, id keyID, ref VersionRef) (KeyInfo, error) {
	tenant, name := id.tenant, id.name
	k := r.current(id)
	v, err := k.version(ref)
	if err != nil {
		return KeyInfo{}, err
	}
	n := v.Version.Version
	if v.State == kms.StateDestroyed {
		return KeyInfo{}, &kms.ClientError{Kind: kms.ErrFailedPrecondition, Reason: ReasonNotUsable,
			Msg: fmt.Sprintf("key %q version %d is destroyed", name, n), Meta: map[string]string{"state": "DESTROYED"}}
	}
	if v.State == kms.StateRevoked {
		return k.info(), nil
	}
	var nv *store.Version
	if rotation.NeedsNewVersion(k.rec, n) {
		g, err := r.generate(ctx, k.rec)
		if err != nil {
			return KeyInfo{}, err
		}
		nv = &g
	}
	next, err := rotation.Revoke(k.rec, n, r.now().UTC(), nv)
	if err != nil {
		if nv != nil {
			r.destroyOrphan(ctx, kms.Partition{Tenant: tenant}, nv.Handle)
		}
		return KeyInfo{}, err
	}
	nk, err := r.record(ctx, next, nv, r.store.UpdateKey)
	if err != nil {
		return KeyInfo{}, err
	}
	r.log.Warn("key version revoked", "tenant", tenant, "key", name, "version", n, "kid", v.Kid, "active", nk.active.Version.Version)
	return nk.info(), nil
}

// UpdatePolicy changes a key's rotation policy; update gets the current
// policy and returns the new one, which is validated before it is stored.
func (r *Keyring) UpdatePolicy(ctx context.Context, tenant, name string, update func(kms.Policy) kms.Policy) (KeyInfo, error) {
	if _, err := r.lookup(tenant, name); err != nil {
		return KeyInfo{}, err
	}
	id := keyID{tenant, name}
	defer r.lockKey(id)()
	var k *key
	err := retryConflicts(func() error {
		rec := r.current(id).rec.Clone()
		rec.Policy = update(rec.Policy)
		if err := rec.Policy.Validate(); err != nil {
			return err
		}
		var err error
		k, err = r.record(ctx, rec, nil, r.store.UpdateKey)
		return err
	})
	if err != nil {
		return KeyInfo{}, err
	}
	rec := k.rec
	r.log.Info("key policy updated", "tenant", tenant, "key", name,
		"rotation_period", kms.FormatDuration(rec.Policy.RotationPeriod), "overlap", kms.FormatDuration(rec.Policy.Overlap),
		"lead", kms.FormatDuration(rec.Policy.Lead), "destroy_delay", kms.FormatDuration(rec.Policy.DestroyDelay))
	return k.info(), nil
}

// Reconcile compares the hardware with the records, when the backend can
// list its objects. Objects of this store that should not exist are left-
// overs of a crash and are destroyed, with a log line: an object whose
// creation was recorded as an intent but never committed, and the object
// of a DESTROYED version. Any other object with no record is left alone
// and reported: it may be another daemon's key on a shared token, or this
// daemon's own from before its state directory was lost — never a reason
// to destroy a key. Versions whose object is missing are reported. It
// returns the number of objects removed.
func (r *Keyring) Reconcile(ctx context.Context) (int, error) {
	lister, ok := r.backend.(kms.Lister)
	if !ok {
		return 0, nil
	}
	objs, err := lister.List(ctx)
	// Tenants whose own token is not there: their records and intents
	// wait for the next start.
	skip := map[string]bool{}
	var skipped *kms.ListSkipped
	if errors.As(err, &skipped) {
		for _, t := range skipped.Tenants {
			skip[t] = true
		}
		r.log.Warn("tenants' own tokens unavailable: their keys are not reconciled", "tenants", skipped.Tenants)
		err = nil
	}
	if err != nil {
		return 0, err
	}
	intents, err := r.store.Intents(ctx)
	if err != nil {
		return 0, err
	}
	intents = slices.DeleteFunc(intents, func(in store.Intent) bool { return skip[in.Tenant] })
	// Another replica's creation in progress is not a leftover: its
	// object is neither this store's to remove nor foreign.
	var pending []store.Intent
	for _, in := range intents {
		live, err := r.store.IntentLive(ctx, in)
		if err != nil {
			return 0, err
		}
		// A creation takes at most a call's time; an intent much older
		// than that is a leftover even if its owner lives (it failed to
		// remove an object it could not record).
		if live && r.now().Sub(in.Created) < intentGrace {
			pending = append(pending, in)
		}
	}
	intents = slices.DeleteFunc(intents, func(in store.Intent) bool {
		return slices.ContainsFunc(pending, func(p store.Intent) bool {
			return p.Tenant == in.Tenant && string(p.Handle) == string(in.Handle)
		})
	})
	// The records as stored, read after the objects and intents: an
	// object listed was recorded as an intent first, and an intent gone
	// since was committed in a record read here.
	recs, err := r.store.Keys(ctx)
	if err != nil {
		return 0, err
	}
	for _, rec := range recs {
		if err := r.Apply(rec); err != nil {
			return 0, err
		}
	}
	objKey := func(tenant string, h kms.Handle) string { return tenant + "\x00" + string(h) }
	mine := map[string]bool{} // objects of this store that should not exist
	for _, in := range intents {
		mine[objKey(in.Tenant, in.Handle)] = true
	}
	inProgress := map[string]bool{}
	for _, in := range pending {
		inProgress[objKey(in.Tenant, in.Handle)] = true
	}
	live := map[string]string{} // objects that should exist → "tenant/name vN STATE"
	for _, rec := range recs {
		if skip[rec.Tenant] {
			continue
		}
		for _, v := range rec.Versions {
			key := objKey(rec.Tenant, v.Handle)
			if v.State != kms.StateDestroyed {
				live[key] = fmt.Sprintf("%s/%s v%d %v", rec.Tenant, rec.Name, v.Version, v.State)
			} else {
				mine[key] = true
			}
		}
	}
	removed, foreign := 0, 0
	for _, o := range objs {
		key := objKey(o.Partition.Tenant, o.Handle)
		if _, ok := live[key]; ok {
			delete(live, key)
			continue
		}
		if inProgress[key] {
			continue
		}
		if !mine[key] {
			foreign++
			continue
		}
		if err := r.backend.Destroy(ctx, o.Partition, o.Handle); err != nil && !errors.Is(err, kms.ErrNotFound) {
			return removed, fmt.Errorf("removing an unrecorded hardware key: %w", err)
		}
		removed++
		r.log.Warn("removed a hardware key whose creation was interrupted, or whose version is destroyed", "tenant", o.Partition.Tenant)
	}
	// Every intent is settled now: its object recorded, removed, or
	// never made.
	for _, in := range intents {
		if err := r.store.DeleteIntent(ctx, in.Tenant, in.Handle); err != nil {
			return removed, err
		}
	}
	if foreign > 0 {
		r.log.Warn("hardware keys with keybroker labels that this daemon's records do not know: left untouched "+
			"(another daemon's keys on the same token, or this daemon's state directory was lost or replaced)", "count", foreign)
	}
	for _, which := range live {
		// EXPIRED and REVOKED objects may be gone already: a destroy
		// interrupted before its commit. The next Advance records it.
		r.log.Warn("hardware key missing for a recorded version", "version", which)
	}
	return removed, nil
}

// intentGrace is how long another live replica's creation intent counts
// as work in progress.
const intentGrace = 2 * time.Minute

// isContextErr tells a call's own cancel or deadline.
func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
