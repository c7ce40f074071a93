package server

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/url"
	"sort"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
)

// KeyStorageHardware is the MSAL "xms_ksl" value for a key held in
// hardware.
const KeyStorageHardware = "uhw"

// versionRequest is every PoP request: a key and an optional version.
type versionRequest interface {
	GetName() string
	GetVersion() uint32
	GetKid() string
}

func (s *Server) signer(ctx context.Context, req versionRequest) (*keyring.VersionSigner, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	return s.ring.Signer(ctx, tenant, req.GetName(), keyring.VersionRef{Version: req.GetVersion(), Kid: req.GetKid()})
}

// inputError turns a pop or x509 builder's complaint about the request into
// an INVALID_ARGUMENT naming the request field: fields maps the claim or
// header member the builder names to it, and field is used for any other.
// The failure of the signature itself (keyring.SignError: the hardware, the
// quota) and errors of the keyring pass as they are, to be mapped like any
// other (toStatus): their text is not the client's to read.
func inputError(field string, fields map[string]string, err error) error {
	var se *keyring.SignError
	if errors.As(err, &se) {
		return se.Err
	}
	for _, kind := range []error{kms.ErrInvalidArgument, kms.ErrNotFound, kms.ErrFailedPrecondition,
		kms.ErrUnavailable, kms.ErrResourceExhausted, kms.ErrDataLoss, kms.ErrAlreadyExists,
		context.DeadlineExceeded, context.Canceled} {
		if errors.Is(err, kind) {
			return err
		}
	}
	var ce *pop.ClaimError
	var he *pop.HeaderError
	switch {
	case errors.As(err, &ce) && fields[ce.Claim] != "":
		field = fields[ce.Claim]
	case errors.As(err, &he) && fields[he.Member] != "":
		field = fields[he.Member]
	}
	return &kms.FieldError{Field: field, Reason: err.Error()}
}

// The request fields behind the claims the pop builders check.
var (
	dpopFields = map[string]string{"htm": "htm", "htu": "htu", "ath": "ath", "nonce": "nonce"}
	shrFields  = map[string]string{"at": "access_token", "m": "method", "u": "url", "p": "url", "q": "url",
		"h": "headers", "b": "body", "nonce": "nonce"}
)

func (s *Server) GetConfirmation(ctx context.Context, req *kbv1.GetConfirmationRequest) (*kbv1.GetConfirmationResponse, error) {
	vs, err := s.signer(ctx, req)
	if err != nil {
		return nil, err
	}
	jwk := vs.JOSE().JWK()
	reqCnf, err := pop.ReqCnfJWK(jwk)
	if err != nil {
		return nil, err
	}
	jwkJSON, err := json.Marshal(jwk)
	if err != nil {
		return nil, err
	}
	tp := vs.Kid()
	return &kbv1.GetConfirmationResponse{
		Kid: tp, Version: vs.Version(), Thumbprint: tp, ThumbprintUri: pop.ThumbprintURI(tp), Jkt: tp,
		ReqCnfJwk: reqCnf, ReqCnfKid: pop.ReqCnfKid(tp, KeyStorageHardware), Jwk: string(jwkJSON),
		X5TS256: vs.X5TS256(),
	}, nil
}

func (s *Server) SignJWS(ctx context.Context, req *kbv1.SignJWSRequest) (*kbv1.SignJWSResponse, error) {
	var header map[string]any
	if req.GetHeaderJson() != "" {
		if err := json.Unmarshal([]byte(req.GetHeaderJson()), &header); err != nil {
			return nil, &kms.FieldError{Field: "header_json", Reason: "not a JSON object"}
		}
	}
	vs, err := s.signer(ctx, req)
	if err != nil {
		return nil, err
	}
	jws, err := pop.SignJWS(ctx, vs.JOSE(), req.GetPayload(), pop.JWSOptions{Header: header})
	if err != nil {
		return nil, inputError("header_json", nil, err)
	}
	return &kbv1.SignJWSResponse{Jws: jws, Kid: vs.Kid(), Version: vs.Version()}, nil
}

