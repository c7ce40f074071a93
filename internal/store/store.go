// Package store is keybroker's metadata store: every key, its versions,
// states and backend handles, the kid registry and the intents recorded
// before hardware work. It has two backends behind one interface: bbolt,
// embedded in the state directory (one daemon), and etcd (several replicas
// sharing one network HSM). Every write is one transaction; an update
// commits only if the record is still at the revision it was read at. The
// hardware is the authority on what exists; the store on what it means.
// The keyring reads and writes it; the daemon opens it.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/rotation"
)

// schemaVersion is written into every record; a record from a newer schema
// is refused rather than misread.
const schemaVersion = 1

// ErrKidReused: a record names a kid that belongs to another key version.
var ErrKidReused = errors.New("store: kid already belongs to another key version")

// ErrConflict: the record changed since it was read (another replica, or
// another writer, committed first). Read it again and decide again.
// It is kms.ErrUnavailable to a caller: retrying will decide afresh.
var ErrConflict = fmt.Errorf("store: the record changed since it was read: %w", kms.ErrUnavailable)

// ErrNotLeader: a fenced write (see Fenced) was refused because this
// replica no longer leads.
var ErrNotLeader = fmt.Errorf("store: this replica is not the leader any more: %w", kms.ErrUnavailable)

// ErrUncertain: the store could not say whether a write committed (etcd
// went away while it was in flight). The writer keeps what the write
// refers to (a new hardware object and its intent) for Reconcile to settle.
var ErrUncertain = fmt.Errorf("store: the write may or may not have committed: %w", kms.ErrUnavailable)

// Key and Version are the stored records: rotation's, which decides their
// transitions (see docs/design.md "Key model and rotation"). Key.Rev is the
// store's revision of the record.
type (
	Key     = rotation.Key
	Version = rotation.Version
)

// Store is the metadata store. Writes are atomic: all of a write or none.
type Store interface {
	// CreateKey stores a new key and returns its revision;
	// kms.ErrAlreadyExists if (tenant, name) is taken.
	CreateKey(ctx context.Context, k Key) (rev int64, err error)
	// UpdateKey replaces the key k.Rev was read at and returns the new
	// revision; ErrConflict if it changed since, kms.ErrNotFound if it is
	// gone.
	UpdateKey(ctx context.Context, k Key) (rev int64, err error)
	// Keys returns every stored key, ordered by tenant and name.
	Keys(ctx context.Context) ([]Key, error)
	// Key returns one key; kms.ErrNotFound if there is none.
	Key(ctx context.Context, tenant, name string) (Key, error)
	// PutIntent records in before its hardware object is generated.
	PutIntent(ctx context.Context, in Intent) error
	// DeleteIntent removes the intent for (tenant, h), if there is one.
	DeleteIntent(ctx context.Context, tenant string, h kms.Handle) error
	// Intents returns every intent recorded.
	Intents(ctx context.Context) ([]Intent, error)
	// IntentLive reports whether in's owner may still be working on it
	// (a live replica): such an intent is not a crash's leftover.
	IntentLive(ctx context.Context, in Intent) (bool, error)
	Close() error
}

// Intent is a hardware object this store is about to create: recorded
// before the backend generates it, removed once the object is recorded in
// a key (or destroyed). After a crash in between, an intent is how the
// keyring tells its own unrecorded object from the objects of another
// store on the same token, which it must never touch.
type Intent struct {
	Tenant  string     `json:"tenant"`
	Handle  kms.Handle `json:"handle"` // the object ID chosen before generation
	Label   string     `json:"label"`
	Created time.Time  `json:"created"`
	// Owner is the replica that recorded it, and Lease its etcd lease,
	// alive while that replica is (etcd only): the intent of a live
	// replica is work in progress, not a crash's leftover.
	Owner string `json:"owner,omitempty"`
	Lease int64  `json:"lease,omitempty"`
}

// fenceKey marks a context whose writes are fenced.
type fenceKey struct{}

// Fenced returns a context whose writes commit only while this replica
// leads (etcd; bbolt has one writer and ignores it): the steps of the
// rotation scheduler, which only the leader runs.
func Fenced(ctx context.Context) context.Context { return context.WithValue(ctx, fenceKey{}, true) }

// IsFenced reports whether ctx was made by Fenced.
func IsFenced(ctx context.Context) bool { return ctx.Value(fenceKey{}) != nil }

// Encode checks a record as Decode will and marshals it, with this
// schema's version. Backends store what it returns.
func Encode(k Key) ([]byte, error) {
	k.Schema = schemaVersion
	if err := check(k); err != nil {
		return nil, fmt.Errorf("store: %s/%s: %w", k.Tenant, k.Name, err)
	}
	v, err := json.Marshal(k)
	if err != nil {
		return nil, fmt.Errorf("store: encode %s/%s: %w", k.Tenant, k.Name, err)
	}
	return v, nil
}

// check reports whether k is a complete record of this schema.
func check(k Key) error {
	if k.Schema != schemaVersion {
		return fmt.Errorf("schema version: got %d, want %d", k.Schema, schemaVersion)
	}
	if k.Name == "" || len(k.Versions) == 0 {
		return errors.New("incomplete record")
	}
	return nil
}

// Decode reads a record that Encode made, refusing an incomplete one or one
// of another schema.
func Decode(v []byte) (Key, error) {
	var k Key
	if err := json.Unmarshal(v, &k); err != nil {
		return Key{}, err
	}
	if err := check(k); err != nil {
		return Key{}, err
	}
	return k, nil
}

// KidOwner is what the kid registry holds for kid v of k: tenant, name and
// version, so that a kid is never given to another version.
func KidOwner(k Key, v Version) []byte {
	return fmt.Appendf(dbKey(k.Tenant, k.Name), "\x00%d", v.Version)
}

func dbKey(tenant, name string) []byte {
	return append(append([]byte(tenant), 0), name...)
}

func intentKey(tenant string, h kms.Handle) []byte {
	return append(append([]byte(tenant), 0), h...)
}
