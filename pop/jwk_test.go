package pop

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math/big"
	"strings"
	"testing"
)

// Vectors from /work/shared/PROTOCOLS.md.
const (
	// RFC 7638 §3.1.
	rfc7638N  = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
	rfc7638E  = "AQAB"
	rfc7638TP = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
	// RFC 9449 DPoP example key (P-256).
	rfc9449X  = "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs"
	rfc9449Y  = "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"
	rfc9449TP = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
)

func mustB64(t testing.TB, s string) []byte {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		t.Fatalf("decode %q: %v", s, err)
	}
	return b
}

// rfc7638Key builds the RFC 7638 RSA key from its n and e, independently of
// JWK.PublicKey.
func rfc7638Key(t testing.TB) *rsa.PublicKey {
	t.Helper()
	return &rsa.PublicKey{
		N: new(big.Int).SetBytes(mustB64(t, rfc7638N)),
		E: int(new(big.Int).SetBytes(mustB64(t, rfc7638E)).Int64()),
	}
}

// rfc9449Key builds the RFC 9449 P-256 key from its x and y, independently of
// JWK.PublicKey.
func rfc9449Key(t testing.TB) *ecdsa.PublicKey {
	t.Helper()
	pt := append([]byte{4}, mustB64(t, rfc9449X)...)
	pt = append(pt, mustB64(t, rfc9449Y)...)
	k, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), pt)
	if err != nil {
		t.Fatalf("RFC 9449 key: %v", err)
	}
	return k
}

func TestThumbprintVectors(t *testing.T) {
	tests := []struct {
		name    string
		pub     crypto.PublicKey
		wantJWK JWK
		want    string
	}{
		{
			name:    "RFC 7638 RSA",
			pub:     rfc7638Key(t),
			wantJWK: JWK{Kty: "RSA", N: rfc7638N, E: rfc7638E},
			want:    rfc7638TP,
		},
		{
			name:    "RFC 9449 P-256",
			pub:     rfc9449Key(t),
			wantJWK: JWK{Kty: "EC", Crv: "P-256", X: rfc9449X, Y: rfc9449Y},
			want:    rfc9449TP,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Thumbprint(tc.pub)
			if err != nil {
				t.Fatalf("Thumbprint: %v", err)
			}
			if got != tc.want {
				t.Errorf("Thumbprint: got %q, want %q", got, tc.want)
			}

			j, err := NewJWK(tc.pub)
			if err != nil {
				t.Fatalf("NewJWK: %v", err)
			}
			if j != tc.wantJWK {
				t.Errorf("NewJWK: got %+v, want %+v", j, tc.wantJWK)
			}

			// use, alg and kid are not part of the thumbprint (RFC 7638 §3.2).
			decorated := tc.wantJWK
			decorated.Use, decorated.Alg, decorated.Kid = "sig", "ES256", "some-kid"
			for _, jj := range []JWK{tc.wantJWK, decorated} {
				got, err := jj.Thumbprint()
				if err != nil {
					t.Fatalf("JWK%+v.Thumbprint: %v", jj, err)
				}
				if got != tc.want {
					t.Errorf("JWK%+v.Thumbprint: got %q, want %q", jj, got, tc.want)
				}
			}
		})
	}
}

func TestThumbprintURI(t *testing.T) {
	got := ThumbprintURI(rfc9449TP)
	want := "urn:ietf:params:oauth:jwk-thumbprint:sha-256:0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
	if got != want {
		t.Errorf("ThumbprintURI: got %q, want %q", got, want)
	}
}

type equaler interface {
	Equal(crypto.PublicKey) bool
}

