// Package store is keybroker's metadata store: an embedded bbolt database in
// the state directory holding every key, its versions, states and backend
// handles. Each write is one transaction. The hardware is the authority on
// what exists; the store on what it means. The keyring reads and writes it;
// the daemon opens it, and the benchmark setup fills it.
package store

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/rotation"
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

// Key and Version are the stored records: rotation's, which decides their
// transitions (see docs/design.md "Key model and rotation").
type (
	Key     = rotation.Key
	Version = rotation.Version
)

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
			return kms.ErrAlreadyExists
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
			return kms.ErrNotFound
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
	if err := check(k); err != nil {
		return Key{}, err
	}
	return k, nil
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
}

func intentKey(tenant string, h kms.Handle) []byte {
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
func (s *Store) DeleteIntent(tenant string, h kms.Handle) error {
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
