package pop

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"testing"
)

var sigCurves = []struct {
	name  string
	curve elliptic.Curve
	size  int
	hash  crypto.Hash
}{
	{"P-256", elliptic.P256(), 32, crypto.SHA256},
	{"P-384", elliptic.P384(), 48, crypto.SHA384},
}

func digest(h crypto.Hash, msg string) []byte {
	d := h.New()
	d.Write([]byte(msg))
	return d.Sum(nil)
}

// Real signatures survive DER → JOSE → DER and verify in both forms; the
// loop runs until it has also seen r or s with a leading zero byte.
func TestECDSARoundTripVerified(t *testing.T) {
	for _, c := range sigCurves {
		t.Run(c.name, func(t *testing.T) {
			key, err := ecdsa.GenerateKey(c.curve, rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			const maxTries = 10000 // P(r, s without leading zero) ≈ (254/256)^10000
			leadingZero := false
			for i := 0; i < maxTries && (i < 8 || !leadingZero); i++ {
				h := digest(c.hash, fmt.Sprintf("message %d", i))
				der, err := ecdsa.SignASN1(rand.Reader, key, h)
				if err != nil {
					t.Fatal(err)
				}
				jose, err := ECDSADERToJOSE(der, c.curve)
				if err != nil {
					t.Fatalf("ECDSADERToJOSE(%x): %v", der, err)
				}
				if len(jose) != 2*c.size {
					t.Fatalf("JOSE length: got %d, want %d", len(jose), 2*c.size)
				}
				r := new(big.Int).SetBytes(jose[:c.size])
				s := new(big.Int).SetBytes(jose[c.size:])
				if !ecdsa.Verify(&key.PublicKey, h, r, s) {
					t.Fatalf("JOSE signature %x (from DER %x) does not verify", jose, der)
				}
				back, err := ECDSAJOSEToDER(jose, c.curve)
				if err != nil {
					t.Fatalf("ECDSAJOSEToDER(%x): %v", jose, err)
				}
				if !bytes.Equal(back, der) {
					t.Fatalf("DER round trip: got %x, want %x", back, der)
				}
				if !ecdsa.VerifyASN1(&key.PublicKey, h, back) {
					t.Fatalf("DER signature %x does not verify", back)
				}
				if jose[0] == 0 || jose[c.size] == 0 {
					leadingZero = true
				}
			}
			if !leadingZero {
				t.Fatalf("no signature with a leading zero in r or s after %d tries", maxTries)
			}
		})
	}
}

// Small r and s, and values with the high bit set (which DER prefixes with a
// zero octet), convert to exactly the expected bytes.
func TestECDSAKnownValues(t *testing.T) {
	for _, c := range sigCurves {
		t.Run(c.name, func(t *testing.T) {
			nMinus1 := new(big.Int).Sub(c.curve.Params().N, big.NewInt(1))
			pairs := []struct{ r, s *big.Int }{
				{big.NewInt(1), big.NewInt(1)},
				{big.NewInt(1), big.NewInt(0x80)}, // DER 02 02 00 80
				{big.NewInt(0x0100), nMinus1},     // s has its high bit set
				{nMinus1, big.NewInt(0x7f)},
			}
			for _, p := range pairs {
				der, err := asn1.Marshal(struct{ R, S *big.Int }{p.r, p.s})
				if err != nil {
					t.Fatal(err)
				}
				want := make([]byte, 2*c.size)
				p.r.FillBytes(want[:c.size])
				p.s.FillBytes(want[c.size:])

				got, err := ECDSADERToJOSE(der, c.curve)
				if err != nil {
					t.Fatalf("ECDSADERToJOSE(%x): %v", der, err)
				}
				if !bytes.Equal(got, want) {
					t.Errorf("ECDSADERToJOSE(%x): got %x, want %x", der, got, want)
				}
				back, err := ECDSAJOSEToDER(want, c.curve)
				if err != nil {
					t.Fatalf("ECDSAJOSEToDER(%x): %v", want, err)
				}
				if !bytes.Equal(back, der) {
					t.Errorf("ECDSAJOSEToDER(%x): got %x, want %x", want, back, der)
				}
			}
		})
	}
	// One fully spelled-out vector, independent of encoding/asn1.
	der, _ := hex.DecodeString("3007020101020200ff")
	want := append(append(make([]byte, 31), 1), append(make([]byte, 31), 0xff)...)
	got, err := ECDSADERToJOSE(der, elliptic.P256())
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("ECDSADERToJOSE(%x): got %x, %v, want %x", der, got, err, want)
	}
}

