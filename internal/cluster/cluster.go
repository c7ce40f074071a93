// Package cluster runs one keybrokerd replica among several that share an
// etcd store and a network HSM: it keeps the replica's in-memory keyring
// in step with etcd (a watch for speed, a linearizable read for proof),
// bounds how stale it may serve, and elects the one replica that runs the
// rotation scheduler and reconciliation.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/internal/store/etcd"
	"github.com/keybroker/keybroker/kms"
)

// Applier takes records read from the store: the keyring.
type Applier interface {
	Apply(rec store.Key) error
}

// Options configure a replica.
type Options struct {
	Store   *etcd.Store
	Ring    Applier
	Replica string
	// LeaseTTL is the session lease (presence, leadership).
	LeaseTTL time.Duration
	// MaxStaleness bounds how long after its last confirmed sync the
	// replica serves from memory.
	MaxStaleness time.Duration
	// Lead runs while this replica leads, with a context that ends when
	// it stops leading (its writes should be store.Fenced).
	Lead func(ctx context.Context)
	Log  *slog.Logger
}

// Cluster is this replica's membership.
type Cluster struct {
	o      Options
	cancel context.CancelFunc
	done   sync.WaitGroup

	mu      sync.Mutex
	applied int64 // the store revision the keyring is known to hold all changes up to

	lastSync      atomic.Int64 // unix nanos of the start of the last confirmed sync
	leading       atomic.Bool
	watchRestarts atomic.Int64
	leaderChanges atomic.Int64
	fresh         atomic.Bool // last answer of Fresh, to log changes once
}

// ReasonStale is the ErrorInfo reason of a refusal by a replica past its
// staleness bound.
const ReasonStale = "REPLICA_OUT_OF_SYNC"

// syncInterval is how often a replica proves it holds every change: a
// linearizable read of what changed since it last looked.
func (c *Cluster) syncInterval() time.Duration {
	return min(max(c.o.MaxStaleness/8, 100*time.Millisecond), time.Second)
}

// Start reads every record from etcd into the keyring (a first confirmed
// sync: it fails when etcd cannot be reached), then keeps it in step and
// campaigns for leader until Close.
func Start(ctx context.Context, o Options) (*Cluster, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	c := &Cluster{o: o}
	start := time.Now()
	keys, rev, err := o.Store.KeysSince(ctx, 0)
	if err != nil {
		return nil, err
	}
	c.apply(keys, rev)
	c.lastSync.Store(start.UnixNano())
	c.fresh.Store(true)
	run, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	c.done.Add(3)
	go func() { defer c.done.Done(); c.watch(run) }()
	go func() { defer c.done.Done(); c.syncLoop(run) }()
	go func() { defer c.done.Done(); c.session(run) }()
	return c, nil
}

// Close stops watching and resigns.
func (c *Cluster) Close() {
	c.cancel()
	c.done.Wait()
}

// Fresh is nil while the last confirmed sync is within MaxStaleness, and
// kms.ErrUnavailable after.
func (c *Cluster) Fresh() error {
	age := time.Since(time.Unix(0, c.lastSync.Load()))
	ok := age <= c.o.MaxStaleness
	// Sign asks on every call: write the flag only when it changes, so
	// that concurrent calls do not contend on it.
	if c.fresh.Load() != ok && c.fresh.CompareAndSwap(!ok, ok) {
		if ok {
			c.o.Log.Info("in step with etcd again: serving")
		} else {
			c.o.Log.Error("cut off from etcd for longer than store.max_staleness: refusing until it is back", "last_sync_age", age.Round(time.Millisecond))
		}
	}
	if !ok {
		return &kms.ClientError{Kind: kms.ErrUnavailable, Reason: ReasonStale,
			Msg: fmt.Sprintf("replica %s has been out of touch with the cluster's store for %v (store.max_staleness %v); retry, or use another replica",
				c.o.Replica, age.Round(time.Second), c.o.MaxStaleness)}
	}
	return nil
}

