package audit

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestSyncInterval: with Options.SyncInterval, Writes return once their
// batch is written, syncs happen at most once per interval, lines written
// and not yet synced are synced within about an interval even with no new
// Write, and Close syncs what is left; the head (synced) follows the
// syncs while Head (acknowledged) follows the writes.
func TestSyncInterval(t *testing.T) {
	sink, path := newCountingSink(t)
	sink.syncDelay = 5 * time.Millisecond
	const interval = 300 * time.Millisecond
	var batches, records atomic.Int64
	l := openLog(t, "", Options{Sink: sink, SyncInterval: interval,
		OnBatch: func(n int) { batches.Add(1); records.Add(int64(n)) }})
	ctx := context.Background()
	start := time.Now()
	for i := range 40 {
		if err := l.Write(ctx, Record{RequestID: "r", Method: "/m", Code: "OK", Key: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	if got := sink.writes.Load(); got != 40 {
		t.Errorf("%d writes for 40 sequential records, want 40", got)
	}
	if max := int64(elapsed/interval) + 2; sink.syncs.Load() > max {
		t.Errorf("%d syncs in %v, want at most %d with a %v interval", sink.syncs.Load(), elapsed, max, interval)
	}
	if batches.Load() != 40 || records.Load() != 40 {
		t.Errorf("OnBatch: %d batches of %d records, want 40 of 40", batches.Load(), records.Load())
	}
	if h := l.Head(); h.Seq != 40 {
		t.Errorf("Head after 40 acknowledged writes: %+v", h)
	}
	// Idle: the last lines get synced within about an interval.
	before := sink.syncs.Load()
	deadline := time.Now().Add(3 * interval)
	for {
		l.mu.Lock()
		synced := l.synced
		l.mu.Unlock()
		if synced.Seq == 40 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("synced head %+v %v after the last write, want seq 40", synced, 3*interval)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if sink.syncs.Load() != before+1 {
		t.Errorf("%d syncs while idle, want 1", sink.syncs.Load()-before)
	}
	// Close syncs a line written just before it.
	if err := l.Write(ctx, Record{RequestID: "r", Method: "/m", Code: "OK"}); err != nil {
		t.Fatal(err)
	}
	before = sink.syncs.Load()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if sink.syncs.Load() != before+1 {
		t.Errorf("Close made %d syncs, want 1", sink.syncs.Load()-before)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	head := l.Head()
	if n, err := Verify(f, &head); err != nil || n != 41 {
		t.Errorf("the log: %d records, %v; want 41 that verify", n, err)
	}
}

// TestChainLineMatchesEncodeLine: the line spliced from a body encoded
// outside the lock is byte for byte the line of the whole record.
func TestChainLineMatchesEncodeLine(t *testing.T) {
	recs := []Record{
		{},
		{Time: time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC), RequestID: "id", Tenant: "t\"<>&\u2028", Caller: "uid:1",
			Method: "/keybroker.v1.KeyBroker/Sign", Key: "k", Version: 3, Kid: "kid", Replica: "r-1", Alg: "ES256",
			DigestSHA256: "ab", Code: "OK", LatencyMS: 1.5, Note: "n"},
		{Method: MethodBreak, Break: &Break{AfterSeq: 7, AfterHash: ZeroHash, Reason: "gone"}},
	}
	for i, r := range recs {
		r.Seq, r.Prev = uint64(1000+i), strings.Repeat("ab", 32)
		want, wantHead, err := encodeLine(r)
		if err != nil {
			t.Fatal(err)
		}
		mid, err := encodeBody(r)
		if err != nil {
			t.Fatal(err)
		}
		got, head, err := chainLine(mid, r.Seq, r.Prev)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want) || head != wantHead {
			t.Errorf("record %d:\n got %s %+v\nwant %s %+v", i, got, head, want, wantHead)
		}
	}
}

// TestQueuedRecordsShareSyncs: with every Write's batch synced (no
// SyncInterval), a batch of queued records alone is written at once but
// not synced on its own: the next Write's sync, or queuedSyncEvery,
// covers it, so a flood of public reads does not make an fsync per batch.
func TestQueuedRecordsShareSyncs(t *testing.T) {
	sink, _ := newCountingSink(t)
	l := openLog(t, "", Options{Sink: sink})
	ctx := context.Background()
	if err := l.Write(ctx, Record{RequestID: "r", Method: "/m", Code: "OK"}); err != nil {
		t.Fatal(err)
	}
	before := sink.syncs.Load()
	start := time.Now()
	for i := range 200 {
		if err := l.Queue(Record{RequestID: "q", Method: "/read", Code: "OK", Key: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Microsecond) // many small batches
	}
	for deadline := time.Now().Add(5 * time.Second); l.Head().Seq != 201; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("queued records not written: head %+v", l.Head())
		}
	}
	elapsed := time.Since(start)
	if max := int64(elapsed/queuedSyncEvery) + 2; sink.syncs.Load()-before > max {
		t.Errorf("%d syncs for 200 queued records in %v, want at most %d", sink.syncs.Load()-before, elapsed, max)
	}
	// A Write is synced at once, the queued records before it with it.
	before = sink.syncs.Load()
	if err := l.Write(ctx, Record{RequestID: "r", Method: "/m", Code: "OK"}); err != nil {
		t.Fatal(err)
	}
	if sink.syncs.Load() <= before {
		t.Error("a Write returned before a sync")
	}
	l.mu.Lock()
	synced := l.synced
	l.mu.Unlock()
	if synced.Seq != 202 {
		t.Errorf("synced head %+v after the Write, want seq 202", synced)
	}
	// Queued records alone are synced within about queuedSyncEvery.
	if err := l.Queue(Record{RequestID: "q", Method: "/read", Code: "OK"}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * queuedSyncEvery); ; time.Sleep(5 * time.Millisecond) {
		l.mu.Lock()
		synced = l.synced
		l.mu.Unlock()
		if synced.Seq == 203 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a queued record not synced within %v: synced head %+v", 20*queuedSyncEvery, synced)
		}
	}
}
