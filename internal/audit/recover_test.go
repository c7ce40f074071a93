//go:build linux

package audit

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// changes records what a Log passes to Options.OnChange.
type changes struct {
	mu   sync.Mutex
	errs []error
}

func (c *changes) add(err error) {
	c.mu.Lock()
	c.errs = append(c.errs, err)
	c.mu.Unlock()
}

func (c *changes) get() []error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]error(nil), c.errs...)
}

// recoverOptions retries often, so that the tests wait little.
func recoverOptions(c *changes) Options {
	return Options{RetryEvery: 10 * time.Millisecond, HeadEvery: time.Millisecond, OnChange: c.add}
}

// failNext writes record i and wants it refused as UNAVAILABLE with the
// log failed, and OnChange told so.
func failNext(t *testing.T, l *Log, c *changes, i int, why string) {
	t.Helper()
	err := l.Write(t.Context(), record(i))
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), why) {
		t.Fatalf("Write after the change: %v, want ErrUnavailable saying %q", err, why)
	}
	if l.Err() == nil {
		t.Fatal("Err() = nil after a failed commit")
	}
	if got := c.get(); len(got) == 0 || got[0] == nil {
		t.Fatalf("OnChange calls = %v, want the failure first", got)
	}
}

// waitRecovered waits until the log takes Writes again, within returnBound.
func waitRecovered(t *testing.T, l *Log, c *changes) {
	t.Helper()
	deadline := time.Now().Add(returnBound)
	for l.Err() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("log still failed after %s: %v", returnBound, l.Err())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if got := c.get(); len(got) < 2 || got[len(got)-1] != nil {
		t.Errorf("OnChange calls = %v, want nil (recovered) last", got)
	}
}

// verifyPath verifies the log at path against its head and returns the
// result, failing the test on any error.
func verifyPath(t *testing.T, path string) Result {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	head, err := ReadHead(path + ".head")
	if err != nil {
		t.Fatal(err)
	}
	res, err := VerifyLog(bytes.NewReader(b), &head)
	if err != nil {
		t.Fatalf("VerifyLog: %v", err)
	}
	if res.Unanchored() {
		t.Errorf("VerifyLog = %+v: records after the head of a closed log", res)
	}
	return res
}

// TestRecoversFromChangedFile: the file deleted, moved, replaced by an
// empty file, or cut short under a running Log. The next Write is refused
// (its record is not in the file at the path), the log fails until it has
// a file at the path again, then starts a new segment whose Break says
// which records the file lacks; no acknowledged record is anywhere but in
// the file at the path.
func TestRecoversFromChangedFile(t *testing.T) {
	tests := []struct {
		name   string
		change func(t *testing.T, path string)
		why    string
		reason string
		kept   int // records of the first 5 still in the file at the path
	}{
		{"deleted", func(t *testing.T, path string) {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
		}, "deleted or moved away", "deleted or moved away", 0},
		{"moved", func(t *testing.T, path string) {
			if err := os.Rename(path, path+".1"); err != nil {
				t.Fatal(err)
			}
		}, "deleted or moved away", "deleted or moved away", 0},
		{"rotated", func(t *testing.T, path string) {
			if err := os.Rename(path, path+".1"); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}, "another file replaced it", "replaced by another file", 0},
		{"truncated to nothing", func(t *testing.T, path string) {
			if err := os.Truncate(path, 0); err != nil {
				t.Fatal(err)
			}
		}, "truncated", "cut from", 0},
		{"cut inside record 4", func(t *testing.T, path string) {
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			ls := lines(t, b)
			at := len(ls[0]) + len(ls[1]) + len(ls[2]) + 3 + 20
			if err := os.Truncate(path, int64(at)); err != nil {
				t.Fatal(err)
			}
		}, "truncated", "cut from", 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.log")
			c := &changes{}
			l := openLog(t, path, recoverOptions(c))
			writeN(t, l, 0, 5)
			tt.change(t, path)
			failNext(t, l, c, 5, tt.why)
			waitRecovered(t, l, c)
			writeN(t, l, 6, 2)
			closeLog(t, l)

			res := verifyPath(t, path)
			// The kept records, the break, the 2 written after.
			if res.Records != tt.kept+3 || res.LastSeq != 8 || len(res.Breaks) != 1 {
				t.Fatalf("VerifyLog = %+v, want %d records up to seq 8 and one break", res, tt.kept+3)
			}
			br := res.Breaks[0]
			if br.Line != tt.kept+1 || br.Seq != 6 || br.First != uint64(tt.kept)+1 || br.Last != 5 || !strings.Contains(br.Reason, tt.reason) {
				t.Errorf("break = %+v, want line %d, seq 6, records %d to 5 missing, reason %q", br, tt.kept+1, tt.kept+1, tt.reason)
			}
		})
	}
}

