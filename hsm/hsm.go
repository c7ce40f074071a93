// Package hsm is keybroker's PKCS#11 backend, built on crypto11 and
// miekg/pkcs11. Keys are generated on the token with an explicit
// non-extractable template and addressed by a random CKA_ID, which is the
// kms.Handle the store persists. Only the daemon's wiring, tests and
// `keybrokerctl bench --baseline` import it; everything else sees a
// kms.Backend.
package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

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

// SessionsInUse is how many PKCS#11 sessions calls hold right now (for
// the metrics endpoint).
func (b *Backend) SessionsInUse() int { return int(b.inUse.Load()) }

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

// checkModule loads and initialises the module on its own, after
// crypto11 failed, to tell a module that cannot start (ErrModule) from a
// token that cannot be reached or refuses the login.
func checkModule(path string) error {
	mod := pkcs11.New(path)
	if mod == nil {
		return &kms.Error{Backend: "hsm", Op: "load module", Kind: ErrModule, Err: fmt.Errorf("cannot load %s", path)}
	}
	defer mod.Destroy()
	err := mod.Initialize()
	switch {
	case err == nil:
		mod.Finalize()
		return nil
	case errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)):
		// Initialised in this process already (another token's context).
		return nil
	}
	return &kms.Error{Backend: "hsm", Op: "initialise module", Kind: ErrModule, Err: err}
}

// serialModule reports whether calls into the module at path must not
// overlap. p11-kit's RPC client (p11-kit-client.so, "p11-kit server"
// remoting) deadlocks when its server goes away while two threads wait on
// one connection: the thread whose reply is cut off returns without waking
// the thread that read that reply's header for it, which then waits on a
// condition variable forever (rpc_socket_read in p11-kit's
// rpc-transport.c; seen with Debian 12's 0.24.1). Its server answers one
// call at a time per connection anyway, so little is lost.
func serialModule(path string) bool {
	return filepath.Base(path) == "p11-kit-client.so"
}

// defaultCloseTimeout bounds Close: a call stuck in the module must not
// hang the daemon's shutdown.
const defaultCloseTimeout = 10 * time.Second

func configure(cfg Config) (*crypto11.Context, error) {
	return crypto11.Configure(&crypto11.Config{
		Path:            cfg.ModulePath,
		TokenLabel:      cfg.TokenLabel,
		Pin:             cfg.PIN,
		MaxSessions:     cfg.MaxSessions,
		PoolWaitTimeout: cfg.PoolWaitTimeout,
	})
}

// Close logs out and releases the module. Safe to call more than once. It
// gives up after closeTimeout if a rebuild or a call on the token does not
// end (a module stuck in a call); the context is then left open.
func (b *Backend) Close() error {
	var err error
	b.closer.Do(func() {
		deadline := time.NewTimer(b.closeTimeout)
		defer deadline.Stop()
		b.mu.Lock()
		p11, wait := b.p11, b.rebuild
		b.p11, b.closed = nil, true
		b.mu.Unlock()
		if wait != nil {
			select {
			case <-wait:
			case <-deadline.C:
				b.log.Error("PKCS#11 reconnect does not end; closing without it", "token", b.cfg.TokenLabel, "timeout", b.closeTimeout)
				err = fmt.Errorf("hsm: close: reconnect still running after %v", b.closeTimeout)
				return
			}
			b.mu.Lock()
			p11, b.p11 = b.p11, nil
			b.mu.Unlock()
		}
		if p11 == nil {
			return
		}
		done := make(chan error, 1)
		go func() {
			defer func() {
				if r := recover(); r != nil {
					done <- fmt.Errorf("hsm: close: %v", r)
				}
			}()
			done <- p11.Close()
		}()
		select {
		case err = <-done:
		case <-deadline.C:
			b.log.Error("PKCS#11 calls still running; closing without waiting for them", "token", b.cfg.TokenLabel, "timeout", b.closeTimeout)
			err = fmt.Errorf("hsm: close: calls on the token still running after %v", b.closeTimeout)
		}
	})
	return err
}

