package daemon

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/softhsm/p11kittest"
)

// TestHSMRestartHealth: the daemon on SoftHSM2 behind p11-kit server. The
// HSM process is killed: the next Sign gets UNAVAILABLE with RetryInfo and
// health turns NOT_SERVING within 1 s; the HSM returns 3 s later: signing
// resumes within 5 s and health is SERVING again, with no daemon restart.
func TestHSMRestartHealth(t *testing.T) {
	dir := shortTempDir(t)
	hsm := startP11kitHSM(t, dir)
	tok := hsm.Token

	cfg := config.Default()
	cfg.Socket = filepath.Join(dir, "kb.sock")
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.PKCS11.Module, cfg.PKCS11.TokenLabel, cfg.PKCS11.PINFile = p11kittest.ClientModule, tok.Label, tok.PINFile
	// The scheduled probe is too slow for these bounds: health must follow
	// the calls themselves.
	cfg.Health.ProbeInterval = time.Minute
	d, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx) }()
	defer func() { cancel(); <-served }()

	conn, err := grpc.NewClient("unix:"+cfg.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kb, hc := kbv1.NewKeyBrokerClient(conn), healthpb.NewHealthClient(conn)
	cctx, ccancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer ccancel()
	if _, err := kb.CreateKey(cctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}, grpc.WaitForReady(true)); err != nil {
		t.Fatal(err)
	}
	sign := func() error {
		sctx, scancel := context.WithTimeout(cctx, time.Second)
		defer scancel()
		_, err := kb.Sign(sctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)})
		return err
	}
	health := func() healthpb.HealthCheckResponse_ServingStatus {
		r, err := hc.Check(cctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return r.Status
	}
	if err := sign(); err != nil {
		t.Fatal(err)
	}

	hsm.Kill()
	err = sign()
	firstError := time.Now()
	st := status.Convert(err)
	if st.Code() != codes.Unavailable {
		t.Fatalf("Sign with the HSM down: %v, want Unavailable", err)
	}
	hasRetry := false
	for _, det := range st.Details() {
		if _, ok := det.(*errdetails.RetryInfo); ok {
			hasRetry = true
		}
	}
	if !hasRetry {
		t.Error("UNAVAILABLE without RetryInfo")
	}
	for health() != healthpb.HealthCheckResponse_NOT_SERVING {
		if time.Since(firstError) > time.Second {
			t.Fatal("health still SERVING 1 s after the first hardware error")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(3 * time.Second)
	hsm.Start()
	back := time.Now()
	for sign() != nil {
		if time.Since(back) > 5*time.Second {
			t.Fatal("signing did not resume within 5 s of the HSM's return")
		}
		time.Sleep(50 * time.Millisecond)
	}
	for health() != healthpb.HealthCheckResponse_SERVING {
		if time.Since(back) > 5*time.Second {
			t.Fatal("health not SERVING 5 s after the HSM's return")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("signing back %v after the HSM returned", time.Since(back))
}
