package keyring

import (
	"context"
	"crypto"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
)

// VersionSigner signs with one pinned version of a key (the one named, or
// the ACTIVE one when it was made). It is a pop.Signer through JOSE, and a
// crypto.Signer through Crypto, for code that builds tokens, proofs and
// certificates on top of the keyring.
type VersionSigner struct {
	r      *Keyring
	tenant string
	name   string
	pub    PublicKey
	csr    bool // see SignRequest.csr
}

// Signer resolves ref now and returns a signer pinned to that version.
func (r *Keyring) Signer(ctx context.Context, tenant, name string, ref VersionRef) (*VersionSigner, error) {
	pk, err := r.PublicKey(ctx, tenant, name, ref)
	if err != nil {
		return nil, err
	}
	return &VersionSigner{r: r, tenant: tenant, name: name, pub: pk}, nil
}

// Kid, Version, Alg and Public describe the pinned version.
func (s *VersionSigner) Kid() string              { return s.pub.Kid }
func (s *VersionSigner) Version() uint32          { return s.pub.Version }
func (s *VersionSigner) Algorithm() kms.Algorithm { return s.pub.Alg }
func (s *VersionSigner) Public() crypto.PublicKey { return s.pub.Key }

// X5TS256 is the thumbprint of the version's imported certificate ("":
// none), as of when the signer was made.
func (s *VersionSigner) X5TS256() string { return s.pub.X5TS256 }

// SignDigest signs a digest with the pinned version. Its errors are
// *SignError.
func (s *VersionSigner) SignDigest(ctx context.Context, digest []byte, hash crypto.Hash, pad kms.Padding, jose bool) ([]byte, error) {
	sig, err := s.r.Sign(ctx, s.tenant, SignRequest{Name: s.name, Ref: VersionRef{Kid: s.pub.Kid}, Digest: digest, Hash: hash, Padding: pad, JOSE: jose, csr: s.csr})
	if err != nil {
		return nil, &SignError{Err: err}
	}
	return sig.Signature, nil
}

// SignError is the failure of a signature a VersionSigner was asked for
// (the hardware, the quota, the deadline): whoever used the signer to build
// a token, a proof or a certificate can tell it from a fault of its own
// input, which must not be reported the same way.
type SignError struct{ Err error }

func (e *SignError) Error() string { return "sign: " + e.Err.Error() }
func (e *SignError) Unwrap() error { return e.Err }

// JOSE is the version as a pop.Signer (JWS signatures: ECDSA r||s, PSS
// with salt = hash length).
func (s *VersionSigner) JOSE() pop.Signer { return joseSigner{s} }

type joseSigner struct{ s *VersionSigner }

func (j joseSigner) Alg() string  { return j.s.pub.Alg.String() }
func (j joseSigner) JWK() pop.JWK { return j.s.pub.JWK }
func (j joseSigner) Sign(ctx context.Context, signingInput []byte) ([]byte, error) {
	h := j.s.pub.Alg.Hash().New()
	h.Write(signingInput)
	return j.s.SignDigest(ctx, h.Sum(nil), 0, kms.PaddingDefault, true)
}

// Crypto is the version as a crypto.Signer whose Sign uses ctx (for
// x509.CreateCertificate and friends inside one request).
func (s *VersionSigner) Crypto(ctx context.Context) crypto.Signer { return cryptoSigner{s, ctx} }

type cryptoSigner struct {
	s   *VersionSigner
	ctx context.Context
}

func (c cryptoSigner) Public() crypto.PublicKey { return c.s.pub.Key }

func (c cryptoSigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts == nil {
		return nil, errors.New("keyring: signer options are required")
	}
	pad := kms.PaddingDefault
	if pss, ok := opts.(*rsa.PSSOptions); ok {
		if pss.SaltLength != rsa.PSSSaltLengthEqualsHash && pss.SaltLength != opts.HashFunc().Size() && pss.SaltLength != rsa.PSSSaltLengthAuto {
			return nil, errors.New("keyring: PSS salt length must equal the hash length")
		}
		pad = kms.PaddingPSS
	} else if c.s.pub.Alg.IsRSA() {
		pad = kms.PaddingPKCS1v15
	}
	return c.s.SignDigest(c.ctx, digest, opts.HashFunc(), pad, false)
}

// Attest asks the backend for evidence that a key version is held in its
// hardware (TPM2_Certify), echoing nonce.
func (r *Keyring) Attest(ctx context.Context, tenant, name string, ref VersionRef, nonce []byte) (kms.Attestation, PublicKey, error) {
	if len(nonce) > kms.MaxNonce {
		return kms.Attestation{}, PublicKey{}, &kms.FieldError{Field: "nonce", Reason: fmt.Sprintf("got %d bytes, want at most %d", len(nonce), kms.MaxNonce)}
	}
	k, err := r.lookup(tenant, name)
	if err != nil {
		return kms.Attestation{}, PublicKey{}, err
	}
	v, err := k.version(ref)
	if err != nil {
		return kms.Attestation{}, PublicKey{}, err
	}
	if v.State == kms.StateDestroyed {
		return kms.Attestation{}, PublicKey{}, notUsable(name, v)
	}
	at, ok := r.backend.(kms.Attester)
	if !ok {
		return kms.Attestation{}, PublicKey{}, &kms.ClientError{Kind: kms.ErrFailedPrecondition, Reason: "ATTESTATION_UNSUPPORTED",
			Msg: "this daemon's key backend cannot attest keys (attestation needs the TPM backend)"}
	}
	if err := admit(ctx); err != nil {
		return kms.Attestation{}, PublicKey{}, err
	}
	a, err := at.AttestKey(ctx, kms.Partition{Tenant: tenant}, v.Handle, nonce)
	if err != nil {
		return kms.Attestation{}, PublicKey{}, err
	}
	return a, k.publicKey(v), nil
}
