// Package keyring is keybroker's core: it ties the metadata store to a
// hardware backend, keeps every key version in memory for O(1) lookups, and
// implements the operations the gRPC server exposes (create, read, list,
// sign, public keys, JWKS) in terms of the kms vocabulary. It never sees
// protobuf types; the tenant is always an argument supplied by the server
// from the authenticated caller.
package keyring

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
	"github.com/keybroker/keybroker/rotation"
)

// Keyring serves keys from memory and signs through the backend.
type Keyring struct {
	backend     kms.Backend
	backendName string
	store       store.Store
	log         *slog.Logger
	now         func() time.Time
	failpoint   func(step string)
	fresh       func() error
	maxKeys     func(tenant string) int

	mu       sync.RWMutex
	keys     map[keyID]*key        // immutable snapshots, replaced on change
	names    map[string][]string   // per tenant, its key names sorted (keys are never removed)
	creating map[keyID]bool        // names being generated right now
	jwks     map[string][]byte     // per tenant, built on demand
	rotating map[flightKey]*flight // RotateKey calls in progress
	// listeners are told of every change install makes (events.go).
	listeners map[*listener]struct{}
	ops       sync.Map // keyID → *sync.Mutex: one writer per key

	stats stats
}

type keyID struct{ tenant, name string }

// key is an immutable snapshot of a stored key with parsed public keys.
type key struct {
	rec      store.Key
	versions []*version // ascending by version number
	active   *version
}

type version struct {
	store.Version
	pub crypto.PublicKey
	jwk pop.JWK
	// x5t and certExpires describe the imported certificate's leaf ("":
	// none).
	x5t         string
	certExpires time.Time
}

// Options configures a Keyring.
type Options struct {
	Backend     kms.Backend
	BackendName string // "pkcs11" or "tpm", shown in key metadata
	Store       store.Store
	Log         *slog.Logger
	Now         func() time.Time // defaults to time.Now
	// MaxKeys, when set, is the most keys a tenant may have (0: no limit).
	MaxKeys func(tenant string) int
	// Fresh, when set, is asked before every read of the keys in memory
	// (Sign, GetKey, ListKeys, public keys, JWKS): a replica whose copy
	// may be stale past its bound refuses (kms.ErrUnavailable).
	Fresh func() error
	// Failpoint, when set, is called at each step of a key change:
	// "before-generate", "after-generate", "before-commit",
	// "after-commit". Crash tests kill the process there.
	Failpoint func(step string)
}

