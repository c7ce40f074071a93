// Package etcd is the metadata store on etcd, for several keybrokerd
// replicas that share one network HSM. Every write is one etcd
// transaction that compares the revisions it read: the key's own (so two
// replicas never both commit from one reading), each kid's (so a kid is
// never given to two versions) and, for the rotation leader's steps, the
// election key's (so a replica that lost its leadership cannot commit a
// step it started).
//
// Layout under the prefix:
//
//	keys/TENANT/NAME        a key's record (JSON, as internal/store encodes it)
//	kids/KID                the key version that owns KID, forever
//	intents/TENANT/HANDLE   a hardware object about to be generated (hex handle)
//	election/…              the rotation leader's election (internal/cluster)
//	replicas/ID             each live replica, on its lease (internal/cluster)
package etcd

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
)

// Config says where the store lives.
type Config struct {
	Endpoints   []string
	Prefix      string // e.g. "/keybroker/"; every key the store writes is under it
	DialTimeout time.Duration
	// RequestTimeout bounds each call to etcd, so that a call made while
	// etcd is unreachable fails (kms.ErrUnavailable) instead of waiting.
	RequestTimeout time.Duration
	TLS            *tls.Config
}

// Store is the etcd store.
type Store struct {
	c       *clientv3.Client
	prefix  string
	timeout time.Duration
	fence   atomic.Pointer[fence]
	owner   atomic.Pointer[owner]
}

// owner is the replica and its session's lease, put in each intent.
type owner struct {
	replica string
	lease   int64
}

// fence is the election key this replica holds while it leads.
type fence struct {
	key string
	rev int64
}

var _ store.Store = (*Store)(nil)

// Open connects to etcd. It does not wait for the cluster: the first call
// that needs it does (bounded by RequestTimeout).
func Open(cfg Config) (*Store, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("store: etcd: no endpoints")
	}
	if !strings.HasPrefix(cfg.Prefix, "/") || !strings.HasSuffix(cfg.Prefix, "/") {
		return nil, fmt.Errorf("store: etcd: prefix %q must start and end with /", cfg.Prefix)
	}
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: cfg.DialTimeout,
		TLS:         cfg.TLS,
		// Find a dead connection within a few seconds, not the default
		// minutes: a replica cut off must notice before its bound.
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		Logger:               zap.NewNop(),
		// Reconnect within a second of etcd coming back, not after
		// gRPC's default backoff of up to two minutes.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: time.Second,
		})},
	})
	if err != nil {
		return nil, fmt.Errorf("store: etcd: %w", err)
	}
	timeout := cfg.RequestTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	return &Store{c: c, prefix: cfg.Prefix, timeout: timeout}, nil
}

// Client is the store's etcd client, which the cluster's election, watch
// and presence share.
func (s *Store) Client() *clientv3.Client { return s.c }

// Prefix is the store's key prefix.
func (s *Store) Prefix() string { return s.prefix }

// Close closes the client.
func (s *Store) Close() error { return s.c.Close() }

// Lead makes fenced writes compare the election key: they commit only while
// key still exists at create revision rev (this replica's leadership).
func (s *Store) Lead(key string, rev int64) { s.fence.Store(&fence{key, rev}) }

// SetOwner names the replica and its live session lease in every intent it
// records from now on (see IntentLive).
func (s *Store) SetOwner(replica string, lease int64) { s.owner.Store(&owner{replica, lease}) }

// Follow makes every fenced write fail with store.ErrNotLeader.
func (s *Store) Follow() { s.fence.Store(nil) }

func (s *Store) keyPath(tenant, name string) string { return s.prefix + "keys/" + tenant + "/" + name }
func (s *Store) kidPath(kid string) string          { return s.prefix + "kids/" + kid }
func (s *Store) intentPath(tenant string, h kms.Handle) string {
	return s.prefix + "intents/" + tenant + "/" + hex.EncodeToString(h)
}

// KeysPrefix is where the records are, for a watch.
func (s *Store) KeysPrefix() string { return s.prefix + "keys/" }

// unavailable wraps an etcd failure: the caller may retry later.
func unavailable(op string, err error) error {
	return fmt.Errorf("store: etcd %s: %w: %w", op, kms.ErrUnavailable, err)
}

// CreateKey stores a new key; kms.ErrAlreadyExists if (tenant, name) is
// taken.
func (s *Store) CreateKey(ctx context.Context, k store.Key) (int64, error) {
	return s.write(ctx, k, true)
}

// UpdateKey replaces the key read at k.Rev.
func (s *Store) UpdateKey(ctx context.Context, k store.Key) (int64, error) {
	return s.write(ctx, k, false)
}

