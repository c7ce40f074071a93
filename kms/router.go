package kms

import (
	"context"
	"crypto"
	"errors"
	"fmt"
)

// Router is a Backend that sends each partition to its own backend (a
// tenant's own PKCS#11 token) or to the shared one.
type Router struct {
	Shared   Backend
	ByTenant map[string]Backend
}

var _ Backend = (*Router)(nil)

func (r *Router) pick(p Partition) Backend {
	if b, ok := r.ByTenant[p.Tenant]; ok {
		return b
	}
	return r.Shared
}

func (r *Router) Generate(ctx context.Context, p Partition, spec KeySpec) (Handle, crypto.PublicKey, error) {
	return r.pick(p).Generate(ctx, p, spec)
}

func (r *Router) Sign(ctx context.Context, p Partition, h Handle, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return r.pick(p).Sign(ctx, p, h, digest, opts)
}

func (r *Router) Destroy(ctx context.Context, p Partition, h Handle) error {
	return r.pick(p).Destroy(ctx, p, h)
}

// Probe probes every backend.
func (r *Router) Probe(ctx context.Context) error {
	err := r.Shared.Probe(ctx)
	for _, b := range r.ByTenant {
		err = errors.Join(err, b.Probe(ctx))
	}
	return err
}

// Close closes every backend.
func (r *Router) Close() error {
	err := r.Shared.Close()
	for _, b := range r.ByTenant {
		err = errors.Join(err, b.Close())
	}
	return err
}

// ListSkipped is List's error when a tenant's own backend could not list
// its objects because it is unavailable (a token not plugged in): the
// objects of the others are returned with it, and the records of the
// tenants skipped must be left as they are.
type ListSkipped struct {
	Tenants []string
	Err     error
}

func (e *ListSkipped) Error() string {
	return fmt.Sprintf("tenants' own backends not listed: %v: %v", e.Tenants, e.Err)
}

func (e *ListSkipped) Unwrap() error { return e.Err }

// List lists every backend that can, reporting an object only where it is
// served: an object on the shared token labelled with a tenant that has its
// own token (or the reverse) is reported under a partition that routes back
// to the backend holding it, so that Reconcile can remove it there. A
// tenant's own backend that is unavailable is skipped (see ListSkipped).
func (r *Router) List(ctx context.Context) ([]Object, error) {
	var all []Object
	add := func(b Backend, own string) error {
		l, ok := b.(Lister)
		if !ok {
			return nil
		}
		objs, err := l.List(ctx)
		if err != nil {
			return err
		}
		for _, o := range objs {
			if r.pick(o.Partition) != b {
				// Misplaced: keep it addressable on the backend holding it.
				o.Partition = Partition{Tenant: own}
			}
			all = append(all, o)
		}
		return nil
	}
	if err := add(r.Shared, ""); err != nil {
		return nil, err
	}
	var skipped *ListSkipped
	for tenant, b := range r.ByTenant {
		err := add(b, tenant)
		if errors.Is(err, ErrUnavailable) {
			if skipped == nil {
				skipped = &ListSkipped{}
			}
			skipped.Tenants = append(skipped.Tenants, tenant)
			skipped.Err = errors.Join(skipped.Err, err)
			continue
		}
		if err != nil {
			return nil, err
		}
	}
	if skipped != nil {
		return all, skipped
	}
	return all, nil
}

// SessionsInUse sums the sessions in use of the backends that report them.
func (r *Router) SessionsInUse() int {
	n := 0
	for _, b := range append([]Backend{r.Shared}, values(r.ByTenant)...) {
		if s, ok := b.(SessionCounter); ok {
			n += s.SessionsInUse()
		}
	}
	return n
}

func values(m map[string]Backend) []Backend {
	out := make([]Backend, 0, len(m))
	for _, b := range m {
		out = append(out, b)
	}
	return out
}
