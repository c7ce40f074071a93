package audit

// Opening a log: the check against its head file, what a crash leaves
// repaired, and a new segment for a log missing at start.

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"time"
)

// openFile opens the log at path for appending, locks it, checks it
// against its head file, repairs what a crash leaves (see Open), and
// returns the file, the head of the log and where its last line ends. A
// log missing while its head names records starts a new segment (see
// Break).
func openFile(path string, log *slog.Logger, now func() time.Time) (*os.File, Head, int64, error) {
	headPath := path + ".head"
	head, headMissing, err := readHeadFile(headPath)
	if err != nil {
		return nil, Head{}, 0, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND, 0o600)
	created := false
	if errors.Is(err, fs.ErrNotExist) {
		f, err = os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE|os.O_EXCL, 0o600)
		created = true
	}
	if err != nil {
		return nil, Head{}, 0, fmt.Errorf("audit: %w", err)
	}
	if err := lockFile(f); err != nil {
		f.Close()
		return nil, Head{}, 0, fmt.Errorf("audit: locking %s: %w", path, err)
	}
	// Read the head again now that no other Log can write it: the one
	// read above may predate the last head of a Log closed since.
	head, headMissing, err = readHeadFile(headPath)
	if err != nil {
		f.Close()
		return nil, Head{}, 0, err
	}
	if created && !headMissing && head.Seq > 0 {
		reason := fmt.Sprintf("the log file was missing at start; its head file named %d records", head.Seq)
		log.Error("audit log missing at start; starting a new segment that records the loss", "path", path, "head_seq", head.Seq)
		h, end, err := startSegment(f, path, head, reason, now)
		if err != nil {
			f.Close()
			return nil, Head{}, 0, err
		}
		return f, h, end, nil
	}
	head, end, err := recoverFile(f, path, head, headMissing, log)
	if err != nil {
		f.Close()
		return nil, Head{}, 0, err
	}
	return f, head, end, nil
}

// startSegment writes, to the empty file f at path, a Break record after
// head, syncs it and its directory, writes the head file, and returns the
// new head and the file's length.
func startSegment(f *os.File, path string, after Head, reason string, now func() time.Time) (Head, int64, error) {
	line, head, err := encodeLine(breakRecord(after, reason, now()))
	if err != nil {
		return Head{}, 0, err
	}
	if _, err := f.Write(line); err != nil {
		return Head{}, 0, fmt.Errorf("audit: %w", err)
	}
	if err := f.Sync(); err != nil {
		return Head{}, 0, fmt.Errorf("audit: %w", err)
	}
	if err := syncDir(path); err != nil {
		return Head{}, 0, fmt.Errorf("audit: %w", err)
	}
	if err := writeHead(path+".head", head); err != nil {
		return Head{}, 0, fmt.Errorf("audit: %w", err)
	}
	return head, int64(len(line)), nil
}

// breakRecord is the first record of a segment after the record after.
func breakRecord(after Head, reason string, at time.Time) Record {
	return Record{
		Seq: after.Seq + 1, Prev: after.Hash, Time: at.UTC(), Method: MethodBreak, Code: "DATA_LOSS",
		Note:  "records before this one are not in this file: " + reason,
		Break: &Break{Reason: reason, AfterSeq: after.Seq, AfterHash: after.Hash},
	}
}

// readHeadFile reads the head file at headPath, reporting whether it is
// missing.
func readHeadFile(headPath string) (head Head, missing bool, err error) {
	head, err = ReadHead(headPath)
	if errors.Is(err, fs.ErrNotExist) {
		return Head{}, true, nil
	}
	var perr *fs.PathError
	if err != nil && !errors.As(err, &perr) {
		// Read, but not a head: damaged or edited.
		return Head{}, false, fmt.Errorf("audit: %w: %w", ErrRefused, err)
	}
	if err != nil {
		return Head{}, false, fmt.Errorf("audit: %w", err)
	}
	return head, false, nil
}

// recoverFile checks the log f against head (missing if headMissing),
// repairs it as Open describes, writes the head file when it changed, and
// returns the head and where the last line ends.
func recoverFile(f *os.File, path string, head Head, headMissing bool, log *slog.Logger) (Head, int64, error) {
	refuse := func(err error) (Head, int64, error) {
		return Head{}, 0, fmt.Errorf("audit: %w %s: %w", ErrRefused, path, err)
	}
	c, err := walk(f, head.Seq)
	if err != nil {
		return refuse(err)
	}
	switch {
	case headMissing:
		if c.lines > 0 || c.torn {
			return refuse(fmt.Errorf("its head file %s is missing", path+".head"))
		}
	default:
		if err := c.checkAnchor(head); err != nil {
			return refuse(err)
		}
		if c.seq > head.Seq {
			log.Warn("audit log has records after its head (synced, the head not yet updated); keeping them",
				"path", path, "head_seq", head.Seq, "last_seq", c.seq)
		}
	}
	if c.torn {
		if err := f.Truncate(c.end); err != nil {
			return Head{}, 0, fmt.Errorf("audit: cutting the torn last line of %s: %w", path, err)
		}
		if err := f.Sync(); err != nil {
			return Head{}, 0, fmt.Errorf("audit: %w", err)
		}
		log.Warn("audit log ended inside a line (torn write, never acknowledged); cut it",
			"path", path, "offset", c.end, "last_seq", c.seq)
	}
	now := Head{Seq: c.seq, Hash: c.hash}
	if headMissing || now != head {
		if err := writeHead(path+".head", now); err != nil {
			return Head{}, 0, fmt.Errorf("audit: %w", err)
		}
	}
	return now, c.end, nil
}