// ErrRebuilding is wrapped by the errors of calls made while the token is
// being reopened after a failure.
var errRebuilding = fmt.Errorf("hsm: reconnecting to the token: %w", kms.ErrUnavailable)

// context returns the current crypto11 context, or errRebuilding.
func (b *Backend) context() (*crypto11.Context, error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.p11 == nil {
		if b.closed {
			return nil, fmt.Errorf("hsm: backend closed: %w", kms.ErrUnavailable)
		}
		return nil, errRebuilding
	}
	return b.p11, nil
}

// failed looks at an operation's error on context p11: if it says the
// token, a session or the login is gone, that context is retired and a
// rebuild starts (once). It returns err.
func (b *Backend) failed(p11 *crypto11.Context, err error) error {
	if err == nil || !errors.Is(err, kms.ErrUnavailable) {
		return err
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || errors.Is(err, errUnanswered) {
		// A slow or hung token: the call gave up, the context may still
		// be good. Probe reports a hung token; reconnecting would not help.
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.p11 != p11 || b.closed {
		return err // already retired
	}
	b.p11, b.keys = nil, make(map[string]cachedKey)
	done := make(chan struct{})
	b.rebuild = done
	b.log.Error("PKCS#11 token lost; reconnecting", "token", b.cfg.TokenLabel, "err", err)
	go b.reconnect(p11, done)
	return err
}

// reconnect closes the old context and opens new ones until one works or
// the backend is closed. A wrong PIN stops it: PIN counters lock.
func (b *Backend) reconnect(old *crypto11.Context, done chan struct{}) {
	defer close(done)
	// crypto11's Close waits for the old context's sessions: a call stuck
	// in the module (a hung HSM) must not keep the new context from
	// opening. It closes on its own once that call returns.
	closed := make(chan struct{})
	go func() {
		closeQuietly(old)
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(oldContextWait):
		b.log.Warn("PKCS#11 calls still stuck in the old context; reconnecting without waiting for them", "token", b.cfg.TokenLabel)
	}
	delay := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		b.mu.RLock()
		closed := b.closed
		b.mu.RUnlock()
		if closed {
			return
		}
		p11, err := configure(b.cfg)
		if err == nil {
			b.mu.Lock()
			if b.closed {
				b.mu.Unlock()
				closeQuietly(p11)
				return
			}
			b.p11, b.rebuild = p11, nil
			b.mu.Unlock()
			b.log.Info("PKCS#11 token back", "token", b.cfg.TokenLabel, "attempts", attempt)
			return
		}
		if errors.Is(classify("reopen token", err), kms.ErrFailedPrecondition) {
			b.log.Error("PKCS#11 token refuses the PIN; not retrying (PIN counters lock)", "token", b.cfg.TokenLabel)
			return
		}
		if attempt == 1 || attempt%20 == 0 {
			b.log.Warn("PKCS#11 token still unavailable", "token", b.cfg.TokenLabel, "attempt", attempt, "err", err)
		}
		time.Sleep(delay)
		delay = min(2*delay, time.Second)
	}
}

// oldContextWait bounds how long a reconnect waits for the old context
// to close.
const oldContextWait = 2 * time.Second

// closeQuietly closes a context whose sessions may all be dead; crypto11's
// Close panics when called twice and may fail on a lost token.
func closeQuietly(p11 *crypto11.Context) {
	defer func() { _ = recover() }()
	_ = p11.Close()
}

// bounded runs f, but returns when ctx ends even if the hardware does not
// answer (the call finishes later on its own goroutine). abandoned counts
// such calls while they are still running.
func bounded[T any](ctx context.Context, abandoned *atomic.Int64, f func() (T, error)) (T, error) {
	if ctx.Done() == nil {
		return f()
	}
	type result struct {
		v   T
		err error
	}
	const running, returned, left = 0, 1, 2
	var state atomic.Int32
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		if !state.CompareAndSwap(running, returned) {
			abandoned.Add(-1)
		}
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		if !state.CompareAndSwap(running, left) {
			r := <-ch // it returned meanwhile
			return r.v, r.err
		}
		abandoned.Add(1)
		var zero T
		return zero, fmt.Errorf("hsm: no answer from the token: %w (%w)", kms.ErrUnavailable, ctx.Err())
	}
}

