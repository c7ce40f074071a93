package hsm

// Session slots: how many calls are in the hardware, and how a call that
// the hardware does not answer is bounded.

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/keybroker/keybroker/kms"
)

// SessionsInUse is how many PKCS#11 sessions calls hold right now (for
// the metrics endpoint).
func (b *Backend) SessionsInUse() int { return int(b.inUse.Load()) }

// bounded runs f, but returns when ctx ends even if the hardware does not
// answer (the call finishes later on its own goroutine). abandoned counts
// such calls while they are still running.
func bounded[T any](ctx context.Context, abandoned *atomic.Int64, f func() (T, error)) (T, error) {
	if ctx.Done() == nil {
		return f()
	}
	type result struct {
		v   T
		err error
	}
	const running, returned, left = 0, 1, 2
	var state atomic.Int32
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		if !state.CompareAndSwap(running, returned) {
			abandoned.Add(-1)
		}
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		if !state.CompareAndSwap(running, left) {
			r := <-ch // it returned meanwhile
			return r.v, r.err
		}
		abandoned.Add(1)
		var zero T
		return zero, fmt.Errorf("hsm: no answer from the token: %w (%w)", kms.ErrUnavailable, ctx.Err())
	}
}

// acquire takes a session slot, waiting at most until ctx ends or for
// PoolWaitTimeout. Both are ErrResourceExhausted: the pool is saturated.
// The caller must call release once its hardware call has ended.
func (b *Backend) acquire(ctx context.Context) (release func(), err error) {
	select {
	case b.slots <- struct{}{}:
	default:
		var timeout <-chan time.Time
		if b.cfg.PoolWaitTimeout > 0 {
			t := time.NewTimer(b.cfg.PoolWaitTimeout)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case b.slots <- struct{}{}:
		case <-ctx.Done():
			return nil, b.noSlot(fmt.Errorf("hsm: waiting for a PKCS#11 session: %w", ctx.Err()))
		case <-timeout:
			return nil, b.noSlot(fmt.Errorf("hsm: no PKCS#11 session free after %v", b.cfg.PoolWaitTimeout))
		}
	}
	if err := ctx.Err(); err != nil {
		<-b.slots
		return nil, fmt.Errorf("hsm: waiting for a PKCS#11 session: %w (%w)", kms.ErrResourceExhausted, err)
	}
	return func() { <-b.slots }, nil
}

// errUnanswered says that calls whose callers gave up are still inside
// the token: it is hung or slow, and a new context would not help.
var errUnanswered = errors.New("the token does not answer")

// noSlot classifies a wait for a session slot that ran out: the token is
// unavailable when calls whose callers gave up still hold slots (it does
// not answer), and merely saturated otherwise.
func (b *Backend) noSlot(err error) error {
	if n := b.abandoned.Load(); n > 0 {
		return fmt.Errorf("%w: %w (%d calls abandoned by their callers still wait): %w", err, errUnanswered, n, kms.ErrUnavailable)
	}
	return fmt.Errorf("%w: %w", err, kms.ErrResourceExhausted)
}

// call runs the hardware call f holding a session slot, bounded by ctx
// (see bounded). f is never started once ctx is done.
func call[T any](ctx context.Context, b *Backend, f func() (T, error)) (T, error) {
	release, err := b.acquire(ctx)
	if err != nil {
		var zero T
		return zero, err
	}
	return bounded(ctx, &b.abandoned, func() (T, error) {
		defer release()
		if err := ctx.Err(); err != nil {
			var zero T
			return zero, fmt.Errorf("hsm: %w (%w)", kms.ErrResourceExhausted, err)
		}
		b.inUse.Add(1)
		defer b.inUse.Add(-1)
		b.started.Add(1)
		return f()
	})
}
