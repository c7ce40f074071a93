package server

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/testpki"
	"github.com/keybroker/keybroker/pop"
)

// csrFor asks the daemon for a CSR of a key version (0: the ACTIVE one).
func csrFor(t *testing.T, s *stack, name string, version uint32) []byte {
	t.Helper()
	r, err := s.client.CreateCertificateRequest(ctxT(t), &kbv1.CreateCertificateRequestRequest{Name: name, Version: version, CommonName: "svc-" + name})
	if err != nil {
		t.Fatal(err)
	}
	return r.CsrDer
}

func x5tOf(der []byte) string {
	sum := sha256.Sum256(der)
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// TestImportCertificate: CSR from the daemon, a real CA (root and
// intermediate) issues, the chain is imported; GetConfirmation,
// GetPublicKey, GetKey and client assertions then carry its x5t#S256, for
// EC and RSA keys.
func TestImportCertificate(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	root := testpki.NewCA(t, "root")
	inter := root.Intermediate(t, "issuing CA")
	for _, alg := range []kbv1.Algorithm{kbv1.Algorithm_ALGORITHM_ES384, kbv1.Algorithm_ALGORITHM_PS256} {
		name := strings.ToLower(algName(alg))
		if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: name, Algorithm: alg}); err != nil {
			t.Fatal(err)
		}
		// Before an import: no x5t#S256 anywhere, none in the assertion.
		conf, _ := s.client.GetConfirmation(ctx, &kbv1.GetConfirmationRequest{Name: name})
		ca, _ := s.client.CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: name, ClientId: "c", Audience: "https://as.example/t"})
		if conf.GetX5TS256() != "" || ca.GetX5TS256() != "" || strings.Contains(string(mustB64(t, strings.Split(ca.GetAssertion(), ".")[0])), "x5t") {
			t.Errorf("%s: x5t#S256 before any import: %q %q", name, conf.GetX5TS256(), ca.GetX5TS256())
		}

		leaf := inter.SignCSR(t, csrFor(t, s, name, 0), time.Time{})
		chain := [][]byte{leaf, inter.Cert.Raw}
		resp, err := s.client.ImportCertificate(ctx, &kbv1.ImportCertificateRequest{Name: name, Version: 1, CertificateChain: chain})
		if err != nil {
			t.Fatal(err)
		}
		want := x5tOf(leaf)
		if resp.X5TS256 != want || resp.Version != 1 || resp.ExpireTime == nil {
			t.Errorf("%s: ImportCertificate = %v, want x5t#S256 %s of version 1", name, resp, want)
		}
		conf, err = s.client.GetConfirmation(ctx, &kbv1.GetConfirmationRequest{Name: name})
		if err != nil || conf.X5TS256 != want {
			t.Errorf("%s: GetConfirmation x5t#S256 %q (%v), want %s", name, conf.GetX5TS256(), err, want)
		}
		pk, err := s.client.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: name})
		if err != nil || len(pk.CertificateChain) != 2 || !bytes.Equal(pk.CertificateChain[0], leaf) || !bytes.Equal(pk.CertificateChain[1], inter.Cert.Raw) || pk.X5TS256 != want {
			t.Errorf("%s: GetPublicKey chain of %d, x5t %q (%v)", name, len(pk.GetCertificateChain()), pk.GetX5TS256(), err)
		}
		k, _ := s.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: name})
		if v := k.GetKey().GetVersions()[0]; v.X5TS256 != want || !v.CertificateExpireTime.AsTime().Equal(resp.ExpireTime.AsTime()) {
			t.Errorf("%s: GetKey version 1: %v", name, v)
		}
		// The JWK Set publishes the chain with the key (x5c, x5t#S256), so
		// a relying party can match the certificate; the JWK itself (and
		// so its thumbprint, the kid) is unchanged.
		jr, err := s.client.GetJWKS(ctx, &kbv1.GetJWKSRequest{})
		if err != nil {
			t.Fatal(err)
		}
		var set pop.PublishedJWKS
		if err := json.Unmarshal([]byte(jr.Jwks), &set); err != nil {
			t.Fatal(err)
		}
		var published *pop.PublishedJWK
		for i := range set.Keys {
			if set.Keys[i].Kid == pk.Kid {
				published = &set.Keys[i]
			}
		}
		if published == nil || len(published.X5c) != 2 || published.X5c[0] != base64.StdEncoding.EncodeToString(leaf) ||
			published.X5c[1] != base64.StdEncoding.EncodeToString(inter.Cert.Raw) || published.X5tS256 != want {
			t.Errorf("%s: the JWKS entry of version 1 is %+v, want x5c = [leaf, intermediate] and x5t#S256 %s", name, published, want)
		} else if tp, err := published.Thumbprint(); err != nil || tp != pk.Kid {
			t.Errorf("%s: the published JWK's thumbprint %q (%v), want the kid %s", name, tp, err, pk.Kid)
		}
		// The imported chain verifies to the root, as a relying party sees it.
		lc, _ := x509.ParseCertificate(leaf)
		inters := x509.NewCertPool()
		inters.AddCert(inter.Cert)
		if _, err := lc.Verify(x509.VerifyOptions{Roots: root.Pool(), Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Errorf("%s: imported leaf does not verify to the root: %v", name, err)
		}
		ca, err = s.client.CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: name, ClientId: "c", Audience: "https://as.example/t"})
		if err != nil {
			t.Fatal(err)
		}
		var hdr map[string]any
		b64json(t, strings.Split(ca.Assertion, ".")[0], &hdr)
		jwxVerify(t, ca.Assertion, algName(alg), []byte(pk.Jwk))
		if hdr["x5t#S256"] != want || ca.X5TS256 != want {
			t.Errorf("%s: assertion header %v, response x5t %q, want x5t#S256 %s", name, hdr, ca.X5TS256, want)
		}

		// Renewal: a new chain replaces the old; by kid, root included.
		renewed := root.SignCSR(t, csrFor(t, s, name, 0), time.Now().Add(48*time.Hour))
		resp, err = s.client.ImportCertificate(ctx, &kbv1.ImportCertificateRequest{Name: name, Kid: pk.Kid, CertificateChain: [][]byte{renewed, root.Cert.Raw}})
		if err != nil || resp.X5TS256 != x5tOf(renewed) {
			t.Fatalf("%s: renewal: %v, %v", name, resp, err)
		}
		if conf, _ := s.client.GetConfirmation(ctx, &kbv1.GetConfirmationRequest{Name: name}); conf.GetX5TS256() != x5tOf(renewed) {
			t.Errorf("%s: after renewal x5t#S256 %q, want the new leaf's", name, conf.GetX5TS256())
		}
	}
}

