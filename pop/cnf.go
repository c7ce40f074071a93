package pop

import (
	"crypto/sha256"
	"fmt"
)

// Key storage locations for the "xms_ksl" member of an MSAL SHR req_cnf.
const (
	KSLSoftware = "sw"  // the key is held in software
	KSLHardware = "uhw" // the key is held in hardware, as keybroker's are
)

// ReqCnfJWK returns the req_cnf token request parameter of MSAuth 1.0
// AT-POP (Microsoft.Identity.Web WithAtPop): base64url, no padding, of the
// UTF-8 JSON of j's public members with its alg and kid, in the order
// {"kty",<crv,x,y | n,e>,"alg","kid"}. j must be a valid public JWK with Alg
// set to an algorithm that fits the key, and Kid set.
func ReqCnfJWK(j JWK) (string, error) {
	pub, err := j.PublicKey()
	if err != nil {
		return "", err
	}
	if j.Kid == "" {
		return "", fmt.Errorf("%w: req_cnf JWK has no kid", ErrInvalidKey)
	}
	a, ok := algorithms[j.Alg]
	if !ok {
		return "", fmt.Errorf("%w: req_cnf JWK alg %q", ErrUnsupportedAlg, j.Alg)
	}
	if reason := keyMismatch(a, pub); reason != "" {
		return "", fmt.Errorf("%w: req_cnf JWK: %s", ErrUnsupportedKey, reason)
	}
	b, err := marshalJSON(struct {
		Kty string `json:"kty"`
		Crv string `json:"crv,omitempty"`
		X   string `json:"x,omitempty"`
		Y   string `json:"y,omitempty"`
		N   string `json:"n,omitempty"`
		E   string `json:"e,omitempty"`
		Alg string `json:"alg"`
		Kid string `json:"kid"`
	}{j.Kty, j.Crv, j.X, j.Y, j.N, j.E, j.Alg, j.Kid})
	if err != nil {
		return "", fmt.Errorf("pop: req_cnf: %w", err)
	}
	return b64.EncodeToString(b), nil
}

// ReqCnfKid returns the req_cnf token request parameter of MSAL SHR PoP:
// base64url, no padding, of {"kid":thumbprint}, or
// {"kid":thumbprint,"xms_ksl":ksl} when ksl is not empty (KSLSoftware,
// KSLHardware). thumbprint is the key's RFC 7638 thumbprint, as from
// Thumbprint.
func ReqCnfKid(thumbprint, ksl string) string {
	b, err := marshalJSON(struct {
		Kid string `json:"kid"`
		KSL string `json:"xms_ksl,omitempty"`
	}{thumbprint, ksl})
	if err != nil { // cannot happen: two strings always encode
		panic("pop: req_cnf: " + err.Error())
	}
	return b64.EncodeToString(b)
}

// X5TS256 returns the RFC 8705 §3.1 "x5t#S256" confirmation of a
// certificate: base64url, no padding, of SHA-256 over its DER encoding.
func X5TS256(certDER []byte) string {
	sum := sha256.Sum256(certDER)
	return b64.EncodeToString(sum[:])
}

// PoPAuthorization returns the Authorization header value that presents a
// Signed HTTP Request: "PoP " + shr.
func PoPAuthorization(shr string) string {
	return "PoP " + shr
}
