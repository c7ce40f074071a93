// Package tpm is keybroker's TPM 2.0 backend, built on go-tpm's tpm2
// package. Signing keys are generated inside the TPM under a per-tenant
// storage parent and leave it only as blobs wrapped by that parent; the
// kms.Handle the store persists is such a blob plus the key's auth
// value (see handle.go). It is usable as a library through kms.Backend
// and, by type assertion, kms.Attester.
//
// One connection carries every command, one at a time, each bounded by a
// deadline; a broken connection is reopened by the next call, which also
// reloads what it needs, so a TPM (or swtpm) that restarts is usable again
// without restarting the daemon. At every (re)connection the backend
// flushes leftover transient objects and sessions and checks that the
// storage root key is still the one pinned in the state directory; if it is
// not, the TPM was cleared or replaced and every operation fails with
// ErrDataLoss (see there for the operator's reset).
//
// The owner hierarchy must have an empty auth value (the default, and what
// the kernel and tpm2-tss assume), as the SRK and the attestation key are
// primaries there.
package tpm

import (
	"container/list"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
)

// Defaults for Config.
const (
	DefaultTimeout       = 30 * time.Second
	DefaultKeyGenTimeout = 2 * time.Minute
	// DefaultLoadedObjects is the number of transient objects the TPM
	// guarantees (TPM_PT_HR_TRANSIENT_MIN on PC Client TPMs and swtpm).
	DefaultLoadedObjects = 3
)

// Config selects the TPM and bounds the backend's use of it.
type Config struct {
	// Exactly one of Device, Socket and Address names the TPM.
	//
	// Device is a TPM character device, normally the kernel resource
	// manager /dev/tpmrm0 (not /dev/tpm0, which allows one opener and no
	// resource management). Device files have no read deadlines: a command
	// that hangs is abandoned at its deadline on a goroutine the kernel's
	// own TPM timeouts release later.
	Device string
	// Socket is the unix socket of swtpm (--server type=unixio).
	Socket string
	// Address is the host:port of swtpm's TCP server (--server type=tcp).
	// It speaks TPM commands only: no mssim platform commands are sent.
	Address string
	// StateDir is where the SRK Name is pinned and the tenants' parent
	// blobs are kept.
	StateDir string
	// Timeout bounds each TPM command; a TPM that does not answer in time
	// is reported unavailable and the connection is reopened. 0 means
	// DefaultTimeout.
	Timeout time.Duration
	// KeyGenTimeout bounds the TPM2_Create of an RSA key, which takes
	// seconds to tens of seconds on hardware TPMs (prime search). 0 means
	// DefaultKeyGenTimeout; never less than Timeout.
	KeyGenTimeout time.Duration
	// LoadedObjects is the most transient objects the backend keeps
	// loaded at once (at least 3: the SRK, a parent and a key). 0 means
	// DefaultLoadedObjects.
	LoadedObjects int
}

func (c Config) withDefaults() (Config, error) {
	n := 0
	for _, s := range []string{c.Device, c.Socket, c.Address} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return c, fmt.Errorf("tpm: config: got %d of device, socket and address, want exactly one", n)
	}
	if c.StateDir == "" {
		return c, errors.New("tpm: config: state dir must be set")
	}
	if c.Timeout < 0 || c.KeyGenTimeout < 0 || c.LoadedObjects < 0 {
		return c, errors.New("tpm: config: timeouts and loaded objects must not be negative")
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.KeyGenTimeout == 0 {
		c.KeyGenTimeout = DefaultKeyGenTimeout
	}
	c.KeyGenTimeout = max(c.KeyGenTimeout, c.Timeout)
	if c.LoadedObjects == 0 {
		c.LoadedObjects = DefaultLoadedObjects
	}
	if c.LoadedObjects < 3 {
		return c, fmt.Errorf("tpm: config: loaded objects: got %d, want at least 3", c.LoadedObjects)
	}
	return c, nil
}

