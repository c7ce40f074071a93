// Package rotation decides when key versions change state (docs/design.md
// "Key model and rotation"). Decisions are pure functions of (key record, policy,
// now): Next says which transition a key is due for and when, and the Apply
// functions return the record after a transition. The keyring does the
// hardware work around them and commits each result in one store
// transaction. The Scheduler loop takes an injected Clock, so tests can run
// two years in a second. Nothing here sits on the Sign path.
package rotation

import (
	"errors"
	"fmt"
	"time"

	"github.com/keybroker/keybroker/kms"
)

// Action is a scheduled transition.
type Action int

// The scheduled transitions, in the order of a version's life.
const (
	None     Action = iota
	Prepare         // generate the next version, PENDING (published, not signing)
	Activate        // PENDING → ACTIVE; the ACTIVE one → RETIRED
	Expire          // RETIRED → EXPIRED (unpublished)
	Destroy         // EXPIRED or REVOKED → DESTROYED (hardware object removed)
)

func (a Action) String() string {
	switch a {
	case None:
		return "none"
	case Prepare:
		return "prepare"
	case Activate:
		return "activate"
	case Expire:
		return "expire"
	case Destroy:
		return "destroy"
	}
	return fmt.Sprintf("Action(%d)", int(a))
}

// Step is a transition a key is due for.
type Step struct {
	Action  Action
	Version uint32 // the version acted on; 0 for Prepare
	Due     time.Time
}

// Next returns the earliest transition k is due for; Due may be in the
// future. ok is false when nothing is scheduled (a key without an ACTIVE
// version never rotates by itself).
func Next(k Key) (s Step, ok bool) {
	consider := func(c Step) {
		if !ok || c.Due.Before(s.Due) {
			s, ok = c, true
		}
	}
	p := k.Policy
	if a := k.InState(kms.StateActive); a >= 0 {
		active := k.Versions[a]
		if pi := k.InState(kms.StatePending); pi >= 0 {
			consider(Step{Activate, k.Versions[pi].Version, activationDue(active, k.Versions[pi], p)})
		} else {
			consider(Step{Prepare, 0, active.Activated.Add(p.RotationPeriod - p.Lead)})
		}
	}
	for _, v := range k.Versions {
		switch v.State {
		case kms.StateRetired:
			consider(Step{Expire, v.Version, v.Retired.Add(p.Overlap)})
		case kms.StateExpired:
			consider(Step{Destroy, v.Version, v.Expired.Add(p.DestroyDelay)})
		case kms.StateRevoked:
			consider(Step{Destroy, v.Version, v.Revoked.Add(p.DestroyDelay)})
		}
	}
	return s, ok
}

// activationDue is when pending replaces active: at the end of active's
// period, but never before pending has been published for the lead time
// (after downtime, Prepare may have run late).
func activationDue(active, pending Version, p kms.Policy) time.Time {
	due := active.Activated.Add(p.RotationPeriod)
	if earliest := pending.Created.Add(p.Lead); earliest.After(due) {
		return earliest
	}
	return due
}

// Due returns the transition k is due for at now, if any.
func Due(k Key, now time.Time) (Step, bool) {
	s, ok := Next(k)
	if !ok || s.Due.After(now) {
		return Step{}, false
	}
	return s, true
}

// ErrNotApplicable: the step does not fit the record (it changed since).
var ErrNotApplicable = errors.New("rotation: step does not apply to this key")

// Apply returns k after step s at now. For Prepare, nv is the new
// version's hardware identity (Handle, Kid, PublicKey); its number, state and
// times are filled in here. The hardware work (generating nv, destroying for
// Destroy) is the caller's, before it commits the result.
func Apply(k Key, s Step, now time.Time, nv *Version) (Key, error) {
	k = k.Clone()
	switch s.Action {
	case Prepare:
		if nv == nil || k.InState(kms.StatePending) >= 0 || k.InState(kms.StateActive) < 0 {
			return k, ErrNotApplicable
		}
		v := *nv
		v.Version, v.State, v.Created = k.NextVersion(), kms.StatePending, now
		k.Versions = append(k.Versions, v)
		return k, nil
	case Activate:
		pi, ai := k.Index(s.Version), k.InState(kms.StateActive)
		if pi < 0 || ai < 0 || k.Versions[pi].State != kms.StatePending {
			return k, ErrNotApplicable
		}
		activate(&k, pi, ai, now)
		return k, nil
	case Expire:
		i := k.Index(s.Version)
		if i < 0 || k.Versions[i].State != kms.StateRetired {
			return k, ErrNotApplicable
		}
		// The scheduled time, not now: the version stopped signing at
		// Retired and was published for the whole overlap since; the
		// destroy delay counts from there, so a destroy deadline that fell
		// in a downtime is applied at start too.
		at := s.Due
		if at.IsZero() || at.After(now) {
			at = now
		}
		k.Versions[i].State, k.Versions[i].Expired = kms.StateExpired, at
		return k, nil
	case Destroy:
		i := k.Index(s.Version)
		if i < 0 || (k.Versions[i].State != kms.StateExpired && k.Versions[i].State != kms.StateRevoked) {
			return k, ErrNotApplicable
		}
		k.Versions[i].State, k.Versions[i].Destroyed = kms.StateDestroyed, now
		return k, nil
	}
	return k, ErrNotApplicable
}

