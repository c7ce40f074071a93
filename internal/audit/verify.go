package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

func isHash(s string) bool {
	if len(s) != 2*sha256.Size {
		return false
	}
	for _, c := range []byte(s) {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// VerifyError is what Verify found wrong with a log. Line counts from 1;
// Seq is the seq the line holds, or the seq expected there when the line
// cannot be read or is missing.
type VerifyError struct {
	Line   int
	Seq    uint64
	Reason string
}

func (e *VerifyError) Error() string {
	return fmt.Sprintf("line %d (seq %d): %s", e.Line, e.Seq, e.Reason)
}

// Verify is VerifyLog, returning only the number of records: a log with
// an unanchored tail verifies. Use VerifyLog to tell it apart.
func Verify(r io.Reader, head *Head) (records int, err error) {
	res, err := VerifyLog(r, head)
	return res.Records, err
}

// Result is what VerifyLog found in a log.
type Result struct {
	// Records is the number of complete, valid records, those after the
	// head included. Without breaks it is also the last seq.
	Records int
	// LastSeq is the seq of the last of them.
	LastSeq uint64
	// Breaks are the segments that start in the file (see Break): the
	// records they say are missing are not there, and cannot be checked.
	Breaks []FoundBreak
	// AfterHead is the number of those records after the head's seq. They
	// chain on, but the head does not vouch for them: removing some of
	// them goes unnoticed.
	AfterHead int
	// Torn is set when the log ends, after the head, inside a line
	// without its newline: a record being written, or one torn by a
	// crash. That line is not checked.
	Torn bool
}

// FoundBreak is a Break record found by VerifyLog: records First to Last
// are missing from the file before it (none when First > Last).
type FoundBreak struct {
	Line        int
	Seq         uint64
	Reason      string
	First, Last uint64
}

func (b FoundBreak) String() string {
	missing := "no record is missing"
	switch {
	case b.First == b.Last:
		missing = fmt.Sprintf("record %d is missing", b.First)
	case b.First < b.Last:
		missing = fmt.Sprintf("records %d to %d are missing", b.First, b.Last)
	}
	return fmt.Sprintf("line %d (seq %d) starts a new segment: %s; %s", b.Line, b.Seq, b.Reason, missing)
}

// Unanchored reports whether the log goes on after its head: it is open
// (the head lags the log by up to Options.HeadEvery, and a line may be
// being written), or was not closed cleanly.
func (r Result) Unanchored() bool { return r.AfterHead > 0 || r.Torn }

// VerifyLog reads a log from r and checks its chain: every line is a Record
// in JSON with no unknown fields; seqs go 1, 2, 3, ...; each Prev is the
// hash of the line before (ZeroHash for the first); the last line ends
// with a newline. A record with a Break starts a new segment instead: its
// seq and Prev are those of its Break, which may not go back before the
// line before it; it is reported in Result.Breaks. With head, the line at the head's seq must also be there
// and have its hash, which detects whole trailing lines removed and an
// edit of the last line.
//
// Lines after the head are no error: the head file follows the log, so a
// log being written, or one whose writer crashed, has some. Those that
// chain on are counted in AfterHead, and a last line without newline after
// the head sets Torn (see Result). Without head nothing of this can be
// detected, and a last line without newline is an error.
//
// A log being written grows while it is read: read it only up to its size
// when the head was read (io.LimitReader), the head first.
//
// It returns the Result (its records counting the valid ones up to an
// error). What is wrong is reported as a *VerifyError; reading errors as
// they are.
func VerifyLog(r io.Reader, head *Head) (Result, error) {
	var at uint64
	if head != nil {
		at = head.Seq
	}
	c, err := walk(r, at)
	res := Result{Records: c.lines, LastSeq: c.seq, Breaks: c.breaks}
	if err != nil {
		return res, err
	}
	if c.torn && (head == nil || c.seq < head.Seq) {
		return res, &VerifyError{Line: c.lines + 1, Seq: c.seq + 1,
			Reason: "truncated record: the file ends inside this line, without its newline"}
	}
	if head == nil {
		return res, nil
	}
	if err := c.checkAnchor(*head); err != nil {
		return res, err
	}
	res.AfterHead, res.Torn = int(c.seq-head.Seq), c.torn
	return res, nil
}

// chain is what walk found: the valid prefix of a log.
type chain struct {
	lines  int    // complete lines whose chain is intact
	seq    uint64 // seq of the last of them (= lines without breaks)
	hash   string // hash of the last of them, ZeroHash for none
	end    int64  // offset just after the last of them
	hashAt string // hash of the line whose seq walk was asked about, "" if not seen
	torn   bool   // after them comes a last line without newline, unchecked
	breaks []FoundBreak
}

// checkAnchor reports whether the chain holds h: the line with h.Seq is
// there, and its hash is h.Hash. Lines after it may follow.
func (c chain) checkAnchor(h Head) error {
	switch {
	case c.seq < h.Seq:
		return &VerifyError{Line: c.lines + 1, Seq: c.seq + 1, Reason: fmt.Sprintf(
			"missing: the log ends after seq %d but its head is at seq %d (trailing records removed)", c.seq, h.Seq)}
	case c.hashAt != h.Hash:
		return headHashError(int(h.Seq), h.Seq, c.hashAt, h.Hash)
	}
	return nil
}

func headHashError(line int, seq uint64, got, want string) error {
	return &VerifyError{Line: line, Seq: seq, Reason: fmt.Sprintf(
		"hash mismatch with the head: got %s, want %s (this line was edited)", got, want)}
}

// errNoNewline is readLine's report of a last line without newline.
var errNoNewline = errors.New("no newline")

// errLineTooLong is readLine's report of a line over MaxLineBytes.
var errLineTooLong = errors.New("line too long")

// walk reads the log from r and checks the chain of its complete lines,
// stopping at the first that is wrong. It also returns the hash of the
// line with seq at (ZeroHash for 0).
func walk(r io.Reader, at uint64) (chain, error) {
	c := chain{hash: ZeroHash}
	if at == 0 {
		c.hashAt = ZeroHash
	}
	br := bufio.NewReaderSize(r, 64<<10)
	var buf []byte
	for {
		line, err := readLine(br, buf[:0])
		buf = line
		n, want := c.lines+1, c.seq+1
		switch err {
		case nil:
		case io.EOF:
			return c, nil
		case errNoNewline:
			c.torn = true
			return c, nil
		case errLineTooLong:
			return c, &VerifyError{Line: n, Seq: want, Reason: fmt.Sprintf("line longer than %d bytes", MaxLineBytes)}
		default:
			return c, fmt.Errorf("reading line %d: %w", n, err)
		}

		var rec Record
		if err := decodeRecord(line, &rec); err != nil {
			return c, &VerifyError{Line: n, Seq: want, Reason: "not a valid record: " + err.Error()}
		}
		switch {
		case rec.Break != nil:
			b := rec.Break
			switch {
			case rec.Seq != b.AfterSeq+1 || rec.Prev != b.AfterHash:
				return c, &VerifyError{Line: n, Seq: rec.Seq, Reason: fmt.Sprintf(
					"break: seq %d and prev %s do not follow its after_seq %d and after_hash %s", rec.Seq, rec.Prev, b.AfterSeq, b.AfterHash)}
			case b.AfterSeq < c.seq:
				return c, &VerifyError{Line: n, Seq: rec.Seq, Reason: fmt.Sprintf(
					"break: after_seq %d goes back before seq %d on the line before", b.AfterSeq, c.seq)}
			case !isHash(b.AfterHash):
				return c, &VerifyError{Line: n, Seq: rec.Seq, Reason: "break: after_hash is not a hash"}
			}
			c.breaks = append(c.breaks, FoundBreak{Line: n, Seq: rec.Seq, Reason: b.Reason, First: c.seq + 1, Last: b.AfterSeq})
		case rec.Seq < want:
			return c, &VerifyError{Line: n, Seq: rec.Seq, Reason: fmt.Sprintf(
				"seq: got %d, want %d (a line is duplicated, or lines are reordered)", rec.Seq, want)}
		case rec.Seq > want:
			return c, &VerifyError{Line: n, Seq: rec.Seq, Reason: fmt.Sprintf(
				"seq: got %d, want %d (a line is missing, or lines are reordered)", rec.Seq, want)}
		case rec.Prev != c.hash:
			return c, &VerifyError{Line: n, Seq: rec.Seq, Reason: fmt.Sprintf(
				"prev hash mismatch: got %s, want %s (the line before was edited)", rec.Prev, c.hash)}
		}
		sum := sha256.Sum256(line)
		c.lines, c.seq, c.hash = n, rec.Seq, hex.EncodeToString(sum[:])
		c.end += int64(len(line)) + 1
		if c.seq == at {
			c.hashAt = c.hash
		}
	}
}

// readLine appends the next line of br, without its newline, to buf. At
// the end of the input it returns io.EOF; for a last line without newline,
// that line and errNoNewline.
func readLine(br *bufio.Reader, buf []byte) ([]byte, error) {
	for {
		frag, err := br.ReadSlice('\n')
		if len(buf)+len(frag) > MaxLineBytes+1 {
			return buf, errLineTooLong
		}
		buf = append(buf, frag...)
		switch {
		case err == nil:
			return buf[:len(buf)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			if len(buf) == 0 {
				return buf, io.EOF
			}
			return buf, errNoNewline
		default:
			return buf, err
		}
	}
}

// decodeRecord decodes line, one JSON object with only Record's fields,
// into rec.
func decodeRecord(line []byte, rec *Record) error {
	if len(line) == 0 || line[0] != '{' {
		return errors.New("not a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(rec); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("data after the JSON object")
	}
	return nil
}
