package daemon

// Health: the prober behind grpc.health.v1 and the systemd watchdog, and
// the tenants' own tokens.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/metrics"
	"github.com/keybroker/keybroker/kms"
)

// runProber probes the backend every health.probe_interval (or half the
// systemd watchdog interval when that is shorter) until ctx is done. Health
// follows the probe; the watchdog is pinged only after a successful probe,
// so systemd restarts a daemon whose hardware stays unreachable.
func (d *Daemon) runProber(ctx context.Context, watchdog time.Duration) {
	t := time.NewTimer(d.probeInterval(watchdog))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.probeNow:
			if !t.Stop() {
				select {
				case <-t.C:
				default:
				}
			}
		}
		if d.probe(ctx, d.probeInterval(watchdog)) && watchdog > 0 && ctx.Err() == nil {
			d.notify(sdnotify.SdNotifyWatchdog)
		}
		t.Reset(d.probeInterval(watchdog))
	}
}

func (d *Daemon) probeInterval(watchdog time.Duration) time.Duration {
	i := d.live.Load().Health.ProbeInterval
	if watchdog > 0 && watchdog < i {
		i = watchdog
	}
	return i
}

// probe probes the backend once, within timeout (capped by
// health.probe_timeout and the call timeout), looks at the audit log, and
// sets health, the metrics and the log to match; it reports whether the
// backend answered (the systemd watchdog follows the hardware only: a
// restart would not help a full disk). Health follows the shared backend
// and the audit log: a tenant's own token is probed alongside, and its
// failure is logged and shown in keybroker_tenant_token_up, but does not
// take the daemon down for every tenant (systemd would restart it, and it
// could not start again while that token is missing).
func (d *Daemon) probe(ctx context.Context, timeout time.Duration) bool {
	timeout = min(timeout, d.live.Load().Health.ProbeTimeout, d.cfg.Limits.CallTimeout)
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	shared := d.backend
	var tenants sync.WaitGroup
	if r, ok := d.backend.(*kms.Router); ok {
		shared = r.Shared
		for name, b := range r.ByTenant {
			tenants.Go(func() { d.tenantProbe.probe(pctx, ctx, d.log, name, b) })
		}
	}
	defer tenants.Wait()
	start := time.Now()
	err := d.probeBounded(pctx, shared)
	d.metrics.ObserveProbe(time.Since(start), err)
	if ctx.Err() != nil {
		return false // stopping: the probe was cut short, not failed
	}
	// A pool saturated by live calls is busy, not down.
	backendUp := err == nil || errors.Is(err, kms.ErrResourceExhausted) && !errors.Is(err, kms.ErrUnavailable)
	auditErr := d.audit.Err()
	storeErr := d.fresh()
	up := backendUp && auditErr == nil && storeErr == nil
	was := d.healthy.Swap(up)
	st := healthpb.HealthCheckResponse_SERVING
	if !up {
		st = healthpb.HealthCheckResponse_NOT_SERVING
	}
	d.health.SetServingStatus("", st)
	d.health.SetServingStatus(kbv1.KeyBroker_ServiceDesc.ServiceName, st)
	switch {
	case was && !backendUp:
		d.log.Error("backend unreachable; health NOT_SERVING", "backend", d.cfg.Backend, "err", err)
		d.notify("STATUS=backend unreachable: NOT_SERVING")
	case was && auditErr != nil:
		d.log.Error("audit log unavailable; health NOT_SERVING", "err", auditErr)
		d.notify("STATUS=audit log unavailable: NOT_SERVING")
	case was && !up:
		d.log.Error("out of touch with etcd past store.max_staleness; health NOT_SERVING", "err", storeErr)
		d.notify("STATUS=out of touch with etcd: NOT_SERVING")
	case !was && up:
		d.log.Info("backend and audit log available again; health SERVING", "backend", d.cfg.Backend)
		d.notify("STATUS=serving")
	}
	return backendUp
}

// errProbeStuck is the probe's answer while an earlier probe has not
// returned.
var errProbeStuck = fmt.Errorf("%w: an earlier probe has not returned", kms.ErrUnavailable)

// probeBounded runs b.Probe, returning when ctx ends even if the backend
// does not (a TPM finishes the command it sent first). At most one such
// probe runs: while it has not returned, the backend counts as down.
func (d *Daemon) probeBounded(ctx context.Context, b kms.Backend) error {
	if !d.probing.CompareAndSwap(false, true) {
		return errProbeStuck
	}
	done := make(chan error, 1)
	go func() {
		defer d.probing.Store(false)
		done <- b.Probe(ctx)
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%w: no answer to a probe: %w", kms.ErrUnavailable, ctx.Err())
	}
}

// tenantTokens follows the tenants' own PKCS#11 tokens (kms.Router's
// ByTenant): up or not at the last probe, as keybroker_tenant_token_up.
type tenantTokens struct {
	mu   sync.Mutex
	down map[string]bool
	up   *prometheus.GaugeVec // nil: no tenant has its own token
}

// register adds keybroker_tenant_token_up, 1 for each tenant's token.
func (t *tenantTokens) register(reg prometheus.Registerer, tenants []string) {
	if len(tenants) == 0 {
		return
	}
	t.up = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "keybroker_tenant_token_up",
		Help: "Whether the last probe of a tenant's own PKCS#11 token succeeded (1) or not (0). Health and the systemd watchdog follow the shared token only.",
	}, []string{"tenant"})
	reg.MustRegister(t.up)
	for _, name := range tenants {
		t.up.WithLabelValues(name).Set(1)
	}
}

// probe probes tenant's own token b within pctx and records the result;
// nothing is recorded when ctx (the prober's) ended.
func (t *tenantTokens) probe(pctx, ctx context.Context, log *slog.Logger, tenant string, b kms.Backend) {
	err := b.Probe(pctx)
	if ctx.Err() != nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.down == nil {
		t.down = map[string]bool{}
	}
	was := t.down[tenant]
	t.down[tenant] = err != nil
	if t.up != nil {
		v := 1.0
		if err != nil {
			v = 0
		}
		t.up.WithLabelValues(tenant).Set(v)
	}
	switch {
	case !was && err != nil:
		log.Error("tenant's own PKCS#11 token unreachable; its calls fail, the other tenants are served", "tenant", tenant, "err", err)
	case was && err == nil:
		log.Info("tenant's own PKCS#11 token reachable again", "tenant", tenant)
	}
}

// Healthy reports whether the last backend probe succeeded.
func (d *Daemon) Healthy() bool { return d.healthy.Load() }

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
