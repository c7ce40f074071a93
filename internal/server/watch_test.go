package server

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
	"github.com/keybroker/keybroker/rotation"
)

// watchStream opens WatchKeys and reads its snapshot up to the
// SNAPSHOT_COMPLETE marker.
func watchStream(t *testing.T, ctx context.Context, c kbv1.KeyBrokerClient, req *kbv1.WatchKeysRequest) (kbv1.KeyBroker_WatchKeysClient, []*kbv1.KeyEvent) {
	t.Helper()
	st, err := c.WatchKeys(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	var snap []*kbv1.KeyEvent
	for {
		r, err := st.Recv()
		if err != nil {
			t.Fatalf("snapshot after %d events: %v", len(snap), err)
		}
		if r.GetEvent().GetType() == kbv1.KeyEventType_KEY_EVENT_TYPE_SNAPSHOT_COMPLETE {
			return st, snap
		}
		if !r.GetEvent().GetSnapshot() {
			t.Fatalf("event before the snapshot's end not marked snapshot: %v", r.GetEvent())
		}
		snap = append(snap, r.GetEvent())
	}
}

// next reads one event and checks it is (type, name, version).
func next(t *testing.T, st kbv1.KeyBroker_WatchKeysClient, typ kbv1.KeyEventType, name string, version uint32) *kbv1.KeyEvent {
	t.Helper()
	r, err := st.Recv()
	if err != nil {
		t.Fatalf("waiting for %v %s v%d: %v", typ, name, version, err)
	}
	ev := r.GetEvent()
	if ev.GetType() != typ || ev.GetName() != name || ev.GetVersion() != version || ev.GetSnapshot() {
		t.Fatalf("got %v %s v%d (snapshot %v), want %v %s v%d", ev.GetType(), ev.GetName(), ev.GetVersion(), ev.GetSnapshot(), typ, name, version)
	}
	if typ != kbv1.KeyEventType_KEY_EVENT_TYPE_POLICY {
		checkJWK(t, ev)
	}
	return ev
}

// checkJWK: the event's JWK is public only and its RFC 7638 thumbprint is
// the kid.
func checkJWK(t *testing.T, ev *kbv1.KeyEvent) {
	t.Helper()
	var m map[string]string
	if err := json.Unmarshal([]byte(ev.GetJwk()), &m); err != nil {
		t.Fatalf("%s v%d: jwk %q: %v", ev.GetName(), ev.GetVersion(), ev.GetJwk(), err)
	}
	if m["d"] != "" || m["p"] != "" {
		t.Fatalf("jwk has private members: %v", m)
	}
	var canon string
	switch m["kty"] {
	case "EC":
		canon = fmt.Sprintf(`{"crv":%q,"kty":"EC","x":%q,"y":%q}`, m["crv"], m["x"], m["y"])
	case "RSA":
		canon = fmt.Sprintf(`{"e":%q,"kty":"RSA","n":%q}`, m["e"], m["n"])
	default:
		t.Fatalf("jwk kty %q", m["kty"])
	}
	sum := sha256.Sum256([]byte(canon))
	if tp := base64.RawURLEncoding.EncodeToString(sum[:]); tp != ev.GetKid() || m["kid"] != ev.GetKid() {
		t.Fatalf("%s v%d: thumbprint %s, jwk kid %s, event kid %s", ev.GetName(), ev.GetVersion(), tp, m["kid"], ev.GetKid())
	}
}

// TestWatchKeysSnapshotThenChanges: the snapshot holds every version, then
// creation, rotation, policy change and revocation arrive in order, each
// with the version's kid and JWK.
func TestWatchKeysSnapshotThenChanges(t *testing.T) {
	ctx := ctxT(t)
	s := newStack(t)
	k1, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k1", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k2", Algorithm: kbv1.Algorithm_ALGORITHM_RS256, Bits: 2048}); err != nil {
		t.Fatal(err)
	}
	st, snap := watchStream(t, ctx, s.client, &kbv1.WatchKeysRequest{})
	if len(snap) != 2 || snap[0].GetName() != "k1" || snap[1].GetName() != "k2" {
		t.Fatalf("snapshot: %v", snap)
	}
	for _, ev := range snap {
		if ev.GetType() != kbv1.KeyEventType_KEY_EVENT_TYPE_ACTIVE || ev.GetState() != kbv1.KeyState_KEY_STATE_ACTIVE || ev.GetTenant() != "t1" {
			t.Fatalf("snapshot event %v", ev)
		}
		checkJWK(t, ev)
	}
	if snap[0].GetKid() != k1.GetKey().GetActiveKid() {
		t.Fatalf("snapshot kid %s, key's %s", snap[0].GetKid(), k1.GetKey().GetActiveKid())
	}

	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k3", Algorithm: kbv1.Algorithm_ALGORITHM_ES384}); err != nil {
		t.Fatal(err)
	}
	next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_ACTIVE, "k3", 1)

	rot, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_RETIRED, "k1", 1)
	if ev := next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_ACTIVE, "k1", 2); ev.GetKid() != rot.GetKey().GetActiveKid() {
		t.Fatalf("v2 kid %s, key's %s", ev.GetKid(), rot.GetKey().GetActiveKid())
	}

	if _, err := s.client.UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: "k1", Policy: &kbv1.RotationPolicy{Overlap: durationpb.New(48 * time.Hour)}}); err != nil {
		t.Fatal(err)
	}
	if ev := next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_POLICY, "k1", 0); ev.GetPolicy().GetOverlap().AsDuration() != 48*time.Hour {
		t.Fatalf("policy event %v", ev.GetPolicy())
	}

	if _, err := s.client.RevokeKeyVersion(ctx, &kbv1.RevokeKeyVersionRequest{Name: "k1", Version: 1}); err != nil {
		t.Fatal(err)
	}
	if ev := next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_REVOKED, "k1", 1); ev.GetState() != kbv1.KeyState_KEY_STATE_REVOKED || ev.GetTime() == nil {
		t.Fatalf("revoked event %v", ev)
	}

	// A watch of one key sees that key only, in its snapshot and after.
	one, snap := watchStream(t, ctx, s.client, &kbv1.WatchKeysRequest{Name: "k2"})
	if len(snap) != 1 || snap[0].GetName() != "k2" {
		t.Fatalf("snapshot of k2: %v", snap)
	}
	if _, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k2"}); err != nil {
		t.Fatal(err)
	}
	next(t, one, kbv1.KeyEventType_KEY_EVENT_TYPE_RETIRED, "k2", 1)
}

