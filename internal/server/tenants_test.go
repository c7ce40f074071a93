package server

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/authn"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/internal/testpki"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

// mtlsStack is a server on a real SoftHSM2 token behind TCP + mutual TLS,
// with one client per tenant certificate.
type mtlsStack struct {
	ca      *testpki.CA
	addr    string
	hsm     *hsm.Backend
	ring    *keyring.Keyring
	clients map[string]kbv1.KeyBrokerClient // by certificate CN
}

type stackOpts struct {
	tenants []TenantPolicy
	audit   Auditor
	backend kms.Backend // default: a fresh token
	ca      *testpki.CA // default: a new CA
	maxKeys map[string]int
}

func newMTLSStack(t *testing.T, o stackOpts, clientCNs ...string) *mtlsStack {
	t.Helper()
	s := &mtlsStack{ca: o.ca, clients: map[string]kbv1.KeyBrokerClient{}}
	if s.ca == nil {
		s.ca = testpki.NewCA(t, "keybroker test CA")
	}
	b := o.backend
	if b == nil {
		tok := softhsmtest.NewToken(t)
		hb, err := hsm.Open(hsm.Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 8, PoolWaitTimeout: 10 * time.Second}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { hb.Close() })
		s.hsm, b = hb, hb
	}
	st, err := store.Open(filepath.Join(t.TempDir(), "kb.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if s.ring, err = keyring.New(keyring.Options{Backend: b, BackendName: "pkcs11", Store: st,
		MaxKeys: func(tenant string) int { return o.maxKeys[tenant] }}); err != nil {
		t.Fatal(err)
	}
	access, err := NewAccess(o.tenants)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, caFile := s.ca.ServerFiles(t, t.TempDir())
	tlsCfg, err := authn.ServerTLS(certFile, keyFile, caFile)
	if err != nil {
		t.Fatal(err)
	}
	svc := New(Options{Ring: s.ring, Access: access, Audit: o.audit})
	g := grpc.NewServer(append(svc.ServerOptions(), grpc.Creds(credentials.NewTLS(tlsCfg)), grpc.UnaryInterceptor(svc.UnaryInterceptor))...)
	kbv1.RegisterKeyBrokerServer(g, svc)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	s.addr = lis.Addr().String()
	for _, cn := range clientCNs {
		s.clients[cn] = s.dial(t, s.ca, cn)
	}
	return s
}

// dial connects with a client certificate for cn issued by ca.
func (s *mtlsStack) dial(t *testing.T, ca *testpki.CA, cn string) kbv1.KeyBrokerClient {
	t.Helper()
	return kbv1.NewKeyBrokerClient(s.dialLeaf(t, ca, testpki.Leaf{CommonName: cn}))
}

// dialLeaf connects with a client certificate for leaf issued by ca.
func (s *mtlsStack) dialLeaf(t *testing.T, ca *testpki.CA, leaf testpki.Leaf) *grpc.ClientConn {
	t.Helper()
	cert, _, _ := ca.Issue(t, leaf)
	creds := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: s.ca.Pool(), ServerName: "localhost"})
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func cnTenant(name string, roles Role) TenantPolicy {
	return TenantPolicy{Name: name, Identities: authn.Rule{CommonNames: []string{"client-" + name}}, Roles: roles}
}

var threeTenants = []TenantPolicy{cnTenant("a", RoleSigner|RoleAdmin), cnTenant("b", RoleSigner|RoleAdmin), cnTenant("c", RoleSigner|RoleAdmin)}

// withUnknownField appends a field no version of the API defines, holding a
// tenant name, to a request's wire form.
func withUnknownField(m proto.Message, tenant string) proto.Message {
	m = proto.Clone(m)
	raw := protowire.AppendTag(nil, 99, protowire.BytesType)
	raw = protowire.AppendString(raw, tenant)
	m.ProtoReflect().SetUnknown(raw)
	return m
}

// outcome is a response's exact bytes: the status (code, message, details)
// and the response message.
func outcome(resp proto.Message, err error) string {
	st, _ := status.FromError(err)
	sb, _ := proto.MarshalOptions{Deterministic: true}.Marshal(st.Proto())
	var rb []byte
	if resp != nil && err == nil {
		rb, _ = proto.MarshalOptions{Deterministic: true}.Marshal(resp)
	}
	return fmt.Sprintf("%x|%x", sb, rb)
}

type probe struct {
	name string
	call func(ctx context.Context, c kbv1.KeyBrokerClient) (proto.Message, error)
}