func TestNewJWKRoundTrip(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		pub      crypto.PublicKey
		kty, crv string
		coordLen int // decoded x and y length; 0 for RSA
		nLen     int // decoded n length; 0 for EC
	}{
		{"RSA 2048", &rsaKey.PublicKey, "RSA", "", 0, 256},
		{"P-256", &p256.PublicKey, "EC", "P-256", 32, 0},
		{"P-384", &p384.PublicKey, "EC", "P-384", 48, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			j, err := NewJWK(tc.pub)
			if err != nil {
				t.Fatalf("NewJWK: %v", err)
			}
			if j.Kty != tc.kty || j.Crv != tc.crv {
				t.Errorf("kty, crv: got %q, %q, want %q, %q", j.Kty, j.Crv, tc.kty, tc.crv)
			}
			if got := len(mustB64(t, j.X)); got != tc.coordLen {
				t.Errorf("len(x): got %d, want %d", got, tc.coordLen)
			}
			if got := len(mustB64(t, j.Y)); got != tc.coordLen {
				t.Errorf("len(y): got %d, want %d", got, tc.coordLen)
			}
			if got := len(mustB64(t, j.N)); got != tc.nLen {
				t.Errorf("len(n): got %d, want %d", got, tc.nLen)
			}

			// Through JSON, as a JWK travels.
			raw, err := json.Marshal(j)
			if err != nil {
				t.Fatal(err)
			}
			var parsed JWK
			if err := json.Unmarshal(raw, &parsed); err != nil {
				t.Fatal(err)
			}
			back, err := parsed.PublicKey()
			if err != nil {
				t.Fatalf("PublicKey: %v", err)
			}
			if !tc.pub.(equaler).Equal(back) {
				t.Errorf("PublicKey: got %v, want the original key", back)
			}

			tp1, err := Thumbprint(tc.pub)
			if err != nil {
				t.Fatal(err)
			}
			tp2, err := parsed.Thumbprint()
			if err != nil {
				t.Fatal(err)
			}
			if tp1 != tp2 || len(mustB64(t, tp1)) != 32 {
				t.Errorf("thumbprints: Thumbprint(pub) = %q, JWK.Thumbprint() = %q, want equal 32-byte values", tp1, tp2)
			}
		})
	}
}

// A P-256 x coordinate below 2^248 starts with a zero byte, which must be
// kept: RFC 7518 §6.2.1.2 wants the full coordinate length.
func TestNewJWKKeepsLeadingZero(t *testing.T) {
	const maxTries = 10000 // P(no hit) = (255/256)^10000 ≈ 1e-17
	for i := 0; i < maxTries; i++ {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		pt, err := k.PublicKey.Bytes()
		if err != nil {
			t.Fatal(err)
		}
		if pt[1] != 0 { // pt = 04 || X || Y
			continue
		}
		j, err := NewJWK(&k.PublicKey)
		if err != nil {
			t.Fatalf("NewJWK: %v", err)
		}
		x := mustB64(t, j.X)
		if len(x) != 32 || x[0] != 0 {
			t.Fatalf("x: got %d bytes starting %#x, want 32 bytes starting 0x00", len(x), x[0])
		}
		if len(j.X) != 43 {
			t.Errorf("x encoding length: got %d, want 43", len(j.X))
		}
		back, err := j.PublicKey()
		if err != nil {
			t.Fatalf("PublicKey: %v", err)
		}
		if !k.PublicKey.Equal(back) {
			t.Errorf("PublicKey: got %v, want the original key", back)
		}
		return
	}
	t.Fatalf("no P-256 key with a leading zero in x after %d tries", maxTries)
}

func TestNewJWKExponent(t *testing.T) {
	n := new(big.Int).SetBytes(mustB64(t, rfc7638N))
	for _, tc := range []struct {
		e    int
		want string
	}{
		{65537, "AQAB"},
		{3, "Aw"},
		{1<<31 - 1, "f____w"},
	} {
		j, err := NewJWK(&rsa.PublicKey{N: n, E: tc.e})
		if err != nil {
			t.Fatalf("e=%d: NewJWK: %v", tc.e, err)
		}
		if j.E != tc.want {
			t.Errorf("e=%d: got %q, want %q", tc.e, j.E, tc.want)
		}
		if j.N != rfc7638N {
			t.Errorf("e=%d: n: got %q, want %q", tc.e, j.N, rfc7638N)
		}
	}
}

