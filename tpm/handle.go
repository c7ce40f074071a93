package tpm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"sync"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
)

// A Handle (the bytes the daemon's store keeps for a key) is, in version 1:
//
//	"kbtp" | 0x01 | TPM2B_PUBLIC | TPM2B_PRIVATE | TPM2B_AUTH
//
// each TPM2B being a big-endian uint16 size and that many bytes, as the TPM
// marshals them (TCG TPM 2.0 Part 2 §12.2.5, §12.3.7, §10.4.5). The private
// part is encrypted by the tenant's storage parent, which only this TPM can
// load (fixedTPM), so the blob is useless elsewhere. The key's auth value is
// in the clear: whoever can read the store and talk to this TPM can sign
// with the key, exactly like the daemon. Protect the store accordingly.
const (
	handleMagic   = "kbtp"
	handleVersion = 1
	authSize      = 32 // random auth values of keys and parents
)

// signingKeyAttributes are the TPMA_OBJECT of every signing key, exactly
// (Part 2 §8.3): bound to this TPM and its parent, generated inside it,
// usable with the auth value, never through the dictionary-attack logic,
// and only for signing (not decrypt, not restricted).
var signingKeyAttributes = tpm2.TPMAObject{
	FixedTPM:            true,
	FixedParent:         true,
	SensitiveDataOrigin: true,
	UserWithAuth:        true,
	NoDA:                true,
	SignEncrypt:         true,
}

// randomAuth returns a random auth value with no zero byte: 32 bytes of
// 255 values each, about 255.8 bits. go-tpm v0.9.8's HMAC sessions cut an
// auth value at a zero byte anywhere (hmacKeyFromAuthValue strips more
// than the trailing zeros TCG TPM 2.0 Part 1 §19.6.5 removes), so a value
// containing one fails with TPM_RC_BAD_AUTH, about one in eight random
// values (measured on swtpm; fix proposed in google/go-tpm#446).
func randomAuth() ([]byte, error) {
	auth := make([]byte, authSize)
	if _, err := rand.Read(auth); err != nil {
		return nil, err
	}
	for i := range auth {
		for auth[i] == 0 {
			if _, err := rand.Read(auth[i : i+1]); err != nil {
				return nil, err
			}
		}
	}
	return auth, nil
}

// key is a decoded Handle.
type key struct {
	public  []byte // TPMT_PUBLIC, the contents of the TPM2B_PUBLIC
	private []byte // the contents of the TPM2B_PRIVATE
	auth    []byte
	pub     *tpm2.TPMTPublic
}

// encode returns the Handle of k.
func (k *key) encode() kms.Handle {
	h := make([]byte, 0, len(handleMagic)+1+6+len(k.public)+len(k.private)+len(k.auth))
	h = append(h, handleMagic...)
	h = append(h, handleVersion)
	for _, part := range [][]byte{k.public, k.private, k.auth} {
		h = binary.BigEndian.AppendUint16(h, uint16(len(part)))
		h = append(h, part...)
	}
	return kms.Handle(h)
}

// errBadHandle is a handle this backend did not make.
var errBadHandle = errors.New("not a TPM key handle")

// decodeHandle parses h and checks that its public area is a signing key
// this backend creates. A malformed handle is an error wrapping
// kms.ErrNotFound: no such key.
func decodeHandle(h kms.Handle) (*key, error) {
	bad := func(reason string) error {
		return &kms.Error{Backend: "tpm", Op: "decode handle", Kind: kms.ErrNotFound, Err: fmt.Errorf("%w: %s", errBadHandle, reason)}
	}
	if len(h) < len(handleMagic)+1 || string(h[:len(handleMagic)]) != handleMagic {
		return nil, bad("no magic")
	}
	if v := h[len(handleMagic)]; v != handleVersion {
		return nil, bad(fmt.Sprintf("version %d, want %d", v, handleVersion))
	}
	rest := []byte(h[len(handleMagic)+1:])
	var parts [3][]byte
	for i := range parts {
		if len(rest) < 2 {
			return nil, bad("truncated")
		}
		n := int(binary.BigEndian.Uint16(rest))
		if len(rest) < 2+n {
			return nil, bad("truncated")
		}
		parts[i] = rest[2 : 2+n : 2+n]
		rest = rest[2+n:]
	}
	if len(rest) != 0 {
		return nil, bad("trailing bytes")
	}
	k := &key{public: parts[0], private: parts[1], auth: parts[2]}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](k.public)
	if err != nil {
		return nil, bad("public area: " + err.Error())
	}
	if pub.ObjectAttributes != signingKeyAttributes {
		return nil, bad("not a signing key of this backend")
	}
	if _, err := publicKey(pub); err != nil {
		return nil, bad(err.Error())
	}
	if len(k.private) == 0 || len(k.auth) != authSize {
		return nil, bad("private area or auth value missing")
	}
	k.pub = pub
	return k, nil
}

// maxDecoded bounds handleCache: beyond it the cache starts again empty.
const maxDecoded = 4096

// handleCache keeps decoded handles for Sign. Decoding one (go-tpm's
// reflective unmarshal and an elliptic-curve point check) costs more CPU
// than everything else Sign does outside the TPM, and a handle never
// changes, so a decoded one stays right. Its methods are safe for
// concurrent use.
type handleCache struct {
	mu sync.Mutex
	m  map[string]*key
}

