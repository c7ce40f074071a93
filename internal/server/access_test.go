package server

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/authn"
	"github.com/keybroker/keybroker/internal/testpki"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

func TestRolesAndUnknownCallers(t *testing.T) {
	ctx := ctxT(t)
	s := newMTLSStack(t, stackOpts{tenants: []TenantPolicy{cnTenant("ops", RoleAdmin), cnTenant("app", RoleSigner), cnTenant("both", RoleSigner|RoleAdmin)}},
		"client-ops", "client-app", "client-both", "client-stranger")
	d := make([]byte, 32)
	if _, err := s.clients["client-ops"].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatalf("admin CreateKey: %v", err)
	}
	if _, err := s.clients["client-ops"].Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("admin-only Sign: %v, want PermissionDenied", err)
	}
	if _, err := s.clients["client-ops"].GetKey(ctx, &kbv1.GetKeyRequest{Name: "k"}); err != nil {
		t.Errorf("admin read: %v", err)
	}
	app := s.clients["client-app"]
	for name, call := range map[string]func() error{
		"CreateKey": func() error {
			_, err := app.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "x", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
			return err
		},
		"RotateKey": func() error { _, err := app.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "x"}); return err },
		"RevokeKeyVersion": func() error {
			_, err := app.RevokeKeyVersion(ctx, &kbv1.RevokeKeyVersionRequest{Name: "x", Version: 1})
			return err
		},
		"UpdatePolicy": func() error { _, err := app.UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: "x"}); return err },
	} {
		if st := status.Convert(call()); st.Code() != codes.PermissionDenied {
			t.Errorf("signer %s: %v, want PermissionDenied", name, st)
		}
	}
	if _, err := app.GetJWKS(ctx, &kbv1.GetJWKSRequest{}); err != nil {
		t.Errorf("signer read: %v", err)
	}
	if _, err := s.clients["client-stranger"].GetJWKS(ctx, &kbv1.GetJWKSRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("unmapped certificate: %v, want Unauthenticated", err)
	}
	// A certificate from an unknown CA fails the handshake: no call is made.
	other := s.dial(t, testpki.NewCA(t, "rogue CA"), "client-both")
	if _, err := other.GetJWKS(ctx, &kbv1.GetJWKSRequest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("unknown CA: %v, want Unavailable (handshake failure)", err)
	}
}

// TestUnixPeerMapping: the current uid mapped → served; not mapped →
// UNAUTHENTICATED.
func TestUnixPeerMapping(t *testing.T) {
	ctx := ctxT(t)
	s := newStack(t) // maps os.Getuid() to tenant t1
	if _, err := s.client.GetJWKS(ctx, &kbv1.GetJWKSRequest{}); err != nil {
		t.Fatalf("mapped uid: %v", err)
	}
	s2 := newStackWith(t, []TenantPolicy{{Name: "other", Identities: authnRule(uint32(os.Getuid()) + 1), Roles: RoleSigner}})
	_, err := s2.client.GetJWKS(ctx, &kbv1.GetJWKSRequest{})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("unmapped uid: %v, want Unauthenticated", err)
	}
}