// acquire takes a session slot, waiting at most until ctx ends or for
// PoolWaitTimeout. Both are ErrResourceExhausted: the pool is saturated.
// The caller must call release once its hardware call has ended.
func (b *Backend) acquire(ctx context.Context) (release func(), err error) {
	select {
	case b.slots <- struct{}{}:
	default:
		var timeout <-chan time.Time
		if b.cfg.PoolWaitTimeout > 0 {
			t := time.NewTimer(b.cfg.PoolWaitTimeout)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case b.slots <- struct{}{}:
		case <-ctx.Done():
			return nil, b.noSlot(fmt.Errorf("hsm: waiting for a PKCS#11 session: %w", ctx.Err()))
		case <-timeout:
			return nil, b.noSlot(fmt.Errorf("hsm: no PKCS#11 session free after %v", b.cfg.PoolWaitTimeout))
		}
	}
	if err := ctx.Err(); err != nil {
		<-b.slots
		return nil, fmt.Errorf("hsm: waiting for a PKCS#11 session: %w (%w)", kms.ErrResourceExhausted, err)
	}
	return func() { <-b.slots }, nil
}

// errUnanswered says that calls whose callers gave up are still inside
// the token: it is hung or slow, and a new context would not help.
var errUnanswered = errors.New("the token does not answer")

// noSlot classifies a wait for a session slot that ran out: the token is
// unavailable when calls whose callers gave up still hold slots (it does
// not answer), and merely saturated otherwise.
func (b *Backend) noSlot(err error) error {
	if n := b.abandoned.Load(); n > 0 {
		return fmt.Errorf("%w: %w (%d calls abandoned by their callers still wait): %w", err, errUnanswered, n, kms.ErrUnavailable)
	}
	return fmt.Errorf("%w: %w", err, kms.ErrResourceExhausted)
}

// call runs the hardware call f holding a session slot, bounded by ctx
// (see bounded). f is never started once ctx is done.
func call[T any](ctx context.Context, b *Backend, f func() (T, error)) (T, error) {
	release, err := b.acquire(ctx)
	if err != nil {
		var zero T
		return zero, err
	}
	return bounded(ctx, &b.abandoned, func() (T, error) {
		defer release()
		if err := ctx.Err(); err != nil {
			var zero T
			return zero, fmt.Errorf("hsm: %w (%w)", kms.ErrResourceExhausted, err)
		}
		b.inUse.Add(1)
		defer b.inUse.Add(-1)
		b.started.Add(1)
		return f()
	})
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

func generate(p11 *crypto11.Context, id, label []byte, spec kms.KeySpec, strict bool) (crypto11.Signer, error) {
	pub, priv, err := templates(id, label, spec.Alg.IsRSA(), strict)
	if err != nil {
		return nil, err
	}
	if spec.Alg.IsRSA() {
		return p11.GenerateRSAKeyPairWithAttributes(pub, priv, spec.Bits)
	}
	return p11.GenerateECDSAKeyPairWithAttributes(pub, priv, spec.Alg.Curve())
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

// templates returns the public and private key templates. Every security
// relevant attribute is explicit rather than left to crypto11's defaults or
// the token's (PKCS#11 v2.40 §4.9, §4.14).
func templates(id, label []byte, isRSA, strict bool) (pub, priv crypto11.AttributeSet, err error) {
	pub, err = crypto11.NewAttributeSetWithIDAndLabel(id, label)
	if err != nil {
		return nil, nil, err
	}
	priv, err = crypto11.NewAttributeSetWithIDAndLabel(id, label)
	if err != nil {
		return nil, nil, err
	}
	pubAttrs := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	if isRSA {
		pubAttrs = append(pubAttrs, pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false))
	}
	privAttrs := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN_RECOVER, false),
	}
	if strict {
		privAttrs = append(privAttrs,
			pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, false))
	}
	for _, a := range pubAttrs {
		pub[a.Type] = a
	}
	for _, a := range privAttrs {
		priv[a.Type] = a
	}
	return pub, priv, nil
}

