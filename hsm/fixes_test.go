package hsm

import (
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"
	"github.com/thales-e-security/pool"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

// objectsWithID counts the objects of class with CKA_ID id on b's token.
func objectsWithID(t *testing.T, b *Backend, class uint, id []byte) int {
	t.Helper()
	var n int
	err := withTokenSession(b.cfg, false, func(mod *pkcs11.Ctx, sess pkcs11.SessionHandle) error {
		hs, err := findObjects(mod, sess, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		})
		n = len(hs)
		return err
	})
	if err != nil {
		t.Fatalf("counting objects: %v", err)
	}
	return n
}

func current(b *Backend) *crypto11.Context {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.p11
}

// A key deleted behind the cache is NotFound for Sign and Destroy, without
// retiring the context, and its cache entry goes.
func TestStaleCachedKeyIsNotFound(t *testing.T) {
	b := open(t)
	ctx := context.Background()
	p := kms.Partition{Tenant: "t"}
	h, _, err := b.Generate(ctx, p, kms.KeySpec{Alg: kms.ES256, Label: "k/v1"})
	if err != nil {
		t.Fatal(err)
	}
	p11, signer, err := b.find(ctx, p, h)
	if err != nil {
		t.Fatal(err)
	}
	if err := signer.Delete(); err != nil { // another replica deletes it
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	if _, err := b.Sign(ctx, p, h, d[:], crypto.SHA256); !errors.Is(err, kms.ErrNotFound) || errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Sign with a deleted key: got %v, want NotFound only", err)
	}
	b.mu.RLock()
	_, cached := b.keys[string(h)]
	b.mu.RUnlock()
	if cached {
		t.Error("deleted key still cached")
	}
	if err := b.Destroy(ctx, p, h); !errors.Is(err, kms.ErrNotFound) || errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Destroy of a deleted key: got %v, want NotFound only", err)
	}
	if current(b) != p11 {
		t.Error("the context was retired")
	}
}

