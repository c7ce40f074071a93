package keyring

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
)

// Benchmarks of the keyring's hot paths with 10,000 keys across 1,000
// tenants, on a backend that answers at once, so only the keyring's own
// cost is measured:
//
//	go test -run '^$' -bench . -benchmem ./internal/keyring/

const (
	benchTenants   = 1000
	benchPerTenant = 10
)

// instantBackend signs with a fixed ES256 signature: no hardware, no
// crypto, nothing but the call.
type instantBackend struct{ sig []byte }

func (b instantBackend) Generate(context.Context, kms.Partition, kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	return nil, nil, fmt.Errorf("instantBackend: no Generate")
}

func (b instantBackend) Sign(context.Context, kms.Partition, kms.Handle, []byte, crypto.SignerOpts) ([]byte, error) {
	return b.sig, nil
}
func (instantBackend) Destroy(context.Context, kms.Partition, kms.Handle) error { return nil }
func (instantBackend) Probe(context.Context) error                              { return nil }
func (instantBackend) Close() error                                             { return nil }

var (
	benchRecsOnce sync.Once
	benchRecs     []store.Key
	benchSig      []byte
)

// benchKeyRecords returns benchTenants×benchPerTenant ES256 key records,
// made once per test binary (P-256 in software: about a second).
func benchKeyRecords(tb testing.TB) ([]store.Key, []byte) {
	tb.Helper()
	benchRecsOnce.Do(func() {
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		for t := range benchTenants {
			for n := range benchPerTenant {
				priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				if err != nil {
					panic(err)
				}
				v, err := describe(kms.KeySpec{Alg: kms.ES256}, kms.Handle(fmt.Sprintf("%016d", t*benchPerTenant+n)), priv.Public())
				if err != nil {
					panic(err)
				}
				v.Version, v.State, v.Created, v.Activated = 1, kms.StateActive, now, now
				benchRecs = append(benchRecs, store.Key{
					Tenant: fmt.Sprintf("t%04d", t), Name: fmt.Sprintf("key-%02d", n), Alg: kms.ES256,
					Backend: "bench", Created: now, Policy: kms.DefaultPolicy(), Versions: []store.Version{v},
				})
				if benchSig == nil {
					d := sha256.Sum256([]byte("bench"))
					if benchSig, err = ecdsa.SignASN1(rand.Reader, priv, d[:]); err != nil {
						panic(err)
					}
				}
			}
		}
	})
	return benchRecs, benchSig
}

// benchRing is a keyring holding the records of benchKeyRecords, loaded
// as New loads a store (without writing 10,000 store transactions).
func benchRing(b *testing.B) *Keyring {
	b.Helper()
	recs, sig := benchKeyRecords(b)
	st := openStore(b, filepath.Join(b.TempDir(), "kb.db"))
	b.Cleanup(func() { st.Close() })
	r, err := New(Options{Backend: instantBackend{sig: sig}, BackendName: "bench", Store: st})
	if err != nil {
		b.Fatal(err)
	}
	if err := r.load(recs); err != nil {
		b.Fatal(err)
	}
	return r
}

func BenchmarkLookup10k(b *testing.B) {
	r := benchRing(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.lookup("t0500", "key-05"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSign10k(b *testing.B) {
	r := benchRing(b)
	digest := sha256.Sum256([]byte("bench"))
	for _, jose := range []bool{false, true} {
		b.Run(fmt.Sprintf("jose=%v", jose), func(b *testing.B) {
			ctx := context.Background()
			req := SignRequest{Name: "key-05", Digest: digest[:], JOSE: jose}
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := r.Sign(ctx, "t0500", req); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// BenchmarkListKeys10k lists one tenant's 10 keys among 10,000: the cost
// depends on the tenant's keys only.
func BenchmarkListKeys10k(b *testing.B) {
	r := benchRing(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		keys, _, err := r.ListKeys(ctx, "t0500", "", 0)
		if err != nil || len(keys) != benchPerTenant {
			b.Fatal(len(keys), err)
		}
	}
}

func BenchmarkJWKS10k(b *testing.B) {
	r := benchRing(b)
	ctx := context.Background()
	b.Run("cached", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := r.JWKS(ctx, "t0500"); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("rebuilt", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			r.mu.Lock()
			delete(r.jwks, "t0500")
			r.mu.Unlock()
			if _, err := r.JWKS(ctx, "t0500"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkLoad10k is the in-memory part of a start with 10,000 keys:
// parsing every public key and building the JWKs and the tenant index.
func BenchmarkLoad10k(b *testing.B) {
	recs, sig := benchKeyRecords(b)
	st := openStore(b, filepath.Join(b.TempDir(), "kb.db"))
	defer st.Close()
	b.ReportAllocs()
	for b.Loop() {
		r, err := New(Options{Backend: instantBackend{sig: sig}, Store: st})
		if err != nil {
			b.Fatal(err)
		}
		if err := r.load(recs); err != nil {
			b.Fatal(err)
		}
	}
}
