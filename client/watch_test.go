package client_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/pop"
)

// TestWatchKeys: the SDK's WatchKeys delivers the snapshot marker, then a
// new key's ACTIVE version and a rotation's RETIRED and ACTIVE events,
// each with the version's JWK (thumbprint = kid); fn's error ends it, and
// so does the context's end (nil).
func TestWatchKeys(t *testing.T) {
	c := dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const name = "watched"
	events := make(chan *kbv1.KeyEvent, 64)
	done := make(chan error, 1)
	go func() {
		done <- c.WatchKeys(ctx, &kbv1.WatchKeysRequest{Name: name}, func(ev *kbv1.KeyEvent) error {
			events <- ev
			return nil
		})
	}()
	next := func() *kbv1.KeyEvent {
		t.Helper()
		select {
		case ev := <-events:
			return ev
		case <-ctx.Done():
			t.Fatal("no event within 30 s")
			return nil
		}
	}
	if ev := next(); ev.GetType() != kbv1.KeyEventType_KEY_EVENT_TYPE_SNAPSHOT_COMPLETE {
		t.Fatalf("first event %v, want the (empty) snapshot's end", ev)
	}
	if _, err := c.API().CreateKey(ctx, &kbv1.CreateKeyRequest{Name: name, Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.API().RotateKey(ctx, &kbv1.RotateKeyRequest{Name: name}); err != nil {
		t.Fatal(err)
	}
	want := []struct {
		typ     kbv1.KeyEventType
		version uint32
	}{{kbv1.KeyEventType_KEY_EVENT_TYPE_ACTIVE, 1}, {kbv1.KeyEventType_KEY_EVENT_TYPE_RETIRED, 1}, {kbv1.KeyEventType_KEY_EVENT_TYPE_ACTIVE, 2}}
	for _, w := range want {
		ev := next()
		if ev.GetType() != w.typ || ev.GetVersion() != w.version || ev.GetName() != name || ev.GetSnapshot() {
			t.Fatalf("event %v, want %v of version %d", ev, w.typ, w.version)
		}
		var jwk pop.JWK
		if err := json.Unmarshal([]byte(ev.GetJwk()), &jwk); err != nil {
			t.Fatal(err)
		}
		if tp, err := jwk.Thumbprint(); err != nil || tp != ev.GetKid() {
			t.Fatalf("event JWK thumbprint %q (%v), kid %q", tp, err, ev.GetKid())
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("WatchKeys after its context ended: %v, want nil", err)
	}

	// fn's error ends the watch with it.
	stop := errors.New("enough")
	err := c.WatchKeys(context.Background(), &kbv1.WatchKeysRequest{Name: name}, func(*kbv1.KeyEvent) error { return stop })
	if !errors.Is(err, stop) {
		t.Fatalf("WatchKeys with a failing fn: %v, want its error", err)
	}
}
