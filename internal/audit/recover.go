package audit

// A failed log: noticing a file that changed under it, failing closed, and
// healing (a Resumed record, or a new segment after a Break).

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"
)

// damage is what a commit found wrong with the file.
type damage struct {
	// changed: the file at the path is not the one written, or not as
	// written (deleted, moved, replaced, truncated, written by another).
	changed bool
	// appendedAt is where the failed batch landed in the file when
	// changed, or -1 when unknown.
	appendedAt int64
}

// errFileChanged wraps what checkFile finds.
var errFileChanged = errors.New("the log file changed under the daemon")

// checkFile reports whether the file at the log's path is the one it
// writes, size bytes long. It sets l.damage when not.
func (l *Log) checkFile(size int64) error {
	if l.file == nil {
		return nil
	}
	fi, err := l.file.Stat()
	if err != nil {
		return err
	}
	pi, perr := os.Stat(l.path)
	var why string
	switch {
	case errors.Is(perr, fs.ErrNotExist):
		why = "it was deleted or moved away"
	case perr != nil:
		return perr
	case !os.SameFile(fi, pi):
		why = "another file replaced it"
	case fi.Size() != size:
		why = fmt.Sprintf("it is %d bytes long, want %d: truncated, or written by another process", fi.Size(), size)
	default:
		return nil
	}
	l.damage = damage{changed: true, appendedAt: -1}
	if perr == nil && os.SameFile(fi, pi) && fi.Size() >= size-l.end {
		l.damage.appendedAt = fi.Size() - (size - l.end)
	}
	return fmt.Errorf("%w: %s", errFileChanged, why)
}

// fail marks the log failed with err, and fails batch and every line
// queued since.
func (l *Log) fail(err error, batch []*pending) {
	l.mu.Lock()
	for _, p := range batch {
		l.queued -= len(p.line)
	}
	if l.failed != nil {
		l.mu.Unlock()
		for _, p := range batch {
			p.ack <- fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		return
	}
	l.failed, l.failedAt, l.refused = err, l.now(), 0
	rest := l.queue
	l.queue = nil // queued no longer matters: nothing is queued after this
	for _, p := range rest {
		l.queued -= len(p.line)
	}
	durable := l.durable
	// Lines not durable were never acknowledged: the chain goes on from
	// the last durable one.
	l.seq, l.prev = durable.Seq, durable.Hash
	l.mu.Unlock()

	if l.file != nil {
		l.log.Error("audit log failed; every write fails until it recovers",
			"err", err, "last_durable_seq", durable.Seq)
	} else {
		l.log.Error("audit log failed; every later write fails", "err", err, "last_durable_seq", durable.Seq)
	}
	if l.onChange != nil {
		// Before the answers: health is down by the time a caller sees
		// UNAVAILABLE.
		l.onChange(err)
	}
	werr := fmt.Errorf("%w: %w", ErrUnavailable, err)
	for _, p := range append(batch, rest...) {
		p.ack <- werr
	}
	select {
	case l.wake <- struct{}{}: // let the writer see it
	default:
	}
}

// Err returns why the log is failed (every Write fails), or nil.
func (l *Log) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.failed
}

// recover tries, every retryEvery, to make the failed log writable again
// (see repair), until it is or the log is closing. It reports whether it
// did. A log with a Sink does not recover.
func (l *Log) recover() bool {
	if l.file == nil {
		return false
	}
	t := time.NewTimer(l.retryEvery)
	defer t.Stop()
	lastSaid := time.Now()
	for {
		select {
		case <-l.closing:
			return false
		case <-t.C:
		}
		err := l.repair()
		if err == nil {
			return true
		}
		if time.Since(lastSaid) >= stillFailingEvery {
			l.log.Error("audit log still failed", "err", err)
			lastSaid = time.Now()
		}
		t.Reset(l.retryEvery)
	}
}

