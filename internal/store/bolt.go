package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keybroker/keybroker/kms"
)

var (
	bucketKeys = []byte("keys")
	// bucketKids maps every kid ever recorded to its key version, so that
	// no kid is ever given to a second version, even after destruction.
	bucketKids = []byte("kids")
	// bucketIntents holds the hardware objects this store is about to
	// create (see Intent).
	bucketIntents = []byte("intents")
	// bucketRevs holds each key's revision, 8 bytes big-endian; a key
	// without one (written before revisions) is at revision 0.
	bucketRevs = []byte("revs")
)

// Bolt is the embedded store: a bbolt database in the state directory,
// for one daemon.
type Bolt struct {
	db *bolt.DB
}

var _ Store = (*Bolt)(nil)

// Open opens (creating if needed) the database file at path, mode 0600. It
// fails after a second when another process holds the file.
func Open(path string) (*Bolt, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("store: %s is in use by another process", path)
		}
		return nil, fmt.Errorf("store: %w", err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketKeys, bucketKids, bucketIntents, bucketRevs} {
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
	return &Bolt{db: db}, nil
}

// OpenExisting opens the database file at path, which must exist (a
// migration's source, not a new store).
func OpenExisting(path string) (*Bolt, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	return Open(path)
}

// Close closes the database.
func (s *Bolt) Close() error { return s.db.Close() }

func rev(tx *bolt.Tx, id []byte) int64 {
	if b := tx.Bucket(bucketRevs).Get(id); len(b) == 8 {
		return int64(binary.BigEndian.Uint64(b))
	}
	return 0
}

func putRev(tx *bolt.Tx, id []byte, r int64) error {
	return tx.Bucket(bucketRevs).Put(id, binary.BigEndian.AppendUint64(nil, uint64(r)))
}

// CreateKey stores a new key at revision 1; kms.ErrAlreadyExists if
// (tenant, name) is taken.
func (s *Bolt) CreateKey(_ context.Context, k Key) (int64, error) {
	v, err := Encode(k)
	if err != nil {
		return 0, err
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketKeys)
		id := dbKey(k.Tenant, k.Name)
		if b.Get(id) != nil {
			return kms.ErrAlreadyExists
		}
		if err := registerKids(tx, k); err != nil {
			return err
		}
		if err := putRev(tx, id, 1); err != nil {
			return err
		}
		return b.Put(id, v)
	})
	if err != nil {
		return 0, err
	}
	return 1, nil
}

// UpdateKey replaces the key at revision k.Rev.
func (s *Bolt) UpdateKey(_ context.Context, k Key) (int64, error) {
	v, err := Encode(k)
	if err != nil {
		return 0, err
	}
	next := k.Rev + 1
	err = s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketKeys)
		id := dbKey(k.Tenant, k.Name)
		if b.Get(id) == nil {
			return kms.ErrNotFound
		}
		if rev(tx, id) != k.Rev {
			return ErrConflict
		}
		if err := registerKids(tx, k); err != nil {
			return err
		}
		if err := putRev(tx, id, next); err != nil {
			return err
		}
		return b.Put(id, v)
	})
	if err != nil {
		return 0, err
	}
	return next, nil
}

// registerKids records k's kids, refusing one that another version owns.
func registerKids(tx *bolt.Tx, k Key) error {
	b := tx.Bucket(bucketKids)
	for _, v := range k.Versions {
		owner := KidOwner(k, v)
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
func (s *Bolt) Keys(context.Context) ([]Key, error) {
	var keys []Key
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketKeys).ForEach(func(id, v []byte) error {
			k, err := Decode(v)
			if err != nil {
				return fmt.Errorf("store: record %q: %w", bytes.ReplaceAll(id, []byte{0}, []byte("/")), err)
			}
			k.Rev = rev(tx, id)
			keys = append(keys, k)
			return nil
		})
	})
	return keys, err
}

// Key returns the key (tenant, name).
func (s *Bolt) Key(_ context.Context, tenant, name string) (Key, error) {
	var k Key
	err := s.db.View(func(tx *bolt.Tx) error {
		id := dbKey(tenant, name)
		v := tx.Bucket(bucketKeys).Get(id)
		if v == nil {
			return kms.ErrNotFound
		}
		var err error
		if k, err = Decode(v); err != nil {
			return fmt.Errorf("store: record %s/%s: %w", tenant, name, err)
		}
		k.Rev = rev(tx, id)
		return nil
	})
	return k, err
}

// PutIntent records in before its object is generated.
func (s *Bolt) PutIntent(_ context.Context, in Intent) error {
	v, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("store: encode intent: %w", err)
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIntents).Put(intentKey(in.Tenant, in.Handle), v)
	})
}

// DeleteIntent removes the intent for (tenant, h), if there is one.
func (s *Bolt) DeleteIntent(_ context.Context, tenant string, h kms.Handle) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIntents).Delete(intentKey(tenant, h))
	})
}

// Intents returns every intent recorded.
func (s *Bolt) Intents(context.Context) ([]Intent, error) {
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

// IntentLive is false: the one daemon that uses the file reconciles only
// when nothing is in progress (at start).
func (s *Bolt) IntentLive(context.Context, Intent) (bool, error) { return false, nil }
