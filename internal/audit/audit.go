// Package audit is keybroker's audit log: one JSON line per RPC, every line
// carrying the SHA-256 of the line before it, so that an edited, removed,
// duplicated or reordered record breaks the chain. A small head file next to
// the log holds the seq and hash of a durable line — the last one, give or
// take Options.HeadEvery while the log is open, and exactly the last once
// it is closed; it is what makes the removal of whole trailing lines
// detectable. Lines after the head (a log open, or not closed cleanly) are
// not: VerifyLog reports them as an unanchored tail, apart from tampering.
//
// The gRPC server (internal/server) writes the log through a Log: Write
// returns only once the record is on disk, and the server refuses the RPC
// (UNAVAILABLE) when it cannot, so nothing is done that is not recorded.
// keybrokerctl ("audit verify") checks a log with Verify, without the daemon.
// The package imports the standard library and kms (for
// kms.ErrUnavailable) only.
//
// Records must never carry secrets: no PINs, no auth values, no private key
// material, no whole tokens, and never a digest itself (only its SHA-256, see
// DigestSHA256). The caller chooses the fields; the log writes what it gets.
package audit

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/keybroker/keybroker/kms"
)

// Record is one line of the audit log: one RPC, whatever its outcome
// (denials included). Seq, Prev and, when zero, Time are set by Write.
//
// A Record must not carry secrets: no PINs, auth values, private key
// material or whole tokens, and no digest, only its hash (DigestSHA256).
type Record struct {
	Seq          uint64    `json:"seq"`  // 1, 2, ... set by Write
	Time         time.Time `json:"time"` // set by Write if zero; always written in UTC, RFC 3339 with nanoseconds
	RequestID    string    `json:"request_id"`
	Tenant       string    `json:"tenant,omitempty"`
	Caller       string    `json:"caller,omitempty"` // the authenticated peer, e.g. "uid:1000 gid:1000" or "spiffe://..."
	Method       string    `json:"method"`           // full gRPC method, "/keybroker.v1.KeyBroker/Sign"
	Key          string    `json:"key,omitempty"`
	Version      uint32    `json:"version,omitempty"`
	Kid          string    `json:"kid,omitempty"`
	Replica      string    `json:"replica,omitempty"` // the replica that wrote it (store.backend etcd); set by Write
	Alg          string    `json:"alg,omitempty"`
	DigestSHA256 string    `json:"digest_sha256,omitempty"` // hex SHA-256 of the signed digest, never the digest itself
	Code         string    `json:"code"`                    // gRPC code name: "OK", "PERMISSION_DENIED", ...
	LatencyMS    float64   `json:"latency_ms"`
	Note         string    `json:"note,omitempty"`  // what the log itself records: see MethodResumed and MethodBreak
	Break        *Break    `json:"break,omitempty"` // set on the first record of a segment (MethodBreak)
	Prev         string    `json:"prev"`            // hex SHA-256 of the previous line without its newline; ZeroHash for seq 1
}

// Break is carried by the record that starts a new segment of a log: the
// records before it, up to AfterSeq, are not in the file before it (the
// file was deleted, replaced or truncated under the daemon, or was missing
// at start). The record chains to the last record known durable: its Seq
// is AfterSeq+1 and its Prev is AfterHash, so a copy of the lost records,
// if one turns up, links to it.
type Break struct {
	Reason    string `json:"reason"`
	AfterSeq  uint64 `json:"after_seq"`
	AfterHash string `json:"after_hash"`
}

// Methods of the records the log writes about itself.
const (
	// MethodResumed records that the log is writable again after a
	// failure (a full disk, an I/O error); Note says since when and why,
	// and how many records were refused meanwhile. The chain goes on.
	MethodResumed = "/keybroker.audit/Resumed"
	// MethodBreak starts a new segment; its Break says what was lost.
	MethodBreak = "/keybroker.audit/Break"
)

// DigestSHA256 returns the value of Record.DigestSHA256 for digest: the hex
// SHA-256 of it. The digest itself is not logged: it can be the hash of a
// token or of a request that is not the audit reader's business.
func DigestSHA256(digest []byte) string {
	sum := sha256.Sum256(digest)
	return hex.EncodeToString(sum[:])
}

// ZeroHash is the Prev of the first record, and the Hash of the head of an
// empty log.
const ZeroHash = "0000000000000000000000000000000000000000000000000000000000000000"

