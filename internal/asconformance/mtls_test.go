package asconformance

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/internal/oidcprovidertest"
	"github.com/keybroker/keybroker/pop"
)

// selfSigned is a key's CreateSelfSignedCertificate certificate as a
// tls.Certificate whose private key is the SDK Signer.
type selfSigned struct {
	cert tls.Certificate
	x5t  string
	jwk  map[string]any // the public JWK with x5c: the client's registered key
}

func newSelfSigned(t *testing.T, e *env, s *client.Signer, cn string) selfSigned {
	t.Helper()
	ctx := ctx30(t)
	resp, err := e.c.API().CreateSelfSignedCertificate(ctx, &kbv1.CreateSelfSignedCertificateRequest{Name: s.Name(), CommonName: cn})
	if err != nil {
		t.Fatal(err)
	}
	der := resp.GetCertificateDer()
	if got := pop.X5TS256(der); resp.GetX5TS256() != got {
		t.Fatalf("daemon x5t#S256 %s, the certificate's %s", resp.GetX5TS256(), got)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := e.c.API().GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: s.Name()})
	if err != nil {
		t.Fatal(err)
	}
	var jwk map[string]any
	if err := json.Unmarshal([]byte(pub.GetJwk()), &jwk); err != nil {
		t.Fatal(err)
	}
	jwk["x5c"] = []string{base64.StdEncoding.EncodeToString(der)}
	return selfSigned{cert: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: s, Leaf: leaf}, x5t: resp.GetX5TS256(), jwk: jwk}
}

// TestMTLS: for each key type, a client registered for
// self_signed_tls_client_auth with the certificate keybroker made for its
// key authenticates with that certificate — its private key the SDK Signer
// — over TLS 1.3 and TLS 1.2, and gets a certificate-bound token (cnf
// x5t#S256 = the certificate's thumbprint) that the resource server accepts
// with that certificate only.
func TestMTLS(t *testing.T) {
	e := newEnv(t)
	stranger := newSelfSigned(t, e, e.key(t, "mtls-stranger", kbv1.Algorithm_ALGORITHM_ES256), "stranger")
	certs := map[kbv1.Algorithm]selfSigned{}
	clients := []map[string]any{rsClientMetadata()}
	for _, alg := range algs {
		id := "mtls-" + algName(alg)
		certs[alg] = newSelfSigned(t, e, e.key(t, id, alg), id)
		clients = append(clients, map[string]any{
			"client_id": id, "token_endpoint_auth_method": "self_signed_tls_client_auth",
			"tls_client_certificate_bound_access_tokens": true,
			"jwks": map[string]any{"keys": []any{certs[alg].jwk}},
		})
	}
	as := oidcprovidertest.Start(t, oidcprovidertest.Config{CA: e.ca, Clients: clients})
	if !as.Metadata.TLSClientCertificateBoundAccessTokens || !strings.Contains(strings.Join(as.Metadata.TokenEndpointAuthMethodsSupported, " "), "self_signed_tls_client_auth") {
		t.Fatalf("AS metadata %+v: want certificate-bound tokens and self_signed_tls_client_auth", as.Metadata)
	}
	res := newRS(t, e.ca, as)
	withCert := func(c selfSigned, maxVersion uint16) *http.Client {
		tc := as.TLSConfig()
		tc.Certificates = []tls.Certificate{c.cert}
		tc.MaxVersion = maxVersion
		return as.HTTPClient(tc)
	}

	for _, alg := range algs {
		for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
			t.Run(alg.String()+"/"+tls.VersionName(v), func(t *testing.T) {
				id := "mtls-" + algName(alg)
				c := certs[alg]
				ctx := ctx30(t)
				tr, err := as.Token(ctx, withCert(c, v), form("client_id", id), "")
				if err != nil {
					t.Fatal(err)
				}
				if tr.Status != http.StatusOK || tr.TokenType != "Bearer" || tr.AccessToken == "" {
					t.Fatalf("token: %s, want 200 Bearer\n%v", tr, as.Events(t))
				}
				if tr.TLSVersion != v {
					t.Fatalf("token request went over %s, want %s", tls.VersionName(tr.TLSVersion), tls.VersionName(v))
				}
				in, err := as.Introspect(ctx, tr.AccessToken, rsClientID+":"+rsSecret)
				if err != nil {
					t.Fatal(err)
				}
				if !in.Active || in.ClientID != id || in.Cnf.X5TS256 != c.x5t || in.Cnf.X5TS256 != pop.X5TS256(c.cert.Certificate[0]) {
					t.Fatalf("introspection %+v: want an active token of %s with cnf x5t#S256 %s", in, id, c.x5t)
				}
				bearer := http.Header{"Authorization": {"Bearer " + tr.AccessToken}}
				if a := call(t, withCert(c, v), res.URL, bearer); a.Status != http.StatusOK || a.Binding != "mtls" || a.ClientID != id || a.TLSVersion != v {
					t.Fatalf("RS with the certificate: %+v, want 200 mtls for %s over %s", a, id, tls.VersionName(v))
				}
				if a := call(t, withCert(stranger, v), res.URL, bearer); a.Status != http.StatusUnauthorized || !strings.Contains(a.Reason, "is not the token's") {
					t.Fatalf("RS with another certificate: %+v, want 401", a)
				}
				if a := call(t, as.HTTPClient(nil), res.URL, bearer); a.Status != http.StatusUnauthorized || !strings.Contains(a.Reason, "needs the TLS client certificate") {
					t.Fatalf("RS without a certificate: %+v, want 401", a)
				}

				// The AS refuses the client with another certificate or none.
				tr, err = as.Token(ctx, withCert(stranger, v), form("client_id", id), "")
				if err != nil {
					t.Fatal(err)
				}
				if tr.Status != http.StatusUnauthorized || tr.Error != "invalid_client" {
					t.Fatalf("token with an unregistered certificate: %s, want 401 invalid_client", tr)
				}
				if ev := lastEvent(t, as); ev.ErrorDetail != "unregistered client certificate provided" {
					t.Fatalf("AS said %s", ev)
				}
				tr, err = as.Token(ctx, as.HTTPClient(nil), form("client_id", id), "")
				if err != nil {
					t.Fatal(err)
				}
				if tr.Status != http.StatusUnauthorized || tr.Error != "invalid_client" {
					t.Fatalf("token without a certificate: %s, want 401 invalid_client", tr)
				}
				if ev := lastEvent(t, as); ev.ErrorDetail != "client certificate was not provided" {
					t.Fatalf("AS said %s", ev)
				}
			})
		}
	}
}

