package authn_test

import (
	"context"
	"net"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keybroker/keybroker/internal/authn"
)

// recorder is a unary interceptor that records FromContext of every RPC.
type recorder struct {
	mu    sync.Mutex
	calls []call
}

type call struct {
	id authn.Identity
	ok bool
}

func (r *recorder) intercept(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	id, ok := authn.FromContext(ctx)
	r.mu.Lock()
	r.calls = append(r.calls, call{id, ok})
	r.mu.Unlock()
	return h(ctx, req)
}

// last returns the only call recorded since the previous last and fails
// unless there was exactly one.
func (r *recorder) last(t testing.TB) call {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.calls) != 1 {
		t.Fatalf("interceptor ran %d times, want 1", len(r.calls))
	}
	c := r.calls[0]
	r.calls = nil
	return c
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.calls)
}

// serve starts a gRPC server with creds and the health service on lis and
// returns the recorder of its interceptor. Cleanup stops the server.
func serve(t testing.TB, lis net.Listener, creds credentials.TransportCredentials) *recorder {
	t.Helper()
	rec := &recorder{}
	var opts []grpc.ServerOption
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	opts = append(opts, grpc.UnaryInterceptor(rec.intercept))
	srv := grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Stop()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return rec
}

// check dials target with creds and calls Health.Check once.
func check(t testing.TB, target string, creds credentials.TransportCredentials) error {
	t.Helper()
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatalf("grpc.NewClient(%q): %v", target, err)
	}
	defer conn.Close()
	_, err = healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{})
	return err
}
