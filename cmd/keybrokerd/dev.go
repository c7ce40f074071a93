package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

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
	// devJWKSAddress is where dev mode publishes the dev tenant's JWKS
	// (--jwks-address overrides it).
	devJWKSAddress = "127.0.0.1:8443"
	// devJWKSDir holds the JWKS listener's self-signed certificate and
	// key, relative to the dev dir: a TLS server key, not a PoP key, so
	// it lives in a file.
	devJWKSDir = "jwks-tls"
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
	if err := ensureDevCert(filepath.Join(abs, devJWKSDir), time.Now()); err != nil {
		return nil, fmt.Errorf("JWKS certificate: %w", err)
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
	// The current user is the dev tenant, with both roles; its JWKS is
	// published over HTTPS.
	cfg.Tenants = []config.Tenant{{
		Name:        devTenant,
		Identities:  config.Identities{UIDs: []uint32{uint32(os.Getuid())}},
		Roles:       []string{config.RoleSigner, config.RoleAdmin},
		PublishJWKS: true,
	}}
	cfg.JWKS.Address = devJWKSAddress
	cfg.JWKS.CertFile, cfg.JWKS.KeyFile = devCertPaths(filepath.Join(e.dir, devJWKSDir))
	return cfg
}

// devCertPaths are the dev JWKS certificate and key files in dir.
func devCertPaths(dir string) (cert, key string) {
	return filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
}

// devCertValidity is how long a dev JWKS certificate is made for; one
// within a day of its end is made again.
const devCertValidity = 365 * 24 * time.Hour

// ensureDevCert makes, in dir, a self-signed ECDSA P-256 certificate for
// 127.0.0.1, ::1 and localhost with its key, unless a usable one is there
// (so that a client pinned to it with curl --cacert keeps working).
func ensureDevCert(dir string, now time.Time) error {
	certFile, keyFile := devCertPaths(dir)
	if pair, err := tls.LoadX509KeyPair(certFile, keyFile); err == nil && pair.Leaf != nil && now.Add(24*time.Hour).Before(pair.Leaf.NotAfter) {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return err
	}
	// Its own issuer, so it is the CA a client trusts (curl --cacert).
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "keybroker dev JWKS"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(devCertValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	// The key first: a certificate without its key is never left behind.
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
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
	jwksURL := "https://" + cfg.JWKS.Address + "/tenants/" + tenant + "/jwks.json"
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

The dev tenant's JWKS, over HTTPS:

  jwks url    %s
  curl --cacert %s %s

Stop with Ctrl-C; the next 'make run' reuses the token and its keys.

`, e.what(), e.dir, sock, k.Name, k.Alg, state, k.ActiveVersion, pk.Kid, jwk, sock, devKey, sock, devKey, sock,
		jwksURL, cfg.JWKS.CertFile, jwksURL)
	return nil
}

func (e *devEnv) what() string {
	if e.token == nil {
		return "swtpm (TPM 2.0 simulator)"
	}
	return fmt.Sprintf("SoftHSM2 token %q", e.token.Label)
}
