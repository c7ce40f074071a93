package audit

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keybroker/keybroker/kms"
)

// returnBound is how long a Write that must fail may take before the test
// calls it stuck: far more than any Timeout used here.
const returnBound = 3 * time.Second

// countingSink is a Sink over a file that counts its Writes and Syncs.
type countingSink struct {
	f             *os.File
	syncDelay     time.Duration // the least a Sync takes
	writes, syncs atomic.Int64
}

func (s *countingSink) Write(b []byte) (int, error) { s.writes.Add(1); return s.f.Write(b) }

func (s *countingSink) Sync() error {
	s.syncs.Add(1)
	if s.syncDelay > 0 {
		// A disk's sync latency, which tmpfs lacks: the time during which
		// Writes pile up to be committed together.
		time.Sleep(s.syncDelay)
	}
	return s.f.Sync()
}

// newCountingSink returns a countingSink over a new file in a temporary
// directory, and the file's path.
func newCountingSink(t testing.TB) (*countingSink, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &countingSink{f: f}, path
}

// openLog opens a Log with o and closes it at cleanup, checking that its
// writer goroutine is gone by then.
func openLog(t testing.TB, path string, o Options) *Log {
	t.Helper()
	l, err := Open(path, o)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() {
		l.Close()
		select {
		case <-l.done:
		case <-time.After(returnBound):
			t.Errorf("writer goroutine still running %s after Close", returnBound)
		}
	})
	return l
}

// closeLog closes l and fails t on error.
func closeLog(t testing.TB, l *Log) {
	t.Helper()
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// record returns a plausible record for request i.
func record(i int) Record {
	return Record{
		RequestID:    fmt.Sprintf("req-%06d", i),
		Tenant:       []string{"acme", "globex", "initech"}[i%3],
		Caller:       fmt.Sprintf("uid:%d gid:%d", 1000+i%7, 1000),
		Method:       "/keybroker.v1.KeyBroker/Sign",
		Key:          "pop",
		Version:      uint32(1 + i%2),
		Kid:          "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs",
		Alg:          "ES256",
		DigestSHA256: DigestSHA256([]byte{byte(i), byte(i >> 8)}),
		Code:         []string{"OK", "OK", "PERMISSION_DENIED"}[i%3],
		LatencyMS:    0.25 + float64(i%100)*1.5,
	}
}

// writeN writes records first..first+n-1 to l, one after the other.
func writeN(t testing.TB, l *Log, first, n int) {
	t.Helper()
	for i := first; i < first+n; i++ {
		if err := l.Write(t.Context(), record(i)); err != nil {
			t.Fatalf("Write %d: %v", i, err)
		}
	}
}

// lines splits a log into its lines, each with its newline.
func lines(t testing.TB, b []byte) [][]byte {
	t.Helper()
	if len(b) > 0 && b[len(b)-1] != '\n' {
		t.Fatalf("log does not end with a newline")
	}
	ls := bytes.SplitAfter(b, []byte("\n"))
	return ls[:len(ls)-1] // after the last newline: ""
}

func lineHash(line []byte) string {
	sum := sha256.Sum256(bytes.TrimSuffix(line, []byte("\n")))
	return hex.EncodeToString(sum[:])
}

// checkChain checks, independently of Verify, that b holds records with
// seqs 1..want in order, each holding the hash of the line before, and
// returns the head of b.
func checkChain(t testing.TB, b []byte, want int) Head {
	t.Helper()
	ls := lines(t, b)
	if len(ls) != want {
		t.Fatalf("log has %d lines, want %d", len(ls), want)
	}
	prev := ZeroHash
	for i, line := range ls {
		var r Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("line %d: %v", i+1, err)
		}
		if r.Seq != uint64(i+1) {
			t.Fatalf("line %d: seq %d, want %d", i+1, r.Seq, i+1)
		}
		if r.Prev != prev {
			t.Fatalf("line %d: prev %s, want %s", i+1, r.Prev, prev)
		}
		prev = lineHash(line)
	}
	return Head{Seq: uint64(want), Hash: prev}
}