// requiredPrivate lists the attributes a generated private key must read
// back with, and their values.
var requiredPrivate = []struct {
	typ  uint
	name string
	want bool
}{
	{pkcs11.CKA_TOKEN, "CKA_TOKEN", true},
	{pkcs11.CKA_PRIVATE, "CKA_PRIVATE", true},
	{pkcs11.CKA_SENSITIVE, "CKA_SENSITIVE", true},
	{pkcs11.CKA_ALWAYS_SENSITIVE, "CKA_ALWAYS_SENSITIVE", true},
	{pkcs11.CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false},
	{pkcs11.CKA_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE", true},
	{pkcs11.CKA_LOCAL, "CKA_LOCAL", true},
	{pkcs11.CKA_SIGN, "CKA_SIGN", true},
	{pkcs11.CKA_DECRYPT, "CKA_DECRYPT", false},
	{pkcs11.CKA_UNWRAP, "CKA_UNWRAP", false},
	{pkcs11.CKA_DERIVE, "CKA_DERIVE", false},
}

// ErrWeakKey is returned when a generated key does not read back with the
// required attributes; the key is deleted.
var ErrWeakKey = errors.New("hsm: generated key does not have the required attributes")

func checkAttributes(p11 *crypto11.Context, signer crypto11.Signer) error {
	types := make([]crypto11.AttributeType, len(requiredPrivate))
	for i, r := range requiredPrivate {
		types[i] = r.typ
	}
	got, err := p11.GetAttributes(signer, types)
	if err != nil {
		return classify("read key attributes", err)
	}
	for _, r := range requiredPrivate {
		a := got[r.typ]
		if a == nil || len(a.Value) != 1 || (a.Value[0] != 0) != r.want {
			return fmt.Errorf("%w: %s is not %v", ErrWeakKey, r.name, r.want)
		}
	}
	return nil
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

// destroyKeyPair deletes every private and public key with CKA_ID id whose
// label names p's tenant, and returns how many there were.
func destroyKeyPair(cfg Config, p kms.Partition, id []byte) (int, error) {
	n := 0
	err := withTokenSession(cfg, true, func(mod *pkcs11.Ctx, sess pkcs11.SessionHandle) error {
		for _, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
			template := []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
				pkcs11.NewAttribute(pkcs11.CKA_ID, id),
			}
			handles, err := findObjects(mod, sess, template)
			if err != nil {
				return err
			}
			for _, h := range handles {
				attrs, err := mod.GetAttributeValue(sess, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
				if err != nil {
					// A concurrent deletion may fail the read otherwise
					// too (SoftHSM2: CKR_ATTRIBUTE_VALUE_INVALID): an
					// error only if the object is still there.
					left, ferr := findObjects(mod, sess, template)
					if ferr != nil || slices.Contains(left, h) {
						return err
					}
					continue
				}
				if tenant, ok := labelTenant(string(attrs[0].Value)); !ok || tenant != p.Tenant {
					continue // another partition's: not there for p
				}
				n++
				err = mod.DestroyObject(sess, h)
				if err == nil || isGoneObject(err) {
					continue
				}
				// A concurrent deletion of the same object may fail
				// otherwise (SoftHSM2: CKR_FUNCTION_FAILED): it is an
				// error only if the object is still there.
				left, ferr := findObjects(mod, sess, template)
				if ferr != nil || slices.Contains(left, h) {
					return err
				}
			}
		}
		return nil
	})
	return n, err
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

// List returns every key pair on the token that the daemon created, with
// the partition its label names.
func (b *Backend) List(ctx context.Context) ([]kms.Object, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if _, err := b.context(); err != nil {
		return nil, err
	}
	found, err := listPrivateKeys(b.cfg)
	if err != nil {
		// A session of its own: its errors say nothing about the
		// crypto11 context, which must not be retired for them.
		return nil, classify("list keys", err)
	}
	var objs []kms.Object
	for _, f := range found {
		if len(f.id) != IDLen {
			continue
		}
		tenant, ok := labelTenant(f.label)
		if !ok {
			continue
		}
		objs = append(objs, kms.Object{Partition: kms.Partition{Tenant: tenant}, Handle: kms.Handle(f.id)})
	}
	return objs, nil
}

type foundKey struct {
	id    []byte
	label string
}

// listPrivateKeys reads CKA_ID and CKA_LABEL of every private key on the
// token in one C_FindObjects pass, on a session of its own. (crypto11's
// FindAllKeyPairs looks up each key's public half with another search,
// which makes listing quadratic in the number of keys: minutes at
// start-up for a few thousand keys.)
func listPrivateKeys(cfg Config) ([]foundKey, error) {
	var out []foundKey
	err := withTokenSession(cfg, false, func(mod *pkcs11.Ctx, sess pkcs11.SessionHandle) error {
		handles, err := findObjects(mod, sess, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)})
		if err != nil {
			return err
		}
		out = make([]foundKey, 0, len(handles))
		for _, h := range handles {
			attrs, err := mod.GetAttributeValue(sess, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, nil), pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if isGoneObject(err) {
				continue // destroyed since the search
			}
			if err != nil {
				return err
			}
			var f foundKey
			for _, a := range attrs {
				switch a.Type {
				case pkcs11.CKA_ID:
					f.id = a.Value
				case pkcs11.CKA_LABEL:
					f.label = string(a.Value)
				}
			}
			out = append(out, f)
		}
		return nil
	})
	return out, err
}

