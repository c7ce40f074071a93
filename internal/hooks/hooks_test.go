package hooks

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
)

type recAudit struct {
	mu   sync.Mutex
	recs []audit.Record
}

func (a *recAudit) Write(_ context.Context, r audit.Record) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.recs = append(a.recs, r)
	return nil
}

func (a *recAudit) codes() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for _, r := range a.recs {
		out = append(out, r.Code)
	}
	return out
}

type counts struct {
	mu                  sync.Mutex
	ok, failed, dropped int
}

func (c *counts) HookAttempt(_ string, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ok {
		c.ok++
	} else {
		c.failed++
	}
}
func (c *counts) HookDropped(string) { c.mu.Lock(); c.dropped++; c.mu.Unlock() }

// script writes an executable shell script.
func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "hook.sh")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func encode(ev keyring.Event) ([]byte, error) {
	return json.Marshal(map[string]any{"type": ev.Kind.String(), "tenant": ev.Tenant, "name": ev.Name, "kid": ev.Kid})
}

var pending = keyring.Event{Kind: keyring.EventPending, Tenant: "t", Name: "k", Version: 2, Kid: "kid2", Alg: kms.ES256}

// start runs a Runner until the test ends.
func start(t *testing.T, o Options) *Runner {
	t.Helper()
	o.Encode = encode
	r := New(o)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

// waitFor polls cond for up to 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
	}
}

// TestHookGetsEventOnStdin: the event's JSON on stdin, only the events the
// hook asks for, and an environment with nothing of the daemon's.
func TestHookGetsEventOnStdin(t *testing.T) {
	t.Setenv("KEYBROKER_SECRET_TEST", "do-not-pass")
	out := filepath.Join(t.TempDir(), "out")
	h := Hook{On: []keyring.EventKind{keyring.EventPending}, Exec: script(t, `cat >> "$1"; env > "$1.env"`), Args: []string{out}, Timeout: 10 * time.Second}
	a := &recAudit{}
	r := start(t, Options{Hooks: []Hook{h}, Audit: a})
	active := pending
	active.Kind = keyring.EventActive
	r.Notify(active)
	r.Notify(pending)
	waitFor(t, "a record of the run", func() bool { return len(a.codes()) == 1 })
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"kid":"kid2","name":"k","tenant":"t","type":"pending"}` + "\n"; string(b) != want {
		t.Fatalf("stdin: %q, want %q", b, want)
	}
	env, _ := os.ReadFile(out + ".env")
	if strings.Contains(string(env), "do-not-pass") || !strings.Contains(string(env), "KEYBROKER_EVENT=pending") {
		t.Fatalf("environment:\n%s", env)
	}
	if rec := a.recs[0]; rec.Method != Method || rec.Tenant != "t" || rec.Key != "k" || rec.Kid != "kid2" || rec.Code != "OK" {
		t.Fatalf("record %+v", rec)
	}
}

// TestHookRetried: a hook that fails twice is run a third time, each
// attempt recorded and counted.
func TestHookRetried(t *testing.T) {
	n := filepath.Join(t.TempDir(), "n")
	h := Hook{On: []keyring.EventKind{keyring.EventPending}, Exec: script(t, `echo x >> "$1"; [ $(wc -l < "$1") -ge 3 ]`), Args: []string{n}, Timeout: 10 * time.Second}
	a, c := &recAudit{}, &counts{}
	r := start(t, Options{Hooks: []Hook{h}, Audit: a, Observer: c, MinBackoff: time.Millisecond, MaxBackoff: 4 * time.Millisecond})
	r.Notify(pending)
	waitFor(t, "three attempts", func() bool { return len(a.codes()) == 3 })
	if got := a.codes(); !slices.Equal(got, []string{"EXIT_1", "EXIT_1", "OK"}) {
		t.Fatalf("codes %v", got)
	}
	if c.ok != 1 || c.failed != 2 {
		t.Fatalf("metrics: %d ok, %d failed", c.ok, c.failed)
	}
}

// TestHookHangs: a hook that hangs (with a child holding its output) is
// killed at its timeout, whole process group, and retried; the runner
// gives up after MaxAttempts and delivers the next event.
func TestHookHangs(t *testing.T) {
	dir := t.TempDir()
	h := Hook{On: []keyring.EventKind{keyring.EventPending, keyring.EventActive}, Timeout: time.Second,
		Exec: script(t, `read ev; case "$ev" in *pending*) sleep 300 & echo $! >> "$1/pids"; wait;; *) touch "$1/active";; esac`), Args: []string{dir}}
	a := &recAudit{}
	r := start(t, Options{Hooks: []Hook{h}, Audit: a, MinBackoff: time.Millisecond, MaxAttempts: 2})
	r.Notify(pending)
	active := pending
	active.Kind = keyring.EventActive
	r.Notify(active)
	waitFor(t, "the next event after giving up", func() bool { _, err := os.Stat(filepath.Join(dir, "active")); return err == nil })
	// The run's record follows its exit, a moment after the file.
	waitFor(t, "the record of the next event's run", func() bool { return len(a.codes()) >= 3 })
	if got := a.codes(); !slices.Equal(got, []string{"TIMEOUT", "TIMEOUT", "OK"}) {
		t.Fatalf("codes %v", got)
	}
	pids, _ := os.ReadFile(filepath.Join(dir, "pids"))
	for _, p := range strings.Fields(string(pids)) {
		waitFor(t, "the hung hook's child killed", func() bool { _, err := os.Stat("/proc/" + p); return err != nil })
	}
}

// TestNotifyNeverBlocks: a full queue drops (counted) instead of waiting,
// and a replica that does not lead queues nothing.
func TestNotifyNeverBlocks(t *testing.T) {
	h := Hook{On: []keyring.EventKind{keyring.EventPending}, Exec: "/bin/true", Timeout: time.Second}
	c := &counts{}
	r := New(Options{Hooks: []Hook{h}, Encode: encode, Observer: c}) // not running: nothing drains
	for range QueueLen + 3 {
		r.Notify(pending)
	}
	if c.dropped != 3 {
		t.Fatalf("dropped %d, want 3", c.dropped)
	}
	follower := New(Options{Hooks: []Hook{h}, Encode: encode, Leading: func() bool { return false }})
	follower.Notify(pending)
	if len(follower.queues[0]) != 0 {
		t.Fatal("a replica that does not lead queued an event")
	}
}

// TestConfigNamesAreEventKinds: the names config accepts are the
// keyring's.
func TestConfigNamesAreEventKinds(t *testing.T) {
	if !slices.Equal(config.HookEvents, keyring.EventKinds()) {
		t.Fatalf("config.HookEvents %v, keyring %v", config.HookEvents, keyring.EventKinds())
	}
}