func (s *Store) write(ctx context.Context, k store.Key, create bool) (int64, error) {
	v, err := store.Encode(k)
	if err != nil {
		return 0, err
	}
	var f *fence
	if store.IsFenced(ctx) {
		if f = s.fence.Load(); f == nil {
			return 0, store.ErrNotLeader
		}
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	path := s.keyPath(k.Tenant, k.Name)
	cmps, puts, err := s.kidChecks(ctx, k)
	if err != nil {
		return 0, err
	}
	if create {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(path), "=", 0))
	} else {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(path), "=", k.Rev))
	}
	if f != nil {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(f.key), "=", f.rev))
	}
	puts = append(puts, clientv3.OpPut(path, string(v)))
	elseOps := []clientv3.Op{clientv3.OpGet(path)}
	if f != nil {
		elseOps = append(elseOps, clientv3.OpGet(f.key, clientv3.WithKeysOnly()))
	}
	var resp *clientv3.TxnResponse
	var lost error // an attempt that failed in flight: it may have been applied
	for {
		actx, cancel := s.attempt(ctx)
		resp, err = s.c.Txn(actx).If(cmps...).Then(puts...).Else(elseOps...).Commit()
		cancel()
		if err == nil {
			break
		}
		// Try again while there is time (a member that died under the
		// call): the compares keep a second attempt from applying if the
		// first one was, and the value read then tells.
		lost = err
		if !pause(ctx) {
			return s.settle(path, v, err)
		}
	}
	if resp.Succeeded {
		return resp.Header.Revision, nil
	}
	cur := resp.Responses[0].GetResponseRange().Kvs
	if lost != nil && len(cur) > 0 && bytes.Equal(cur[0].Value, v) {
		return cur[0].ModRevision, nil // the attempt that failed in flight was applied
	}
	// Why it failed, from the state it failed on.
	if f != nil {
		lead := resp.Responses[1].GetResponseRange().Kvs
		if len(lead) == 0 || lead[0].CreateRevision != f.rev {
			return 0, store.ErrNotLeader
		}
	}
	switch {
	case create && len(cur) > 0:
		return 0, kms.ErrAlreadyExists
	case !create && len(cur) == 0:
		return 0, kms.ErrNotFound
	case !create && cur[0].ModRevision != k.Rev:
		return 0, store.ErrConflict
	}
	// Only a kid changed between reading and writing: another writer
	// registered it. Reading it again says whose.
	if _, _, err := s.kidChecks(ctx, k); err != nil {
		return 0, err
	}
	return 0, store.ErrConflict
}

// pause waits a moment before an attempt is retried; false when ctx ends
// first.
func pause(ctx context.Context) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(100 * time.Millisecond):
		return true
	}
}

// attempt bounds one try of a write within the call's ctx: it fails at
// once on a member that has no leader (rather than waiting for an
// election), and after a third of the request timeout on one that hangs,
// so that the next try can reach another member.
func (s *Store) attempt(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout/3)
	return clientv3.WithRequireLeader(ctx), cancel
}

// retry runs an idempotent write until it succeeds or ctx ends (the etcd
// client retries reads by itself, not writes that failed in flight).
func (s *Store) retry(ctx context.Context, call func(context.Context) error) error {
	for {
		actx, cancel := s.attempt(ctx)
		err := call(actx)
		cancel()
		if err == nil || !pause(ctx) {
			return err
		}
	}
}

// settle decides a write whose transaction failed in flight: if the record
// at path now holds exactly what was written, it committed. Otherwise the
// write may still be applied later: store.ErrUncertain.
func (s *Store) settle(path string, v []byte, txnErr error) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	resp, err := s.c.Get(ctx, path)
	if err == nil && len(resp.Kvs) == 1 && bytes.Equal(resp.Kvs[0].Value, v) {
		return resp.Kvs[0].ModRevision, nil
	}
	return 0, fmt.Errorf("%w: %w", store.ErrUncertain, unavailable("write", txnErr))
}

// kidChecks reads the kid registry for k's kids. It returns the compares
// that keep what it read true until the write commits, and the puts that
// register the kids not yet registered; store.ErrKidReused if one belongs
// to another version.
func (s *Store) kidChecks(ctx context.Context, k store.Key) ([]clientv3.Cmp, []clientv3.Op, error) {
	gets := make([]clientv3.Op, len(k.Versions))
	for i, v := range k.Versions {
		gets[i] = clientv3.OpGet(s.kidPath(v.Kid))
	}
	var resp *clientv3.TxnResponse
	err := s.retry(ctx, func(ctx context.Context) error {
		var err error
		resp, err = s.c.Txn(ctx).Then(gets...).Commit()
		return err
	})
	if err != nil {
		return nil, nil, unavailable("read kids", err)
	}
	var cmps []clientv3.Cmp
	var puts []clientv3.Op
	seen := map[string]bool{}
	for i, v := range k.Versions {
		path, owner := s.kidPath(v.Kid), store.KidOwner(k, v)
		if seen[v.Kid] {
			return nil, nil, fmt.Errorf("%w: %s", store.ErrKidReused, v.Kid)
		}
		seen[v.Kid] = true
		kvs := resp.Responses[i].GetResponseRange().Kvs
		switch {
		case len(kvs) == 0:
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(path), "=", 0))
			puts = append(puts, clientv3.OpPut(path, string(owner)))
		case bytes.Equal(kvs[0].Value, owner):
			cmps = append(cmps, clientv3.Compare(clientv3.Value(path), "=", string(owner)))
		default:
			return nil, nil, fmt.Errorf("%w: %s", store.ErrKidReused, v.Kid)
		}
	}
	return cmps, puts, nil
}

