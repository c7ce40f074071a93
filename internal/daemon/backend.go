package daemon

// Opening the backend: the TPM, or the shared PKCS#11 token and each
// tenant's own.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/tpm"
)

// openBackend opens the TPM, or the shared token and each tenant's own
// token.
func openBackend(cfg config.Config, log *slog.Logger) (b kms.Backend, err error) {
	if cfg.Backend == "tpm" {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("state dir: %w", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 4*cfg.TPM.Timeout)
		defer cancel()
		return openTPM(ctx, cfg, log)
	}
	if cfg.PKCS11.SoftHSM2Conf != "" {
		// Read by libsofthsm2 in C_Initialize.
		if err := os.Setenv("SOFTHSM2_CONF", cfg.PKCS11.SoftHSM2Conf); err != nil {
			return nil, err
		}
	}
	open := func(label, pinFile string) (*hsm.Backend, error) {
		pin, err := config.ReadPIN(pinFile)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrConfig, err)
		}
		b, err := hsm.Open(hsm.Config{
			ModulePath:      cfg.PKCS11.Module,
			TokenLabel:      label,
			PIN:             pin,
			MaxSessions:     cfg.PKCS11.MaxSessions,
			PoolWaitTimeout: cfg.PKCS11.PoolWaitTimeout,
		}, log)
		if errors.Is(err, hsm.ErrPINRefused) {
			return nil, fmt.Errorf("pkcs11 token %q: %w (not retrying: PIN counters lock): %w", label, ErrPINRefused, err)
		}
		if errors.Is(err, hsm.ErrModule) {
			// The module's own files are at fault: a restart cannot help.
			why := softhsmDiagnosis(cfg.PKCS11.Module)
			if why == "" {
				why = "check that the daemon's user can read the module and its configuration and storage"
			}
			return nil, fmt.Errorf("%w: pkcs11 module %s: %w: %s", ErrConfig, cfg.PKCS11.Module, err, why)
		}
		if err != nil {
			return nil, fmt.Errorf("pkcs11 token %q: %w", label, err)
		}
		return b, nil
	}
	shared, err := open(cfg.PKCS11.TokenLabel, cfg.PKCS11.PINFile)
	if err != nil {
		return nil, err
	}
	r := &kms.Router{Shared: shared, ByTenant: map[string]kms.Backend{}}
	defer func() {
		if err != nil {
			r.Close()
		}
	}()
	for _, t := range cfg.Tenants {
		if t.PKCS11 == nil {
			continue
		}
		openOwn := func() (*hsm.Backend, error) { return open(t.PKCS11.TokenLabel, t.PKCS11.PINFile) }
		own, err := openOwn()
		switch {
		case errors.Is(err, ErrPINRefused) || errors.Is(err, ErrConfig):
			return nil, fmt.Errorf("tenant %s: %w", t.Name, err)
		case err != nil:
			// Not there yet: the other tenants need not wait for it.
			r.ByTenant[t.Name] = newLateToken(t.Name, openOwn, err, log)
		default:
			r.ByTenant[t.Name] = own
		}
	}
	return r, nil
}

func openTPM(ctx context.Context, cfg config.Config, log *slog.Logger) (kms.Backend, error) {
	b, err := tpm.Open(ctx, tpm.Config{
		Device:   cfg.TPM.Device,
		Socket:   cfg.TPM.Socket,
		Address:  cfg.TPM.Address,
		StateDir: filepath.Join(cfg.StateDir, "tpm"),
		Timeout:  cfg.TPM.Timeout,
	}, log)
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	return b, nil
}