// activate makes version pi ACTIVE and retires version ai.
func activate(k *Key, pi, ai int, now time.Time) {
	k.Versions[ai].State, k.Versions[ai].Retired = kms.StateRetired, now
	k.Versions[pi].State, k.Versions[pi].Activated = kms.StateActive, now
}

// NeedsNewVersion reports whether Rotate or Revoke of version n would need a
// freshly generated version (there is no PENDING one to promote).
func NeedsNewVersion(k Key, revoke uint32) bool {
	if k.InState(kms.StatePending) >= 0 {
		return false
	}
	if revoke == 0 {
		return true
	}
	i := k.Index(revoke)
	return i >= 0 && k.Versions[i].State == kms.StateActive
}

// Rotate is an immediate rotation: the PENDING version, if any, becomes
// ACTIVE; otherwise nv (required then) is added as ACTIVE. The previous
// ACTIVE version is RETIRED.
func Rotate(k Key, now time.Time, nv *Version) (Key, error) {
	k = k.Clone()
	ai := k.InState(kms.StateActive)
	if ai < 0 {
		return k, fmt.Errorf("%w: no active version", ErrNotApplicable)
	}
	pi, err := promotable(&k, now, nv)
	if err != nil {
		return k, err
	}
	activate(&k, pi, ai, now)
	return k, nil
}

// promotable returns the index of the PENDING version, or appends nv as one.
func promotable(k *Key, now time.Time, nv *Version) (int, error) {
	if pi := k.InState(kms.StatePending); pi >= 0 {
		return pi, nil
	}
	if nv == nil {
		return -1, fmt.Errorf("%w: a new version is needed", ErrNotApplicable)
	}
	v := *nv
	v.Version, v.State, v.Created = k.NextVersion(), kms.StatePending, now
	k.Versions = append(k.Versions, v)
	return len(k.Versions) - 1, nil
}

// Revoke withdraws version n at once: REVOKED, out of the JWKS, unusable.
// If it was ACTIVE, the PENDING version or else nv becomes ACTIVE in the
// same record. Revoking a REVOKED version changes nothing; a DESTROYED one
// cannot be revoked.
func Revoke(k Key, n uint32, now time.Time, nv *Version) (Key, error) {
	k = k.Clone()
	i := k.Index(n)
	if i < 0 {
		return k, fmt.Errorf("%w: no version %d", ErrNotApplicable, n)
	}
	switch k.Versions[i].State {
	case kms.StateRevoked:
		return k, nil
	case kms.StateDestroyed:
		return k, fmt.Errorf("%w: version %d is destroyed", ErrNotApplicable, n)
	case kms.StateActive:
		pi, err := promotable(&k, now, nv)
		if err != nil {
			return k, err
		}
		k.Versions[pi].State, k.Versions[pi].Activated = kms.StateActive, now
	}
	k.Versions[i].State, k.Versions[i].Revoked = kms.StateRevoked, now
	return k, nil
}

// Check verifies a record's invariants: version numbers unique and
// ascending, exactly one ACTIVE version, at most one PENDING.
func Check(k Key) error {
	var active, pending int
	for i, v := range k.Versions {
		if i > 0 && v.Version <= k.Versions[i-1].Version {
			return fmt.Errorf("versions out of order at %d", v.Version)
		}
		switch v.State {
		case kms.StateActive:
			active++
		case kms.StatePending:
			pending++
		case kms.StateUnknown:
			return fmt.Errorf("version %d has no state", v.Version)
		}
	}
	if active != 1 || pending > 1 {
		return fmt.Errorf("%d active and %d pending versions, want 1 and at most 1", active, pending)
	}
	return nil
}

// VersionNext is the next transition of version v of k under its policy:
// the state it will enter and when. ok is false when none is scheduled:
// DESTROYED versions, and a PENDING one while no version is ACTIVE.
// For the ACTIVE version without a PENDING successor it is the projected end
// of its period.
func VersionNext(k Key, v Version) (next kms.State, at time.Time, ok bool) {
	p := k.Policy
	switch v.State {
	case kms.StatePending:
		if ai := k.InState(kms.StateActive); ai >= 0 {
			return kms.StateActive, activationDue(k.Versions[ai], v, p), true
		}
	case kms.StateActive:
		if pi := k.InState(kms.StatePending); pi >= 0 {
			return kms.StateRetired, activationDue(v, k.Versions[pi], p), true
		}
		return kms.StateRetired, v.Activated.Add(p.RotationPeriod), true
	case kms.StateRetired:
		return kms.StateExpired, v.Retired.Add(p.Overlap), true
	case kms.StateExpired:
		return kms.StateDestroyed, v.Expired.Add(p.DestroyDelay), true
	case kms.StateRevoked:
		return kms.StateDestroyed, v.Revoked.Add(p.DestroyDelay), true
	}
	return kms.StateUnknown, time.Time{}, false
}

// NextRotation is when k's next version becomes ACTIVE (zero if never).
func NextRotation(k Key) time.Time {
	ai := k.InState(kms.StateActive)
	if ai < 0 {
		return time.Time{}
	}
	_, at, _ := VersionNext(k, k.Versions[ai])
	return at
}
