package audit

// The head file follows the durable end of the log from a goroutine of its
// own.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

func (l *Log) wakeAnchor() {
	select {
	case l.anchorWake <- struct{}{}:
	default:
	}
}

// anchor is the head goroutine: it writes the durable head to the head
// file when it moves, at most once per headEvery, and the last one when
// Close asks (see lastAnchor). A head file that cannot be written fails
// the log; the writer's recovery writes it again.
func (l *Log) anchor() {
	defer close(l.anchorDone)
	pause := time.NewTimer(l.headEvery)
	defer pause.Stop()
	for {
		select {
		case <-l.anchorWake:
		case <-l.closing:
			l.lastAnchor()
			return
		}
		if err := l.writeAnchor(); err != nil {
			l.fail(err, nil)
		}
		pause.Reset(l.headEvery)
		select {
		case <-pause.C:
		case <-l.closing:
			l.lastAnchor()
			return
		}
	}
}

// lastAnchor writes the last head at Close, once the writer has returned:
// the last durable line, also after a failure of the sink, whose records
// acknowledged before it are as durable as any. Close waits for it up to
// Options.Timeout and reports finalErr.
func (l *Log) lastAnchor() {
	<-l.done
	l.mu.Lock()
	abandoned := l.abandoned
	l.mu.Unlock()
	if abandoned {
		// Close returned before the writer did: a head written now
		// could land after the next Open of the file.
		return
	}
	l.finalErr = l.writeAnchor()
}

// writeAnchor writes the durable head to the head file if it moved.
func (l *Log) writeAnchor() error {
	l.headMu.Lock()
	defer l.headMu.Unlock()
	l.mu.Lock()
	head := l.synced
	l.mu.Unlock()
	if head == l.anchored {
		return nil
	}
	if err := writeHead(l.headPath, head); err != nil {
		return fmt.Errorf("recording head seq %d: %w", head.Seq, err)
	}
	l.anchored = head
	return nil
}

// Head is the anchor of a log: the seq and hash of its last durable line.
// The log at path keeps it in path+".head", rewritten in the background at
// most every Options.HeadEvery and at Close; an empty log has
// Head{0, ZeroHash}.
type Head struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"` // hex SHA-256 of the last line, without its newline
}

// ReadHead reads the head file at path (the log's path + ".head").
func ReadHead(path string) (Head, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Head{}, err
	}
	var h Head
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return Head{}, fmt.Errorf("head file %s: %w", path, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Head{}, fmt.Errorf("head file %s: data after the head", path)
	}
	if !isHash(h.Hash) {
		return Head{}, fmt.Errorf("head file %s: hash: got %q, want 64 lowercase hex digits", path, h.Hash)
	}
	return h, nil
}

// writeHead replaces the head file at path with h: it writes a temporary
// file, syncs it, renames it over path and syncs the directory, so that a
// crash leaves either the old head or the new one.
func writeHead(path string, h Head) error {
	b, err := json.Marshal(h)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(path)
}

// syncDir syncs the directory of path, so that a file created or renamed
// there survives a crash.
func syncDir(path string) error {
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	err = dir.Sync()
	if cerr := dir.Close(); err == nil {
		err = cerr
	}
	return err
}