// SyncAge is the time since the last confirmed sync.
func (c *Cluster) SyncAge() time.Duration { return time.Since(time.Unix(0, c.lastSync.Load())) }

// Leading reports whether this replica leads now.
func (c *Cluster) Leading() bool { return c.leading.Load() }

// WatchRestarts counts the watch streams started again after a failure.
func (c *Cluster) WatchRestarts() int64 { return c.watchRestarts.Load() }

// LeaderChanges counts the times this replica became or stopped being the
// leader.
func (c *Cluster) LeaderChanges() int64 { return c.leaderChanges.Load() }

// apply publishes records and advances applied to rev.
func (c *Cluster) apply(keys []store.Key, rev int64) {
	for _, k := range keys {
		if err := c.o.Ring.Apply(k); err != nil {
			c.o.Log.Error("a record from etcd cannot be used; keeping the previous one", "tenant", k.Tenant, "key", k.Name, "err", err)
		}
	}
	c.mu.Lock()
	c.applied = max(c.applied, rev)
	c.mu.Unlock()
}

func (c *Cluster) appliedRev() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.applied
}

// syncLoop proves freshness: each linearizable read returns every record
// changed after the revision already applied, so once it is applied the
// keyring holds every change committed before the read began.
func (c *Cluster) syncLoop(ctx context.Context) {
	t := time.NewTicker(c.syncInterval())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		keys, rev, err := c.o.Store.KeysSince(ctx, c.appliedRev())
		if err != nil {
			if ctx.Err() == nil {
				c.o.Log.Debug("sync with etcd", "err", err)
			}
			continue
		}
		c.apply(keys, rev)
		c.lastSync.Store(start.UnixNano())
	}
}

