package rotation

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeAdvancer records the now of every Advance call. Its fail function,
// if set, gives the error for call n (from 1).
type fakeAdvancer struct {
	mu   sync.Mutex
	nows []time.Time
	fail func(n int) error
}

func (a *fakeAdvancer) Advance(ctx context.Context, now time.Time) error {
	a.mu.Lock()
	a.nows = append(a.nows, now)
	n, fail := len(a.nows), a.fail
	a.mu.Unlock()
	if fail != nil {
		return fail(n)
	}
	return nil
}

func (a *fakeAdvancer) calls() []time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]time.Time(nil), a.nows...)
}

// syncBuffer is a bytes.Buffer safe for the scheduler's goroutine and the
// test's.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// waitFor polls cond until it holds, failing the test after a deadline. It
// waits for the scheduler's goroutine, never for time on the clock.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// runScheduler starts s.Run and returns a function that waits for the
// loop to park after its n-th Advance call (one timer pending on clock),
// and a channel closed when Run returns. The loop is stopped when the test
// ends.
func runScheduler(t *testing.T, s *Scheduler, clock *FakeClock, adv *fakeAdvancer) (ctx context.Context, cancel context.CancelFunc, parked func(n int), done <-chan struct{}) {
	t.Helper()
	ctx, cancel = context.WithCancel(context.Background())
	d := make(chan struct{})
	go func() {
		defer close(d)
		s.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-d:
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after its context was cancelled")
		}
	})
	parked = func(n int) {
		t.Helper()
		waitFor(t, fmt.Sprintf("Advance call %d and a parked loop", n), func() bool {
			return len(adv.calls()) == n && clock.Waiters() == 1
		})
	}
	return ctx, cancel, parked, d
}

// wantCalls fails unless adv was called with exactly want.
func wantCalls(t testing.TB, adv *fakeAdvancer, want ...time.Time) {
	t.Helper()
	got := adv.calls()
	if len(got) != len(want) {
		t.Fatalf("Advance called %d times at %v, want %d times at %v", len(got), got, len(want), want)
	}
	for i := range want {
		if !got[i].Equal(want[i]) {
			t.Errorf("Advance call %d: now %v, want %v", i+1, got[i], want[i])
		}
	}
}

func TestSchedulerRun(t *testing.T) {
	const interval = time.Hour
	clock := NewFakeClock(t0)
	adv := &fakeAdvancer{}
	s := &Scheduler{Clock: clock, Advancer: adv, Interval: interval}
	_, cancel, parked, done := runScheduler(t, s, clock, adv)

	// Once at start, at the clock's time.
	parked(1)
	wantCalls(t, adv, t0)

	// Not before the interval has passed.
	clock.Advance(interval - time.Nanosecond)
	if n := clock.Waiters(); n != 1 {
		t.Fatalf("%d timers pending a nanosecond before the interval, want 1", n)
	}
	wantCalls(t, adv, t0)

	// Then once per interval, at the clock's time.
	clock.Advance(time.Nanosecond)
	parked(2)
	wantCalls(t, adv, t0, t0.Add(interval))

	// A long jump is one call, not one per interval missed.
	clock.Advance(3 * interval)
	parked(3)
	wantCalls(t, adv, t0, t0.Add(interval), t0.Add(4*interval))

	want := adv.calls()
	for i := range 48 {
		clock.Advance(interval)
		parked(4 + i)
		want = append(want, t0.Add(time.Duration(5+i)*interval))
	}
	wantCalls(t, adv, want...)

	// Cancelled while parked: Run returns, without another call.
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
	clock.Advance(interval)
	wantCalls(t, adv, want...)
}

func TestSchedulerLogsErrorsAndContinues(t *testing.T) {
	var logs syncBuffer
	clock := NewFakeClock(t0)
	adv := &fakeAdvancer{fail: func(n int) error {
		if n <= 2 {
			return fmt.Errorf("hsm unplugged %d", n)
		}
		return nil
	}}
	s := &Scheduler{Clock: clock, Advancer: adv, Interval: time.Minute, Log: slog.New(slog.NewTextHandler(&logs, nil))}
	_, _, parked, _ := runScheduler(t, s, clock, adv)

	parked(1)
	if got := logs.String(); !strings.Contains(got, "level=ERROR") || !strings.Contains(got, "msg=rotation") || !strings.Contains(got, `err="hsm unplugged 1"`) {
		t.Errorf("log after a failed Advance:\n%s\nwant an ERROR rotation entry with err=\"hsm unplugged 1\"", got)
	}
	// The loop goes on.
	clock.Advance(time.Minute)
	parked(2)
	clock.Advance(time.Minute)
	parked(3)
	clock.Advance(time.Minute)
	parked(4)
	wantCalls(t, adv, t0, t0.Add(time.Minute), t0.Add(2*time.Minute), t0.Add(3*time.Minute))
	got := logs.String()
	if n := strings.Count(got, "\n"); n != 2 {
		t.Errorf("%d log lines, want 2 (one per failure):\n%s", n, got)
	}
	if !strings.Contains(got, `err="hsm unplugged 2"`) {
		t.Errorf("log:\n%s\nwant the second failure", got)
	}
}