// Keys returns every stored key, ordered by tenant and name.
func (s *Store) Keys(ctx context.Context) ([]store.Key, error) {
	keys, _, err := s.KeysSince(ctx, 0)
	return keys, err
}

// KeysSince returns the keys modified after revision rev (all of them for
// 0), ordered by tenant and name, and the revision they were read at: a
// linearizable read, so every change committed before the call is in it.
func (s *Store) KeysSince(ctx context.Context, rev int64) ([]store.Key, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	opts := []clientv3.OpOption{clientv3.WithPrefix()}
	if rev > 0 {
		opts = append(opts, clientv3.WithMinModRev(rev+1))
	}
	resp, err := s.c.Get(ctx, s.KeysPrefix(), opts...)
	if err != nil {
		return nil, 0, unavailable("read keys", err)
	}
	keys := make([]store.Key, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		k, err := s.decode(kv.Key, kv.Value, kv.ModRevision)
		if err != nil {
			return nil, 0, err
		}
		keys = append(keys, k)
	}
	SortKeys(keys)
	return keys, resp.Header.Revision, nil
}

// SortKeys orders keys by tenant, then name.
func SortKeys(keys []store.Key) {
	slices.SortFunc(keys, func(a, b store.Key) int {
		if c := strings.Compare(a.Tenant, b.Tenant); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
}

// Decode reads a record from a watch event.
func (s *Store) Decode(path, v []byte, rev int64) (store.Key, error) { return s.decode(path, v, rev) }

func (s *Store) decode(path, v []byte, rev int64) (store.Key, error) {
	k, err := store.Decode(v)
	if err != nil {
		return store.Key{}, fmt.Errorf("store: record %q: %w", strings.TrimPrefix(string(path), s.KeysPrefix()), err)
	}
	k.Rev = rev
	return k, nil
}

// Key returns one key; kms.ErrNotFound if there is none.
func (s *Store) Key(ctx context.Context, tenant, name string) (store.Key, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	resp, err := s.c.Get(ctx, s.keyPath(tenant, name))
	if err != nil {
		return store.Key{}, unavailable("read key", err)
	}
	if len(resp.Kvs) == 0 {
		return store.Key{}, kms.ErrNotFound
	}
	kv := resp.Kvs[0]
	return s.decode(kv.Key, kv.Value, kv.ModRevision)
}

// PutIntent records in; it stays until deleted, whatever happens to its
// owner (its Lease tells Reconcile whether the owner still lives).
func (s *Store) PutIntent(ctx context.Context, in store.Intent) error {
	o := s.owner.Load()
	if o == nil || o.lease == 0 {
		// Without a live lease to show it is in progress, the leader
		// could settle the intent while the object is being made.
		return fmt.Errorf("store: etcd: no session yet: %w", kms.ErrUnavailable)
	}
	in.Owner, in.Lease = o.replica, o.lease
	v, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("store: encode intent: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	err = s.retry(ctx, func(ctx context.Context) error {
		_, err := s.c.Put(ctx, s.intentPath(in.Tenant, in.Handle), string(v))
		return err
	})
	if err != nil {
		return unavailable("record intent", err)
	}
	return nil
}

// DeleteIntent removes the intent for (tenant, h), if there is one.
func (s *Store) DeleteIntent(ctx context.Context, tenant string, h kms.Handle) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	err := s.retry(ctx, func(ctx context.Context) error {
		_, err := s.c.Delete(ctx, s.intentPath(tenant, h))
		return err
	})
	if err != nil {
		return unavailable("delete intent", err)
	}
	return nil
}

// Intents returns every intent recorded.
func (s *Store) Intents(ctx context.Context) ([]store.Intent, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	resp, err := s.c.Get(ctx, s.prefix+"intents/", clientv3.WithPrefix())
	if err != nil {
		return nil, unavailable("read intents", err)
	}
	out := make([]store.Intent, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var in store.Intent
		if err := json.Unmarshal(kv.Value, &in); err != nil {
			return nil, fmt.Errorf("store: intent %q: %w", kv.Key, err)
		}
		out = append(out, in)
	}
	return out, nil
}

// IntentLive reports whether in's owner's lease is still granted.
func (s *Store) IntentLive(ctx context.Context, in store.Intent) (bool, error) {
	return s.LeaseAlive(ctx, in.Lease)
}

// LeaseAlive reports whether an etcd lease is still granted: an intent
// whose owner's lease lives is work in progress.
func (s *Store) LeaseAlive(ctx context.Context, lease int64) (bool, error) {
	if lease == 0 {
		return false, nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	resp, err := s.c.TimeToLive(ctx, clientv3.LeaseID(lease))
	if err != nil {
		return false, unavailable("lease", err)
	}
	return resp.TTL > 0, nil
}

// IsEmpty reports whether nothing is stored under the prefix, for a
// migration that must not merge into another store.
func (s *Store) IsEmpty(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	resp, err := s.c.Get(ctx, s.prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return false, unavailable("read", err)
	}
	return resp.Count == 0, nil
}
