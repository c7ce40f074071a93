// Package daemon wires keybrokerd together: backend, store, keyring, gRPC
// server, health and its backend prober, metrics, systemd notifications
// and socket activation, configuration reload, and the listeners.
// cmd/keybrokerd is a thin main around it; tests start a daemon in-process
// through it.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/authn"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/internal/metrics"
	"github.com/keybroker/keybroker/internal/server"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/rotation"
)

// ErrPINRefused is wrapped by New's error when a PKCS#11 token refuses the
// PIN (see hsm.ErrPINRefused). Starting again with the same PIN would be
// another failed login: tokens lock after a few.
var ErrPINRefused = hsm.ErrPINRefused

// ErrConfig is wrapped by New's error when the configuration is at fault
// (invalid, a PIN file that cannot be used, or a PKCS#11 module that cannot
// load or read its own configuration): starting again without
// changing it fails the same way.
var ErrConfig = errors.New("bad configuration")

// Daemon is a running keybrokerd.
type Daemon struct {
	cfg     config.Config // as started; fields that need a restart stay as they are
	log     *slog.Logger
	level   *slog.LevelVar // nil: the log level is not reloadable
	backend kms.Backend
	store   *store.Store
	audit   *audit.Log
	ring    *keyring.Keyring
	svc     *server.Server
	metrics *metrics.Metrics
	health  *health.Server
	grpc    *grpc.Server // unix socket, peers identified by SO_PEERCRED
	tcp     *grpc.Server // TCP with mutual TLS; nil when not configured
	tcpLis  net.Listener // passed by systemd (socket activation), else nil

	live     atomic.Pointer[config.Config] // the configuration in force (reload)
	access   atomic.Pointer[server.Access]
	maxKeys  atomic.Pointer[map[string]int]
	reloadMu sync.Mutex
	healthy  atomic.Bool
	probing  atomic.Bool   // a backend probe has not returned yet
	probeNow chan struct{} // a call failed with UNAVAILABLE: probe at once
	ready    chan struct{} // closed once READY=1 is sent
	adminMu  sync.Mutex
	adminLis net.Listener

	// stopping is cancelled when the daemon starts to stop: streaming calls
	// (health Watch, reflection) end then (see streamUntilStop).
	stopping    context.Context
	endStreams  context.CancelFunc
	callsEnded  atomic.Bool // false after a stop left calls running: Close leaves the audit log, store and backend open
	tenantProbe tenantTokens
}

// Options are the daemon's test seams and optional wiring.
type Options struct {
	// Failpoint is passed to the keyring (crash tests).
	Failpoint func(step string)
	// LogLevel, when set, is the level of log's handler: a reload sets it
	// from log.level.
	LogLevel *slog.LevelVar
	// WrapBackend, when set, wraps the opened backend (tests: a backend
	// whose probe fails on demand).
	WrapBackend func(kms.Backend) kms.Backend
}

