package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/daemon"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm"
)

const (
	devTokenLabel = "keybroker-dev"
	devKey        = "demo"
	devTenant     = "dev"
)

// devEnv is dev mode's directory and SoftHSM2 token (or swtpm socket).
type devEnv struct {
	dir   string
	token *softhsm.Token // nil with the TPM backend
}

// DevSwtpmSocket is where dev mode expects swtpm (scripts/dev-run.sh
// starts it there for `make run BACKEND=tpm`), relative to the dev dir.
const DevSwtpmSocket = "swtpm/swtpm.sock"

// provisionDev creates (or reuses) the dev token under dir; with the TPM
// backend there is nothing to provision.
func provisionDev(dir, backend string) (*devEnv, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if backend == "tpm" {
		return &devEnv{dir: abs}, nil
	}
	tok, err := softhsm.Provision(filepath.Join(abs, "softhsm"), devTokenLabel)
	if err != nil {
		return nil, err
	}
	return &devEnv{dir: abs, token: tok}, nil
}

func (e *devEnv) config() config.Config {
	cfg := config.Default()
	cfg.Socket = filepath.Join(e.dir, "keybroker.sock")
	if e.token == nil {
		cfg.Backend = "tpm"
		cfg.TPM.Device, cfg.TPM.Socket = "", filepath.Join(e.dir, DevSwtpmSocket)
		cfg.StateDir = filepath.Join(e.dir, "state-tpm")
	} else {
		cfg.StateDir = filepath.Join(e.dir, "state")
		cfg.PKCS11.Module = e.token.ModulePath
		cfg.PKCS11.TokenLabel = e.token.Label
		cfg.PKCS11.PINFile = e.token.PINFile
		cfg.PKCS11.SoftHSM2Conf = e.token.ConfigPath
	}
	cfg.Log.Format = "text"
	// The current user is the dev tenant, with both roles.
	cfg.Tenants = []config.Tenant{{
		Name:       devTenant,
		Identities: config.Identities{UIDs: []uint32{uint32(os.Getuid())}},
		Roles:      []string{config.RoleSigner, config.RoleAdmin},
	}}
	return cfg
}

// welcome creates the demo key if it is missing and prints how to use it.
func (e *devEnv) welcome(ctx context.Context, d *daemon.Daemon, cfg config.Config, w io.Writer) error {
	ring := d.Keyring()
	tenant := devTenant
	k, err := ring.GetKey(ctx, tenant, devKey)
	created := false
	if errors.Is(err, kms.ErrNotFound) {
		k, err = ring.CreateKey(ctx, tenant, devKey, kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
		created = true
	}
	if err != nil {
		return err
	}
	pk, err := ring.PublicKey(ctx, tenant, devKey, keyring.VersionRef{})
	if err != nil {
		return err
	}
	jwk, err := json.Marshal(pk.JWK)
	if err != nil {
		return err
	}
	state := "existing"
	if created {
		state = "new"
	}
	sock := cfg.Socket
	fmt.Fprintf(w, `
keybroker dev mode — %s under %s

  socket      %s
  key         %s (%s, %s key, version %d)
  thumbprint  %s
  jwk         %s

Try, in another terminal:

  export KEYBROKER_SOCKET=%s
  bin/keybrokerctl keys list
  bin/keybrokerctl sign %s --digest $(printf hello | sha256sum | cut -d' ' -f1) --format jose
  bin/keybrokerctl jwks
  grpcurl -plaintext -unix %s list
  grpcurl -plaintext -unix -d '{"name":"%s"}' %s keybroker.v1.KeyBroker/GetPublicKey

Stop with Ctrl-C; the next 'make run' reuses the token and its keys.

`, e.what(), e.dir, sock, k.Name, k.Alg, state, k.ActiveVersion, pk.Kid, jwk, sock, devKey, sock, devKey, sock)
	return nil
}

func (e *devEnv) what() string {
	if e.token == nil {
		return "swtpm (TPM 2.0 simulator)"
	}
	return fmt.Sprintf("SoftHSM2 token %q", e.token.Label)
}
