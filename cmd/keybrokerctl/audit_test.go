package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keybroker/keybroker/internal/audit"
)

// auditLog writes n records to a new audit log and returns its path.
func auditLog(t testing.TB, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		r := audit.Record{RequestID: fmt.Sprintf("req-%d", i), Tenant: "acme", Method: "/keybroker.v1.KeyBroker/Sign", Code: "OK", LatencyMS: 1.25}
		if err := l.Write(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// runCtl runs keybrokerctl with args; no daemon is involved.
func runCtl(args ...string) result {
	var stdout, stderr bytes.Buffer
	code := run(args, &stdout, &stderr)
	return result{stdout.String(), stderr.String(), code}
}

func TestAuditVerifyCommand(t *testing.T) {
	path := auditLog(t, 4)
	runCtl("audit", "verify", path).check(t, exitOK, "ok: 4 records, last seq 4\n", "")
	runCtl("audit", "verify", path, "-o", "json").check(t, exitOK, `{"records":4,"last_seq":4,"head_checked":true}`+"\n", "")
	runCtl("audit", "verify", path, "--head", path+".head").check(t, exitOK, "ok: 4 records, last seq 4\n", "")

	// Another log's head file: its seq 2 is not this log's.
	other := auditLog(t, 2)
	r := runCtl("audit", "verify", path, "--head", other+".head")
	if want := "keybrokerctl: " + path + ": line 2 (seq 2): hash mismatch with the head"; r.code != exitFailure || r.stdout != "" || !strings.HasPrefix(r.stderr, want) {
		t.Errorf("verify against another log's head: exit %d, stdout %q, stderr %q; want %d and %q...", r.code, r.stdout, r.stderr, exitFailure, want)
	}

	// Without its head file, only --no-head verifies.
	if err := os.Remove(path + ".head"); err != nil {
		t.Fatal(err)
	}
	runCtl("audit", "verify", path).check(t, exitNotFound, "", "keybrokerctl: head file "+path+".head does not exist\n")
	runCtl("audit", "verify", path, "--no-head").check(t, exitOK, "ok: 4 records, last seq 4\n", "")
	runCtl("audit", "verify", path, "--no-head", "-o", "json").check(t, exitOK, `{"records":4,"last_seq":4,"head_checked":false}`+"\n", "")

	missing := filepath.Join(t.TempDir(), "none.log")
	runCtl("audit", "verify", missing, "--no-head").check(t, exitNotFound, "", "keybrokerctl: audit log "+missing+" does not exist\n")
}

func TestAuditVerifyTampered(t *testing.T) {
	tests := []struct {
		name     string
		edit     func([]byte) []byte
		wantLine string
	}{
		{"edited", func(b []byte) []byte { return bytes.Replace(b, []byte(`"req-1"`), []byte(`"req-7"`), 1) }, "line 3 (seq 3): prev hash mismatch"},
		{"line removed", func(b []byte) []byte {
			ls := bytes.SplitAfter(b, []byte("\n"))
			return bytes.Join(append(ls[:1:1], ls[2:]...), nil)
		}, "line 2 (seq 3): seq: got 3, want 2"},
		{"last line removed", func(b []byte) []byte { return b[:bytes.LastIndexByte(b[:len(b)-1], '\n')+1] }, "line 4 (seq 4): missing"},
		{"truncated", func(b []byte) []byte { return b[:len(b)-7] }, "line 4 (seq 4): truncated record"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := auditLog(t, 4)
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, tt.edit(b), 0o600); err != nil {
				t.Fatal(err)
			}
			r := runCtl("audit", "verify", path)
			if r.code != exitFailure {
				t.Errorf("exit code = %d, want %d", r.code, exitFailure)
			}
			if want := "keybrokerctl: " + path + ": " + tt.wantLine; !strings.HasPrefix(r.stderr, want) {
				t.Errorf("stderr = %q, want %q...", r.stderr, want)
			}
			if r.stdout != "" {
				t.Errorf("stdout = %q, want nothing", r.stdout)
			}
		})
	}
}

func TestAuditVerifyUsage(t *testing.T) {
	for _, tt := range []struct {
		args    []string
		wantErr string
	}{
		{[]string{"audit", "verify"}, "accepts 1 arg(s), received 0"},
		{[]string{"audit", "verify", "a", "b"}, "accepts 1 arg(s), received 2"},
		{[]string{"audit", "verify", "a", "--head", "h", "--no-head"}, "--head and --no-head: give at most one"},
		{[]string{"audit", "verify", "a", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"audit", "bogus"}, `unknown command "bogus" for "keybrokerctl audit"`},
	} {
		r := runCtl(tt.args...)
		if r.code != exitUsage || !strings.Contains(r.stderr, tt.wantErr) {
			t.Errorf("%q: exit %d, stderr %q; want %d and %q", tt.args, r.code, r.stderr, exitUsage, tt.wantErr)
		}
	}
	r := runCtl("audit", "verify", "--help")
	if r.code != exitOK || !strings.Contains(r.stdout, "1  the log fails verification") || !strings.Contains(r.stdout, "--no-head") || !strings.Contains(r.stdout, "unanchored tail") {
		t.Errorf("audit verify --help: exit %d, stdout:\n%s", r.code, r.stdout)
	}
}

