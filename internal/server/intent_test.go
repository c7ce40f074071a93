package server

import (
	"context"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
)

// scriptedAudit keeps every record and fails the writes fail picks.
type scriptedAudit struct {
	mu   sync.Mutex
	recs []audit.Record
	fail func(audit.Record) bool
}

func (a *scriptedAudit) Write(_ context.Context, r audit.Record) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.fail != nil && a.fail(r) {
		return audit.ErrUnavailable
	}
	a.recs = append(a.recs, r)
	return nil
}

func (a *scriptedAudit) Queue(r audit.Record) error { return a.Write(context.Background(), r) }

func (a *scriptedAudit) records(method string) []audit.Record {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []audit.Record
	for _, r := range a.recs {
		if r.Method == method {
			out = append(out, r)
		}
	}
	return out
}

// TestAdminChangeAnswerIsTrue: an admin change is recorded before it is
// attempted. When that intent record cannot be written, the change is not
// made and the answer is UNAVAILABLE; when only the record of the outcome
// cannot be written, the change stands, and so does the answer (OK), so
// that a client never retries a change that was made (a second rotation).
func TestAdminChangeAnswerIsTrue(t *testing.T) {
	ctx := ctxT(t)
	rotate := kbv1.KeyBroker_RotateKey_FullMethodName
	a := &scriptedAudit{}
	s := newMTLSStack(t, stackOpts{tenants: []TenantPolicy{cnTenant("a", RoleSigner|RoleAdmin)}, audit: a}, "client-a")
	c := s.clients["client-a"]
	if _, err := c.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	versions := func() int {
		k, err := c.GetKey(ctx, &kbv1.GetKeyRequest{Name: "k"})
		if err != nil {
			t.Fatal(err)
		}
		return len(k.GetKey().GetVersions())
	}

	// The outcome record fails: the rotation happened, and says so.
	a.fail = func(r audit.Record) bool { return r.Method == rotate && r.Code != intentCode }
	if _, err := c.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k"}); err != nil {
		t.Fatalf("RotateKey whose outcome record fails: %v, want OK (it rotated)", err)
	}
	if n := versions(); n != 2 {
		t.Fatalf("%d versions after one rotation, want 2", n)
	}
	intents := a.records(rotate)
	if len(intents) != 1 || intents[0].Code != intentCode || intents[0].Key != "k" || intents[0].Tenant != "a" {
		t.Fatalf("RotateKey records = %+v, want its intent record only", intents)
	}

	// The intent record fails: nothing is attempted.
	a.fail = func(r audit.Record) bool { return r.Method == rotate }
	_, err := c.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k"})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("RotateKey whose intent record fails: %v, want UNAVAILABLE", err)
	}
	if n := versions(); n != 2 {
		t.Errorf("%d versions after a refused rotation, want still 2", n)
	}

	// Both written: intent, then outcome, with one request ID.
	a.fail = nil
	if _, err := c.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k"}); err != nil {
		t.Fatal(err)
	}
	recs := a.records(rotate)[1:]
	if len(recs) != 2 || recs[0].Code != intentCode || recs[1].Code != "OK" || recs[0].RequestID != recs[1].RequestID {
		t.Errorf("records of a rotation = %+v, want intent then OK with one request ID", recs)
	}
}
