package server

import (
	"bytes"
	"crypto/sha256"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
)

// gatedSink is an audit sink whose Sync blocks while the gate is shut.
type gatedSink struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	open chan struct{} // closed: syncs pass
}

func (g *gatedSink) Write(b []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.buf.Write(b)
}
func (g *gatedSink) Sync() error {
	g.mu.Lock()
	open := g.open
	g.mu.Unlock()
	<-open
	return nil
}
func (g *gatedSink) String() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.buf.String()
}

// TestPublicReadsDoNotWaitForTheDisk: while the audit log's sync hangs,
// GetJWKS, GetPublicKey, GetKey and ListKeys answer (their records wait
// in line), and Sign does not (its signature waits for its record); once
// the disk answers, every record is in the log, in order.
func TestPublicReadsDoNotWaitForTheDisk(t *testing.T) {
	sink := &gatedSink{open: make(chan struct{})}
	close(sink.open)
	log, err := audit.Open("", audit.Options{Sink: sink, Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	s := newMTLSStack(t, stackOpts{tenants: []TenantPolicy{cnTenant("a", RoleSigner|RoleAdmin)}, audit: log}, "client-a")
	c := s.clients["client-a"]
	ctx := ctxT(t)
	if _, err := c.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}

	sink.mu.Lock()
	sink.open = make(chan struct{}) // shut: the next sync hangs
	sink.mu.Unlock()
	d := sha256.Sum256([]byte("x"))
	if _, err := c.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d[:]}); status.Code(err) != codes.Unavailable {
		t.Errorf("Sign while the disk hangs: %v, want UNAVAILABLE (no signature without its record)", err)
	}
	if _, err := c.GetJWKS(ctx, &kbv1.GetJWKSRequest{}); err != nil {
		t.Errorf("GetJWKS while the disk hangs: %v", err)
	}
	if _, err := c.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: "k"}); err != nil {
		t.Errorf("GetPublicKey while the disk hangs: %v", err)
	}
	if _, err := c.GetKey(ctx, &kbv1.GetKeyRequest{Name: "k"}); err != nil {
		t.Errorf("GetKey while the disk hangs: %v", err)
	}
	if _, err := c.ListKeys(ctx, &kbv1.ListKeysRequest{}); err != nil {
		t.Errorf("ListKeys while the disk hangs: %v", err)
	}
	sink.mu.Lock()
	close(sink.open)
	sink.mu.Unlock()

	want := []string{"/CreateKey", "/Sign", "/GetJWKS", "/GetPublicKey", "/GetKey", "/ListKeys"}
	deadline := time.Now().Add(5 * time.Second)
	for {
		text := sink.String()
		last := -1
		ok := true
		for _, m := range want {
			i := strings.Index(text, `KeyBroker`+m+`"`)
			if i < last {
				ok = false
				break
			}
			last = i
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("records not all in the log, in order %v:\n%s", want, text)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