// TestStaysFailedOverForeignFile: a non-empty file that this log did not
// write at the path is never appended to; the log recovers once it is
// moved away.
func TestStaysFailedOverForeignFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	c := &changes{}
	l := openLog(t, path, recoverOptions(c))
	writeN(t, l, 0, 2)
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	foreign := []byte("not ours\n")
	if err := os.WriteFile(path, foreign, 0o600); err != nil {
		t.Fatal(err)
	}
	failNext(t, l, c, 2, "another file replaced it")
	time.Sleep(20 * l.retryEvery)
	if l.Err() == nil {
		t.Fatal("the log recovered into a file it did not write")
	}
	if b, err := os.ReadFile(path); err != nil || !bytes.Equal(b, foreign) {
		t.Fatalf("the foreign file changed: %q, %v", b, err)
	}
	if err := os.Rename(path, path+".foreign"); err != nil {
		t.Fatal(err)
	}
	waitRecovered(t, l, c)
	writeN(t, l, 3, 1)
	closeLog(t, l)
	if res := verifyPath(t, path); res.Records != 2 || len(res.Breaks) != 1 || res.Breaks[0].Last != 2 {
		t.Errorf("VerifyLog = %+v, want the break and one record", res)
	}
}

// TestRecoversFromFullDisk: the log on a real, small filesystem that fills
// up. Writes fail (UNAVAILABLE) while it is full, no torn line is left, and
// within a second of space coming back the log takes Writes again: the
// chain goes on (no break) after a Resumed record that says how many
// records were refused.
func TestRecoversFromFullDisk(t *testing.T) {
	dir := smallFS(t, "256k")
	path := filepath.Join(dir, "audit.log")
	c := &changes{}
	l := openLog(t, path, recoverOptions(c))
	writeN(t, l, 0, 3)
	filler := filepath.Join(dir, "filler")
	fillUp(t, filler)
	var err error
	written := 3
	for i := 3; err == nil; i++ {
		if i > 10000 {
			t.Fatal("10,000 records written to a full filesystem")
		}
		if err = l.Write(t.Context(), record(i)); err == nil {
			written++
		}
	}
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("Write to a full filesystem: %v, want ErrUnavailable, no space left", err)
	}
	refused := 0
	for i := range 5 {
		if err := l.Write(t.Context(), record(100000+i)); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Write while full: %v, want ErrUnavailable", err)
		}
		refused++
	}
	time.Sleep(5 * l.retryEvery)
	if l.Err() == nil {
		t.Fatal("the log recovered while the filesystem is still full")
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	waitRecovered(t, l, c)
	if took := time.Since(freed); took > time.Second {
		t.Errorf("writable again %s after space came back, want within 1 s", took)
	}
	writeN(t, l, 200000, 2)
	closeLog(t, l)

	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	res := verifyPath(t, path)
	if len(res.Breaks) != 0 || res.Records != written+3 {
		t.Fatalf("VerifyLog = %+v, want %d records and no break", res, written+3)
	}
	var resumed Record
	if err := decodeRecord(lines(t, b)[written], &resumed); err != nil {
		t.Fatal(err)
	}
	if resumed.Method != MethodResumed || !strings.Contains(resumed.Note, "no space left") {
		t.Errorf("record after the outage = %+v, want %s naming the cause", resumed, MethodResumed)
	}
	if !strings.Contains(resumed.Note, " records were refused") {
		t.Errorf("Resumed note %q does not count the refused records", resumed.Note)
	}
}

// smallFS mounts a tmpfs of size for the test and returns its directory.
func smallFS(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts a small tmpfs to fill it up: run it as root (make test does, in CI)")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// fillUp writes path until its filesystem is full.
func fillUp(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			break
		}
	}
	// Blocks may be left smaller than a chunk: fill them byte by byte.
	for {
		if _, err := f.Write(chunk[:1]); err != nil {
			return
		}
	}
}