// withTokenSession runs f on a logged-in session of its own on the token,
// outside crypto11's pool. The module is usually initialised and logged in
// by crypto11 already, and the session shares that login. Where it is not
// (a p11-kit module gives each caller an instance of its own, or the
// window while a context is rebuilt), it initialises the module (and
// finalises it after) and logs the session in with the PIN: otherwise
// private keys would be invisible, and a listing would miss them.
func withTokenSession(cfg Config, rw bool, f func(*pkcs11.Ctx, pkcs11.SessionHandle) error) error {
	mod := pkcs11.New(cfg.ModulePath)
	if mod == nil {
		return fmt.Errorf("cannot load the PKCS#11 module")
	}
	defer mod.Destroy()
	if err := mod.Initialize(); err == nil {
		defer mod.Finalize()
	} else if !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return err
	}
	slots, err := mod.GetSlotList(true)
	if err != nil {
		return err
	}
	for _, slot := range slots {
		info, err := mod.GetTokenInfo(slot)
		if err != nil || info.Label != cfg.TokenLabel {
			continue
		}
		flags := uint(pkcs11.CKF_SERIAL_SESSION)
		if rw {
			flags |= pkcs11.CKF_RW_SESSION
		}
		sess, err := mod.OpenSession(slot, flags)
		if err != nil {
			return err
		}
		defer mod.CloseSession(sess)
		si, err := mod.GetSessionInfo(sess)
		if err != nil {
			return err
		}
		if si.State != pkcs11.CKS_RO_USER_FUNCTIONS && si.State != pkcs11.CKS_RW_USER_FUNCTIONS {
			err := mod.Login(sess, pkcs11.CKU_USER, cfg.PIN)
			if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
				return err
			}
		}
		return f(mod, sess)
	}
	return pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT)
}

// findObjects returns the handles of every object matching template.
func findObjects(mod *pkcs11.Ctx, sess pkcs11.SessionHandle, template []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := mod.FindObjectsInit(sess, template); err != nil {
		return nil, err
	}
	var handles []pkcs11.ObjectHandle
	for {
		hs, _, err := mod.FindObjects(sess, 1024)
		if err != nil {
			mod.FindObjectsFinal(sess)
			return nil, err
		}
		if len(hs) == 0 {
			break
		}
		handles = append(handles, hs...)
	}
	return handles, mod.FindObjectsFinal(sess)
}

var _ kms.Lister = (*Backend)(nil)
