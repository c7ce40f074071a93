// Package hsm is keybroker's PKCS#11 backend, built on crypto11 and
// miekg/pkcs11: a kms.Backend (and kms.Lister). Keys are generated on the
// token with an explicit non-extractable template and addressed by a
// random CKA_ID, which is the kms.Handle to keep; their CKA_LABEL names the
// partition (tenant) they belong to, and a key is found only under it. It
// is usable as a library on its own:
//
//	b, err := hsm.Open(hsm.Config{ModulePath: "/usr/lib/softhsm/libsofthsm2.so",
//		TokenLabel: "keys", PIN: pin, MaxSessions: 4}, slog.Default())
//	p := kms.Partition{Tenant: "app"}
//	h, pub, err := b.Generate(ctx, p, kms.KeySpec{Alg: kms.ES256, Label: "k/v1"})
//	sig, err := b.Sign(ctx, p, h, digest, crypto.SHA256) // ASN.1 DER for ECDSA
package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThalesGroup/crypto11"

	"github.com/keybroker/keybroker/kms"
)

// IDLen is the length of the random CKA_ID of each key (the caller's
// KeySpec.ID, or one chosen here).
const IDLen = kms.ObjectIDLen

// labelPrefix starts the CKA_LABEL of every key the daemon creates:
// "keybroker/<tenant>/<spec label>". List only reports such objects, so keys
// of other applications on a shared token are never touched.
const labelPrefix = "keybroker/"

// Config selects the token and sizes the session pool.
type Config struct {
	// ModulePath is the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so.
	ModulePath string
	// TokenLabel selects the token.
	TokenLabel string
	// PIN is the user PIN. It is never logged or returned in an error.
	PIN string
	// MaxSessions is the size of the session pool (at least 2: crypto11
	// keeps one session for the login).
	MaxSessions int
	// PoolWaitTimeout bounds the wait for a free session; 0 waits forever.
	PoolWaitTimeout time.Duration
}

// Backend is a kms.Backend on one PKCS#11 token.
//
// A crypto11 Context cannot recover from a lost token (broken sessions go
// back into its pool and it never logs in again), so the Backend treats it
// as a replaceable generation: when an operation fails in a way that means
// the token, a session or the login is gone, the Backend fails fast with
// kms.ErrUnavailable, closes that context and opens a new one in the
// background (re-finding keys by CKA_ID), and serves again once it is up.
type Backend struct {
	cfg    Config
	log    *slog.Logger
	closer sync.Once

	mu      sync.RWMutex
	p11     *crypto11.Context    // nil while rebuilding
	keys    map[string]cachedKey // by CKA_ID, of the current p11
	closed  bool
	rebuild chan struct{} // closed when the running rebuild ends
	// epoch changes whenever a Destroy starts or ends; a key pair found
	// while it changed is not cached (it may be the one being destroyed).
	epoch uint64

	// slots holds one token per pool session a call uses. Calls take a
	// slot before entering crypto11, waiting with the caller's context, so
	// a call whose caller left never waits for a session or starts on the
	// hardware afterwards.
	slots chan struct{}
	// closeTimeout bounds how long Close waits for a running rebuild and
	// for the context's calls to end.
	closeTimeout time.Duration

	inUse     atomic.Int64 // hardware calls in progress, each holding a session
	abandoned atomic.Int64 // calls still in the hardware whose callers gave up
	started   atomic.Int64 // hardware calls started through a slot, ever
}

var _ kms.Backend = (*Backend)(nil)

// cachedKey is a key pair found on the token, and the tenant its label
// names (its partition).
type cachedKey struct {
	signer crypto11.Signer
	tenant string
}

