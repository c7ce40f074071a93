package main

import (
	"encoding/json"
	"errors"
	"fmt"
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
SHA-256 of the line before it. The last seq and hash must match the head
file (--head, default FILE.head), which detects trailing records removed
and an edit of the last record; --no-head skips that check.

It prints "ok: N records, last seq S", or, with --output json,
{"records":N,"last_seq":S,"head_checked":true|false}. A log that fails
prints the first line found wrong and why: an edited, missing,
duplicated or reordered record, or a truncated file.

Exit codes:
  0  the log verifies
  1  the log fails verification (tampered, truncated or damaged), or it
     cannot be read
  2  usage error
  3  FILE or the head file does not exist`,
		Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			head, err := f.headPath(args[0])
			if err != nil {
				return err
			}
			return a.auditVerify(args[0], head)
		},
	}
	cmd.Flags().StringVar(&f.head, "head", "", "`path` of the head file (default FILE.head)")
	cmd.Flags().BoolVar(&f.noHead, "no-head", false, "do not check the head: removed trailing records and an edited last record go unnoticed")
	return cmd
}

// auditVerify verifies the log at file against the head file at headPath
// ("" for none) and prints the result.
func (a *app) auditVerify(file, headPath string) error {
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
	n, err := audit.Verify(f, head)
	if err != nil {
		var verr *audit.VerifyError
		if errors.As(err, &verr) {
			return fmt.Errorf("%s: %w", file, err)
		}
		return fmt.Errorf("reading %s: %w", file, err)
	}
	if a.jsonOutput() {
		b, err := json.Marshal(struct {
			Records     int  `json:"records"`
			LastSeq     int  `json:"last_seq"`
			HeadChecked bool `json:"head_checked"`
		}{n, n, head != nil})
		if err != nil {
			return err
		}
		return a.printJSON(b, false)
	}
	// Seqs go 1, 2, ...: the last seq is the number of records.
	_, err = fmt.Fprintf(a.stdout, "ok: %d records, last seq %d\n", n, n)
	return err
}

// notFoundAsStatus returns err, as a NOT_FOUND status (exit code 3) when
// the file does not exist.
func notFoundAsStatus(err error, what string) error {
	if errors.Is(err, fs.ErrNotExist) {
		return status.Errorf(codes.NotFound, "%s does not exist", what)
	}
	return err
}
