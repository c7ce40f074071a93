package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/internal/broker"
)

// TPM 2.0 wire framing (TCG TPM 2.0 Part 1 §18): every command and response
// starts with a 10-byte header, tag (2) | size (4) | code (4), where size
// counts the whole message.
const (
	headerSize = 10
	// maxResponse bounds a response; PC Client TPMs answer at most
	// MAX_RESPONSE_SIZE = 4096 bytes.
	maxResponse = 1 << 16
)

// Warnings after which the TPM asks to send the same command again (Part 2
// §6.6.3). The transport resends commands without sessions as they are; a
// command with sessions is run again by the backend with fresh sessions
// (Backend.retry), because libtpms rejects the same HMAC a second time
// (TPM_RC_BAD_AUTH after a TPM_RC_RETRY of TPM2_Sign, measured on swtpm).
var retryable = map[tpm2.TPMRC]bool{
	tpm2.TPMRCRetry:   true,
	tpm2.TPMRCYielded: true,
	tpm2.TPMRCTesting: true,
}

const (
	maxRetries   = 6
	firstBackoff = 5 * time.Millisecond
)

// conn is one connection to the TPM. It is not safe for concurrent use: the
// Backend serialises every command.
type conn interface {
	// roundTrip sends one command and reads its response. It gives up at
	// deadline or when ctx is done; the connection is then unusable (a
	// response may still be on its way) and must be closed.
	roundTrip(ctx context.Context, cmd []byte, deadline time.Time) ([]byte, error)
	Close() error
}

// dial opens the connection cfg names.
func dial(ctx context.Context, cfg Config, deadline time.Time) (conn, error) {
	switch {
	case cfg.Socket != "":
		d := net.Dialer{Deadline: deadline}
		c, err := d.DialContext(ctx, "unix", cfg.Socket)
		if err != nil {
			return nil, err
		}
		return &sockConn{c: c}, nil
	case cfg.Address != "":
		d := net.Dialer{Deadline: deadline}
		c, err := d.DialContext(ctx, "tcp", cfg.Address)
		if err != nil {
			return nil, err
		}
		return &sockConn{c: c}, nil
	default:
		return openDevice(cfg.Device)
	}
}

// sockConn is a stream socket to swtpm (or any TPM server speaking the
// plain command/response protocol, without the mssim platform framing).
// net.Conn deadlines bound every command.
type sockConn struct {
	c net.Conn
}

