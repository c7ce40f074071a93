package store

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keybroker/keybroker/kms"
)

// openStore opens a store in a fresh directory and closes it when the test
// ends. It returns the store and its file's path.
func openStore(t testing.TB) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keybroker.db")
	s, err := Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

var t0 = time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)

// testKey is a key with every field set to a value that is not its zero.
func testKey(tenant, name string) Key {
	return Key{
		Tenant:  tenant,
		Name:    name,
		Alg:     kms.PS256,
		Bits:    3072,
		Backend: "pkcs11",
		Created: t0,
		Versions: []Version{
			{
				Version:   1,
				Kid:       "kid-1-" + tenant + "-" + name,
				State:     kms.StateRetired,
				Handle:    kms.Handle{0x00, 0x01, 0xfe, 0xff, 0x10},
				PublicKey: []byte{0x30, 0x82, 0x01, 0x22, 0x00, 0xff},
				Created:   t0,
			},
			{
				Version:   2,
				Kid:       "kid-2-" + tenant + "-" + name,
				State:     kms.StateActive,
				Handle:    kms.Handle("\x00handle\xff"),
				PublicKey: []byte{0x30, 0x59, 0x01},
				Created:   t0.Add(36 * time.Hour),
			},
		},
	}
}

// equalKeys fails unless got and want are the same keys in the same order.
// Times are compared with Equal; Schema is expected to be set by the store.
func equalKeys(t testing.TB, got, want []Key) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d keys %v, want %d", len(got), names(got), len(want))
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Schema != schemaVersion {
			t.Errorf("key %d: Schema %d, want %d", i, g.Schema, schemaVersion)
		}
		if !g.Created.Equal(w.Created) {
			t.Errorf("key %d: Created %v, want %v", i, g.Created, w.Created)
		}
		if len(g.Versions) != len(w.Versions) {
			t.Errorf("key %d: %d versions, want %d", i, len(g.Versions), len(w.Versions))
			continue
		}
		for j := range w.Versions {
			gv, wv := g.Versions[j], w.Versions[j]
			if !gv.Created.Equal(wv.Created) {
				t.Errorf("key %d version %d: Created %v, want %v", i, j, gv.Created, wv.Created)
			}
			gv.Created, wv.Created = time.Time{}, time.Time{}
			if !reflect.DeepEqual(gv, wv) {
				t.Errorf("key %d version %d:\n got %+v\nwant %+v", i, j, gv, wv)
			}
		}
		g.Schema, w.Schema = 0, 0
		g.Created, w.Created = time.Time{}, time.Time{}
		g.Versions, w.Versions = nil, nil
		if !reflect.DeepEqual(g, w) {
			t.Errorf("key %d:\n got %+v\nwant %+v", i, g, w)
		}
	}
}

func names(keys []Key) []string {
	var out []string
	for _, k := range keys {
		out = append(out, k.Tenant+"/"+k.Name)
	}
	return out
}