// New loads every key from the store into memory.
func New(o Options) (*Keyring, error) {
	r := &Keyring{
		backend:     o.Backend,
		backendName: o.BackendName,
		store:       o.Store,
		log:         o.Log,
		now:         o.Now,
		failpoint:   o.Failpoint,
		fresh:       o.Fresh,
		maxKeys:     o.MaxKeys,
		keys:        make(map[keyID]*key),
		names:       make(map[string][]string),
		creating:    make(map[keyID]bool),
		jwks:        make(map[string][]byte),
		rotating:    make(map[flightKey]*flight),
		listeners:   make(map[*listener]struct{}),
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.failpoint == nil {
		r.failpoint = func(string) {}
	}
	if r.maxKeys == nil {
		r.maxKeys = func(string) int { return 0 }
	}
	if r.fresh == nil {
		r.fresh = func() error { return nil }
	}
	recs, err := r.store.Keys(context.Background())
	if err != nil {
		return nil, err
	}
	if err := r.load(recs); err != nil {
		return nil, err
	}
	return r, nil
}

// load puts recs in memory and indexes them by tenant.
func (r *Keyring) load(recs []store.Key) error {
	for _, rec := range recs {
		if err := rotation.Check(rec); err != nil {
			return fmt.Errorf("keyring: key %s/%s: %w", rec.Tenant, rec.Name, err)
		}
		k, err := newKey(rec)
		if err != nil {
			return fmt.Errorf("keyring: key %s/%s: %w", rec.Tenant, rec.Name, err)
		}
		r.keys[keyID{rec.Tenant, rec.Name}] = k
		r.names[rec.Tenant] = append(r.names[rec.Tenant], rec.Name)
	}
	for _, names := range r.names {
		slices.Sort(names)
	}
	return nil
}

func newKey(rec store.Key) (*key, error) {
	k := &key{rec: rec}
	for i := range rec.Versions {
		sv := rec.Versions[i]
		pub, err := x509.ParsePKIXPublicKey(sv.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("version %d: public key: %w", sv.Version, err)
		}
		if !rec.Alg.MatchesPublicKey(pub, rec.Bits) {
			return nil, fmt.Errorf("version %d: public key does not match %v", sv.Version, rec.Alg)
		}
		jwk, err := pop.NewJWK(pub)
		if err != nil {
			return nil, fmt.Errorf("version %d: %w", sv.Version, err)
		}
		jwk.Use, jwk.Alg, jwk.Kid = "sig", rec.Alg.String(), sv.Kid
		v := &version{Version: sv, pub: pub, jwk: jwk}
		if len(sv.Certificates) > 0 {
			leaf, err := x509.ParseCertificate(sv.Certificates[0])
			if err != nil {
				return nil, fmt.Errorf("version %d: certificate: %w", sv.Version, err)
			}
			v.x5t, v.certExpires = pop.X5TS256(sv.Certificates[0]), leaf.NotAfter
		}
		k.versions = append(k.versions, v)
		if sv.State == kms.StateActive {
			k.active = v
		}
	}
	return k, nil
}

// KeyInfo describes a key for the API.
type KeyInfo struct {
	Name          string
	Alg           kms.Algorithm
	Bits          int
	Backend       string
	Created       time.Time
	Policy        kms.Policy
	ActiveVersion uint32
	ActiveKid     string
	NextRotation  time.Time // when the next version becomes ACTIVE
	Versions      []VersionInfo
}

// VersionInfo describes a key version for the API.
type VersionInfo struct {
	Version                                                  uint32
	Kid                                                      string
	State                                                    kms.State
	Created, Activated, Retired, Expired, Revoked, Destroyed time.Time
	// NextState and NextTransition: what the policy does to it next.
	NextState      kms.State
	NextTransition time.Time
	// X5TS256 and CertExpires describe its imported certificate ("": none).
	X5TS256     string
	CertExpires time.Time
}

func (k *key) info() KeyInfo {
	ki := KeyInfo{Name: k.rec.Name, Alg: k.rec.Alg, Bits: k.rec.Bits, Backend: k.rec.Backend, Created: k.rec.Created,
		Policy: k.rec.Policy, NextRotation: rotation.NextRotation(k.rec)}
	if k.active != nil {
		ki.ActiveVersion, ki.ActiveKid = k.active.Version.Version, k.active.Kid
	}
	for _, v := range k.versions {
		vi := VersionInfo{Version: v.Version.Version, Kid: v.Kid, State: v.State, Created: v.Created,
			Activated: v.Activated, Retired: v.Retired, Expired: v.Expired, Revoked: v.Revoked, Destroyed: v.Destroyed,
			X5TS256: v.x5t, CertExpires: v.certExpires}
		if next, at, ok := rotation.VersionNext(k.rec, v.Version); ok {
			vi.NextState, vi.NextTransition = next, at
		}
		ki.Versions = append(ki.Versions, vi)
	}
	return ki
}

// CreateKey generates version 1 of a new key in hardware and records it.
// The name, spec and policy (zero: the default) are validated before the
// hardware is touched.
func (r *Keyring) CreateKey(ctx context.Context, tenant, name string, spec kms.KeySpec, policy kms.Policy) (KeyInfo, error) {
	if err := kms.ValidateName(name); err != nil {
		return KeyInfo{}, err
	}
	spec, err := spec.Validate()
	if err != nil {
		return KeyInfo{}, err
	}
	if policy == (kms.Policy{}) {
		policy = kms.DefaultPolicy()
	}
	if err := policy.Validate(); err != nil {
		return KeyInfo{}, err
	}
	id := keyID{tenant, name}
	r.mu.Lock()
	if r.keys[id] != nil || r.creating[id] {
		r.mu.Unlock()
		return KeyInfo{}, &kms.ClientError{Kind: kms.ErrAlreadyExists, Msg: fmt.Sprintf("key %q already exists", name)}
	}
	if max := r.maxKeys(tenant); max > 0 && r.countLocked(tenant) >= max {
		r.mu.Unlock()
		return KeyInfo{}, &kms.ClientError{Kind: kms.ErrResourceExhausted, Reason: ReasonKeyQuota,
			Msg: fmt.Sprintf("key quota exceeded: the tenant has %d keys, the most it may have", max)}
	}
	r.creating[id] = true
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.creating, id)
		r.mu.Unlock()
	}()

	now := r.now().UTC()
	rec := store.Key{Tenant: tenant, Name: name, Alg: spec.Alg, Bits: spec.Bits, Backend: r.backendName, Created: now, Policy: policy}
	v, err := r.generate(ctx, rec)
	if err != nil {
		return KeyInfo{}, err
	}
	v.Version, v.State, v.Created, v.Activated = 1, kms.StateActive, now, now
	rec.Versions = []store.Version{v}
	k, err := r.record(ctx, rec, &v, r.store.CreateKey)
	if err != nil {
		return KeyInfo{}, err
	}
	r.log.Info("key created", "tenant", tenant, "key", name, "alg", spec.Alg.String(), "bits", spec.Bits, "kid", k.active.Kid)
	return k.info(), nil
}