func TestRoundTrip(t *testing.T) {
	const writers, perWriter = 50, 200
	sink, path := newCountingSink(t)
	sink.syncDelay = 200 * time.Microsecond
	l := openLog(t, "", Options{Sink: sink, Timeout: time.Minute})

	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			for i := range perWriter {
				if err := l.Write(t.Context(), record(w*perWriter+i)); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Write: %v", err)
	}
	closeLog(t, l)

	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	const total = writers * perWriter
	want := checkChain(t, b, total)
	if got := l.Head(); got != want {
		t.Errorf("Head() = %+v, want %+v", got, want)
	}
	head := l.Head()
	if n, err := Verify(bytes.NewReader(b), &head); err != nil || n != total {
		t.Errorf("Verify = %d, %v; want %d, nil", n, err, total)
	}
	// Every record arrived once: the request ids are those written.
	seen := make(map[string]bool)
	for _, line := range lines(t, b) {
		var r Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatal(err)
		}
		seen[r.RequestID] = true
	}
	if len(seen) != total {
		t.Errorf("%d distinct request ids, want %d", len(seen), total)
	}
	syncs, writes := sink.syncs.Load(), sink.writes.Load()
	t.Logf("%d records in %d writes and %d syncs", total, writes, syncs)
	if syncs > total/4 {
		t.Errorf("%d syncs for %d records from %d writers: no group commit", syncs, total, writers)
	}
	if writes != syncs {
		t.Errorf("%d writes but %d syncs, want one write per sync", writes, syncs)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.queued != 0 {
		t.Errorf("%d bytes still counted as queued after Close", l.queued)
	}
}