// Two concurrent Destroy calls of one cached key delete both halves, never
// report UNAVAILABLE and never retire the context.
func TestConcurrentDestroy(t *testing.T) {
	b := open(t)
	ctx := context.Background()
	p := kms.Partition{Tenant: "t"}
	d := sha256.Sum256([]byte("x"))
	p11 := current(b)
	for i := range 15 {
		h, _, err := b.Generate(ctx, p, kms.KeySpec{Alg: kms.ES256, Label: "k/v1"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.Sign(ctx, p, h, d[:], crypto.SHA256); err != nil { // caches it
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for j := range errs {
			wg.Go(func() { errs[j] = b.Destroy(ctx, p, h) })
		}
		wg.Wait()
		if errs[0] != nil && errs[1] != nil {
			t.Errorf("iteration %d: both Destroy calls failed: %v / %v", i, errs[0], errs[1])
		}
		for _, err := range errs {
			if err != nil && !errors.Is(err, kms.ErrNotFound) {
				t.Errorf("iteration %d: Destroy: %v", i, err)
			}
		}
		for _, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
			if n := objectsWithID(t, b, class, h); n != 0 {
				t.Errorf("iteration %d: %d objects of class %d left", i, n, class)
			}
		}
		if err := b.Destroy(ctx, p, h); !errors.Is(err, kms.ErrNotFound) {
			t.Errorf("iteration %d: third Destroy: got %v, want NotFound", i, err)
		}
	}
	if current(b) != p11 {
		t.Error("the context was retired")
	}
}

// Destroy deletes a public half left alone on the token.
func TestDestroyOrphanPublicHalf(t *testing.T) {
	b := open(t)
	ctx := context.Background()
	p := kms.Partition{Tenant: "t"}
	h, _, err := b.Generate(ctx, p, kms.KeySpec{Alg: kms.ES256, Label: "k/v1"})
	if err != nil {
		t.Fatal(err)
	}
	err = withTokenSession(b.cfg, true, func(mod *pkcs11.Ctx, sess pkcs11.SessionHandle) error {
		hs, err := findObjects(mod, sess, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(h)),
		})
		if err != nil || len(hs) != 1 {
			return fmt.Errorf("private half: %d, %v", len(hs), err)
		}
		return mod.DestroyObject(sess, hs[0])
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Destroy(ctx, p, h); err != nil {
		t.Fatalf("Destroy of a lone public half: %v", err)
	}
	if n := objectsWithID(t, b, pkcs11.CKO_PUBLIC_KEY, h); n != 0 {
		t.Errorf("%d public halves left", n)
	}
	if err := b.Destroy(ctx, p, h); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("second Destroy: got %v, want NotFound", err)
	}
}

// A lookup that overlapped a Destroy does not cache what it found.
func TestNoCachingAcrossDestroy(t *testing.T) {
	b := open(t)
	ctx := context.Background()
	h, _, err := b.Generate(ctx, kms.Partition{}, kms.KeySpec{Alg: kms.ES256})
	if err != nil {
		t.Fatal(err)
	}
	p11, signer, err := b.find(ctx, kms.Partition{}, h)
	if err != nil {
		t.Fatal(err)
	}
	b.mu.RLock()
	epoch := b.epoch
	b.mu.RUnlock()
	b.forget(h)
	b.cache(p11, epoch, h, cachedKey{signer: signer}) // a find that started before the Destroy
	b.mu.RLock()
	_, cached := b.keys[string(h)]
	b.mu.RUnlock()
	if cached {
		t.Error("a key pair found before a Destroy was cached after it")
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want error // nil: internal
	}{
		{pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID), kms.ErrNotFound},
		{pkcs11.Error(pkcs11.CKR_KEY_HANDLE_INVALID), kms.ErrNotFound},
		{pkcs11.Error(pkcs11.CKR_DEVICE_MEMORY), kms.ErrResourceExhausted},
		{pkcs11.Error(pkcs11.CKR_HOST_MEMORY), kms.ErrResourceExhausted},
		{pkcs11.Error(pkcs11.CKR_FUNCTION_FAILED), nil},
		{pkcs11.Error(pkcs11.CKR_GENERAL_ERROR), nil},
		{pkcs11.Error(pkcs11.CKR_DEVICE_ERROR), kms.ErrUnavailable},
		{pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED), kms.ErrUnavailable},
		{pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID), kms.ErrUnavailable},
		{pkcs11.Error(pkcs11.CKR_SESSION_CLOSED), kms.ErrUnavailable},
		{pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN), kms.ErrUnavailable},
		{pkcs11.Error(pkcs11.CKR_PIN_INCORRECT), kms.ErrFailedPrecondition},
		{pool.ErrClosed, kms.ErrUnavailable},
		{errors.New("context is closed"), kms.ErrUnavailable},
		{pool.ErrTimeout, kms.ErrResourceExhausted},
	} {
		err := classify("op", tc.err)
		for _, kind := range []error{kms.ErrNotFound, kms.ErrResourceExhausted, kms.ErrUnavailable, kms.ErrFailedPrecondition} {
			if got := errors.Is(err, kind); got != (kind == tc.want) {
				t.Errorf("classify(%v): errors.Is(%v) = %v", tc.err, kind, got)
			}
		}
		var e *kms.Error
		if !errors.As(err, &e) || e.Kind != tc.want {
			t.Errorf("classify(%v): kind %v, want %v", tc.err, e.Kind, tc.want)
		}
	}
}

// List on a module that crypto11 does not hold (so not logged in: private
// keys would be invisible) is UNAVAILABLE, not an empty list.
func TestListWithoutLogin(t *testing.T) {
	// List's session must see private keys even when crypto11 has not
	// logged this module instance in.
	b := open(t)
	ctx := context.Background()
	if _, _, err := b.Generate(ctx, kms.Partition{Tenant: "t"}, kms.KeySpec{Alg: kms.ES256, Label: "k/v1"}); err != nil {
		t.Fatal(err)
	}
	if objs, err := b.List(ctx); err != nil || len(objs) != 1 {
		t.Fatalf("List: %d, %v", len(objs), err)
	}
	// The window in reconnect after closeQuietly(old) finalised the module.
	b.mu.Lock()
	closeQuietly(b.p11)
	b.p11 = nil
	b.mu.Unlock()
	// Its own session logs in (as with a p11-kit module, which gives each
	// caller an instance of its own): the private key is seen, not missed.
	found, err := listPrivateKeys(b.cfg)
	if err != nil || len(found) != 1 {
		t.Errorf("listPrivateKeys without crypto11: got %d keys, %v; want 1", len(found), err)
	}
}

