package store_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/internal/store/storetest"

	bolt "go.etcd.io/bbolt"

	"github.com/keybroker/keybroker/kms"
)

// openStore opens a store in a fresh directory and closes it when the test
// ends. It returns the store and its file's path.
func openStore(t testing.TB) (*store.Bolt, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keybroker.db")
	s, err := store.Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

// TestConformance runs the store suite on bbolt.
func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		s, _ := openStore(t)
		return s
	})
}

func TestOpenCreatesFile0600(t *testing.T) {
	_, path := openStore(t)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if !fi.Mode().IsRegular() {
		t.Fatalf("%s is %v, want a regular file", path, fi.Mode())
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("mode %v, want 0600", perm)
	}
}

func TestOpenBadPath(t *testing.T) {
	_, err := store.Open(filepath.Join(t.TempDir(), "no", "such", "dir", "keybroker.db"))
	if err == nil || !strings.HasPrefix(err.Error(), "store: ") {
		t.Errorf("Open in a missing directory: got %v, want a store: error", err)
	}
}

// TestRecordFormat reads the raw record: enums are stored by name, handles
// and public keys as base64, and the schema version is set.
func TestRecordFormat(t *testing.T) {
	s, path := openStore(t)
	k := storetest.TestKey("t1", "signing")
	if _, err := s.CreateKey(ctx, k); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var raw []byte
	var ids [][]byte
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("keys"))
		if b == nil {
			return errors.New(`no "keys" bucket`)
		}
		return b.ForEach(func(id, v []byte) error {
			ids = append(ids, bytes.Clone(id))
			raw = bytes.Clone(v)
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != 1 || !bytes.Equal(ids[0], []byte("t1\x00signing")) {
		t.Fatalf("record ids %q, want [\"t1\\x00signing\"]", ids)
	}

	var m struct {
		Schema   json.RawMessage   `json:"schema"`
		Alg      json.RawMessage   `json:"alg"`
		Bits     json.RawMessage   `json:"bits"`
		Created  json.RawMessage   `json:"created"`
		Versions []json.RawMessage `json:"versions"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("record is not JSON: %v\n%s", err, raw)
	}
	for field, tc := range map[string]struct{ got, want string }{
		"schema":  {string(m.Schema), "1"},
		"alg":     {string(m.Alg), `"PS256"`},
		"bits":    {string(m.Bits), "3072"},
		"created": {string(m.Created), `"2025-03-14T15:09:26.535897932Z"`},
	} {
		if tc.got != tc.want {
			t.Errorf("record %s: got %s, want %s", field, tc.got, tc.want)
		}
	}
	if len(m.Versions) != 2 {
		t.Fatalf("record has %d versions, want 2:\n%s", len(m.Versions), raw)
	}
	for i, wantState := range []string{`"retired"`, `"active"`} {
		var v map[string]json.RawMessage
		if err := json.Unmarshal(m.Versions[i], &v); err != nil {
			t.Fatal(err)
		}
		if got := string(v["state"]); got != wantState {
			t.Errorf("version %d state: got %s, want %s", i, got, wantState)
		}
		wantHandle := `"` + base64.StdEncoding.EncodeToString(k.Versions[i].Handle) + `"`
		if got := string(v["handle"]); got != wantHandle {
			t.Errorf("version %d handle: got %s, want %s", i, got, wantHandle)
		}
		wantPub := `"` + base64.StdEncoding.EncodeToString(k.Versions[i].PublicKey) + `"`
		if got := string(v["public_key"]); got != wantPub {
			t.Errorf("version %d public_key: got %s, want %s", i, got, wantPub)
		}
		// A version's certificate chain: base64 DER, leaf first; absent
		// when there is none.
		var wantCerts string
		if certs := k.Versions[i].Certificates; len(certs) > 0 {
			wantCerts = `["` + base64.StdEncoding.EncodeToString(certs[0]) + `","` + base64.StdEncoding.EncodeToString(certs[1]) + `"]`
		}
		if got := string(v["certificates"]); got != wantCerts {
			t.Errorf("version %d certificates: got %s, want %s", i, got, wantCerts)
		}
	}
}

func TestKeysSurviveReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keybroker.db")
	s, err := store.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	a, b := storetest.TestKey("t1", "a"), storetest.TestKey("t1", "b")
	for _, k := range []store.Key{a, b} {
		if _, err := s.CreateKey(ctx, k); err != nil {
			s.Close()
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = store.Open(path)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	storetest.EqualKeys(t, storetest.Keys(t, s), []store.Key{a, b})
	// Still duplicate-checked after the reopen.
	if _, err := s.CreateKey(ctx, a); !errors.Is(err, kms.ErrAlreadyExists) {
		t.Errorf("CreateKey after reopen: got %v, want ErrAlreadyExists", err)
	}
}

func TestOpenWhileInUse(t *testing.T) {
	_, path := openStore(t)
	start := time.Now()
	s2, err := store.Open(path)
	elapsed := time.Since(start)
	if err == nil {
		s2.Close()
		t.Fatal("second Open of a file in use succeeded")
	}
	if !strings.Contains(err.Error(), "in use") || !strings.Contains(err.Error(), path) {
		t.Errorf("second Open: %q, want it to say %s is in use", err, path)
	}
	if elapsed > 2500*time.Millisecond {
		t.Errorf("second Open took %v to fail, want about a second at most", elapsed)
	}
}

// TestKeysRefusesBadRecords: a record from a newer schema or a broken one is
// reported, naming it, rather than misread.
func TestKeysRefusesBadRecords(t *testing.T) {
	for _, tc := range []struct {
		name   string
		record string
		want   string
	}{
		{"newer schema", `{"schema":2,"tenant":"t1","name":"k","alg":"ES256","versions":[{"version":1,"state":"active"}]}`, "schema version: got 2, want 1"},
		{"no schema", `{"tenant":"t1","name":"k","alg":"ES256","versions":[{"version":1,"state":"active"}]}`, "schema version: got 0, want 1"},
		{"no versions", `{"schema":1,"tenant":"t1","name":"k","alg":"ES256","versions":[]}`, "incomplete record"},
		{"bad alg", `{"schema":1,"tenant":"t1","name":"k","alg":"HS256","versions":[{"version":1,"state":"active"}]}`, "HS256"},
		{"bad state", `{"schema":1,"tenant":"t1","name":"k","alg":"ES256","versions":[{"version":1,"state":"gone"}]}`, "gone"},
		{"not json", `{`, "store: record"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openStore(t)
			err := s.DB().Update(func(tx *bolt.Tx) error {
				return tx.Bucket(store.BucketKeys).Put([]byte("t1\x00k"), []byte(tc.record))
			})
			if err != nil {
				t.Fatal(err)
			}
			ks, err := s.Keys(ctx)
			if err == nil {
				t.Fatalf("Keys = %v, nil; want an error", storetest.Names(ks))
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), `"t1/k"`) {
				t.Errorf("Keys: %q, want it to contain %q and name the record t1/k", err, tc.want)
			}
		})
	}
}

var ctx = context.Background()
