package tpm

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// TestVerifyAttestationRefusesSoftwareKeys: anyone who can talk to the TPM
// can have the certifying key (an owner primary without auth) certify a
// software key loaded with TPM2_LoadExternal. VerifyAttestation must not
// take that for a key held in the TPM (found by review).
func TestVerifyAttestationRefusesSoftwareKeys(t *testing.T) {
	b, _ := start(t)
	ctx := context.Background()
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader) // private key known outside the TPM
	pub := tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{SignEncrypt: true, UserWithAuth: true, NoDA: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256, KDF: tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: soft.X.FillBytes(make([]byte, 32))},
			Y: tpm2.TPM2BECCParameter{Buffer: soft.Y.FillBytes(make([]byte, 32))},
		}),
	}
	nonce := []byte("relying party nonce")
	var a *Attestation
	withTPM(t, b, func(l *link) { // an unrelated TPM user: only raw TPM commands
		for _, o := range b.objs {
			b.flush(l, o)
		}
		le, err := tpm2.LoadExternal{InPrivate: tpm2.New2B(tpm2.TPMTSensitive{SensitiveType: tpm2.TPMAlgECC, Sensitive: tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgECC, &tpm2.TPM2BECCParameter{Buffer: soft.D.FillBytes(make([]byte, 32))})}), InPublic: tpm2.New2B(pub), Hierarchy: tpm2.TPMRHNull}.Execute(l)
		if err != nil {
			t.Fatal(err)
		}
		defer tpm2.FlushContext{FlushHandle: le.ObjectHandle}.Execute(l)
		ak, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(akTemplate())}.Execute(l)
		if err != nil {
			t.Fatal(err)
		}
		defer tpm2.FlushContext{FlushHandle: ak.ObjectHandle}.Execute(l)
		rsp, err := tpm2.Certify{
			ObjectHandle:   tpm2.AuthHandle{Handle: le.ObjectHandle, Name: le.Name, Auth: tpm2.PasswordAuth(nil)},
			SignHandle:     tpm2.AuthHandle{Handle: ak.ObjectHandle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
			QualifyingData: tpm2.TPM2BData{Buffer: nonce},
			InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		}.Execute(l)
		if err != nil {
			t.Fatal(err)
		}
		sig, _ := rsp.Signature.Signature.ECDSA()
		der, _ := derSignature(sig)
		raw := ak.OutPublic.Bytes()
		a = &Attestation{Attest: rsp.CertifyInfo.Bytes(), Signature: der,
			CertifyingKey: append(binary.BigEndian.AppendUint16(nil, uint16(len(raw))), raw...)}
	})
	h, _, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	real, err := b.Attest(ctx, tenantA, h, nil)
	if err != nil {
		t.Fatal(err)
	}
	if string(real.CertifyingKey) != string(a.CertifyingKey) {
		t.Fatal("the forger did not get the backend's certifying key: the test proves nothing")
	}
	m := tpm2.Marshal(pub)
	keyPublic := append(binary.BigEndian.AppendUint16(nil, uint16(len(m))), m...)
	if err := VerifyAttestation(a, keyPublic, nonce); !errors.Is(err, ErrAttestation) {
		t.Errorf("VerifyAttestation of a software key's certification: got %v, want ErrAttestation", err)
	}
}