func (s *sockConn) roundTrip(ctx context.Context, cmd []byte, deadline time.Time) ([]byte, error) {
	if err := s.c.SetDeadline(deadline); err != nil {
		return nil, err
	}
	// A canceled ctx interrupts a blocked read by moving the deadline to
	// the past.
	stop := context.AfterFunc(ctx, func() { s.c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := s.c.Write(cmd); err != nil {
		return nil, err
	}
	return readResponse(s.c)
}

func (s *sockConn) Close() error { return s.c.Close() }

// devConn is a TPM character device, normally the kernel resource manager
// /dev/tpmrm0. The device is opened blocking: Go's os.OpenFile would put it
// in O_NONBLOCK mode, where the kernel runs commands asynchronously and a
// read before the response is ready returns 0 bytes, which reads as EOF.
// Blocking device files have no deadlines (os.File.SetDeadline fails with
// os.ErrNoDeadline), so a command runs on its own goroutine and the caller
// stops waiting at the deadline; that goroutine stays blocked until the
// kernel's own TPM timeouts (TCG PC Client durations, up to a few minutes)
// end the read, and the connection is dropped and reopened meanwhile.
type devConn struct {
	f io.ReadWriteCloser
}

func openDevice(path string) (conn, error) {
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return &devConn{f: os.NewFile(uintptr(fd), path)}, nil
}

func (d *devConn) roundTrip(ctx context.Context, cmd []byte, deadline time.Time) ([]byte, error) {
	type result struct {
		rsp []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		if _, err := d.f.Write(cmd); err != nil {
			done <- result{err: err}
			return
		}
		rsp, err := readResponse(d.f)
		done <- result{rsp, err}
	}()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case r := <-done:
		return r.rsp, r.err
	case <-timer.C:
		return nil, os.ErrDeadlineExceeded
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (d *devConn) Close() error { return d.f.Close() }

// hasSessions reports whether cmd carries an authorization area
// (tag TPM_ST_SESSIONS).
func hasSessions(cmd []byte) bool {
	return binary.BigEndian.Uint16(cmd) == uint16(tpm2.TPMSTSessions)
}

var errFraming = errors.New("malformed TPM response")

// readResponse reads one response, framed by the size field of its header.
// It reads in large chunks: a TPM device returns the whole response to the
// first read, and older kernels discard what that read does not take.
func readResponse(r io.Reader) ([]byte, error) {
	buf := make([]byte, 4096)
	n := 0
	for {
		m, err := r.Read(buf[n:])
		n += m
		if n >= headerSize {
			size := int(binary.BigEndian.Uint32(buf[2:]))
			if size < headerSize || size > maxResponse {
				return nil, fmt.Errorf("%w: size %d", errFraming, size)
			}
			if n > size {
				return nil, fmt.Errorf("%w: %d bytes after a %d-byte response", errFraming, n-size, size)
			}
			if n == size {
				return buf[:n], nil
			}
			if size > len(buf) {
				buf = append(buf, make([]byte, size-len(buf))...)
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}

// link is the transport.TPM that go-tpm's commands run on during one
// backend call: it bounds each command by the call's context and the
// per-command timeout, retries the TPM's "try again" warnings, and drops
// the connection when it fails, so that the next call reconnects.
type link struct {
	b   *Backend
	ctx context.Context
	// timeout is the per-command deadline; Generate raises it for
	// TPM2_Create of RSA keys.
	timeout time.Duration
}

func (l *link) Send(cmd []byte) ([]byte, error) {
	c := l.b.conn
	if c == nil {
		return nil, &Error{Op: commandName(cmd), Kind: broker.ErrUnavailable, Err: errors.New("not connected")}
	}
	backoff := firstBackoff
	for attempt := 0; ; attempt++ {
		if err := l.ctx.Err(); err != nil {
			// Nothing is in flight: the connection stays usable.
			return nil, &Error{Op: commandName(cmd), Kind: broker.ErrUnavailable, Err: err}
		}
		deadline := time.Now().Add(l.timeout)
		if d, ok := l.ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		rsp, err := c.roundTrip(l.ctx, cmd, deadline)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && l.ctx.Err() == nil {
				err = fmt.Errorf("no response within %v: %w", l.timeout, err)
			}
			return nil, l.fail(cmd, err)
		}
		rc := tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:]))
		if !retryable[rc] || attempt == maxRetries || hasSessions(cmd) {
			return rsp, nil
		}
		l.b.log.Debug("TPM asked to retry", "command", commandName(cmd), "rc", fmt.Sprintf("0x%x", uint32(rc)), "attempt", attempt+1)
		if err := sleep(l.ctx, backoff); err != nil {
			return nil, &Error{Op: commandName(cmd), Kind: broker.ErrUnavailable, Err: err}
		}
		backoff *= 2
	}
}

// fail drops the connection after a transport error and returns the error
// for the caller.
func (l *link) fail(cmd []byte, err error) error {
	l.b.dropConn(err)
	if ctxErr := l.ctx.Err(); ctxErr != nil && !errors.Is(err, ctxErr) {
		err = fmt.Errorf("%w: %w", ctxErr, err)
	}
	return &Error{Op: commandName(cmd), Kind: broker.ErrUnavailable, Err: err}
}

// commandNames names the commands this package sends, for errors and logs.
var commandNames = map[tpm2.TPMCC]string{
	tpm2.TPMCCCreatePrimary:    "TPM2_CreatePrimary",
	tpm2.TPMCCCreate:           "TPM2_Create",
	tpm2.TPMCCLoad:             "TPM2_Load",
	tpm2.TPMCCLoadExternal:     "TPM2_LoadExternal",
	tpm2.TPMCCSign:             "TPM2_Sign",
	tpm2.TPMCCCertify:          "TPM2_Certify",
	tpm2.TPMCCFlushContext:     "TPM2_FlushContext",
	tpm2.TPMCCStartAuthSession: "TPM2_StartAuthSession",
	tpm2.TPMCCGetCapability:    "TPM2_GetCapability",
	tpm2.TPMCCGetRandom:        "TPM2_GetRandom",
	tpm2.TPMCCReadPublic:       "TPM2_ReadPublic",
	tpm2.TPMCCTestParms:        "TPM2_TestParms",
	tpm2.TPMCCStartup:          "TPM2_Startup",
}

func commandName(cmd []byte) string {
	if len(cmd) < headerSize {
		return "TPM command"
	}
	cc := tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:]))
	if name, ok := commandNames[cc]; ok {
		return name
	}
	return fmt.Sprintf("TPM command 0x%x", uint32(cc))
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
