package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// ErrNoCertificate: the key version has no imported certificate chain
// (see keybrokerctl import-cert, or the ImportCertificate RPC).
var ErrNoCertificate = errors.New("client: the key version has no imported certificate")

// TLSCertificate returns the Signer's version's imported certificate chain
// as a tls.Certificate for mutual TLS (RFC 8705): the chain as imported
// (leaf first), Leaf parsed, and the Signer as PrivateKey, so the
// handshake signs in the daemon's hardware. ErrNoCertificate if none was
// imported.
func (s *Signer) TLSCertificate(ctx context.Context) (tls.Certificate, error) {
	ctx, cancel := s.c.withTimeout(ctx)
	defer cancel()
	resp, err := s.c.api.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: s.name, Kid: s.kid})
	if err != nil {
		return tls.Certificate{}, err
	}
	return s.tlsCertificate(resp)
}

// TLSCertificate is the ACTIVE version's certificate chain and Signer for
// key name: what an mTLS client presents. After a rotation, call it again
// (or use GetClientCertificate, which does on every handshake).
func (c *Client) TLSCertificate(ctx context.Context, name string) (tls.Certificate, error) {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	// One call gives the version, its key and its chain: they cannot
	// come from two versions across a rotation.
	resp, err := c.api.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: name})
	if err != nil {
		return tls.Certificate{}, err
	}
	s, err := c.signerFrom(name, resp)
	if err != nil {
		return tls.Certificate{}, err
	}
	return s.tlsCertificate(resp)
}

// GetClientCertificate is a tls.Config.GetClientCertificate that presents
// the ACTIVE version of key name on each handshake, so a long-lived client
// follows rotations (each version needs its own imported chain).
func (c *Client) GetClientCertificate(name string) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		cert, err := c.TLSCertificate(cri.Context(), name)
		if err != nil {
			return nil, err
		}
		return &cert, nil
	}
}

func (s *Signer) tlsCertificate(resp *kbv1.GetPublicKeyResponse) (tls.Certificate, error) {
	chain := resp.GetCertificateChain()
	if len(chain) == 0 {
		return tls.Certificate{}, fmt.Errorf("%w: key %s version %d", ErrNoCertificate, s.name, s.version)
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("client: certificate of %s version %d: %w", s.name, s.version, err)
	}
	return tls.Certificate{Certificate: chain, PrivateKey: s, Leaf: leaf}, nil
}