// ReasonKeyQuota is the ErrorInfo reason for a tenant at its key limit.
const ReasonKeyQuota = "KEY_QUOTA_EXCEEDED"

// countLocked counts the tenant's keys, including those being created. A
// key just recorded is still marked as being created until CreateKey
// returns: it counts once.
func (r *Keyring) countLocked(tenant string) int {
	n := len(r.names[tenant])
	for id := range r.creating {
		if id.tenant == tenant && r.keys[id] == nil {
			n++
		}
	}
	return n
}

// generate makes the next version of rec in hardware and returns its
// identity (handle, kid, public key); the caller fills in number, state and
// times, and must record it or destroy it.
func (r *Keyring) generate(ctx context.Context, rec store.Key) (store.Version, error) {
	spec := kms.KeySpec{Alg: rec.Alg, Bits: rec.Bits, Label: fmt.Sprintf("%s/v%d", rec.Name, rec.NextVersion())}
	p := kms.Partition{Tenant: rec.Tenant}
	if _, ok := r.backend.(kms.Lister); ok {
		// The object's ID is chosen and recorded before it exists, so
		// that Reconcile removes it after a crash before its commit, and
		// only it: other objects on the token may be another store's.
		spec.ID = make(kms.Handle, kms.ObjectIDLen)
		if _, err := rand.Read(spec.ID); err != nil {
			return store.Version{}, err
		}
		in := store.Intent{Tenant: rec.Tenant, Handle: spec.ID, Label: spec.Label, Created: r.now().UTC()}
		if err := r.store.PutIntent(ctx, in); err != nil {
			return store.Version{}, fmt.Errorf("generate %s: %w", rec.Name, err)
		}
	}
	r.failpoint("before-generate")
	h, pub, err := r.backend.Generate(ctx, p, spec)
	if err != nil {
		return store.Version{}, fmt.Errorf("generate %s: %w", rec.Name, err)
	}
	r.failpoint("after-generate")
	v, err := describe(spec, h, pub)
	if err != nil {
		r.destroyOrphan(ctx, p, h)
		return store.Version{}, fmt.Errorf("generate %s: %w", rec.Name, err)
	}
	return v, nil
}

func describe(spec kms.KeySpec, h kms.Handle, pub crypto.PublicKey) (store.Version, error) {
	if !spec.Alg.MatchesPublicKey(pub, spec.Bits) {
		return store.Version{}, fmt.Errorf("backend returned a %T that does not match %v", pub, spec.Alg)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return store.Version{}, err
	}
	kid, err := pop.Thumbprint(pub)
	if err != nil {
		return store.Version{}, err
	}
	return store.Version{Kid: kid, Handle: h, PublicKey: der}, nil
}

