// Command benchsetup prepares what scripts/bench.sh (make bench) runs
// keybrokerd on. It is a benchmark helper, not part of the product.
//
//	benchsetup token DIR LABEL
//	    provisions a SoftHSM2 token under DIR and prints, as shell
//	    assignments, MODULE, CONF, LABEL and PIN_FILE.
//	benchsetup tenants DIR TENANTS KEYS_PER_TENANT
//	    provisions a token under DIR/hsm, creates TENANTS×KEYS_PER_TENANT
//	    ES256 keys (tenants t0000, t0001, ...; keys k00, k01, ...) in it
//	    and in the store DIR/state, exactly as the daemon's CreateKey
//	    would, and writes DIR/keybroker.yaml: tenant t0000 is the caller's
//	    uid on DIR/kb.sock, the others are mTLS subject CNs (the daemon
//	    only needs to resolve them; no TCP listener is configured).
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "benchsetup: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	switch {
	case len(args) == 3 && args[0] == "token":
		tok, err := softhsm.Provision(args[1], args[2])
		if err != nil {
			return err
		}
		fmt.Printf("MODULE=%q\nCONF=%q\nLABEL=%q\nPIN_FILE=%q\n", tok.ModulePath, tok.ConfigPath, tok.Label, tok.PINFile)
		return nil
	case len(args) == 4 && args[0] == "tenants":
		tenants, err := strconv.Atoi(args[2])
		if err != nil || tenants < 1 {
			return fmt.Errorf("TENANTS: got %q, want a positive number", args[2])
		}
		keys, err := strconv.Atoi(args[3])
		if err != nil || keys < 1 {
			return fmt.Errorf("KEYS_PER_TENANT: got %q, want a positive number", args[3])
		}
		return setupTenants(args[1], tenants, keys)
	}
	return fmt.Errorf("usage: benchsetup token DIR LABEL | benchsetup tenants DIR TENANTS KEYS_PER_TENANT")
}

func setupTenants(dir string, tenants, perTenant int) error {
	tok, err := softhsm.Provision(filepath.Join(dir, "hsm"), "bench-tenants")
	if err != nil {
		return err
	}
	if err := os.Setenv("SOFTHSM2_CONF", tok.ConfigPath); err != nil {
		return err
	}
	b, err := hsm.Open(hsm.Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 8, PoolWaitTimeout: time.Minute}, nil)
	if err != nil {
		return err
	}
	defer b.Close()
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o700); err != nil {
		return err
	}
	st, err := store.Open(filepath.Join(dir, "state", "keybroker.db"))
	if err != nil {
		return err
	}
	defer st.Close()
	ring, err := keyring.New(keyring.Options{Backend: b, BackendName: "pkcs11", Store: st})
	if err != nil {
		return err
	}
	start := time.Now()
	var next, done atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	total := int64(tenants * perTenant)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= total {
					return
				}
				tenant, name := fmt.Sprintf("t%04d", i/int64(perTenant)), fmt.Sprintf("k%02d", i%int64(perTenant))
				if _, err := ring.CreateKey(context.Background(), tenant, name, kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
					errs <- fmt.Errorf("%s/%s: %w", tenant, name, err)
					return
				}
				if n := done.Add(1); n%1000 == 0 {
					fmt.Fprintf(os.Stderr, "benchsetup: %d/%d keys (%s)\n", n, total, time.Since(start).Round(time.Second))
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}

	var c strings.Builder
	fmt.Fprintf(&c, "socket: %s\nstate_dir: %s\nbackend: pkcs11\n", filepath.Join(dir, "kb.sock"), filepath.Join(dir, "state"))
	fmt.Fprintf(&c, "pkcs11:\n  module: %s\n  token_label: %s\n  pin_file: %s\n  softhsm2_conf: %s\n", tok.ModulePath, tok.Label, tok.PINFile, tok.ConfigPath)
	fmt.Fprintf(&c, "log:\n  level: warn\ntenants:\n")
	for t := range tenants {
		fmt.Fprintf(&c, "  - name: t%04d\n    roles: [signer, admin]\n", t)
		if t == 0 {
			fmt.Fprintf(&c, "    identities: {uids: [%d]}\n", os.Getuid())
		} else {
			fmt.Fprintf(&c, "    identities: {common_names: [t%04d.bench]}\n", t)
		}
	}
	return os.WriteFile(filepath.Join(dir, "keybroker.yaml"), []byte(c.String()), 0o600)
}