// TestConcurrentFile is TestRoundTrip on a real file, with its head file.
func TestConcurrentFile(t *testing.T) {
	const writers, perWriter = 20, 50
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path, Options{Timeout: time.Minute})
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := w * perWriter; i < (w+1)*perWriter; i++ {
				if err := l.Write(t.Context(), record(i)); err != nil {
					t.Errorf("Write %d: %v", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	closeLog(t, l)
	verifyFile(t, path, writers*perWriter)
}

// gateSink is a Sink whose first Sync waits for release: a disk slow to
// sync once.
type gateSink struct {
	countingSink
	entered chan struct{} // closed when the first Sync starts
	release chan struct{}
	once    sync.Once
}

func (s *gateSink) Sync() error {
	s.once.Do(func() {
		close(s.entered)
		<-s.release
	})
	return s.countingSink.Sync()
}

// TestGroupCommit checks that the Writes that arrive while a sync is under
// way are committed together, with one write and one sync.
func TestGroupCommit(t *testing.T) {
	const waiting = 49
	cs, path := newCountingSink(t)
	sink := &gateSink{countingSink: countingSink{f: cs.f}, entered: make(chan struct{}), release: make(chan struct{})}
	l := openLog(t, "", Options{Sink: sink, Timeout: time.Minute})

	errs := make(chan error, waiting+1)
	go func() { errs <- l.Write(t.Context(), record(0)) }()
	<-sink.entered
	for i := range waiting {
		go func() { errs <- l.Write(t.Context(), record(i+1)) }()
	}
	// Wait until all of them are queued behind the slow sync.
	deadline := time.Now().Add(returnBound)
	for {
		l.mu.Lock()
		n := len(l.queue)
		l.mu.Unlock()
		if n == waiting {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d writes queued after %s, want %d", n, returnBound, waiting)
		}
		runtime.Gosched()
	}
	close(sink.release)
	for range waiting + 1 {
		if err := <-errs; err != nil {
			t.Fatalf("Write: %v", err)
		}
	}
	if w, s := sink.writes.Load(), sink.syncs.Load(); w != 2 || s != 2 {
		t.Errorf("%d writes and %d syncs for 1 record then %d, want 2 and 2", w, s, waiting)
	}
	closeLog(t, l)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	checkChain(t, b, waiting+1)
}

func TestRecordLine(t *testing.T) {
	sink, path := newCountingSink(t)
	now := time.Date(2026, 3, 4, 5, 6, 7, 890, time.FixedZone("CET", 3600))
	l := openLog(t, "", Options{Sink: sink, Now: func() time.Time { return now }})
	r := Record{
		RequestID: "r1", Tenant: "acme", Caller: "uid:1000 gid:1000", Method: "/keybroker.v1.KeyBroker/Sign",
		Key: "pop", Version: 2, Kid: "kid2", Alg: "PS256", DigestSHA256: DigestSHA256([]byte("digest")),
		Code: "OK", LatencyMS: 1.5,
		Seq: 99, Prev: "ignored", // set by Write
	}
	if err := l.Write(t.Context(), r); err != nil {
		t.Fatal(err)
	}
	// A given time is kept, in UTC; the omitempty fields go.
	given := time.Date(2026, 1, 1, 12, 0, 0, 0, time.FixedZone("X", -7200))
	if err := l.Write(t.Context(), Record{Time: given, RequestID: "r2", Method: "/grpc.health.v1.Health/Check", Code: "PERMISSION_DENIED"}); err != nil {
		t.Fatal(err)
	}
	closeLog(t, l)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ls := lines(t, b)
	want1 := `{"seq":1,"time":"2026-03-04T04:06:07.00000089Z","request_id":"r1","tenant":"acme","caller":"uid:1000 gid:1000",` +
		`"method":"/keybroker.v1.KeyBroker/Sign","key":"pop","version":2,"kid":"kid2","alg":"PS256",` +
		`"digest_sha256":"` + DigestSHA256([]byte("digest")) + `","code":"OK","latency_ms":1.5,"prev":"` + ZeroHash + `"}` + "\n"
	if string(ls[0]) != want1 {
		t.Errorf("line 1:\n%s\nwant:\n%s", ls[0], want1)
	}
	want2 := `{"seq":2,"time":"2026-01-01T14:00:00Z","request_id":"r2","method":"/grpc.health.v1.Health/Check",` +
		`"code":"PERMISSION_DENIED","latency_ms":0,"prev":"` + lineHash(ls[0]) + `"}` + "\n"
	if string(ls[1]) != want2 {
		t.Errorf("line 2:\n%s\nwant:\n%s", ls[1], want2)
	}
	if got, want := DigestSHA256([]byte("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; got != want {
		t.Errorf("DigestSHA256(abc) = %s, want %s (FIPS 180-2 B.1)", got, want)
	}
}

func TestReopenContinuesChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path, Options{})
	writeN(t, l, 0, 5)
	closeLog(t, l)
	if h, err := ReadHead(path + ".head"); err != nil || h.Seq != 5 {
		t.Fatalf("head after session 1 = %+v, %v; want seq 5", h, err)
	}

	l = openLog(t, path, Options{})
	if h := l.Head(); h.Seq != 5 {
		t.Errorf("reopened Head() = %+v, want seq 5", h)
	}
	writeN(t, l, 5, 7)
	closeLog(t, l)

	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := checkChain(t, b, 12)
	head, err := ReadHead(path + ".head")
	if err != nil {
		t.Fatal(err)
	}
	if head != want {
		t.Errorf("head file = %+v, want %+v", head, want)
	}
	if n, err := Verify(bytes.NewReader(b), &head); err != nil || n != 12 {
		t.Errorf("Verify = %d, %v; want 12, nil", n, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("log mode %v, want 0600", perm)
	}
}

func TestOpenNew(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(filepath.Join(dir, "missing", "audit.log"), Options{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Open in a missing directory: %v, want fs.ErrNotExist", err)
	}
	path := filepath.Join(dir, "audit.log")
	l := openLog(t, path, Options{})
	// An empty log has a head too, so that a log whose head is removed
	// later is noticed.
	if h, err := ReadHead(path + ".head"); err != nil || h != (Head{0, ZeroHash}) {
		t.Errorf("head of a new log = %+v, %v; want {0 %s}", h, err, ZeroHash)
	}
	closeLog(t, l)
	// Closing an empty log and opening it again is fine.
	closeLog(t, openLog(t, path, Options{}))
}

// writeLog writes n records to a new log in a temporary directory and
// returns its path.
func writeLog(t testing.TB, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path, Options{})
	writeN(t, l, 0, n)
	closeLog(t, l)
	return path
}

func TestOpenRefusesTampered(t *testing.T) {
	tests := []struct {
		name    string
		tamper  func(t *testing.T, path string)
		wantErr string
	}{
		{"edited record", func(t *testing.T, path string) {
			editFile(t, path, func(b []byte) []byte { return bytes.Replace(b, []byte(`"req-000001"`), []byte(`"req-000009"`), 1) })
		}, "line 3 (seq 3): prev hash mismatch"},
		{"last line removed", func(t *testing.T, path string) {
			editFile(t, path, func(b []byte) []byte { return b[:bytes.LastIndexByte(b[:len(b)-1], '\n')+1] })
		}, "line 5 (seq 5): missing"},
		{"emptied", func(t *testing.T, path string) {
			editFile(t, path, func([]byte) []byte { return nil })
		}, "line 1 (seq 1): missing"},
		{"last line cut short", func(t *testing.T, path string) {
			editFile(t, path, func(b []byte) []byte { return b[:len(b)-10] })
		}, "line 5 (seq 5): missing"},
		{"head removed", func(t *testing.T, path string) {
			if err := os.Remove(path + ".head"); err != nil {
				t.Fatal(err)
			}
		}, "head file " + "%s.head is missing"},
		{"head garbled", func(t *testing.T, path string) {
			if err := os.WriteFile(path+".head", []byte(`{"seq":5}`), 0o600); err != nil {
				t.Fatal(err)
			}
		}, `hash: got ""`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeLog(t, 5)
			tt.tamper(t, path)
			l, err := Open(path, Options{})
			if err == nil {
				l.Close()
				t.Fatal("Open of a tampered log succeeded")
			}
			if want := strings.ReplaceAll(tt.wantErr, "%s", path); !strings.Contains(err.Error(), want) {
				t.Errorf("Open: %v, want %q", err, want)
			}
			if !errors.Is(err, ErrRefused) {
				t.Errorf("Open: %v, want ErrRefused", err)
			}
		})
	}

	// A log missing while its head names records is no refusal: a new
	// segment starts, whose first record says what was lost.
	t.Run("log removed", func(t *testing.T) {
		path := writeLog(t, 5)
		old, err := ReadHead(path + ".head")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		l := openLog(t, path, Options{})
		writeN(t, l, 6, 1)
		closeLog(t, l)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var first Record
		if err := decodeRecord(lines(t, b)[0], &first); err != nil {
			t.Fatal(err)
		}
		if first.Method != MethodBreak || first.Seq != 6 || first.Prev != old.Hash || first.Break == nil ||
			first.Break.AfterSeq != 5 || first.Break.AfterHash != old.Hash || !strings.Contains(first.Break.Reason, "missing at start") {
			t.Errorf("first record = %+v, want a break after seq 5, %s", first, old.Hash)
		}
		head, err := ReadHead(path + ".head")
		if err != nil {
			t.Fatal(err)
		}
		res, err := VerifyLog(bytes.NewReader(b), &head)
		if err != nil || res.Records != 2 || res.LastSeq != 7 || len(res.Breaks) != 1 {
			t.Fatalf("VerifyLog = %+v, %v; want 2 records up to seq 7 and one break", res, err)
		}
		if br := res.Breaks[0]; br.Line != 1 || br.First != 1 || br.Last != 5 {
			t.Errorf("break = %+v, want records 1 to 5 missing before line 1", br)
		}
	})
}

// editFile replaces the content of the file at path with edit of it.
func editFile(t testing.TB, path string, edit func([]byte) []byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, edit(b), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestOpenRepairsCrash checks the states a crash leaves behind: records
// synced after the head, and a torn last line after the head.
func TestOpenRepairsCrash(t *testing.T) {
	t.Run("head behind the log", func(t *testing.T) {
		path := writeLog(t, 3)
		old, err := os.ReadFile(path + ".head")
		if err != nil {
			t.Fatal(err)
		}
		l := openLog(t, path, Options{})
		writeN(t, l, 3, 2)
		closeLog(t, l)
		if err := os.WriteFile(path+".head", old, 0o600); err != nil {
			t.Fatal(err)
		}

		l = openLog(t, path, Options{})
		if h := l.Head(); h.Seq != 5 {
			t.Errorf("Head() = %+v, want seq 5", h)
		}
		writeN(t, l, 5, 1)
		closeLog(t, l)
		verifyFile(t, path, 6)
	})
	t.Run("head behind the log, hash wrong", func(t *testing.T) {
		path := writeLog(t, 5)
		if err := os.WriteFile(path+".head", []byte(`{"seq":3,"hash":"`+strings.Repeat("ab", 32)+`"}`), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(path, Options{}); err == nil || !strings.Contains(err.Error(), "line 3 (seq 3): hash mismatch with the head") {
			t.Errorf("Open: %v, want a hash mismatch at line 3", err)
		}
	})
	t.Run("torn line after the head", func(t *testing.T) {
		path := writeLog(t, 4)
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteString(`{"seq":5,"time":"2026-`); err != nil {
			t.Fatal(err)
		}
		f.Close()

		l := openLog(t, path, Options{})
		writeN(t, l, 4, 2)
		closeLog(t, l)
		verifyFile(t, path, 6)
	})
}

// verifyFile checks that the log at path verifies against its head file
// with want records.
func verifyFile(t testing.TB, path string, want int) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	head, err := ReadHead(path + ".head")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := Verify(bytes.NewReader(b), &head); err != nil || n != want {
		t.Errorf("Verify = %d, %v; want %d, nil", n, err, want)
	}
	checkChain(t, b, want)
}

// blockedSink is a Sink whose Write blocks until release is closed, then
// fails.
type blockedSink struct {
	entered chan struct{} // receives when a Write starts
	release chan struct{}
}

func (s *blockedSink) Write(b []byte) (int, error) {
	s.entered <- struct{}{}
	<-s.release
	return 0, errors.New("disk gone")
}

func (s *blockedSink) Sync() error { return nil }

// writeAsync runs l.Write in a goroutine and fails t unless it returns
// within returnBound.
func writeAsync(t testing.TB, l *Log, r Record) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- l.Write(context.Background(), r) }()
	select {
	case err := <-errc:
		return err
	case <-time.After(returnBound):
		t.Fatalf("Write still blocked after %s", returnBound)
		return nil
	}
}

