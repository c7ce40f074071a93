package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/keybroker/keybroker/internal/broker"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/daemon"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/softhsm"
)

const (
	devTokenLabel = "keybroker-dev"
	devKey        = "demo"
	devTenant     = "dev"
)

// devEnv is dev mode's SoftHSM2 token and directory.
type devEnv struct {
	dir   string
	token *softhsm.Token
}

// provisionDev creates (or reuses) the dev token under dir.
func provisionDev(dir string) (*devEnv, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
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
	cfg.StateDir = filepath.Join(e.dir, "state")
	cfg.PKCS11.Module = e.token.ModulePath
	cfg.PKCS11.TokenLabel = e.token.Label
	cfg.PKCS11.PINFile = e.token.PINFile
	cfg.PKCS11.SoftHSM2Conf = e.token.ConfigPath
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
	if errors.Is(err, broker.ErrNotFound) {
		k, err = ring.CreateKey(ctx, tenant, devKey, broker.KeySpec{Alg: broker.ES256}, broker.Policy{})
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
keybroker dev mode — SoftHSM2 token %q under %s

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

`, e.token.Label, e.dir, sock, k.Name, k.Alg, state, k.ActiveVersion, pk.Kid, jwk, sock, devKey, sock, devKey, sock)
	return nil
}
