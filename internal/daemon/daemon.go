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
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/authn"
	"github.com/keybroker/keybroker/internal/cluster"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/internal/metrics"
	"github.com/keybroker/keybroker/internal/server"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/internal/store/etcd"
	"github.com/keybroker/keybroker/kms"
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
	store   store.Store
	etcd    *etcd.Store // the store, when it is etcd (several replicas)
	cluster atomic.Pointer[cluster.Cluster]
	audit   *audit.Log
	ring    *keyring.Keyring
	svc     *server.Server
	metrics *metrics.Metrics
	health  *health.Server
	grpc    *grpc.Server // unix socket, peers identified by SO_PEERCRED
	tcp     *grpc.Server // TCP with mutual TLS; nil when not configured
	tcpLis  net.Listener // passed by systemd (socket activation), else nil
	jwks    *jwksServer  // HTTPS JWK Sets; nil when jwks.address is not set

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
	hooksDone   chan struct{} // closed when the hook runner has stopped; nil: no hooks
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
	if d.store, d.etcd, err = openStore(cfg); err != nil {
		return nil, err
	}
	access, maxKeys, err := accessFrom(cfg)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	d.access.Store(access)
	d.maxKeys.Store(&maxKeys)
	d.ring, err = keyring.New(keyring.Options{Backend: d.backend, BackendName: cfg.Backend, Store: d.store, Log: log,
		Failpoint: o.Failpoint, MaxKeys: func(tenant string) int { return (*d.maxKeys.Load())[tenant] }, Fresh: d.fresh})
	if err != nil {
		return nil, err
	}
	// Health follows the audit log as it follows the hardware: a log that
	// fails or recovers asks for a probe at once.
	d.probeNow = make(chan struct{}, 1)
	batches := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "keybroker_audit_batch_records",
		Help:    "Records per audit log commit (one write, one sync): the group commit's depth.",
		Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256}})
	auditOpts := audit.Options{Timeout: cfg.Audit.WriteTimeout, Log: log, OnChange: func(error) { d.nudgeProbe() },
		OnBatch: func(n int) { batches.Observe(float64(n)) }}
	if cfg.Audit.Sync == "interval" {
		auditOpts.SyncInterval = cfg.Audit.SyncInterval
	}
	if d.etcd != nil {
		auditOpts.Replica = ReplicaID(cfg)
	}
	d.audit, err = audit.Open(cfg.AuditPath(), auditOpts)
	if errors.Is(err, audit.ErrRefused) {
		// Tampered with or damaged while stopped: someone must look.
		return nil, fmt.Errorf("%w: audit log: %w", ErrConfig, err)
	}
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	d.metrics = metrics.New(keySource{d}, tenantNames(cfg))
	d.metrics.Registry().MustRegister(batches)
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
	// Hooks listen before the start's Advance, so that transitions due
	// while the daemon was down reach them too.
	d.startHooks(cfg)
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
	if d.etcd != nil {
		// One of several replicas: the leader reconciles and rotates.
		if err := d.joinCluster(ctx); err != nil {
			return nil, err
		}
	} else {
		// Remove hardware objects left by an interrupted operation, then
		// apply, in order, every transition that fell due while the
		// daemon was down.
		if _, err := d.ring.Reconcile(ctx); err != nil {
			return nil, fmt.Errorf("reconcile hardware and records: %w", err)
		}
		if err := d.ring.Advance(ctx, time.Now()); err != nil {
			log.Error("applying due rotations at start; retrying on schedule", "err", err)
		}
	}

	svcOpts := server.Options{Ring: d.ring, Access: access, Audit: d.audit, Observer: healthNudger{d.metrics, d}, Log: log, CallTimeout: cfg.Limits.CallTimeout}
	if c := d.cluster.Load(); c != nil {
		svcOpts.Cluster = c
	}
	svc := server.New(svcOpts)
	d.svc = svc
	d.metrics.Registry().MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "keybroker_watch_cut_off_total",
		Help: "WatchKeys streams ended RESOURCE_EXHAUSTED for falling too far behind."}, func() float64 { return float64(svc.WatchesCutOff()) }))
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
	if cfg.JWKS.Address != "" {
		if d.jwks, err = d.newJWKS(cfg); err != nil {
			return nil, err
		}
	}
	d.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	d.health.SetServingStatus(kbv1.KeyBroker_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	return d, nil
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
	if d.hooksDone != nil {
		<-d.hooksDone // a run in progress is killed; its record is written first
	}
	if !d.callsEnded.Load() {
		d.log.Error("calls still running: not closing the audit log, store and backend")
		return
	}
	if c := d.cluster.Load(); c != nil {
		c.Close() // resigns the lead at once, rather than after the lease
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