func TestNewJWKRejects(t *testing.T) {
	p521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	edPub, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	n := new(big.Int).SetBytes(mustB64(t, rfc7638N))
	tests := []struct {
		name    string
		pub     crypto.PublicKey
		want    error
		wantMsg string
	}{
		{"P-521", &p521.PublicKey, ErrUnsupportedKey, "curve P-521"},
		{"P-224", &p224.PublicKey, ErrUnsupportedKey, "curve P-224"},
		{"ed25519", edPub, ErrUnsupportedKey, "key type ed25519.PublicKey"},
		{"ed25519 private", edPriv, ErrUnsupportedKey, "key type ed25519.PrivateKey"},
		{"rsa value not pointer", rsa.PublicKey{N: n, E: 65537}, ErrUnsupportedKey, "key type rsa.PublicKey"},
		{"nil", nil, ErrUnsupportedKey, "key type <nil>"},
		{"nil *rsa.PublicKey", (*rsa.PublicKey)(nil), ErrInvalidKey, "nil *rsa.PublicKey"},
		{"nil *ecdsa.PublicKey", (*ecdsa.PublicKey)(nil), ErrInvalidKey, "nil *ecdsa.PublicKey"},
		{"rsa even e", &rsa.PublicKey{N: n, E: 65536}, ErrInvalidKey, "got 65536"},
		{"rsa e=1", &rsa.PublicKey{N: n, E: 1}, ErrInvalidKey, "got 1"},
		{"rsa nil n", &rsa.PublicKey{E: 65537}, ErrInvalidKey, "modulus"},
		{"ecdsa no curve", &ecdsa.PublicKey{}, ErrInvalidKey, "no curve"},
		{"ecdsa off curve", &ecdsa.PublicKey{Curve: elliptic.P256(), X: big.NewInt(1), Y: big.NewInt(1)}, ErrInvalidKey, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			j, err := NewJWK(tc.pub)
			if !errors.Is(err, tc.want) {
				t.Fatalf("NewJWK: got %+v, %v, want error %v", j, err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("NewJWK error %q does not contain %q", err, tc.wantMsg)
			}
			if tp, err := Thumbprint(tc.pub); !errors.Is(err, tc.want) {
				t.Errorf("Thumbprint: got %q, %v, want error %v", tp, err, tc.want)
			}
		})
	}
}

// flipTrailingBits returns s with its last character changed so that the
// unused low bits of the final base64 group are non-zero: a non-canonical
// encoding of the same bytes.
func flipTrailingBits(s string) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	i := strings.IndexByte(alphabet, s[len(s)-1])
	return s[:len(s)-1] + string(alphabet[i^1])
}