// record commits rec with write (one store transaction) and publishes it in
// memory. If the commit fails, the hardware object of the new version nv
// (if any) is destroyed: nothing refers to it.
func (r *Keyring) record(ctx context.Context, rec store.Key, nv *store.Version, write func(context.Context, store.Key) (int64, error)) (*key, error) {
	err := rotation.Check(rec)
	if err == nil {
		r.failpoint("before-commit")
		rec.Rev, err = write(context.WithoutCancel(ctx), rec)
	}
	if errors.Is(err, store.ErrConflict) {
		// Another replica changed the key first: take its record, so
		// that the caller can decide again on it (see retryConflicts).
		r.refresh(ctx, keyID{rec.Tenant, rec.Name})
	}
	if err == nil {
		r.failpoint("after-commit")
	}
	var k *key
	if err == nil {
		k, err = newKey(rec)
	}
	if errors.Is(err, store.ErrUncertain) {
		// The record may yet name the new object: keep it and its
		// intent, for the leader's Reconcile to settle.
		return nil, fmt.Errorf("record %s: %w", rec.Name, err)
	}
	if err != nil {
		if nv != nil {
			r.destroyOrphan(ctx, kms.Partition{Tenant: rec.Tenant}, nv.Handle)
		}
		return nil, fmt.Errorf("record %s: %w", rec.Name, err)
	}
	r.install(k)
	if nv != nil {
		r.dropIntent(ctx, rec.Tenant, nv.Handle)
	}
	return k, nil
}

// install publishes snapshot k, unless the one in memory is newer (a
// change seen through the store's watch can arrive after the writer's own),
// and tells the listeners what changed. Every path that changes a key in
// memory comes through here, so events derive from one comparison: the
// same record arriving twice (the writer's own, then the watch's) changes
// nothing the second time.
func (r *Keyring) install(k *key) {
	r.mu.Lock()
	defer r.mu.Unlock()
	id := keyID{k.rec.Tenant, k.rec.Name}
	cur := r.keys[id]
	if cur != nil && cur.rec.Rev > k.rec.Rev {
		return
	}
	if cur == nil {
		names := r.names[k.rec.Tenant]
		i, _ := slices.BinarySearch(names, k.rec.Name)
		r.names[k.rec.Tenant] = slices.Insert(names, i, k.rec.Name)
	}
	r.keys[id] = k
	delete(r.jwks, k.rec.Tenant)
	r.publishLocked(cur, k)
}

// Apply publishes a record read from the store (another replica's change,
// seen through the store's watch): Sign, GetJWKS and GetKey follow it at
// once. An older revision than the one in memory is ignored.
func (r *Keyring) Apply(rec store.Key) error {
	k, err := newKey(rec)
	if err != nil {
		return fmt.Errorf("apply %s/%s: %w", rec.Tenant, rec.Name, err)
	}
	r.install(k)
	return nil
}

// refresh reads key id from the store again and publishes it.
func (r *Keyring) refresh(ctx context.Context, id keyID) {
	rec, err := r.store.Key(context.WithoutCancel(ctx), id.tenant, id.name)
	if err == nil {
		err = r.Apply(rec)
	}
	if err != nil {
		r.log.Warn("reading a key changed by another replica", "tenant", id.tenant, "key", id.name, "err", err)
	}
}

// destroyOrphan removes the object of a version that could not be
// recorded, trying a few times: a token shared by several processes can
// fail a call now and then (SoftHSM2 answers CKR_TOKEN_NOT_PRESENT while
// another process rewrites its files). If it still fails, the intent
// stays, for the Reconcile of the next start or leader.
func (r *Keyring) destroyOrphan(ctx context.Context, p kms.Partition, h kms.Handle) {
	ctx = context.WithoutCancel(ctx)
	var err error
	for attempt := range 4 {
		if attempt > 0 {
			time.Sleep(time.Duration(attempt) * 100 * time.Millisecond)
		}
		if err = r.backend.Destroy(ctx, p, h); err == nil || errors.Is(err, kms.ErrNotFound) {
			r.dropIntent(ctx, p.Tenant, h)
			return
		}
	}
	r.log.Error("removing a hardware key that could not be recorded", "tenant", p.Tenant, "err", err)
}

// dropIntent removes the intent of an object now recorded or destroyed. A
// failure leaves it for Reconcile, which finds the object recorded (and
// keeps it) or gone.
func (r *Keyring) dropIntent(ctx context.Context, tenant string, h kms.Handle) {
	if _, ok := r.backend.(kms.Lister); !ok {
		return
	}
	if err := r.store.DeleteIntent(context.WithoutCancel(ctx), tenant, h); err != nil {
		r.log.Warn("removing a creation intent from the store; it is cleared at the next start", "tenant", tenant, "err", err)
	}
}

