package etcd_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/internal/store/storetest"
	"github.com/keybroker/keybroker/internal/testetcd"
	"github.com/keybroker/keybroker/kms"
)

// TestWritesSurviveMemberLoss: with any one of three members killed just
// before (the raft leader among them, as each takes its turn), intents and
// key writes still commit within the request timeout: an attempt on a
// member without a leader fails at once and the next reaches another.
func TestWritesSurviveMemberLoss(t *testing.T) {
	c := testetcd.Start(t, 3)
	// The default request timeout: an election under a loaded machine
	// can take a couple of seconds.
	s := openTimeout(t, c, 5*time.Second)
	for i := range 3 {
		c.Kill(i)
		start := time.Now()
		if err := s.PutIntent(ctx, store.Intent{Tenant: "t", Handle: kms.Handle{byte(i)}}); err != nil {
			t.Errorf("member %d killed: PutIntent: %v", i, err)
		}
		k := storetest.TestKey("t", fmt.Sprintf("k%d", i))
		if _, err := s.CreateKey(ctx, k); err != nil {
			t.Errorf("member %d killed: CreateKey: %v", i, err)
		}
		t.Logf("member %d killed: two writes in %v", i, time.Since(start))
		c.Restart(i)
		c.WaitHealthy(20 * time.Second)
	}
}