func mustB64(t *testing.T, s string) []byte {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestImportCertificateRefusals: every bad chain is refused naming the
// field, an unknown key or version is NOT_FOUND, a version that is gone
// FAILED_PRECONDITION, a signer may not import; after all of them the key
// is exactly as before, and no hardware call was made.
func TestImportCertificateRefusals(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	root := testpki.NewCA(t, "root")
	inter := root.Intermediate(t, "issuing CA")
	for _, n := range []string{"k", "other"} {
		if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: n, Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
			t.Fatal(err)
		}
	}
	good := inter.SignCSR(t, csrFor(t, s, "k", 0), time.Time{})
	if _, err := s.client.ImportCertificate(ctx, &kbv1.ImportCertificateRequest{Name: "k", Version: 1, CertificateChain: [][]byte{good, inter.Cert.Raw}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "other"}); err != nil {
		t.Fatal(err)
	}
	otherV1 := inter.SignCSR(t, csrFor(t, s, "other", 1), time.Time{})
	if _, err := s.client.RevokeKeyVersion(ctx, &kbv1.RevokeKeyVersionRequest{Name: "other", Version: 1}); err != nil {
		t.Fatal(err)
	}
	forV2 := inter.SignCSR(t, csrFor(t, s, "k", 2), time.Time{})
	expired := inter.SignCSR(t, csrFor(t, s, "k", 2), time.Now().Add(-time.Minute))
	snapshot := func() string {
		var b []byte
		for _, n := range []string{"k", "other"} {
			k, err := s.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: n})
			if err != nil {
				t.Fatal(err)
			}
			kb, _ := proto.MarshalOptions{Deterministic: true}.Marshal(k)
			b = append(b, kb...)
			for v := uint32(1); v <= 2; v++ {
				pk, err := s.client.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: n, Version: v})
				if err != nil {
					t.Fatal(err)
				}
				pb, _ := proto.MarshalOptions{Deterministic: true}.Marshal(pk)
				b = append(b, pb...)
			}
		}
		return string(b)
	}
	before, calls := snapshot(), s.backend.calls.Load()

	for _, tc := range []struct {
		what  string
		req   *kbv1.ImportCertificateRequest
		code  codes.Code
		field string // in the message
	}{
		{"empty chain", &kbv1.ImportCertificateRequest{Name: "k", Version: 2}, codes.InvalidArgument, "certificate_chain:"},
		{"garbage DER", &kbv1.ImportCertificateRequest{Name: "k", Version: 2, CertificateChain: [][]byte{[]byte("not a certificate")}}, codes.InvalidArgument, "certificate_chain[0]:"},
		{"garbage issuer", &kbv1.ImportCertificateRequest{Name: "k", Version: 2, CertificateChain: [][]byte{forV2, {0x30, 0x00}}}, codes.InvalidArgument, "certificate_chain[1]:"},
		{"empty certificate", &kbv1.ImportCertificateRequest{Name: "k", Version: 2, CertificateChain: [][]byte{forV2, {}}}, codes.InvalidArgument, "certificate_chain[1]:"},
		{"too many", &kbv1.ImportCertificateRequest{Name: "k", Version: 2, CertificateChain: bytes.SplitAfter(bytes.Repeat([]byte{1}, 9), []byte{1})[:9]}, codes.InvalidArgument, "certificate_chain:"},
		{"another version's key", &kbv1.ImportCertificateRequest{Name: "k", Version: 1, CertificateChain: [][]byte{forV2, inter.Cert.Raw}}, codes.InvalidArgument, "certificate_chain[0]:"},
		{"another key's certificate", &kbv1.ImportCertificateRequest{Name: "k", CertificateChain: [][]byte{otherV1}}, codes.InvalidArgument, "certificate_chain[0]:"},
		{"unrelated key", &kbv1.ImportCertificateRequest{Name: "k", Version: 2, CertificateChain: [][]byte{selfSigned(t)}}, codes.InvalidArgument, "certificate_chain[0]:"},
		{"wrong issuer", &kbv1.ImportCertificateRequest{Name: "k", Version: 2, CertificateChain: [][]byte{forV2, root.Cert.Raw}}, codes.InvalidArgument, "certificate_chain[1]:"},
		{"issuer first", &kbv1.ImportCertificateRequest{Name: "k", Version: 2, CertificateChain: [][]byte{inter.Cert.Raw, forV2}}, codes.InvalidArgument, "certificate_chain[0]:"},
		{"expired leaf", &kbv1.ImportCertificateRequest{Name: "k", Version: 2, CertificateChain: [][]byte{expired, inter.Cert.Raw}}, codes.InvalidArgument, "certificate_chain[0]: expired"},
		{"version and kid", &kbv1.ImportCertificateRequest{Name: "k", Version: 2, Kid: "x", CertificateChain: [][]byte{forV2}}, codes.InvalidArgument, "kid:"},
		{"unknown key", &kbv1.ImportCertificateRequest{Name: "nope", Version: 2, CertificateChain: [][]byte{forV2}}, codes.NotFound, "nope"},
		{"unknown version", &kbv1.ImportCertificateRequest{Name: "k", Version: 9, CertificateChain: [][]byte{forV2}}, codes.NotFound, "version 9"},
		{"unknown kid", &kbv1.ImportCertificateRequest{Name: "k", Kid: "abc", CertificateChain: [][]byte{forV2}}, codes.NotFound, "abc"},
		{"revoked version", &kbv1.ImportCertificateRequest{Name: "other", Version: 1, CertificateChain: [][]byte{otherV1, inter.Cert.Raw}}, codes.FailedPrecondition, "is revoked"},
	} {
		_, err := s.client.ImportCertificate(ctx, tc.req)
		st := status.Convert(err)
		if st.Code() != tc.code || !strings.Contains(st.Message(), tc.field) {
			t.Errorf("%s: %v, want %v mentioning %q", tc.what, err, tc.code, tc.field)
		}
		for _, bad := range []string{"CKR_", "/tmp", "handle"} {
			if strings.Contains(st.Message(), bad) {
				t.Errorf("%s: message %q contains %q", tc.what, st.Message(), bad)
			}
		}
	}
	if after := snapshot(); after != before {
		t.Error("a refused import changed a key")
	}
	if n := s.backend.calls.Load() - calls; n != 0 {
		t.Errorf("%d hardware calls for refused imports", n)
	}

	// A signer-only tenant may not import.
	signer := newStackWith(t, []TenantPolicy{{Name: "t1", Identities: (&stack{}).tenantsForTest()[0].Identities, Roles: RoleSigner}})
	_, err := signer.client.ImportCertificate(ctx, &kbv1.ImportCertificateRequest{Name: "k", CertificateChain: [][]byte{forV2}})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("signer-only tenant: %v, want PermissionDenied", err)
	}
}

