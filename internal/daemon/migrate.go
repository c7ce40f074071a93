package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/store"
)

// ErrNotEmpty: a migration's target already holds a store.
var ErrNotEmpty = errors.New("the etcd prefix is not empty: refusing to merge two stores")

// Migrate copies a single daemon's bbolt store (stopped: the file is
// locked while it runs) into the etcd store that cfg names, which must be
// empty. Every key keeps its versions, states, kids and handles; the kid
// registry is rebuilt from them. A store with creation intents (a crash
// not yet settled) is refused: start that daemon once first. It returns
// the number of keys copied.
func Migrate(ctx context.Context, fromBbolt string, cfg config.Config) (int, error) {
	if cfg.Store.Backend != "etcd" {
		return 0, fmt.Errorf("%w: the target configuration's store.backend is %q, want etcd", ErrConfig, cfg.Store.Backend)
	}
	src, err := store.OpenExisting(fromBbolt)
	if err != nil {
		return 0, err
	}
	defer src.Close()
	keys, err := src.Keys(ctx)
	if err != nil {
		return 0, err
	}
	intents, err := src.Intents(ctx)
	if err != nil {
		return 0, err
	}
	if len(intents) > 0 {
		return 0, fmt.Errorf("%s records %d key creations interrupted by a crash: start the daemon on it once (it settles them), stop it, then migrate", fromBbolt, len(intents))
	}
	_, dst, err := openStore(cfg)
	if err != nil {
		return 0, err
	}
	defer dst.Close()
	empty, err := dst.IsEmpty(ctx)
	if err != nil {
		return 0, err
	}
	if !empty {
		return 0, fmt.Errorf("%s: %w", cfg.Store.Prefix, ErrNotEmpty)
	}
	for i, k := range keys {
		if _, err := dst.CreateKey(ctx, k); err != nil {
			return i, fmt.Errorf("copying %s/%s (%d of %d copied; empty the prefix before trying again): %w", k.Tenant, k.Name, i, len(keys), err)
		}
	}
	return len(keys), nil
}
