package hsm

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/kms/kmstest"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

func TestMain(m *testing.M) { softhsmtest.Main(m) }

// open provisions a fresh SoftHSM2 token and opens a backend on it.
func open(t testing.TB) *Backend {
	t.Helper()
	tok := softhsmtest.NewToken(t)
	b, err := Open(Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 8, PoolWaitTimeout: 5 * time.Second}, nil)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func TestConformance(t *testing.T) {
	kmstest.Suite{
		New:   func(t testing.TB) kms.Backend { return open(t) },
		Specs: kmstest.AllSpecs(),
	}.Run(t)
}

// TestPrivateKeyAttributes reads every generated private key's attributes
// back from the token.
func TestPrivateKeyAttributes(t *testing.T) {
	b := open(t)
	ctx := context.Background()
	for _, spec := range []kms.KeySpec{{Alg: kms.ES256}, {Alg: kms.ES384}, {Alg: kms.RS256, Bits: 2048}, {Alg: kms.PS256, Bits: 3072}} {
		t.Run(kmstest.Name(spec), func(t *testing.T) {
			h, _, err := b.Generate(ctx, kms.Partition{}, spec)
			if err != nil {
				t.Fatal(err)
			}
			_, signer, err := b.find(ctx, kms.Partition{}, h)
			if err != nil {
				t.Fatal(err)
			}
			want := map[uint]bool{
				pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_PRIVATE: true,
				pkcs11.CKA_ALWAYS_SENSITIVE: true, pkcs11.CKA_NEVER_EXTRACTABLE: true, pkcs11.CKA_LOCAL: true,
				pkcs11.CKA_DECRYPT: false, pkcs11.CKA_SIGN: true, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_DERIVE: false,
				pkcs11.CKA_TOKEN: true, pkcs11.CKA_MODIFIABLE: false, pkcs11.CKA_COPYABLE: false,
			}
			for typ, w := range want {
				a, err := b.p11.GetAttribute(signer, typ)
				if err != nil {
					t.Fatalf("attribute 0x%x: %v", typ, err)
				}
				if a == nil || len(a.Value) != 1 || (a.Value[0] != 0) != w {
					t.Errorf("attribute 0x%x: got %v, want %v", typ, a, w)
				}
			}
			id, err := b.p11.GetAttribute(signer, pkcs11.CKA_ID)
			if err != nil || string(id.Value) != string(h) {
				t.Errorf("CKA_ID: got %x (%v), want the handle %x", id.Value, err, []byte(h))
			}
			secret := []uint{pkcs11.CKA_VALUE}
			if spec.Alg.IsRSA() {
				secret = []uint{pkcs11.CKA_PRIVATE_EXPONENT, pkcs11.CKA_PRIME_1, pkcs11.CKA_PRIME_2}
			}
			for _, typ := range secret {
				_, err := b.p11.GetAttribute(signer, typ)
				var rv pkcs11.Error
				if !errors.As(err, &rv) || rv != pkcs11.CKR_ATTRIBUTE_SENSITIVE {
					t.Errorf("reading secret attribute 0x%x: got %v, want CKR_ATTRIBUTE_SENSITIVE", typ, err)
				}
			}
		})
	}
}

// TestPublicKeyAttributes checks the public half cannot encrypt or wrap.
func TestPublicKeyAttributes(t *testing.T) {
	b := open(t)
	h, _, err := b.Generate(context.Background(), kms.Partition{}, kms.KeySpec{Alg: kms.RS256, Bits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	_, signer, _ := b.find(context.Background(), kms.Partition{}, h)
	for typ, w := range map[uint]bool{pkcs11.CKA_VERIFY: true, pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_WRAP: false, pkcs11.CKA_PRIVATE: false} {
		a, err := b.p11.GetPubAttribute(signer, typ)
		if err != nil {
			t.Fatal(err)
		}
		if len(a.Value) != 1 || (a.Value[0] != 0) != w {
			t.Errorf("public attribute 0x%x: got %v, want %v", typ, a.Value, w)
		}
	}
}

// TestKeysSurviveReopen: a key is found again by its CKA_ID from a new
// context (the daemon restarting).
func TestKeysSurviveReopen(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	cfg := Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 4}
	b, err := Open(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	h, pub, err := b.Generate(ctx, kms.Partition{}, kms.KeySpec{Alg: kms.ES256})
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
	b, err = Open(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	digest := make([]byte, 32)
	sig, err := b.Sign(ctx, kms.Partition{}, h, digest, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := kmstest.Verify(pub, digest, sig, crypto.SHA256); err != nil {
		t.Fatal(err)
	}
}

func TestOpenErrors(t *testing.T) {
	tok := softhsmtest.NewToken(t)
	_, err := Open(Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: "wrong-pin-1234", MaxSessions: 4}, nil)
	if err == nil {
		t.Fatal("Open with a wrong PIN succeeded")
	}
	if strings.Contains(err.Error(), "wrong-pin-1234") {
		t.Errorf("error contains the PIN: %v", err)
	}
	if _, err := Open(Config{ModulePath: tok.ModulePath, TokenLabel: "no-such-token", PIN: tok.PIN, MaxSessions: 4}, nil); err == nil {
		t.Fatal("Open of a missing token succeeded")
	}
	if _, err := Open(Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 1}, nil); err == nil {
		t.Fatal("Open with one session succeeded")
	}
}

// TestGenerateWithChosenID: a caller may choose the key's CKA_ID (to record
// its intent before the object exists); a wrong length is refused before
// anything is generated.
func TestGenerateWithChosenID(t *testing.T) {
	b := open(t)
	ctx := context.Background()
	id := bytes.Repeat([]byte{0xa5}, IDLen)
	h, _, err := b.Generate(ctx, kms.Partition{Tenant: "t"}, kms.KeySpec{Alg: kms.ES256, Label: "k/v1", ID: id})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(h, id) {
		t.Errorf("handle %x, want the chosen ID %x", h, id)
	}
	if _, err := b.Sign(ctx, kms.Partition{Tenant: "t"}, h, make([]byte, 32), crypto.SHA256); err != nil {
		t.Errorf("Sign with the chosen-ID key: %v", err)
	}
	if _, _, err := b.Generate(ctx, kms.Partition{Tenant: "t"}, kms.KeySpec{Alg: kms.ES256, Label: "k/v2", ID: id[:5]}); err == nil {
		t.Error("Generate with a 5-byte ID succeeded")
	}
	objs, err := b.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 1 {
		t.Errorf("%d objects on the token, want 1", len(objs))
	}
}