func TestBlockedSink(t *testing.T) {
	sink := &blockedSink{entered: make(chan struct{}, 1), release: make(chan struct{})}
	const timeout = 100 * time.Millisecond
	l := openLog(t, "", Options{Sink: sink, Timeout: timeout})
	t.Cleanup(func() { close(sink.release) }) // runs before openLog's cleanup

	start := time.Now()
	err := writeAsync(t, l, record(1))
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Write to a blocked sink: %v, want ErrUnavailable", err)
	}
	if took := time.Since(start); took < timeout {
		t.Errorf("Write failed after %s, before Timeout %s", took, timeout)
	}
	<-sink.entered
	// The writer goroutine is stuck; later Writes time out as well.
	for i := range 3 {
		if err := writeAsync(t, l, record(2+i)); !errors.Is(err, kms.ErrUnavailable) {
			t.Errorf("Write %d to a blocked sink: %v, want ErrUnavailable", 2+i, err)
		}
	}
	if err := l.Close(); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Close with a blocked sink: %v, want ErrUnavailable", err)
	}
}

// failingSink is a Sink whose Write or Sync fails.
type failingSink struct {
	failWrite     bool
	writes, syncs atomic.Int64
}

func (s *failingSink) Write(b []byte) (int, error) {
	s.writes.Add(1)
	if s.failWrite {
		return 0, errors.New("no space left on device")
	}
	return len(b), nil
}

