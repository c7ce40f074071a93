package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/tpm"
)

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
