package main

import (
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// watchFake answers the first WatchKeys with a snapshot and then cuts it
// off (RESOURCE_EXHAUSTED), the second with one change and UNAVAILABLE.
type watchFake struct {
	kbv1.UnimplementedKeyBrokerServer
	calls atomic.Int32
	names []string
	csr   []bool
}

func (f *watchFake) WatchKeys(req *kbv1.WatchKeysRequest, st kbv1.KeyBroker_WatchKeysServer) error {
	f.names = append(f.names, req.GetName())
	f.csr = append(f.csr, req.GetIncludeCsr())
	send := func(ev *kbv1.KeyEvent) { _ = st.Send(&kbv1.WatchKeysResponse{Event: ev}) }
	if f.calls.Add(1) == 1 {
		send(&kbv1.KeyEvent{Type: kbv1.KeyEventType_KEY_EVENT_TYPE_ACTIVE, Snapshot: true, Tenant: "t", Name: "k", Version: 1, Kid: "kid1",
			Algorithm: kbv1.Algorithm_ALGORITHM_ES256, Time: created1, Jwk: `{"kty":"EC","kid":"kid1"}`})
		send(&kbv1.KeyEvent{Type: kbv1.KeyEventType_KEY_EVENT_TYPE_SNAPSHOT_COMPLETE})
		return status.Error(codes.ResourceExhausted, "fell behind")
	}
	send(&kbv1.KeyEvent{Type: kbv1.KeyEventType_KEY_EVENT_TYPE_PENDING, Tenant: "t", Name: "k", Version: 2, Kid: "kid2",
		Algorithm: kbv1.Algorithm_ALGORITHM_ES256, Time: created2, CsrDer: []byte{1, 2, 3}})
	return status.Error(codes.Unavailable, "daemon stopping")
}

// TestKeysWatch: one line per event, a cut-off watch is opened again, and
// any other end of the stream fails the command.
func TestKeysWatch(t *testing.T) {
	fake := &watchFake{}
	socket, _ := startFake(t, fake)
	r := runAt(socket, "keys", "watch", "k", "--csr")
	want := "2026-01-02T03:04:05Z ACTIVE k v1 kid=kid1 alg=ES256 (snapshot)\n" +
		"-- snapshot complete; changes follow --\n" +
		"2026-02-03T04:05:06Z PENDING k v2 kid=kid2 alg=ES256 csr=3B\n"
	if r.stdout != want || r.code == exitOK || !strings.Contains(r.stderr, "watching again") || !strings.Contains(r.stderr, "daemon stopping") {
		t.Fatalf("keys watch: code %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	if fake.calls.Load() != 2 || fake.names[0] != "k" || fake.names[1] != "k" || !fake.csr[0] {
		t.Fatalf("requests: %d, names %v, csr %v", fake.calls.Load(), fake.names, fake.csr)
	}

	fake2 := &watchFake{}
	socket2, _ := startFake(t, fake2)
	r = runAt(socket2, "keys", "watch", "-o", "json")
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], `{"type":"KEY_EVENT_TYPE_ACTIVE","snapshot":true,"tenant":"t","name":"k"`) ||
		!strings.Contains(lines[2], `"csrDer":"AQID"`) {
		t.Fatalf("keys watch -o json:\n%s", r.stdout)
	}
	if fake2.names[0] != "" || fake2.csr[0] {
		t.Fatalf("request without NAME and --csr: %v %v", fake2.names, fake2.csr)
	}
	runAt(socket, "keys", "watch", "a", "b").check(t, exitUsage, "", "keybrokerctl: accepts at most 1 arg(s), received 2\nRun 'keybrokerctl keys watch --help' for usage.\n")
}