// TestOwnTokenIsolation: tenant a on its own token, b on the shared one. A
// logged-in session on a's token finds none of b's objects, and the reverse.
func TestOwnTokenIsolation(t *testing.T) {
	ctx := ctxT(t)
	open := func() *hsm.Backend {
		tok := softhsmtest.NewToken(t)
		b, err := hsm.Open(hsm.Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 4}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	}
	shared, own := open(), open()
	router := &kms.Router{Shared: shared, ByTenant: map[string]kms.Backend{"a": own}}
	s := newMTLSStack(t, stackOpts{tenants: threeTenants, backend: router}, "client-a", "client-b")
	for _, tn := range []string{"a", "b"} {
		for _, n := range []string{"k1", "k2"} {
			if _, err := s.clients["client-"+tn].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: n, Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for name, b := range map[string]*hsm.Backend{"a's token": own, "shared token": shared} {
		objs, err := b.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]string{"a's token": "a", "shared token": "b"}[name]
		if len(objs) != 2 {
			t.Errorf("%s holds %d keys, want 2", name, len(objs))
		}
		for _, o := range objs {
			if o.Partition.Tenant != want {
				t.Errorf("%s holds a key of tenant %q", name, o.Partition.Tenant)
			}
		}
	}
	// And both sign.
	for _, tn := range []string{"a", "b"} {
		if _, err := s.clients["client-"+tn].Sign(ctx, &kbv1.SignRequest{Name: "k1", Digest: make([]byte, 32)}); err != nil {
			t.Errorf("%s Sign: %v", tn, err)
		}
	}
}

// TestNoisyNeighbour: tenant a at 10× its signing quota for 10 s while b
// stays within its own: b sees no error, a is told when to retry.
func TestNoisyNeighbour(t *testing.T) {
	ctx := ctxT(t)
	a, b := cnTenant("a", RoleSigner|RoleAdmin), cnTenant("b", RoleSigner|RoleAdmin)
	a.SignsPerSecond, a.Burst = 20, 20
	b.SignsPerSecond, b.Burst = 20, 20
	s := newMTLSStack(t, stackOpts{tenants: []TenantPolicy{a, b}}, "client-a", "client-b")
	for _, tn := range []string{"a", "b"} {
		if _, err := s.clients["client-"+tn].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
			t.Fatal(err)
		}
	}
	const dur = 10 * time.Second
	var aOK, aLimited, aOther, bOK, bErr atomic.Int64
	var retryInfo atomic.Bool
	stop := time.Now().Add(dur)
	var wg sync.WaitGroup
	pace := func(rate int, f func()) {
		defer wg.Done()
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for time.Now().Before(stop) {
			<-tick.C
			f()
		}
	}
	d := make([]byte, 32)
	for i := 0; i < 4; i++ { // 4 × 50/s = 200/s = 10× a's quota
		wg.Add(1)
		go pace(50, func() {
			_, err := s.clients["client-a"].Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d})
			st := status.Convert(err)
			switch st.Code() {
			case codes.OK:
				aOK.Add(1)
			case codes.ResourceExhausted:
				aLimited.Add(1)
				for _, det := range st.Details() {
					if ri, ok := det.(*errdetails.RetryInfo); ok && ri.RetryDelay.AsDuration() > 0 {
						retryInfo.Store(true)
					}
				}
			default:
				aOther.Add(1)
			}
		})
	}
	wg.Add(1)
	go pace(15, func() { // b within its 20/s
		if _, err := s.clients["client-b"].Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d}); err != nil {
			bErr.Add(1)
			t.Errorf("b: %v", err)
		} else {
			bOK.Add(1)
		}
	})
	wg.Wait()
	t.Logf("a: %d ok, %d limited, %d other; b: %d ok, %d errors", aOK.Load(), aLimited.Load(), aOther.Load(), bOK.Load(), bErr.Load())
	if bErr.Load() != 0 || bOK.Load() < 100 {
		t.Errorf("b: %d errors, %d ok", bErr.Load(), bOK.Load())
	}
	// a gets about its quota (20/s × 10 s + burst), the rest is refused.
	if aOK.Load() > 20*int64(dur/time.Second)+20+20 || aLimited.Load() < 1000 || aOther.Load() != 0 {
		t.Errorf("a: %d ok, %d limited, %d other", aOK.Load(), aLimited.Load(), aOther.Load())
	}
	if !retryInfo.Load() {
		t.Error("RESOURCE_EXHAUSTED without a RetryInfo delay")
	}
}

func TestKeyQuota(t *testing.T) {
	ctx := ctxT(t)
	s := newMTLSStack(t, stackOpts{tenants: threeTenants, maxKeys: map[string]int{"a": 2}}, "client-a", "client-b")
	for _, n := range []string{"k1", "k2"} {
		if _, err := s.clients["client-a"].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: n, Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := s.clients["client-a"].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k3", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
	st := status.Convert(err)
	var reason string
	for _, d := range st.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok {
			reason = ei.Reason
		}
	}
	if st.Code() != codes.ResourceExhausted || reason != "KEY_QUOTA_EXCEEDED" {
		t.Fatalf("third key: %v (reason %q), want ResourceExhausted KEY_QUOTA_EXCEEDED", err, reason)
	}
	if objs, _ := s.hsm.List(ctx); len(objs) != 2 {
		t.Errorf("%d hardware keys, want 2: the refused create reached the hardware", len(objs))
	}
	// Another tenant is not limited by a's quota.
	for _, n := range []string{"k1", "k2", "k3"} {
		if _, err := s.clients["client-b"].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: n, Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
			t.Errorf("b %s: %v", n, err)
		}
	}
}