// Backend is a kms.Backend on one TPM 2.0. It is safe for concurrent
// use; commands reach the TPM one at a time.
type Backend struct {
	cfg Config
	log *slog.Logger

	// sem is the one lock around the connection and everything below; a
	// channel so that waiting for it honours the caller's context.
	sem chan struct{}
	// inflight is the command sent and not answered yet, or nil; read
	// without sem by calls that wait for it.
	inflight atomic.Pointer[inflight]

	conn conn
	// ready is set once the TPM behind conn is initialised (initTPM); a
	// call cancelled during the initialisation keeps the connection for
	// the next call to finish.
	ready     bool
	closed    bool
	pin       []byte // the pinned SRK Name
	dataLoss  bool
	objs      map[string]*object
	lru       *list.List
	parents   map[string]*parentFile
	destroyed map[[sha256.Size]byte]bool
	// pending are sessions started for a command not sent yet (see
	// link.track).
	pending []tpm2.TPMHandle

	// decoded keeps Sign's decoded handles; it has its own lock.
	decoded handleCache

	// Set by Open, read-only after.
	rsaBits map[int]bool
	// pssHashSalt: the TPM's RSASSA-PSS salt is the hash length, as
	// keybroker promises (RFC 7518 §3.5); otherwise PSS is refused.
	pssHashSalt bool
}

var (
	_ kms.Backend = (*Backend)(nil)
)

// Open connects to the TPM, flushes leftover transient objects and
// sessions, creates the SRK and compares its Name with the one pinned in
// StateDir/srk.name (pinning it the first time), and probes what the TPM
// supports (RSA sizes, the PSS salt length). A changed SRK does not fail
// Open: the backend starts in the data loss state, where every operation
// and Probe fail with ErrDataLoss, and says so in the log.
func Open(ctx context.Context, cfg Config, log *slog.Logger) (*Backend, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := makeStateDir(cfg.StateDir); err != nil {
		return nil, err
	}
	pin, err := readPin(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	b := &Backend{
		cfg:       cfg,
		log:       log,
		sem:       make(chan struct{}, 1),
		pin:       pin,
		parents:   make(map[string]*parentFile),
		destroyed: make(map[[sha256.Size]byte]bool),
		rsaBits:   make(map[int]bool),
	}
	b.forgetAll()
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := b.probeCapabilities(l); err != nil {
		b.shutdown(l)
		return nil, err
	}
	log.Info("TPM backend open", "rsa_2048", b.rsaBits[2048], "rsa_3072", b.rsaBits[3072], "rsa_4096", b.rsaBits[4096],
		"pss", b.pssHashSalt, "data_loss", b.dataLoss)
	return b, nil
}

// Close flushes the loaded objects and sessions and closes the connection.
// It waits for the call in progress, if any. Safe to call more than once.
func (b *Backend) Close() error {
	b.sem <- struct{}{}
	defer func() { <-b.sem }()
	if b.closed {
		return nil
	}
	b.closed = true
	ctx, cancel := context.WithTimeout(context.Background(), b.cfg.Timeout)
	defer cancel()
	if err := b.shutdown(&link{b: b, ctx: ctx, timeout: b.cfg.Timeout}); err != nil {
		return &kms.Error{Backend: "tpm", Op: "close", Err: err}
	}
	return nil
}

// Probe asks the TPM for one random byte, reconnecting first if needed.
func (b *Backend) Probe(ctx context.Context) error {
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if b.dataLoss {
		return b.dataLossError()
	}
	_, err = tpm2.GetRandom{BytesRequested: 1}.Execute(l)
	return classify("probe", err)
}

// checkPartition returns the tenant name, which names its parent file.
func checkPartition(p kms.Partition) error {
	if err := kms.ValidateName(p.Tenant); err != nil {
		var fe *kms.FieldError
		if errors.As(err, &fe) {
			return &kms.FieldError{Field: "partition", Reason: "tenant " + fe.Reason}
		}
		return err
	}
	return nil
}

// Generate creates a signing key for spec under the tenant's storage
// parent, with a random auth value, and returns its blobs as the handle.
func (b *Backend) Generate(ctx context.Context, p kms.Partition, spec kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	spec, err := spec.Validate()
	if err != nil {
		return nil, nil, err
	}
	if spec.Alg.IsRSA() && !b.rsaBits[spec.Bits] {
		return nil, nil, &kms.FieldError{Field: "bits", Reason: fmt.Sprintf("got %d: the TPM does not support RSA-%d keys (want %s)", spec.Bits, spec.Bits, b.supportedRSA())}
	}
	if spec.Alg == kms.PS256 && !b.pssHashSalt {
		return nil, nil, &kms.FieldError{Field: "algorithm", Reason: "PS256: the TPM's RSASSA-PSS salt is not the hash length"}
	}
	if err := checkPartition(p); err != nil {
		return nil, nil, err
	}
	auth, err := randomAuth()
	if err != nil {
		return nil, nil, err
	}
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer unlock()
	if b.dataLoss {
		return nil, nil, b.dataLossError()
	}
	var rsp *tpm2.CreateResponse
	err = b.retry(l, func() error {
		srk, err := b.srk(l)
		if err != nil {
			return err
		}
		parent, err := b.parent(l, p.Tenant, []*object{srk})
		if err != nil {
			return err
		}
		lk := *l
		if spec.Alg.IsRSA() {
			lk.timeout = b.cfg.KeyGenTimeout
		}
		return b.withSlot(l, []*object{srk, parent}, func() error {
			var err error
			rsp, err = tpm2.Create{
				ParentHandle: tpm2.AuthHandle{Handle: parent.handle, Name: parent.name, Auth: b.saltedSession(srk, parent.auth)},
				InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
					UserAuth: tpm2.TPM2BAuth{Buffer: auth},
				}},
				InPublic: tpm2.New2B(keyTemplate(spec)),
			}.Execute(&lk)
			return err
		})
	})
	if err != nil {
		return nil, nil, classify("generate key", err)
	}
	k := &key{public: rsp.OutPublic.Bytes(), private: rsp.OutPrivate.Buffer, auth: auth}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return nil, nil, &kms.Error{Backend: "tpm", Op: "generate key", Err: err}
	}
	// The TPM fills in the template; check it kept every attribute.
	if pub.ObjectAttributes != signingKeyAttributes {
		return nil, nil, &kms.Error{Backend: "tpm", Op: "generate key", Err: fmt.Errorf("key attributes 0x%x, want 0x%x", attrBits(pub.ObjectAttributes), attrBits(signingKeyAttributes))}
	}
	pk, err := publicKey(pub)
	if err != nil {
		return nil, nil, &kms.Error{Backend: "tpm", Op: "generate key", Err: err}
	}
	if !spec.Alg.MatchesPublicKey(pk, spec.Bits) {
		return nil, nil, &kms.Error{Backend: "tpm", Op: "generate key", Err: fmt.Errorf("the TPM returned a %T that is not a %v key", pk, spec.Alg)}
	}
	k.pub = pub
	return k.encode(), pk, nil
}

