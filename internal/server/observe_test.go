package server

import (
	"crypto/sha256"
	"os"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/authn"
)

// recordingObserver keeps what the interceptor reports.
type recordingObserver struct {
	mu            sync.Mutex
	calls         []string // method/tenant/code
	auditFailures int
}

func (o *recordingObserver) ObserveRPC(method, tenant string, code codes.Code, latency time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.calls = append(o.calls, method+"/"+tenant+"/"+code.String())
}

func (o *recordingObserver) AuditWriteFailed() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.auditFailures++
}

// TestSetAccessAndObserver: SetAccess swaps tenants and quotas for the
// next call, and the observer sees every call with its tenant and code.
func TestSetAccessAndObserver(t *testing.T) {
	ctx := ctxT(t)
	me := authn.Rule{UIDs: []uint32{uint32(os.Getuid())}}
	s := newStack(t) // tenant t1, both roles
	obs := &recordingObserver{}
	s.svc.observer = obs
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))

	// Same tenant, now signer only with a one-token bucket.
	a, err := NewAccess([]TenantPolicy{{Name: "t1", Identities: me, Roles: RoleSigner, SignsPerSecond: 1.0 / 3600, Burst: 1}})
	if err != nil {
		t.Fatal(err)
	}
	s.svc.SetAccess(a)
	if _, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d[:]}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d[:]}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("second Sign: %v, want ResourceExhausted", err)
	}
	if _, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("RotateKey as signer: %v, want PermissionDenied", err)
	}
	// The same quota carried over keeps the empty bucket.
	b, _ := NewAccess([]TenantPolicy{{Name: "t1", Identities: me, Roles: RoleSigner, SignsPerSecond: 1.0 / 3600, Burst: 1}})
	b.CarryOver(a)
	s.svc.SetAccess(b)
	if _, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d[:]}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("Sign after a reload with the same quota: %v, want ResourceExhausted", err)
	}
	// No tenant for this uid any more.
	c, _ := NewAccess([]TenantPolicy{{Name: "t2", Identities: authn.Rule{UIDs: []uint32{uint32(os.Getuid()) + 1}}, Roles: RoleSigner}})
	s.svc.SetAccess(c)
	if _, err := s.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: "k"}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("GetKey with the tenant removed: %v, want Unauthenticated", err)
	}

	want := []string{"CreateKey/t1/OK", "Sign/t1/OK", "Sign/t1/ResourceExhausted", "RotateKey/t1/PermissionDenied", "Sign/t1/ResourceExhausted", "GetKey//Unauthenticated"}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if len(obs.calls) != len(want) {
		t.Fatalf("observed %q, want %q", obs.calls, want)
	}
	for i := range want {
		if obs.calls[i] != want[i] {
			t.Errorf("call %d observed as %q, want %q", i, obs.calls[i], want[i])
		}
	}
}