// TestAuditEveryCall: a mixed run of 10,000 calls — successes, denials,
// unknown callers, bad input, missing keys — gives exactly 10,000 records,
// plus the intent record of the one admin change authorized, and the file
// verifies.
func TestAuditEveryCall(t *testing.T) {
	ctx := ctxT(t)
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	log, err := audit.Open(path, audit.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	tenants := []TenantPolicy{cnTenant("a", RoleSigner|RoleAdmin), cnTenant("b", RoleSigner)}
	s := newMTLSStack(t, stackOpts{tenants: tenants, audit: log}, "client-a", "client-b", "client-x")
	if _, err := s.clients["client-a"].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	const n = 10000
	calls := []func() error{
		func() error {
			_, err := s.clients["client-a"].Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)})
			return err
		},
		func() error {
			_, err := s.clients["client-b"].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "z"})
			return err
		}, // denied
		func() error { _, err := s.clients["client-x"].GetJWKS(ctx, &kbv1.GetJWKSRequest{}); return err }, // unknown
		func() error {
			_, err := s.clients["client-a"].Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: []byte{1}})
			return err
		}, // bad
		func() error { _, err := s.clients["client-b"].GetKey(ctx, &kbv1.GetKeyRequest{Name: "k"}); return err }, // not found
		func() error { _, err := s.clients["client-a"].GetJWKS(ctx, &kbv1.GetJWKSRequest{}); return err },
	}
	var wg sync.WaitGroup
	var next atomic.Int64
	codesSeen := sync.Map{}
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= n-1 { // the CreateKey above is one of the n
					return
				}
				codesSeen.Store(status.Code(calls[i%int64(len(calls))]()), true)
			}
		}()
	}
	wg.Wait()
	if err := log.Close(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []codes.Code{codes.OK, codes.PermissionDenied, codes.Unauthenticated, codes.InvalidArgument, codes.NotFound} {
		if _, ok := codesSeen.Load(c); !ok {
			t.Errorf("the mixed run produced no %v", c)
		}
	}
	head, err := audit.ReadHead(path + ".head")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	records, err := audit.Verify(f, &head)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if records != n+1 {
		t.Errorf("%d audit records for %d calls and 1 intent, want %d", records, n, n+1)
	}
}

// blockingSink never completes a write.
type blockingSink struct{ block chan struct{} }

func (s blockingSink) Write(p []byte) (int, error) { <-s.block; return len(p), nil }
func (s blockingSink) Sync() error                 { return nil }

type failingSink struct{}

func (failingSink) Write(p []byte) (int, error) { return 0, errors.New("disk on fire") }
func (failingSink) Sync() error                 { return errors.New("disk on fire") }

// TestAuditFailClosed: with the audit sink blocked or failing, Sign
// returns UNAVAILABLE within 1.5 s and no signature.
func TestAuditFailClosed(t *testing.T) {
	for name, sink := range map[string]audit.Sink{"blocked": blockingSink{make(chan struct{})}, "failing": failingSink{}} {
		t.Run(name, func(t *testing.T) {
			ctx := ctxT(t)
			log, err := audit.Open(filepath.Join(t.TempDir(), "audit.jsonl"), audit.Options{Timeout: time.Second, Sink: sink})
			if err != nil {
				t.Fatal(err)
			}
			guarded := newMTLSStack(t, stackOpts{tenants: threeTenants, audit: log}, "client-a")
			// The key is made through the keyring, not an (audited) RPC.
			if _, err := guarded.ring.CreateKey(ctx, "a", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			digest := make([]byte, 32)
			rand.Read(digest)
			resp, err := guarded.clients["client-a"].Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: digest})
			took := time.Since(start)
			if status.Code(err) != codes.Unavailable || resp != nil {
				t.Fatalf("Sign with the audit log %s: %v %v, want Unavailable and no signature", name, resp, err)
			}
			if took > 1500*time.Millisecond {
				t.Errorf("Sign took %v with the audit log %s, want at most 1.5 s", took, name)
			}
		})
	}
}

