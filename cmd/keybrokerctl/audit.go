package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keybroker/keybroker/internal/audit"
)

func newAuditCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Check keybrokerd's audit log",
		Args:  cobra.NoArgs,
		RunE:  showHelp,
	}
	cmd.AddCommand(newAuditVerifyCmd(a))
	return cmd
}

// auditVerifyFlags are the flags of "audit verify".
type auditVerifyFlags struct {
	head   string
	noHead bool
}

// headPath checks the flags and returns the head file to check the log
// at file against, or "" for none.
func (f auditVerifyFlags) headPath(file string) (string, error) {
	switch {
	case f.noHead && f.head != "":
		return "", usageErrorf("--head and --no-head: give at most one")
	case f.noHead:
		return "", nil
	case f.head != "":
		return f.head, nil
	default:
		return file + ".head", nil
	}
}

func newAuditVerifyCmd(a *app) *cobra.Command {
	var f auditVerifyFlags
	cmd := &cobra.Command{
		Use:   "verify FILE",
		Short: "Verify the hash chain of an audit log",
		Long: `Verify the audit log FILE locally, without keybrokerd: every line must be
a valid record, seqs must go 1, 2, 3, ..., and each record must hold the
SHA-256 of the line before it. The record at the seq of the head file
(--head, default FILE.head) must be there and have its hash, which detects
trailing records removed and an edit of the last record; --no-head skips
that check.

The log may be in use: the head file is read first, then FILE up to its
size at that time. While keybrokerd runs, the head lags the log by up to
10ms, and it is exact once keybrokerd has stopped cleanly. Records after
the head that chain on, and an incomplete last line after the head (a
record being written, or torn by a crash), are not tampering but an
unanchored tail: they could be cut without detection. The log then
verifies, with a warning on stderr.

A segment that keybrokerd started when its log file was deleted, moved,
replaced or cut under it (or missing at start) begins with a break record:
the log verifies, with a warning on stderr saying which records the file
lacks and why.

It prints "ok: N records, last seq S" (and ", head at seq H" when records
follow the head, ", B breaks" when there are), or, with --output json,
{"records":N,"last_seq":S,"head_checked":true|false}, plus "after_head":K,
"torn_last_line":true and "breaks":[{"line","seq","reason",
"first_missing","last_missing"}] when they apply. A log that fails prints the
first line found wrong and why: an edited, missing, duplicated or
reordered record, or a truncated file.

Exit codes:
  0  the log verifies (with a warning for an unanchored tail or a break)
  1  the log fails verification (tampered, truncated or damaged), or it
     cannot be read
  2  usage error
  3  FILE or the head file does not exist`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			head, err := f.headPath(args[0])
			if err != nil {
				return err
			}
			return a.auditVerify(args[0], head, cmd.ErrOrStderr())
		},
	}
	cmd.Flags().StringVar(&f.head, "head", "", "`path` of the head file (default FILE.head)")
	cmd.Flags().BoolVar(&f.noHead, "no-head", false, "do not check the head: removed trailing records and an edited last record go unnoticed")
	return cmd
}

// auditVerify verifies the log at file against the head file at headPath
// ("" for none), prints the result, and warns on stderr of records after
// the head.
func (a *app) auditVerify(file, headPath string, stderr io.Writer) error {
	// The head first, then the log: every record the head names is in
	// the file by then, whatever keybrokerd writes meanwhile.
	var head *audit.Head
	if headPath != "" {
		h, err := audit.ReadHead(headPath)
		if err != nil {
			return notFoundAsStatus(err, "head file "+headPath)
		}
		head = &h
	}
	f, err := os.Open(file)
	if err != nil {
		return notFoundAsStatus(err, "audit log "+file)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("reading %s: %w", file, err)
	}
	var r io.Reader = f
	if fi.Mode().IsRegular() {
		// A live log grows while it is read: stop at its size now.
		r = io.LimitReader(f, fi.Size())
	}
	res, err := audit.VerifyLog(r, head)
	if err != nil {
		var verr *audit.VerifyError
		if errors.As(err, &verr) {
			return fmt.Errorf("%s: %w", file, err)
		}
		return fmt.Errorf("reading %s: %w", file, err)
	}
	if res.Unanchored() {
		fmt.Fprintf(stderr, "keybrokerctl: warning: %s: %s\n", file, unanchoredWarning(res, *head))
	}
	// A break is no tampering: the daemon wrote it when its log was
	// deleted, replaced or cut, and it says which records the file lacks.
	for _, b := range res.Breaks {
		fmt.Fprintf(stderr, "keybrokerctl: warning: %s: %s\n", file, b)
	}
	if a.jsonOutput() {
		type brk struct {
			Line         int    `json:"line"`
			Seq          uint64 `json:"seq"`
			Reason       string `json:"reason"`
			FirstMissing uint64 `json:"first_missing"`
			LastMissing  uint64 `json:"last_missing"`
		}
		var breaks []brk
		for _, b := range res.Breaks {
			breaks = append(breaks, brk{b.Line, b.Seq, b.Reason, b.First, b.Last})
		}
		b, err := json.Marshal(struct {
			Records      int    `json:"records"`
			LastSeq      uint64 `json:"last_seq"`
			HeadChecked  bool   `json:"head_checked"`
			AfterHead    int    `json:"after_head,omitempty"`
			TornLastLine bool   `json:"torn_last_line,omitempty"`
			Breaks       []brk  `json:"breaks,omitempty"`
		}{res.Records, res.LastSeq, head != nil, res.AfterHead, res.Torn, breaks})
		if err != nil {
			return err
		}
		return a.printJSON(b, false)
	}
	msg := fmt.Sprintf("ok: %d records, last seq %d", res.Records, res.LastSeq)
	if res.AfterHead > 0 {
		msg += fmt.Sprintf(", head at seq %d", head.Seq)
	}
	if n := len(res.Breaks); n > 0 {
		msg += fmt.Sprintf(", %d breaks (see the warnings)", n)
	}
	_, err = fmt.Fprintln(a.stdout, msg)
	return err
}

// unanchoredWarning describes the unanchored tail of a log that verified
// against head with res.
func unanchoredWarning(res audit.Result, head audit.Head) string {
	const why = "the log is open or was not closed cleanly"
	const torn = "its last line is incomplete (a record being written, or torn by a crash) and was not checked"
	if res.AfterHead == 0 {
		return fmt.Sprintf("after the head (seq %d), %s: %s", head.Seq, torn, why)
	}
	s := fmt.Sprintf("%d records after the head (seq %d): %s; they chain, but could be cut without detection",
		res.AfterHead, head.Seq, why)
	if res.AfterHead == 1 {
		s = fmt.Sprintf("1 record after the head (seq %d): %s; it chains, but could be cut without detection", head.Seq, why)
	}
	if res.Torn {
		s += "; and " + torn
	}
	return s
}

// notFoundAsStatus returns err, as a NOT_FOUND status (exit code 3) when
// the file does not exist.
func notFoundAsStatus(err error, what string) error {
	if errors.Is(err, fs.ErrNotExist) {
		return status.Errorf(codes.NotFound, "%s does not exist", what)
	}
	return err
}