// TestWatchKeysTenantIsolation: a tenant's watcher sees nothing of another
// tenant's keys, in the snapshot or after; a signer may watch.
func TestWatchKeysTenantIsolation(t *testing.T) {
	ctx := ctxT(t)
	tenants := []TenantPolicy{cnTenant("a", RoleSigner|RoleAdmin), cnTenant("b", RoleSigner|RoleAdmin), cnTenant("c", RoleSigner)}
	s := newMTLSStack(t, stackOpts{tenants: tenants}, "client-a", "client-b", "client-c")
	a, b := s.clients["client-a"], s.clients["client-b"]
	if _, err := a.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "shared-name", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	stB, snap := watchStream(t, ctx, b, &kbv1.WatchKeysRequest{})
	if len(snap) != 0 {
		t.Fatalf("b's snapshot holds a's keys: %v", snap)
	}
	stNamed, snap := watchStream(t, ctx, b, &kbv1.WatchKeysRequest{Name: "shared-name"})
	if len(snap) != 0 {
		t.Fatalf("b's snapshot of a's key name: %v", snap)
	}
	if _, err := a.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "shared-name"}); err != nil {
		t.Fatal(err)
	}
	// Events are in order: b's own change comes first only if a's rotation
	// was not sent to b.
	if _, err := b.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "shared-name", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	for _, st := range []kbv1.KeyBroker_WatchKeysClient{stB, stNamed} {
		if ev := next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_ACTIVE, "shared-name", 1); ev.GetTenant() != "b" {
			t.Fatalf("b sees tenant %q's event", ev.GetTenant())
		}
	}
	// A signer-only tenant may watch; without a watch CSR it needs no more.
	if _, snap := watchStream(t, ctx, s.clients["client-c"], &kbv1.WatchKeysRequest{}); len(snap) != 0 {
		t.Fatalf("c's snapshot: %v", snap)
	}
}

