package client

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/pop"
)

// Signer is one version of a daemon-held key. It implements crypto.Signer
// (ECDSA signatures in ASN.1 DER, as the interface requires), so it can be
// a tls.Certificate's PrivateKey or sign x509 certificates; JOSE gives the
// same key as a pop.Signer for JWS, DPoP proofs and SHRs.
//
// A Signer is pinned to the version that was ACTIVE (or named) when it was
// made, so its public key never changes under a certificate; it keeps
// signing through the version's RETIRED overlap. Make a new Signer after a
// rotation to move to the new version.
type Signer struct {
	c       *Client
	name    string
	kid     string
	version uint32
	alg     kbv1.Algorithm
	pub     crypto.PublicKey
	jwk     pop.JWK
}

// Signer fetches the ACTIVE version of key name.
func (c *Client) Signer(ctx context.Context, name string) (*Signer, error) {
	return c.SignerVersion(ctx, name, 0)
}

// SignerVersion fetches version v of key name (0: the ACTIVE one).
func (c *Client) SignerVersion(ctx context.Context, name string, v uint32) (*Signer, error) {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	resp, err := c.api.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: name, Version: v})
	if err != nil {
		return nil, err
	}
	return c.signerFrom(name, resp)
}

// signerFrom is the Signer of the version resp describes.
func (c *Client) signerFrom(name string, resp *kbv1.GetPublicKeyResponse) (*Signer, error) {
	pub, err := x509.ParsePKIXPublicKey(resp.GetDer())
	if err != nil {
		return nil, fmt.Errorf("client: public key of %s: %w", name, err)
	}
	var jwk pop.JWK
	if err := json.Unmarshal([]byte(resp.GetJwk()), &jwk); err != nil {
		return nil, fmt.Errorf("client: JWK of %s: %w", name, err)
	}
	return &Signer{c: c, name: name, kid: resp.GetKid(), version: resp.GetVersion(), alg: resp.GetAlgorithm(), pub: pub, jwk: jwk}, nil
}

// Public is the version's public key.
func (s *Signer) Public() crypto.PublicKey { return s.pub }

// KeyID is the version's kid (its RFC 7638 thumbprint).
func (s *Signer) KeyID() string { return s.kid }

// Version is the pinned version number.
func (s *Signer) Version() uint32 { return s.version }

// Name is the key's name.
func (s *Signer) Name() string { return s.name }

// Sign implements crypto.Signer with the client's default timeout. Use
// SignContext to pass a context.
func (s *Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.SignContext(context.Background(), digest, opts)
}

// SignContext signs digest, which must be opts.HashFunc()'s length (checked
// here, before the call). *rsa.PSSOptions asks for PSS with salt = hash
// length; for RSA keys anything else is PKCS#1 v1.5.
func (s *Signer) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.sign(ctx, digest, opts, kbv1.SignatureFormat_SIGNATURE_FORMAT_DER)
}

func (s *Signer) sign(ctx context.Context, digest []byte, opts crypto.SignerOpts, format kbv1.SignatureFormat) ([]byte, error) {
	if opts == nil {
		return nil, fmt.Errorf("client: signer options are required")
	}
	h := opts.HashFunc()
	hash, ok := map[crypto.Hash]kbv1.HashAlgorithm{
		crypto.SHA256: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA256,
		crypto.SHA384: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA384,
		crypto.SHA512: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA512,
	}[h]
	if !ok {
		return nil, fmt.Errorf("client: hash %v: want SHA-256, SHA-384 or SHA-512", h)
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("client: digest length: got %d, want %d for %v", len(digest), h.Size(), h)
	}
	req := &kbv1.SignRequest{Name: s.name, Kid: s.kid, Digest: digest, Hash: hash, Format: format}
	if _, isRSA := s.pub.(*rsa.PublicKey); isRSA {
		req.Padding = kbv1.RSAPadding_RSA_PADDING_PKCS1V15
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			if pss.SaltLength != rsa.PSSSaltLengthEqualsHash && pss.SaltLength != rsa.PSSSaltLengthAuto && pss.SaltLength != h.Size() {
				return nil, fmt.Errorf("client: PSS salt length %d: keybroker signs with salt = hash length", pss.SaltLength)
			}
			req.Padding = kbv1.RSAPadding_RSA_PADDING_PSS
		}
	}
	resp, err := s.c.Sign(ctx, req)
	if err != nil {
		return nil, err
	}
	return resp.GetSignature(), nil
}

// JOSE is the version as a pop.Signer: JWS signatures (ECDSA r||s, PSS with
// salt = hash length), for pop.SignJWS, pop.NewDPoPProof and
// pop.NewSignedHTTPRequest.
func (s *Signer) JOSE() pop.Signer { return joseSigner{s} }

type joseSigner struct{ s *Signer }

func (j joseSigner) Alg() string  { return j.s.jwk.Alg }
func (j joseSigner) JWK() pop.JWK { return j.s.jwk }

func (j joseSigner) Sign(ctx context.Context, signingInput []byte) ([]byte, error) {
	hash := crypto.SHA256
	if j.s.alg == kbv1.Algorithm_ALGORITHM_ES384 {
		hash = crypto.SHA384
	}
	h := hash.New()
	h.Write(signingInput)
	var opts crypto.SignerOpts = hash
	if j.s.alg == kbv1.Algorithm_ALGORITHM_PS256 {
		opts = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: hash}
	}
	return j.s.sign(ctx, h.Sum(nil), opts, kbv1.SignatureFormat_SIGNATURE_FORMAT_JOSE)
}

var _ crypto.Signer = (*Signer)(nil)
