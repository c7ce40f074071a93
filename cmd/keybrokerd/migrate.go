package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/daemon"
)

// runMigrate is `keybrokerd migrate --from-bbolt PATH --to-config FILE`:
// a single daemon's store copied into an empty etcd prefix.
func runMigrate(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("keybrokerd migrate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	from := fs.String("from-bbolt", "", "the single daemon's store `file` (STATE_DIR/keybroker.db; stop that daemon first)")
	to := fs.String("to-config", "", "the replicas' configuration `file` (store.backend etcd); its prefix must be empty")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: keybrokerd migrate --from-bbolt FILE --to-config FILE\n\nCopy a single daemon's keys into an empty etcd prefix, for replicas.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return exitUsage
	}
	if *from == "" || *to == "" || fs.NArg() > 0 {
		fs.Usage()
		return exitUsage
	}
	cfg, err := config.Load(*to)
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		fmt.Fprintf(stderr, "keybrokerd migrate: %v\n", err)
		return exitConfig
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	n, err := daemon.Migrate(ctx, *from, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "keybrokerd migrate: %v\n", err)
		if errors.Is(err, daemon.ErrConfig) {
			return exitConfig
		}
		return exitFailure
	}
	fmt.Fprintf(stdout, "copied %d keys from %s to etcd prefix %s\n", n, *from, cfg.Store.Prefix)
	return 0
}
