package server

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/kms/kmstest"
	"github.com/keybroker/keybroker/pop"
	"github.com/keybroker/keybroker/tpm"
)

// jwxVerify checks a compact JWS with lestrrat-go/jwx v3, an independent
// JOSE library that is strict on PSS salt, and returns its payload.
func jwxVerify(t *testing.T, compact string, alg string, keyJSON []byte) []byte {
	t.Helper()
	key, err := jwk.ParseKey(keyJSON)
	if err != nil {
		t.Fatalf("jwx ParseKey: %v", err)
	}
	a, ok := jwa.LookupSignatureAlgorithm(alg)
	if !ok {
		t.Fatalf("jwx does not know %s", alg)
	}
	payload, err := jws.Verify([]byte(compact), jws.WithKey(a, key))
	if err != nil {
		t.Fatalf("jwx rejects the %s JWS: %v", alg, err)
	}
	return payload
}

func b64json(t *testing.T, seg string, v any) {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(seg)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}

// TestPoPEveryAlgorithm: confirmations, DPoP proofs, JWS and SHRs made by
// the daemon on SoftHSM2, for every algorithm, checked with jwx v3 and
// claim by claim.
func TestPoPEveryAlgorithm(t *testing.T) {
	testPoP(t, newStack(t), kmstest.AllSpecs())
}

// TestPoPEveryAlgorithmTPM is the same on swtpm (no RSA 4096 there).
func TestPoPEveryAlgorithmTPM(t *testing.T) {
	var specs []kms.KeySpec
	for _, s := range kmstest.AllSpecs() {
		if s.Bits != 4096 {
			specs = append(specs, s)
		}
	}
	testPoP(t, newStackOnTPM(t), specs)
}