// The RFC 9449 §4.1 example proof verifies with its embedded JWK once its
// JOSE signature is converted to DER.
func TestRFC9449ExampleProof(t *testing.T) {
	const proof = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
	parts := strings.Split(proof, ".")
	if len(parts) != 3 {
		t.Fatalf("proof parts: got %d, want 3", len(parts))
	}
	var hdr struct {
		JWK JWK `json:"jwk"`
	}
	if err := json.Unmarshal(mustB64(t, parts[0]), &hdr); err != nil {
		t.Fatal(err)
	}
	pub, err := hdr.JWK.PublicKey()
	if err != nil {
		t.Fatalf("header jwk: %v", err)
	}
	if tp, err := hdr.JWK.Thumbprint(); err != nil || tp != rfc9449TP {
		t.Errorf("header jwk thumbprint: got %q, %v, want %q", tp, err, rfc9449TP)
	}
	der, err := ECDSAJOSEToDER(mustB64(t, parts[2]), elliptic.P256())
	if err != nil {
		t.Fatalf("ECDSAJOSEToDER: %v", err)
	}
	h := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), h[:], der) {
		t.Errorf("RFC 9449 example proof does not verify")
	}
	jose, err := ECDSADERToJOSE(der, elliptic.P256())
	if err != nil || !bytes.Equal(jose, mustB64(t, parts[2])) {
		t.Errorf("DER back to JOSE: got %x, %v, want %x", jose, err, mustB64(t, parts[2]))
	}
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestECDSADERToJOSERejects(t *testing.T) {
	p256 := elliptic.P256()
	n256 := p256.Params().N
	marshal := func(r, s *big.Int) string {
		der, err := asn1.Marshal(struct{ R, S *big.Int }{r, s})
		if err != nil {
			t.Fatal(err)
		}
		return hex.EncodeToString(der)
	}
	two256 := new(big.Int).Lsh(big.NewInt(1), 256)
	tests := []struct {
		name    string
		der     string // hex
		curve   elliptic.Curve
		want    error
		wantMsg string
	}{
		{"valid control", "3006 020101 020101", p256, nil, ""},
		{"empty", "", p256, ErrInvalidSignature, "DER"},
		{"trailing byte", "3006 020101 020101 00", p256, ErrInvalidSignature, "got 1 trailing bytes, want 0"},
		{"trailing sequence", "3006 020101 020101 3006 020101 020101", p256, ErrInvalidSignature, "got 8 trailing bytes, want 0"},
		{"truncated", "3006 020101 0201", p256, ErrInvalidSignature, "DER"},
		{"SET not SEQUENCE", "3106 020101 020101", p256, ErrInvalidSignature, "DER"},
		{"long-form length", "308106 020101 020101", p256, ErrInvalidSignature, "DER"},
		{"indefinite length", "3080 020101 020101 0000", p256, ErrInvalidSignature, "DER"},
		{"non-minimal integer", "3007 02020001 020101", p256, ErrInvalidSignature, "DER"},
		{"extra integer", "3009 020101 020101 020101", p256, ErrInvalidSignature, "DER"},
		{"one integer", "3003 020101", p256, ErrInvalidSignature, "DER"},
		{"r zero", "3006 020100 020101", p256, ErrInvalidSignature, "r is zero or negative"},
		{"s zero", "3006 020101 020100", p256, ErrInvalidSignature, "s is zero or negative"},
		{"r negative", "3006 0201ff 020101", p256, ErrInvalidSignature, "r is zero or negative"},
		{"r 2^256", marshal(two256, big.NewInt(1)), p256, ErrInvalidSignature, "r length: got 33 bytes, want at most 32"},
		{"s 2^256", marshal(big.NewInt(1), two256), p256, ErrInvalidSignature, "s length: got 33 bytes, want at most 32"},
		{"r = n", marshal(n256, big.NewInt(1)), p256, ErrInvalidSignature, "r is not less than the curve order"},
		{"s = n", marshal(big.NewInt(1), n256), p256, ErrInvalidSignature, "s is not less than the curve order"},
		{"r > n, 32 bytes", marshal(new(big.Int).Sub(two256, big.NewInt(1)), big.NewInt(1)), p256, ErrInvalidSignature, "r is not less than the curve order"},
		{"P-384 r too long", marshal(new(big.Int).Lsh(big.NewInt(1), 384), big.NewInt(1)), elliptic.P384(), ErrInvalidSignature, "r length: got 49 bytes, want at most 48"},
		{"nil curve", "3006 020101 020101", nil, ErrUnsupportedKey, "nil curve"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			der := mustHex(t, tc.der)
			got, err := ECDSADERToJOSE(der, tc.curve)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("ECDSADERToJOSE(%x): %v", der, err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("ECDSADERToJOSE(%x): got %x, %v, want error %v", der, got, err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("error %q does not contain %q", err, tc.wantMsg)
			}
		})
	}
}

