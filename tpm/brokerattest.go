package tpm

import (
	"context"

	"github.com/keybroker/keybroker/internal/broker"
)

var _ broker.Attester = (*Backend)(nil)

// AttestKey implements broker.Attester on top of Attest: the same
// TPM2_Certify, with the certified key's public area (PublicArea) attached
// so that a relying party can run VerifyAttestation.
func (b *Backend) AttestKey(ctx context.Context, p broker.Partition, h broker.Handle, nonce []byte) (broker.Attestation, error) {
	a, err := b.Attest(ctx, p, h, nonce)
	if err != nil {
		return broker.Attestation{}, err
	}
	keyPublic, err := PublicArea(h)
	if err != nil {
		return broker.Attestation{}, err
	}
	return broker.Attestation{
		Attest:        a.Attest,
		Signature:     a.Signature,
		CertifyingKey: a.CertifyingKey,
		KeyPublic:     keyPublic,
	}, nil
}
