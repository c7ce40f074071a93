// Package daemon wires keybrokerd together: backend, store, keyring, gRPC
// server, health and the unix socket listener. cmd/keybrokerd is a thin
// main around it; tests start a daemon in-process through it.
package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/authn"
	"github.com/keybroker/keybroker/internal/broker"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/internal/server"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/rotation"
)

// Daemon is a running keybrokerd.
type Daemon struct {
	cfg     config.Config
	log     *slog.Logger
	backend broker.Backend
	store   *store.Store
	audit   *audit.Log
	ring    *keyring.Keyring
	health  *health.Server
	grpc    *grpc.Server // unix socket, peers identified by SO_PEERCRED
	tcp     *grpc.Server // TCP with mutual TLS; nil when not configured
}

// Options are the daemon's test seams.
type Options struct {
	// Failpoint is passed to the keyring (crash tests).
	Failpoint func(step string)
}

// New validates cfg, opens the backend and the store, loads the keys and
// probes the hardware. It does not listen yet.
func New(cfg config.Config, log *slog.Logger, opts ...Options) (d *Daemon, err error) {
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d = &Daemon{cfg: cfg, log: log}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	if d.backend, err = openBackend(cfg, log); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if d.store, err = store.Open(filepath.Join(cfg.StateDir, "keybroker.db")); err != nil {
		return nil, err
	}
	access, maxKeys, err := accessFrom(cfg)
	if err != nil {
		return nil, err
	}
	d.ring, err = keyring.New(keyring.Options{Backend: d.backend, BackendName: cfg.Backend, Store: d.store, Log: log,
		Failpoint: o.Failpoint, MaxKeys: maxKeys})
	if err != nil {
		return nil, err
	}
	if d.audit, err = audit.Open(cfg.AuditPath(), audit.Options{Timeout: cfg.Audit.WriteTimeout, Log: log}); err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Limits.CallTimeout)
	defer cancel()
	if err := d.backend.Probe(ctx); err != nil {
		return nil, fmt.Errorf("backend probe: %w", err)
	}
	// Remove hardware objects left by an interrupted operation, then apply,
	// in order, every transition that fell due while the daemon was down.
	if _, err := d.ring.Reconcile(ctx); err != nil {
		return nil, fmt.Errorf("reconcile hardware and records: %w", err)
	}
	if err := d.ring.Advance(ctx, time.Now()); err != nil {
		log.Error("applying due rotations at start; retrying on schedule", "err", err)
	}

	svc := server.New(server.Options{Ring: d.ring, Access: access, Audit: d.audit, Log: log})
	d.health = health.NewServer()
	newServer := func(creds credentials.TransportCredentials) *grpc.Server {
		g := grpc.NewServer(
			grpc.Creds(creds),
			grpc.MaxRecvMsgSize(cfg.Limits.MaxRecvMsgSize),
			grpc.MaxConcurrentStreams(cfg.Limits.MaxConcurrentStreams),
			grpc.ChainUnaryInterceptor(deadline(cfg.Limits.CallTimeout), svc.UnaryInterceptor),
		)
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
func openBackend(cfg config.Config, log *slog.Logger) (b broker.Backend, err error) {
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
			return nil, err
		}
		b, err := hsm.Open(hsm.Config{
			ModulePath:      cfg.PKCS11.Module,
			TokenLabel:      label,
			PIN:             pin,
			MaxSessions:     cfg.PKCS11.MaxSessions,
			PoolWaitTimeout: cfg.PKCS11.PoolWaitTimeout,
		}, log)
		if err != nil {
			return nil, fmt.Errorf("pkcs11 token %q: %w", label, err)
		}
		return b, nil
	}
	shared, err := open(cfg.PKCS11.TokenLabel, cfg.PKCS11.PINFile)
	if err != nil {
		return nil, err
	}
	r := &broker.Router{Shared: shared, ByTenant: map[string]broker.Backend{}}
	defer func() {
		if err != nil {
			r.Close()
		}
	}()
	for _, t := range cfg.Tenants {
		if t.PKCS11 == nil {
			continue
		}
		own, err := open(t.PKCS11.TokenLabel, t.PKCS11.PINFile)
		if err != nil {
			return nil, fmt.Errorf("tenant %s: %w", t.Name, err)
		}
		r.ByTenant[t.Name] = own
	}
	return r, nil
}

// accessFrom builds the tenants' access rules and key limits.
func accessFrom(cfg config.Config) (*server.Access, func(string) int, error) {
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
	return access, func(tenant string) int { return maxKeys[tenant] }, nil
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

// ServeListener serves on lis until ctx is done (see Serve).
func (d *Daemon) ServeListener(ctx context.Context, lis net.Listener) error {
	sched := rotation.Scheduler{Clock: rotation.SystemClock{}, Advancer: d.ring, Interval: d.cfg.Rotation.CheckInterval, Log: d.log}
	schedCtx, stopSched := context.WithCancel(ctx)
	schedDone := make(chan struct{})
	go func() { sched.Run(schedCtx); close(schedDone) }()
	defer func() { stopSched(); <-schedDone }()

	servers := []*grpc.Server{d.grpc}
	errc := make(chan error, 2)
	go func() { errc <- d.grpc.Serve(lis) }()
	d.log.Info("serving", "socket", lis.Addr().String(), "backend", d.cfg.Backend)
	if d.tcp != nil {
		tl, err := net.Listen("tcp", d.cfg.TCP.Address)
		if err != nil {
			d.grpc.Stop()
			return fmt.Errorf("tcp: %w", err)
		}
		servers = append(servers, d.tcp)
		go func() { errc <- d.tcp.Serve(tl) }()
		d.log.Info("serving mTLS", "address", tl.Addr().String())
	}
	var err error
	select {
	case err = <-errc:
	case <-ctx.Done():
	}
	d.log.Info("stopping")
	d.health.Shutdown()
	stopped := make(chan struct{})
	go func() {
		for _, g := range servers {
			g.GracefulStop()
		}
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(d.cfg.Limits.ShutdownTimeout):
		d.log.Warn("graceful stop timed out; closing remaining calls")
		for _, g := range servers {
			g.Stop()
		}
	}
	return err
}

// Close releases the store and the hardware.
func (d *Daemon) Close() {
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