// decode is decodeHandle(h), from the cache when h was decoded before.
// The key returned is shared: callers must not modify it.
func (c *handleCache) decode(h kms.Handle) (*key, error) {
	c.mu.Lock()
	k := c.m[string(h)]
	c.mu.Unlock()
	if k != nil {
		return k, nil
	}
	// The key's parts alias the bytes decoded: give it its own copy.
	k, err := decodeHandle(bytes.Clone(h))
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.m == nil || len(c.m) >= maxDecoded {
		c.m = make(map[string]*key)
	}
	c.m[string(h)] = k
	c.mu.Unlock()
	return k, nil
}

// forget drops h from the cache.
func (c *handleCache) forget(h kms.Handle) {
	c.mu.Lock()
	delete(c.m, string(h))
	c.mu.Unlock()
}

// PublicArea returns the TPM2B_PUBLIC of the key h (a size and the
// TPMT_PUBLIC), as VerifyAttestation takes it.
func PublicArea(h kms.Handle) ([]byte, error) {
	k, err := decodeHandle(h)
	if err != nil {
		return nil, err
	}
	return k.tpm2bPublic(), nil
}

// tpm2bPublic returns the TPM2B_PUBLIC of k.
func (k *key) tpm2bPublic() []byte {
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(k.public))), k.public...)
}

// objectName computes the Name of an object from its TPMT_PUBLIC bytes:
// nameAlg || H_nameAlg(TPMT_PUBLIC) (Part 1 §16). It hashes the bytes as
// given rather than a re-marshalled structure.
func objectName(public []byte) ([]byte, error) {
	if len(public) < 4 {
		return nil, errors.New("public area too short")
	}
	alg := tpm2.TPMIAlgHash(binary.BigEndian.Uint16(public[2:]))
	h, err := alg.Hash()
	if err != nil {
		return nil, fmt.Errorf("name algorithm 0x%x: %w", uint16(alg), err)
	}
	d := h.New()
	d.Write(public)
	return d.Sum(append([]byte(nil), public[2:4]...)), nil
}

// publicKey decodes the public key of a TPMT_PUBLIC, checking that an EC
// point is on its curve.
func publicKey(pub *tpm2.TPMTPublic) (crypto.PublicKey, error) {
	switch pub.Type {
	case tpm2.TPMAlgECC:
		parms, err := pub.Parameters.ECCDetail()
		if err != nil {
			return nil, err
		}
		point, err := pub.Unique.ECC()
		if err != nil {
			return nil, err
		}
		var curve elliptic.Curve
		switch parms.CurveID {
		case tpm2.TPMECCNistP256:
			curve = elliptic.P256()
		case tpm2.TPMECCNistP384:
			curve = elliptic.P384()
		default:
			return nil, fmt.Errorf("unsupported curve 0x%x", uint16(parms.CurveID))
		}
		size := (curve.Params().BitSize + 7) / 8
		if len(point.X.Buffer) > size || len(point.Y.Buffer) > size {
			return nil, errors.New("EC point coordinates too long")
		}
		raw := make([]byte, 1+2*size)
		raw[0] = 4 // uncompressed point (SEC 1 §2.3.3)
		copy(raw[1+size-len(point.X.Buffer):], point.X.Buffer)
		copy(raw[1+2*size-len(point.Y.Buffer):], point.Y.Buffer)
		k, err := ecdsa.ParseUncompressedPublicKey(curve, raw)
		if err != nil {
			return nil, err
		}
		return k, nil
	case tpm2.TPMAlgRSA:
		parms, err := pub.Parameters.RSADetail()
		if err != nil {
			return nil, err
		}
		n, err := pub.Unique.RSA()
		if err != nil {
			return nil, err
		}
		e := int(parms.Exponent)
		if e == 0 {
			e = 65537 // Part 2 §12.2.3.5: 0 means the default exponent
		}
		k := &rsa.PublicKey{N: new(big.Int).SetBytes(n.Buffer), E: e}
		if k.N.BitLen() != int(parms.KeyBits) {
			return nil, fmt.Errorf("RSA modulus has %d bits, want %d", k.N.BitLen(), parms.KeyBits)
		}
		return k, nil
	}
	return nil, fmt.Errorf("unsupported key type 0x%x", uint16(pub.Type))
}

// keyTemplate is the TPMT_PUBLIC template of a signing key for spec. The
// scheme is TPM_ALG_NULL so that each TPM2_Sign picks it (ECDSA with the
// digest's hash, RSASSA or RSAPSS).
func keyTemplate(spec kms.KeySpec) tpm2.TPMTPublic {
	if spec.Alg.IsRSA() {
		return tpm2.TPMTPublic{
			Type:             tpm2.TPMAlgRSA,
			NameAlg:          tpm2.TPMAlgSHA256,
			ObjectAttributes: signingKeyAttributes,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
				KeyBits:   tpm2.TPMKeyBits(spec.Bits),
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{}),
		}
	}
	curve := tpm2.TPMECCNistP256
	if spec.Alg == kms.ES384 {
		curve = tpm2.TPMECCNistP384
	}
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: signingKeyAttributes,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   curve,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// parentTemplate is the tenant storage parent: an ECC P-256 restricted
// decryption key under the SRK, the shape of the TCG SRK template (TCG TPM
// v2.0 Provisioning Guidance §7.5.1) with its own random auth value.
func parentTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			NoDA:                true,
			Restricted:          true,
			Decrypt:             true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{
				Algorithm: tpm2.TPMAlgAES,
				KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
				Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
			},
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// akTemplate is the attestation key: a restricted ECDSA P-256 signing
// primary in the owner hierarchy, so it can only sign structures the TPM
// made itself (TPMS_ATTEST starting with TPM_GENERATED_VALUE), never an
// arbitrary digest that would look like one.
func akTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			NoDA:                true,
			Restricted:          true,
			SignEncrypt:         true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
			Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
		}),
	}
}