// MaxLineBytes bounds one line of the log, without its newline. Write
// refuses bigger records and Verify reports bigger lines, so a damaged file
// cannot make the verifier read without bound.
const MaxLineBytes = 1 << 20

// maxQueuedBytes bounds the lines queued or being committed: from Write
// until their sync returns. When the sink is stuck, Writes beyond it fail
// at once instead of piling up in memory.
const maxQueuedBytes = 64 << 20

// maxKeptBuf is the largest batch buffer the writer keeps for the next
// batch; a bigger one, from a burst, goes after its commit.
const maxKeptBuf = 1 << 20

// defaultTimeout is Options.Timeout when unset.
const defaultTimeout = time.Second

// defaultHeadEvery is Options.HeadEvery when unset.
const defaultHeadEvery = 100 * time.Millisecond

// defaultRetryEvery is Options.RetryEvery when unset.
const defaultRetryEvery = 200 * time.Millisecond

// stillFailingEvery is how often a log that stays failed says so again.
const stillFailingEvery = time.Minute

// ErrUnavailable is returned (wrapped) by Write when it could not make its
// record durable: the sink failed, earlier or now, it did not finish within
// Options.Timeout, the context ended, or the log is closed. It wraps
// kms.ErrUnavailable, so the server answers UNAVAILABLE.
var ErrUnavailable error = unavailableError{}

type unavailableError struct{}

func (unavailableError) Error() string { return "audit log unavailable" }
func (unavailableError) Unwrap() error { return kms.ErrUnavailable }

// ErrRefused is wrapped by Open's error when the log fails its check
// against its head file (see Verify): it was tampered with, or damaged,
// while no Log had it open. Opening it again fails the same way.
var ErrRefused = errors.New("refusing to continue")

// ErrInUse is returned (wrapped) by Open when another Log, in this process
// or another, has the file open: two Logs appending to one file would
// break its chain.
var ErrInUse = errors.New("another process (or another Log in this process) has the audit log open")

// Sink is where a Log writes its lines. *os.File satisfies it. Write gets
// whole lines, several at a time; Sync must make them durable.
type Sink interface {
	io.Writer
	Sync() error
}

// Options tune a Log. The zero value is fine.
type Options struct {
	// Timeout is how long Write waits for its record to be durable;
	// default 1s.
	Timeout time.Duration
	// Sink, for tests, replaces the file: Open then ignores path, starts
	// a new chain at seq 1 and keeps no head file (see Log.Head). The Log
	// does not close it.
	Sink Sink
	// Log receives the failure of the sink (once) and what Open repaired.
	// Default: discard.
	Log *slog.Logger
	// Now is the clock for Record.Time; default time.Now.
	Now func() time.Time
	// HeadEvery is the least time between two updates of the head file;
	// default 100ms. The head follows the log in the background, so it can
	// lag the last durable record by this much plus one update.
	HeadEvery time.Duration
	// RetryEvery is how often a failed log (not one with a Sink) tries to
	// recover; default 200ms.
	RetryEvery time.Duration
	// SyncInterval, when set, is audit.sync "interval": a batch is
	// written (write(2)) before its Writes return, and synced at most
	// this often (and at Close). A crash of the process loses nothing (the
	// kernel has the lines); a crash of the machine can lose what was
	// written in the last SyncInterval. Zero is "always": every batch is
	// synced before its Writes return.
	SyncInterval time.Duration
	// OnBatch, when set, is called by the writer with the number of
	// records of each batch it commits (the group commit's depth).
	OnBatch func(records int)
	// Replica, when set, is put in every record (several replicas, each
	// with its own log: which one served the call).
	Replica string
	// OnChange, when set, is called with the reason when the log fails
	// and with nil when it has recovered (see Err). It must not block.
	OnChange func(err error)
}

