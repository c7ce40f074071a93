// Package hsm is keybroker's PKCS#11 backend, built on crypto11 and
// miekg/pkcs11. Keys are generated on the token with an explicit
// non-extractable template and addressed by a random CKA_ID, which is the
// broker.Handle the store persists. Only the daemon's wiring, tests and
// `keybrokerctl bench --baseline` import it; everything else sees a
// broker.Backend.
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
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/keybroker/keybroker/internal/broker"
)

// IDLen is the length of the random CKA_ID of each key (the caller's
// KeySpec.ID, or one chosen here).
const IDLen = broker.ObjectIDLen

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

// Backend is a broker.Backend on one PKCS#11 token.
//
// A crypto11 Context cannot recover from a lost token (broken sessions go
// back into its pool and it never logs in again), so the Backend treats it
// as a replaceable generation: when an operation fails in a way that means
// the token, a session or the login is gone, the Backend fails fast with
// broker.ErrUnavailable, closes that context and opens a new one in the
// background (re-finding keys by CKA_ID), and serves again once it is up.
type Backend struct {
	cfg    Config
	log    *slog.Logger
	closer sync.Once

	mu      sync.RWMutex
	p11     *crypto11.Context          // nil while rebuilding
	keys    map[string]crypto11.Signer // by CKA_ID, of the current p11
	closed  bool
	rebuild chan struct{} // closed when the running rebuild ends

	inUse atomic.Int64 // hardware calls in progress, each holding a session
}

// SessionsInUse is how many PKCS#11 sessions calls hold right now (for
// the metrics endpoint).
func (b *Backend) SessionsInUse() int { return int(b.inUse.Load()) }

var _ broker.Backend = (*Backend)(nil)