// watch applies changes as etcd reports them (within milliseconds, where
// the sync loop would take up to its interval), starting again from the
// last applied revision after any failure.
func (c *Cluster) watch(ctx context.Context) {
	for first := true; ctx.Err() == nil; first = false {
		if !first {
			c.watchRestarts.Add(1)
			select {
			case <-ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
		from := c.appliedRev() + 1
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		ch := c.o.Store.Client().Watch(wctx, c.o.Store.KeysPrefix(), clientv3.WithPrefix(), clientv3.WithRev(from))
		for resp := range ch {
			if err := resp.Err(); err != nil {
				if !errors.Is(err, context.Canceled) {
					c.o.Log.Warn("etcd watch ended; starting again", "err", err)
				}
				break
			}
			var keys []store.Key
			for _, ev := range resp.Events {
				if ev.Type != clientv3.EventTypePut {
					continue // records are never deleted
				}
				k, err := c.o.Store.Decode(ev.Kv.Key, ev.Kv.Value, ev.Kv.ModRevision)
				if err != nil {
					c.o.Log.Error("a record from etcd cannot be read", "err", err)
					continue
				}
				keys = append(keys, k)
			}
			// Events up to the response's revision are all delivered;
			// not a proof of freshness (the sync loop is), but progress.
			c.apply(keys, resp.Header.Revision)
		}
		cancel()
	}
}

// session keeps a lease while the replica lives: its presence under
// replicas/, the owner of its intents, and its candidacy for leader. A
// lost lease (etcd unreachable for longer than the TTL, or the process
// paused) ends leadership at once and starts a new session.
func (c *Cluster) session(ctx context.Context) {
	ttl := int(c.o.LeaseTTL / time.Second)
	for ctx.Err() == nil {
		sess, err := concurrency.NewSession(c.o.Store.Client(), concurrency.WithTTL(ttl), concurrency.WithContext(ctx))
		if err != nil {
			c.o.Log.Debug("etcd session", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(500 * time.Millisecond):
			}
			continue
		}
		c.runSession(ctx, sess)
		sess.Close()
	}
}

func (c *Cluster) runSession(ctx context.Context, sess *concurrency.Session) {
	lease := sess.Lease()
	c.o.Store.SetOwner(c.o.Replica, int64(lease))
	pctx, cancel := context.WithTimeout(ctx, c.o.LeaseTTL)
	_, err := c.o.Store.Client().Put(pctx, c.o.Store.Prefix()+"replicas/"+c.o.Replica, time.Now().UTC().Format(time.RFC3339), clientv3.WithLease(lease))
	cancel()
	if err != nil {
		c.o.Log.Debug("etcd presence", "err", err)
		return
	}
	c.o.Log.Info("joined the cluster", "replica", c.o.Replica, "lease_ttl", c.o.LeaseTTL)
	e := concurrency.NewElection(sess, ElectionPrefix(c.o.Store))
	cctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		select {
		case <-sess.Done():
		case <-cctx.Done():
		}
		stop()
	}()
	// Campaign, when its ctx ends, resigns on the client's own context,
	// which hangs while etcd is unreachable: wait for it only while ours
	// lives (closing the client ends it).
	won := make(chan error, 1)
	go func() { won <- e.Campaign(cctx, c.o.Replica) }()
	select {
	case err := <-won:
		if err != nil {
			return // the session ended or we are closing
		}
	case <-cctx.Done():
		return
	}
	// Campaign can return after the lease is gone (a pause); the fence
	// compares the election key, so a stale win commits nothing.
	c.o.Store.Lead(e.Key(), e.Rev())
	c.leading.Store(true)
	c.leaderChanges.Add(1)
	c.o.Log.Info("leading: running the rotation scheduler and reconciliation", "replica", c.o.Replica)
	lctx, endLead := context.WithCancel(cctx)
	leadDone := make(chan struct{})
	go func() { defer close(leadDone); c.o.Lead(lctx) }()
	<-cctx.Done()
	c.o.Store.Follow()
	c.leading.Store(false)
	c.leaderChanges.Add(1)
	endLead()
	<-leadDone
	if ctx.Err() == nil {
		c.o.Log.Warn("lost the leadership (etcd session ended)", "replica", c.o.Replica)
	} else {
		rctx, cancel := context.WithTimeout(context.Background(), time.Second)
		e.Resign(rctx)
		cancel()
	}
}

// ElectionPrefix is where the rotation leader is elected.
func ElectionPrefix(s *etcd.Store) string { return s.Prefix() + "election/" }

// Status is the cluster as one replica sees it.
type Status struct {
	Replica  string
	Leader   string // "" when there is none
	Leading  bool
	Replicas []string // with a live session
	SyncAge  time.Duration
	Fresh    bool
	// Endpoints, each with its error ("" when healthy).
	Endpoints map[string]string
}

// Status asks etcd for the leader, the live replicas and each endpoint's
// health.
func (c *Cluster) Status(ctx context.Context) Status {
	st := Status{Replica: c.o.Replica, Leading: c.Leading(), SyncAge: c.SyncAge(), Fresh: c.Fresh() == nil, Endpoints: map[string]string{}}
	cl := c.o.Store.Client()
	qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if resp, err := cl.Get(qctx, ElectionPrefix(c.o.Store), clientv3.WithFirstCreate()...); err == nil && len(resp.Kvs) > 0 {
		st.Leader = string(resp.Kvs[0].Value)
	}
	rp := c.o.Store.Prefix() + "replicas/"
	if resp, err := cl.Get(qctx, rp, clientv3.WithPrefix(), clientv3.WithKeysOnly()); err == nil {
		for _, kv := range resp.Kvs {
			st.Replicas = append(st.Replicas, string(kv.Key[len(rp):]))
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, ep := range cl.Endpoints() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := cl.Status(qctx, ep)
			mu.Lock()
			defer mu.Unlock()
			st.Endpoints[ep] = ""
			if err != nil {
				st.Endpoints[ep] = "unreachable"
			}
		}()
	}
	wg.Wait()
	return st
}