func TestECDSAJOSEToDERRejects(t *testing.T) {
	p256 := elliptic.P256()
	one := func(size int) []byte { b := make([]byte, size); b[size-1] = 1; return b }
	cat := func(a, b []byte) []byte { return append(append([]byte{}, a...), b...) }
	n := p256.Params().N.FillBytes(make([]byte, 32))
	ff := bytes.Repeat([]byte{0xff}, 32)
	tests := []struct {
		name    string
		sig     []byte
		curve   elliptic.Curve
		want    error
		wantMsg string
	}{
		{"valid control", cat(one(32), one(32)), p256, nil, ""},
		{"empty", nil, p256, ErrInvalidSignature, "got 0, want 64"},
		{"63 bytes", cat(one(31), one(32)), p256, ErrInvalidSignature, "got 63, want 64"},
		{"65 bytes", cat(one(33), one(32)), p256, ErrInvalidSignature, "got 65, want 64"},
		{"P-384 length on P-256", cat(one(48), one(48)), p256, ErrInvalidSignature, "got 96, want 64"},
		{"P-256 length on P-384", cat(one(32), one(32)), elliptic.P384(), ErrInvalidSignature, "got 64, want 96"},
		{"DER input", mustHex(t, "3006 020101 020101"), p256, ErrInvalidSignature, "got 8, want 64"},
		{"r zero", cat(make([]byte, 32), one(32)), p256, ErrInvalidSignature, "r is zero"},
		{"s zero", cat(one(32), make([]byte, 32)), p256, ErrInvalidSignature, "s is zero"},
		{"r = n", cat(n, one(32)), p256, ErrInvalidSignature, "r is not less than the curve order"},
		{"s all ones", cat(one(32), ff), p256, ErrInvalidSignature, "s is not less than the curve order"},
		{"nil curve", cat(one(32), one(32)), nil, ErrUnsupportedKey, "nil curve"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ECDSAJOSEToDER(tc.sig, tc.curve)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("ECDSAJOSEToDER(%x): %v", tc.sig, err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("ECDSAJOSEToDER(%x): got %x, %v, want error %v", tc.sig, got, err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("error %q does not contain %q", err, tc.wantMsg)
			}
		})
	}
}

// FuzzECDSADERToJOSE checks that the conversion never panics, that anything
// it accepts is canonical DER (so converting back gives the same bytes), and
// that everything it rejects is reported as ErrInvalidSignature.
func FuzzECDSADERToJOSE(f *testing.F) {
	for _, s := range []string{
		// Real signatures, P-256 and P-384.
		"3046022100eb354cf226dfe312b2d51d5ca735b09b9cb6a02f00fbc09c7a51690459acb659022100d79533b2481a9ae7b050e2007e3cd7e9d9c84b3b9a5eea4204d9b28bb1f2b960",
		"306402301c5137a10c8e39ee3acc11b97491ce89ef6d9e2080d4c4269e737907b78088f8b5a8edc4a5d87b7d43cb4805d292e2fe02304cf16a356be73c58054bc4d460595f323c4a4ab67f24eeb86e1b834e3ba49918b5205ebef31c214a87a145206f88a970",
		"3006020101020101",   // r = s = 1
		"3007020101020200ff", // s with a DER zero prefix
		"300602010102010100", // trailing byte
		"3081060201010201",   // long-form length, truncated
		"3007020200010201",   // non-minimal integer, truncated
		"3006020100020101",   // r = 0
		"",                   // empty
	} {
		f.Add(mustHex(f, s))
	}
	f.Fuzz(func(t *testing.T, der []byte) {
		for _, c := range sigCurves {
			jose, err := ECDSADERToJOSE(der, c.curve)
			if err != nil {
				if !errors.Is(err, ErrInvalidSignature) {
					t.Fatalf("%s: ECDSADERToJOSE(%x): error %v is not ErrInvalidSignature", c.name, der, err)
				}
			} else {
				if len(jose) != 2*c.size {
					t.Fatalf("%s: JOSE length: got %d, want %d", c.name, len(jose), 2*c.size)
				}
				back, err := ECDSAJOSEToDER(jose, c.curve)
				if err != nil {
					t.Fatalf("%s: ECDSAJOSEToDER(%x) of accepted DER %x: %v", c.name, jose, der, err)
				}
				if !bytes.Equal(back, der) {
					t.Fatalf("%s: DER round trip: got %x, want %x", c.name, back, der)
				}
			}

			// The same bytes read as JOSE must round-trip the other way.
			out, err := ECDSAJOSEToDER(der, c.curve)
			if err != nil {
				if !errors.Is(err, ErrInvalidSignature) {
					t.Fatalf("%s: ECDSAJOSEToDER(%x): error %v is not ErrInvalidSignature", c.name, der, err)
				}
				continue
			}
			again, err := ECDSADERToJOSE(out, c.curve)
			if err != nil {
				t.Fatalf("%s: ECDSADERToJOSE(%x) of our own DER: %v", c.name, out, err)
			}
			if !bytes.Equal(again, der) {
				t.Fatalf("%s: JOSE round trip: got %x, want %x", c.name, again, der)
			}
		}
	})
}