// New validates cfg, opens the backend and the store, loads the keys and
// probes the hardware. It does not listen yet.
func New(cfg config.Config, log *slog.Logger, opts ...Options) (d *Daemon, err error) {
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d = &Daemon{cfg: cfg, log: log, level: o.LogLevel, ready: make(chan struct{})}
	d.stopping, d.endStreams = context.WithCancel(context.Background())
	d.callsEnded.Store(true)
	d.live.Store(&cfg)
	opened := d // `return nil, err` sets d to nil before this runs
	defer func() {
		if err != nil {
			opened.Close()
		}
	}()
	if d.backend, err = openBackend(cfg, log); err != nil {
		return nil, err
	}
	if o.WrapBackend != nil {
		d.backend = o.WrapBackend(d.backend)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if d.store, err = store.Open(filepath.Join(cfg.StateDir, "keybroker.db")); err != nil {
		return nil, err
	}
	access, maxKeys, err := accessFrom(cfg)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	d.access.Store(access)
	d.maxKeys.Store(&maxKeys)
	d.ring, err = keyring.New(keyring.Options{Backend: d.backend, BackendName: cfg.Backend, Store: d.store, Log: log,
		Failpoint: o.Failpoint, MaxKeys: func(tenant string) int { return (*d.maxKeys.Load())[tenant] }})
	if err != nil {
		return nil, err
	}
	// Health follows the audit log as it follows the hardware: a log that
	// fails or recovers asks for a probe at once.
	d.probeNow = make(chan struct{}, 1)
	d.audit, err = audit.Open(cfg.AuditPath(), audit.Options{Timeout: cfg.Audit.WriteTimeout, Log: log,
		OnChange: func(error) { d.nudgeProbe() }})
	if errors.Is(err, audit.ErrRefused) {
		// Tampered with or damaged while stopped: someone must look.
		return nil, fmt.Errorf("%w: audit log: %w", ErrConfig, err)
	}
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	d.metrics = metrics.New(keySource{d}, tenantNames(cfg))
	if sessions, ok := d.backend.(kms.SessionCounter); ok {
		d.metrics.Registry().MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "keybroker_backend_sessions_in_use",
			Help: "PKCS#11 sessions held by calls in progress.",
		}, func() float64 { return float64(sessions.SessionsInUse()) }))
	}
	if r, ok := d.backend.(*kms.Router); ok {
		var own []string
		for name := range r.ByTenant {
			own = append(own, name)
		}
		d.tenantProbe.register(d.metrics.Registry(), own)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Limits.CallTimeout)
	defer cancel()
	// The shared backend, as the prober: a tenant's own token may come
	// later (see lateToken).
	shared := d.backend
	if r, ok := d.backend.(*kms.Router); ok {
		shared = r.Shared
	}
	start := time.Now()
	err = shared.Probe(ctx)
	d.metrics.ObserveProbe(time.Since(start), err)
	if err != nil {
		return nil, fmt.Errorf("backend probe: %w", err)
	}
	d.healthy.Store(true)
	// Remove hardware objects left by an interrupted operation, then apply,
	// in order, every transition that fell due while the daemon was down.
	if _, err := d.ring.Reconcile(ctx); err != nil {
		return nil, fmt.Errorf("reconcile hardware and records: %w", err)
	}
	if err := d.ring.Advance(ctx, time.Now()); err != nil {
		log.Error("applying due rotations at start; retrying on schedule", "err", err)
	}

	svc := server.New(server.Options{Ring: d.ring, Access: access, Audit: d.audit, Observer: healthNudger{d.metrics, d}, Log: log})
	d.svc = svc
	d.health = health.NewServer()
	newServer := func(creds credentials.TransportCredentials) *grpc.Server {
		g := grpc.NewServer(append(svc.ServerOptions(),
			grpc.Creds(creds),
			grpc.MaxRecvMsgSize(cfg.Limits.MaxRecvMsgSize),
			grpc.MaxConcurrentStreams(cfg.Limits.MaxConcurrentStreams),
			// Ping floods: clients may ping at most every 10 s, and only
			// with calls in flight; idle connections are closed after 5 min.
			grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second}),
			grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 5 * time.Minute, Time: time.Minute, Timeout: 20 * time.Second}),
			grpc.ChainUnaryInterceptor(deadline(cfg.Limits.CallTimeout), svc.UnaryInterceptor),
			grpc.ChainStreamInterceptor(d.streamUntilStop),
			// Stop (the hard stop after shutdown_timeout) returns only once
			// every handler has returned, so that Close never closes the
			// audit log, store or backend under a running call: a call
			// writes its audit record before it returns.
			grpc.WaitForHandlers(true),
		)...)
		kbv1.RegisterKeyBrokerServer(g, svc)
		healthpb.RegisterHealthServer(g, d.health)
		reflection.Register(g)
		return g
	}
	d.grpc = newServer(authn.UnixCredentials())
	if cfg.TCP.Address != "" {
		tlsCfg, err := authn.ServerTLS(cfg.TCP.CertFile, cfg.TCP.KeyFile, cfg.TCP.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("tcp: %w", err)
		}
		d.tcp = newServer(credentials.NewTLS(tlsCfg))
	}
	d.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	d.health.SetServingStatus(kbv1.KeyBroker_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	return d, nil
}

