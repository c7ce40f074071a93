// Package demotest holds the examples' test helpers: a daemon client, fresh
// keys, a printer into the test log, and the test servers, each cleaned up
// when the test ends. The calling package's TestMain must run
// testdaemon.Main. Only the examples' tests import it.
package demotest

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/examples/internal/demo"
	"github.com/keybroker/keybroker/examples/internal/testservers"
)

// Client dials the daemon testdaemon.Main started.
func Client(t testing.TB) *client.Client {
	t.Helper()
	c, err := client.Dial("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

var keys atomic.Int64

// Key creates a key with a name no other test uses and returns its Signer.
func Key(t testing.TB, c *client.Client, alg kbv1.Algorithm) *client.Signer {
	t.Helper()
	name := fmt.Sprintf("t%d-%s", keys.Add(1), strings.ToLower(strings.TrimPrefix(alg.String(), "ALGORITHM_")))
	s, err := demo.Key(context.Background(), c, name, alg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Printer prints into the test output (go test -v shows it).
func Printer(t testing.TB) *demo.Printer { return demo.NewPrinter(t.Output()) }

// Env starts the test AS and RS, logging into p, until the test ends.
func Env(t testing.TB, p *demo.Printer) *testservers.Env {
	t.Helper()
	env, err := testservers.Start(testservers.Config{Logger: p.ServerLog()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(env.Close)
	return env
}

// Refused fails the test unless r is a refusal with status and a
// description that contains each of want.
func Refused(t testing.TB, r *demo.Response, status int, want ...string) {
	t.Helper()
	if r.Status != status {
		t.Fatalf("got %d %s %q, want %d", r.Status, r.Code, r.Description, status)
	}
	for _, w := range want {
		if !strings.Contains(r.Description, w) {
			t.Fatalf("refusal %q: want it to say %q", r.Description, w)
		}
	}
}
