package daemon

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm/softhsmtest"
)

// flaky wraps a backend whose Probe fails while down is set.
type flaky struct {
	kms.Backend
	down atomic.Bool
}

// SessionsInUse passes the metric through the wrapper.
func (f *flaky) SessionsInUse() int {
	if s, ok := f.Backend.(kms.SessionCounter); ok {
		return s.SessionsInUse()
	}
	return -1
}

func (f *flaky) Probe(ctx context.Context) error {
	if f.down.Load() {
		return errors.New("test: backend unreachable")
	}
	return f.Backend.Probe(ctx)
}

// logBuffer is a goroutine-safe log sink.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// running is an in-process daemon serving on a unix socket.
type running struct {
	d      *Daemon
	cfg    config.Config
	client kbv1.KeyBrokerClient
	health healthpb.HealthClient
	log    *logBuffer
	level  *slog.LevelVar
	stop   func() // cancels Serve and waits for it
}

// startDaemon serves a fresh token; edit adjusts the config, opts the
// daemon's options. It returns once the daemon is Ready.
func startDaemon(t *testing.T, edit func(*config.Config), opts Options) *running {
	t.Helper()
	tok := softhsmtest.NewToken(t)
	dir, err := os.MkdirTemp("", "kbo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := config.Default()
	cfg.Socket = filepath.Join(dir, "kb.sock")
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.PKCS11.Module, cfg.PKCS11.TokenLabel, cfg.PKCS11.PINFile = tok.ModulePath, tok.Label, tok.PINFile
	if edit != nil {
		edit(&cfg)
	}
	r := &running{cfg: cfg, log: new(logBuffer), level: new(slog.LevelVar)}
	opts.LogLevel = r.level
	log := slog.New(slog.NewJSONHandler(r.log, &slog.HandlerOptions{Level: r.level}))
	r.d, err = New(cfg, log, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- r.d.Serve(ctx) }()
	var once sync.Once
	r.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-served:
				if err != nil {
					t.Errorf("Serve: %v", err)
				}
			case <-time.After(15 * time.Second):
				t.Error("Serve did not return after cancel")
			}
			r.d.Close()
		})
	}
	t.Cleanup(r.stop)
	select {
	case <-r.d.Ready():
	case err := <-served:
		t.Fatalf("Serve: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("daemon not ready after 20s")
	}
	conn, err := grpc.NewClient("unix:"+cfg.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r.client = kbv1.NewKeyBrokerClient(conn)
	r.health = healthpb.NewHealthClient(conn)
	return r
}

// fakeNotifySocket listens where NOTIFY_SOCKET points, as systemd does, and
// returns the notifications as they come.
func fakeNotifySocket(t *testing.T) <-chan string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kbn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	ch := make(chan string, 1024)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(ch)
				return
			}
			ch <- string(buf[:n])
		}
	}()
	return ch
}

// next returns the next notification, failing after timeout.
func next(t *testing.T, ch <-chan string, timeout time.Duration) string {
	t.Helper()
	select {
	case m, ok := <-ch:
		if !ok {
			t.Fatal("notify socket closed")
		}
		return m
	case <-time.After(timeout):
		t.Fatalf("no systemd notification within %v", timeout)
	}
	return ""
}

func hasLine(msg, line string) bool {
	for _, l := range strings.Split(msg, "\n") {
		if l == line {
			return true
		}
	}
	return false
}

