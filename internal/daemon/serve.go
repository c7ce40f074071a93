package daemon

// Serving: listeners, the gRPC servers, and the stop that drains them.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keybroker/keybroker/rotation"
)

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
	if d.etcd == nil {
		// One daemon: it rotates. (Of several replicas, the leader does:
		// see lead.)
		sched := rotation.Scheduler{Clock: rotation.SystemClock{}, Advancer: d.ring, Interval: d.cfg.Rotation.CheckInterval, Log: d.log}
		schedCtx, stopSched := context.WithCancel(ctx)
		schedDone := make(chan struct{})
		go func() { sched.Run(schedCtx); close(schedDone) }()
		defer func() { stopSched(); <-schedDone }()
	}

	servers := []*grpc.Server{d.grpc}
	errc := make(chan error, 4)
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
	if err := d.serveJWKS(errc); err != nil {
		for _, g := range servers {
			g.Stop()
		}
		if admin != nil {
			admin.Close()
		}
		return err
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
	d.stopJWKS()
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
	graceful := onEach(servers, (*grpc.Server).GracefulStop)
	timer := time.NewTimer(d.cfg.Limits.ShutdownTimeout)
	defer timer.Stop()
	select {
	case <-graceful:
		return
	case <-timer.C:
	}
	d.log.Warn("graceful stop timed out; cutting off remaining calls", "shutdown_timeout", d.cfg.Limits.ShutdownTimeout)
	stopped := onEach(servers, (*grpc.Server).Stop)
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

// onEach runs f on every server at once; the channel closes when all have
// returned.
func onEach(servers []*grpc.Server, f func(*grpc.Server)) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		var wg sync.WaitGroup
		for _, g := range servers {
			wg.Go(func() { f(g) })
		}
		wg.Wait()
		close(done)
	}()
	return done
}
