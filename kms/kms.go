// Package kms is keybroker's public key-management contract, in the spirit
// of smallstep's kms/apiv1: the hardware backend interface (Backend, with
// the optional Lister and Attester found by type assertion), what it deals
// in (Partition, Handle, KeySpec, Algorithm), key-version states and the
// rotation policy, the error sentinels every layer matches with errors.Is,
// and the one check of a signing request (CheckSign). It imports nothing
// but the standard library. The backends (hsm, tpm) implement it and can be
// used as libraries through it:
//
//	b, err := hsm.Open(hsm.Config{ModulePath: mod, TokenLabel: "keys", PIN: pin, MaxSessions: 4}, nil)
//	h, pub, err := b.Generate(ctx, kms.Partition{Tenant: "app"}, kms.KeySpec{Alg: kms.ES256, Label: "k/v1"})
//	sig, err := b.Sign(ctx, kms.Partition{Tenant: "app"}, h, digest, crypto.SHA256)
package kms

import (
	"context"
	"crypto"
	"fmt"
)

// Backend is the contract every hardware backend (PKCS#11, TPM 2.0) meets.
// Private keys are generated inside the hardware and never leave it. Every
// method honours ctx where the hardware allows it. Inputs are validated by
// the caller (SignerOpts), and Sign checks them again with CheckSign before
// the hardware. A handle is usable only in the partition it was generated
// in: in another, every method answers as for an unknown handle
// (ErrNotFound).
type Backend interface {
	// Generate creates a non-extractable signing key for spec in partition p
	// and returns its opaque handle and public key.
	Generate(ctx context.Context, p Partition, spec KeySpec) (Handle, crypto.PublicKey, error)
	// Sign signs digest with the key h. opts is crypto.Hash for PKCS#1 v1.5
	// and ECDSA, *rsa.PSSOptions for PSS. ECDSA signatures are ASN.1 DER.
	Sign(ctx context.Context, p Partition, h Handle, digest []byte, opts crypto.SignerOpts) ([]byte, error)
	// Destroy removes the key h from the hardware. Destroying a key that is
	// already gone returns an error wrapping ErrNotFound.
	Destroy(ctx context.Context, p Partition, h Handle) error
	// Probe is a cheap liveness call into the hardware.
	Probe(ctx context.Context) error
	// Close releases the hardware. It is safe to call more than once.
	Close() error
}

// Partition names the slice of the hardware a key belongs to. Backends map
// it to a token (PKCS#11) or a storage parent (TPM).
type Partition struct {
	Tenant string
}

// Handle is a backend's opaque reference to a key, persisted by the store
// (PKCS#11: the random CKA_ID; TPM: the marshalled key blobs). It is never
// sent to a client.
type Handle []byte

// KeySpec describes a key to generate.
type KeySpec struct {
	Alg Algorithm
	// Bits is the RSA modulus size; 0 for EC keys.
	Bits int
	// Label is a human-readable hardware label (PKCS#11 CKA_LABEL).
	Label string
	// ID, when set, is the object ID to create the key under (PKCS#11
	// CKA_ID, ObjectIDLen bytes): the caller chooses it so that it can
	// record its intent before the object exists (see Lister). Backends
	// whose handles are not IDs (the TPM's are key blobs) ignore it.
	ID Handle
}

// ObjectIDLen is the length of KeySpec.ID.
const ObjectIDLen = 16

// Validate checks the spec and fills in the default RSA size.
func (s KeySpec) Validate() (KeySpec, error) {
	if !s.Alg.Valid() {
		return s, &FieldError{Field: "algorithm", Reason: fmt.Sprintf("unknown algorithm %d", int(s.Alg))}
	}
	if s.Alg.IsRSA() {
		if s.Bits == 0 {
			s.Bits = 2048
		}
		switch s.Bits {
		case 2048, 3072, 4096:
		default:
			return s, &FieldError{Field: "bits", Reason: fmt.Sprintf("got %d, want 2048, 3072 or 4096", s.Bits)}
		}
		return s, nil
	}
	if s.Bits != 0 {
		return s, &FieldError{Field: "bits", Reason: fmt.Sprintf("got %d, want 0 for %s (the curve fixes the size)", s.Bits, s.Alg)}
	}
	return s, nil
}

// Object is a key the backend holds, as Lister reports it.
type Object struct {
	Partition Partition
	Handle    Handle
}

// Lister is an optional Backend capability: every key object the daemon
// created in the hardware, so that objects with no record (left by a crash
// between generation and commit) can be found and removed at start.
type Lister interface {
	List(ctx context.Context) ([]Object, error)
}

// Attestation is evidence from the hardware that a key lives in it: for a
// TPM, a TPM2_Certify of the key by an attestation key.
type Attestation struct {
	Attest        []byte // the signed attestation structure (TPMS_ATTEST)
	Signature     []byte // over SHA-256(Attest), ASN.1 DER ECDSA
	CertifyingKey []byte // the certifying key's public area (TPM2B_PUBLIC)
	KeyPublic     []byte // the certified key's public area (TPM2B_PUBLIC)
}

// Attester is an optional Backend capability: attest that key h is held by
// this hardware, echoing the caller's nonce (at most MaxNonce bytes).
type Attester interface {
	AttestKey(ctx context.Context, p Partition, h Handle, nonce []byte) (Attestation, error)
}

// MaxNonce bounds an attestation's nonce: the size of a TPM2B_DATA, a
// TPMT_HA's digest (TCG TPM 2.0 Part 2 §10.4.3).
const MaxNonce = 64

// SessionCounter is an optional Backend capability, for metrics: how many
// hardware sessions calls hold right now.
type SessionCounter interface {
	SessionsInUse() int
}
