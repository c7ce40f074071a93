// Package hooks runs operators' programs on key events (config hooks):
// each event a hook asks for is written as one line of JSON to the
// program's stdin, and the run is retried with backoff until it exits 0.
// Hooks never hold up the keyring: events are queued per hook, bounded,
// and dropped (logged, counted) when a queue is full. Only the daemon's
// wiring imports it.
package hooks

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/keyring"
)

// Method is the audit record method of a hook run.
const Method = "hook"

// Retry policy: a failed run is tried again after MinBackoff, doubling up
// to MaxBackoff, at most MaxAttempts times in all; then the event is
// given up for that hook (logged, counted) and the next is delivered.
const (
	DefaultMinBackoff  = time.Second
	DefaultMaxBackoff  = 5 * time.Minute
	DefaultMaxAttempts = 10
	// QueueLen bounds each hook's events waiting to be delivered.
	QueueLen = 256
	// maxOutput bounds what a run's stdout and stderr put in the log.
	maxOutput = 2 << 10
)

// Hook is one configured program.
type Hook struct {
	On      []keyring.EventKind
	Exec    string
	Args    []string
	Timeout time.Duration
}

// Observer counts runs (metrics).
type Observer interface {
	HookAttempt(event string, ok bool)
	HookDropped(event string)
}

// Auditor records each run (*audit.Log).
type Auditor interface {
	Write(ctx context.Context, r audit.Record) error
}

// Options configure a Runner.
type Options struct {
	Hooks    []Hook
	Encode   func(keyring.Event) ([]byte, error) // the event's JSON
	Audit    Auditor                             // nil: none
	Observer Observer                            // nil: none
	Log      *slog.Logger
	// Leading, when set, says whether this replica runs hooks now (the
	// rotation leader of several replicas); events seen while it says
	// false are not queued.
	Leading func() bool
	// Retry policy; zero values take the defaults.
	MinBackoff, MaxBackoff time.Duration
	MaxAttempts            int
}

// Runner delivers events to hooks, one goroutine per hook.
type Runner struct {
	o      Options
	queues []chan keyring.Event
	wg     sync.WaitGroup
}

// New returns a runner; Notify queues events at once, Run delivers them.
func New(o Options) *Runner {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = DefaultMinBackoff
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = DefaultMaxBackoff
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = DefaultMaxAttempts
	}
	r := &Runner{o: o}
	for range o.Hooks {
		r.queues = append(r.queues, make(chan keyring.Event, QueueLen))
	}
	return r
}

// Notify queues ev for every hook that asks for it. It never blocks: it is
// called with the keyring's lock held (keyring.Listen).
func (r *Runner) Notify(ev keyring.Event) {
	if ev.Snapshot || r.o.Leading != nil && !r.o.Leading() {
		return
	}
	for i, h := range r.o.Hooks {
		if !wants(h, ev.Kind) {
			continue
		}
		select {
		case r.queues[i] <- ev:
		default:
			r.o.Log.Error("hook queue full; event dropped", "hook", i, "exec", h.Exec, "event", ev.Kind.String(),
				"tenant", ev.Tenant, "key", ev.Name, "version", ev.Version)
			if r.o.Observer != nil {
				r.o.Observer.HookDropped(ev.Kind.String())
			}
		}
	}
}

func wants(h Hook, k keyring.EventKind) bool {
	for _, o := range h.On {
		if o == k {
			return true
		}
	}
	return false
}

// Run delivers events until ctx ends; a run in progress is killed then.
func (r *Runner) Run(ctx context.Context) {
	for i := range r.o.Hooks {
		r.wg.Go(func() { r.loop(ctx, i) })
	}
	r.wg.Wait()
}

// loop delivers hook i's events in order, each until it succeeds or is
// given up: a hook sees a key's PENDING before its ACTIVE.
func (r *Runner) loop(ctx context.Context, i int) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-r.queues[i]:
			r.deliver(ctx, i, ev)
		}
	}
}

