package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/internal/audit"
)

// TestAuditSurvivesKill: in either audit.sync mode, SIGKILL of the daemon
// right after a burst of signatures loses no record of a signature it
// returned (in "interval" mode the lines are written, not yet synced: the
// kernel keeps them when only the process dies), the log verifies, and the
// daemon starts again on it.
func TestAuditSurvivesKill(t *testing.T) {
	daemon, ctl := binaries(t)
	for _, mode := range []string{"always", "interval"} {
		t.Run(mode, func(t *testing.T) {
			// A long interval: the kill comes before any timed sync.
			_, sock, cfgPath := daemonConfig(t, "kill-"+mode, fmt.Sprintf("audit:\n  sync: %s\n  sync_interval: 5s\n", mode))
			p := start(t, daemon, ctl, sock, "--config", cfgPath)
			ctlRun(t, ctl, sock, "keys", "create", "k")
			cl, err := client.Dial(sock)
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			var mu sync.Mutex
			signed := 0
			var wg sync.WaitGroup
			for g := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range 25 {
						d := sha256.Sum256([]byte(fmt.Sprint(g, i)))
						ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
						_, err := cl.API().Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: d[:]})
						cancel()
						if err == nil {
							mu.Lock()
							signed++
							mu.Unlock()
						}
					}
				}()
			}
			wg.Wait()
			p.cmd.Process.Kill()
			<-p.done

			logPath := filepath.Join(filepath.Dir(cfgPath), "state", "audit.jsonl")
			b, err := os.ReadFile(logPath)
			if err != nil {
				t.Fatal(err)
			}
			signs := strings.Count(string(b), `"method":"/keybroker.v1.KeyBroker/Sign"`)
			if signs < signed || signed != 200 {
				t.Errorf("%d signatures returned, %d Sign records after SIGKILL; want 200 of each", signed, signs)
			}
			if n, err := audit.Verify(strings.NewReader(string(b)), nil); err != nil {
				t.Errorf("the log after SIGKILL: %d records, %v", n, err)
			}
			// The head file lags (in interval mode, it follows the syncs):
			// a start accepts the records past it.
			p2 := start(t, daemon, ctl, sock, "--config", cfgPath)
			p2.stop(t)
		})
	}
}
