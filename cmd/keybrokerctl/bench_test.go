package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestBenchSign(t *testing.T) {
	socket, _ := startFake(t, newFakeBroker(t))
	r := runAt(socket, "--output", "json", "bench", "alpha", "--concurrency", "3", "--count", "30")
	if r.code != exitOK {
		t.Fatalf("exit code %d, stderr %q", r.code, r.stderr)
	}
	var out benchOutput
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("stdout %q: %v", r.stdout, err)
	}
	d := out.Daemon
	if d.Target != "daemon" || d.RPC != "Sign" || d.Algorithm != "ES256" || d.Concurrency != 3 || d.Ops != 30 || d.Errors != 0 {
		t.Errorf("daemon result = %+v, want 30 ES256 Signs by 3 clients, no errors", d)
	}
	if d.P50MS > d.P95MS || d.P95MS > d.P99MS || d.OpsPerSec <= 0 {
		t.Errorf("percentiles or rate out of order: %+v", d)
	}
	if out.Baseline != nil || out.Ratio != 0 {
		t.Errorf("baseline %+v, ratio %v without --baseline", out.Baseline, out.Ratio)
	}
}

// --stream against a daemon without SignStream (the fake) signs unary: the
// SDK's fallback, every call counted once.
func TestBenchStreamFallsBack(t *testing.T) {
	socket, _ := startFake(t, newFakeBroker(t))
	r := runAt(socket, "--output", "json", "bench", "alpha", "--stream", "-c", "4", "-n", "40")
	if r.code != exitOK {
		t.Fatalf("exit code %d, stderr %q", r.code, r.stderr)
	}
	var out benchOutput
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("stdout %q: %v", r.stdout, err)
	}
	if d := out.Daemon; d.RPC != "SignStream" || d.Ops != 40 || d.Errors != 0 {
		t.Errorf("daemon result = %+v, want 40 SignStream-mode calls, no errors", d)
	}
}

func TestBenchJWKSText(t *testing.T) {
	socket, _ := startFake(t, newFakeBroker(t))
	r := runAt(socket, "bench", "--rpc", "jwks", "-c", "2", "-d", "100ms")
	if r.code != exitOK {
		t.Fatalf("exit code %d, stderr %q", r.code, r.stderr)
	}
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "target") || !strings.HasPrefix(lines[1], "daemon") ||
		!strings.Contains(lines[1], "GetJWKS") {
		t.Errorf("stdout:\n%s\nwant a header and one daemon GetJWKS row", r.stdout)
	}
}

// --rpc health measures the gRPC floor: the health service's Check.
func TestBenchHealthJSON(t *testing.T) {
	socket, _ := startFake(t, newFakeBroker(t))
	r := runAt(socket, "--output", "json", "bench", "--rpc", "health", "-c", "3", "--conns", "2", "-n", "30")
	if r.code != exitOK {
		t.Fatalf("exit code %d, stderr %q", r.code, r.stderr)
	}
	var out benchOutput
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("stdout %q: %v", r.stdout, err)
	}
	if d := out.Daemon; d.RPC != "health.Check" || d.Ops != 30 || d.Errors != 0 || d.Concurrency != 3 {
		t.Errorf("daemon result = %+v, want 30 health.Check calls by 3 clients, no errors", d)
	}
}

func TestBenchErrorsAreCounted(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)
	// "slow" exists for GetKey but its Sign waits for the deadline.
	fake.mu.Lock()
	fake.keys["slow"] = fake.keys["alpha"]
	fake.mu.Unlock()
	r := runAt(socket, "--timeout", "20ms", "--output", "json", "bench", "slow", "--count", "2")
	if r.code != exitUnavailable {
		t.Errorf("exit code %d, want %d (every call failed); stderr %q", r.code, exitUnavailable, r.stderr)
	}
	var out benchOutput
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("stdout %q: %v", r.stdout, err)
	}
	if out.Daemon.Ops != 0 || out.Daemon.Errors != 2 || out.Daemon.FirstError == "" {
		t.Errorf("daemon result = %+v, want 2 errors and the first one", out.Daemon)
	}
}

func TestBenchMissingKey(t *testing.T) {
	socket, _ := startFake(t, newFakeBroker(t))
	r := runAt(socket, "bench", "nope", "-n", "1")
	r.check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

func TestBenchUsage(t *testing.T) {
	// Usage errors come before any connection: no daemon needed.
	socket := filepath.Join(t.TempDir(), "none.sock")
	for _, args := range [][]string{
		{"bench"},
		{"bench", "--rpc", "jwks", "alpha"},
		{"bench", "--rpc", "health", "alpha"},
		{"bench", "alpha", "--conns", "0"},
		{"bench", "--rpc", "health", "--baseline", "--pin-file", "x"},
		{"bench", "--rpc", "verify", "alpha"},
		{"bench", "alpha", "--concurrency", "0"},
		{"bench", "alpha", "--count", "-1"},
		{"bench", "alpha", "--duration", "0s"},
		{"bench", "alpha", "--format", "pem"},
		{"bench", "alpha", "--baseline"},
		{"bench", "alpha", "--baseline", "--backend", "tpm"},
		{"bench", "alpha", "--backend", "yubikey"},
		{"bench", "--rpc", "jwks", "--baseline", "--pin-file", "x"},
		{"bench", "--rpc", "jwks", "--stream"},
	} {
		r := runAt(socket, args...)
		if r.code != exitUsage || r.stdout != "" {
			t.Errorf("%q: exit code %d, stdout %q, want %d and nothing", args, r.code, r.stdout, exitUsage)
		}
	}
}

func TestPercentile(t *testing.T) {
	var lat []time.Duration
	for i := 1; i <= 100; i++ {
		lat = append(lat, time.Duration(i)*time.Millisecond)
	}
	for q, want := range map[float64]float64{0.50: 50, 0.95: 95, 0.99: 99, 1: 100} {
		if got := percentileMS(lat, q); got != want {
			t.Errorf("percentileMS(1..100 ms, %v) = %v, want %v", q, got, want)
		}
	}
	if got := percentileMS(nil, 0.5); got != 0 {
		t.Errorf("percentileMS(nil) = %v, want 0", got)
	}
}
