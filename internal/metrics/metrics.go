// Package metrics is keybrokerd's Prometheus instrumentation: per-RPC
// counts and latencies, backend health, key versions by state, rotation
// schedule and counters, audit write failures. Every label has a bounded
// set of values: the tenant label is one of the configured tenants or
// "unknown". Only the daemon's wiring imports it; the server reports calls
// through its Observer interface, which *Metrics implements.
package metrics

import (
	"net/http"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/codes"

	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
)

// UnknownTenant is the tenant label of callers that are not (or no
// longer) mapped to a configured tenant.
const UnknownTenant = "unknown"

// MaxKeySeries bounds the per-key series (next rotation time): the keys
// rotating soonest are exported, the rest only count towards the earliest.
const MaxKeySeries = 1000

// Keys is what the metrics read from the keyring at scrape time.
type Keys interface {
	// Stats returns the rotation counters and each key's next rotation.
	Stats() keyring.Stats
	// VersionStates counts key versions by state.
	VersionStates() map[kms.State]int
}

// Metrics holds the daemon's collectors in its own registry.
type Metrics struct {
	reg           *prometheus.Registry
	rpcs          *prometheus.CounterVec
	rpcLatency    *prometheus.HistogramVec
	backendUp     prometheus.Gauge
	probeLatency  prometheus.Histogram
	probeFailures prometheus.Counter
	auditFailures prometheus.Counter
	hookAttempts  *prometheus.CounterVec
	hookFailures  *prometheus.CounterVec
	hookDropped   *prometheus.CounterVec
	tenants       atomic.Pointer[map[string]bool]
	keys          Keys
}

// New registers every collector; keys may be nil (no key metrics).
func New(keys Keys, tenants []string) *Metrics {
	m := &Metrics{
		reg:  prometheus.NewRegistry(),
		keys: keys,
		rpcs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keybroker_rpc_requests_total",
			Help: "keybroker.v1 calls answered, by method, gRPC code and tenant.",
		}, []string{"method", "code", "tenant"}),
		rpcLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "keybroker_rpc_duration_seconds",
			Help: "Latency of keybroker.v1 calls, including the audit record, by method, gRPC code and tenant.",
			// 0.5 ms .. ~16 s: a SoftHSM2 ES256 sign is well under a
			// millisecond, an RSA-3072 generation on a TPM several seconds.
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"method", "code", "tenant"}),
		backendUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keybroker_backend_up",
			Help: "1 when the last probe of the HSM or TPM succeeded, else 0.",
		}),
		probeLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "keybroker_backend_probe_duration_seconds",
			Help:    "Latency of the backend liveness probe.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		probeFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keybroker_backend_probe_failures_total",
			Help: "Backend liveness probes that failed.",
		}),
		auditFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keybroker_audit_write_failures_total",
			Help: "Audit records not made durable in time (the call was answered UNAVAILABLE).",
		}),
		// Hook runs by event name (a fixed set: keyring.EventKinds).
		hookAttempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keybroker_hook_attempts_total",
			Help: "Hook program runs, by event.",
		}, []string{"event"}),
		hookFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keybroker_hook_failures_total",
			Help: "Hook program runs that did not exit 0 within their timeout, by event.",
		}, []string{"event"}),
		hookDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keybroker_hook_dropped_total",
			Help: "Events not delivered to a hook because its queue was full, by event.",
		}, []string{"event"}),
	}
	m.SetTenants(tenants)
	m.reg.MustRegister(m.hookAttempts, m.hookFailures, m.hookDropped)
	m.reg.MustRegister(m.rpcs, m.rpcLatency, m.backendUp, m.probeLatency, m.probeFailures, m.auditFailures,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if keys != nil {
		m.reg.MustRegister(keyCollector{m})
	}
	return m
}

// SetTenants sets the tenants that get their own label value (at start and
// on reload); any other is counted as "unknown".
func (m *Metrics) SetTenants(names []string) {
	set := make(map[string]bool, len(names))
	for _, n := range names {
		set[n] = true
	}
	m.tenants.Store(&set)
}

func (m *Metrics) tenant(t string) string {
	if (*m.tenants.Load())[t] {
		return t
	}
	return UnknownTenant
}

// ObserveRPC implements server.Observer.
func (m *Metrics) ObserveRPC(method, tenant string, code codes.Code, latency time.Duration) {
	l := prometheus.Labels{"method": method, "code": code.String(), "tenant": m.tenant(tenant)}
	m.rpcs.With(l).Inc()
	m.rpcLatency.With(l).Observe(latency.Seconds())
}