func (r *Runner) deliver(ctx context.Context, i int, ev keyring.Event) {
	h := r.o.Hooks[i]
	in, err := r.o.Encode(ev)
	if err != nil {
		r.o.Log.Error("hook event not encoded", "hook", i, "err", err)
		return
	}
	in = append(in, '\n')
	wait := r.o.MinBackoff
	for attempt := 1; ; attempt++ {
		start := time.Now()
		out, err := run(ctx, h, in, ev)
		if ctx.Err() != nil {
			return // stopping: the attempt is not the hook's failure
		}
		r.record(ctx, i, ev, attempt, err, time.Since(start), out)
		if err == nil {
			return
		}
		if attempt == r.o.MaxAttempts {
			r.o.Log.Error("hook gave up", "hook", i, "exec", h.Exec, "event", ev.Kind.String(), "tenant", ev.Tenant,
				"key", ev.Name, "version", ev.Version, "attempts", attempt)
			return
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		wait = min(2*wait, r.o.MaxBackoff)
	}
}

// record writes one run to the audit log, the log and the metrics.
func (r *Runner) record(ctx context.Context, i int, ev keyring.Event, attempt int, err error, took time.Duration, out []byte) {
	h := r.o.Hooks[i]
	code := "OK"
	if err != nil {
		code = failureCode(err)
	}
	if r.o.Observer != nil {
		r.o.Observer.HookAttempt(ev.Kind.String(), err == nil)
	}
	level := slog.LevelInfo
	if err != nil {
		level = slog.LevelWarn
	}
	r.o.Log.Log(ctx, level, "hook run", "hook", i, "exec", h.Exec, "event", ev.Kind.String(), "tenant", ev.Tenant, "key", ev.Name,
		"version", ev.Version, "attempt", attempt, "code", code, "took", took, "output", string(out))
	if r.o.Audit == nil {
		return
	}
	rec := audit.Record{
		RequestID: "hook-" + strconv.Itoa(i) + "-" + ev.Kid + "-" + ev.Kind.String() + "-" + strconv.Itoa(attempt),
		Tenant:    ev.Tenant, Method: Method, Key: ev.Name, Version: ev.Version, Kid: ev.Kid, Alg: ev.Alg.String(), Code: code,
		LatencyMS: float64(took.Microseconds()) / 1000,
		Note:      fmt.Sprintf("hooks[%d] %s on %s, attempt %d", i, h.Exec, ev.Kind, attempt),
	}
	if werr := r.o.Audit.Write(context.WithoutCancel(ctx), rec); werr != nil {
		r.o.Log.Error("audit record of a hook run not written", "hook", i, "err", werr)
	}
}

// errTimeout is a run killed at its timeout.
var errTimeout = errors.New("timed out")

// failureCode names a failed run for the audit log: EXIT_n, TIMEOUT,
// SIGNAL or START_FAILED.
func failureCode(err error) string {
	var ee *exec.ExitError
	switch {
	case errors.Is(err, errTimeout):
		return "TIMEOUT"
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		return "EXIT_" + strconv.Itoa(ee.ExitCode())
	case errors.As(err, &ee):
		return "SIGNAL"
	}
	return "START_FAILED"
}

// run starts the program in its own process group, with the event on
// stdin and an environment of its own (nothing of the daemon's: no
// credentials directory, no PKCS#11 configuration), and waits for it, at
// most h.Timeout; then the whole group is killed. Its output, bounded, is
// returned for the log.
func run(ctx context.Context, h Hook, in []byte, ev keyring.Event) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, h.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, h.Exec, h.Args...)
	cmd.Stdin = bytes.NewReader(in)
	out := &boundedBuffer{max: maxOutput}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "KEYBROKER_EVENT=" + ev.Kind.String(),
		"KEYBROKER_TENANT=" + ev.Tenant, "KEYBROKER_KEY=" + ev.Name, "KEYBROKER_KID=" + ev.Kid}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// A grandchild that keeps the output pipes open must not hold Wait.
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		err = fmt.Errorf("%w after %v: %w", errTimeout, h.Timeout, err)
	}
	return out.Bytes(), err
}

// boundedBuffer keeps the first max bytes written to it.
type boundedBuffer struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	max  int
	more bool
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - b.buf.Len(); room < len(p) {
		b.buf.Write(p[:max(room, 0)])
		b.more = true
	} else {
		b.buf.Write(p)
	}
	return len(p), nil
}

func (b *boundedBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.more {
		return append(bytes.Clone(b.buf.Bytes()), "…[truncated]"...)
	}
	return bytes.Clone(b.buf.Bytes())
}