// selfSigned is a certificate for a key keybroker does not hold.
func selfSigned(t *testing.T) []byte {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "x"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestCSRForPendingVersion: a PENDING version signs its CSR (so a CA can
// issue during the lead) and takes its chain, and still signs nothing
// else; once ACTIVE, its chain is the one GetConfirmation reports.
func TestCSRForPendingVersion(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	// 84 days on, the default policy (90 days, 7 days' lead) has made v2.
	if err := s.svc.ring.Advance(ctx, time.Now().Add(84*24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	k, _ := s.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: "k"})
	if len(k.Key.Versions) != 2 || k.Key.Versions[1].State != kbv1.KeyState_KEY_STATE_PENDING {
		t.Fatalf("versions after the lead began: %v", k.Key.Versions)
	}
	csr, err := s.client.CreateCertificateRequest(ctx, &kbv1.CreateCertificateRequestRequest{Name: "k", Version: 2, CommonName: "svc"})
	if err != nil {
		t.Fatalf("CSR of the PENDING version: %v", err)
	}
	parsed, err := x509.ParseCertificateRequest(csr.CsrDer)
	if err != nil || parsed.CheckSignature() != nil || csr.Version != 2 {
		t.Fatalf("CSR of v2: %v, version %d", err, csr.Version)
	}
	v2, _ := s.client.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: "k", Version: 2})
	if pub, ok := parsed.PublicKey.(*ecdsa.PublicKey); !ok || x509MarshalPKIX(t, pub) != string(v2.Der) {
		t.Error("the CSR is not for version 2's key")
	}
	// Nothing else signs with it.
	for what, call := range map[string]func() error{
		"Sign": func() error {
			_, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Version: 2, Digest: make([]byte, 32)})
			return err
		},
		"SignJWS": func() error {
			_, err := s.client.SignJWS(ctx, &kbv1.SignJWSRequest{Name: "k", Version: 2, Payload: []byte("{}")})
			return err
		},
		"CreateSelfSignedCertificate": func() error {
			_, err := s.client.CreateSelfSignedCertificate(ctx, &kbv1.CreateSelfSignedCertificateRequest{Name: "k", Version: 2, CommonName: "x"})
			return err
		},
		"CreateClientAssertion": func() error {
			_, err := s.client.CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: "k", Version: 2, ClientId: "c", Audience: "https://as.example/t"})
			return err
		},
	} {
		if err := call(); status.Code(err) != codes.FailedPrecondition {
			t.Errorf("%s with the PENDING version: %v, want FailedPrecondition", what, err)
		}
	}

	ca := testpki.NewCA(t, "ca")
	leaf := ca.SignCSR(t, csr.CsrDer, time.Time{})
	// No version named: the one whose key the leaf certifies.
	resp, err := s.client.ImportCertificate(ctx, &kbv1.ImportCertificateRequest{Name: "k", CertificateChain: [][]byte{leaf}})
	if err != nil || resp.Version != 2 {
		t.Fatalf("import for the PENDING version: %v, %v", resp, err)
	}
	if conf, _ := s.client.GetConfirmation(ctx, &kbv1.GetConfirmationRequest{Name: "k"}); conf.GetVersion() != 1 || conf.GetX5TS256() != "" {
		t.Errorf("the ACTIVE version 1 reports x5t#S256 %q", conf.GetX5TS256())
	}
	if _, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k"}); err != nil {
		t.Fatal(err)
	}
	if conf, _ := s.client.GetConfirmation(ctx, &kbv1.GetConfirmationRequest{Name: "k"}); conf.GetVersion() != 2 || conf.GetX5TS256() != x5tOf(leaf) {
		t.Errorf("after activation: version %d x5t#S256 %q, want 2 and the imported leaf's", conf.GetVersion(), conf.GetX5TS256())
	}
}