func (s *Server) CreateDPoPProof(ctx context.Context, req *kbv1.CreateDPoPProofRequest) (*kbv1.CreateDPoPProofResponse, error) {
	var extra map[string]any
	if req.GetExtraClaimsJson() != "" {
		if err := json.Unmarshal([]byte(req.GetExtraClaimsJson()), &extra); err != nil {
			return nil, &kms.FieldError{Field: "extra_claims_json", Reason: "not a JSON object"}
		}
	}
	if req.GetHtm() == "" {
		return nil, &kms.FieldError{Field: "htm", Reason: "must be set"}
	}
	if _, err := pop.NormalizeHTU(req.GetHtu()); err != nil {
		return nil, &kms.FieldError{Field: "htu", Reason: err.Error()}
	}
	if req.GetAccessToken() != "" && req.GetAth() != "" {
		return nil, &kms.FieldError{Field: "ath", Reason: "give the access token or its ath, not both"}
	}
	vs, err := s.signer(ctx, req)
	if err != nil {
		return nil, err
	}
	proof, err := pop.NewDPoPProof(ctx, vs.JOSE(), pop.DPoPParams{
		Method: req.GetHtm(), URL: req.GetHtu(), AccessToken: req.GetAccessToken(), ATH: req.GetAth(),
		Nonce: req.GetNonce(), Now: time.Now(), Extra: extra,
	})
	if err != nil {
		return nil, inputError("extra_claims_json", dpopFields, err)
	}
	return &kbv1.CreateDPoPProofResponse{Proof: proof, Kid: vs.Kid(), Version: vs.Version(), Jkt: vs.Kid()}, nil
}

func (s *Server) CreateSignedHttpRequest(ctx context.Context, req *kbv1.CreateSignedHttpRequestRequest) (*kbv1.CreateSignedHttpRequestResponse, error) {
	if req.GetAccessToken() == "" {
		return nil, &kms.FieldError{Field: "access_token", Reason: "must be set"}
	}
	if req.GetMethod() == "" {
		return nil, &kms.FieldError{Field: "method", Reason: "must be set"}
	}
	u, err := url.Parse(req.GetUrl())
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, &kms.FieldError{Field: "url", Reason: "want an absolute http or https URL"}
	}
	h := http.Header{}
	var names []string
	for k, v := range req.GetHeaders() {
		h.Set(k, v)
		names = append(names, k)
	}
	vs, err := s.signer(ctx, req)
	if err != nil {
		return nil, err
	}
	shr, err := pop.NewSignedHTTPRequest(ctx, vs.JOSE(), pop.SHRParams{
		AccessToken: req.GetAccessToken(), Method: req.GetMethod(), URL: req.GetUrl(), Nonce: req.GetNonce(),
		Now: time.Now(), Headers: h, SignedHeaders: sortedNames(names), Body: req.GetBody(), HashBody: len(req.GetBody()) > 0,
	})
	if err != nil {
		return nil, inputError("url", shrFields, err)
	}
	return &kbv1.CreateSignedHttpRequestResponse{Shr: shr, Kid: vs.Kid(), Version: vs.Version()}, nil
}

// subject checks and builds a certificate subject and SANs.
func subject(cn string, dns, uris []string) (pkix.Name, []*url.URL, error) {
	if cn == "" && len(dns) == 0 && len(uris) == 0 {
		return pkix.Name{}, nil, &kms.FieldError{Field: "common_name", Reason: "give a common name or a SAN"}
	}
	var us []*url.URL
	for _, raw := range uris {
		u, err := url.Parse(raw)
		if err != nil || u.Scheme == "" {
			return pkix.Name{}, nil, &kms.FieldError{Field: "uris", Reason: fmt.Sprintf("%q is not an absolute URI", raw)}
		}
		us = append(us, u)
	}
	return pkix.Name{CommonName: cn}, us, nil
}