// Log is an open audit log. Its methods are safe for concurrent use. One
// Log per file: two Logs, in one process or two, appending to the same file
// would break its chain, so a Log holds an exclusive lock on its file (see
// Open) until Close.
//
// Writes are group-committed: a single goroutine takes every line waiting,
// writes them with one write, syncs once, and acknowledges each of their
// Writes; lines queued meanwhile make the next batch. A second goroutine
// moves the head file after the log, at most once per Options.HeadEvery,
// so its own syncs are on no caller's path.
type Log struct {
	sink       Sink
	file       *os.File // nil with Options.Sink; the writer's, and Close's once the writer has returned
	path       string   // "" with Options.Sink
	headPath   string   // "" with Options.Sink: no head file
	timeout    time.Duration
	headEvery  time.Duration
	retryEvery time.Duration
	now        func() time.Time
	log        *slog.Logger
	onChange   func(error)
	replica    string
	syncEvery  time.Duration // 0: sync every batch
	onBatch    func(int)

	// The writer goroutine's: where the last durable line ends in the
	// file, and what the last commit found wrong with the file.
	end    int64
	damage damage

	maxQueued  int           // bound of queued; maxQueuedBytes but in tests
	wake       chan struct{} // cap 1: lines are queued, or the log is closing
	done       chan struct{} // closed when the writer goroutine returns
	anchorWake chan struct{} // cap 1: durable moved
	closing    chan struct{} // closed by Close: the anchor writes the last head
	anchorDone chan struct{} // closed when the anchor goroutine returns
	headMu     sync.Mutex    // held while the head file is written
	anchored   Head          // what the head file holds; under headMu
	finalErr   error         // why the last head was not written; read after anchorDone

	mu        sync.Mutex
	seq       uint64     // of the last line queued
	prev      string     // hash of the last line queued
	queue     []*pending // lines waiting for the writer, in seq order
	queued    int        // bytes of the lines queued or being committed
	durable   Head       // the last line written and acknowledged (synced too, unless syncEvery)
	synced    Head       // the last line synced: what the head file may record
	failed    error      // why the sink, the file or the head file failed; every Write fails until it recovers
	failedAt  time.Time  // when failed was set
	refused   int        // Writes refused since failedAt
	closed    bool
	abandoned bool // Close gave up waiting for the writer: no last head

	closeOnce sync.Once
	closeErr  error
}

// pending is a line waiting for the writer goroutine.
type pending struct {
	line []byte // with its newline
	head Head   // seq and hash of line
	ack  chan error
	wait bool // a Write waits for it: its batch is synced now (sync always)
}

// Open opens the audit log at path, creating it (mode 0600) if needed; its
// directory must exist. It continues the chain of an existing log after
// checking it against its head file, path+".head", and refuses a log that
// fails that check (see Verify): tampering is noticed at start.
//
// Two states a crash can leave are repaired, and logged: records after the
// head (synced, and maybe acknowledged by Write, before the head file
// caught up) are kept, and a last line without its newline (a torn write,
// never acknowledged) is cut, provided it lies after the head.
//
// Open takes an exclusive advisory lock (flock) on the file, held until
// Close, before it reads the head or repairs anything: while another Log,
// in this process or another, has the file open, Open fails at once with
// an error wrapping ErrInUse, and leaves the log and its head file as they
// are. Every writer of the head file holds that lock. With Options.Sink
// there is no file and no lock.
func Open(path string, o Options) (*Log, error) {
	l := &Log{
		sink:       o.Sink,
		timeout:    o.Timeout,
		headEvery:  o.HeadEvery,
		now:        o.Now,
		log:        o.Log,
		maxQueued:  maxQueuedBytes,
		wake:       make(chan struct{}, 1),
		done:       make(chan struct{}),
		anchorWake: make(chan struct{}, 1),
		closing:    make(chan struct{}),
		anchorDone: make(chan struct{}),
		prev:       ZeroHash,
		durable:    Head{Hash: ZeroHash},
		retryEvery: o.RetryEvery,
		onChange:   o.OnChange,
		replica:    o.Replica,
		syncEvery:  o.SyncInterval,
		onBatch:    o.OnBatch,
	}
	if l.retryEvery <= 0 {
		l.retryEvery = defaultRetryEvery
	}
	if l.timeout <= 0 {
		l.timeout = defaultTimeout
	}
	if l.headEvery <= 0 {
		l.headEvery = defaultHeadEvery
	}
	if l.now == nil {
		l.now = time.Now
	}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if l.sink == nil {
		f, head, end, err := openFile(path, l.log, l.now)
		if err != nil {
			return nil, err
		}
		l.sink, l.file, l.path, l.headPath, l.end = f, f, path, path+".head", end
		l.seq, l.prev, l.durable, l.synced, l.anchored = head.Seq, head.Hash, head, head, head
		go l.anchor()
	} else {
		close(l.anchorDone)
	}
	go l.run()
	return l, nil
}