// Open loads the module, finds the token and logs in.
func Open(cfg Config, log *slog.Logger) (*Backend, error) {
	if cfg.MaxSessions < 2 {
		return nil, fmt.Errorf("hsm: max sessions: got %d, want at least 2", cfg.MaxSessions)
	}
	p11, err := configure(cfg)
	if err != nil {
		if merr := checkModule(cfg.ModulePath); merr != nil {
			return nil, merr
		}
		return nil, classify("open token", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// crypto11 keeps one of MaxSessions for the login; its pool has the
	// rest.
	slots := cfg.MaxSessions - 1
	if serialModule(cfg.ModulePath) {
		slots = 1
		log.Info("PKCS#11 calls through p11-kit's RPC client run one at a time", "module", cfg.ModulePath)
	}
	return &Backend{
		cfg: cfg, p11: p11, log: log, keys: make(map[string]cachedKey),
		slots:        make(chan struct{}, slots),
		closeTimeout: defaultCloseTimeout,
	}, nil
}

// Probe asks the token for one random byte: a cheap round trip through a
// pooled session.
func (b *Backend) Probe(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p11, err := b.context()
	if err != nil {
		return err
	}
	_, err = call(ctx, b, func() (int, error) {
		r, err := p11.NewRandomReader()
		if err == nil {
			_, err = io.ReadFull(r, make([]byte, 1))
		}
		return 0, classify("probe", err)
	})
	return b.failed(p11, err)
}

// Generate creates a key pair with the template of privateTemplate and
// checks, by reading the attributes back, that the token honoured it.
func (b *Backend) Generate(ctx context.Context, p kms.Partition, spec kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	spec, err := spec.Validate()
	if err != nil {
		return nil, nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	id := []byte(spec.ID)
	switch {
	case len(id) == 0:
		id = make([]byte, IDLen)
		if _, err := rand.Read(id); err != nil {
			return nil, nil, err
		}
	case len(id) != IDLen:
		return nil, nil, fmt.Errorf("hsm: key ID: got %d bytes, want %d", len(id), IDLen)
	}
	label := []byte(labelPrefix + p.Tenant + "/" + spec.Label)
	b.mu.RLock()
	p11, epoch := b.p11, b.epoch
	b.mu.RUnlock()
	if p11 == nil {
		_, err := b.context()
		return nil, nil, err
	}
	release, err := b.acquire(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer release()
	b.inUse.Add(1)
	defer b.inUse.Add(-1)
	b.started.Add(1)
	// Not bounded by ctx: a key that the token generates after the caller
	// gave up would be an orphan; generation is slow but finite.
	signer, err := generate(p11, id, label, spec, true)
	if isTemplateError(err) {
		// The token does not accept CKA_MODIFIABLE/CKA_COPYABLE; they are
		// only "where the token accepts them".
		signer, err = generate(p11, id, label, spec, false)
	}
	if err != nil {
		return nil, nil, b.failed(p11, classify("generate key", err))
	}
	if err := checkAttributes(p11, signer); err != nil {
		if derr := signer.Delete(); derr != nil {
			b.log.Error("deleting a key that failed the attribute check", "err", derr)
		}
		return nil, nil, b.failed(p11, err)
	}
	b.cache(p11, epoch, id, cachedKey{signer, p.Tenant})
	return kms.Handle(id), signer.Public(), nil
}

// cache remembers a key pair found on context p11 at epoch, unless p11 was
// retired or a Destroy ran meanwhile.
func (b *Backend) cache(p11 *crypto11.Context, epoch uint64, id []byte, k cachedKey) {
	b.mu.Lock()
	if b.p11 == p11 && b.epoch == epoch {
		b.keys[string(id)] = k
	}
	b.mu.Unlock()
}

// forget drops the cache entry of h and moves the epoch on, so that no
// lookup running now caches h.
func (b *Backend) forget(h kms.Handle) {
	b.mu.Lock()
	delete(b.keys, string(h))
	b.epoch++
	b.mu.Unlock()
}

// drop removes h's cache entry if it still is signer (whose handle the
// token no longer knows).
func (b *Backend) drop(h kms.Handle, signer crypto11.Signer) {
	b.mu.Lock()
	if b.keys[string(h)].signer == signer {
		delete(b.keys, string(h))
	}
	b.mu.Unlock()
}

// Sign signs with the key whose CKA_ID is h.
func (b *Backend) Sign(ctx context.Context, p kms.Partition, h kms.Handle, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := kms.CheckSign(opts, digest); err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		p11, signer, err := b.find(ctx, p, h)
		if err != nil {
			return nil, err
		}
		switch signer.Public().(type) {
		case *ecdsa.PublicKey:
			if _, ok := opts.(*rsa.PSSOptions); ok {
				return nil, &kms.FieldError{Field: "padding", Reason: "PSS is for RSA keys"}
			}
		}
		sig, err := call(ctx, b, func() ([]byte, error) {
			return signer.Sign(nil, digest, opts)
		})
		if err == nil {
			return sig, nil
		}
		if isGoneObject(err) {
			// The key was deleted behind the cache (a concurrent Destroy,
			// another process): look it up once more by CKA_ID.
			b.drop(h, signer)
			if attempt == 0 {
				continue
			}
		}
		return nil, b.failed(p11, classify("sign", err))
	}
}

// Destroy deletes both halves of the key pair h. Each half is looked up by
// CKA_ID (not through a cached handle) and a half that another caller
// deleted meanwhile counts as deleted; it reports ErrNotFound only when
// neither half was on the token.
func (b *Backend) Destroy(ctx context.Context, p kms.Partition, h kms.Handle) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if len(h) != IDLen {
		return fmt.Errorf("hsm: handle length: got %d, want %d: %w", len(h), IDLen, kms.ErrNotFound)
	}
	if _, err := b.context(); err != nil {
		return err
	}
	b.forget(h)
	defer b.forget(h)
	// Not bounded by ctx: a half-deleted pair is worse than a late answer.
	n, err := destroyKeyPair(b.cfg, p, h)
	if err != nil {
		// A session of its own: its errors do not retire the context.
		return classify("destroy key", err)
	}
	if n == 0 {
		return errNoKey
	}
	return nil
}

// find returns the current context and the key pair with CKA_ID h on it,
// from the cache or the token.
func (b *Backend) find(ctx context.Context, p kms.Partition, h kms.Handle) (*crypto11.Context, crypto11.Signer, error) {
	if len(h) != IDLen {
		return nil, nil, fmt.Errorf("hsm: handle length: got %d, want %d: %w", len(h), IDLen, kms.ErrNotFound)
	}
	b.mu.RLock()
	p11, cached, epoch := b.p11, b.keys[string(h)], b.epoch
	b.mu.RUnlock()
	if p11 == nil {
		_, err := b.context()
		return nil, nil, err
	}
	if cached.signer == nil {
		found, err := call(ctx, b, func() ([]crypto11.Signer, error) { return p11.FindKeyPairs(h, nil) })
		if err != nil {
			return nil, nil, b.failed(p11, classify("find key", err))
		}
		switch len(found) {
		case 0:
			return nil, nil, errNoKey
		case 1:
		default:
			return nil, nil, fmt.Errorf("hsm: %d key pairs share one CKA_ID", len(found))
		}
		label, err := call(ctx, b, func() (*crypto11.Attribute, error) { return p11.GetAttribute(found[0], crypto11.CkaLabel) })
		if err != nil {
			return nil, nil, b.failed(p11, classify("read key label", err))
		}
		tenant, ok := labelTenant(string(label.Value))
		if !ok {
			return nil, nil, errNoKey // not a key this daemon made
		}
		cached = cachedKey{found[0], tenant}
		b.cache(p11, epoch, h, cached)
	}
	if cached.tenant != p.Tenant {
		// Another partition's key looks exactly like no key.
		return nil, nil, errNoKey
	}
	return p11, cached.signer, nil
}

// errNoKey is the answer for a handle of no key of the partition.
var errNoKey = fmt.Errorf("hsm: key not on the token: %w", kms.ErrNotFound)

// labelTenant returns the tenant a key's CKA_LABEL names
// (labelPrefix + tenant + "/" + name), and whether it is such a label.
func labelTenant(label string) (string, bool) {
	rest, ok := strings.CutPrefix(label, labelPrefix)
	if !ok {
		return "", false
	}
	tenant, _, ok := strings.Cut(rest, "/")
	return tenant, ok
}

var _ kms.Lister = (*Backend)(nil)