var hashAlgs = map[crypto.Hash]tpm2.TPMIAlgHash{
	crypto.SHA256: tpm2.TPMAlgSHA256,
	crypto.SHA384: tpm2.TPMAlgSHA384,
	crypto.SHA512: tpm2.TPMAlgSHA512,
}

func sigScheme(scheme tpm2.TPMAlgID, hash tpm2.TPMIAlgHash) tpm2.TPMTSigScheme {
	return tpm2.TPMTSigScheme{Scheme: scheme, Details: tpm2.NewTPMUSigScheme(scheme, &tpm2.TPMSSchemeHash{HashAlg: hash})}
}

// nullTicket is the TPMT_TK_HASHCHECK for digests the TPM did not hash
// itself, accepted by unrestricted keys (Part 2 §10.7.6).
func nullTicket() tpm2.TPMTTKHashCheck {
	return tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull}
}

// Sign signs digest with the key h: ECDSA signatures come back as ASN.1 DER,
// RSA ones per opts (crypto.Hash for PKCS#1 v1.5, *rsa.PSSOptions with the
// salt equal to the hash length for PSS). The digest is checked against the
// hash before any TPM command, and travels encrypted in a salted session,
// the key's reusable one (see keySession).
func (b *Backend) Sign(ctx context.Context, p kms.Partition, h kms.Handle, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := kms.CheckSign(opts, digest); err != nil {
		return nil, err
	}
	hash := opts.HashFunc()
	hashAlg := hashAlgs[hash]
	_, isPSS := opts.(*rsa.PSSOptions)
	k, err := b.decoded.decode(h)
	if err != nil {
		return nil, err
	}
	var scheme tpm2.TPMTSigScheme
	switch {
	case k.pub.Type == tpm2.TPMAlgECC && isPSS:
		return nil, &kms.FieldError{Field: "padding", Reason: "PSS is for RSA keys"}
	case k.pub.Type == tpm2.TPMAlgECC:
		scheme = sigScheme(tpm2.TPMAlgECDSA, hashAlg)
	case isPSS && !b.pssHashSalt:
		return nil, &kms.FieldError{Field: "padding", Reason: "PSS: the TPM's salt is not the hash length"}
	case isPSS:
		scheme = sigScheme(tpm2.TPMAlgRSAPSS, hashAlg)
	default:
		scheme = sigScheme(tpm2.TPMAlgRSASSA, hashAlg)
	}
	if err := checkPartition(p); err != nil {
		return nil, err
	}
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := b.checkUsable(h); err != nil {
		b.decoded.forget(h) // decoded above: a destroyed key's handle is not kept
		return nil, err
	}
	var rsp *tpm2.SignResponse
	err = b.retry(l, func() error {
		srk, err := b.srk(l)
		if err != nil {
			return err
		}
		o, err := b.loadKey(l, p.Tenant, k, []*object{srk})
		if err != nil {
			return err
		}
		sess, err := b.keySession(l, srk, o, k.auth)
		if err != nil {
			return err
		}
		rsp, err = tpm2.Sign{
			KeyHandle:  tpm2.AuthHandle{Handle: o.handle, Name: o.name, Auth: sess},
			Digest:     tpm2.TPM2BDigest{Buffer: digest},
			InScheme:   scheme,
			Validation: nullTicket(),
		}.Execute(l)
		if err != nil {
			// Its nonces may be out of step with the TPM's: a retry
			// starts a fresh one.
			b.dropSession(l, o)
		}
		return err
	})
	if err != nil {
		return nil, classify("sign", err)
	}
	if k.pub.Type == tpm2.TPMAlgECC {
		sig, err := rsp.Signature.Signature.ECDSA()
		if err != nil {
			return nil, &kms.Error{Backend: "tpm", Op: "sign", Err: err}
		}
		return derSignature(sig)
	}
	var sig *tpm2.TPMSSignatureRSA
	if isPSS {
		sig, err = rsp.Signature.Signature.RSAPSS()
	} else {
		sig, err = rsp.Signature.Signature.RSASSA()
	}
	if err != nil {
		return nil, &kms.Error{Backend: "tpm", Op: "sign", Err: err}
	}
	return sig.Sig.Buffer, nil
}

