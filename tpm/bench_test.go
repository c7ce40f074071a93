package tpm

import (
	"context"
	"crypto"
	"crypto/sha256"
	"sync"
	"testing"

	"github.com/keybroker/keybroker/tpm/swtpmtest"
)

// BenchmarkSignES256 signs with one ES256 key on swtpm, from 1 and from 4
// goroutines (the backend serialises them; the second shows the cost of
// waiting for the lock).
func BenchmarkSignES256(b *testing.B) {
	for _, conc := range []int{1, 4} {
		b.Run(map[int]string{1: "c1", 4: "c4"}[conc], func(b *testing.B) {
			sim := swtpmtest.Start(b)
			be := open(b, sim, b.TempDir(), nil)
			ctx := context.Background()
			h, _, err := be.Generate(ctx, tenantA, es256)
			if err != nil {
				b.Fatal(err)
			}
			d := sha256.Sum256([]byte("benchmark"))
			// Load the key (and start its session) before timing.
			if _, err := be.Sign(ctx, tenantA, h, d[:], crypto.SHA256); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			var wg sync.WaitGroup
			for g := range conc {
				n := b.N / conc
				if g < b.N%conc {
					n++
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range n {
						if _, err := be.Sign(ctx, tenantA, h, d[:], crypto.SHA256); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
		})
	}
}