// encodeLine returns r's line, with its newline, and its seq and hash.
func encodeLine(r Record) ([]byte, Head, error) {
	line, err := json.Marshal(r)
	if err != nil {
		return nil, Head{}, fmt.Errorf("audit: encoding record: %w", err)
	}
	if len(line) > MaxLineBytes {
		return nil, Head{}, fmt.Errorf("audit: record: got %d bytes, want at most %d", len(line), MaxLineBytes)
	}
	sum := sha256.Sum256(line)
	return append(line, '\n'), Head{Seq: r.Seq, Hash: hex.EncodeToString(sum[:])}, nil
}

// A record's JSON starts with its seq and ends with its prev (the first and
// last fields of Record); encodeBody keeps what lies between.
var (
	seqPrefix  = []byte(`{"seq":0,`)
	prevSuffix = []byte(`"prev":""}`)
)

// encodeBody encodes r without its seq and prev; chainLine adds them. The
// two make exactly the line encodeLine makes of r with them.
func encodeBody(r Record) ([]byte, error) {
	r.Seq, r.Prev = 0, ""
	b, err := json.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("audit: encoding record: %w", err)
	}
	if !bytes.HasPrefix(b, seqPrefix) || !bytes.HasSuffix(b, prevSuffix) {
		return nil, fmt.Errorf("audit: encoding record: unexpected shape %.40q", b)
	}
	return b[len(seqPrefix) : len(b)-len(prevSuffix)], nil
}

// chainLine is the line of the record mid (from encodeBody) at seq, after
// the line whose hash is prev, with its head.
func chainLine(mid []byte, seq uint64, prev string) ([]byte, Head, error) {
	line := make([]byte, 0, len(mid)+len(prev)+40)
	line = append(line, `{"seq":`...)
	line = strconv.AppendUint(line, seq, 10)
	line = append(line, ',')
	line = append(line, mid...)
	line = append(line, `"prev":"`...)
	line = append(line, prev...) // hex: nothing to escape
	line = append(line, `"}`...)
	if len(line) > MaxLineBytes {
		return nil, Head{}, fmt.Errorf("audit: record: got %d bytes, want at most %d", len(line), MaxLineBytes)
	}
	sum := sha256.Sum256(line)
	return append(line, '\n'), Head{Seq: seq, Hash: hex.EncodeToString(sum[:])}, nil
}

// Head returns the seq and hash of the last durable line. While the log is
// open the head file lags it (by up to Options.HeadEvery); once Close has
// returned nil, the head file holds it too. With a Sink, it is the head to
// pass to Verify.
func (l *Log) Head() Head {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.durable
}

// Write appends r to the log and returns once it is durable: written and
// synced (the head file follows within Options.HeadEvery). It sets r.Seq
// and r.Prev, and r.Time to now when zero. When the record cannot be made durable within
// Options.Timeout, or before ctx ends, it returns an error wrapping
// ErrUnavailable; the line then stays queued and may still reach the file
// later, so the chain has no gap. After a sink error every Write fails at
// once: the log does not go on past a gap.
//
// A record too big (MaxLineBytes) or that cannot be encoded (a time past
// year 9999, a NaN latency) is an error that does not wrap ErrUnavailable;
// it does not take a seq.
func (l *Log) Write(ctx context.Context, r Record) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	mid, err := encodeBody(l.complete(r))
	if err != nil {
		return err
	}
	p, err := l.enqueue(mid, true)
	if err != nil {
		return err
	}
	timer := time.NewTimer(l.timeout)
	defer timer.Stop()
	select {
	case err := <-p.ack:
		return err
	case <-timer.C:
		return fmt.Errorf("%w: record seq %d not durable within %s", ErrUnavailable, p.head.Seq, l.timeout)
	case <-ctx.Done():
		return fmt.Errorf("%w: record seq %d not yet durable: %w", ErrUnavailable, p.head.Seq, ctx.Err())
	}
}

