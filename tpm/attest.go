package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
)

// Attestation is the result of TPM2_Certify of a key by the attestation key
// (TCG TPM 2.0 Part 3 §18.2).
type Attestation struct {
	// Attest is the TPMS_ATTEST the TPM signed (the contents of the
	// TPM2B_ATTEST): magic, type TPM_ST_ATTEST_CERTIFY, the nonce as
	// extraData, and the certified key's Name.
	Attest []byte
	// Signature is the attestation key's ECDSA signature over
	// SHA-256(Attest), ASN.1 DER.
	Signature []byte
	// CertifyingKey is the TPM2B_PUBLIC of the attestation key.
	CertifyingKey []byte
	// CertifyingPublic is the attestation key's public key.
	CertifyingPublic crypto.PublicKey
}

// Attest certifies the key h with the attestation key, a restricted
// ECDSA P-256 primary in the owner hierarchy. The attestation key is the
// same for every call until the TPM is cleared, but nothing here binds it to
// the TPM's endorsement key: a relying party must trust it by enrolment
// (for example TPM2_MakeCredential/ActivateCredential against the EK),
// which this package does not do.
func (b *Backend) Attest(ctx context.Context, p kms.Partition, h kms.Handle, nonce []byte) (*Attestation, error) {
	if len(nonce) > kms.MaxNonce {
		return nil, &kms.FieldError{Field: "nonce", Reason: fmt.Sprintf("got %d bytes, want at most %d", len(nonce), kms.MaxNonce)}
	}
	k, err := decodeHandle(h)
	if err != nil {
		return nil, err
	}
	if err := checkPartition(p); err != nil {
		return nil, err
	}
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := b.checkUsable(h); err != nil {
		return nil, err
	}
	var rsp *tpm2.CertifyResponse
	var ak *object
	err = b.retry(l, func() error {
		o, err := b.loadKey(l, p.Tenant, k, nil)
		if err != nil {
			return err
		}
		ak, err = b.ak(l, []*object{o})
		if err != nil {
			return err
		}
		// Certify needs the key's ADMIN role: its auth value, as
		// adminWithPolicy is clear. An HMAC session proves it without
		// sending it.
		rsp, err = tpm2.Certify{
			ObjectHandle:   tpm2.AuthHandle{Handle: o.handle, Name: o.name, Auth: tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.Auth(k.auth))},
			SignHandle:     tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: tpm2.PasswordAuth(nil)},
			QualifyingData: tpm2.TPM2BData{Buffer: nonce},
			InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		}.Execute(l)
		return err
	})
	if err != nil {
		return nil, classify("certify", err)
	}
	sig, err := rsp.Signature.Signature.ECDSA()
	if err != nil {
		return nil, &kms.Error{Backend: "tpm", Op: "certify", Err: err}
	}
	der, err := derSignature(sig)
	if err != nil {
		return nil, err
	}
	akPub, err := publicKey(ak.public)
	if err != nil {
		return nil, &kms.Error{Backend: "tpm", Op: "certify", Err: err}
	}
	return &Attestation{
		Attest:           rsp.CertifyInfo.Bytes(),
		Signature:        der,
		CertifyingKey:    append(binary.BigEndian.AppendUint16(nil, uint16(len(ak.publicRaw))), ak.publicRaw...),
		CertifyingPublic: akPub,
	}, nil
}

// ErrAttestation is returned, wrapped, by VerifyAttestation.
var ErrAttestation = errors.New("tpm: attestation does not verify")

