package metrics

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/codes"

	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
)

type fakeKeys struct{ next map[string]time.Time }

func (f fakeKeys) Stats() keyring.Stats {
	return keyring.Stats{Rotations: 7, RotationFailures: 2, NextRotation: f.next}
}

func (f fakeKeys) VersionStates() map[kms.State]int {
	return map[kms.State]int{kms.StateActive: 3, kms.StatePending: 1}
}

// TestTenantLabelIsBounded: callers of unconfigured tenants (or none) are
// counted as "unknown"; SetTenants changes the set.
func TestTenantLabelIsBounded(t *testing.T) {
	m := New(nil, []string{"a"})
	for _, tenant := range []string{"a", "b", "", "c"} {
		m.ObserveRPC("Sign", tenant, codes.OK, time.Millisecond)
	}
	if got := testutil.ToFloat64(m.rpcs.WithLabelValues("Sign", "OK", "unknown")); got != 3 {
		t.Errorf("unknown tenant count %v, want 3", got)
	}
	m.SetTenants([]string{"b"})
	m.ObserveRPC("Sign", "b", codes.OK, time.Millisecond)
	m.ObserveRPC("Sign", "a", codes.OK, time.Millisecond)
	if got := testutil.ToFloat64(m.rpcs.WithLabelValues("Sign", "OK", "b")); got != 1 {
		t.Errorf("tenant b count %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.rpcs.WithLabelValues("Sign", "OK", "unknown")); got != 4 {
		t.Errorf("unknown tenant count %v, want 4 (a was removed)", got)
	}
}

// TestKeyCollector: states, counters, and next rotations bounded to
// configured tenants and MaxKeySeries, soonest first.
func TestKeyCollector(t *testing.T) {
	base := time.Unix(1_800_000_000, 0)
	next := map[string]time.Time{"gone/x": base, "a/none": {}}
	for i := 0; i < MaxKeySeries+10; i++ {
		next[fmt.Sprintf("a/k%04d", i)] = base.Add(time.Duration(i+1) * time.Hour)
	}
	m := New(fakeKeys{next}, []string{"a"})
	n, err := testutil.GatherAndCount(m.Registry(), "keybroker_key_next_rotation_timestamp_seconds")
	if err != nil || n != MaxKeySeries {
		t.Errorf("next rotation series: %d, %v; want %d", n, err, MaxKeySeries)
	}
	exp := `
# HELP keybroker_key_next_rotation_earliest_timestamp_seconds The earliest next rotation over every key (Unix time).
# TYPE keybroker_key_next_rotation_earliest_timestamp_seconds gauge
keybroker_key_next_rotation_earliest_timestamp_seconds 1.8e+09
# HELP keybroker_rotations_total Key versions that became ACTIVE through rotation since the daemon started.
# TYPE keybroker_rotations_total counter
keybroker_rotations_total 7
# HELP keybroker_rotation_failures_total Rotation transitions that failed (each is retried at the next check) since the daemon started.
# TYPE keybroker_rotation_failures_total counter
keybroker_rotation_failures_total 2
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(exp),
		"keybroker_key_next_rotation_earliest_timestamp_seconds", "keybroker_rotations_total", "keybroker_rotation_failures_total"); err != nil {
		t.Error(err)
	}
	if n, _ := testutil.GatherAndCount(m.Registry(), "keybroker_key_versions"); n != 6 {
		t.Errorf("keybroker_key_versions has %d series, want one per state (6)", n)
	}
}
