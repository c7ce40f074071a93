package rotation

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Clock is the scheduler's source of time.
type Clock interface {
	Now() time.Time
	// After fires once d has passed on this clock.
	After(d time.Duration) <-chan time.Time
}

// SystemClock is the wall clock.
type SystemClock struct{}

func (SystemClock) Now() time.Time                         { return time.Now() }
func (SystemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Advancer applies every transition due at now (the keyring).
type Advancer interface {
	Advance(ctx context.Context, now time.Time) error
}

// Scheduler calls Advance at start and then every Interval.
type Scheduler struct {
	Clock    Clock
	Advancer Advancer
	Interval time.Duration
	Log      *slog.Logger
}

// Run advances until ctx is done. Failures are logged and retried at the
// next tick; the keyring counts them.
func (s *Scheduler) Run(ctx context.Context) {
	interval := s.Interval
	if interval <= 0 {
		interval = time.Minute
	}
	for {
		if err := s.Advancer.Advance(ctx, s.Clock.Now()); err != nil && ctx.Err() == nil && s.Log != nil {
			s.Log.Error("rotation", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-s.Clock.After(interval):
		}
	}
}

// FakeClock is a Clock that moves only when told to; for tests.
type FakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []waiter
}

type waiter struct {
	at time.Time
	c  chan time.Time
}

// NewFakeClock starts at t.
func NewFakeClock(t time.Time) *FakeClock { return &FakeClock{now: t} }

func (c *FakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *FakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, waiter{c.now.Add(d), ch})
	return ch
}

// Advance moves the clock by d and fires the timers that are due.
func (c *FakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if w.at.After(c.now) {
			kept = append(kept, w)
		} else {
			w.c <- c.now
		}
	}
	c.waiters = kept
}

// Waiters is how many timers are pending (to know a loop is parked).
func (c *FakeClock) Waiters() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.waiters)
}