// TestAttackMatrix: three tenants with three keys each; every tenant probes
// the others' keys through every keyed RPC with spoofed names, kids,
// versions, tenant-like metadata and request fields. No probe succeeds, and
// each response is byte-identical to the response the same probe gets from
// a daemon where the other tenants' keys do not exist.
func TestAttackMatrix(t *testing.T) {
	ctx := ctxT(t)
	cns := []string{"client-a", "client-b", "client-c"}
	full := newMTLSStack(t, stackOpts{tenants: threeTenants}, cns...)
	kids := map[string][]string{}
	names := map[string][]string{}
	// Tenant a's keys have 1 version, b's 3, c's 5: so some version
	// numbers exist only in another tenant's keys.
	rotations := map[string]int{"a": 0, "b": 2, "c": 4}
	createKeys := func(c kbv1.KeyBrokerClient, n string, rot int) {
		if _, err := c.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: n, Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
			t.Fatal(err)
		}
		for j := 0; j < rot; j++ {
			if _, err := c.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: n}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, tn := range []string{"a", "b", "c"} {
		c := full.clients["client-"+tn]
		for i := 1; i <= 3; i++ {
			n := fmt.Sprintf("%s%d", tn, i)
			createKeys(c, n, rotations[tn])
			k, _ := c.GetKey(ctx, &kbv1.GetKeyRequest{Name: n})
			for _, v := range k.Key.Versions {
				kids[tn] = append(kids[tn], v.Kid)
			}
			names[tn] = append(names[tn], n)
		}
	}
	before := map[string]string{}
	for _, tn := range []string{"a", "b", "c"} {
		for _, n := range names[tn] {
			k, _ := full.clients["client-"+tn].GetKey(ctx, &kbv1.GetKeyRequest{Name: n})
			before[tn+"/"+n] = outcome(k, nil)
		}
	}

	d32 := make([]byte, 32)
	probeCert := selfSigned(t)
	spoofMD := []metadata.MD{
		nil,
		metadata.Pairs("x-tenant", "TENANT"),
		metadata.Pairs("tenant", "TENANT"),
		metadata.Pairs("x-keybroker-tenant", "TENANT", "x-forwarded-client-cert", "CN=client-TENANT"),
		metadata.Pairs("authorization", "Bearer TENANT"),
	}
	keyed := func(name string, ref func(kid string, version uint32) (string, uint32)) []probe {
		return []probe{
			{"GetKey", func(ctx context.Context, c kbv1.KeyBrokerClient) (proto.Message, error) {
				return c.GetKey(ctx, &kbv1.GetKeyRequest{Name: name})
			}},
			{"Sign", func(ctx context.Context, c kbv1.KeyBrokerClient) (proto.Message, error) {
				kid, v := ref("", 0)
				return c.Sign(ctx, &kbv1.SignRequest{Name: name, Kid: kid, Version: v, Digest: d32})
			}},
			{"GetPublicKey", func(ctx context.Context, c kbv1.KeyBrokerClient) (proto.Message, error) {
				kid, v := ref("", 0)
				return c.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: name, Kid: kid, Version: v})
			}},
			{"RotateKey", func(ctx context.Context, c kbv1.KeyBrokerClient) (proto.Message, error) {
				return c.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: name, IfActiveVersion: 3})
			}},
			{"RevokeKeyVersion", func(ctx context.Context, c kbv1.KeyBrokerClient) (proto.Message, error) {
				kid, v := ref("", 1)
				return c.RevokeKeyVersion(ctx, &kbv1.RevokeKeyVersionRequest{Name: name, Kid: kid, Version: v})
			}},
			{"UpdatePolicy", func(ctx context.Context, c kbv1.KeyBrokerClient) (proto.Message, error) {
				return c.UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: name, Policy: &kbv1.RotationPolicy{}})
			}},
			{"CreateClientAssertion", func(ctx context.Context, c kbv1.KeyBrokerClient) (proto.Message, error) {
				kid, v := ref("", 0)
				return c.CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{Name: name, Kid: kid, Version: v, ClientId: "c", Audience: "https://as.example/t"})
			}},
			// A well-formed chain, so that the key is looked up.
			{"ImportCertificate", func(ctx context.Context, c kbv1.KeyBrokerClient) (proto.Message, error) {
				kid, v := ref("", 0)
				return c.ImportCertificate(ctx, &kbv1.ImportCertificateRequest{Name: name, Kid: kid, Version: v, CertificateChain: [][]byte{probeCert}})
			}},
		}
	}
	asIs := func(kid string, v uint32) (string, uint32) { return kid, v }

	cases, successes := 0, 0
	for _, attacker := range []string{"a", "b", "c"} {
		// The control: the attacker's keys (same names) and nobody else's.
		control := newMTLSStack(t, stackOpts{tenants: threeTenants, ca: full.ca}, "client-"+attacker)
		for _, n := range names[attacker] {
			createKeys(control.clients["client-"+attacker], n, rotations[attacker])
		}
		var probes []probe
		var foreignNames, foreignKids []string
		for _, other := range []string{"a", "b", "c"} {
			if other != attacker {
				foreignNames = append(foreignNames, names[other]...)
				foreignKids = append(foreignKids, kids[other]...)
			}
		}
		// Another tenant's key by name.
		for _, n := range foreignNames {
			probes = append(probes, keyed(n, asIs)...)
		}
		// Look-alike and path-like names.
		victim := foreignNames[0]
		for _, n := range []string{"../" + victim, "b/" + victim, victim + "/", strings.ToUpper(victim), victim + "\x00",
			"%2e%2e%2f" + victim, "..", "/", "." + victim, "ｂ1", "а1", victim + " ", "c/../" + victim, "1", "2", "0x1", "4294967295"} {
			probes = append(probes, keyed(n, asIs)...)
		}
		// The attacker's own key with another tenant's kid or version
		// (through the RPCs that take one).
		own := names[attacker][0]
		versioned := func(ps []probe) []probe {
			var out []probe
			for _, p := range ps {
				switch p.name {
				case "Sign", "GetPublicKey", "RevokeKeyVersion", "CreateClientAssertion", "ImportCertificate":
					out = append(out, p)
				}
			}
			return out
		}
		for _, kid := range foreignKids {
			probes = append(probes, versioned(keyed(own, func(string, uint32) (string, uint32) { return kid, 0 }))...)
		}
		for v := uint32(rotations[attacker] + 2); v <= 5; v++ {
			probes = append(probes, versioned(keyed(own, func(string, uint32) (string, uint32) { return "", v }))...)
		}
		client, ctrl := full.clients["client-"+attacker], control.clients["client-"+attacker]
		// Each probe plain, then with each tenant-like header naming each
		// other tenant.
		var ctxs []context.Context
		ctxs = append(ctxs, ctx)
		for _, md := range spoofMD[1:] {
			for _, other := range []string{"a", "b", "c"} {
				if other == attacker {
					continue
				}
				m := metadata.MD{}
				for k, vs := range md {
					for _, v := range vs {
						m.Append(k, strings.ReplaceAll(v, "TENANT", other))
					}
				}
				ctxs = append(ctxs, metadata.NewOutgoingContext(ctx, m))
			}
		}
		for i, p := range probes {
			use := ctxs[:1]
			if i%4 == 0 { // headers on a quarter of the probes keeps the run short
				use = ctxs
			}
			for _, cctx := range use {
				got := outcome(p.call(cctx, client))
				want := outcome(p.call(cctx, ctrl))
				cases++
				if got != want {
					t.Errorf("%s as %s: response differs from the absent-key response\n got  %s\n want %s", p.name, attacker, got, want)
				}
				if st := strings.SplitN(got, "|", 2); st[1] != "" {
					successes++
					t.Errorf("%s as %s succeeded", p.name, attacker)
				}
			}
		}
		// Tenant-like unknown request fields change nothing either.
		for _, n := range foreignNames {
			// The generated client marshals unknown fields as they are.
			req := withUnknownField(&kbv1.GetKeyRequest{Name: n}, strings.TrimRight(n, "123")).(*kbv1.GetKeyRequest)
			got, err1 := client.GetKey(ctx, req)
			want, err2 := ctrl.GetKey(ctx, req)
			cases++
			if outcome(got, err1) != outcome(want, err2) || err1 == nil {
				successes++
				t.Errorf("GetKey %s with a tenant field: %v vs %v", n, err1, err2)
			}
		}
		// Lists show only the caller's own keys and kids.
		lk, err := client.ListKeys(ctx, &kbv1.ListKeysRequest{})
		if err != nil || len(lk.Keys) != 3 {
			t.Fatalf("ListKeys as %s: %v, %d keys", attacker, err, len(lk.GetKeys()))
		}
		for _, k := range lk.Keys {
			if !strings.HasPrefix(k.Name, attacker) {
				t.Errorf("ListKeys as %s shows %s", attacker, k.Name)
			}
		}
		jw, _ := client.GetJWKS(ctx, &kbv1.GetJWKSRequest{})
		for _, kid := range foreignKids {
			if strings.Contains(jw.Jwks, kid) {
				t.Errorf("JWKS of %s holds a foreign kid", attacker)
			}
		}
		cases += 2
	}
	t.Logf("%d attack cases, %d successes", cases, successes)
	if cases < 500 {
		t.Errorf("only %d cases, want at least 500", cases)
	}
	// Nothing changed for the victims.
	for _, tn := range []string{"a", "b", "c"} {
		for _, n := range names[tn] {
			k, _ := full.clients["client-"+tn].GetKey(ctx, &kbv1.GetKeyRequest{Name: n})
			if outcome(k, nil) != before[tn+"/"+n] {
				t.Errorf("key %s/%s changed during the attack", tn, n)
			}
		}
	}
}