// openBackend opens the TPM, or the shared token and each tenant's own
// token.
func openBackend(cfg config.Config, log *slog.Logger) (b kms.Backend, err error) {
	if cfg.Backend == "tpm" {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("state dir: %w", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 4*cfg.TPM.Timeout)
		defer cancel()
		return openTPM(ctx, cfg, log)
	}
	if cfg.PKCS11.SoftHSM2Conf != "" {
		// Read by libsofthsm2 in C_Initialize.
		if err := os.Setenv("SOFTHSM2_CONF", cfg.PKCS11.SoftHSM2Conf); err != nil {
			return nil, err
		}
	}
	open := func(label, pinFile string) (*hsm.Backend, error) {
		pin, err := config.ReadPIN(pinFile)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrConfig, err)
		}
		b, err := hsm.Open(hsm.Config{
			ModulePath:      cfg.PKCS11.Module,
			TokenLabel:      label,
			PIN:             pin,
			MaxSessions:     cfg.PKCS11.MaxSessions,
			PoolWaitTimeout: cfg.PKCS11.PoolWaitTimeout,
		}, log)
		if errors.Is(err, hsm.ErrPINRefused) {
			return nil, fmt.Errorf("pkcs11 token %q: %w (not retrying: PIN counters lock): %w", label, ErrPINRefused, err)
		}
		if errors.Is(err, hsm.ErrModule) {
			// The module's own files are at fault: a restart cannot help.
			why := softhsmDiagnosis(cfg.PKCS11.Module)
			if why == "" {
				why = "check that the daemon's user can read the module and its configuration and storage"
			}
			return nil, fmt.Errorf("%w: pkcs11 module %s: %w: %s", ErrConfig, cfg.PKCS11.Module, err, why)
		}
		if err != nil {
			return nil, fmt.Errorf("pkcs11 token %q: %w", label, err)
		}
		return b, nil
	}
	shared, err := open(cfg.PKCS11.TokenLabel, cfg.PKCS11.PINFile)
	if err != nil {
		return nil, err
	}
	r := &kms.Router{Shared: shared, ByTenant: map[string]kms.Backend{}}
	defer func() {
		if err != nil {
			r.Close()
		}
	}()
	for _, t := range cfg.Tenants {
		if t.PKCS11 == nil {
			continue
		}
		openOwn := func() (*hsm.Backend, error) { return open(t.PKCS11.TokenLabel, t.PKCS11.PINFile) }
		own, err := openOwn()
		switch {
		case errors.Is(err, ErrPINRefused) || errors.Is(err, ErrConfig):
			return nil, fmt.Errorf("tenant %s: %w", t.Name, err)
		case err != nil:
			// Not there yet: the other tenants need not wait for it.
			r.ByTenant[t.Name] = newLateToken(t.Name, openOwn, err, log)
		default:
			r.ByTenant[t.Name] = own
		}
	}
	return r, nil
}

// accessFrom builds the tenants' access rules and key limits.
func accessFrom(cfg config.Config) (*server.Access, map[string]int, error) {
	var policies []server.TenantPolicy
	maxKeys := map[string]int{}
	for _, t := range cfg.EffectiveTenants() {
		var roles server.Role
		for _, r := range t.Roles {
			switch r {
			case config.RoleSigner:
				roles |= server.RoleSigner
			case config.RoleAdmin:
				roles |= server.RoleAdmin
			}
		}
		id := t.Identities
		policies = append(policies, server.TenantPolicy{
			Name:           t.Name,
			Identities:     authn.Rule{UIDs: id.UIDs, GIDs: id.GIDs, SPIFFEIDs: id.SPIFFEIDs, DNSNames: id.DNSNames, CommonNames: id.CommonNames},
			Roles:          roles,
			SignsPerSecond: t.Quota.SignsPerSecond,
			Burst:          t.Quota.Burst,
		})
		maxKeys[t.Name] = t.Quota.MaxKeys
	}
	access, err := server.NewAccess(policies)
	if err != nil {
		return nil, nil, err
	}
	return access, maxKeys, nil
}

func tenantNames(cfg config.Config) []string {
	var names []string
	for _, t := range cfg.EffectiveTenants() {
		names = append(names, t.Name)
	}
	return names
}

// Keyring is the daemon's keyring, for in-process callers (dev mode).
func (d *Daemon) Keyring() *keyring.Keyring { return d.ring }

// Serve listens on the configured unix socket and serves until ctx is done,
// then stops gracefully: health turns NOT_SERVING, in-flight calls finish
// within the shutdown timeout, the rest are cut off.
func (d *Daemon) Serve(ctx context.Context) error {
	lis, err := d.Listen()
	if err != nil {
		return err
	}
	defer os.Remove(d.cfg.Socket)
	return d.ServeListener(ctx, lis)
}

// Listen creates the configured unix socket (mode 0660), replacing a stale
// socket file but refusing to take over the socket of a running daemon.
func (d *Daemon) Listen() (net.Listener, error) { return listenUnix(d.cfg.Socket) }