// sigAlg is the X.509 signature algorithm for a key: PSS for PS256 keys.
func sigAlg(vs *keyring.VersionSigner) x509.SignatureAlgorithm { return sigAlgFor(vs.Algorithm()) }

func sigAlgFor(alg kms.Algorithm) x509.SignatureAlgorithm {
	if alg == kms.PS256 {
		return x509.SHA256WithRSAPSS
	}
	return x509.UnknownSignatureAlgorithm // x509 picks from the key
}

func (s *Server) CreateCertificateRequest(ctx context.Context, req *kbv1.CreateCertificateRequestRequest) (*kbv1.CreateCertificateRequestResponse, error) {
	name, uris, err := subject(req.GetCommonName(), req.GetDnsNames(), req.GetUris())
	if err != nil {
		return nil, err
	}
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	ref := keyring.VersionRef{Version: req.GetVersion(), Kid: req.GetKid()}
	pk, err := s.ring.PublicKey(ctx, tenant, req.GetName(), ref)
	if err != nil {
		return nil, err
	}
	// The keyring builds and signs the CSR: a PENDING version may sign
	// one, so that a CA can issue its certificate before it is ACTIVE.
	der, pk, err := s.ring.CertificateRequest(ctx, tenant, req.GetName(), keyring.VersionRef{Kid: pk.Kid}, &x509.CertificateRequest{
		Subject: name, DNSNames: req.GetDnsNames(), URIs: uris, SignatureAlgorithm: sigAlgFor(pk.Alg),
	})
	if err != nil {
		return nil, inputError("dns_names", nil, err)
	}
	return &kbv1.CreateCertificateRequestResponse{
		CsrDer: der, CsrPem: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})),
		Kid: pk.Kid, Version: pk.Version,
	}, nil
}

// MaxCertificateValidity bounds self-signed certificates (the CA/B
// Forum's historical maximum).
const MaxCertificateValidity = 825 * 24 * time.Hour

func (s *Server) CreateSelfSignedCertificate(ctx context.Context, req *kbv1.CreateSelfSignedCertificateRequest) (*kbv1.CreateSelfSignedCertificateResponse, error) {
	name, uris, err := subject(req.GetCommonName(), req.GetDnsNames(), req.GetUris())
	if err != nil {
		return nil, err
	}
	validity := 90 * 24 * time.Hour
	if v := req.GetValidity(); v != nil {
		if err := v.CheckValid(); err != nil || v.AsDuration() <= 0 || v.AsDuration() > MaxCertificateValidity {
			return nil, &kms.FieldError{Field: "validity", Reason: "want more than 0 and at most 825 days"}
		}
		validity = v.AsDuration()
	}
	vs, err := s.signer(ctx, req)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               name,
		DNSNames:              req.GetDnsNames(),
		URIs:                  uris,
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		SignatureAlgorithm:    sigAlg(vs),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, vs.Public(), vs.Crypto(ctx))
	if err != nil {
		return nil, inputError("dns_names", nil, err)
	}
	return &kbv1.CreateSelfSignedCertificateResponse{
		CertificateDer: der, CertificatePem: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		X5TS256: pop.X5TS256(der), Kid: vs.Kid(), Version: vs.Version(),
	}, nil
}

func sortedNames(names []string) []string {
	sort.Strings(names)
	return names
}

func (s *Server) AttestKey(ctx context.Context, req *kbv1.AttestKeyRequest) (*kbv1.AttestKeyResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	a, pk, err := s.ring.Attest(ctx, tenant, req.GetName(), keyring.VersionRef{Version: req.GetVersion(), Kid: req.GetKid()}, req.GetNonce())
	if err != nil {
		return nil, err
	}
	return &kbv1.AttestKeyResponse{
		Attest: a.Attest, Signature: a.Signature, CertifyingKeyPublic: a.CertifyingKey, KeyPublic: a.KeyPublic,
		Kid: pk.Kid, Version: pk.Version,
	}, nil
}