// repair makes the file at the log's path writable again and records what
// happened: after a failed write (a full disk, an I/O error) it cuts what
// the write left after the last durable line and writes a Resumed record;
// when the file was deleted, moved or replaced by an empty one it starts a
// new segment in a new (or that) file, and when it was truncated it cuts
// it at the last whole line and starts a new segment there (a Break
// record: what was lost). The record must be durable, and the file and
// head file right, before the log takes Writes again.
func (l *Log) repair() error {
	l.headMu.Lock()
	defer l.headMu.Unlock()
	l.mu.Lock()
	durable, reason, since, refused := l.durable, l.failed, l.failedAt, l.refused
	l.mu.Unlock()

	file, end, brk, created, err := l.repairFile()
	if err != nil {
		return err
	}
	// undo leaves the file as repairFile made it, or the path as it was,
	// when a later step fails: the next try starts from there.
	undo := func() {
		switch {
		case file == l.file:
			file.Truncate(end)
		case created:
			os.Remove(l.path)
			file.Close()
		default:
			file.Truncate(0)
			file.Close()
		}
	}
	var rec Record
	if brk != "" {
		rec = breakRecord(durable, brk, l.now())
	} else {
		rec = Record{
			Seq: durable.Seq + 1, Prev: durable.Hash, Time: l.now().UTC(), Method: MethodResumed, Code: "OK",
			Note: fmt.Sprintf("the log was unavailable from %s (%v); %d records were refused meanwhile",
				since.UTC().Format(time.RFC3339Nano), reason, refused),
		}
	}
	line, head, err := encodeLine(rec)
	if err != nil {
		undo()
		return err
	}
	sink := l.sink
	if file != l.file {
		sink = file
	}
	if _, err := sink.Write(line); err != nil {
		undo()
		return fmt.Errorf("writing the %s record: %w", rec.Method, err)
	}
	if err := sink.Sync(); err != nil {
		undo()
		return fmt.Errorf("syncing the %s record: %w", rec.Method, err)
	}
	if file != l.file {
		if err := syncDir(l.path); err != nil {
			undo()
			return err
		}
	}
	if err := writeHead(l.headPath, head); err != nil {
		undo()
		return fmt.Errorf("recording head seq %d: %w", head.Seq, err)
	}
	if file != l.file {
		l.file.Close()
		l.file, l.sink = file, file
	}
	l.end, l.damage, l.anchored = end+int64(len(line)), damage{}, head
	l.mu.Lock()
	l.durable, l.synced, l.seq, l.prev = head, head, head.Seq, head.Hash
	l.failed = nil
	l.mu.Unlock()
	if brk != "" {
		l.log.Error("audit log recovered in a new segment; records before it are lost from the file",
			"path", l.path, "reason", brk, "after_seq", durable.Seq, "refused", refused)
	} else {
		l.log.Warn("audit log writable again", "path", l.path, "was", reason, "refused", refused)
	}
	if l.onChange != nil {
		l.onChange(nil)
	}
	return nil
}

// repairFile returns the file to write at the log's path, cut at the
// length end to write at, and, when records are lost from it, why (for a
// Break record). A new file it returns is locked.
func (l *Log) repairFile() (file *os.File, end int64, brk string, created bool, err error) {
	fi, err := l.file.Stat()
	if err != nil {
		return nil, 0, "", false, err
	}
	pi, perr := os.Stat(l.path)
	switch {
	case perr == nil && os.SameFile(fi, pi) && !l.damage.changed:
		// A write failed: cut what it left after the last durable line.
		if err := l.file.Truncate(l.end); err != nil {
			return nil, 0, "", false, err
		}
		return l.file, l.end, "", false, nil
	case perr == nil && os.SameFile(fi, pi):
		// Truncated (or written) by someone else. What the failed batch
		// appended, and a partial line before it, go.
		at := l.damage.appendedAt
		if at < 0 || at > fi.Size() {
			at = fi.Size()
		}
		at = min(at, l.end)
		cut, err := lastLineEnd(l.file, at)
		if err != nil {
			return nil, 0, "", false, err
		}
		if err := l.file.Truncate(cut); err != nil {
			return nil, 0, "", false, err
		}
		return l.file, cut, fmt.Sprintf("the log file was cut from %d to %d bytes", l.end, cut), false, nil
	case errors.Is(perr, fs.ErrNotExist):
		f, err := os.OpenFile(l.path, os.O_RDWR|os.O_APPEND|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, 0, "", false, err
		}
		if err := lockFile(f); err != nil {
			f.Close()
			return nil, 0, "", false, err
		}
		return f, 0, "the log file was deleted or moved away", true, nil
	case perr != nil:
		return nil, 0, "", false, perr
	default:
		// Another file at the path: take it only if it is empty (e.g.
		// made by a log rotation), never append to what it holds.
		if pi.Size() != 0 {
			return nil, 0, "", false, fmt.Errorf("%s holds a file this log did not write: move it away", l.path)
		}
		f, err := os.OpenFile(l.path, os.O_RDWR|os.O_APPEND, 0o600)
		if err != nil {
			return nil, 0, "", false, err
		}
		if err := lockFile(f); err != nil {
			f.Close()
			return nil, 0, "", false, err
		}
		if st, err := f.Stat(); err != nil || st.Size() != 0 {
			f.Close()
			return nil, 0, "", false, fmt.Errorf("%s holds a file this log did not write: move it away", l.path)
		}
		return f, 0, "the log file was replaced by another file", false, nil
	}
}

// lastLineEnd returns the offset just after the last newline before
// offset at in f, or 0.
func lastLineEnd(f *os.File, at int64) (int64, error) {
	buf := make([]byte, 64<<10)
	for at > 0 {
		n := min(int64(len(buf)), at)
		if _, err := f.ReadAt(buf[:n], at-n); err != nil {
			return 0, err
		}
		if i := bytes.LastIndexByte(buf[:n], '\n'); i >= 0 {
			return at - n + int64(i) + 1, nil
		}
		at -= n
	}
	return 0, nil
}