// Open loads the module, finds the token and logs in.
func Open(cfg Config, log *slog.Logger) (*Backend, error) {
	if cfg.MaxSessions < 2 {
		return nil, fmt.Errorf("hsm: max sessions: got %d, want at least 2", cfg.MaxSessions)
	}
	p11, err := configure(cfg)
	if err != nil {
		return nil, classify("open token", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backend{cfg: cfg, p11: p11, log: log, keys: make(map[string]crypto11.Signer)}, nil
}

func configure(cfg Config) (*crypto11.Context, error) {
	return crypto11.Configure(&crypto11.Config{
		Path:            cfg.ModulePath,
		TokenLabel:      cfg.TokenLabel,
		Pin:             cfg.PIN,
		MaxSessions:     cfg.MaxSessions,
		PoolWaitTimeout: cfg.PoolWaitTimeout,
	})
}

// Close logs out and releases the module. Safe to call more than once.
func (b *Backend) Close() error {
	var err error
	b.closer.Do(func() {
		b.mu.Lock()
		p11, wait := b.p11, b.rebuild
		b.p11, b.closed = nil, true
		b.mu.Unlock()
		if wait != nil {
			<-wait
			b.mu.Lock()
			p11, b.p11 = b.p11, nil
			b.mu.Unlock()
		}
		if p11 != nil {
			err = p11.Close()
		}
	})
	return err
}

// ErrRebuilding is wrapped by the errors of calls made while the token is
// being reopened after a failure.
var errRebuilding = fmt.Errorf("hsm: reconnecting to the token: %w", broker.ErrUnavailable)

// context returns the current crypto11 context, or errRebuilding.
func (b *Backend) context() (*crypto11.Context, error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.p11 == nil {
		if b.closed {
			return nil, fmt.Errorf("hsm: backend closed: %w", broker.ErrUnavailable)
		}
		return nil, errRebuilding
	}
	return b.p11, nil
}

// failed looks at an operation's error on context p11: if it says the
// token, a session or the login is gone, that context is retired and a
// rebuild starts (once). It returns err.
func (b *Backend) failed(p11 *crypto11.Context, err error) error {
	if err == nil || !errors.Is(err, broker.ErrUnavailable) {
		return err
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		// A slow or hung token: the call gave up, the context may still
		// be good. Probe reports a hung token; reconnecting would not help.
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.p11 != p11 || b.closed {
		return err // already retired
	}
	b.p11, b.keys = nil, make(map[string]crypto11.Signer)
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
	closeQuietly(old)
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
		if errors.Is(classify("reopen token", err), broker.ErrFailedPrecondition) {
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

// closeQuietly closes a context whose sessions may all be dead; crypto11's
// Close panics when called twice and may fail on a lost token.
func closeQuietly(p11 *crypto11.Context) {
	defer func() { _ = recover() }()
	_ = p11.Close()
}

// bounded runs f, but returns when ctx ends even if the hardware does not
// answer (the call finishes later on its own goroutine).
func bounded[T any](ctx context.Context, f func() (T, error)) (T, error) {
	if ctx.Done() == nil {
		return f()
	}
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, fmt.Errorf("hsm: no answer from the token: %w (%w)", broker.ErrUnavailable, ctx.Err())
	}
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
	_, err = bounded(ctx, func() (int, error) {
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
func (b *Backend) Generate(ctx context.Context, p broker.Partition, spec broker.KeySpec) (broker.Handle, crypto.PublicKey, error) {
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
	p11, err := b.context()
	if err != nil {
		return nil, nil, err
	}
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
	b.cache(p11, id, signer)
	return broker.Handle(id), signer.Public(), nil
}

func generate(p11 *crypto11.Context, id, label []byte, spec broker.KeySpec, strict bool) (crypto11.Signer, error) {
	pub, priv, err := templates(id, label, spec.Alg.IsRSA(), strict)
	if err != nil {
		return nil, err
	}
	if spec.Alg.IsRSA() {
		return p11.GenerateRSAKeyPairWithAttributes(pub, priv, spec.Bits)
	}
	return p11.GenerateECDSAKeyPairWithAttributes(pub, priv, spec.Alg.Curve())
}

// cache remembers a key pair found on context p11, unless p11 was retired.
func (b *Backend) cache(p11 *crypto11.Context, id []byte, signer crypto11.Signer) {
	b.mu.Lock()
	if b.p11 == p11 {
		b.keys[string(id)] = signer
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
func (b *Backend) Sign(ctx context.Context, p broker.Partition, h broker.Handle, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p11, signer, err := b.find(ctx, h)
	if err != nil {
		return nil, err
	}
	if pss, ok := opts.(*rsa.PSSOptions); ok && pss.SaltLength != rsa.PSSSaltLengthEqualsHash {
		return nil, &broker.FieldError{Field: "padding", Reason: "PSS salt length must equal the hash length"}
	}
	switch signer.Public().(type) {
	case *ecdsa.PublicKey:
		if _, ok := opts.(*rsa.PSSOptions); ok {
			return nil, &broker.FieldError{Field: "padding", Reason: "PSS is for RSA keys"}
		}
	}
	if len(digest) != opts.HashFunc().Size() {
		return nil, &broker.FieldError{Field: "digest", Reason: fmt.Sprintf("length: got %d bytes, want %d", len(digest), opts.HashFunc().Size())}
	}
	sig, err := bounded(ctx, func() ([]byte, error) {
		b.inUse.Add(1)
		defer b.inUse.Add(-1)
		return signer.Sign(nil, digest, opts)
	})
	if err != nil {
		return nil, b.failed(p11, classify("sign", err))
	}
	return sig, nil
}

// Destroy deletes both halves of the key pair h.
func (b *Backend) Destroy(ctx context.Context, p broker.Partition, h broker.Handle) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p11, signer, err := b.find(ctx, h)
	if err != nil {
		return err
	}
	if err := signer.Delete(); err != nil {
		return b.failed(p11, classify("destroy key", err))
	}
	b.mu.Lock()
	delete(b.keys, string(h))
	b.mu.Unlock()
	return nil
}

// find returns the current context and the key pair with CKA_ID h on it,
// from the cache or the token.
func (b *Backend) find(ctx context.Context, h broker.Handle) (*crypto11.Context, crypto11.Signer, error) {
	if len(h) != IDLen {
		return nil, nil, fmt.Errorf("hsm: handle length: got %d, want %d: %w", len(h), IDLen, broker.ErrNotFound)
	}
	b.mu.RLock()
	p11, cached := b.p11, b.keys[string(h)]
	b.mu.RUnlock()
	if p11 == nil {
		_, err := b.context()
		return nil, nil, err
	}
	if cached != nil {
		return p11, cached, nil
	}
	found, err := bounded(ctx, func() ([]crypto11.Signer, error) { return p11.FindKeyPairs(h, nil) })
	if err != nil {
		return nil, nil, b.failed(p11, classify("find key", err))
	}
	switch len(found) {
	case 0:
		return nil, nil, fmt.Errorf("hsm: key not on the token: %w", broker.ErrNotFound)
	case 1:
	default:
		return nil, nil, fmt.Errorf("hsm: %d key pairs share one CKA_ID", len(found))
	}
	b.cache(p11, h, found[0])
	return p11, found[0], nil
}

// List returns every key pair on the token that the daemon created, with
// the partition its label names.
func (b *Backend) List(ctx context.Context) ([]broker.Object, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p11, err := b.context()
	if err != nil {
		return nil, err
	}
	found, err := listPrivateKeys(b.cfg)
	if err != nil {
		return nil, b.failed(p11, classify("list keys", err))
	}
	var objs []broker.Object
	for _, f := range found {
		if len(f.id) != IDLen {
			continue
		}
		rest, ok := strings.CutPrefix(f.label, labelPrefix)
		tenant, _, hasSlash := strings.Cut(rest, "/")
		if !ok || !hasSlash {
			continue
		}
		objs = append(objs, broker.Object{Partition: broker.Partition{Tenant: tenant}, Handle: broker.Handle(f.id)})
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
// start-up for a few thousand keys.) The module is already initialised and
// logged in by crypto11 in this process; the new session shares the login.
func listPrivateKeys(cfg Config) ([]foundKey, error) {
	mod := pkcs11.New(cfg.ModulePath)
	if mod == nil {
		return nil, fmt.Errorf("cannot load the PKCS#11 module")
	}
	defer mod.Destroy()
	if err := mod.Initialize(); err == nil {
		defer mod.Finalize()
	} else if !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return nil, err
	}
	slots, err := mod.GetSlotList(true)
	if err != nil {
		return nil, err
	}
	for _, slot := range slots {
		info, err := mod.GetTokenInfo(slot)
		if err != nil || info.Label != cfg.TokenLabel {
			continue
		}
		sess, err := mod.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
		if err != nil {
			return nil, err
		}
		defer mod.CloseSession(sess)
		if err := mod.FindObjectsInit(sess, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}); err != nil {
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
		if err := mod.FindObjectsFinal(sess); err != nil {
			return nil, err
		}
		out := make([]foundKey, 0, len(handles))
		for _, h := range handles {
			attrs, err := mod.GetAttributeValue(sess, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, nil), pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil {
				return nil, err
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
		return out, nil
	}
	return nil, pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT)
}

var _ broker.Lister = (*Backend)(nil)
