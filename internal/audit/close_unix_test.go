//go:build unix

package audit

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestCloseBoundedWhenHeadWriteStalls checks that Close returns after
// Options.Timeout when the last head cannot be written: a disk that stalls
// at shutdown must not hang the daemon's shutdown.
func TestCloseBoundedWhenHeadWriteStalls(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	const timeout = 100 * time.Millisecond
	l := openLog(t, path, Options{Timeout: timeout, HeadEvery: time.Hour})
	writeN(t, l, 0, 1)
	waitHead(t, path+".head", 1) // the anchor now pauses for HeadEvery
	// writeHead opens path.head.tmp for writing: a FIFO there blocks it
	// until a reader comes, as a stalled sync or rename would.
	fifo := path + ".head.tmp"
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// unblock lets the head write go on (and fail: a FIFO cannot be
	// synced), so that the anchor goroutine ends.
	unblock := func() {
		r, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-l.anchorDone:
		case <-time.After(returnBound):
			t.Errorf("anchor goroutine still running %s after the head file was unblocked", returnBound)
		}
		r.Close()
	}
	writeN(t, l, 1, 1)

	closed := make(chan error, 1)
	start := time.Now()
	go func() { closed <- l.Close() }()
	select {
	case err := <-closed:
		if took := time.Since(start); took < timeout {
			t.Errorf("Close returned after %s, before Timeout %s", took, timeout)
		}
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "head file not written") {
			t.Errorf("Close with a stalled head file: %v, want ErrUnavailable, head file not written", err)
		}
		// The anchor may still write the head file: the file stays
		// locked, so that no new Log opens it meanwhile.
		if !locked(t, path) {
			t.Errorf("log unlocked while its head is still being written")
		}
		unblock()
		for deadline := time.Now().Add(returnBound); locked(t, path); time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("log still locked %s after its writers returned", returnBound)
			}
		}
	case <-time.After(returnBound):
		t.Errorf("Close with Timeout %s still blocked after %s writing the last head", timeout, returnBound)
		unblock()
		<-closed
	}
	if h, err := ReadHead(path + ".head"); err != nil || h.Seq != 1 {
		t.Errorf("head file = %+v, %v; want seq 1 still", h, err)
	}
}
