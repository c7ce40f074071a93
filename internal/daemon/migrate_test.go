package daemon

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/internal/store/etcd"
	"github.com/keybroker/keybroker/internal/store/storetest"
	"github.com/keybroker/keybroker/internal/testetcd"
	"github.com/keybroker/keybroker/kms"
)

// TestMigrate: a bbolt store's keys land in an empty etcd prefix as they
// were (versions, kids, handles); a second migration into the now
// non-empty prefix is refused and changes nothing; a store with unsettled
// intents is refused.
func TestMigrate(t *testing.T) {
	ctx := context.Background()
	c := testetcd.Start(t, 1)
	path := filepath.Join(t.TempDir(), "keybroker.db")
	src, err := store.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	want := []store.Key{storetest.TestKey("a", "k1"), storetest.TestKey("b", "k2")}
	for _, k := range want {
		if _, err := src.CreateKey(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	src.Close()

	cfg := config.Default()
	cfg.Store.Backend, cfg.Store.Endpoints, cfg.Store.Prefix = "etcd", c.Endpoints(), "/migrated/"
	n, err := Migrate(ctx, path, cfg)
	if err != nil || n != 2 {
		t.Fatalf("Migrate = %d, %v; want 2, nil", n, err)
	}
	dst, err := etcd.Open(etcd.Config{Endpoints: c.Endpoints(), Prefix: "/migrated/"})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	storetest.EqualKeys(t, storetest.Keys(t, dst), want)
	// The kid registry came along: no other key may take a migrated kid.
	thief := storetest.TestKey("c", "k3")
	thief.Versions[0].Kid = want[0].Versions[0].Kid
	if _, err := dst.CreateKey(ctx, thief); !errors.Is(err, store.ErrKidReused) {
		t.Errorf("CreateKey with a migrated kid: %v, want ErrKidReused", err)
	}

	if _, err := Migrate(ctx, path, cfg); !errors.Is(err, ErrNotEmpty) {
		t.Errorf("second Migrate: %v, want ErrNotEmpty", err)
	}
	storetest.EqualKeys(t, storetest.Keys(t, dst), want)

	src, err = store.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := src.PutIntent(ctx, store.Intent{Tenant: "a", Handle: kms.Handle{1}}); err != nil {
		t.Fatal(err)
	}
	src.Close()
	cfg.Store.Prefix = "/other/"
	if _, err := Migrate(ctx, path, cfg); err == nil || !strings.Contains(err.Error(), "interrupted by a crash") {
		t.Errorf("Migrate of a store with intents: %v, want a refusal naming them", err)
	}
	if _, err := Migrate(ctx, filepath.Join(t.TempDir(), "missing.db"), cfg); err == nil {
		t.Error("Migrate from a missing file succeeded")
	}
}