func authnRule(uid uint32) authn.Rule { return authn.Rule{UIDs: []uint32{uid}} }

// TestSignQuotaEverySignature: every RPC that signs in hardware draws on
// the tenant's signing quota, and only once its request is valid: bad
// input and unknown keys take nothing, reads need no quota.
func TestSignQuotaEverySignature(t *testing.T) {
	ctx := ctxT(t)
	a := cnTenant("a", RoleSigner|RoleAdmin)
	a.SignsPerSecond, a.Burst = 1.0/3600, 2 // two signatures, then none for an hour
	s := newMTLSStack(t, stackOpts{tenants: []TenantPolicy{a}}, "client-a")
	c := s.clients["client-a"]
	if _, err := c.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	// Refused before any signature: these must not empty the bucket.
	for range 5 {
		if _, err := c.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 31)}); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("Sign with a short digest: got %v, want InvalidArgument", err)
		}
		if _, err := c.SignJWS(ctx, &kbv1.SignJWSRequest{Name: "absent", Payload: []byte("{}")}); status.Code(err) != codes.NotFound {
			t.Fatalf("SignJWS of an absent key: got %v, want NotFound", err)
		}
		if _, err := c.CreateDPoPProof(ctx, &kbv1.CreateDPoPProofRequest{Name: "k", Htm: "GET", Htu: "not a url"}); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("CreateDPoPProof with a bad htu: got %v, want InvalidArgument", err)
		}
	}
	// The burst: two signatures, by two different RPCs.
	if _, err := c.SignJWS(ctx, &kbv1.SignJWSRequest{Name: "k", Payload: []byte("{}")}); err != nil {
		t.Fatalf("SignJWS within the quota: %v", err)
	}
	if _, err := c.CreateDPoPProof(ctx, &kbv1.CreateDPoPProofRequest{Name: "k", Htm: "GET", Htu: "https://a.example/x"}); err != nil {
		t.Fatalf("CreateDPoPProof within the quota: %v", err)
	}
	// Now every signing RPC is refused, with a delay to retry after.
	signing := map[string]func() error{
		"Sign": func() error {
			_, err := c.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)})
			return err
		},
		"SignJWS": func() error {
			_, err := c.SignJWS(ctx, &kbv1.SignJWSRequest{Name: "k", Payload: []byte("{}")})
			return err
		},
		"CreateDPoPProof": func() error {
			_, err := c.CreateDPoPProof(ctx, &kbv1.CreateDPoPProofRequest{Name: "k", Htm: "GET", Htu: "https://a.example/x"})
			return err
		},
		"CreateSignedHttpRequest": func() error {
			_, err := c.CreateSignedHttpRequest(ctx, &kbv1.CreateSignedHttpRequestRequest{Name: "k", AccessToken: "at", Method: "GET", Url: "https://a.example/x"})
			return err
		},
		"CreateCertificateRequest": func() error {
			_, err := c.CreateCertificateRequest(ctx, &kbv1.CreateCertificateRequestRequest{Name: "k", CommonName: "svc"})
			return err
		},
		"CreateSelfSignedCertificate": func() error {
			_, err := c.CreateSelfSignedCertificate(ctx, &kbv1.CreateSelfSignedCertificateRequest{Name: "k", CommonName: "svc"})
			return err
		},
	}
	for method, call := range signing {
		st := status.Convert(call())
		if st.Code() != codes.ResourceExhausted {
			t.Errorf("%s over the quota: got %v %q, want ResourceExhausted", method, st.Code(), st.Message())
			continue
		}
		retry := false
		for _, det := range st.Details() {
			if ri, ok := det.(*errdetails.RetryInfo); ok && ri.RetryDelay.AsDuration() > 0 {
				retry = true
			}
		}
		if !retry {
			t.Errorf("%s over the quota: no RetryInfo delay", method)
		}
	}
	// Reads sign nothing and need no quota.
	if _, err := c.GetJWKS(ctx, &kbv1.GetJWKSRequest{}); err != nil {
		t.Errorf("GetJWKS with the quota spent: %v", err)
	}
	if _, err := c.GetConfirmation(ctx, &kbv1.GetConfirmationRequest{Name: "k"}); err != nil {
		t.Errorf("GetConfirmation with the quota spent: %v", err)
	}
}