func ctx10(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func checkHealth(t *testing.T, r *running, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := r.health.Check(ctx10(t), &healthpb.HealthCheckRequest{Service: kbv1.KeyBroker_ServiceDesc.ServiceName})
		if err == nil && resp.Status == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("health: %v %v, want %v", resp, err, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestNotifyWatchdogFollowsHealth: READY=1 comes once the daemon serves;
// WATCHDOG=1 pings come at half WATCHDOG_USEC while the backend probes
// well, stop (with health NOT_SERVING) while it is unreachable, and resume
// with SERVING when it is back; STOPPING=1 on stop.
func TestNotifyWatchdogFollowsHealth(t *testing.T) {
	notes := fakeNotifySocket(t)
	t.Setenv("WATCHDOG_USEC", "200000") // pings every 100 ms
	t.Setenv("WATCHDOG_PID", "")
	var fb *flaky
	r := startDaemon(t, func(c *config.Config) { c.Health.ProbeInterval = time.Hour }, Options{
		WrapBackend: func(b kms.Backend) kms.Backend { fb = &flaky{Backend: b}; return fb },
	})
	if m := next(t, notes, 5*time.Second); !hasLine(m, "READY=1") {
		t.Fatalf("first notification %q, want READY=1", m)
	}
	checkHealth(t, r, healthpb.HealthCheckResponse_SERVING)
	for i := 0; i < 3; i++ {
		if m := next(t, notes, 2*time.Second); m != "WATCHDOG=1" {
			t.Fatalf("notification %q, want WATCHDOG=1", m)
		}
	}

	fb.down.Store(true)
	checkHealth(t, r, healthpb.HealthCheckResponse_NOT_SERVING)
	drain := time.After(300 * time.Millisecond) // pings already on their way
	for draining := true; draining; {
		select {
		case <-notes:
		case <-drain:
			draining = false
		}
	}
	quiet := time.After(500 * time.Millisecond) // five watchdog periods
	for waiting := true; waiting; {
		select {
		case m := <-notes:
			if hasLine(m, "WATCHDOG=1") {
				t.Fatalf("WATCHDOG=1 sent while the backend is unreachable")
			}
		case <-quiet:
			waiting = false
		}
	}

	fb.down.Store(false)
	checkHealth(t, r, healthpb.HealthCheckResponse_SERVING)
	deadline := time.After(2 * time.Second)
	for {
		select {
		case m := <-notes:
			if hasLine(m, "WATCHDOG=1") {
				r.stop()
				for {
					m := next(t, notes, 5*time.Second)
					if hasLine(m, "STOPPING=1") {
						return
					}
				}
			}
		case <-deadline:
			t.Fatal("no WATCHDOG=1 after the backend came back")
		}
	}
}

// TestHealthProberWithoutSystemd: health follows the backend at
// health.probe_interval when there is no watchdog.
func TestHealthProberWithoutSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "")
	var fb *flaky
	r := startDaemon(t, func(c *config.Config) { c.Health.ProbeInterval = 100 * time.Millisecond }, Options{
		WrapBackend: func(b kms.Backend) kms.Backend { fb = &flaky{Backend: b}; return fb },
	})
	checkHealth(t, r, healthpb.HealthCheckResponse_SERVING)
	fb.down.Store(true)
	checkHealth(t, r, healthpb.HealthCheckResponse_NOT_SERVING)
	if r.d.Healthy() {
		t.Error("Healthy() = true while the probe fails")
	}
	fb.down.Store(false)
	checkHealth(t, r, healthpb.HealthCheckResponse_SERVING)
	for _, want := range []string{"backend unreachable; health NOT_SERVING", "backend and audit log available again; health SERVING"} {
		if !strings.Contains(r.log.String(), want) {
			t.Errorf("log does not say %q", want)
		}
	}
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	return string(b)
}

// TestMetrics scrapes /metrics on the admin listener after a few calls.
func TestMetrics(t *testing.T) {
	var fb *flaky
	r := startDaemon(t, func(c *config.Config) {
		c.Admin.Address = "127.0.0.1:0"
		c.Health.ProbeInterval = 100 * time.Millisecond
	}, Options{WrapBackend: func(b kms.Backend) kms.Backend { fb = &flaky{Backend: b}; return fb }})
	ctx := ctx10(t)
	if _, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "m", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	for i := 0; i < 3; i++ {
		if _, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "m", Digest: d[:]}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "nope", Digest: d[:]}); status.Code(err) != codes.NotFound {
		t.Fatalf("Sign(nope): %v, want NotFound", err)
	}
	if _, err := r.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "m"}); err != nil {
		t.Fatal(err)
	}
	addr := r.d.AdminAddr()
	if addr == "" {
		t.Fatal("AdminAddr is empty with admin.address set")
	}
	body := scrape(t, addr)
	for _, want := range []string{
		`keybroker_rpc_requests_total{code="OK",method="Sign",tenant="default"} 3`,
		`keybroker_rpc_requests_total{code="NotFound",method="Sign",tenant="default"} 1`,
		`keybroker_rpc_requests_total{code="OK",method="CreateKey",tenant="default"} 1`,
		`keybroker_rpc_duration_seconds_count{code="OK",method="Sign",tenant="default"} 3`,
		`keybroker_rpc_duration_seconds_bucket{code="OK",method="Sign",tenant="default",le="+Inf"} 3`,
		`keybroker_backend_up 1`,
		`keybroker_backend_sessions_in_use 0`,
		`keybroker_backend_probe_duration_seconds_count `,
		`keybroker_key_versions{state="active"} 1`,
		`keybroker_key_versions{state="retired"} 1`,
		`keybroker_key_versions{state="revoked"} 0`,
		`keybroker_key_next_rotation_timestamp_seconds{key="m",tenant="default"} `,
		`keybroker_key_next_rotation_earliest_timestamp_seconds `,
		`keybroker_rotations_total 1`,
		`keybroker_rotation_failures_total 0`,
		`keybroker_audit_write_failures_total 0`,
		`go_goroutines `,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", grepKeybroker(body))
	}

	fb.down.Store(true)
	checkHealth(t, r, healthpb.HealthCheckResponse_NOT_SERVING)
	if body := scrape(t, addr); !strings.Contains(body, "keybroker_backend_up 0\n") || !regexp.MustCompile(`keybroker_backend_probe_failures_total [1-9]`).MatchString(body) {
		t.Errorf("backend down, but /metrics says:\n%s", grepKeybroker(body))
	}
}

