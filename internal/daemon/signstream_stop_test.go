package daemon

import (
	"context"
	"crypto/sha256"
	"os"
	"strings"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/kms"
)

// TestStopAnswersSignStreamInFlight: a daemon that stops while a
// SignStream message is in the hardware answers it (signature and audit
// record) before the stream ends, as a graceful stop lets a unary Sign
// finish; the stream then ends instead of taking more messages.
func TestStopAnswersSignStreamInFlight(t *testing.T) {
	var sb *slowSigner
	// A stream that kept the daemon past its graceful stop would be cut by
	// the hard stop after shutdown_timeout: the test waits less than that.
	r := startDaemon(t, func(c *config.Config) { c.Limits.ShutdownTimeout = time.Minute }, Options{WrapBackend: func(b kms.Backend) kms.Backend { sb = newSlowSigner(b); return sb }})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	st, err := r.client.SignStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sb.slow.Store(int64(300 * time.Millisecond))
	dg := sha256.Sum256([]byte("x"))
	if err := st.Send(&kbv1.SignStreamRequest{Id: 1, Request: &kbv1.SignRequest{Name: "k", Digest: dg[:]}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sb.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the streamed Sign did not reach the hardware")
	}
	stopped := make(chan struct{})
	go func() { r.stop(); close(stopped) }()
	resp, err := st.Recv()
	if err != nil || resp.GetId() != 1 || len(resp.GetResponse().GetSignature()) == 0 {
		t.Fatalf("the message in flight at stop: %v, %v; want its signature", resp, err)
	}
	if _, err := st.Recv(); err == nil {
		t.Fatal("the stream goes on after the daemon stopped")
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the daemon did not stop within 5 s: the stream held its graceful stop")
	}
	b, err := os.ReadFile(r.cfg.AuditPath())
	if err != nil {
		t.Fatal(err)
	}
	var ok int
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, `"method":"/keybroker.v1.KeyBroker/SignStream"`) && strings.Contains(line, `"code":"OK"`) {
			ok++
		}
	}
	if ok != 1 {
		t.Errorf("%d OK SignStream audit records, want 1", ok)
	}
}
