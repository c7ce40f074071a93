package daemon

// Several replicas: the etcd store, this replica's cluster membership, and
// the rotation work that only the leader does.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keybroker/keybroker/internal/cluster"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/internal/store/etcd"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/rotation"
)

// openStore opens the configured metadata store; the etcd one is also
// returned as such (nil for bbolt).
func openStore(cfg config.Config) (store.Store, *etcd.Store, error) {
	if cfg.Store.Backend != "etcd" {
		s, err := store.Open(filepath.Join(cfg.StateDir, "keybroker.db"))
		if err != nil {
			return nil, nil, err
		}
		return s, nil, nil
	}
	tlsCfg, err := etcdTLS(cfg.Store.TLS)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: store.tls: %w", ErrConfig, err)
	}
	s, err := etcd.Open(etcd.Config{Endpoints: cfg.Store.Endpoints, Prefix: cfg.Store.Prefix, DialTimeout: cfg.Store.DialTimeout,
		RequestTimeout: cfg.Store.RequestTimeout, TLS: tlsCfg})
	if err != nil {
		return nil, nil, err
	}
	return s, s, nil
}

// etcdTLS is the client TLS configuration for etcd, nil when none is set.
func etcdTLS(t config.StoreTLS) (*tls.Config, error) {
	if t == (config.StoreTLS{}) {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, err
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_file %s: no PEM certificate", t.CAFile)
		}
	}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, err
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// ReplicaID is store.replica, or else this host's name in the form
// replica ids take (lower case; any other character a '-').
func ReplicaID(cfg config.Config) string {
	if cfg.Store.Replica != "" {
		return cfg.Store.Replica
	}
	h, _ := os.Hostname()
	return hostReplicaID(h)
}

// hostReplicaID makes a replica id of host name h.
func hostReplicaID(h string) string {
	id := []byte(strings.ToLower(h))
	for i, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || i > 0 && (c == '.' || c == '_' || c == '-')) {
			id[i] = '-'
		}
	}
	if len(id) > kms.MaxNameLen {
		id = id[:kms.MaxNameLen]
	}
	if kms.ValidateName(string(id)) != nil {
		return "replica" // no usable host name: set store.replica
	}
	return string(id)
}

// joinCluster starts this replica's membership: in step with etcd, and
// running rotation while it leads.
func (d *Daemon) joinCluster(ctx context.Context) error {
	c, err := cluster.Start(ctx, cluster.Options{Store: d.etcd, Ring: d.ring, Replica: ReplicaID(d.cfg),
		LeaseTTL: d.cfg.Store.LeaseTTL, MaxStaleness: d.cfg.Store.MaxStaleness, Lead: d.lead, Log: d.log})
	if err != nil {
		return fmt.Errorf("joining the cluster: %w", err)
	}
	d.cluster.Store(c)
	reg := d.metrics.Registry()
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "keybroker_cluster_leader",
			Help: "1 while this replica is the rotation leader."}, func() float64 {
			if c.Leading() {
				return 1
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "keybroker_cluster_sync_age_seconds",
			Help: "Time since this replica last proved it holds every change committed to etcd."},
			func() float64 { return c.SyncAge().Seconds() }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "keybroker_cluster_watch_restarts_total",
			Help: "etcd watch streams started again after a failure."}, func() float64 { return float64(c.WatchRestarts()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "keybroker_cluster_leader_changes_total",
			Help: "Times this replica became or stopped being the rotation leader."}, func() float64 { return float64(c.LeaderChanges()) }),
	)
	return nil
}

// fresh is nil unless this replica is cut off from etcd past its bound.
func (d *Daemon) fresh() error {
	if c := d.cluster.Load(); c != nil {
		return c.Fresh()
	}
	return nil
}

// lead is the leader's work, until ctx ends with its leadership: settle
// what a crash left (as at a single daemon's start), then the rotation
// scheduler. Every commit is fenced: it fails once this replica has lost
// the lead, even if it has not noticed yet.
func (d *Daemon) lead(ctx context.Context) {
	ctx = store.Fenced(ctx)
	rctx, cancel := context.WithTimeout(ctx, d.cfg.Limits.CallTimeout)
	if _, err := d.ring.Reconcile(rctx); err != nil && ctx.Err() == nil {
		d.log.Error("reconcile hardware and records; retrying at the next tick", "err", err)
	}
	cancel()
	sched := rotation.Scheduler{Clock: rotation.SystemClock{}, Advancer: leaderTick{d}, Interval: d.cfg.Rotation.CheckInterval, Log: d.log}
	sched.Run(ctx)
}

// leaderTick is the leader's scheduler step: intents left by a replica
// that died mid-creation are settled, then due transitions applied.
type leaderTick struct{ d *Daemon }

func (t leaderTick) Advance(ctx context.Context, now time.Time) error {
	d := t.d
	if ins, err := d.store.Intents(ctx); err == nil && len(ins) > 0 {
		rctx, cancel := context.WithTimeout(ctx, d.cfg.Limits.CallTimeout)
		_, err := d.ring.Reconcile(rctx)
		cancel()
		if err != nil && !errors.Is(err, context.Canceled) {
			d.log.Warn("reconcile hardware and records", "err", err)
		}
	}
	return d.ring.Advance(ctx, now)
}