func TestJWKPublicKeyRejects(t *testing.T) {
	ec := JWK{Kty: "EC", Crv: "P-256", X: rfc9449X, Y: rfc9449Y}
	rs := JWK{Kty: "RSA", N: rfc7638N, E: rfc7638E}
	b := base64.RawURLEncoding.EncodeToString
	zero32 := b(make([]byte, 32))
	bigN := b(append([]byte{1}, make([]byte, maxRSABits/8)...)) // 16385 bits
	// y of the RFC 9449 key with the last bit flipped: x stays valid, the
	// point leaves the curve.
	yBytes := mustB64(t, rfc9449Y)
	yBytes[len(yBytes)-1] ^= 1

	with := func(j JWK, f func(*JWK)) JWK { f(&j); return j }
	tests := []struct {
		name    string
		jwk     JWK
		want    error
		wantMsg string
	}{
		{"no kty", with(ec, func(j *JWK) { j.Kty = "" }), ErrInvalidKey, "no kty"},
		{"kty OKP", with(ec, func(j *JWK) { j.Kty = "OKP" }), ErrUnsupportedKey, `kty "OKP"`},
		{"kty lower case", with(ec, func(j *JWK) { j.Kty = "ec" }), ErrUnsupportedKey, `kty "ec"`},

		{"EC no crv", with(ec, func(j *JWK) { j.Crv = "" }), ErrInvalidKey, "no crv"},
		{"EC P-521", with(ec, func(j *JWK) { j.Crv = "P-521" }), ErrUnsupportedKey, `curve "P-521"`},
		{"EC secp256k1", with(ec, func(j *JWK) { j.Crv = "secp256k1" }), ErrUnsupportedKey, `curve "secp256k1"`},
		{"EC P-384 with P-256 coordinates", with(ec, func(j *JWK) { j.Crv = "P-384" }), ErrInvalidKey, "x length: got 32 bytes, want 48"},
		{"EC no x", with(ec, func(j *JWK) { j.X = "" }), ErrInvalidKey, "no x"},
		{"EC no y", with(ec, func(j *JWK) { j.Y = "" }), ErrInvalidKey, "no y"},
		{"EC x 31 bytes", with(ec, func(j *JWK) { j.X = b(mustB64(t, rfc9449X)[1:]) }), ErrInvalidKey, "x length: got 31 bytes, want 32"},
		{"EC x 33 bytes", with(ec, func(j *JWK) { j.X = b(append([]byte{0}, mustB64(t, rfc9449X)...)) }), ErrInvalidKey, "x length: got 33 bytes, want 32"},
		{"EC y 31 bytes", with(ec, func(j *JWK) { j.Y = b(mustB64(t, rfc9449Y)[1:]) }), ErrInvalidKey, "y length: got 31 bytes, want 32"},
		{"EC point not on curve", with(ec, func(j *JWK) { j.Y = b(yBytes) }), ErrInvalidKey, "point"},
		{"EC point at zero", with(ec, func(j *JWK) { j.X, j.Y = zero32, zero32 }), ErrInvalidKey, "point"},
		{"EC padded x", with(ec, func(j *JWK) { j.X += "=" }), ErrInvalidKey, "x is not base64url"},
		{"EC std base64 x", with(ec, func(j *JWK) { j.X = base64.RawStdEncoding.EncodeToString(mustB64(t, "-_"+rfc9449X[2:])) }), ErrInvalidKey, "x is not base64url"},
		{"EC non-canonical x", with(ec, func(j *JWK) { j.X = flipTrailingBits(j.X) }), ErrInvalidKey, "x is not base64url"},
		{"EC with n", with(ec, func(j *JWK) { j.N = rfc7638N }), ErrInvalidKey, "RSA members"},
		{"EC with e", with(ec, func(j *JWK) { j.E = rfc7638E }), ErrInvalidKey, "RSA members"},

		{"RSA no n", with(rs, func(j *JWK) { j.N = "" }), ErrInvalidKey, "no n"},
		{"RSA no e", with(rs, func(j *JWK) { j.E = "" }), ErrInvalidKey, "no e"},
		{"RSA n leading zero", with(rs, func(j *JWK) { j.N = b(append([]byte{0}, mustB64(t, rfc7638N)...)) }), ErrInvalidKey, "n has a leading zero"},
		{"RSA e leading zero", with(rs, func(j *JWK) { j.E = b([]byte{0, 1, 0, 1}) }), ErrInvalidKey, "e has a leading zero"},
		{"RSA n zero", with(rs, func(j *JWK) { j.N = "AA" }), ErrInvalidKey, "n has a leading zero"},
		{"RSA e=1", with(rs, func(j *JWK) { j.E = "AQ" }), ErrInvalidKey, "got 1, want"},
		{"RSA e=2", with(rs, func(j *JWK) { j.E = "Ag" }), ErrInvalidKey, "got 2, want"},
		{"RSA e even", with(rs, func(j *JWK) { j.E = b([]byte{1, 0, 0}) }), ErrInvalidKey, "got 65536, want"},
		{"RSA e 2^31+1", with(rs, func(j *JWK) { j.E = b([]byte{0x80, 0, 0, 1}) }), ErrInvalidKey, "got 2147483649, want"},
		{"RSA e 5 bytes", with(rs, func(j *JWK) { j.E = b([]byte{1, 0, 0, 0, 1}) }), ErrInvalidKey, "e length: got 5 bytes, want at most 4"},
		{"RSA n too large", with(rs, func(j *JWK) { j.N = bigN }), ErrInvalidKey, "got 16385 bits, want at most 16384"},
		{"RSA padded n", with(rs, func(j *JWK) { j.N += "=" }), ErrInvalidKey, "n is not base64url"},
		{"RSA non-canonical e", with(rs, func(j *JWK) { j.E = flipTrailingBits("AQAB" + "AQ") }), ErrInvalidKey, "e is not base64url"},
		{"RSA with crv", with(rs, func(j *JWK) { j.Crv = "P-256" }), ErrInvalidKey, "EC members"},
		{"RSA with x", with(rs, func(j *JWK) { j.X = rfc9449X }), ErrInvalidKey, "EC members"},
	}
	// The unmodified JWKs are valid, so each failure below is down to its edit.
	for _, j := range []JWK{ec, rs} {
		if _, err := j.PublicKey(); err != nil {
			t.Fatalf("base JWK %+v: %v", j, err)
		}
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pub, err := tc.jwk.PublicKey()
			if !errors.Is(err, tc.want) {
				t.Fatalf("PublicKey: got %v, %v, want error %v", pub, err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("PublicKey error %q does not contain %q", err, tc.wantMsg)
			}
			if tp, err := tc.jwk.Thumbprint(); !errors.Is(err, tc.want) {
				t.Errorf("Thumbprint: got %q, %v, want error %v", tp, err, tc.want)
			}
		})
	}
}