// ServeListener serves on lis until ctx is done (see Serve). Once every
// listener is up it tells systemd READY=1; while serving it probes the
// backend (health, watchdog); when ctx is done it tells systemd
// STOPPING=1 and drains.
func (d *Daemon) ServeListener(ctx context.Context, lis net.Listener) error {
	sched := rotation.Scheduler{Clock: rotation.SystemClock{}, Advancer: d.ring, Interval: d.cfg.Rotation.CheckInterval, Log: d.log}
	schedCtx, stopSched := context.WithCancel(ctx)
	schedDone := make(chan struct{})
	go func() { sched.Run(schedCtx); close(schedDone) }()
	defer func() { stopSched(); <-schedDone }()

	servers := []*grpc.Server{d.grpc}
	errc := make(chan error, 3)
	go func() { errc <- d.grpc.Serve(lis) }()
	d.log.Info("serving", "socket", lis.Addr().String(), "backend", d.cfg.Backend)
	if d.tcp != nil {
		tl := d.tcpLis
		if tl == nil {
			var err error
			if tl, err = net.Listen("tcp", d.cfg.TCP.Address); err != nil {
				d.grpc.Stop()
				return fmt.Errorf("tcp: %w", err)
			}
		}
		servers = append(servers, d.tcp)
		go func() { errc <- d.tcp.Serve(tl) }()
		d.log.Info("serving mTLS", "address", tl.Addr().String())
	}
	var admin *http.Server
	if d.cfg.Admin.Address != "" {
		al, err := net.Listen("tcp", d.cfg.Admin.Address)
		if err != nil {
			for _, g := range servers {
				g.Stop()
			}
			return fmt.Errorf("admin: %w", err)
		}
		d.adminMu.Lock()
		d.adminLis = al
		d.adminMu.Unlock()
		mux := http.NewServeMux()
		mux.Handle("/metrics", d.metrics.Handler())
		admin = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := admin.Serve(al); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("admin: %w", err)
			}
		}()
		d.log.Info("serving metrics", "address", "http://"+al.Addr().String()+"/metrics")
	}

	watchdog, err := sdWatchdog()
	if err != nil {
		d.log.Warn("systemd watchdog settings ignored", "err", err)
	}
	proberCtx, stopProber := context.WithCancel(ctx)
	proberDone := make(chan struct{})
	go func() { d.runProber(proberCtx, watchdog); close(proberDone) }()
	defer func() { stopProber(); <-proberDone }()

	d.notify(sdnotify.SdNotifyReady + "\nSTATUS=serving on " + lis.Addr().String())
	close(d.ready)

	select {
	case err = <-errc:
	case <-ctx.Done():
	}
	d.notify(sdnotify.SdNotifyStopping + "\nSTATUS=stopping: draining in-flight calls")
	d.log.Info("stopping")
	stopProber()
	<-proberDone
	d.health.Shutdown()    // watchers are sent NOT_SERVING...
	d.endStreams()         // ...then their streams end
	d.stopServers(servers) // unary calls finish, or are cut off
	if admin != nil {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := admin.Shutdown(sctx); err != nil {
			admin.Close()
		}
	}
	return err
}

// stopServers stops the gRPC servers gracefully: in-flight calls finish
// within the shutdown timeout. Then the rest are cut off (Stop): their
// contexts are cancelled and Stop waits for their handlers to return
// (grpc.WaitForHandlers), each bounded by limits.call_timeout and its audit
// record's write timeout. A handler that still runs after that (hardware
// that ignores cancellation) is left running: callsEnded is cleared, so
// Close does not close the audit log, store or backend under it.
func (d *Daemon) stopServers(servers []*grpc.Server) {
	graceful := make(chan struct{})
	go func() {
		var wg sync.WaitGroup
		for _, g := range servers {
			wg.Go(g.GracefulStop)
		}
		wg.Wait()
		close(graceful)
	}()
	timer := time.NewTimer(d.cfg.Limits.ShutdownTimeout)
	defer timer.Stop()
	select {
	case <-graceful:
		return
	case <-timer.C:
	}
	d.log.Warn("graceful stop timed out; cutting off remaining calls", "shutdown_timeout", d.cfg.Limits.ShutdownTimeout)
	stopped := make(chan struct{})
	go func() {
		var wg sync.WaitGroup
		for _, g := range servers {
			wg.Go(g.Stop)
		}
		wg.Wait()
		close(stopped)
	}()
	wait := d.cfg.Limits.CallTimeout + d.cfg.Audit.WriteTimeout + time.Second
	timer.Reset(wait)
	select {
	case <-stopped:
	case <-timer.C:
		d.callsEnded.Store(false)
		d.log.Error("calls still running after the hard stop; leaving the audit log, store and backend open for them", "waited", wait)
	}
}

// streamUntilStop is the stream interceptor that ends streaming calls when
// the daemon stops, so that an idle stream (a health Watch kept open by a
// load balancer, a reflection session) does not hold the graceful stop for
// the whole shutdown timeout. A health Watch ends once it has sent a status
// other than SERVING (health.Shutdown sends NOT_SERVING first), or after
// watchGrace; other streams end at once.
func (d *Daemon) streamUntilStop(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	s := &stoppableStream{ServerStream: ss, ctx: ctx}
	if info.FullMethod == healthpb.Health_Watch_FullMethodName {
		s.sent = make(chan struct{}, 1)
		s.status.Store(-1) // nothing sent yet
	}
	grace := min(watchGrace, d.cfg.Limits.ShutdownTimeout/2)
	defer context.AfterFunc(d.stopping, func() { s.end(cancel, grace) })()
	return handler(srv, s)
}

