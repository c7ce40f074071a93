package kms

import (
	"crypto"
	"testing"
)

// Request validation runs on every Sign before the hardware:
//
//	go test -run '^$' -bench . -benchmem ./kms/
func BenchmarkValidateName(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if err := ValidateName("payments-pop.key_2026"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSignerOpts(b *testing.B) {
	d32, d48 := make([]byte, 32), make([]byte, 48)
	for _, c := range []struct {
		name   string
		alg    Algorithm
		hash   crypto.Hash
		pad    Padding
		digest []byte
	}{
		{"ES256", ES256, 0, PaddingDefault, d32},
		{"ES384", ES384, 0, PaddingDefault, d48},
		{"RS256", RS256, 0, PaddingDefault, d32},
		{"PS256", PS256, 0, PaddingDefault, d32},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := SignerOpts(c.alg, c.hash, c.pad, c.digest); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