func TestSchedulerWithoutLogger(t *testing.T) {
	clock := NewFakeClock(t0)
	adv := &fakeAdvancer{fail: func(int) error { return errors.New("always") }}
	s := &Scheduler{Clock: clock, Advancer: adv, Interval: time.Minute}
	_, _, parked, _ := runScheduler(t, s, clock, adv)
	parked(1)
	clock.Advance(time.Minute)
	parked(2)
	wantCalls(t, adv, t0, t0.Add(time.Minute))
}

// TestSchedulerCancelledDuringAdvance: an error caused by the cancellation
// is not logged, and Run returns without waiting for the next tick.
func TestSchedulerCancelledDuringAdvance(t *testing.T) {
	var logs syncBuffer
	clock := NewFakeClock(t0)
	var cancel context.CancelFunc
	ready := make(chan struct{})
	adv := &fakeAdvancer{fail: func(n int) error {
		<-ready
		if n == 2 {
			cancel()
			return context.Canceled
		}
		return nil
	}}
	s := &Scheduler{Clock: clock, Advancer: adv, Interval: time.Minute, Log: slog.New(slog.NewTextHandler(&logs, nil))}
	_, cancel, parked, done := runScheduler(t, s, clock, adv)
	close(ready)
	parked(1)
	clock.Advance(time.Minute)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
	wantCalls(t, adv, t0, t0.Add(time.Minute))
	if got := logs.String(); got != "" {
		t.Errorf("logged after cancellation:\n%s", got)
	}
}

func TestFakeClock(t *testing.T) {
	c := NewFakeClock(t0)
	if got := c.Now(); !got.Equal(t0) {
		t.Fatalf("Now = %v, want %v", got, t0)
	}
	// received returns what ch holds, if anything, without waiting.
	received := func(ch <-chan time.Time) (time.Time, bool) {
		select {
		case v := <-ch:
			return v, true
		default:
			return time.Time{}, false
		}
	}
	for _, d := range []time.Duration{0, -time.Second} {
		if v, ok := received(c.After(d)); !ok || !v.Equal(t0) {
			t.Errorf("After(%v) = %v, %v; want %v at once", d, v, ok, t0)
		}
	}
	if n := c.Waiters(); n != 0 {
		t.Errorf("Waiters = %d after expired timers, want 0", n)
	}

	a, b := c.After(time.Minute), c.After(time.Hour)
	if n := c.Waiters(); n != 2 {
		t.Errorf("Waiters = %d, want 2", n)
	}
	c.Advance(time.Minute - 1)
	if v, ok := received(a); ok {
		t.Errorf("1m timer fired at %v, before its time", v)
	}
	c.Advance(1)
	if v, ok := received(a); !ok || !v.Equal(t0.Add(time.Minute)) {
		t.Errorf("1m timer: %v, %v; want %v", v, ok, t0.Add(time.Minute))
	}
	if v, ok := received(b); ok {
		t.Errorf("1h timer fired at %v, before its time", v)
	}
	if n := c.Waiters(); n != 1 {
		t.Errorf("Waiters = %d, want 1", n)
	}
	c.Advance(2 * time.Hour)
	if v, ok := received(b); !ok || !v.Equal(t0.Add(2*time.Hour+time.Minute)) {
		t.Errorf("1h timer: %v, %v; want %v", v, ok, t0.Add(2*time.Hour+time.Minute))
	}
	if got, want := c.Now(), t0.Add(2*time.Hour+time.Minute); !got.Equal(want) {
		t.Errorf("Now = %v, want %v", got, want)
	}
	if n := c.Waiters(); n != 0 {
		t.Errorf("Waiters = %d, want 0", n)
	}
}