// TestAuditCallerIsTheMatchedIdentity: the audit record names the caller
// by the identity that chose its tenant — the CN, when the certificate
// also carries a DNS SAN no tenant lists — and an unknown caller by its
// certificate.
func TestAuditCallerIsTheMatchedIdentity(t *testing.T) {
	ctx := ctxT(t)
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	log, err := audit.Open(path, audit.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s := newMTLSStack(t, stackOpts{tenants: []TenantPolicy{cnTenant("a", RoleSigner)}, audit: log})
	call := func(l testpki.Leaf) {
		kbv1.NewKeyBrokerClient(s.dialLeaf(t, s.ca, l)).GetJWKS(ctx, &kbv1.GetJWKSRequest{})
	}
	call(testpki.Leaf{CommonName: "client-a", DNSNames: []string{"elsewhere.example"}})
	call(testpki.Leaf{CommonName: "client-a", URIs: []string{"spiffe://example.org/unlisted"}})
	if err := log.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var got []audit.Record
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var r audit.Record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		got = append(got, r)
	}
	want := []struct{ tenant, caller, code string }{
		{"a", "cn:client-a", "OK"},
		// A certificate with a SPIFFE ID is that ID, listed or not: no
		// falling back to its CN.
		{"", "spiffe://example.org/unlisted", "UNAUTHENTICATED"},
	}
	if len(got) != len(want) {
		t.Fatalf("%d records, want %d", len(got), len(want))
	}
	for i, w := range want {
		if got[i].Tenant != w.tenant || got[i].Caller != w.caller || got[i].Code != w.code {
			t.Errorf("record %d: tenant %q caller %q code %s, want %q %q %s", i+1, got[i].Tenant, got[i].Caller, got[i].Code, w.tenant, w.caller, w.code)
		}
	}
}

// TestAuditRecordsHugeFields: a request whose fields would not fit an
// audit line (here a 200,000-character key name, which JSON escapes to
// 1.2 MB) is still refused and recorded: the record holds the field's
// first bytes and the length and SHA-256 of the whole (found by review:
// such a call left no record at all).
func TestAuditRecordsHugeFields(t *testing.T) {
	ctx := ctxT(t)
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	log, err := audit.Open(path, audit.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s := newMTLSStack(t, stackOpts{tenants: []TenantPolicy{cnTenant("a", RoleSigner)}, audit: log}, "client-a")
	name := strings.Repeat("<", 200_000)
	_, err = s.clients["client-a"].Sign(ctx, &kbv1.SignRequest{Name: name, Digest: make([]byte, 32)})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Sign with a 200,000-character name: got %v, want InvalidArgument", err)
	}
	if err := log.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 1 {
		t.Fatalf("%d records for 1 call", len(lines))
	}
	var r audit.Record
	if err := json.Unmarshal([]byte(lines[0]), &r); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(name))
	want := fmt.Sprintf("%s…[200000 bytes, sha256:%s]", name[:128], hex.EncodeToString(sum[:]))
	if r.Key != want || r.Code != "INVALID_ARGUMENT" {
		t.Errorf("record: key %q (%d bytes), code %s; want %q, INVALID_ARGUMENT", r.Key[:min(len(r.Key), 200)], len(r.Key), r.Code, want[:200])
	}
	// Short fields are recorded as they are.
	if got := boundField("k1"); got != "k1" {
		t.Errorf("boundField(%q) = %q", "k1", got)
	}
	// A cut never splits a UTF-8 character.
	if got := boundField(strings.Repeat("é", 200)); !utf8.ValidString(got) || !strings.HasPrefix(got, strings.Repeat("é", 64)+"…[400 bytes") {
		t.Errorf("boundField of 200 × é = %q", got)
	}
}
