package pop

import (
	"bytes"
	"crypto/elliptic"
	"encoding/asn1"
	"fmt"
	"math/big"
)

// ecdsaDER is the ASN.1 ECDSA-Sig-Value of RFC 3279 §2.2.3 and SEC 1 §C.5.
type ecdsaDER struct {
	R, S *big.Int
}

// ECDSADERToJOSE converts an ASN.1 DER ECDSA signature, as returned by
// crypto.Signer and by hardware, to the JOSE form of RFC 7518 §3.4: r || s,
// each left-padded with zeros to the curve's byte size (32 for P-256, 48 for
// P-384, 66 for P-521).
//
// Parsing is strict: der must be the one DER encoding of the signature, with
// no trailing bytes, and r and s must be in [1, n-1] for the curve order n.
func ECDSADERToJOSE(der []byte, curve elliptic.Curve) ([]byte, error) {
	size, order, err := sigCurve(curve)
	if err != nil {
		return nil, err
	}
	var sig ecdsaDER
	rest, err := asn1.Unmarshal(der, &sig)
	if err != nil {
		return nil, fmt.Errorf("%w: DER: %v", ErrInvalidSignature, err)
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: DER: got %d trailing bytes, want 0", ErrInvalidSignature, len(rest))
	}
	// encoding/asn1 accepts some BER (for example long-form lengths that
	// fit in short form); DER has exactly one encoding per value.
	if re, err := asn1.Marshal(sig); err != nil || !bytes.Equal(re, der) {
		return nil, fmt.Errorf("%w: DER: not the canonical encoding", ErrInvalidSignature)
	}
	if err := checkScalar("r", sig.R, size, order); err != nil {
		return nil, err
	}
	if err := checkScalar("s", sig.S, size, order); err != nil {
		return nil, err
	}
	out := make([]byte, 2*size)
	sig.R.FillBytes(out[:size])
	sig.S.FillBytes(out[size:])
	return out, nil
}

// ECDSAJOSEToDER converts a JOSE ECDSA signature (RFC 7518 §3.4), r || s, to
// ASN.1 DER for crypto/ecdsa.VerifyASN1 and similar. sig must be exactly
// twice the curve's byte size, and r and s must be in [1, n-1] for the curve
// order n.
func ECDSAJOSEToDER(sig []byte, curve elliptic.Curve) ([]byte, error) {
	size, order, err := sigCurve(curve)
	if err != nil {
		return nil, err
	}
	if len(sig) != 2*size {
		return nil, fmt.Errorf("%w: JOSE signature length: got %d, want %d", ErrInvalidSignature, len(sig), 2*size)
	}
	r := new(big.Int).SetBytes(sig[:size])
	s := new(big.Int).SetBytes(sig[size:])
	if err := checkScalar("r", r, size, order); err != nil {
		return nil, err
	}
	if err := checkScalar("s", s, size, order); err != nil {
		return nil, err
	}
	der, err := asn1.Marshal(ecdsaDER{R: r, S: s})
	if err != nil {
		return nil, fmt.Errorf("%w: DER: %v", ErrInvalidSignature, err)
	}
	return der, nil
}

// sigCurve returns the byte size of r and s for the curve, ceil(bits/8) of
// its field size as in RFC 7518 §3.4 (32, 48 and 66 for P-256, P-384 and
// P-521), and its order n.
func sigCurve(curve elliptic.Curve) (int, *big.Int, error) {
	if curve == nil {
		return 0, nil, fmt.Errorf("%w: nil curve", ErrUnsupportedKey)
	}
	p := curve.Params()
	if p == nil || p.N == nil || p.N.Sign() <= 0 || p.BitSize <= 0 {
		return 0, nil, fmt.Errorf("%w: curve %s has no parameters", ErrUnsupportedKey, curveLabel(curve))
	}
	return (p.BitSize + 7) / 8, p.N, nil
}

// checkScalar checks that v, the r or s of a signature, is in [1, n-1] and
// fits in size bytes.
func checkScalar(name string, v *big.Int, size int, order *big.Int) error {
	if v.Sign() <= 0 {
		return fmt.Errorf("%w: %s is zero or negative", ErrInvalidSignature, name)
	}
	if got := (v.BitLen() + 7) / 8; got > size {
		return fmt.Errorf("%w: %s length: got %d bytes, want at most %d", ErrInvalidSignature, name, got, size)
	}
	if v.Cmp(order) >= 0 {
		return fmt.Errorf("%w: %s is not less than the curve order", ErrInvalidSignature, name)
	}
	return nil
}