// TestMTLSThroughJWKSURI: a client registered by its jwks_uri alone (no
// key material at the AS) authenticates with self_signed_tls_client_auth
// once its certificate is imported into the key's version: keybroker's
// JWK Set then carries the chain (x5c), which is what oidc-provider
// matches the TLS client certificate against; the SDK presents the ACTIVE
// version's chain. Before the import the same certificate is refused.
func TestMTLSThroughJWKSURI(t *testing.T) {
	e := newEnv(t)
	const id = "mtls-by-uri"
	s := e.key(t, id, kbv1.Algorithm_ALGORITHM_ES256)
	c := newSelfSigned(t, e, s, id)
	as := oidcprovidertest.Start(t, oidcprovidertest.Config{CA: e.ca, Clients: []map[string]any{rsClientMetadata(), {
		"client_id": id, "token_endpoint_auth_method": "self_signed_tls_client_auth",
		"tls_client_certificate_bound_access_tokens": true, "jwks_uri": e.keyJWKSURI(id),
	}}})
	ctx := ctx30(t)
	token := func(cert tls.Certificate) *oidcprovidertest.TokenResponse {
		tc := as.TLSConfig()
		tc.Certificates = []tls.Certificate{cert}
		tr, err := as.Token(ctx, as.HTTPClient(tc), form("client_id", id), "")
		if err != nil {
			t.Fatal(err)
		}
		return tr
	}
	if tr := token(c.cert); tr.Status != http.StatusUnauthorized || tr.Error != "invalid_client" {
		t.Fatalf("before the import (no x5c in the jwks_uri): %s, want 401 invalid_client", tr)
	}
	if _, err := e.c.API().ImportCertificate(ctx, &kbv1.ImportCertificateRequest{Name: id, CertificateChain: c.cert.Certificate}); err != nil {
		t.Fatal(err)
	}
	as.AdvanceClock(t, 2*time.Minute) // past its jwks_uri cache, so it fetches the set with x5c
	cert, err := e.c.TLSCertificate(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	tr := token(cert)
	if tr.Status != http.StatusOK || tr.TokenType != "Bearer" {
		t.Fatalf("after the import: %s, want 200 Bearer\n%v", tr, as.Events(t))
	}
	in, err := as.Introspect(ctx, tr.AccessToken, rsClientID+":"+rsSecret)
	if err != nil {
		t.Fatal(err)
	}
	if !in.Active || in.ClientID != id || in.Cnf.X5TS256 != c.x5t {
		t.Fatalf("introspection %+v: want an active token of %s bound to x5t#S256 %s", in, id, c.x5t)
	}
}