// copyFile copies the file at from to to.
func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestAuditVerifyUnanchoredTail checks that records after the head, and a
// torn last line after it, verify with a warning: a log open, or not
// closed cleanly, is not a tampered one.
func TestAuditVerifyUnanchoredTail(t *testing.T) {
	path := auditLog(t, 2)
	older := filepath.Join(t.TempDir(), "older.head")
	copyFile(t, path+".head", older)
	// Two more records, in a second session.
	l, err := audit.Open(path, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := l.Write(context.Background(), audit.Record{RequestID: fmt.Sprint("more-", i), Method: "/m", Code: "OK"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	runCtl("audit", "verify", path).check(t, exitOK, "ok: 4 records, last seq 4\n", "")

	const why = "the log is open or was not closed cleanly"
	warn := "keybrokerctl: warning: " + path + ": 2 records after the head (seq 2): " + why +
		"; they chain, but could be cut without detection"
	runCtl("audit", "verify", path, "--head", older).check(t, exitOK, "ok: 4 records, last seq 4, head at seq 2\n", warn+"\n")
	runCtl("audit", "verify", path, "--head", older, "-o", "json").check(t, exitOK,
		`{"records":4,"last_seq":4,"head_checked":true,"after_head":2}`+"\n", warn+"\n")

	// A record being written: its line not yet whole.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(`{"seq":5,"time":"2026-`); err != nil {
		t.Fatal(err)
	}
	f.Close()
	torn := "its last line is incomplete (a record being written, or torn by a crash) and was not checked"
	runCtl("audit", "verify", path, "--head", older).check(t, exitOK, "ok: 4 records, last seq 4, head at seq 2\n",
		warn+"; and "+torn+"\n")
	runCtl("audit", "verify", path).check(t, exitOK, "ok: 4 records, last seq 4\n",
		"keybrokerctl: warning: "+path+": after the head (seq 4), "+torn+": "+why+"\n")
	runCtl("audit", "verify", path, "-o", "json").check(t, exitOK,
		`{"records":4,"last_seq":4,"head_checked":true,"torn_last_line":true}`+"\n",
		"keybrokerctl: warning: "+path+": after the head (seq 4), "+torn+": "+why+"\n")
	// Without the head, nothing is anchored: a torn line is a truncation.
	runCtl("audit", "verify", path, "--no-head").check(t, exitFailure, "",
		"keybrokerctl: "+path+": line 5 (seq 5): truncated record: the file ends inside this line, without its newline\n")
}

// TestAuditVerifyLiveLog verifies a log while keybrokerd would be writing
// it: the head file lags the log, and a line may be half written; neither
// is tampering.
func TestAuditVerifyLiveLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	const writers, perWriter, verifications = 4, 500, 20
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range perWriter {
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
				r := audit.Record{RequestID: fmt.Sprintf("req-%d-%d", w, i), Tenant: "acme", Method: "/keybroker.v1.KeyBroker/Sign", Code: "OK"}
				if err := l.Write(context.Background(), r); err != nil {
					t.Errorf("Write: %v", err)
					return
				}
			}
		})
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()
	warned := 0
	for range verifications {
		time.Sleep(2 * time.Millisecond)
		r := runCtl("audit", "verify", path)
		if r.code != exitOK || !strings.HasPrefix(r.stdout, "ok: ") {
			t.Fatalf("verify of a live log: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
		}
		if r.stderr != "" {
			if !strings.Contains(r.stderr, "warning: ") || !strings.Contains(r.stderr, "the log is open or was not closed cleanly") {
				t.Fatalf("verify of a live log: stderr %q, want a warning", r.stderr)
			}
			warned++
		}
	}
	t.Logf("%d of %d verifications warned of records after the head", warned, verifications)
}

// TestAuditVerifyBreak: a log whose file went missing goes on in a new
// segment; verify passes and says which records the file lacks.
func TestAuditVerifyBreak(t *testing.T) {
	path := auditLog(t, 3)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	l, err := audit.Open(path, audit.Options{}) // starts a segment after seq 3
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	runCtl("audit", "verify", path).check(t, exitOK, "ok: 1 records, last seq 4, 1 breaks (see the warnings)\n",
		"keybrokerctl: warning: "+path+": line 1 (seq 4) starts a new segment: the log file was missing at start; its head file named 3 records; records 1 to 3 are missing\n")
	runCtl("audit", "verify", path, "-o", "json").check(t, exitOK,
		`{"records":1,"last_seq":4,"head_checked":true,"breaks":[{"line":1,"seq":4,"reason":"the log file was missing at start; its head file named 3 records","first_missing":1,"last_missing":3}]}`+"\n",
		"keybrokerctl: warning: "+path+": line 1 (seq 4) starts a new segment: the log file was missing at start; its head file named 3 records; records 1 to 3 are missing\n")
}
