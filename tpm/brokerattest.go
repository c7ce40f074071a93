package tpm

import (
	"context"

	"github.com/keybroker/keybroker/kms"
)

var _ kms.Attester = (*Backend)(nil)

// AttestKey implements kms.Attester on top of Attest: the same
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