// Queue appends r to the log like Write, in the same order, but returns
// once it is queued, not once it is durable: for calls whose answer
// reveals nothing that is not public (a public key, a JWK Set), which need
// not wait for the disk. It fails, like Write, when the log is failed or
// its queue is full. A crash can lose a queued record that Write would
// have waited for: a batch of queued records alone is written at once but
// synced with the next Write's batch, or within queuedSyncEvery.
func (l *Log) Queue(r Record) error {
	mid, err := encodeBody(l.complete(r))
	if err != nil {
		return err
	}
	_, err = l.enqueue(mid, false)
	return err
}

// complete sets what Write and Queue set in every record.
func (l *Log) complete(r Record) Record {
	if r.Time.IsZero() {
		r.Time = l.now()
	}
	r.Time = r.Time.UTC()
	if r.Replica == "" {
		r.Replica = l.replica
	}
	return r
}

// enqueue chains a record (mid, from encodeBody) to the last line and
// queues it for the writer. Seqs are assigned under the lock that queues,
// so the file is in seq order; the JSON encoding is done before, outside
// it, so that concurrent calls do not wait on each other's encoding.
func (l *Log) enqueue(mid []byte, wait bool) (*pending, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.failed != nil {
		l.refused++
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, l.failed)
	}
	if l.closed {
		return nil, fmt.Errorf("%w: closed", ErrUnavailable)
	}
	line, head, err := chainLine(mid, l.seq+1, l.prev)
	if err != nil {
		return nil, err
	}
	if l.queued+len(line) > l.maxQueued {
		return nil, fmt.Errorf("%w: %d bytes of records already wait for the sink", ErrUnavailable, l.queued)
	}
	p := &pending{line: line, head: head, ack: make(chan error, 1), wait: wait}
	l.seq, l.prev = p.head.Seq, p.head.Hash
	l.queue = append(l.queue, p)
	l.queued += len(p.line)
	select {
	case l.wake <- struct{}{}:
	default: // the writer is already due to look at the queue
	}
	return p, nil
}

// run is the writer goroutine: it commits every line waiting as one batch,
// until the log is closed and drained. When a commit fails, or the anchor
// goroutine fails the log, it answers every Write with the failure and
// tries to recover (see recover) until it does or the log is closed; a
// log with a Sink does not recover.
// queuedSyncEvery bounds how long records nobody waits for (Queue) stay
// written but not synced when the log syncs every batch: a batch of them
// alone is not worth an fsync of its own (measured: GetJWKS at 16 clients
// spent a fifth of the two CPUs in fsync), the next Write's or this bound's
// sync covers it.
const queuedSyncEvery = 50 * time.Millisecond

func (l *Log) run() {
	defer close(l.done)
	var buf []byte
	var lastSync time.Time
	dirty := false // written lines not yet synced
	// every bounds how long written lines stay unsynced: syncEvery, or,
	// when every batch with a Write in it is synced, queuedSyncEvery.
	every := l.syncEvery
	if every == 0 {
		every = queuedSyncEvery
	}
	var syncTimer *time.Timer
	var syncDue <-chan time.Time
	for {
		select {
		case <-l.wake:
		case <-syncDue:
			syncDue = nil
		}
		l.mu.Lock()
		batch, closing, failed := l.queue, l.closed, l.failed != nil
		l.queue = nil // its bytes stay in queued until committed
		l.mu.Unlock()
		if failed {
			// The anchor failed the log: fail has answered the queue.
			dirty = false
			if !l.recover() {
				return
			}
			continue
		}

		if len(batch) > 0 {
			buf = buf[:0]
			for _, p := range batch {
				buf = append(buf, p.line...)
			}
			n := len(buf)
			head := batch[len(batch)-1].head
			syncNow := closing || time.Since(lastSync) >= every || l.syncEvery == 0 && waited(batch)
			if err := l.commit(buf, batch[0].head.Seq, head, syncNow); err != nil {
				l.fail(err, batch)
				dirty = false
				if !l.recover() {
					return
				}
				continue
			}
			if cap(buf) > maxKeptBuf {
				buf = nil // a burst's buffer is not kept for good
			}
			l.end += int64(n)
			l.mu.Lock()
			l.durable = head
			if syncNow {
				l.synced = head
			}
			l.queued -= n
			l.mu.Unlock()
			if l.onBatch != nil {
				l.onBatch(len(batch))
			}
			// The records are on disk (or, with syncEvery, written):
			// answer their callers. The head file follows (anchor); a
			// crash before it does leaves records past the head, which
			// Open accepts.
			for _, p := range batch {
				p.ack <- nil
			}
			if syncNow {
				lastSync, dirty = time.Now(), false
				l.wakeAnchor()
			} else {
				dirty = true
			}
		} else if dirty && (closing || time.Since(lastSync) >= every) {
			if err := l.sink.Sync(); err != nil {
				l.fail(fmt.Errorf("syncing records up to %d: %w", l.Head().Seq, err), nil)
				dirty = false
				if !l.recover() {
					return
				}
				continue
			}
			l.mu.Lock()
			l.synced = l.durable
			l.mu.Unlock()
			lastSync, dirty = time.Now(), false
			l.wakeAnchor()
		}
		if dirty && syncDue == nil {
			if syncTimer == nil {
				syncTimer = time.NewTimer(0)
				<-syncTimer.C
			}
			syncTimer.Reset(max(time.Until(lastSync.Add(every)), 0))
			syncDue = syncTimer.C
		}
		if closing && !dirty {
			// Nothing is queued after closed is set: the batch was the last.
			return
		}
		if closing {
			// Sync what was written before returning.
			select {
			case l.wake <- struct{}{}:
			default:
			}
		}
	}
}