// watchGrace bounds how long a health Watch stream is kept open at stop
// for its NOT_SERVING to be sent.
const watchGrace = time.Second

// stoppableStream is a server stream whose context ends when the daemon
// stops (streamUntilStop).
type stoppableStream struct {
	grpc.ServerStream
	ctx context.Context
	// Health Watch only: the last status sent (-1: none yet), and a
	// signal on each send.
	sent   chan struct{}
	status atomic.Int32
}

func (s *stoppableStream) Context() context.Context { return s.ctx }

func (s *stoppableStream) SendMsg(m any) error {
	err := s.ServerStream.SendMsg(m)
	if r, ok := m.(*healthpb.HealthCheckResponse); ok && s.sent != nil && err == nil {
		s.status.Store(int32(r.GetStatus()))
		select {
		case s.sent <- struct{}{}:
		default:
		}
	}
	return err
}

// end cancels the stream, a health Watch once its watcher knows the
// daemon is not serving (or after grace).
func (s *stoppableStream) end(cancel context.CancelFunc, grace time.Duration) {
	defer cancel()
	if s.sent == nil {
		return
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	for {
		if st := s.status.Load(); st != -1 && st != int32(healthpb.HealthCheckResponse_SERVING) {
			return
		}
		select {
		case <-s.sent:
		case <-t.C:
			return
		case <-s.ctx.Done():
			return
		}
	}
}

// Ready is closed once the daemon serves (and has told systemd READY=1).
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// AdminAddr is the admin listener's address once Ready, or "" when
// admin.address is not set.
func (d *Daemon) AdminAddr() string {
	d.adminMu.Lock()
	defer d.adminMu.Unlock()
	if d.adminLis == nil {
		return ""
	}
	return d.adminLis.Addr().String()
}

// Metrics is the daemon's instrumentation.
func (d *Daemon) Metrics() *metrics.Metrics { return d.metrics }

// Close closes the audit log, the store and the hardware, in that order,
// once no call runs (ServeListener has returned). After a stop that left
// calls running it leaves them open: a running call may still write its
// audit record, and the process is about to exit anyway.
func (d *Daemon) Close() {
	if d.endStreams != nil {
		d.endStreams()
	}
	if !d.callsEnded.Load() {
		d.log.Error("calls still running: not closing the audit log, store and backend")
		return
	}
	if d.audit != nil {
		if err := d.audit.Close(); err != nil {
			d.log.Error("closing audit log", "err", err)
		}
	}
	if d.store != nil {
		if err := d.store.Close(); err != nil {
			d.log.Error("closing store", "err", err)
		}
	}
	if d.backend != nil {
		if err := d.backend.Close(); err != nil {
			d.log.Error("closing backend", "err", err)
		}
	}
}

// listenUnix listens on path with mode 0660, replacing a stale socket file
// but refusing to steal the socket of a running daemon.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("socket %s: exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("socket %s: another daemon is serving on it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("socket %s: removing stale socket: %w", path, err)
		}
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o660); err != nil {
		lis.Close()
		return nil, err
	}
	return lis, nil
}

// deadline gives every call the configured timeout, or its own if shorter.
func deadline(max time.Duration) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		ctx, cancel := context.WithTimeout(ctx, max)
		defer cancel()
		return handler(ctx, req)
	}
}

// healthNudger passes calls to the metrics and asks the prober to probe at
// once when a call fails with UNAVAILABLE while healthy, or succeeds while
// unhealthy: health follows the hardware within a call, not at the next
// scheduled probe.
type healthNudger struct {
	*metrics.Metrics
	d *Daemon
}

func (h healthNudger) ObserveRPC(method, tenant string, code codes.Code, latency time.Duration) {
	h.Metrics.ObserveRPC(method, tenant, code, latency)
	healthy := h.d.healthy.Load()
	// A call that ran out of time may have waited on hung hardware.
	failed := code == codes.Unavailable || code == codes.DeadlineExceeded
	if failed && healthy || code == codes.OK && !healthy {
		h.d.nudgeProbe()
	}
}

// nudgeProbe asks the prober to probe at once.
func (d *Daemon) nudgeProbe() {
	select {
	case d.probeNow <- struct{}{}:
	default:
	}
}
