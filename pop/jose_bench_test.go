package pop

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"testing"
)

// JOSE encoding of ECDSA signatures (Sign with format JOSE, every JWS):
//
//	go test -run '^$' -bench . -benchmem ./pop/
func BenchmarkECDSADERToJOSE(b *testing.B) {
	for _, curve := range []elliptic.Curve{elliptic.P256(), elliptic.P384()} {
		priv, err := ecdsa.GenerateKey(curve, rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		d := sha256.Sum256([]byte("bench"))
		der, err := ecdsa.SignASN1(rand.Reader, priv, d[:])
		if err != nil {
			b.Fatal(err)
		}
		b.Run(curve.Params().Name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := ECDSADERToJOSE(der, curve); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