func TestJWKJSON(t *testing.T) {
	full := JWK{Kty: "k", Use: "u", Alg: "a", Kid: "i", Crv: "c", X: "x", Y: "y", N: "n", E: "e"}
	tests := []struct {
		name string
		v    any
		want string
	}{
		{"member order", full, `{"kty":"k","use":"u","alg":"a","kid":"i","crv":"c","x":"x","y":"y","n":"n","e":"e"}`},
		{"optional omitted", JWK{}, `{"kty":""}`},
		{"EC", JWK{Kty: "EC", Crv: "P-256", X: rfc9449X, Y: rfc9449Y},
			`{"kty":"EC","crv":"P-256","x":"` + rfc9449X + `","y":"` + rfc9449Y + `"}`},
		{"JWKS nil keys", JWKS{}, `{"keys":[]}`},
		{"JWKS pointer nil keys", &JWKS{}, `{"keys":[]}`},
		{"JWKS", JWKS{Keys: []JWK{{Kty: "RSA", Kid: "1", N: "n", E: "AQAB"}}}, `{"keys":[{"kty":"RSA","kid":"1","n":"n","e":"AQAB"}]}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := json.Marshal(tc.v)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("got %s, want %s", got, tc.want)
			}
		})
	}
}

// JWK has nowhere to keep private members, so they cannot leak back out.
func TestJWKDropsPrivateMembers(t *testing.T) {
	in := `{"kty":"EC","crv":"P-256","x":"` + rfc9449X + `","y":"` + rfc9449Y + `","d":"c2VjcmV0"}`
	var j JWK
	if err := json.Unmarshal([]byte(in), &j); err != nil {
		t.Fatal(err)
	}
	out, err := json.Marshal(j)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), `"d"`) || strings.Contains(string(out), "c2VjcmV0") {
		t.Errorf("private member survived: %s", out)
	}
	if tp, err := j.Thumbprint(); err != nil || tp != rfc9449TP {
		t.Errorf("Thumbprint: got %q, %v, want %q", tp, err, rfc9449TP)
	}
}

// TestJWKWithChain: WithChain publishes the key with x5c (standard base64,
// leaf first) and the leaf's x5t#S256, the key and its thumbprint
// unchanged; no chain adds nothing.
func TestJWKWithChain(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	j, err := NewJWK(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	if got := j.WithChain(nil); got.X5c != nil || got.X5tS256 != "" || got.JWK != j {
		t.Errorf("WithChain(nil) = %+v", got)
	}
	leaf, inter := []byte{0x30, 0x01, 0xff}, []byte{0x30, 0x02, 0xfe, 0xfd}
	c := j.WithChain([][]byte{leaf, inter})
	sum := sha256.Sum256(leaf)
	if c.JWK != j || len(c.X5c) != 2 || c.X5c[0] != "MAH/" || c.X5c[1] != "MAL+/Q==" || c.X5tS256 != base64.RawURLEncoding.EncodeToString(sum[:]) {
		t.Errorf("WithChain = %+v", c)
	}
	b, err := json.Marshal(PublishedJWKS{Keys: []PublishedJWK{c}})
	if err != nil {
		t.Fatal(err)
	}
	var back JWKS // a relying party that ignores the chain reads the same key
	if err := json.Unmarshal(b, &back); err != nil || len(back.Keys) != 1 || back.Keys[0] != j {
		t.Fatalf("%s read back as %+v (%v)", b, back, err)
	}
	if !strings.Contains(string(b), `"x5c":["MAH/","MAL+/Q=="]`) || !strings.Contains(string(b), `"x5t#S256":"`+c.X5tS256+`"`) {
		t.Errorf("JSON %s", b)
	}
	if b, _ := json.Marshal(PublishedJWKS{}); string(b) != `{"keys":[]}` {
		t.Errorf("an empty set is %s", b)
	}
}