// VerifyAttestation checks a: the signature verifies under the restricted
// signing key CertifyingKey describes (and CertifyingPublic, when set, must
// be that key) over
// SHA-256(Attest), Attest is a TPM-made TPM_ST_ATTEST_CERTIFY structure, its
// extraData is nonce, and the Name it certifies is the Name of keyPublic
// (the certified key's TPM2B_PUBLIC, from PublicArea), whose attributes
// are those of a keybroker signing key: generated in the TPM, fixed to it
// and to its parent. Whether to trust CertifyingPublic is the caller's
// decision.
func VerifyAttestation(a *Attestation, keyPublic []byte, nonce []byte) error {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrAttestation, fmt.Sprintf(format, args...))
	}
	if a == nil {
		return fail("no attestation")
	}
	akArea, err := unwrap2B(a.CertifyingKey)
	if err != nil {
		return fail("certifying key: %v", err)
	}
	ak, err := tpm2.Unmarshal[tpm2.TPMTPublic](akArea)
	if err != nil {
		return fail("certifying key: %v", err)
	}
	if attrs := ak.ObjectAttributes; !attrs.Restricted || !attrs.SignEncrypt || !attrs.FixedTPM || attrs.Decrypt {
		// Only a restricted key refuses to sign digests that start with
		// TPM_GENERATED_VALUE, so only its TPMS_ATTEST are the TPM's.
		return fail("certifying key is not a restricted signing key of a TPM")
	}
	pub, err := publicKey(ak)
	if err != nil {
		return fail("certifying key: %v", err)
	}
	akPub, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return fail("certifying key is a %T, want ECDSA", pub)
	}
	if a.CertifyingPublic != nil && !akPub.Equal(a.CertifyingPublic) {
		return fail("certifying public key does not match the certifying key")
	}
	digest := sha256.Sum256(a.Attest)
	if !ecdsa.VerifyASN1(akPub, digest[:], a.Signature) {
		return fail("signature does not verify")
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](a.Attest)
	if err != nil {
		return fail("attest: %v", err)
	}
	if att.Magic != tpm2.TPMGeneratedValue {
		return fail("attest magic 0x%x, want TPM_GENERATED_VALUE", uint32(att.Magic))
	}
	if att.Type != tpm2.TPMSTAttestCertify {
		return fail("attest type 0x%x, want TPM_ST_ATTEST_CERTIFY", uint16(att.Type))
	}
	if !bytes.Equal(att.ExtraData.Buffer, nonce) {
		return fail("nonce does not match")
	}
	info, err := att.Attested.Certify()
	if err != nil {
		return fail("attest: %v", err)
	}
	keyArea, err := unwrap2B(keyPublic)
	if err != nil {
		return fail("key public area: %v", err)
	}
	name, err := objectName(keyArea)
	if err != nil {
		return fail("key public area: %v", err)
	}
	if !bytes.Equal(info.Name.Buffer, name) {
		return fail("the certified Name is not the key's")
	}
	// The Name binds the key's attributes: they must say that the TPM made
	// the key and never lets it out. The certifying key signs whatever the
	// TPM holds, including a software key loaded with TPM2_LoadExternal,
	// whose private half is known outside; the TPM refuses fixedTPM,
	// fixedParent and sensitiveDataOrigin to such a key.
	key, err := tpm2.Unmarshal[tpm2.TPMTPublic](keyArea)
	if err != nil {
		return fail("key public area: %v", err)
	}
	if key.ObjectAttributes != signingKeyAttributes {
		return fail("the certified key is not a signing key generated in the TPM that cannot leave it (fixedTPM, fixedParent, sensitiveDataOrigin)")
	}
	return nil
}

// unwrap2B returns the contents of a TPM2B: a big-endian uint16 size and
// exactly that many bytes.
func unwrap2B(b []byte) ([]byte, error) {
	if len(b) < 2 || int(binary.BigEndian.Uint16(b)) != len(b)-2 || len(b) == 2 {
		return nil, errors.New("not a TPM2B")
	}
	return b[2:], nil
}

var _ kms.Attester = (*Backend)(nil)

// AttestKey is the kms.Attester capability: Attest's
// TPM2_Certify, with the certified key's public area (PublicArea) attached
// so that a relying party can run VerifyAttestation.
func (b *Backend) AttestKey(ctx context.Context, p kms.Partition, h kms.Handle, nonce []byte) (kms.Attestation, error) {
	a, err := b.Attest(ctx, p, h, nonce)
	if err != nil {
		return kms.Attestation{}, err
	}
	keyPublic, err := PublicArea(h)
	if err != nil {
		return kms.Attestation{}, err
	}
	return kms.Attestation{
		Attest:        a.Attest,
		Signature:     a.Signature,
		CertifyingKey: a.CertifyingKey,
		KeyPublic:     keyPublic,
	}, nil
}