func grepKeybroker(body string) string {
	var out []string
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "keybroker_") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestReload: a valid configuration applies live (tenants, roles, quotas,
// log level); an invalid one is refused with every problem logged and the
// old one keeps serving.
func TestReload(t *testing.T) {
	me := uint32(os.Getuid())
	tenant := func(name string, uid uint32, q config.Quota, roles ...string) config.Tenant {
		return config.Tenant{Name: name, Identities: config.Identities{UIDs: []uint32{uid}}, Roles: roles, Quota: q}
	}
	other := tenant("other", me+1, config.Quota{}, config.RoleSigner)
	r := startDaemon(t, func(c *config.Config) { c.Tenants = []config.Tenant{other} }, Options{})
	ctx := ctx10(t)
	if _, err := r.client.ListKeys(ctx, &kbv1.ListKeysRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("before reload: %v, want Unauthenticated", err)
	}
	load := func(edit func(*config.Config)) func() (config.Config, error) {
		return func() (config.Config, error) {
			c := r.cfg
			c.Tenants = append([]config.Tenant(nil), c.Tenants...)
			edit(&c)
			return c, nil
		}
	}

	// A tenant for this uid, with a signing quota of one per hour and at
	// most one key; debug logging.
	if err := r.d.Reload(load(func(c *config.Config) {
		c.Tenants = append(c.Tenants, tenant("me", me, config.Quota{SignsPerSecond: 1.0 / 3600, Burst: 1, MaxKeys: 1}, config.RoleSigner, config.RoleAdmin))
		c.Log.Level = "debug"
	})); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if _, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k1", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatalf("CreateKey after reload: %v", err)
	}
	if _, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k2", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("second key with max_keys 1: %v, want ResourceExhausted", err)
	}
	d := sha256.Sum256([]byte("x"))
	if _, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "k1", Digest: d[:]}); err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if _, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "k1", Digest: d[:]}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("second Sign with burst 1: %v, want ResourceExhausted", err)
	}
	if r.level.Level() != slog.LevelDebug {
		t.Errorf("log level after reload: %v, want debug", r.level.Level())
	}

	// An invalid configuration: refused whole, every problem logged.
	err := r.d.Reload(load(func(c *config.Config) {
		c.Tenants = []config.Tenant{tenant("me", me, config.Quota{SignsPerSecond: -1}, "root")}
		c.Log.Level = "loud"
		c.Health.ProbeInterval = time.Nanosecond
	}))
	var p config.Problems
	if !errors.As(err, &p) || len(p) < 4 {
		t.Fatalf("Reload(invalid) = %v, want at least four problems", err)
	}
	logged := r.log.String()
	for _, want := range []string{`tenants[0] (me).roles: \"root\"`, "tenants[0] (me).quota:", "log.level:", "health.probe_interval:", "configuration reload refused"} {
		if !strings.Contains(logged, want) {
			t.Errorf("log does not list %q:\n%s", want, logged)
		}
	}
	// The previous configuration still serves: same tenant, same quota.
	if _, err := r.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: "k1"}); err != nil {
		t.Errorf("GetKey after a refused reload: %v", err)
	}
	if _, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "k1", Digest: d[:]}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("Sign after a refused reload: %v, want the old quota (ResourceExhausted)", err)
	}
	if r.level.Level() != slog.LevelDebug || r.d.Config().Log.Level != "debug" {
		t.Errorf("a refused reload changed the log level")
	}

	// A load error (unreadable, bad YAML) is refused the same way.
	if err := r.d.Reload(func() (config.Config, error) { return config.Config{}, errors.New("config: yaml: line 3: bad") }); err == nil {
		t.Error("Reload accepted a load error")
	}
	// Dropping the tenant: its caller is refused at once.
	if err := r.d.Reload(load(func(c *config.Config) {})); err != nil {
		t.Fatal(err)
	}
	if _, err := r.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: "k1"}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("GetKey after the tenant was removed: %v, want Unauthenticated", err)
	}
}
