package pop

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"maps"
	"math/big"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// This file holds an in-memory Signer for the tests, written against the
// standard library only (not NewSoftwareSigner), and a JWS verifier and a
// JWS crafter that are likewise independent of the code under test.

// signMode makes a testSigner misbehave the way real backends can.
type signMode int

const (
	signOK      signMode = iota
	signDER              // ECDSA: return ASN.1 DER instead of r||s
	signMaxSalt          // PSS: use the maximum salt length, as some TPMs do
)

// testSigner signs with a private key held in memory.
type testSigner struct {
	alg   string
	priv  crypto.Signer // *ecdsa.PrivateKey or *rsa.PrivateKey
	jwk   JWK
	mode  signMode
	calls atomic.Int64
}

func (s *testSigner) Alg() string { return s.alg }
func (s *testSigner) JWK() JWK    { return s.jwk }

func (s *testSigner) Sign(ctx context.Context, input []byte) ([]byte, error) {
	s.calls.Add(1)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return rawSign(s.alg, s.priv, input, s.mode)
}

// refAlgs maps an alg to its hash, independently of the package's table.
var refAlgs = map[string]crypto.Hash{
	"ES256": crypto.SHA256, "ES384": crypto.SHA384, "ES512": crypto.SHA512,
	"RS256": crypto.SHA256, "RS384": crypto.SHA384, "RS512": crypto.SHA512,
	"PS256": crypto.SHA256, "PS384": crypto.SHA384, "PS512": crypto.SHA512,
}

// rawSign produces a JWS signature with the standard library directly.
func rawSign(alg string, priv crypto.Signer, input []byte, mode signMode) ([]byte, error) {
	h := refAlgs[alg]
	d := h.New()
	d.Write(input)
	digest := d.Sum(nil)
	switch k := priv.(type) {
	case *ecdsa.PrivateKey:
		if mode == signDER {
			return ecdsa.SignASN1(rand.Reader, k, digest)
		}
		r, s, err := ecdsa.Sign(rand.Reader, k, digest)
		if err != nil {
			return nil, err
		}
		size := (k.Curve.Params().BitSize + 7) / 8
		out := make([]byte, 2*size)
		r.FillBytes(out[:size])
		s.FillBytes(out[size:])
		return out, nil
	case *rsa.PrivateKey:
		if strings.HasPrefix(alg, "PS") {
			salt := rsa.PSSSaltLengthEqualsHash
			if mode == signMaxSalt {
				salt = rsa.PSSSaltLengthAuto
			}
			return rsa.SignPSS(rand.Reader, k, h, digest, &rsa.PSSOptions{SaltLength: salt, Hash: h})
		}
		return rsa.SignPKCS1v15(rand.Reader, k, h, digest)
	}
	panic("rawSign: unexpected key type")
}

// refVerify verifies a compact JWS with the standard library directly:
// r||s for ECDSA, PKCS#1 v1.5, PSS with salt = hash length.
func refVerify(t testing.TB, compact string, pub crypto.PublicKey) bool {
	t.Helper()
	parts := strings.Split(compact, ".")
	if len(parts) != 3 {
		t.Fatalf("refVerify: %d parts", len(parts))
	}
	var hdr struct {
		Alg string `json:"alg"`
	}
	if err := json.Unmarshal(mustB64(t, parts[0]), &hdr); err != nil {
		t.Fatalf("refVerify: header: %v", err)
	}
	h, ok := refAlgs[hdr.Alg]
	if !ok {
		t.Fatalf("refVerify: alg %q", hdr.Alg)
	}
	d := h.New()
	d.Write([]byte(parts[0] + "." + parts[1]))
	digest := d.Sum(nil)
	sig := mustB64(t, parts[2])
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		size := (k.Curve.Params().BitSize + 7) / 8
		if len(sig) != 2*size {
			return false
		}
		r := new(big.Int).SetBytes(sig[:size])
		s := new(big.Int).SetBytes(sig[size:])
		return ecdsa.Verify(k, digest, r, s)
	case *rsa.PublicKey:
		if strings.HasPrefix(hdr.Alg, "PS") {
			return rsa.VerifyPSS(k, h, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: h}) == nil
		}
		return rsa.VerifyPKCS1v15(k, h, digest, sig) == nil
	}
	t.Fatalf("refVerify: key type %T", pub)
	return false
}

// craftJWS builds a JWS by hand: header and payload are JSON text (string)
// or values to marshal, signed with priv as alg says, whatever they contain.
func craftJWS(t testing.TB, alg string, priv crypto.Signer, mode signMode, header, payload any) string {
	t.Helper()
	enc := func(v any) string {
		if s, ok := v.(string); ok {
			return base64.RawURLEncoding.EncodeToString([]byte(s))
		}
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatalf("craftJWS: %v", err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	input := enc(header) + "." + enc(payload)
	sig, err := rawSign(alg, priv, []byte(input), mode)
	if err != nil {
		t.Fatalf("craftJWS: sign: %v", err)
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// keyFixtures are generated once per test binary: RSA generation is slow.
type keyFixtures struct {
	p256, p384, p521 *ecdsa.PrivateKey
	rsa2048, rsa1024 *rsa.PrivateKey
}

var fixtures = sync.OnceValue(func() keyFixtures {
	var f keyFixtures
	var err error
	must := func() {
		if err != nil {
			panic(err)
		}
	}
	f.p256, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must()
	f.p384, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	must()
	f.p521, err = ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	must()
	f.rsa2048, err = rsa.GenerateKey(rand.Reader, 2048)
	must()
	f.rsa1024, err = rsa.GenerateKey(rand.Reader, 1024)
	must()
	return f
})

// newTestSigner returns a testSigner for alg and priv whose JWK carries the
// thumbprint as kid and alg.
func newTestSigner(t testing.TB, alg string, priv crypto.Signer) *testSigner {
	t.Helper()
	j, err := NewJWK(priv.Public())
	if err != nil {
		t.Fatalf("NewJWK: %v", err)
	}
	if j.Kid, err = j.Thumbprint(); err != nil {
		t.Fatalf("Thumbprint: %v", err)
	}
	j.Alg = alg
	return &testSigner{alg: alg, priv: priv, jwk: j}
}

// signerCases are the keys every round trip runs with.
func signerCases(t testing.TB) []*testSigner {
	t.Helper()
	f := fixtures()
	return []*testSigner{
		newTestSigner(t, "ES256", f.p256),
		newTestSigner(t, "ES384", f.p384),
		newTestSigner(t, "RS256", f.rsa2048),
		newTestSigner(t, "PS256", f.rsa2048),
		newTestSigner(t, "PS384", f.rsa2048),
		newTestSigner(t, "RS512", f.rsa2048),
	}
}

// decodeSegment decodes the JSON object in part i (0 header, 1 payload) of
// a compact JWS into a map, independently of ParseJWS.
func decodeSegment(t testing.TB, compact string, i int) map[string]any {
	t.Helper()
	parts := strings.Split(compact, ".")
	if len(parts) != 3 {
		t.Fatalf("got %d parts, want 3", len(parts))
	}
	var m map[string]any
	dec := json.NewDecoder(strings.NewReader(string(mustB64(t, parts[i]))))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("part %d: %v", i, err)
	}
	return m
}

// keys returns the sorted member names of m, joined by commas.
func keys(m map[string]any) string {
	return strings.Join(slices.Sorted(maps.Keys(m)), ",")
}
