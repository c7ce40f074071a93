package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

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

	// Another head file: an older one, from when the log had 2 records.
	older := auditLog(t, 2)
	runCtl("audit", "verify", path, "--head", older+".head").check(t, exitFailure, "",
		"keybrokerctl: "+path+": line 3 (seq 3): after the head: the head is at seq 2 but the log goes on to seq 4\n")

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
	if r.code != exitOK || !strings.Contains(r.stdout, "1  the log fails verification") || !strings.Contains(r.stdout, "--no-head") {
		t.Errorf("audit verify --help: exit %d, stdout:\n%s", r.code, r.stdout)
	}
}