// waited reports whether a Write waits for a record of batch.
func waited(batch []*pending) bool {
	for _, p := range batch {
		if p.wait {
			return true
		}
	}
	return false
}

// commit makes the lines b, seqs first to head.Seq, durable, and checks
// that they are in the file at the log's path, right after the last
// durable line.
func (l *Log) commit(b []byte, first uint64, head Head, sync bool) error {
	n, err := l.sink.Write(b)
	if err == nil && n != len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("writing records %d to %d: %w", first, head.Seq, err)
	}
	if sync {
		if err := l.sink.Sync(); err != nil {
			return fmt.Errorf("syncing records %d to %d: %w", first, head.Seq, err)
		}
	}
	if err := l.checkFile(l.end + int64(len(b))); err != nil {
		return fmt.Errorf("records %d to %d are not in the log file: %w", first, head.Seq, err)
	}
	return nil
}

// Close stops accepting records, waits up to Options.Timeout (in all) for
// those queued to become durable and for the head file to record the last
// durable one, and closes the file (not a Sink given in Options), which
// releases its lock; if it gave up waiting, the file is closed only once
// the log's writers have returned, and Open of it fails until then. After a
// failure of the sink, the head file still records the last record
// acknowledged; after a failure of the head file, it is left as it is. It
// returns an error wrapping ErrUnavailable when some record did not become
// durable, the head file was not written in time or failed, or the sink
// had failed. Calling it again returns the same.
func (l *Log) Close() error {
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.closed = true
		l.mu.Unlock()
		select {
		case l.wake <- struct{}{}:
		default:
		}
		close(l.closing)

		var errs []error
		waited := false // the writer and anchor goroutines have returned
		timer := time.NewTimer(l.timeout)
		defer timer.Stop()
		select {
		case <-l.done:
			select {
			case <-l.anchorDone:
				waited = true
				if l.finalErr != nil {
					errs = append(errs, fmt.Errorf("%w: %w", ErrUnavailable, l.finalErr))
				}
			case <-timer.C:
				errs = append(errs, fmt.Errorf("%w: head file not written after %s", ErrUnavailable, l.timeout))
			}
		case <-timer.C:
			l.mu.Lock()
			l.abandoned = true
			l.mu.Unlock()
			errs = append(errs, fmt.Errorf("%w: records still not durable after %s", ErrUnavailable, l.timeout))
		}
		l.mu.Lock()
		failed := l.failed
		l.mu.Unlock()
		if failed != nil {
			errs = append([]error{fmt.Errorf("%w: %w", ErrUnavailable, failed)}, errs...)
		}
		switch {
		case l.file == nil:
		case waited:
			if err := l.file.Close(); err != nil {
				errs = append(errs, fmt.Errorf("audit: %w", err))
			}
		default:
			// A goroutine may still write the log or the head file: keep
			// the file, and its lock, until both have returned, so that
			// no new Log opens it meanwhile.
			go func() {
				<-l.done
				<-l.anchorDone
				l.file.Close()
			}()
		}
		l.closeErr = errors.Join(errs...)
	})
	return l.closeErr
}
