package daemon

import (
	"context"
	"crypto"
	"crypto/sha256"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/kms"
)

// slowSigner is a backend whose Sign, once slow is set, signs and then
// takes `slow` more before it returns, ignoring cancellation (hardware that
// answers late).
type slowSigner struct {
	kms.Backend
	slow     atomic.Int64 // time.Duration
	signed   atomic.Int32
	entered  chan struct{} // a slow Sign has signed
	returned chan struct{} // a slow Sign has returned
}

func newSlowSigner(b kms.Backend) *slowSigner {
	return &slowSigner{Backend: b, entered: make(chan struct{}, 1), returned: make(chan struct{}, 1)}
}

func (s *slowSigner) Sign(ctx context.Context, p kms.Partition, h kms.Handle, d []byte, o crypto.SignerOpts) ([]byte, error) {
	sig, err := s.Backend.Sign(ctx, p, h, d, o)
	if err == nil {
		s.signed.Add(1)
	}
	if slow := time.Duration(s.slow.Load()); slow > 0 {
		s.entered <- struct{}{}
		time.Sleep(slow)
		defer func() { s.returned <- struct{}{} }()
	}
	return sig, err
}

// signDuringStop creates key "k", starts a Sign that takes slow in the
// hardware, and stops the daemon while it runs. It returns the slow
// signer once that Sign has returned, and how long the stop took.
func signDuringStop(t *testing.T, r *running, sb *slowSigner, slow time.Duration) time.Duration {
	t.Helper()
	ctx := ctx10(t)
	if _, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	sb.slow.Store(int64(slow))
	dg := sha256.Sum256([]byte("x"))
	done := make(chan error, 1)
	go func() {
		resp, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: dg[:]})
		if err == nil && len(resp.GetSignature()) > 0 {
			t.Log("the client got the signature")
		}
		done <- err
	}()
	select {
	case <-sb.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("Sign did not reach the hardware")
	}
	start := time.Now()
	r.stop() // Serve returns, then Close: audit log, store, backend
	took := time.Since(start)
	select {
	case err := <-done:
		t.Logf("client: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("the client's Sign did not end")
	}
	select {
	case <-sb.returned:
	case <-time.After(slow + 5*time.Second):
		t.Fatal("the slow Sign did not return")
	}
	time.Sleep(200 * time.Millisecond) // the interceptor writes the record after Sign returns
	return took
}

func signRecords(t *testing.T, r *running) int {
	t.Helper()
	b, err := os.ReadFile(r.cfg.AuditPath())
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), `"method":"/keybroker.v1.KeyBroker/Sign"`)
}

// TestHardStopWaitsForRunningCalls: when the graceful stop times out, the
// hard stop still waits for the handlers it cut off, so a call that was in
// the hardware writes its audit record before the audit log is closed:
// every hardware signature has its record, and none hits a closed log.
func TestHardStopWaitsForRunningCalls(t *testing.T) {
	var sb *slowSigner
	r := startDaemon(t, func(c *config.Config) { c.Limits.ShutdownTimeout = 200 * time.Millisecond },
		Options{WrapBackend: func(b kms.Backend) kms.Backend { sb = newSlowSigner(b); return sb }})
	took := signDuringStop(t, r, sb, time.Second)
	if took < 700*time.Millisecond {
		t.Errorf("stop took %v: it did not wait for the running Sign (1s in the hardware)", took)
	}
	if n, signed := signRecords(t, r), sb.signed.Load(); int32(n) != signed {
		t.Errorf("hardware signatures: %d, Sign audit records: %d", signed, n)
	}
	if l := r.log.String(); strings.Contains(l, "audit record not written") {
		t.Errorf("a call wrote to the audit log after it was closed:\n%s", grep(l, "audit record not written"))
	}
	if !strings.Contains(r.log.String(), "graceful stop timed out") {
		t.Error("the graceful stop did not time out: the test proves nothing")
	}
}

// TestHardStopLeavesLogOpenForHungCall: a handler still running after the
// hard stop and its bound (call_timeout + audit.write_timeout + 1s: the
// hardware ignores cancellation) is left running, and Close does not close
// the audit log, store or backend under it: its record is still written.
func TestHardStopLeavesLogOpenForHungCall(t *testing.T) {
	var sb *slowSigner
	r := startDaemon(t, func(c *config.Config) {
		c.Limits.ShutdownTimeout = 100 * time.Millisecond
		c.Limits.CallTimeout = 500 * time.Millisecond
		c.Audit.WriteTimeout = 100 * time.Millisecond
	}, Options{WrapBackend: func(b kms.Backend) kms.Backend { sb = newSlowSigner(b); return sb }})
	took := signDuringStop(t, r, sb, 3*time.Second)
	if took > 2500*time.Millisecond {
		t.Errorf("stop took %v: the wait for a hung call is not bounded", took)
	}
	if l := r.log.String(); !strings.Contains(l, "not closing the audit log, store and backend") {
		t.Errorf("Close closed the audit log under a running call; log:\n%s", l)
	}
	if n, signed := signRecords(t, r), sb.signed.Load(); int32(n) != signed {
		t.Errorf("hardware signatures: %d, Sign audit records: %d", signed, n)
	}
	if l := r.log.String(); strings.Contains(l, "audit record not written") {
		t.Errorf("a call wrote to the audit log after it was closed:\n%s", grep(l, "audit record not written"))
	}
	// The call is done now: release what Close left open.
	r.d.callsEnded.Store(true)
	r.d.Close()
}

// TestHealthWatchDoesNotHoldShutdown: an idle health Watch stream (a load
// balancer's health checking) is sent NOT_SERVING and then ended when the
// daemon stops, so the graceful stop does not wait the whole
// shutdown_timeout for it.
func TestHealthWatchDoesNotHoldShutdown(t *testing.T) {
	r := startDaemon(t, func(c *config.Config) { c.Limits.ShutdownTimeout = 3 * time.Second }, Options{})
	watch := func(service string) healthpb.Health_WatchClient {
		st, err := r.health.Watch(ctx10(t), &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
		return st
	}
	known := watch(kbv1.KeyBroker_ServiceDesc.ServiceName)
	unknown := watch("no.such.Service") // SERVICE_UNKNOWN: gets no NOT_SERVING
	start := time.Now()
	r.stop()
	took := time.Since(start)
	if took > 2*time.Second {
		t.Errorf("stop took %v: idle health Watch streams held it (shutdown_timeout 3s)", took)
	}
	if l := r.log.String(); strings.Contains(l, "graceful stop timed out") {
		t.Errorf("graceful stop timed out:\n%s", grep(l, "graceful stop timed out"))
	}
	resp, err := known.Recv()
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("watcher got %v, %v before its stream ended; want NOT_SERVING", resp, err)
	}
	if _, err := known.Recv(); err == nil {
		t.Error("the Watch stream did not end")
	}
	if _, err := unknown.Recv(); err == nil {
		t.Error("the Watch stream of an unknown service did not end")
	}
}

func grep(s, w string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, w) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
