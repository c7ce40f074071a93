package cluster_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// propagation is the bound the issue sets for a change made through one
// replica to reach the others' Sign, GetJWKS and GetKey.
const propagation = time.Second

// TestChangesReachEveryReplica: a key created on replica 1 signs (by name
// and by kid, verified) on replicas 2 and 3 within 1 s; a version revoked
// on replica 3 is refused by 1 and 2 within 1 s. The status of each
// replica names one leader.
func TestChangesReachEveryReplica(t *testing.T) {
	e := newEnv(t, envOptions{replicas: 3})
	r1, r2, r3 := e.replicas[0], e.replicas[1], e.replicas[2]
	leader := e.leader(leaseTTL + 5*time.Second)
	t.Logf("leader: %s", leader.id)

	// Replica 2 watches the key: every change made anywhere reaches its
	// watchers once, whether it made it or learned it from etcd.
	wctx, wcancel := ctxFor(2 * time.Minute)
	defer wcancel()
	watch, err := r2.api().WatchKeys(wctx, &kbv1.WatchKeysRequest{Name: "shared"})
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := watch.Recv(); err != nil || ev.GetEvent().GetType() != kbv1.KeyEventType_KEY_EVENT_TYPE_SNAPSHOT_COMPLETE {
		t.Fatalf("%s watch: %v %v, want the snapshot's end", r2.id, ev, err)
	}
	var evMu sync.Mutex
	var events []*kbv1.KeyEvent
	go func() {
		for {
			ev, err := watch.Recv()
			if err != nil {
				return
			}
			evMu.Lock()
			events = append(events, ev.GetEvent())
			evMu.Unlock()
		}
	}()

	k := e.createKey(r1, "shared", nil)
	kid := k.GetActiveKid()
	for _, r := range []*replica{r2, r3} {
		took, err := eventually(propagation, func() error {
			if got, err := r.sign("shared", ""); err != nil || got != kid {
				return fmt.Errorf("by name: kid %q, %v", got, err)
			}
			_, err := r.sign("shared", kid)
			return err
		})
		if err != nil {
			t.Fatalf("%s: the key created on %s does not sign within %v: %v", r.id, r1.id, propagation, err)
		}
		t.Logf("%s signs with the new key after %v", r.id, took.Round(time.Millisecond))
	}

	// A policy changed on 3 shows in GetKey on 1 and 2, and the key's
	// JWKS on every replica has its kid.
	pctx, pcancel := ctxFor(10 * time.Second)
	defer pcancel()
	if _, err := r3.api().UpdatePolicy(pctx, &kbv1.UpdatePolicyRequest{Name: "shared",
		Policy: &kbv1.RotationPolicy{RotationPeriod: durationpb.New(30 * 24 * time.Hour)}}); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*replica{r1, r2} {
		if _, err := eventually(propagation, func() error {
			ctx, cancel := ctxFor(time.Second)
			defer cancel()
			k, err := r.api().GetKey(ctx, &kbv1.GetKeyRequest{Name: "shared"})
			if err != nil {
				return err
			}
			if got := k.GetKey().GetPolicy().GetRotationPeriod().AsDuration(); got != 30*24*time.Hour {
				return fmt.Errorf("rotation period %v", got)
			}
			j, err := r.api().GetJWKS(ctx, &kbv1.GetJWKSRequest{})
			if err != nil {
				return err
			}
			if !strings.Contains(j.GetJwks(), kid) {
				return fmt.Errorf("JWKS without %s", kid)
			}
			return nil
		}); err != nil {
			t.Errorf("%s: the policy changed on %s: %v after %v", r.id, r3.id, err, propagation)
		}
	}

	// Rotate on 2, so that the active version is another; revoke the
	// first on 3.
	ctx, cancel := ctxFor(10 * time.Second)
	defer cancel()
	if _, err := r2.api().RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "shared"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r3.api().RevokeKeyVersion(ctx, &kbv1.RevokeKeyVersionRequest{Name: "shared", Kid: kid}); err != nil {
		// r3 may not have seen the rotation yet: the revoke retries on
		// the winner's record by itself, so an error is a failure.
		t.Fatalf("RevokeKeyVersion on %s: %v", r3.id, err)
	}
	for _, r := range []*replica{r1, r2} {
		took, err := eventually(propagation, func() error {
			_, err := r.sign("shared", kid)
			if code(err) != codes.FailedPrecondition {
				return fmt.Errorf("signing with the revoked kid: %v, want FAILED_PRECONDITION", err)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%s: %v after %v", r.id, err, propagation)
		}
		t.Logf("%s refuses the revoked kid after %v", r.id, took.Round(time.Millisecond))
		if got, err := r.sign("shared", ""); err != nil || got == kid {
			t.Errorf("%s: signing by name after the revoke: kid %s, %v", r.id, got, err)
		}
	}
	// The watch on replica 2 saw version 1 ACTIVE (made on 1), the policy
	// (on 3), the rotation (its own), the revocation (on 3): each once.
	seen := func() map[string]int {
		evMu.Lock()
		defer evMu.Unlock()
		n := map[string]int{}
		for _, ev := range events {
			n[fmt.Sprintf("%s v%d %s", strings.TrimPrefix(ev.GetType().String(), "KEY_EVENT_TYPE_"), ev.GetVersion(), ev.GetKid())]++
		}
		return n
	}
	revoked := fmt.Sprintf("REVOKED v1 %s", kid)
	if _, err := eventually(propagation, func() error {
		if seen()[revoked] == 0 {
			return fmt.Errorf("no %s", revoked)
		}
		return nil
	}); err != nil {
		t.Errorf("%s watch: %v; events %v", r2.id, err, seen())
	}
	got := seen()
	for _, want := range []string{fmt.Sprintf("ACTIVE v1 %s", kid), "RETIRED v1 " + kid, revoked} {
		if got[want] != 1 {
			t.Errorf("%s watch: %q %d times, want once; events %v", r2.id, want, got[want], got)
		}
	}
	policies := 0
	for ev, n := range got {
		if strings.HasPrefix(ev, "POLICY ") {
			policies += n
		}
		if n > 1 && !strings.HasPrefix(ev, "POLICY ") {
			t.Errorf("%s watch: %q %d times", r2.id, ev, n)
		}
	}
	if policies != 1 {
		t.Errorf("%s watch: %d policy events for one change; events %v", r2.id, policies, got)
	}
	wcancel()

	for _, r := range e.replicas {
		st := r.status()
		if st == nil || st.GetReplica() != r.id || st.GetLeader() != leader.id || !st.GetServing() || len(st.GetReplicas()) != 3 {
			t.Errorf("%s: cluster status %v, want itself, leader %s, 3 replicas, serving", r.id, st, leader.id)
		}
		healthy := 0
		for _, ep := range st.GetEndpoints() {
			if ep.GetHealthy() {
				healthy++
			}
		}
		if healthy != 3 {
			t.Errorf("%s: %d healthy etcd endpoints, want 3: %v", r.id, healthy, st.GetEndpoints())
		}
	}
	// Each replica's own audit log names it in every record, and holds
	// the signatures it made.
	for _, r := range e.replicas {
		b, err := os.ReadFile(filepath.Join(r.dir, "state", "audit.jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		signs := 0
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			var rec struct{ Replica, Method, Code string }
			if err := json.Unmarshal([]byte(line), &rec); err != nil {
				t.Fatalf("%s audit: %v", r.id, err)
			}
			if rec.Replica != r.id {
				t.Errorf("%s audit record names replica %q: %s", r.id, rec.Replica, line)
			}
			if strings.HasSuffix(rec.Method, "/Sign") && rec.Code == "OK" {
				signs++
			}
		}
		if r != r1 && signs == 0 {
			t.Errorf("%s audit log has no OK Sign record", r.id)
		}
	}
	e.checkConsistent()
}

// TestConcurrentGuardedRotations: 100 RotateKey calls guarded by the same
// active version, spread over the three replicas at once, make exactly one
// new version, and leave no orphan object on the HSM.
func TestConcurrentGuardedRotations(t *testing.T) {
	e := newEnv(t, envOptions{replicas: 3})
	k := e.createKey(e.replicas[0], "busy", nil)
	// Every replica has the key before the race starts.
	for _, r := range e.replicas {
		if _, err := eventually(propagation, func() error { _, err := r.sign("busy", ""); return err }); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	rotated, errs := 0, map[codes.Code]int{}
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := e.replicas[i%3]
			ctx, cancel := ctxFor(30 * time.Second)
			defer cancel()
			resp, err := r.api().RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "busy", IfActiveVersion: k.GetActiveVersion()})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs[code(err)]++
				return
			}
			if resp.GetRotated() {
				rotated++
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Errorf("calls failed: %v (a guarded rotation that lost the race should report rotated=false)", errs)
	}
	if rotated != 1 {
		t.Errorf("%d calls report rotated=true, want 1", rotated)
	}
	recs := e.records()
	if len(recs) != 1 || len(recs[0].Versions) != 2 {
		t.Fatalf("records after the race: %+v, want one key with 2 versions", recs)
	}
	e.checkConsistent()
}

// TestLeaderKilledAtFailpoints: the leader's rotation scheduler prepares
// the next version (policy: period 1 h, lead 1 h - 2 s, so the step falls
// due 2 s after creation) and is killed with SIGKILL at each step of it.
// Another replica leads within the lease TTL + 2 s and finishes or undoes
// the step: one ACTIVE version, every version in every JWKS, the HSM's
// objects exactly the recorded ones.
func TestLeaderKilledAtFailpoints(t *testing.T) {
	for _, fp := range []string{"before-generate", "after-generate", "before-commit", "after-commit"} {
		t.Run(fp, func(t *testing.T) {
			e := newEnv(t, envOptions{replicas: 3, failpoint: fp})
			leader := e.leader(leaseTTL + 5*time.Second)
			// Armed on every replica: whichever leads when the step falls
			// due dies there.
			for _, r := range e.replicas {
				if err := os.WriteFile(r.arm, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			e.createKeyBeforeArmed(leader, "k")
			// The leader dies at the failpoint (its scheduler ticks
			// every second; the step is due 2 s after creation).
			select {
			case <-leader.done:
			case <-time.After(15 * time.Second):
				t.Fatalf("%s did not die at %s:\n%s", leader.id, fp, leader.out)
			}
			died := time.Now()
			for _, r := range e.replicas {
				os.Remove(r.arm)
			}
			leader.cmd = nil
			next := e.leader(leaseTTL+2*time.Second+2*time.Second, leader)
			took := time.Since(died)
			t.Logf("%s died at %s; %s leads %v later", leader.id, fp, next.id, took.Round(time.Millisecond))
			if took > leaseTTL+2*time.Second {
				t.Errorf("new leader after %v, want within lease TTL + 2 s = %v", took, leaseTTL+2*time.Second)
			}
			// The new leader settles the interrupted step: the PENDING
			// version exists once, and no intent is left.
			if _, err := eventually(10*time.Second, func() error {
				recs := e.records()
				if len(recs) != 1 || len(recs[0].Versions) != 2 {
					return fmt.Errorf("records %+v, want k with 2 versions (the prepared one)", recs)
				}
				if in := e.intents(); len(in) != 0 {
					return fmt.Errorf("intents left: %+v", in)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			e.checkConsistent()
		})
	}
}

// createKeyBeforeArmed creates a key whose next version falls due 2 s
// later, on r, with the failpoint disarmed for the creation itself.
func (e *env) createKeyBeforeArmed(r *replica, name string) {
	e.t.Helper()
	for _, x := range e.replicas {
		os.Rename(x.arm, x.arm+".off")
	}
	e.createKey(r, name, &kbv1.RotationPolicy{RotationPeriod: durationpb.New(time.Hour),
		PrePublicationLead: durationpb.New(time.Hour - 2*time.Second)})
	for _, x := range e.replicas {
		os.Rename(x.arm+".off", x.arm)
	}
}

// TestPausedLeaderCannotCommit: the leader stops (SIGSTOP) just before it
// commits a prepared version and stays stopped past its lease. Another
// replica leads and commits its own; continued, the old leader's commit is
// refused (fenced) and its object removed.
func TestPausedLeaderCannotCommit(t *testing.T) {
	e := newEnv(t, envOptions{replicas: 3, failpoint: "before-commit:stop"})
	leader := e.leader(leaseTTL + 5*time.Second)
	for _, r := range e.replicas {
		if err := os.WriteFile(r.arm, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	e.createKeyBeforeArmed(leader, "k")
	// Stopped at the failpoint: its health stops answering.
	if _, err := eventually(15*time.Second, func() error {
		if processState(leader) != 'T' {
			return errors.New("not stopped")
		}
		return nil
	}); err != nil {
		t.Fatalf("%s did not stop at before-commit:\n%s", leader.id, leader.out)
	}
	for _, r := range e.replicas {
		os.Remove(r.arm)
	}
	next := e.leader(leaseTTL+4*time.Second, leader)
	if _, err := eventually(10*time.Second, func() error {
		recs := e.records()
		if len(recs) != 1 || len(recs[0].Versions) != 2 {
			return fmt.Errorf("records %+v, want k with 2 versions", recs)
		}
		return nil
	}); err != nil {
		t.Fatalf("the new leader %s did not prepare the next version: %v", next.id, err)
	}
	committed := e.records()[0].Versions[1].Kid
	leader.signal(syscall.SIGCONT)
	// The old leader goes on with its commit, which must fail; it gets a
	// new session and follows.
	time.Sleep(3 * time.Second)
	recs := e.records()
	if len(recs[0].Versions) != 2 || recs[0].Versions[1].Kid != committed {
		t.Errorf("after the old leader continued: versions %+v, want only the new leader's v2 %s", recs[0].Versions, committed)
	}
	if st := next.status(); st == nil || st.GetLeader() != next.id {
		t.Errorf("leader after the pause: %v, want %s", st, next.id)
	}
	e.checkConsistent()
}

// processState is the state letter of r's process in /proc (T: stopped).
func processState(r *replica) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", r.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	// pid (comm) S ...
	for i := len(b) - 1; i > 0; i-- {
		if b[i] == ')' && i+2 < len(b) {
			return b[i+2]
		}
	}
	return 0
}

// TestEtcdMembersLost: with one of three etcd members killed, nothing a
// client sees changes; with two, admin calls answer UNAVAILABLE and
// signing goes on until max_staleness, then UNAVAILABLE and NOT_SERVING;
// with the members back, everything serves again without a restart.
func TestEtcdMembersLost(t *testing.T) {
	e := newEnv(t, envOptions{replicas: 2})
	r1, r2 := e.replicas[0], e.replicas[1]
	e.createKey(r1, "k", nil)

	e.etcd.Kill(0)
	for i := range 10 {
		for _, r := range e.replicas {
			if _, err := r.sign("k", ""); err != nil {
				t.Fatalf("%s: sign with one etcd member down: %v", r.id, err)
			}
		}
		e.createKey(e.replicas[i%2], fmt.Sprintf("k%d", i), nil)
	}
	if _, err := eventually(propagation, func() error { _, err := r2.sign("k9", ""); return err }); err != nil {
		t.Errorf("a key created with one member down does not reach %s: %v", r2.id, err)
	}

	e.etcd.Kill(1)
	lost := time.Now()
	ctx, cancel := ctxFor(15 * time.Second)
	defer cancel()
	if _, err := r1.api().CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "nope", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); code(err) != codes.Unavailable {
		t.Errorf("CreateKey with two of three members down: %v, want UNAVAILABLE", err)
	}
	if time.Since(lost) < maxStaleness-time.Second {
		if _, err := r2.sign("k", ""); err != nil {
			t.Errorf("sign within the staleness bound: %v", err)
		}
	}
	took, err := eventually(maxStaleness+3*time.Second, func() error {
		_, err := r2.sign("k", "")
		if code(err) != codes.Unavailable {
			return fmt.Errorf("sign: %v, want UNAVAILABLE", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The bound runs from the last confirmed sync, at most one sync
	// interval (max_staleness/8) before the quorum was lost.
	if d := time.Since(lost); d < maxStaleness-maxStaleness/8-100*time.Millisecond {
		t.Errorf("refused signing %v after losing etcd, before the %v bound", d, maxStaleness)
	}
	t.Logf("signing refused %v after etcd lost its quorum", took.Round(time.Millisecond))
	if _, err := eventually(2*time.Second, func() error {
		if h := r2.health(); h != healthpb.HealthCheckResponse_NOT_SERVING {
			return fmt.Errorf("health %v", h)
		}
		return nil
	}); err != nil {
		t.Errorf("health past the bound: %v, want NOT_SERVING", err)
	}

	e.etcd.Restart(0)
	e.etcd.Restart(1)
	for _, r := range e.replicas {
		if _, err := eventually(20*time.Second, func() error { _, err := r.sign("k", ""); return err }); err != nil {
			t.Fatalf("%s does not sign again after etcd healed: %v\n%s", r.id, err, r.out)
		}
		r.waitServing(5 * time.Second)
	}
	if recs := e.records(); len(recs) != 11 {
		t.Errorf("%d keys stored, want 11 (the refused CreateKey stored nothing)", len(recs))
	}
	e.checkConsistent()
}

// TestPartitionedReplica: a replica in its own network namespace whose
// link to etcd is cut keeps signing until max_staleness after its last
// sync, then refuses; a version revoked elsewhere during the cut is never
// used by it after the bound; healed, it catches up without a restart.
func TestPartitionedReplica(t *testing.T) {
	e := newEnv(t, envOptions{replicas: 3, netns: true})
	r1, cut := e.replicas[0], e.replicas[2]
	k := e.createKey(r1, "k", nil)
	kid := k.GetActiveKid()
	if _, err := eventually(propagation, func() error { _, err := cut.sign("k", kid); return err }); err != nil {
		t.Fatal(err)
	}

	e.ns.cut()
	cutAt := time.Now()
	ctx, cancel := ctxFor(30 * time.Second)
	defer cancel()
	if _, err := r1.api().RevokeKeyVersion(ctx, &kbv1.RevokeKeyVersionRequest{Name: "k", Kid: kid}); err != nil {
		t.Fatal(err)
	}
	revokedAt := time.Now()
	// Until the bound it may still sign with what it holds; from the bound
	// on it must refuse everything, above all the revoked kid.
	deadline := cutAt.Add(maxStaleness + 2*time.Second)
	var lastOK time.Time
	for time.Now().Before(deadline.Add(2 * time.Second)) {
		_, err := cut.sign("k", kid)
		switch {
		case err == nil:
			lastOK = time.Now()
		case code(err) != codes.Unavailable:
			t.Fatalf("partitioned replica: sign %v, want success or UNAVAILABLE", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !lastOK.IsZero() && lastOK.After(revokedAt.Add(maxStaleness+time.Second)) {
		t.Errorf("the partitioned replica signed with the revoked kid %v after the revoke (bound %v)", lastOK.Sub(revokedAt), maxStaleness)
	}
	if _, err := cut.sign("k", ""); code(err) != codes.Unavailable {
		t.Errorf("past the bound: sign %v, want UNAVAILABLE", err)
	}
	if h := cut.health(); h != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("past the bound: health %v, want NOT_SERVING", h)
	}

	e.ns.heal()
	if _, err := eventually(20*time.Second, func() error { _, err := cut.sign("k", ""); return err }); err != nil {
		t.Fatalf("healed replica does not sign again: %v\n%s", err, cut.out)
	}
	if _, err := cut.sign("k", kid); code(err) != codes.FailedPrecondition {
		t.Errorf("healed replica, revoked kid: %v, want FAILED_PRECONDITION", err)
	}
	cut.waitServing(5 * time.Second)
	e.checkConsistent()
}