// lookup returns the key (tenant, name). A key of another tenant is
// indistinguishable from one that does not exist.
func (r *Keyring) lookup(tenant, name string) (*key, error) {
	if err := kms.ValidateName(name); err != nil {
		return nil, err
	}
	if err := r.fresh(); err != nil {
		return nil, err
	}
	r.mu.RLock()
	k := r.keys[keyID{tenant, name}]
	r.mu.RUnlock()
	if k == nil {
		return nil, kms.NotFound("key", name)
	}
	return k, nil
}

// GetKey returns a key's metadata.
func (r *Keyring) GetKey(ctx context.Context, tenant, name string) (KeyInfo, error) {
	k, err := r.lookup(tenant, name)
	if err != nil {
		return KeyInfo{}, err
	}
	return k.info(), nil
}

// MaxPageSize bounds ListKeys pages.
const MaxPageSize = 1000

// ListKeys returns up to limit of the tenant's keys whose names sort after
// `after`, and the name to pass as `after` for the next page ("" at the end).
func (r *Keyring) ListKeys(ctx context.Context, tenant, after string, limit int) ([]KeyInfo, string, error) {
	if limit < 0 || limit > MaxPageSize {
		return nil, "", &kms.FieldError{Field: "page_size", Reason: fmt.Sprintf("got %d, want 0..%d", limit, MaxPageSize)}
	}
	if limit == 0 {
		limit = 100
	}
	if after != "" {
		if err := kms.ValidateName(after); err != nil {
			return nil, "", &kms.FieldError{Field: "page_token", Reason: "not a token from a previous response"}
		}
	}
	if err := r.fresh(); err != nil {
		return nil, "", err
	}
	r.mu.RLock()
	names := r.names[tenant]
	if after != "" {
		i, found := slices.BinarySearch(names, after)
		if found {
			i++
		}
		names = names[i:]
	}
	next := ""
	if len(names) > limit {
		names = names[:limit]
		next = names[limit-1]
	}
	out := make([]KeyInfo, len(names))
	for i, n := range names {
		out[i] = r.keys[keyID{tenant, n}].info()
	}
	r.mu.RUnlock()
	return out, next, nil
}

// VersionRef selects a key version: by number, by kid, or (both zero) the
// active one.
type VersionRef struct {
	Version uint32
	Kid     string
}

func (k *key) version(ref VersionRef) (*version, error) {
	switch {
	case ref.Version != 0 && ref.Kid != "":
		return nil, &kms.FieldError{Field: "kid", Reason: "give a version or a kid, not both"}
	case ref.Version != 0:
		for _, v := range k.versions {
			if v.Version.Version == ref.Version {
				return v, nil
			}
		}
		return nil, &kms.ClientError{Kind: kms.ErrNotFound, Msg: fmt.Sprintf("key %q has no version %d", k.rec.Name, ref.Version)}
	case ref.Kid != "":
		for _, v := range k.versions {
			if v.Kid == ref.Kid {
				return v, nil
			}
		}
		return nil, &kms.ClientError{Kind: kms.ErrNotFound, Msg: fmt.Sprintf("key %q has no version with kid %q", k.rec.Name, ref.Kid)}
	}
	if k.active == nil {
		return nil, &kms.ClientError{Kind: kms.ErrFailedPrecondition, Msg: fmt.Sprintf("key %q has no active version", k.rec.Name)}
	}
	return k.active, nil
}

// ReasonNotUsable is the ErrorInfo reason for a version that cannot sign.
const ReasonNotUsable = "KEY_VERSION_NOT_USABLE"

func notUsable(name string, v *version) error {
	return &kms.ClientError{
		Kind:   kms.ErrFailedPrecondition,
		Msg:    fmt.Sprintf("key %q version %d is %v and cannot sign", name, v.Version.Version, v.State),
		Reason: ReasonNotUsable,
		Meta:   map[string]string{"state": strings.ToUpper(v.State.String()), "version": strconv.FormatUint(uint64(v.Version.Version), 10)},
	}
}

