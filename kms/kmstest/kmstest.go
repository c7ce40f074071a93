// Package kmstest is the conformance suite every kms.Backend passes,
// run against real hardware (SoftHSM2, swtpm) by each backend's tests.
package kmstest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/keybroker/keybroker/kms"
)

// Suite configures the conformance run for one backend.
type Suite struct {
	// New returns a fresh backend; the suite closes it.
	New func(t testing.TB) kms.Backend
	// Specs are the key specs the backend supports.
	Specs []kms.KeySpec
}

// AllSpecs is every algorithm and RSA size keybroker knows.
func AllSpecs() []kms.KeySpec {
	return []kms.KeySpec{
		{Alg: kms.ES256}, {Alg: kms.ES384},
		{Alg: kms.RS256, Bits: 2048}, {Alg: kms.RS256, Bits: 3072}, {Alg: kms.RS256, Bits: 4096},
		{Alg: kms.PS256, Bits: 2048}, {Alg: kms.PS256, Bits: 3072}, {Alg: kms.PS256, Bits: 4096},
	}
}

// Name is a subtest name for a spec, e.g. "RS256-3072".
func Name(s kms.KeySpec) string {
	if s.Alg.IsRSA() {
		return fmt.Sprintf("%v-%d", s.Alg, s.Bits)
	}
	return s.Alg.String()
}

// Run runs the whole suite.
func (s Suite) Run(t *testing.T) {
	t.Run("SignVerify", s.testSignVerify)
	t.Run("BadDigest", s.testBadDigest)
	t.Run("Destroy", s.testDestroy)
	t.Run("Concurrent", s.testConcurrent)
	t.Run("Probe", s.testProbe)
	t.Run("List", s.testList)
	t.Run("Partitions", s.testPartitions)
	t.Run("AfterClose", s.testAfterClose)
	t.Run("CancelledContext", s.testCancelled)
}

var part = kms.Partition{Tenant: "conformance"}

func (s Suite) backend(t *testing.T) kms.Backend {
	t.Helper()
	b := s.New(t)
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := b.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
	return b
}

// Verify checks sig over digest with pub under opts; it is exported for
// other hardware tests.
func Verify(pub crypto.PublicKey, digest, sig []byte, opts crypto.SignerOpts) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(k, digest, sig) {
			return errors.New("ECDSA signature does not verify")
		}
		return nil
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			// Strict: the salt must be exactly the hash length.
			return rsa.VerifyPSS(k, opts.HashFunc(), digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: pss.Hash})
		}
		return rsa.VerifyPKCS1v15(k, opts.HashFunc(), digest, sig)
	}
	return fmt.Errorf("unexpected public key %T", pub)
}

func digestFor(t testing.TB, h crypto.Hash) []byte {
	d := make([]byte, h.Size())
	if _, err := rand.Read(d); err != nil {
		t.Fatal(err)
	}
	return d
}

func (s Suite) testSignVerify(t *testing.T) {
	b := s.backend(t)
	ctx := context.Background()
	for _, spec := range s.Specs {
		t.Run(Name(spec), func(t *testing.T) {
			h, pub, err := b.Generate(ctx, part, spec)
			if err != nil {
				t.Fatalf("Generate: %v", err)
			}
			if !spec.Alg.MatchesPublicKey(pub, spec.Bits) {
				t.Fatalf("public key %T does not match %s", pub, Name(spec))
			}
			for _, hash := range []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512} {
				opts, err := kms.SignerOpts(spec.Alg, hash, kms.PaddingDefault, digestFor(t, hash))
				if err != nil {
					t.Fatal(err)
				}
				digest := digestFor(t, hash)
				sig, err := b.Sign(ctx, part, h, digest, opts)
				if err != nil {
					t.Fatalf("Sign %v: %v", hash, err)
				}
				if err := Verify(pub, digest, sig, opts); err != nil {
					t.Fatalf("%v: %v", hash, err)
				}
				digest[0] ^= 1
				if Verify(pub, digest, sig, opts) == nil {
					t.Fatalf("%v: signature verifies over a different digest", hash)
				}
			}
			if err := b.Destroy(ctx, part, h); err != nil {
				t.Fatalf("Destroy: %v", err)
			}
		})
	}
}

// testBadDigest: for every algorithm, a digest whose length does not match
// the hash, or a hash the backend does not know, is ErrInvalidArgument.
func (s Suite) testBadDigest(t *testing.T) {
	b := s.backend(t)
	ctx := context.Background()
	for _, spec := range s.Specs {
		if spec.Alg.IsRSA() && spec.Bits != 2048 {
			continue // one RSA size is enough for the checks
		}
		t.Run(Name(spec), func(t *testing.T) {
			h, _, err := b.Generate(ctx, part, spec)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Destroy(ctx, part, h)
			for _, hash := range []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512} {
				for _, n := range []int{0, 1, hash.Size() - 1, hash.Size() + 1} {
					_, err := b.Sign(ctx, part, h, make([]byte, n), hash)
					if !errors.Is(err, kms.ErrInvalidArgument) {
						t.Errorf("Sign with a %d-byte %v digest: got %v, want ErrInvalidArgument", n, hash, err)
					}
				}
			}
			if _, err := b.Sign(ctx, part, h, make([]byte, 20), crypto.SHA1); !errors.Is(err, kms.ErrInvalidArgument) {
				t.Errorf("Sign with SHA-1: got %v, want ErrInvalidArgument", err)
			}
		})
	}
}

