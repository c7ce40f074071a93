package pop

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
)

// NewSoftwareSigner returns a Signer over a key held in this process's
// memory, such as an *ecdsa.PrivateKey or *rsa.PrivateKey, signing with alg
// (ES256 with a P-256 key, ES384 with P-384; RS* and PS* with RSA of 2048
// bits or more). Its JWK has Kid set to the key's RFC 7638 thumbprint and
// Alg to alg.
//
// It exists for tests and examples, for this package and for others: the
// point of keybroker is that production keys live in hardware and never in
// process memory, so do not use it in production.
func NewSoftwareSigner(key crypto.Signer, alg string) (Signer, error) {
	if key == nil {
		return nil, errors.New("pop: nil key")
	}
	a, ok := algorithms[alg]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrUnsupportedAlg, alg)
	}
	pub := key.Public()
	j, err := NewJWK(pub)
	if err != nil {
		return nil, err
	}
	if reason := keyMismatch(a, pub); reason != "" {
		return nil, fmt.Errorf("%w: %s", ErrUnsupportedKey, reason)
	}
	j.Kid = j.thumbprint()
	j.Alg = alg
	s := &softwareSigner{key: key, alg: a, jwk: j}
	if k, ok := pub.(*ecdsa.PublicKey); ok {
		s.curve = k.Curve
	}
	return s, nil
}

// softwareSigner is immutable after construction, so safe for concurrent
// use if key is.
type softwareSigner struct {
	key   crypto.Signer
	alg   algorithm
	jwk   JWK
	curve elliptic.Curve // ECDSA keys only
}

func (s *softwareSigner) Alg() string { return s.alg.name }
func (s *softwareSigner) JWK() JWK    { return s.jwk }

// Sign hashes signingInput and signs the digest, converting an ECDSA
// signature from DER to r||s. Software signing is not cancellable; ctx is
// checked once before it starts.
func (s *softwareSigner) Sign(ctx context.Context, signingInput []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	h := s.alg.hash.New()
	h.Write(signingInput)
	digest := h.Sum(nil)
	var opts crypto.SignerOpts = s.alg.hash
	if s.alg.kind == kindPSS {
		opts = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: s.alg.hash}
	}
	sig, err := s.key.Sign(rand.Reader, digest, opts)
	if err != nil {
		return nil, err
	}
	if s.curve != nil {
		return ECDSADERToJOSE(sig, s.curve)
	}
	return sig, nil
}