// TestWatchKeysScheduledTransitions: transitions the rotation scheduler
// makes on its (test) clock are events too, a PENDING one with the
// version's CSR when asked.
func TestWatchKeysScheduledTransitions(t *testing.T) {
	ctx := ctxT(t)
	s := newStack(t)
	policy := &kbv1.RotationPolicy{RotationPeriod: durationpb.New(10 * 24 * time.Hour), PrePublicationLead: durationpb.New(2 * 24 * time.Hour),
		Overlap: durationpb.New(24 * time.Hour), DestroyDelay: durationpb.New(24 * time.Hour)}
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256, Policy: policy}); err != nil {
		t.Fatal(err)
	}
	st, _ := watchStream(t, ctx, s.client, &kbv1.WatchKeysRequest{Name: "k", IncludeCsr: true})

	clock := rotation.NewFakeClock(time.Now())
	sched := rotation.Scheduler{Clock: clock, Advancer: s.svc.ring, Interval: time.Hour}
	sctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { sched.Run(sctx); close(done) }()
	t.Cleanup(func() { stop(); <-done })
	waitParked(t, clock)

	clock.Advance(8*24*time.Hour + time.Minute) // past the pending version's publication
	pending := next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_PENDING, "k", 2)
	if pending.GetCsrError() != "" || len(pending.GetCsrDer()) == 0 {
		t.Fatalf("pending event without CSR: %q", pending.GetCsrError())
	}
	csr, err := x509.ParseCertificateRequest(pending.GetCsrDer())
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatalf("CSR signature: %v", err)
	}
	if tp, _ := pop.Thumbprint(csr.PublicKey); tp != pending.GetKid() || csr.Subject.CommonName != "k" {
		t.Fatalf("CSR for %s (CN %q), event kid %s", tp, csr.Subject.CommonName, pending.GetKid())
	}
	waitParked(t, clock)
	clock.Advance(2 * 24 * time.Hour)
	next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_RETIRED, "k", 1)
	next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_ACTIVE, "k", 2)
	waitParked(t, clock)
	clock.Advance(24*time.Hour + time.Minute)
	next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_EXPIRED, "k", 1)
	waitParked(t, clock)
	clock.Advance(24*time.Hour + time.Minute)
	next(t, st, kbv1.KeyEventType_KEY_EVENT_TYPE_DESTROYED, "k", 1)
}

// waitParked polls until the scheduler waits for its next tick.
func waitParked(t *testing.T, c *rotation.FakeClock) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); c.Waiters() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("scheduler never waited for its next tick")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestWatchKeysSlowWatcher: a watcher that stops reading is cut off with
// RESOURCE_EXHAUSTED; changes and Sign never wait for it.
func TestWatchKeysSlowWatcher(t *testing.T) {
	ctx := ctxT(t)
	s := newStack(t)
	s.svc.watchBuffer = 4
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	// Fixed flow-control windows (no BDP growth): the transport stops
	// taking events after 64 KiB that the client does not read.
	conn, err := grpc.NewClient(s.conn.Target(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	st, _ := watchStream(t, ctx, kbv1.NewKeyBrokerClient(conn), &kbv1.WatchKeysRequest{})
	policies := []time.Duration{48 * time.Hour, 72 * time.Hour}
	for i := 0; s.svc.WatchesCutOff() == 0; i++ {
		if i == 20000 {
			t.Fatal("the stalled watcher was never cut off")
		}
		if _, err := s.svc.ring.UpdatePolicy(ctx, "t1", "k", func(p kms.Policy) kms.Policy { p.Overlap = policies[i%2]; return p }); err != nil {
			t.Fatal(err)
		}
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := s.client.Sign(sctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)}); err != nil {
		t.Fatalf("Sign while a watcher is stalled: %v", err)
	}
	for {
		_, err := st.Recv()
		if err == nil {
			continue
		}
		if status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("stalled watcher's end: %v, want RESOURCE_EXHAUSTED", err)
		}
		break
	}
}

// TestWatchKeysAudited: opening a watch is one audit record, like a unary
// call; a watch with CSRs needs the signer role and is refused, recorded,
// without it.
func TestWatchKeysAudited(t *testing.T) {
	ctx := ctxT(t)
	rec := &scriptedAudit{}
	tenants := []TenantPolicy{cnTenant("a", RoleSigner|RoleAdmin), cnTenant("d", RoleAdmin)}
	s := newMTLSStack(t, stackOpts{tenants: tenants, audit: rec}, "client-a", "client-d")
	watchStream(t, ctx, s.clients["client-a"], &kbv1.WatchKeysRequest{Name: "k"})
	watchStream(t, ctx, s.clients["client-d"], &kbv1.WatchKeysRequest{})
	st, err := s.clients["client-d"].WatchKeys(ctx, &kbv1.WatchKeysRequest{IncludeCsr: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("admin-only watch with CSRs: %v, want PERMISSION_DENIED", err)
	}
	recs := rec.records(kbv1.KeyBroker_WatchKeys_FullMethodName)
	if len(recs) != 3 || recs[0].Tenant != "a" || recs[0].Key != "k" || recs[0].Code != "OK" || recs[0].RequestID == "" ||
		recs[1].Tenant != "d" || recs[1].Code != "OK" || recs[2].Code != "PERMISSION_DENIED" {
		t.Fatalf("WatchKeys records: %+v", recs)
	}
}