func (s *failingSink) Sync() error {
	s.syncs.Add(1)
	if !s.failWrite {
		return errors.New("input/output error")
	}
	return nil
}

// countingHandler is a slog.Handler that counts records by level.
type countingHandler struct {
	mu     sync.Mutex
	counts map[slog.Level]int
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.counts[r.Level]++
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

func (h *countingHandler) count(level slog.Level) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.counts[level]
}

func TestFailingSink(t *testing.T) {
	for _, failWrite := range []bool{true, false} {
		t.Run(fmt.Sprintf("failWrite=%t", failWrite), func(t *testing.T) {
			sink := &failingSink{failWrite: failWrite}
			logs := &countingHandler{counts: make(map[slog.Level]int)}
			// A Timeout far beyond returnBound: failing fast is not timing out.
			l := openLog(t, "", Options{Sink: sink, Timeout: time.Hour, Log: slog.New(logs)})

			for i := range 5 {
				err := writeAsync(t, l, record(i))
				if !errors.Is(err, ErrUnavailable) || !errors.Is(err, kms.ErrUnavailable) {
					t.Errorf("Write %d: %v, want ErrUnavailable", i, err)
				}
				if want := map[bool]string{true: "no space left", false: "input/output error"}[failWrite]; err != nil && !strings.Contains(err.Error(), want) {
					t.Errorf("Write %d: %v, want the cause %q", i, err, want)
				}
			}
			if n := sink.writes.Load(); n != 1 {
				t.Errorf("sink written %d times, want 1: a failed log must not go on", n)
			}
			if n := logs.count(slog.LevelError); n != 1 {
				t.Errorf("%d error logs, want 1", n)
			}
			if h := l.Head(); h != (Head{0, ZeroHash}) {
				t.Errorf("Head() = %+v, want nothing durable", h)
			}
			if err := l.Close(); !errors.Is(err, kms.ErrUnavailable) {
				t.Errorf("Close of a failed log: %v, want ErrUnavailable", err)
			}
		})
	}
}

