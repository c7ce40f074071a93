package hsm

// Key templates and the attribute checks of a generated key.

import (
	"errors"
	"fmt"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/keybroker/keybroker/kms"
)

func generate(p11 *crypto11.Context, id, label []byte, spec kms.KeySpec, strict bool) (crypto11.Signer, error) {
	pub, priv, err := templates(id, label, spec.Alg.IsRSA(), strict)
	if err != nil {
		return nil, err
	}
	if spec.Alg.IsRSA() {
		return p11.GenerateRSAKeyPairWithAttributes(pub, priv, spec.Bits)
	}
	return p11.GenerateECDSAKeyPairWithAttributes(pub, priv, spec.Alg.Curve())
}

// templates returns the public and private key templates. Every security
// relevant attribute is explicit rather than left to crypto11's defaults or
// the token's (PKCS#11 v2.40 §4.9, §4.14).
func templates(id, label []byte, isRSA, strict bool) (pub, priv crypto11.AttributeSet, err error) {
	pub, err = crypto11.NewAttributeSetWithIDAndLabel(id, label)
	if err != nil {
		return nil, nil, err
	}
	priv, err = crypto11.NewAttributeSetWithIDAndLabel(id, label)
	if err != nil {
		return nil, nil, err
	}
	pubAttrs := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	if isRSA {
		pubAttrs = append(pubAttrs, pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false))
	}
	privAttrs := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN_RECOVER, false),
	}
	if strict {
		privAttrs = append(privAttrs,
			pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, false))
	}
	for _, a := range pubAttrs {
		pub[a.Type] = a
	}
	for _, a := range privAttrs {
		priv[a.Type] = a
	}
	return pub, priv, nil
}

// requiredPrivate lists the attributes a generated private key must read
// back with, and their values.
var requiredPrivate = []struct {
	typ  uint
	name string
	want bool
}{
	{pkcs11.CKA_TOKEN, "CKA_TOKEN", true},
	{pkcs11.CKA_PRIVATE, "CKA_PRIVATE", true},
	{pkcs11.CKA_SENSITIVE, "CKA_SENSITIVE", true},
	{pkcs11.CKA_ALWAYS_SENSITIVE, "CKA_ALWAYS_SENSITIVE", true},
	{pkcs11.CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false},
	{pkcs11.CKA_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE", true},
	{pkcs11.CKA_LOCAL, "CKA_LOCAL", true},
	{pkcs11.CKA_SIGN, "CKA_SIGN", true},
	{pkcs11.CKA_DECRYPT, "CKA_DECRYPT", false},
	{pkcs11.CKA_UNWRAP, "CKA_UNWRAP", false},
	{pkcs11.CKA_DERIVE, "CKA_DERIVE", false},
}

// ErrWeakKey is returned when a generated key does not read back with the
// required attributes; the key is deleted.
var ErrWeakKey = errors.New("hsm: generated key does not have the required attributes")

func checkAttributes(p11 *crypto11.Context, signer crypto11.Signer) error {
	types := make([]crypto11.AttributeType, len(requiredPrivate))
	for i, r := range requiredPrivate {
		types[i] = r.typ
	}
	got, err := p11.GetAttributes(signer, types)
	if err != nil {
		return classify("read key attributes", err)
	}
	for _, r := range requiredPrivate {
		a := got[r.typ]
		if a == nil || len(a.Value) != 1 || (a.Value[0] != 0) != r.want {
			return fmt.Errorf("%w: %s is not %v", ErrWeakKey, r.name, r.want)
		}
	}
	return nil
}
