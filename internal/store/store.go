// Package store is keybroker's metadata store: an embedded bbolt database in
// the state directory holding every key, its versions, states and backend
// handles. Each write is one transaction. The hardware is the authority on
// what exists; the store on what it means. Only the keyring imports it.
package store

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keybroker/keybroker/internal/broker"
)

// schemaVersion is written into every record; a record from a newer schema
// is refused rather than misread.
const schemaVersion = 1

var (
	bucketKeys = []byte("keys")
	// bucketKids maps every kid ever recorded to its key version, so that
	// no kid is ever given to a second version, even after destruction.
	bucketKids = []byte("kids")
	// bucketIntents holds the hardware objects this store is about to
	// create (see Intent).
	bucketIntents = []byte("intents")
)

// ErrKidReused: a record names a kid that belongs to another key version.
var ErrKidReused = errors.New("store: kid already belongs to another key version")

// Key is the stored form of a key.
type Key struct {
	Schema   int              `json:"schema"`
	Tenant   string           `json:"tenant"`
	Name     string           `json:"name"`
	Alg      broker.Algorithm `json:"alg"`
	Bits     int              `json:"bits,omitempty"`
	Backend  string           `json:"backend"`
	Created  time.Time        `json:"created"`
	Policy   broker.Policy    `json:"policy"`
	Versions []Version        `json:"versions"`
}

// Version is the stored form of a key version.
type Version struct {
	Version   uint32        `json:"version"`
	Kid       string        `json:"kid"`
	State     broker.State  `json:"state"`
	Handle    broker.Handle `json:"handle"`
	PublicKey []byte        `json:"public_key"` // PKIX DER
	// When the version entered each state (zero: not yet).
	Created   time.Time `json:"created"`
	Activated time.Time `json:"activated,omitzero"`
	Retired   time.Time `json:"retired,omitzero"`
	Expired   time.Time `json:"expired,omitzero"`
	Revoked   time.Time `json:"revoked,omitzero"`
	Destroyed time.Time `json:"destroyed,omitzero"`
}

// Store is the bbolt-backed metadata store.
type Store struct {
	db *bolt.DB
}

// Open opens (creating if needed) the database file at path, mode 0600. It
// fails after a second when another process holds the file.
func Open(path string) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("store: %s is in use by another process", path)
		}
		return nil, fmt.Errorf("store: %w", err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketKeys, bucketKids, bucketIntents} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("store: %w", err)
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

func dbKey(tenant, name string) []byte {
	return append(append([]byte(tenant), 0), name...)
}

// encode checks a record as decode will and marshals it.
func encode(k Key) ([]byte, error) {
	k.Schema = schemaVersion
	if err := k.check(); err != nil {
		return nil, fmt.Errorf("store: %s/%s: %w", k.Tenant, k.Name, err)
	}
	v, err := json.Marshal(k)
	if err != nil {
		return nil, fmt.Errorf("store: encode %s/%s: %w", k.Tenant, k.Name, err)
	}
	return v, nil
}

func (k Key) check() error {
	if k.Schema != schemaVersion {
		return fmt.Errorf("schema version: got %d, want %d", k.Schema, schemaVersion)
	}
	if k.Name == "" || len(k.Versions) == 0 {
		return errors.New("incomplete record")
	}
	return nil
}

// CreateKey stores a new key; ErrAlreadyExists if (tenant, name) is taken.
func (s *Store) CreateKey(k Key) error {
	v, err := encode(k)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketKeys)
		id := dbKey(k.Tenant, k.Name)
		if b.Get(id) != nil {
			return broker.ErrAlreadyExists
		}
		if err := registerKids(tx, k); err != nil {
			return err
		}
		return b.Put(id, v)
	})
}

// UpdateKey replaces an existing key; ErrNotFound if it is absent.
func (s *Store) UpdateKey(k Key) error {
	v, err := encode(k)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketKeys)
		id := dbKey(k.Tenant, k.Name)
		if b.Get(id) == nil {
			return broker.ErrNotFound
		}
		if err := registerKids(tx, k); err != nil {
			return err
		}
		return b.Put(id, v)
	})
}

// registerKids records k's kids, refusing one that another version owns.
func registerKids(tx *bolt.Tx, k Key) error {
	b := tx.Bucket(bucketKids)
	for _, v := range k.Versions {
		owner := fmt.Appendf(dbKey(k.Tenant, k.Name), "\x00%d", v.Version)
		switch got := b.Get([]byte(v.Kid)); {
		case got == nil:
			if err := b.Put([]byte(v.Kid), owner); err != nil {
				return err
			}
		case !bytes.Equal(got, owner):
			return fmt.Errorf("%w: %s", ErrKidReused, v.Kid)
		}
	}
	return nil
}

// Keys returns every stored key, ordered by tenant and name.
func (s *Store) Keys() ([]Key, error) {
	var keys []Key
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketKeys).ForEach(func(id, v []byte) error {
			k, err := decode(v)
			if err != nil {
				return fmt.Errorf("store: record %q: %w", bytes.ReplaceAll(id, []byte{0}, []byte("/")), err)
			}
			keys = append(keys, k)
			return nil
		})
	})
	return keys, err
}

func decode(v []byte) (Key, error) {
	var k Key
	if err := json.Unmarshal(v, &k); err != nil {
		return Key{}, err
	}
	if err := k.check(); err != nil {
		return Key{}, err
	}
	return k, nil
}

// Index returns the index of version n in k.Versions, or -1.
func (k Key) Index(n uint32) int {
	for i, v := range k.Versions {
		if v.Version == n {
			return i
		}
	}
	return -1
}

// InState returns the index of the first version in state s, or -1.
func (k Key) InState(s broker.State) int {
	for i, v := range k.Versions {
		if v.State == s {
			return i
		}
	}
	return -1
}

// NextVersion is the number the next version gets: one more than any
// version ever recorded, so numbers (like kids) are never reused.
func (k Key) NextVersion() uint32 {
	var n uint32
	for _, v := range k.Versions {
		n = max(n, v.Version)
	}
	return n + 1
}

// Clone returns a copy whose Versions can be changed without touching k.
func (k Key) Clone() Key {
	k.Versions = append([]Version(nil), k.Versions...)
	return k
}

// Intent is a hardware object this store is about to create: recorded
// before the backend generates it, removed once the object is recorded in
// a key (or destroyed). After a crash in between, an intent is how the
// keyring tells its own unrecorded object from the objects of another
// store on the same token, which it must never touch.
type Intent struct {
	Tenant  string        `json:"tenant"`
	Handle  broker.Handle `json:"handle"` // the object ID chosen before generation
	Label   string        `json:"label"`
	Created time.Time     `json:"created"`
}

func intentKey(tenant string, h broker.Handle) []byte {
	return append(append([]byte(tenant), 0), h...)
}

// PutIntent records in before its object is generated.
func (s *Store) PutIntent(in Intent) error {
	v, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("store: encode intent: %w", err)
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIntents).Put(intentKey(in.Tenant, in.Handle), v)
	})
}

// DeleteIntent removes the intent for (tenant, h), if there is one.
func (s *Store) DeleteIntent(tenant string, h broker.Handle) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIntents).Delete(intentKey(tenant, h))
	})
}

// Intents returns every intent recorded.
func (s *Store) Intents() ([]Intent, error) {
	var out []Intent
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIntents).ForEach(func(_, v []byte) error {
			var in Intent
			if err := json.Unmarshal(v, &in); err != nil {
				return fmt.Errorf("store: intent: %w", err)
			}
			out = append(out, in)
			return nil
		})
	})
	return out, err
}