func TestWriteRefusals(t *testing.T) {
	sink, path := newCountingSink(t)
	l := openLog(t, "", Options{Sink: sink})

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := l.Write(ctx, record(0)); !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.Canceled) {
		t.Errorf("Write with a canceled context: %v, want ErrUnavailable and context.Canceled", err)
	}
	big := record(0)
	big.RequestID = strings.Repeat("x", MaxLineBytes)
	if err := l.Write(t.Context(), big); err == nil || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "want at most") {
		t.Errorf("Write of a too big record: %v, want a size error", err)
	}
	nan := record(0)
	nan.LatencyMS = math.NaN()
	if err := l.Write(t.Context(), nan); err == nil || errors.Is(err, ErrUnavailable) {
		t.Errorf("Write with a NaN latency: %v, want an encoding error", err)
	}
	// None of them took a seq.
	writeN(t, l, 0, 1)
	closeLog(t, l)
	if err := l.Write(t.Context(), record(1)); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Write after Close: %v, want ErrUnavailable", err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	checkChain(t, b, 1)
}

// TestCloseDrains checks that Close waits for the records queued.
func TestCloseDrains(t *testing.T) {
	cs, path := newCountingSink(t)
	sink := &gateSink{countingSink: countingSink{f: cs.f}, entered: make(chan struct{}), release: make(chan struct{})}
	l := openLog(t, "", Options{Sink: sink, Timeout: time.Minute})
	errs := make(chan error, 2)
	go func() { errs <- l.Write(t.Context(), record(0)) }()
	<-sink.entered
	go func() { errs <- l.Write(t.Context(), record(1)) }()
	closed := make(chan error, 1)
	go func() { closed <- l.Close() }()
	close(sink.release)
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	for range 2 {
		// The second Write either made it before Close or was refused.
		if err := <-errs; err != nil && !errors.Is(err, ErrUnavailable) {
			t.Errorf("Write: %v", err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n := bytes.Count(b, []byte("\n"))
	if n < 1 || n > 2 {
		t.Fatalf("%d lines, want 1 or 2", n)
	}
	checkChain(t, b, n)
	if h := l.Head(); h.Seq != uint64(n) {
		t.Errorf("Head() after Close = %+v, want seq %d", h, n)
	}
}

func TestLongLines(t *testing.T) {
	sink, path := newCountingSink(t)
	l := openLog(t, "", Options{Sink: sink})
	r := record(0)
	r.RequestID = strings.Repeat("y", 200<<10) // beyond bufio's default buffers
	if err := l.Write(t.Context(), r); err != nil {
		t.Fatal(err)
	}
	writeN(t, l, 1, 2)
	closeLog(t, l)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	head := l.Head()
	if n, err := Verify(bytes.NewReader(b), &head); err != nil || n != 3 {
		t.Errorf("Verify = %d, %v; want 3, nil", n, err)
	}

	huge := append(bytes.Repeat([]byte("z"), MaxLineBytes+1), '\n')
	var verr *VerifyError
	if _, err := Verify(bytes.NewReader(append(b, huge...)), nil); !errors.As(err, &verr) || verr.Line != 4 || !strings.Contains(verr.Reason, "longer than") {
		t.Errorf("Verify with a huge line: %v, want a VerifyError for line 4", err)
	}
}

func TestReadHead(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		content string
		wantErr string
	}{
		{`{"seq":3,"hash":"` + strings.Repeat("0a", 32) + `"}` + "\n", ""},
		{`{"seq":3,"hash":"` + strings.Repeat("0A", 32) + `"}`, "want 64 lowercase hex digits"},
		{`{"seq":3,"hash":"abc"}`, "want 64 lowercase hex digits"},
		{`{"seq":3,"hash":"` + ZeroHash + `","x":1}`, "unknown field"},
		{`{"seq":3,"hash":"` + ZeroHash + `"}{}`, "data after the head"},
		{`{"seq":-1,"hash":"` + ZeroHash + `"}`, "cannot unmarshal"},
		{``, "EOF"},
	}
	for i, tt := range tests {
		path := filepath.Join(dir, fmt.Sprint(i))
		if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
			t.Fatal(err)
		}
		h, err := ReadHead(path)
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("ReadHead(%q): %v", tt.content, err)
		case tt.wantErr == "" && h != (Head{3, strings.Repeat("0a", 32)}):
			t.Errorf("ReadHead(%q) = %+v", tt.content, h)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("ReadHead(%q): %v, want %q", tt.content, err, tt.wantErr)
		}
	}
	if _, err := ReadHead(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ReadHead of a missing file: %v, want fs.ErrNotExist", err)
	}
}