// SignRequest is a request to sign a digest.
type SignRequest struct {
	Name    string
	Ref     VersionRef
	Digest  []byte
	Hash    crypto.Hash // 0: the algorithm's hash
	Padding kms.Padding
	JOSE    bool // ECDSA as r||s instead of DER
	// csr lets a PENDING version sign: only CertificateRequest sets it,
	// for a CSR it builds itself (see there).
	csr bool
}

// Signature is a signature and the key version that made it.
type Signature struct {
	Signature []byte
	Kid       string
	Version   uint32
	Alg       kms.Algorithm
}

// Sign validates the request completely, then signs in hardware (after
// ctx's admission check, see WithAdmission).
func (r *Keyring) Sign(ctx context.Context, tenant string, req SignRequest) (Signature, error) {
	k, err := r.lookup(tenant, req.Name)
	if err != nil {
		return Signature{}, err
	}
	v, err := k.version(req.Ref)
	if err != nil {
		return Signature{}, err
	}
	if !v.State.CanSign() && !(req.csr && v.State == kms.StatePending) {
		return Signature{}, notUsable(req.Name, v)
	}
	opts, err := kms.SignerOpts(k.rec.Alg, req.Hash, req.Padding, req.Digest)
	if err != nil {
		return Signature{}, err
	}
	if err := admit(ctx); err != nil {
		return Signature{}, err
	}
	sig, err := r.backend.Sign(ctx, kms.Partition{Tenant: tenant}, v.Handle, req.Digest, opts)
	if err != nil {
		return Signature{}, err
	}
	if req.JOSE && k.rec.Alg.IsEC() {
		if sig, err = pop.ECDSADERToJOSE(sig, k.rec.Alg.Curve()); err != nil {
			return Signature{}, fmt.Errorf("encode signature: %w", err)
		}
	}
	return Signature{Signature: sig, Kid: v.Kid, Version: v.Version.Version, Alg: k.rec.Alg}, nil
}

// PublicKey is the public half of a key version.
type PublicKey struct {
	Kid     string
	Version uint32
	Alg     kms.Algorithm
	Key     crypto.PublicKey
	DER     []byte // PKIX
	JWK     pop.JWK
	// Chain is the imported certificate chain (DER, leaf first), X5TS256
	// its leaf's thumbprint and CertExpires its leaf's NotAfter; empty
	// when none was imported.
	Chain       [][]byte
	X5TS256     string
	CertExpires time.Time
}

// publicKey describes version v of k.
func (k *key) publicKey(v *version) PublicKey {
	return PublicKey{Kid: v.Kid, Version: v.Version.Version, Alg: k.rec.Alg, Key: v.pub, DER: v.PublicKey, JWK: v.jwk,
		Chain: v.Certificates, X5TS256: v.x5t, CertExpires: v.certExpires}
}

// PublicKey returns a version's public key, from memory.
func (r *Keyring) PublicKey(ctx context.Context, tenant, name string, ref VersionRef) (PublicKey, error) {
	k, err := r.lookup(tenant, name)
	if err != nil {
		return PublicKey{}, err
	}
	v, err := k.version(ref)
	if err != nil {
		return PublicKey{}, err
	}
	return k.publicKey(v), nil
}

// JWKS returns the tenant's JWK Set: every published version of every key,
// ordered by key name and version. It is served from memory.
func (r *Keyring) JWKS(ctx context.Context, tenant string) ([]byte, error) {
	if err := r.fresh(); err != nil {
		return nil, err
	}
	r.mu.RLock()
	b, ok := r.jwks[tenant]
	r.mu.RUnlock()
	if ok {
		return b, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if b, ok := r.jwks[tenant]; ok {
		return b, nil
	}
	set := pop.PublishedJWKS{}
	for _, n := range r.names[tenant] {
		for _, v := range r.keys[keyID{tenant, n}].versions {
			if v.State.Published() {
				set.Keys = append(set.Keys, v.jwk.WithChain(v.Certificates))
			}
		}
	}
	b, err := json.Marshal(set)
	if err != nil {
		return nil, err
	}
	r.jwks[tenant] = b
	return b, nil
}

// Probe checks that the backend answers.
func (r *Keyring) Probe(ctx context.Context) error { return r.backend.Probe(ctx) }
