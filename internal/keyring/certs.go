package keyring

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
)

// Bounds on an imported chain: a leaf and a few intermediates (and perhaps
// the root) fit easily; the chain travels in every key record.
const (
	MaxChainCerts = 8
	MaxCertBytes  = 16 << 10
)

// chainField is the request field a chain comes in; errors name it.
const chainField = "certificate_chain"

func chainErr(i int, format string, a ...any) error {
	return &kms.FieldError{Field: chainField + "[" + strconv.Itoa(i) + "]", Reason: fmt.Sprintf(format, a...)}
}

// ImportCertificate stores a CA-issued certificate chain (DER, leaf first)
// with a version of a key, replacing any chain it had (renewal). ref names
// the version; when it names none, the version is the one whose key the
// leaf certifies. The leaf's public key must be the version's, each
// certificate must be issued (name and signature) by the next, and none
// may have expired at now; one not yet valid is taken (a CA may date it
// from the activation of a PENDING version). Trust is not checked: the
// relying party decides which CAs it trusts. Only a PENDING, ACTIVE or
// RETIRED version takes a chain. Nothing is stored unless all of this
// holds.
func (r *Keyring) ImportCertificate(ctx context.Context, tenant, name string, ref VersionRef, chain [][]byte) (PublicKey, error) {
	certs, err := parseChain(chain)
	if err != nil {
		return PublicKey{}, err
	}
	if _, err := r.lookup(tenant, name); err != nil {
		return PublicKey{}, err
	}
	id := keyID{tenant, name}
	defer r.lockKey(id)()
	var out PublicKey
	err = retryConflicts(func() error {
		k := r.current(id)
		v, err := k.certVersion(ref, certs[0])
		if err != nil {
			return err
		}
		if err := checkChain(certs, r.now()); err != nil {
			return err
		}
		rec := k.rec.Clone()
		i := rec.Index(v.Version.Version)
		rec.Versions[i].Certificates = make([][]byte, len(chain))
		for j, c := range chain {
			rec.Versions[i].Certificates[j] = bytes.Clone(c)
		}
		nk, err := r.record(ctx, rec, nil, r.store.UpdateKey)
		if err != nil {
			return err
		}
		out = nk.publicKey(nk.versions[i])
		return nil
	})
	if err != nil {
		return PublicKey{}, err
	}
	r.log.Info("certificate imported", "tenant", tenant, "key", name, "version", out.Version, "kid", out.Kid,
		"x5t#S256", out.X5TS256, "not_after", out.CertExpires, "chain", len(chain))
	return out, nil
}

// parseChain checks the chain's shape and parses it.
func parseChain(chain [][]byte) ([]*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, &kms.FieldError{Field: chainField, Reason: "empty: give the leaf certificate first, then its issuers"}
	}
	if len(chain) > MaxChainCerts {
		return nil, &kms.FieldError{Field: chainField, Reason: fmt.Sprintf("got %d certificates, want at most %d", len(chain), MaxChainCerts)}
	}
	certs := make([]*x509.Certificate, len(chain))
	for i, der := range chain {
		if len(der) == 0 || len(der) > MaxCertBytes {
			return nil, chainErr(i, "got %d bytes, want 1 to %d", len(der), MaxCertBytes)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, chainErr(i, "not a DER X.509 certificate: %s", strings.TrimPrefix(err.Error(), "x509: "))
		}
		certs[i] = c
	}
	return certs, nil
}

// certVersion is the version a leaf certificate is imported for: the one
// ref names, whose key the leaf must certify, or (ref empty) the one whose
// key it certifies.
func (k *key) certVersion(ref VersionRef, leaf *x509.Certificate) (*version, error) {
	var v *version
	if ref == (VersionRef{}) {
		tp, err := pop.Thumbprint(leaf.PublicKey)
		if err != nil {
			return nil, chainErr(0, "the leaf's public key (%s) is not one keybroker holds", leaf.PublicKeyAlgorithm)
		}
		for _, c := range k.versions {
			if c.Kid == tp {
				v = c
			}
		}
		if v == nil {
			return nil, chainErr(0, "the leaf's public key is not a version of key %q", k.rec.Name)
		}
	} else {
		var err error
		if v, err = k.version(ref); err != nil {
			return nil, err
		}
		pub, ok := v.pub.(interface{ Equal(crypto.PublicKey) bool })
		if !ok || !pub.Equal(leaf.PublicKey) {
			return nil, chainErr(0, "the leaf's public key is not the key of version %d", v.Version.Version)
		}
	}
	if !v.State.Published() {
		return nil, &kms.ClientError{
			Kind:   kms.ErrFailedPrecondition,
			Msg:    fmt.Sprintf("key %q version %d is %v: only a PENDING, ACTIVE or RETIRED version takes a certificate", k.rec.Name, v.Version.Version, v.State),
			Reason: ReasonNotUsable,
			Meta:   map[string]string{"state": strings.ToUpper(v.State.String()), "version": strconv.FormatUint(uint64(v.Version.Version), 10)},
		}
	}
	return v, nil
}

// checkChain: each certificate issued by the next (name and signature),
// none expired at now, and a leaf that may sign (keybroker keys only sign).
func checkChain(certs []*x509.Certificate, now time.Time) error {
	if ku := certs[0].KeyUsage; ku != 0 && ku&x509.KeyUsageDigitalSignature == 0 {
		return chainErr(0, "the leaf's key usage lacks digitalSignature")
	}
	for i, c := range certs {
		if now.After(c.NotAfter) {
			return chainErr(i, "expired at %s (now %s)", c.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
		}
		if i+1 == len(certs) {
			break
		}
		parent := certs[i+1]
		if !bytes.Equal(c.RawIssuer, parent.RawSubject) {
			return chainErr(i+1, "its subject is not the issuer of certificate_chain[%d]: give the chain leaf first, each certificate followed by its issuer", i)
		}
		if err := c.CheckSignatureFrom(parent); err != nil {
			return chainErr(i+1, "did not sign certificate_chain[%d]: %s", i, strings.TrimPrefix(err.Error(), "x509: "))
		}
	}
	return nil
}

// CertificateRequest signs a PKCS#10 request built from tmpl with a key
// version — also a PENDING one, which may not sign anything else: a CA
// can then issue its certificate during the pre-publication lead, before
// the version signs. The allowance is this narrow because the keyring
// builds the request itself: the caller chooses the subject, never the
// bytes signed.
func (r *Keyring) CertificateRequest(ctx context.Context, tenant, name string, ref VersionRef, tmpl *x509.CertificateRequest) ([]byte, PublicKey, error) {
	vs, err := r.Signer(ctx, tenant, name, ref)
	if err != nil {
		return nil, PublicKey{}, err
	}
	vs.csr = true
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, vs.Crypto(ctx))
	if err != nil {
		return nil, PublicKey{}, err
	}
	return der, vs.pub, nil
}