// AuditWriteFailed implements server.Observer.
func (m *Metrics) AuditWriteFailed() { m.auditFailures.Inc() }

// HookAttempt counts one hook run (hooks.Observer).
func (m *Metrics) HookAttempt(event string, ok bool) {
	m.hookAttempts.WithLabelValues(event).Inc()
	if !ok {
		m.hookFailures.WithLabelValues(event).Inc()
	}
}

// HookDropped counts an event a full hook queue did not take.
func (m *Metrics) HookDropped(event string) { m.hookDropped.WithLabelValues(event).Inc() }

// ObserveProbe records one backend probe.
func (m *Metrics) ObserveProbe(latency time.Duration, err error) {
	m.probeLatency.Observe(latency.Seconds())
	if err != nil {
		m.backendUp.Set(0)
		m.probeFailures.Inc()
		return
	}
	m.backendUp.Set(1)
}

// Handler serves the registry in the Prometheus exposition formats.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// Registry is the registry the collectors are in (tests, extra collectors).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// keyCollector reads the keyring at scrape time.
type keyCollector struct{ m *Metrics }

var (
	versionsDesc = prometheus.NewDesc("keybroker_key_versions",
		"Key versions by state, over every tenant.", []string{"state"}, nil)
	nextRotationDesc = prometheus.NewDesc("keybroker_key_next_rotation_timestamp_seconds",
		"When the key's next version becomes ACTIVE (Unix time); the soonest keys only, see keybroker_key_next_rotation_earliest_timestamp_seconds.",
		[]string{"tenant", "key"}, nil)
	earliestDesc = prometheus.NewDesc("keybroker_key_next_rotation_earliest_timestamp_seconds",
		"The earliest next rotation over every key (Unix time).", nil, nil)
	rotationsDesc = prometheus.NewDesc("keybroker_rotations_total",
		"Key versions that became ACTIVE through rotation since the daemon started.", nil, nil)
	rotationFailuresDesc = prometheus.NewDesc("keybroker_rotation_failures_total",
		"Rotation transitions that failed (each is retried at the next check) since the daemon started.", nil, nil)
)

// states are the states reported, so every series exists from the start.
var states = []kms.State{kms.StatePending, kms.StateActive, kms.StateRetired,
	kms.StateExpired, kms.StateDestroyed, kms.StateRevoked}

func (c keyCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{versionsDesc, nextRotationDesc, earliestDesc, rotationsDesc, rotationFailuresDesc} {
		ch <- d
	}
}

func (c keyCollector) Collect(ch chan<- prometheus.Metric) {
	counts := c.m.keys.VersionStates()
	for _, s := range states {
		ch <- prometheus.MustNewConstMetric(versionsDesc, prometheus.GaugeValue, float64(counts[s]), s.String())
	}
	st := c.m.keys.Stats()
	ch <- prometheus.MustNewConstMetric(rotationsDesc, prometheus.CounterValue, float64(st.Rotations))
	ch <- prometheus.MustNewConstMetric(rotationFailuresDesc, prometheus.CounterValue, float64(st.RotationFailures))

	type next struct {
		tenant, key string
		at          time.Time
	}
	var keys []next
	for id, at := range st.NextRotation {
		if at.IsZero() {
			continue // nothing scheduled (e.g. every version revoked)
		}
		tenant, name, _ := strings.Cut(id, "/")
		keys = append(keys, next{tenant, name, at})
	}
	if len(keys) == 0 {
		return
	}
	sort.Slice(keys, func(i, j int) bool {
		if !keys[i].at.Equal(keys[j].at) {
			return keys[i].at.Before(keys[j].at)
		}
		return keys[i].tenant+"/"+keys[i].key < keys[j].tenant+"/"+keys[j].key
	})
	ch <- prometheus.MustNewConstMetric(earliestDesc, prometheus.GaugeValue, unix(keys[0].at))
	n := 0
	for _, k := range keys {
		if n == MaxKeySeries {
			break
		}
		if c.m.tenant(k.tenant) == UnknownTenant {
			continue // a tenant no longer configured: not a label value
		}
		ch <- prometheus.MustNewConstMetric(nextRotationDesc, prometheus.GaugeValue, unix(k.at), k.tenant, k.key)
		n++
	}
}

func unix(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }
