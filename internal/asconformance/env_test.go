package asconformance

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/oidcprovidertest"
	"github.com/keybroker/keybroker/internal/testdaemon"
	"github.com/keybroker/keybroker/internal/testpki"
	"github.com/keybroker/keybroker/pop"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

func TestMain(m *testing.M) { softhsmtest.Main(m) }

// tenant is the tenant the tests act as; it publishes its JWK Set.
const tenant = "rp"

var algs = []kbv1.Algorithm{kbv1.Algorithm_ALGORITHM_ES256, kbv1.Algorithm_ALGORITHM_ES384, kbv1.Algorithm_ALGORITHM_PS256, kbv1.Algorithm_ALGORITHM_RS256}

func algName(a kbv1.Algorithm) string {
	return strings.ToLower(strings.TrimPrefix(a.String(), "ALGORITHM_"))
}

// env is a keybrokerd on a fresh SoftHSM2 token that publishes the
// tenant's keys on its HTTPS JWKS listener, and a CA for every TLS server
// of the test (the listener, the AS, the resource server).
type env struct {
	c    *client.Client
	ca   *testpki.CA
	jwks string // https://127.0.0.1:PORT/tenants/rp
	hc   *http.Client
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ca := testpki.NewCA(t, "asconformance")
	certFile, keyFile, _ := ca.ServerFiles(t, t.TempDir())
	addr := freePort(t)
	d := testdaemon.Start(t, func(c *config.Config) {
		c.Tenants = []config.Tenant{{
			Name:        tenant,
			Identities:  config.Identities{UIDs: []uint32{uint32(os.Getuid())}},
			Roles:       []string{config.RoleSigner, config.RoleAdmin},
			PublishJWKS: true,
		}}
		// max-age=0: the AS's own minimum (60 s for oidc-provider) decides
		// how long it keeps a copy.
		c.JWKS = config.JWKS{Address: addr, CertFile: certFile, KeyFile: keyFile, MaxAge: 0}
		c.Rotation.CheckInterval = time.Second
	})
	c, err := client.Dial(d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	e := &env{c: c, ca: ca, jwks: "https://" + addr + "/tenants/" + tenant,
		hc: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}}}}
	// The listener comes up with the daemon; wait for it (bounded).
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := e.hc.Get(e.jwks + "/jwks.json")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
			err = fmt.Errorf("%s", resp.Status)
		}
		if time.Now().After(deadline) {
			t.Fatalf("JWKS listener %s not serving within 20s: %v", e.jwks, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return e
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func ctx30(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// key creates a key and returns its Signer.
func (e *env) key(t *testing.T, name string, alg kbv1.Algorithm) *client.Signer {
	t.Helper()
	ctx := ctx30(t)
	if _, err := e.c.API().CreateKey(ctx, &kbv1.CreateKeyRequest{Name: name, Algorithm: alg}); err != nil {
		t.Fatalf("CreateKey %s: %v", name, err)
	}
	s, err := e.c.Signer(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// keyJWKSURI is the key's own JWK Set on keybroker's listener: the
// jwks_uri a relying party registers for the client.
func (e *env) keyJWKSURI(name string) string { return e.jwks + "/keys/" + name + "/jwks.json" }

// published returns the kids the key's jwks_uri lists now.
func (e *env) published(t *testing.T, name string) map[string]bool {
	t.Helper()
	resp, err := e.hc.Get(e.keyJWKSURI(name))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var set struct {
		Keys []struct {
			Kid string `json:"kid"`
		} `json:"keys"`
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", e.keyJWKSURI(name), resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&set); err != nil {
		t.Fatal(err)
	}
	kids := map[string]bool{}
	for _, k := range set.Keys {
		kids[k.Kid] = true
	}
	return kids
}

// rsClient is the resource server's own client at the AS, for
// introspection (RFC 7662).
const rsClientID = "resource-server"

var rsSecret = randomString()

func rsClientMetadata() map[string]any {
	return map[string]any{"client_id": rsClientID, "client_secret": rsSecret, "token_endpoint_auth_method": "client_secret_basic"}
}

func randomString() string {
	var b [24]byte
	rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// rs is a resource server written against RFC 9449 §7 and RFC 8705 §3 with
// the project's pop verifiers: it introspects the access token at the AS
// and accepts it only with its binding — a DPoP proof by the key whose
// thumbprint is cnf.jkt, or a TLS client certificate whose SHA-256
// thumbprint is cnf.x5t#S256.
type rs struct {
	as  *oidcprovidertest.Server
	srv *httptest.Server
	URL string

	mu   sync.Mutex
	jtis map[string]bool
}

func newRS(t *testing.T, ca *testpki.CA, as *oidcprovidertest.Server) *rs {
	t.Helper()
	cert, _, _ := ca.Issue(t, testpki.Leaf{CommonName: "rs", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	r := &rs{as: as, jtis: map[string]bool{}}
	r.srv = httptest.NewUnstartedServer(http.HandlerFunc(r.serve))
	r.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert, MinVersion: tls.VersionTLS12}
	r.srv.StartTLS()
	t.Cleanup(r.srv.Close)
	r.URL = r.srv.URL + "/resource"
	return r
}

// rsAnswer is the resource server's answer.
type rsAnswer struct {
	Status     int
	Binding    string `json:"binding"`
	ClientID   string `json:"client_id"`
	Error      string `json:"error"`
	Reason     string `json:"reason"`
	TLSVersion uint16 `json:"tls_version"`
}

func (r *rs) refuse(w http.ResponseWriter, scheme, code, reason string) {
	w.Header().Set("WWW-Authenticate", fmt.Sprintf(`%s error=%q, error_description=%q`, scheme, code, reason))
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusUnauthorized)
	json.NewEncoder(w).Encode(map[string]string{"error": code, "reason": reason})
}

func (r *rs) serve(w http.ResponseWriter, req *http.Request) {
	scheme, token, _ := strings.Cut(req.Header.Get("Authorization"), " ")
	if token == "" {
		r.refuse(w, "DPoP", "invalid_request", "no access token")
		return
	}
	in, err := r.as.Introspect(req.Context(), token, rsClientID+":"+rsSecret)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	if !in.Active {
		r.refuse(w, scheme, "invalid_token", "the token is not active")
		return
	}
	ans := map[string]any{"client_id": in.ClientID, "tls_version": req.TLS.Version}
	switch {
	case in.Cnf.JKT != "":
		if !strings.EqualFold(scheme, "DPoP") {
			r.refuse(w, "DPoP", "invalid_token", "a DPoP-bound token must be sent with the DPoP scheme")
			return
		}
		proofs := req.Header.Values("DPoP")
		if len(proofs) != 1 {
			r.refuse(w, "DPoP", "invalid_dpop_proof", fmt.Sprintf("got %d DPoP headers, want 1", len(proofs)))
			return
		}
		claims, err := pop.VerifyDPoPProof(proofs[0], pop.DPoPCheck{
			Method: req.Method, URL: "https://" + req.Host + req.URL.RequestURI(), AccessToken: token, Now: time.Now(),
		})
		if err != nil {
			r.refuse(w, "DPoP", "invalid_dpop_proof", err.Error())
			return
		}
		r.mu.Lock()
		seen := r.jtis[claims.JTI]
		r.jtis[claims.JTI] = true
		r.mu.Unlock()
		if seen {
			r.refuse(w, "DPoP", "invalid_dpop_proof", "jti replayed")
			return
		}
		if claims.Thumbprint != in.Cnf.JKT {
			r.refuse(w, "DPoP", "invalid_token", fmt.Sprintf("proof key %s is not the token's cnf.jkt %s", claims.Thumbprint, in.Cnf.JKT))
			return
		}
		ans["binding"] = "dpop"
	case in.Cnf.X5TS256 != "":
		if len(req.TLS.PeerCertificates) == 0 {
			r.refuse(w, "Bearer", "invalid_token", "a certificate-bound token needs the TLS client certificate")
			return
		}
		if got := pop.X5TS256(req.TLS.PeerCertificates[0].Raw); got != in.Cnf.X5TS256 {
			r.refuse(w, "Bearer", "invalid_token", fmt.Sprintf("client certificate x5t#S256 %s is not the token's %s", got, in.Cnf.X5TS256))
			return
		}
		ans["binding"] = "mtls"
	default:
		r.refuse(w, scheme, "invalid_token", "only sender-constrained tokens are accepted")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(ans)
}

// call GETs the resource through hc.
func call(t *testing.T, hc *http.Client, u string, header http.Header) rsAnswer {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx30(t), http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	a := rsAnswer{Status: resp.StatusCode}
	if err := json.Unmarshal(b, &a); err != nil {
		t.Fatalf("RS answer %s %q: %v", resp.Status, b, err)
	}
	return a
}

// lastEvent returns the last error event the AS reported since the
// previous call, failing the test if there is none.
func lastEvent(t *testing.T, as *oidcprovidertest.Server) oidcprovidertest.Event {
	t.Helper()
	ev := as.Events(t)
	if len(ev) == 0 {
		t.Fatal("the AS reported no error event")
	}
	return ev[len(ev)-1]
}

func form(kv ...string) url.Values {
	v := url.Values{}
	for i := 0; i+1 < len(kv); i += 2 {
		v.Set(kv[i], kv[i+1])
	}
	return v
}
