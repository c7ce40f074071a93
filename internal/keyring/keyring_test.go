package keyring

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"errors"
	"log/slog"
	"math/big"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

func TestMain(m *testing.M) { softhsmtest.Main(m) }

// recorder counts Generate and Destroy calls on a real backend.
type recorder struct {
	kms.Backend
	generated, destroyed atomic.Int64
}

func (r *recorder) Generate(ctx context.Context, p kms.Partition, s kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	r.generated.Add(1)
	return r.Backend.Generate(ctx, p, s)
}

func (r *recorder) Destroy(ctx context.Context, p kms.Partition, h kms.Handle) error {
	r.destroyed.Add(1)
	return r.Backend.Destroy(ctx, p, h)
}

func openHSM(t testing.TB, tok *softhsm.Token) *hsm.Backend {
	t.Helper()
	b, err := hsm.Open(hsm.Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 4, PoolWaitTimeout: 10 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func openStore(t testing.TB, path string) store.Store {
	t.Helper()
	st, err := store.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestRestartKeepsKids(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	dbPath := filepath.Join(t.TempDir(), "kb.db")
	ctx := context.Background()

	b := openHSM(t, tok)
	st := openStore(t, dbPath)
	ring, err := New(Options{Backend: b, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	specs := map[string]kms.KeySpec{"ec": {Alg: kms.ES384}, "rsa": {Alg: kms.PS256, Bits: 2048}}
	kids := map[string]string{}
	for name, spec := range specs {
		k, err := ring.CreateKey(ctx, "t", name, spec, kms.Policy{})
		if err != nil {
			t.Fatal(err)
		}
		kids[name] = k.ActiveKid
	}
	jwks1, _ := ring.JWKS(ctx, "t")
	st.Close()
	b.Close()

	b = openHSM(t, tok)
	defer b.Close()
	st = openStore(t, dbPath)
	defer st.Close()
	ring, err = New(Options{Backend: b, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	for name, spec := range specs {
		k, err := ring.GetKey(ctx, "t", name)
		if err != nil {
			t.Fatal(err)
		}
		if k.ActiveKid != kids[name] || k.Alg != spec.Alg {
			t.Errorf("%s after restart: kid %s alg %v, want %s %v", name, k.ActiveKid, k.Alg, kids[name], spec.Alg)
		}
		digest := make([]byte, spec.Alg.Hash().Size())
		sig, err := ring.Sign(ctx, "t", SignRequest{Name: name, Digest: digest})
		if err != nil {
			t.Fatalf("Sign %s after restart: %v", name, err)
		}
		if sig.Kid != kids[name] {
			t.Errorf("Sign %s used kid %s, want %s", name, sig.Kid, kids[name])
		}
	}
	if jwks2, _ := ring.JWKS(ctx, "t"); string(jwks2) != string(jwks1) {
		t.Errorf("JWKS changed across restart:\n%s\n%s", jwks1, jwks2)
	}
}

func TestConcurrentCreateSameName(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	b := &recorder{Backend: openHSM(t, tok)}
	defer b.Close()
	st := openStore(t, filepath.Join(t.TempDir(), "kb.db"))
	defer st.Close()
	ring, err := New(Options{Backend: b, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	const n = 20
	var wg sync.WaitGroup
	var ok, exists atomic.Int64
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := ring.CreateKey(context.Background(), "t", "same", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
			switch {
			case err == nil:
				ok.Add(1)
			case errors.Is(err, kms.ErrAlreadyExists):
				exists.Add(1)
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 1 || exists.Load() != n-1 {
		t.Errorf("got %d created and %d already-exists, want 1 and %d", ok.Load(), exists.Load(), n-1)
	}
	if g := b.generated.Load(); g != 1 {
		t.Errorf("%d hardware keys generated, want 1", g)
	}
}

// TestCreateRollsBackHardwareKey: when the record cannot be written, the
// new hardware key is destroyed and the name stays free.
func TestCreateRollsBackHardwareKey(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	b := &recorder{Backend: openHSM(t, tok)}
	defer b.Close()
	st := openStore(t, filepath.Join(t.TempDir(), "kb.db"))
	ring, err := New(Options{Backend: b, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	st.Close() // every write now fails
	_, err = ring.CreateKey(context.Background(), "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
	if err == nil {
		t.Fatal("CreateKey succeeded with a closed store")
	}
	if b.generated.Load() != 1 || b.destroyed.Load() != 1 {
		t.Errorf("generated %d, destroyed %d; want 1 and 1", b.generated.Load(), b.destroyed.Load())
	}
	if _, err := ring.GetKey(context.Background(), "t", "k"); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("GetKey after failed create: got %v, want ErrNotFound", err)
	}
}

// TestTenantsAreSeparate: a key of one tenant is answered exactly like a
// key that does not exist for another.
func TestTenantsAreSeparate(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	b := openHSM(t, tok)
	defer b.Close()
	st := openStore(t, filepath.Join(t.TempDir(), "kb.db"))
	defer st.Close()
	ring, err := New(Options{Backend: b, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := ring.CreateKey(ctx, "a", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	_, errForeign := ring.Sign(ctx, "b", SignRequest{Name: "k", Digest: make([]byte, 32)})
	_, errAbsent := ring.Sign(ctx, "b", SignRequest{Name: "zz", Digest: make([]byte, 32)})
	if !errors.Is(errForeign, kms.ErrNotFound) {
		t.Fatalf("foreign key: got %v, want ErrNotFound", errForeign)
	}
	if errForeign.Error() != `key "k" not found` || errAbsent.Error() != `key "zz" not found` {
		t.Errorf("messages differ in form: %q vs %q", errForeign, errAbsent)
	}
	if keys, _, _ := ring.ListKeys(ctx, "b", "", 0); len(keys) != 0 {
		t.Errorf("tenant b lists %d keys, want 0", len(keys))
	}
	if j, _ := ring.JWKS(ctx, "b"); string(j) != `{"keys":[]}` {
		t.Errorf("tenant b JWKS %s, want empty", j)
	}
	// The same name is free in another tenant.
	if _, err := ring.CreateKey(ctx, "b", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
		t.Errorf("same name in tenant b: %v", err)
	}
}

func TestSignJOSE(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	b := openHSM(t, tok)
	defer b.Close()
	st := openStore(t, filepath.Join(t.TempDir(), "kb.db"))
	defer st.Close()
	ring, _ := New(Options{Backend: b, Store: st})
	ctx := context.Background()
	for alg, size := range map[kms.Algorithm]int{kms.ES256: 64, kms.ES384: 96} {
		name := map[kms.Algorithm]string{kms.ES256: "p256", kms.ES384: "p384"}[alg]
		if _, err := ring.CreateKey(ctx, "t", name, kms.KeySpec{Alg: alg}, kms.Policy{}); err != nil {
			t.Fatal(err)
		}
		pk, _ := ring.PublicKey(ctx, "t", name, VersionRef{})
		for i := 0; i < 20; i++ { // enough to hit short r or s now and then
			digest := make([]byte, alg.Hash().Size())
			digest[0] = byte(i)
			sig, err := ring.Sign(ctx, "t", SignRequest{Name: name, Digest: digest, JOSE: true})
			if err != nil {
				t.Fatal(err)
			}
			if len(sig.Signature) != size {
				t.Fatalf("%v JOSE signature: got %d bytes, want %d", alg, len(sig.Signature), size)
			}
			var r, s = new(big.Int).SetBytes(sig.Signature[:size/2]), new(big.Int).SetBytes(sig.Signature[size/2:])
			if !ecdsa.Verify(pk.Key.(*ecdsa.PublicKey), digest, r, s) {
				t.Fatalf("%v JOSE signature does not verify", alg)
			}
		}
	}
}

// TestAdmission: a context's admission check runs once per hardware
// signature (Sign, and the signers of Signer), after the request is valid;
// its refusal is returned as it is and nothing is signed.
func TestAdmission(t *testing.T) {
	ring := newRing(t, Options{})
	if _, err := ring.CreateKey(context.Background(), "t", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	var calls int
	refuse := errors.New("over quota")
	var answer error
	ctx := WithAdmission(context.Background(), func() error { calls++; return answer })
	digest := make([]byte, 32)

	// Invalid requests never reach the check.
	if _, err := ring.Sign(ctx, "t", SignRequest{Name: "k", Digest: digest[:31]}); err == nil {
		t.Fatal("Sign with a short digest succeeded")
	}
	if _, err := ring.Sign(ctx, "t", SignRequest{Name: "absent", Digest: digest}); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("Sign of an absent key: got %v, want ErrNotFound", err)
	}
	if _, err := ring.Sign(ctx, "other", SignRequest{Name: "k", Digest: digest}); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("Sign of another tenant's key: got %v, want ErrNotFound", err)
	}
	if calls != 0 {
		t.Fatalf("admission checked %d times for requests refused before signing", calls)
	}

	// Admitted: one check per signature.
	if _, err := ring.Sign(ctx, "t", SignRequest{Name: "k", Digest: digest}); err != nil {
		t.Fatal(err)
	}
	vs, err := ring.Signer(ctx, "t", "k", VersionRef{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vs.Crypto(ctx).Sign(nil, digest, crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	if calls != 2 {
		t.Fatalf("admission checked %d times for 2 signatures", calls)
	}

	// Refused: the refusal itself comes back, marked as the signature's
	// failure when a VersionSigner met it.
	answer = refuse
	if _, err := ring.Sign(ctx, "t", SignRequest{Name: "k", Digest: digest}); err != refuse {
		t.Fatalf("Sign refused admission: got %v, want the refusal itself", err)
	}
	_, err = vs.Crypto(ctx).Sign(nil, digest, crypto.SHA256)
	var se *SignError
	if !errors.As(err, &se) || se.Err != refuse {
		t.Fatalf("VersionSigner refused admission: got %v, want a *SignError of the refusal", err)
	}

	// Without a check, signing is not limited here.
	if _, err := ring.Sign(context.Background(), "t", SignRequest{Name: "k", Digest: digest}); err != nil {
		t.Fatal(err)
	}
	if calls != 4 {
		t.Fatalf("admission checked %d times, want 4", calls)
	}
}

// pauseAt is a log handler that holds the first goroutine logging msg until
// released: a way to stop CreateKey between recording a key and returning.
type pauseAt struct {
	msg              string
	paused           *atomic.Bool
	reached, release chan struct{}
}

func (h pauseAt) Enabled(context.Context, slog.Level) bool { return true }
func (h pauseAt) Handle(_ context.Context, r slog.Record) error {
	if r.Message == h.msg && h.paused.CompareAndSwap(false, true) {
		close(h.reached)
		<-h.release
	}
	return nil
}
func (h pauseAt) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h pauseAt) WithGroup(string) slog.Handler      { return h }

// TestKeyQuotaCountsANewKeyOnce: a key recorded by a CreateKey that has not
// returned yet counts once against the quota, not twice (found by review:
// a second key was refused while the tenant had one of two).
func TestKeyQuotaCountsANewKeyOnce(t *testing.T) {
	h := pauseAt{msg: "key created", paused: new(atomic.Bool), reached: make(chan struct{}), release: make(chan struct{})}
	r := newRing(t, Options{Log: slog.New(h), MaxKeys: func(string) int { return 2 }})
	ctx := context.Background()
	first := make(chan error, 1)
	go func() {
		_, err := r.CreateKey(ctx, "t", "k1", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
		first <- err
	}()
	select {
	case <-h.reached: // k1 is recorded; its CreateKey has not returned
	case <-time.After(30 * time.Second):
		t.Fatal("the first CreateKey did not record its key")
	}
	_, err := r.CreateKey(ctx, "t", "k2", kms.KeySpec{Alg: kms.ES256}, kms.Policy{})
	close(h.release)
	if e := <-first; e != nil {
		t.Fatal(e)
	}
	if err != nil {
		t.Errorf("the second of two allowed keys: %v", err)
	}
	// The quota still holds: a third key is refused.
	if _, err := r.CreateKey(ctx, "t", "k3", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); !errors.Is(err, kms.ErrResourceExhausted) {
		t.Errorf("a third key over a quota of 2: got %v, want ErrResourceExhausted", err)
	}
}

// newRing returns a keyring on a fresh SoftHSM2 token and store, with o's
// other options; both are closed when the test ends.
func newRing(t *testing.T, o Options) *Keyring {
	t.Helper()
	o.Backend = openHSM(t, softhsmtest.NewToken(t))
	t.Cleanup(func() { o.Backend.(*hsm.Backend).Close() })
	o.Store = openStore(t, filepath.Join(t.TempDir(), "kb.db"))
	t.Cleanup(func() { o.Store.Close() })
	r, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