// An error of List's own session does not retire the crypto11 context.
func TestListErrorKeepsContext(t *testing.T) {
	b := open(t)
	p11 := current(b)
	b.cfg.TokenLabel = "no-such-token"
	_, err := b.List(context.Background())
	if !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("List on a missing token: %v", err)
	}
	if current(b) != p11 {
		t.Error("List retired the context")
	}
}

func TestSignUnknownHash(t *testing.T) {
	b := open(t)
	ctx := context.Background()
	p := kms.Partition{}
	h, _, err := b.Generate(ctx, p, kms.KeySpec{Alg: kms.RS256, Bits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	before := b.started.Load()
	for _, opts := range []crypto.SignerOpts{crypto.Hash(0), crypto.Hash(99), nil} {
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("Sign with %v panicked: %v", opts, r)
				}
			}()
			_, err := b.Sign(ctx, p, h, make([]byte, 32), opts)
			var fe *kms.FieldError
			if !errors.As(err, &fe) || fe.Field != "hash" {
				t.Errorf("Sign with %v: got %v, want a FieldError on hash", opts, err)
			}
		}()
	}
	if n := b.started.Load() - before; n != 0 {
		t.Errorf("%d hardware calls for invalid requests", n)
	}
}

// With the pool saturated and callers' deadlines shorter than
// PoolWaitTimeout, callers that time out waiting get RESOURCE_EXHAUSTED
// and their signatures are never made after they left.
func TestSaturatedPool(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	b, err := Open(Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 2, PoolWaitTimeout: 2 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	p := kms.Partition{Tenant: "t"}
	h, _, err := b.Generate(ctx, p, kms.KeySpec{Alg: kms.RS256, Bits: 4096, Label: "k/v1"})
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	t0 := time.Now()
	if _, err := b.Sign(ctx, p, h, d[:], crypto.SHA256); err != nil { // cache the key
		t.Fatal(err)
	}
	// One deadline for all callers, set before any starts: on a loaded
	// machine goroutines start far apart, and a caller that left while
	// its call ran makes the later waits look like a hung token
	// (UNAVAILABLE, by design) instead of a saturated pool. It leaves
	// time for a few signatures however slow the machine is.
	deadline := time.Now().Add(max(100*time.Millisecond, 5*time.Since(t0)))
	before := b.started.Load()
	var mu sync.Mutex
	var ok, abandoned, exhausted int
	var wg sync.WaitGroup
	for range 150 {
		wg.Go(func() {
			c, cancel := context.WithDeadline(ctx, deadline)
			defer cancel()
			_, err := b.Sign(c, p, h, d[:], crypto.SHA256)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errors.Is(err, kms.ErrUnavailable):
				abandoned++ // left while its call was running
			case errors.Is(err, kms.ErrResourceExhausted):
				exhausted++
			default:
				t.Errorf("Sign: %v", err)
			}
		})
	}
	wg.Wait()
	for start := time.Now(); b.SessionsInUse() > 0 && time.Since(start) < 10*time.Second; time.Sleep(10 * time.Millisecond) {
	}
	started := int(b.started.Load() - before)
	t.Logf("ok=%d abandoned=%d exhausted=%d; hardware calls: %d", ok, abandoned, exhausted, started)
	if exhausted == 0 {
		t.Error("no RESOURCE_EXHAUSTED")
	}
	// No hardware call for a caller already gone: each one started belongs
	// to a caller answered OK or one that left while it ran (a caller
	// may also leave before its call starts, timing on a busy machine).
	if started > ok+abandoned {
		t.Errorf("%d hardware calls for %d callers that got an answer or left during the call", started, ok+abandoned)
	}
}

// Close does not hang on a rebuild that never ends.
func TestCloseBounded(t *testing.T) {
	b := open(t)
	b.closeTimeout = 200 * time.Millisecond
	b.mu.Lock()
	real := b.p11
	stuck := make(chan struct{})
	b.p11, b.rebuild = nil, stuck // a reconnect stuck in the module
	b.mu.Unlock()
	defer closeQuietly(real)
	done := make(chan error, 1)
	go func() { done <- b.Close() }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("Close gave up without an error")
		}
	case <-time.After(5 * time.Second):
		close(stuck) // let Close and the cleanup end
		t.Fatal("Close hangs")
	}
}
