//go:build unix

package audit

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// checkInUse checks that err is Open's refusal of a log another Log holds.
func checkInUse(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("Open of a log held by another Log: %v, want ErrInUse (another process has the audit log open)", err)
	}
}

// locked reports whether some open file holds a lock on path, without
// taking it.
func locked(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return true
	}
	if err != nil {
		t.Fatal(err)
	}
	return false
}

func TestOpenRefusesLogInUse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path, Options{})
	writeN(t, l, 0, 3)

	l2, err := Open(path, Options{})
	if err == nil {
		l2.Close()
	}
	checkInUse(t, err)

	// The first Log goes on, and its chain is whole.
	writeN(t, l, 3, 2)
	closeLog(t, l)
	verifyFile(t, path, 5)

	// Closed, it no longer holds the file.
	l = openLog(t, path, Options{})
	writeN(t, l, 5, 1)
	closeLog(t, l)
	verifyFile(t, path, 6)
}

// TestOpenInUseTouchesNothing checks that an Open refused for a log in use
// repairs nothing: what looks like a torn last line may be a line the
// other Log is writing.
func TestOpenInUseTouchesNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path, Options{})
	writeN(t, l, 0, 2)
	closeLog(t, l) // the head file now holds seq 2
	// Another Log holds the file (until cleanup), and is writing a line.
	openLog(t, path, Options{})
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(`{"seq":3,"ti`); err != nil {
		t.Fatal(err)
	}
	f.Close()
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	wantHead, err := os.ReadFile(path + ".head")
	if err != nil {
		t.Fatal(err)
	}

	l2, err := Open(path, Options{})
	if err == nil {
		l2.Close()
	}
	checkInUse(t, err)
	if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, want) {
		t.Errorf("log after a refused Open: %q, %v; want it untouched, %q", got, err, want)
	}
	if got, err := os.ReadFile(path + ".head"); err != nil || !bytes.Equal(got, wantHead) {
		t.Errorf("head file after a refused Open: %q, %v; want it untouched, %q", got, err, wantHead)
	}
}

// lockHelperEnv names the log TestLockHelperProcess holds.
const lockHelperEnv = "AUDIT_LOCK_HELPER_PATH"

// TestLockHelperProcess is not a test: run in a process of its own by
// TestOpenRefusesLogInUseByOtherProcess, it opens the log, says "ready",
// and holds it until its stdin closes.
func TestLockHelperProcess(t *testing.T) {
	path := os.Getenv(lockHelperEnv)
	if path == "" {
		t.Skip("helper process for TestOpenRefusesLogInUseByOtherProcess")
	}
	l, err := Open(path, Options{})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	if err := l.Write(context.Background(), record(0)); err != nil {
		fmt.Println("write:", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	var b [1]byte
	os.Stdin.Read(b[:]) // until EOF
	if err := l.Close(); err != nil {
		fmt.Println("close:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func TestOpenRefusesLogInUseByOtherProcess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestLockHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), lockHelperEnv+"="+path)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := false
	defer func() {
		if !waited {
			stdin.Close()
			cmd.Wait()
		}
	}()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if line != "ready\n" {
		t.Fatalf("helper process: %q, %v; want ready", line, err)
	}

	l, err := Open(path, Options{})
	if err == nil {
		l.Close()
	}
	checkInUse(t, err)

	// Once the other process has closed the log, it is free, and whole.
	stdin.Close()
	waited = true
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper process: %v", err)
	}
	l = openLog(t, path, Options{})
	writeN(t, l, 1, 1)
	closeLog(t, l)
	verifyFile(t, path, 2)
}