func testPoP(t *testing.T, s *stack, specs []kms.KeySpec) {
	ctx := ctxT(t)
	const token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
	for _, spec := range specs {
		name := strings.ToLower(kmstest.Name(spec))
		t.Run(name, func(t *testing.T) {
			if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: name, Algorithm: algToProto(spec.Alg), Bits: int32(spec.Bits)}); err != nil {
				t.Fatal(err)
			}
			conf, err := s.client.GetConfirmation(ctx, &kbv1.GetConfirmationRequest{Name: name})
			if err != nil {
				t.Fatal(err)
			}
			var pubJWK pop.JWK
			json.Unmarshal([]byte(conf.Jwk), &pubJWK)
			tp, _ := pubJWK.Thumbprint()
			if conf.Thumbprint != tp || conf.Kid != tp || conf.Jkt != tp || conf.ThumbprintUri != "urn:ietf:params:oauth:jwk-thumbprint:sha-256:"+tp {
				t.Errorf("confirmation %+v does not match the JWK thumbprint %s", conf, tp)
			}
			if conf.ReqCnfKid != pop.ReqCnfKid(tp, "uhw") {
				t.Errorf("req_cnf kid form %s", conf.ReqCnfKid)
			}
			var cnfJWK pop.JWK
			b64json(t, conf.ReqCnfJwk, &cnfJWK)
			if cnfJWK.Alg != spec.Alg.String() || cnfJWK.Kid != tp {
				t.Errorf("req_cnf jwk form %+v", cnfJWK)
			}

			// DPoP proof.
			pr, err := s.client.CreateDPoPProof(ctx, &kbv1.CreateDPoPProofRequest{Name: name, Htm: "POST",
				Htu: "HTTPS://Resource.Example.ORG:443/protectedresource?x=1#frag", AccessToken: token, Nonce: "n-1"})
			if err != nil {
				t.Fatal(err)
			}
			parts := strings.Split(pr.Proof, ".")
			var hdr struct {
				Typ string          `json:"typ"`
				Alg string          `json:"alg"`
				JWK json.RawMessage `json:"jwk"`
			}
			b64json(t, parts[0], &hdr)
			if hdr.Typ != "dpop+jwt" || hdr.Alg != spec.Alg.String() {
				t.Errorf("DPoP header typ %q alg %q", hdr.Typ, hdr.Alg)
			}
			for _, private := range []string{`"d"`, `"p"`, `"q"`, `"dp"`, `"dq"`, `"qi"`} {
				if strings.Contains(string(hdr.JWK), private) {
					t.Errorf("DPoP jwk has a private member %s: %s", private, hdr.JWK)
				}
			}
			var claims struct {
				JTI   string `json:"jti"`
				HTM   string `json:"htm"`
				HTU   string `json:"htu"`
				IAT   int64  `json:"iat"`
				ATH   string `json:"ath"`
				Nonce string `json:"nonce"`
			}
			if err := json.Unmarshal(jwxVerify(t, pr.Proof, hdr.Alg, hdr.JWK), &claims); err != nil {
				t.Fatal(err)
			}
			if claims.HTM != "POST" || claims.HTU != "https://resource.example.org/protectedresource" ||
				claims.ATH != "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo" || claims.Nonce != "n-1" || len(claims.JTI) < 16 {
				t.Errorf("DPoP claims %+v", claims)
			}
			if d := time.Since(time.Unix(claims.IAT, 0)); d < -time.Second || d > 60*time.Second {
				t.Errorf("iat %d is %v from now", claims.IAT, d)
			}
			if pr.Jkt != tp {
				t.Errorf("proof jkt %s, want %s", pr.Jkt, tp)
			}

			// JWS with caller header members; alg and kid from the daemon.
			jr, err := s.client.SignJWS(ctx, &kbv1.SignJWSRequest{Name: name, HeaderJson: `{"typ":"JWT","x-app":"1"}`, Payload: []byte(`{"sub":"me"}`)})
			if err != nil {
				t.Fatal(err)
			}
			if string(jwxVerify(t, jr.Jws, spec.Alg.String(), []byte(conf.Jwk))) != `{"sub":"me"}` {
				t.Error("JWS payload changed")
			}
			var jh map[string]any
			b64json(t, strings.Split(jr.Jws, ".")[0], &jh)
			if jh["kid"] != tp || jh["alg"] != spec.Alg.String() || jh["x-app"] != "1" {
				t.Errorf("JWS header %v", jh)
			}

			// SHR: cnf.jwk's thumbprint is the kid of the req_cnf.
			sr, err := s.client.CreateSignedHttpRequest(ctx, &kbv1.CreateSignedHttpRequestRequest{Name: name, AccessToken: "at",
				Method: "get", Url: "https://api.example.com:8443/v1/orders?b=bar&a=foo", Headers: map[string]string{"Content-Type": "application/json"}})
			if err != nil {
				t.Fatal(err)
			}
			var sp struct {
				Cnf struct {
					JWK json.RawMessage `json:"jwk"`
				} `json:"cnf"`
				M, U, P string
			}
			if err := json.Unmarshal(jwxVerify(t, sr.Shr, spec.Alg.String(), []byte(conf.Jwk)), &sp); err != nil {
				t.Fatal(err)
			}
			var shrJWK pop.JWK
			json.Unmarshal(sp.Cnf.JWK, &shrJWK)
			var reqCnf struct{ Kid string }
			b64json(t, conf.ReqCnfKid, &reqCnf)
			if got, _ := shrJWK.Thumbprint(); got != reqCnf.Kid || sp.M != "GET" || sp.U != "api.example.com:8443" || sp.P != "/v1/orders" {
				t.Errorf("SHR cnf thumbprint %s (req_cnf kid %s), m %q u %q p %q", got, reqCnf.Kid, sp.M, sp.U, sp.P)
			}

			// Certificate and CSR carry the key.
			cr, err := s.client.CreateSelfSignedCertificate(ctx, &kbv1.CreateSelfSignedCertificateRequest{Name: name, CommonName: "svc", DnsNames: []string{"svc.local"}})
			if err != nil {
				t.Fatal(err)
			}
			cert, err := x509.ParseCertificate(cr.CertificateDer)
			if err != nil {
				t.Fatal(err)
			}
			if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil {
				t.Errorf("self-signed certificate does not verify: %v", err)
			}
			if certTP, _ := pop.Thumbprint(cert.PublicKey); certTP != tp || cr.X5TS256 != pop.X5TS256(cr.CertificateDer) {
				t.Errorf("certificate key %s x5t %s", certTP, cr.X5TS256)
			}
			csr, err := s.client.CreateCertificateRequest(ctx, &kbv1.CreateCertificateRequestRequest{Name: name, CommonName: "svc"})
			if err != nil {
				t.Fatal(err)
			}
			parsed, err := x509.ParseCertificateRequest(csr.CsrDer)
			if err != nil || parsed.CheckSignature() != nil {
				t.Errorf("CSR: %v", err)
			}
		})
	}
}