// testList: a backend that lists its objects (kms.Lister) lists a key
// under the partition it was made in, and no longer once destroyed.
func (s Suite) testList(t *testing.T) {
	b := s.backend(t)
	l, ok := b.(kms.Lister)
	if !ok {
		t.Skip("the backend does not list its objects (no kms.Lister)")
	}
	ctx := context.Background()
	h, _, err := b.Generate(ctx, part, s.Specs[0])
	if err != nil {
		t.Fatal(err)
	}
	listed := func() bool {
		objs, err := l.List(ctx)
		if err != nil {
			t.Fatalf("List: %v", err)
		}
		for _, o := range objs {
			if string(o.Handle) == string(h) {
				if o.Partition != part {
					t.Errorf("listed under %+v, want %+v", o.Partition, part)
				}
				return true
			}
		}
		return false
	}
	if !listed() {
		t.Fatal("a new key is not listed")
	}
	if err := b.Destroy(ctx, part, h); err != nil {
		t.Fatal(err)
	}
	if listed() {
		t.Error("a destroyed key is still listed")
	}
}

func (s Suite) testDestroy(t *testing.T) {
	b := s.backend(t)
	ctx := context.Background()
	spec := s.Specs[0]
	h, _, err := b.Generate(ctx, part, spec)
	if err != nil {
		t.Fatal(err)
	}
	opts := spec.Alg.Hash()
	if _, err := b.Sign(ctx, part, h, digestFor(t, opts), opts); err != nil {
		t.Fatalf("Sign before Destroy: %v", err)
	}
	if err := b.Destroy(ctx, part, h); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if _, err := b.Sign(ctx, part, h, digestFor(t, opts), opts); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("Sign after Destroy: got %v, want ErrNotFound", err)
	}
	if err := b.Destroy(ctx, part, h); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("second Destroy: got %v, want ErrNotFound", err)
	}
}

func (s Suite) testConcurrent(t *testing.T) {
	b := s.backend(t)
	ctx := context.Background()
	spec := s.Specs[0]
	h, pub, err := b.Generate(ctx, part, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Destroy(ctx, part, h)
	const n = 50
	opts := spec.Alg.Hash()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			digest := make([]byte, opts.Size())
			rand.Read(digest)
			sig, err := b.Sign(ctx, part, h, digest, opts)
			if err == nil {
				err = Verify(pub, digest, sig, opts)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func (s Suite) testProbe(t *testing.T) {
	b := s.backend(t)
	if err := b.Probe(context.Background()); err != nil {
		t.Fatalf("Probe: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.Probe(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Probe with a canceled context: got %v, want context.Canceled", err)
	}
}

// testPartitions: a handle made under one partition is, under another,
// exactly what an unknown handle is (ErrNotFound): it neither signs nor is
// destroyed, and it still signs under its own.
func (s Suite) testPartitions(t *testing.T) {
	b := s.backend(t)
	ctx := context.Background()
	spec := s.Specs[0]
	opts := spec.Alg.Hash()
	h, pub, err := b.Generate(ctx, part, spec)
	if err != nil {
		t.Fatal(err)
	}
	other := kms.Partition{Tenant: "conformance-other"}
	if _, err := b.Sign(ctx, other, h, digestFor(t, opts), opts); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Sign under another partition: got %v, want ErrNotFound", err)
	}
	if err := b.Destroy(ctx, other, h); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Destroy under another partition: got %v, want ErrNotFound", err)
	}
	d := digestFor(t, opts)
	sig, err := b.Sign(ctx, part, h, d, opts)
	if err != nil {
		t.Fatalf("Sign under its own partition after the refusals: %v", err)
	}
	if err := Verify(pub, d, sig, opts); err != nil {
		t.Errorf("signature: %v", err)
	}
}

// testAfterClose: a closed backend refuses calls with ErrUnavailable, and
// does not panic.
func (s Suite) testAfterClose(t *testing.T) {
	b := s.New(t)
	ctx := context.Background()
	spec := s.Specs[0]
	opts := spec.Alg.Hash()
	h, _, err := b.Generate(ctx, part, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := b.Sign(ctx, part, h, digestFor(t, opts), opts); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Sign after Close: got %v, want ErrUnavailable", err)
	}
	if _, _, err := b.Generate(ctx, part, spec); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Generate after Close: got %v, want ErrUnavailable", err)
	}
	if err := b.Probe(ctx); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Probe after Close: got %v, want ErrUnavailable", err)
	}
}

// testCancelled: a call whose context is already done fails with the
// context's error and reaches no hardware.
func (s Suite) testCancelled(t *testing.T) {
	b := s.backend(t)
	spec := s.Specs[0]
	opts := spec.Alg.Hash()
	h, _, err := b.Generate(context.Background(), part, spec)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := b.Sign(ctx, part, h, digestFor(t, opts), opts); !errors.Is(err, context.Canceled) {
		t.Errorf("Sign with a cancelled context: got %v, want context.Canceled", err)
	}
	if _, _, err := b.Generate(ctx, part, spec); !errors.Is(err, context.Canceled) {
		t.Errorf("Generate with a cancelled context: got %v, want context.Canceled", err)
	}
	if err := b.Destroy(ctx, part, h); !errors.Is(err, context.Canceled) {
		t.Errorf("Destroy with a cancelled context: got %v, want context.Canceled", err)
	}
	if _, err := b.Sign(context.Background(), part, h, digestFor(t, opts), opts); err != nil {
		t.Errorf("Sign after the cancelled calls: %v", err)
	}
}