// waitHead polls the head file at path until its seq is want, failing t
// after returnBound.
func waitHead(t *testing.T, path string, want uint64) Head {
	t.Helper()
	deadline := time.Now().Add(returnBound)
	for {
		h, err := ReadHead(path)
		if err == nil && h.Seq == want {
			return h
		}
		if time.Now().After(deadline) {
			t.Fatalf("head file %s = %+v, %v after %s; want seq %d", path, h, err, returnBound, want)
		}
		time.Sleep(time.Millisecond)
	}
}

// The head file follows the log while it is open, not only at Close, and
// records the hash of the last durable line.
func TestHeadFollowsLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path, Options{HeadEvery: time.Millisecond})
	writeN(t, l, 0, 3)
	if h := waitHead(t, path+".head", 3); h != l.Head() {
		t.Errorf("head file %+v, Head() %+v", h, l.Head())
	}
	writeN(t, l, 3, 4)
	waitHead(t, path+".head", 7)
	writeN(t, l, 7, 1)
	closeLog(t, l)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := checkChain(t, b, 8)
	if h, err := ReadHead(path + ".head"); err != nil || h != want {
		t.Errorf("head after Close = %+v, %v; want %+v", h, err, want)
	}
}

// A head file that cannot be written fails the log like a failing sink:
// an error logged once, later Writes and Close UNAVAILABLE, and the head
// file still the last one written.
func TestHeadWriteFails(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	logs := &countingHandler{counts: make(map[slog.Level]int)}
	l := openLog(t, path, Options{HeadEvery: time.Millisecond, Log: slog.New(logs)})
	writeN(t, l, 0, 2)
	waitHead(t, path+".head", 2)
	// writeHead writes path.head.tmp first: a directory there fails it.
	if err := os.Mkdir(path+".head.tmp", 0o700); err != nil {
		t.Fatal(err)
	}
	var err error
	deadline := time.Now().Add(returnBound)
	for i := 2; err == nil; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("Writes still succeed %s after the head file stopped being writable", returnBound)
		}
		err = l.Write(t.Context(), record(i))
	}
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "recording head") {
		t.Errorf("Write after the head failed: %v, want ErrUnavailable naming the head", err)
	}
	if err := l.Close(); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Close: %v, want ErrUnavailable", err)
	}
	if n := logs.count(slog.LevelError); n != 1 {
		t.Errorf("%d error logs, want 1", n)
	}
	if h, err := ReadHead(path + ".head"); err != nil || h.Seq != 2 {
		t.Errorf("head file = %+v, %v; want seq 2 still", h, err)
	}
}

// switchSink writes to f until fail is set, then fails.
type switchSink struct {
	f    *os.File
	fail atomic.Bool
}