// TestJWXIsStrictOnPSSSalt makes sure the independent verifier used above
// would catch a max-salt PSS signature.
func TestJWXIsStrictOnPSSSalt(t *testing.T) {
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"PS256"}`))
	input := hdr + "." + base64.RawURLEncoding.EncodeToString([]byte(`{}`))
	d := sha256.Sum256([]byte(input))
	sig, _ := rsa.SignPSS(rand.Reader, key, crypto.SHA256, d[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
	jk, _ := jwk.Import(&key.PublicKey)
	if _, err := jws.Verify([]byte(input+"."+base64.RawURLEncoding.EncodeToString(sig)), jws.WithKey(jwa.PS256(), jk)); err == nil {
		t.Fatal("jwx accepted a max-salt PSS signature")
	}
}

func TestSignJWSRefusesAlg(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	before := s.backend.calls.Load()
	for _, h := range []string{`{"alg":"none"}`, `{"alg":"HS256"}`, `{"alg":"ES256"}`, `{"crit":["x"]}`, `{"kid":"other"}`, `[1]`, `not json`} {
		_, err := s.client.SignJWS(ctx, &kbv1.SignJWSRequest{Name: "k", HeaderJson: h, Payload: []byte("{}")})
		if st := status.Convert(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "header") {
			t.Errorf("header %s: %v, want InvalidArgument about the header", h, err)
		}
	}
	if n := s.backend.calls.Load() - before; n != 0 {
		t.Errorf("%d signatures made for refused headers", n)
	}
}

// TestDPoPJTIUnique: 10,000 proofs through the daemon, no jti twice.
func TestDPoPJTIUnique(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	results := make(chan string, 64)
	const n, workers = 10000, 16
	for w := 0; w < workers; w++ {
		go func() {
			for i := 0; i < n/workers; i++ {
				pr, err := s.client.CreateDPoPProof(ctx, &kbv1.CreateDPoPProofRequest{Name: "k", Htm: "GET", Htu: "https://rs.example/x"})
				if err != nil {
					results <- "error: " + err.Error()
					continue
				}
				var c struct{ JTI string }
				b, _ := base64.RawURLEncoding.DecodeString(strings.Split(pr.Proof, ".")[1])
				json.Unmarshal(b, &c)
				results <- c.JTI
			}
		}()
	}
	for i := 0; i < n; i++ {
		jti := <-results
		if strings.HasPrefix(jti, "error: ") || jti == "" {
			t.Fatal(jti)
		}
		if seen[jti] {
			t.Fatalf("jti %s repeated", jti)
		}
		seen[jti] = true
	}
}

// TestAttestKeyTPM: an AttestKey result verifies — certified Name matches
// the key's public area, nonce echoed, signature under the certifying key.
func TestAttestKeyTPM(t *testing.T) {
	s := newStackOnTPM(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "dev-key", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "other", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	nonce := []byte("fresh-nonce-0123456789")
	a, err := s.client.AttestKey(ctx, &kbv1.AttestKeyRequest{Name: "dev-key", Nonce: nonce})
	if err != nil {
		t.Fatal(err)
	}
	att := &tpm.Attestation{Attest: a.Attest, Signature: a.Signature, CertifyingKey: a.CertifyingKeyPublic}
	if err := tpm.VerifyAttestation(att, a.KeyPublic, nonce); err != nil {
		t.Fatalf("VerifyAttestation: %v", err)
	}
	if tpm.VerifyAttestation(att, a.KeyPublic, []byte("another nonce")) == nil {
		t.Error("attestation verified with the wrong nonce")
	}
	other, err := s.client.AttestKey(ctx, &kbv1.AttestKeyRequest{Name: "other", Nonce: nonce})
	if err != nil {
		t.Fatal(err)
	}
	if tpm.VerifyAttestation(att, other.KeyPublic, nonce) == nil {
		t.Error("attestation verified against another key's public area")
	}
	if _, err := s.client.AttestKey(ctx, &kbv1.AttestKeyRequest{Name: "dev-key", Nonce: make([]byte, 65)}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("65-byte nonce: %v", err)
	}
}

// TestAttestKeyNeedsTPM: on PKCS#11 AttestKey says it is not supported.
func TestAttestKeyNeedsTPM(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
	if _, err := s.client.AttestKey(ctx, &kbv1.AttestKeyRequest{Name: "k"}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("AttestKey on PKCS#11: %v, want FailedPrecondition", err)
	}
}

// TestPoPBadInputNamesField: a request the pop builders refuse gets
// INVALID_ARGUMENT naming the request field, and no signature is made.
func TestPoPBadInputNamesField(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	before := s.backend.calls.Load()
	for field, call := range map[string]func() error{
		"htm": func() error {
			_, err := s.client.CreateDPoPProof(ctx, &kbv1.CreateDPoPProofRequest{Name: "k", Htm: "GE T", Htu: "https://a.example/"})
			return err
		},
		"htu": func() error {
			_, err := s.client.CreateDPoPProof(ctx, &kbv1.CreateDPoPProofRequest{Name: "k", Htm: "GET", Htu: "ftp://a.example/"})
			return err
		},
		"headers": func() error {
			_, err := s.client.CreateSignedHttpRequest(ctx, &kbv1.CreateSignedHttpRequestRequest{Name: "k", AccessToken: "t", Method: "GET",
				Url: "https://a.example/", Headers: map[string]string{"Bad Name": "x"}})
			return err
		},
		"method": func() error {
			_, err := s.client.CreateSignedHttpRequest(ctx, &kbv1.CreateSignedHttpRequestRequest{Name: "k", AccessToken: "t", Method: "G E T", Url: "https://a.example/"})
			return err
		},
	} {
		st := status.Convert(call())
		if st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "invalid "+field+":") {
			t.Errorf("%s: %v, want InvalidArgument naming %s", field, st.Err(), field)
		}
	}
	if n := s.backend.calls.Load() - before; n != 0 {
		t.Errorf("%d signatures made for refused requests", n)
	}
}