func keys(t testing.TB, s *Store) []Key {
	t.Helper()
	ks, err := s.Keys()
	if err != nil {
		t.Fatalf("Keys: %v", err)
	}
	return ks
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

func TestOpenEmpty(t *testing.T) {
	s, _ := openStore(t)
	if ks := keys(t, s); len(ks) != 0 {
		t.Errorf("new store has keys %v", names(ks))
	}
}

func TestOpenBadPath(t *testing.T) {
	_, err := Open(filepath.Join(t.TempDir(), "no", "such", "dir", "keybroker.db"))
	if err == nil || !strings.HasPrefix(err.Error(), "store: ") {
		t.Errorf("Open in a missing directory: got %v, want a store: error", err)
	}
}

func TestCreateKeyRoundTrip(t *testing.T) {
	s, _ := openStore(t)
	want := testKey("t1", "signing")
	if err := s.CreateKey(want); err != nil {
		t.Fatalf("CreateKey: %v", err)
	}
	equalKeys(t, keys(t, s), []Key{want})
}

// TestRecordFormat reads the raw record: enums are stored by name, handles
// and public keys as base64, and the schema version is set.
func TestRecordFormat(t *testing.T) {
	s, path := openStore(t)
	k := testKey("t1", "signing")
	if err := s.CreateKey(k); err != nil {
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
	}
}

// TestCreateKeyOverwritesSchema: the store sets the schema, whatever the
// caller passed.
func TestCreateKeyOverwritesSchema(t *testing.T) {
	s, _ := openStore(t)
	k := testKey("t1", "k")
	k.Schema = 99
	if err := s.CreateKey(k); err != nil {
		t.Fatal(err)
	}
	if got := keys(t, s)[0].Schema; got != schemaVersion {
		t.Errorf("Schema %d, want %d", got, schemaVersion)
	}
}

func TestCreateKeyDuplicate(t *testing.T) {
	s, _ := openStore(t)
	first := testKey("t1", "k")
	if err := s.CreateKey(first); err != nil {
		t.Fatal(err)
	}
	second := testKey("t1", "k")
	second.Alg, second.Bits = kms.ES256, 0
	err := s.CreateKey(second)
	if !errors.Is(err, kms.ErrAlreadyExists) {
		t.Fatalf("second CreateKey: got %v, want ErrAlreadyExists", err)
	}
	// The first record is untouched.
	equalKeys(t, keys(t, s), []Key{first})

	// The same name in another tenant is a different key.
	other := testKey("t2", "k")
	if err := s.CreateKey(other); err != nil {
		t.Fatalf("CreateKey in another tenant: %v", err)
	}
	equalKeys(t, keys(t, s), []Key{first, other})
}

func TestUpdateKey(t *testing.T) {
	s, _ := openStore(t)
	k := testKey("t1", "k")
	if err := s.UpdateKey(k); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("UpdateKey of a missing key: got %v, want ErrNotFound", err)
	}
	if ks := keys(t, s); len(ks) != 0 {
		t.Fatalf("failed UpdateKey created %v", names(ks))
	}

	if err := s.CreateKey(k); err != nil {
		t.Fatal(err)
	}
	other := testKey("t2", "k")
	if err := s.CreateKey(other); err != nil {
		t.Fatal(err)
	}

	updated := testKey("t1", "k")
	updated.Versions[1].State = kms.StateRetired
	updated.Versions = append(updated.Versions, Version{
		Version: 3, Kid: "kid-3", State: kms.StatePending,
		Handle: kms.Handle{3}, PublicKey: []byte{3, 3}, Created: t0.Add(72 * time.Hour),
	})
	if err := s.UpdateKey(updated); err != nil {
		t.Fatalf("UpdateKey: %v", err)
	}
	// Replaced, not merged; the other tenant's key is untouched.
	equalKeys(t, keys(t, s), []Key{updated, other})

	// A missing name in an existing tenant, and an existing name in a
	// missing tenant, are both not found.
	for _, k := range []Key{testKey("t1", "nope"), testKey("t3", "k")} {
		if err := s.UpdateKey(k); !errors.Is(err, kms.ErrNotFound) {
			t.Errorf("UpdateKey(%s/%s): got %v, want ErrNotFound", k.Tenant, k.Name, err)
		}
	}
	equalKeys(t, keys(t, s), []Key{updated, other})
}

func TestKeysSurviveReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keybroker.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	a, b := testKey("t1", "a"), testKey("t1", "b")
	for _, k := range []Key{a, b} {
		if err := s.CreateKey(k); err != nil {
			s.Close()
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(path)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	equalKeys(t, keys(t, s), []Key{a, b})
	// Still duplicate-checked after the reopen.
	if err := s.CreateKey(a); !errors.Is(err, kms.ErrAlreadyExists) {
		t.Errorf("CreateKey after reopen: got %v, want ErrAlreadyExists", err)
	}
}

func TestOpenWhileInUse(t *testing.T) {
	_, path := openStore(t)
	start := time.Now()
	s2, err := Open(path)
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

func TestKeysOrder(t *testing.T) {
	s, _ := openStore(t)
	// Tenants and names chosen so that sorting the joined "tenant/name"
	// strings, or names alone, would give another order.
	in := []Key{
		testKey("b", "a"),
		testKey("a-x", "a"),
		testKey("a", "z"),
		testKey("a", "b.2"),
		testKey("ab", "0"),
		testKey("a", "b"),
		testKey("a", "b-1"),
	}
	for _, k := range in {
		if err := s.CreateKey(k); err != nil {
			t.Fatalf("CreateKey(%s/%s): %v", k.Tenant, k.Name, err)
		}
	}
	want := []string{"a/b", "a/b-1", "a/b.2", "a/z", "a-x/a", "ab/0", "b/a"}
	got := keys(t, s)
	if !reflect.DeepEqual(names(got), want) {
		t.Fatalf("Keys order: got %v, want %v", names(got), want)
	}
	// Each record is its own key, not a neighbour's.
	for _, k := range got {
		if k.Versions[0].Kid != "kid-1-"+k.Tenant+"-"+k.Name {
			t.Errorf("%s/%s carries kid %q", k.Tenant, k.Name, k.Versions[0].Kid)
		}
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
			err := s.db.Update(func(tx *bolt.Tx) error {
				return tx.Bucket(bucketKeys).Put([]byte("t1\x00k"), []byte(tc.record))
			})
			if err != nil {
				t.Fatal(err)
			}
			ks, err := s.Keys()
			if err == nil {
				t.Fatalf("Keys = %v, nil; want an error", names(ks))
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), `"t1/k"`) {
				t.Errorf("Keys: %q, want it to contain %q and name the record t1/k", err, tc.want)
			}
		})
	}
}