// derSignature encodes an ECDSA signature as ASN.1 DER (RFC 3279 §2.2.3),
// the crypto.Signer form.
func derSignature(sig *tpm2.TPMSSignatureECC) ([]byte, error) {
	der, err := asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(sig.SignatureR.Buffer),
		new(big.Int).SetBytes(sig.SignatureS.Buffer),
	})
	if err != nil {
		return nil, &kms.Error{Backend: "tpm", Op: "encode signature", Err: err}
	}
	return der, nil
}

// checkUsable refuses destroyed keys and, in the data loss state, every
// key.
func (b *Backend) checkUsable(h kms.Handle) error {
	if b.destroyed[sha256.Sum256(h)] {
		return &kms.Error{Backend: "tpm", Op: "use the key", Kind: kms.ErrNotFound, Err: errors.New("key destroyed")}
	}
	if b.dataLoss {
		return b.dataLossError()
	}
	return nil
}

// Destroy unloads the key h. A TPM key has no existence in the TPM beyond
// its loaded copy: it is destroyed by deleting its blob, which the daemon
// does when it records the key DESTROYED. Destroy checks that h is a key of
// this tenant on this TPM (by loading it), flushes it, and remembers, for
// the life of this process, that it is destroyed: Sign and Destroy of it
// then fail with kms.ErrNotFound. A later process would load the blob
// again if asked; the store, which has dropped the handle, never asks.
func (b *Backend) Destroy(ctx context.Context, p kms.Partition, h kms.Handle) error {
	k, err := decodeHandle(h)
	if err != nil {
		return err
	}
	if err := checkPartition(p); err != nil {
		return err
	}
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if err := b.checkUsable(h); err != nil {
		return err
	}
	var o *object
	err = b.retry(l, func() error {
		var err error
		o, err = b.loadKey(l, p.Tenant, k, nil)
		return err
	})
	if err != nil {
		return classify("destroy key", err)
	}
	if err := b.flush(l, o); err != nil {
		return err
	}
	b.destroyed[sha256.Sum256(h)] = true
	b.decoded.forget(h)
	return nil
}