func (s *switchSink) Write(b []byte) (int, error) {
	if s.fail.Load() {
		return 0, errors.New("no space left on device")
	}
	return s.f.Write(b)
}

func (s *switchSink) Sync() error { return s.f.Sync() }

// TestCloseAnchorsAfterSinkFailure checks that after a failure of the
// sink, Close still moves the head file up to the last record
// acknowledged, and still reports the failure: the log of a daemon
// stopped cleanly verifies.
func TestCloseAnchorsAfterSinkFailure(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	// A HeadEvery longer than the test: only Close moves the head past 1.
	l := openLog(t, path, Options{HeadEvery: time.Hour})
	s := &switchSink{f: l.file}
	l.sink = s // before any Write, which orders it before the writer's use
	writeN(t, l, 0, 1)
	waitHead(t, path+".head", 1)
	writeN(t, l, 1, 3) // acknowledged: durable, but not in the head file
	s.fail.Store(true)
	if err := l.Write(t.Context(), record(4)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Write to a failed sink: %v, want ErrUnavailable", err)
	}
	if err := l.Close(); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "no space left") {
		t.Errorf("Close after a sink failure: %v, want ErrUnavailable with the cause", err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := checkChain(t, b, 4)
	head, err := ReadHead(path + ".head")
	if err != nil || head != want {
		t.Fatalf("head file = %+v, %v; want %+v, the last record acknowledged", head, err, want)
	}
	if res, err := VerifyLog(bytes.NewReader(b), &head); err != nil || res.Records != 4 || res.LastSeq != 4 || res.Unanchored() || len(res.Breaks) != 0 {
		t.Errorf("VerifyLog = %+v, %v; want 4 records, none after the head", res, err)
	}
}

// TestCloseWritesLastHead checks that Close writes the last head at once,
// also while the anchor goroutine waits out HeadEvery.
func TestCloseWritesLastHead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path, Options{HeadEvery: time.Hour})
	writeN(t, l, 0, 1)
	waitHead(t, path+".head", 1)
	writeN(t, l, 1, 2)
	start := time.Now()
	closeLog(t, l)
	if took := time.Since(start); took > returnBound {
		t.Errorf("Close took %s", took)
	}
	verifyFile(t, path, 3)
	if h, err := ReadHead(path + ".head"); err != nil || h.Seq != 3 {
		t.Errorf("head file after Close = %+v, %v; want seq 3", h, err)
	}
}

// TestQueueBoundCountsBatchInFlight checks that the bound on queued bytes
// counts the batch the writer is committing, not only the lines waiting
// behind it: a stuck writer holds its batch too.
func TestQueueBoundCountsBatchInFlight(t *testing.T) {
	sink := &blockedSink{entered: make(chan struct{}, 1), release: make(chan struct{})}
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	l := openLog(t, "", Options{Sink: sink, Timeout: 20 * time.Millisecond, Now: func() time.Time { return now }})
	t.Cleanup(func() { close(sink.release) }) // runs before openLog's cleanup

	r := record(0)
	r.RequestID = strings.Repeat("x", 4000)
	r.Time, r.Seq, r.Prev = now, 1, ZeroHash
	line, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	lineLen := len(line) + 1 // the same for seqs 1 to 9
	const fit = 3
	bound := fit*lineLen + lineLen/2
	l.mu.Lock()
	l.maxQueued = bound
	l.mu.Unlock()

	// The first record: the writer takes it and is stuck writing it.
	if err := writeAsync(t, l, r); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "not durable") {
		t.Fatalf("Write 1: %v, want not durable in time", err)
	}
	<-sink.entered
	accepted := 1
	for i := 2; ; i++ {
		if i > 9 {
			t.Fatalf("%d records of %d bytes accepted with a bound of %d", accepted, lineLen, bound)
		}
		err := writeAsync(t, l, r)
		if err != nil && strings.Contains(err.Error(), "already wait") {
			break
		}
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "not durable") {
			t.Fatalf("Write %d: %v, want not durable in time", i, err)
		}
		accepted++
	}
	if accepted != fit {
		t.Errorf("%d records of %d bytes held (1 being written) with a bound of %d bytes, want %d",
			accepted, lineLen, bound, fit)
	}
}