func x509MarshalPKIX(t *testing.T, pub any) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return string(der)
}

// TestImportCertificateAudited: an import is an admin change — its intent
// is recorded first, then its outcome with the version; when the intent
// cannot be recorded nothing is imported.
func TestImportCertificateAudited(t *testing.T) {
	ctx := ctxT(t)
	method := kbv1.KeyBroker_ImportCertificate_FullMethodName
	a := &scriptedAudit{}
	s := newMTLSStack(t, stackOpts{tenants: []TenantPolicy{cnTenant("a", RoleSigner|RoleAdmin)}, audit: a}, "client-a")
	c := s.clients["client-a"]
	if _, err := c.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	csr, err := c.CreateCertificateRequest(ctx, &kbv1.CreateCertificateRequestRequest{Name: "k", CommonName: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	leaf := s.ca.SignCSR(t, csr.CsrDer, time.Time{})
	req := &kbv1.ImportCertificateRequest{Name: "k", CertificateChain: [][]byte{leaf}}

	a.fail = func(r audit.Record) bool { return r.Method == method }
	if _, err := c.ImportCertificate(ctx, req); status.Code(err) != codes.Unavailable {
		t.Fatalf("import whose intent record fails: %v, want UNAVAILABLE", err)
	}
	if pk, _ := c.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: "k"}); len(pk.GetCertificateChain()) != 0 {
		t.Fatal("imported although its intent was not recorded")
	}
	a.fail = nil
	if _, err := c.ImportCertificate(ctx, req); err != nil {
		t.Fatal(err)
	}
	recs := a.records(method)
	if len(recs) != 2 || recs[0].Code != intentCode || recs[1].Code != "OK" || recs[0].RequestID != recs[1].RequestID ||
		recs[1].Key != "k" || recs[1].Version != 1 || recs[1].Kid != csr.Kid || recs[1].Tenant != "a" {
		t.Errorf("records of an import = %+v, want intent then OK naming k version 1", recs)
	}
}
