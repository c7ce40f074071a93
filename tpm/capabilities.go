package tpm

// What the TPM can do, probed at start: the RSA sizes it generates, and
// whether its RSASSA-PSS salt is the hash length.

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"sync"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
)

// probeCapabilities records which RSA sizes the TPM supports
// (TPM2_TestParms) and whether its PSS salt is the hash length.
func (b *Backend) probeCapabilities(l *link) error {
	for _, bits := range []int{2048, 3072, 4096} {
		_, err := tpm2.TestParms{Parameters: tpm2.TPMTPublicParms{
			Type: tpm2.TPMAlgRSA,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
				KeyBits:   tpm2.TPMKeyBits(bits),
			}),
		}}.Execute(l)
		var te *kms.Error
		if errors.As(err, &te) {
			return err
		}
		b.rsaBits[bits] = err == nil
	}
	if !b.rsaBits[2048] {
		return nil
	}
	ok, err := b.probePSS(l)
	if err != nil {
		return err
	}
	b.pssHashSalt = ok
	return nil
}

// pssProbeKey is the throwaway software key the PSS probe loads into the
// TPM's null hierarchy, one per process.
var pssProbeKey = sync.OnceValues(func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 2048) })

// probePSS signs with RSASSA-PSS in the TPM and reports whether the salt is
// the hash length. TPM 2.0 Part 1 (before revision 1.59) lets the salt be
// the largest the key and hash allow; FIPS-mode and newer TPMs use the hash
// length. The key is a software one loaded with TPM2_LoadExternal, so the
// probe costs no key generation in the TPM.
func (b *Backend) probePSS(l *link) (bool, error) {
	priv, err := pssProbeKey()
	if err != nil {
		return false, err
	}
	pub := tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgRSA,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{SignEncrypt: true, UserWithAuth: true, NoDA: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
			KeyBits:   2048,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: priv.N.Bytes()}),
	}
	sens := tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgRSA,
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgRSA, &tpm2.TPM2BPrivateKeyRSA{Buffer: priv.Primes[0].Bytes()}),
	}
	var name tpm2.TPM2BName
	o, err := b.load(l, "pss-probe", nil, func() (tpm2.TPMHandle, error) {
		r, err := tpm2.LoadExternal{InPrivate: tpm2.New2B(sens), InPublic: tpm2.New2B(pub), Hierarchy: tpm2.TPMRHNull}.Execute(l)
		if err != nil {
			return 0, err
		}
		name = r.Name
		return r.ObjectHandle, nil
	})
	if err != nil {
		return false, classify("load the PSS probe key", err)
	}
	defer b.flush(l, o)
	digest := sha256.Sum256([]byte("keybroker PSS salt probe"))
	var rsp *tpm2.SignResponse
	err = b.retry(l, func() error {
		var err error
		rsp, err = tpm2.Sign{
			KeyHandle:  tpm2.NamedHandle{Handle: o.handle, Name: name},
			Digest:     tpm2.TPM2BDigest{Buffer: digest[:]},
			InScheme:   sigScheme(tpm2.TPMAlgRSAPSS, tpm2.TPMAlgSHA256),
			Validation: nullTicket(),
		}.Execute(l)
		return err
	})
	if err != nil {
		if isRC(err, tpm2.TPMRCScheme) {
			b.log.Warn("the TPM does not sign RSASSA-PSS; PS256 is refused", "err", err)
			return false, nil
		}
		return false, classify("probe the PSS salt", err)
	}
	sig, err := rsp.Signature.Signature.RSAPSS()
	if err != nil {
		return false, &kms.Error{Backend: "tpm", Op: "probe the PSS salt", Err: err}
	}
	if rsa.VerifyPSS(&priv.PublicKey, crypto.SHA256, digest[:], sig.Sig.Buffer, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}) == nil {
		return true, nil
	}
	salt := pssSaltLength(&priv.PublicKey, crypto.SHA256, sig.Sig.Buffer)
	b.log.Warn("the TPM's RSASSA-PSS salt is not the hash length; PS256 and PSS signatures are refused", "salt_length", salt, "want", sha256.Size)
	return false, nil
}

// pssSaltLength recovers the salt length of a PSS signature (RFC 8017
// §9.1.2), -1 when it is not a valid one. It is only for the log line.
func pssSaltLength(pub *rsa.PublicKey, hash crypto.Hash, sig []byte) int {
	m := new(big.Int).Exp(new(big.Int).SetBytes(sig), big.NewInt(int64(pub.E)), pub.N)
	emBits := pub.N.BitLen() - 1
	emLen := (emBits + 7) / 8
	hLen := hash.Size()
	em := m.FillBytes(make([]byte, emLen))
	if emLen < hLen+2 || em[emLen-1] != 0xbc {
		return -1
	}
	masked, h := em[:emLen-hLen-1], em[emLen-hLen-1:emLen-1]
	// MGF1 with hash.
	mask := make([]byte, 0, len(masked)+hLen)
	for c := uint32(0); len(mask) < len(masked); c++ {
		d := hash.New()
		d.Write(h)
		d.Write([]byte{byte(c >> 24), byte(c >> 16), byte(c >> 8), byte(c)})
		mask = d.Sum(mask)
	}
	db := make([]byte, len(masked))
	for i := range db {
		db[i] = masked[i] ^ mask[i]
	}
	db[0] &= 0xff >> (8*emLen - emBits)
	for i, c := range db {
		if c == 1 {
			return len(db) - i - 1
		}
		if c != 0 {
			return -1
		}
	}
	return -1
}

func (b *Backend) supportedRSA() string {
	s := ""
	for _, bits := range []int{2048, 3072, 4096} {
		if b.rsaBits[bits] {
			if s != "" {
				s += " or "
			}
			s += fmt.Sprint(bits)
		}
	}
	if s == "" {
		return "an EC algorithm"
	}
	return s
}

// attrBits is the TPMA_OBJECT as the TPM marshals it.
func attrBits(a tpm2.TPMAObject) uint32 {
	m := tpm2.Marshal(a)
	return uint32(m[0])<<24 | uint32(m[1])<<16 | uint32(m[2])<<8 | uint32(m[3])
}
