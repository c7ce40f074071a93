// Package hsm is keybroker's PKCS#11 backend, built on crypto11 and
// miekg/pkcs11. Keys are generated on the token with an explicit
// non-extractable template and addressed by a random CKA_ID, which is the
// broker.Handle the store persists. Only the daemon's wiring and tests import
// it; everything else sees a broker.Backend.
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
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/keybroker/keybroker/internal/broker"
)

// IDLen is the length of the random CKA_ID of each key.
const IDLen = 16

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
type Backend struct {
	p11    *crypto11.Context
	log    *slog.Logger
	closer sync.Once

	mu   sync.RWMutex
	keys map[string]crypto11.Signer // by CKA_ID
}

var _ broker.Backend = (*Backend)(nil)

// Open loads the module, finds the token and logs in.
func Open(cfg Config, log *slog.Logger) (*Backend, error) {
	if cfg.MaxSessions < 2 {
		return nil, fmt.Errorf("hsm: max sessions: got %d, want at least 2", cfg.MaxSessions)
	}
	p11, err := crypto11.Configure(&crypto11.Config{
		Path:            cfg.ModulePath,
		TokenLabel:      cfg.TokenLabel,
		Pin:             cfg.PIN,
		MaxSessions:     cfg.MaxSessions,
		PoolWaitTimeout: cfg.PoolWaitTimeout,
	})
	if err != nil {
		return nil, classify("open token", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backend{p11: p11, log: log, keys: make(map[string]crypto11.Signer)}, nil
}

// Close logs out and releases the module. Safe to call more than once.
func (b *Backend) Close() error {
	var err error
	b.closer.Do(func() { err = b.p11.Close() })
	return err
}

// Probe asks the token for one random byte: a cheap round trip through a
// pooled session.
func (b *Backend) Probe(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r, err := b.p11.NewRandomReader()
	if err == nil {
		_, err = io.ReadFull(r, make([]byte, 1))
	}
	return classify("probe", err)
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
	id := make([]byte, IDLen)
	if _, err := rand.Read(id); err != nil {
		return nil, nil, err
	}
	label := []byte(labelPrefix + p.Tenant + "/" + spec.Label)

	signer, err := b.generate(id, label, spec, true)
	if isTemplateError(err) {
		// The token does not accept CKA_MODIFIABLE/CKA_COPYABLE; they are
		// only "where the token accepts them".
		signer, err = b.generate(id, label, spec, false)
	}
	if err != nil {
		return nil, nil, classify("generate key", err)
	}
	if err := b.checkAttributes(signer); err != nil {
		if derr := signer.Delete(); derr != nil {
			b.log.Error("deleting a key that failed the attribute check", "err", derr)
		}
		return nil, nil, err
	}
	b.mu.Lock()
	b.keys[string(id)] = signer
	b.mu.Unlock()
	return broker.Handle(id), signer.Public(), nil
}

func (b *Backend) generate(id, label []byte, spec broker.KeySpec, strict bool) (crypto11.Signer, error) {
	pub, priv, err := templates(id, label, spec.Alg.IsRSA(), strict)
	if err != nil {
		return nil, err
	}
	if spec.Alg.IsRSA() {
		return b.p11.GenerateRSAKeyPairWithAttributes(pub, priv, spec.Bits)
	}
	return b.p11.GenerateECDSAKeyPairWithAttributes(pub, priv, spec.Alg.Curve())
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

func (b *Backend) checkAttributes(signer crypto11.Signer) error {
	types := make([]crypto11.AttributeType, len(requiredPrivate))
	for i, r := range requiredPrivate {
		types[i] = r.typ
	}
	got, err := b.p11.GetAttributes(signer, types)
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
	signer, err := b.find(h)
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
	sig, err := signer.Sign(nil, digest, opts)
	if err != nil {
		return nil, classify("sign", err)
	}
	return sig, nil
}

// Destroy deletes both halves of the key pair h.
func (b *Backend) Destroy(ctx context.Context, p broker.Partition, h broker.Handle) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	signer, err := b.find(h)
	if err != nil {
		return err
	}
	if err := signer.Delete(); err != nil {
		return classify("destroy key", err)
	}
	b.mu.Lock()
	delete(b.keys, string(h))
	b.mu.Unlock()
	return nil
}

// find returns the key pair with CKA_ID h, from the cache or the token.
func (b *Backend) find(h broker.Handle) (crypto11.Signer, error) {
	if len(h) != IDLen {
		return nil, fmt.Errorf("hsm: handle length: got %d, want %d: %w", len(h), IDLen, broker.ErrNotFound)
	}
	b.mu.RLock()
	cached, ok := b.keys[string(h)]
	b.mu.RUnlock()
	if ok {
		return cached, nil
	}
	found, err := b.p11.FindKeyPairs(h, nil)
	if err != nil {
		return nil, classify("find key", err)
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("hsm: key not on the token: %w", broker.ErrNotFound)
	case 1:
	default:
		return nil, fmt.Errorf("hsm: %d key pairs share one CKA_ID", len(found))
	}
	signer := found[0]
	b.mu.Lock()
	b.keys[string(h)] = signer
	b.mu.Unlock()
	return signer, nil
}

// List returns every key pair on the token that the daemon created, with
// the partition its label names.
func (b *Backend) List(ctx context.Context) ([]broker.Object, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	pairs, err := b.p11.FindAllKeyPairs()
	if err != nil {
		return nil, classify("list keys", err)
	}
	var objs []broker.Object
	for _, signer := range pairs {
		attrs, err := b.p11.GetAttributes(signer, []crypto11.AttributeType{pkcs11.CKA_ID, pkcs11.CKA_LABEL})
		if err != nil {
			return nil, classify("read key attributes", err)
		}
		id, label := attrs[pkcs11.CKA_ID], attrs[pkcs11.CKA_LABEL]
		if id == nil || label == nil || len(id.Value) != IDLen {
			continue
		}
		rest, ok := strings.CutPrefix(string(label.Value), labelPrefix)
		tenant, _, found := strings.Cut(rest, "/")
		if !ok || !found {
			continue
		}
		objs = append(objs, broker.Object{Partition: broker.Partition{Tenant: tenant}, Handle: broker.Handle(id.Value)})
	}
	return objs, nil
}

var _ broker.Lister = (*Backend)(nil)
