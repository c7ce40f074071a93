package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
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
	// roundTrip sends one command and reads its response, giving up at
	// deadline; after an error the connection is unusable (a response may
	// still be on its way) and must be closed. Nothing else interrupts it:
	// a caller's cancellation never lands in the middle of a command (see
	// link.Send), so the connection stays in step with the TPM.
	roundTrip(cmd []byte, deadline time.Time) ([]byte, error)
	Close() error
}

// Dial retries while a unix socket's listen backlog is full.
const (
	firstDialBackoff = time.Millisecond
	maxDialBackoff   = 50 * time.Millisecond
)

// dial opens the connection cfg names, giving up at deadline or when ctx is
// done.
func dial(ctx context.Context, cfg Config, deadline time.Time) (conn, error) {
	switch {
	case cfg.Socket != "":
		return dialSocket(ctx, "unix", cfg.Socket, deadline)
	case cfg.Address != "":
		return dialSocket(ctx, "tcp", cfg.Address, deadline)
	default:
		return openDevice(cfg.Device)
	}
}

// dialSocket connects to a TPM server. swtpm accepts one connection at a
// time, and Go connects unix sockets non-blocking: while swtpm's listen
// backlog is full the connect fails at once with EAGAIN ("resource
// temporarily unavailable") instead of waiting its turn, so EAGAIN is
// retried with a short backoff until deadline.
func dialSocket(ctx context.Context, network, addr string, deadline time.Time) (conn, error) {
	d := net.Dialer{Deadline: deadline}
	backoff := firstDialBackoff
	for {
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			return &sockConn{c: c}, nil
		}
		left := time.Until(deadline)
		if !errors.Is(err, syscall.EAGAIN) || left <= 0 {
			return nil, err
		}
		if serr := sleep(ctx, min(backoff, left)); serr != nil {
			return nil, fmt.Errorf("%w: %w", serr, err)
		}
		if !time.Now().Before(deadline) {
			return nil, err
		}
		backoff = min(2*backoff, maxDialBackoff)
	}
}

// sockConn is a stream socket to swtpm (or any TPM server speaking the
// plain command/response protocol, without the mssim platform framing).
// net.Conn deadlines bound every command.
type sockConn struct {
	c net.Conn
}

func (s *sockConn) roundTrip(cmd []byte, deadline time.Time) ([]byte, error) {
	if err := s.c.SetDeadline(deadline); err != nil {
		return nil, err
	}
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

func (d *devConn) roundTrip(cmd []byte, deadline time.Time) ([]byte, error) {
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
// backend call: it bounds each command by the call's deadline and the
// per-command timeout, retries the TPM's "try again" warnings, and drops
// the connection when it fails, so that the next call reconnects.
//
// The call's context is checked between commands, never during one: a
// command sent before the caller gave up is answered and its response read
// (within the deadline), so that one caller's cancellation never leaves the
// connection out of step for the next. The cancellation is reported by the
// next command of the call, which is not sent; a call whose last command
// was already sent completes. Cleanup commands (TPM2_FlushContext) are sent
// whatever the call's context says, bounded by the per-command timeout, so
// that a cancelled call leaves nothing loaded that the backend does not
// know of.
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
		return nil, &kms.Error{Backend: "tpm", Op: commandName(cmd), Kind: kms.ErrUnavailable, Err: errors.New("not connected")}
	}
	ctx := l.ctx
	if commandCode(cmd) == tpm2.TPMCCFlushContext {
		ctx = context.WithoutCancel(ctx)
	}
	backoff := firstBackoff
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			// Nothing is in flight: the connection stays usable.
			// Sessions started for this command are flushed when the
			// call ends (Backend.flushPending).
			return nil, &kms.Error{Backend: "tpm", Op: commandName(cmd), Kind: kms.ErrUnavailable, Err: err}
		}
		deadline := time.Now().Add(l.timeout)
		callerDeadline := false
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline, callerDeadline = d, true
		}
		l.b.inflight.Store(&inflight{sent: time.Now(), slow: l.timeout > l.b.cfg.Timeout})
		rsp, err := c.roundTrip(cmd, deadline)
		l.b.inflight.Store(nil)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if callerDeadline {
					err = fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
				} else {
					err = fmt.Errorf("no response within %v: %w", l.timeout, err)
				}
			}
			return nil, l.fail(cmd, err)
		}
		rc := tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:]))
		if !retryable[rc] || attempt == maxRetries || hasSessions(cmd) {
			l.b.track(cmd, rsp)
			return rsp, nil
		}
		l.b.log.Debug("TPM asked to retry", "command", commandName(cmd), "rc", fmt.Sprintf("0x%x", uint32(rc)), "attempt", attempt+1)
		if err := sleep(ctx, backoff); err != nil {
			return nil, &kms.Error{Backend: "tpm", Op: commandName(cmd), Kind: kms.ErrUnavailable, Err: err}
		}
		backoff *= 2
	}
}

// fail drops the connection after a transport error and returns the error
// for the caller.
func (l *link) fail(cmd []byte, err error) error {
	l.b.dropConn(err)
	return &kms.Error{Backend: "tpm", Op: commandName(cmd), Kind: kms.ErrUnavailable, Err: err}
}

// track keeps Backend.pending, the sessions started for a command that is
// not sent yet: go-tpm starts a command's sessions (TPM2_StartAuthSession)
// right before sending it, and flushes a one-use session when the TPM
// refuses the command, but not when the command is never sent.
func (b *Backend) track(cmd, rsp []byte) {
	switch commandCode(cmd) {
	case tpm2.TPMCCStartAuthSession:
		// TPM2_StartAuthSession's response carries the session handle
		// after the header (Part 3 §11.1).
		if tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:])) == tpm2.TPMRCSuccess && len(rsp) >= headerSize+4 {
			b.pending = append(b.pending, tpm2.TPMHandle(binary.BigEndian.Uint32(rsp[headerSize:])))
		}
	case tpm2.TPMCCFlushContext:
		// The handle is the command's only parameter; whatever the
		// answer, it is not loaded now.
		if len(cmd) >= headerSize+4 {
			b.adopt(tpm2.TPMHandle(binary.BigEndian.Uint32(cmd[headerSize:])))
		}
	default:
		// The command the sessions were started for was sent: from
		// here go-tpm (or the backend, for a reusable session) owns
		// them.
		b.pending = b.pending[:0]
	}
}

// adopt takes the session h off the pending list: the caller owns it.
func (b *Backend) adopt(h tpm2.TPMHandle) {
	b.pending = slices.DeleteFunc(b.pending, func(p tpm2.TPMHandle) bool { return p == h })
}

// flushPending flushes the sessions started for a command that was never
// sent, because the call's context ended in between.
func (b *Backend) flushPending(l *link) {
	for len(b.pending) > 0 && b.conn != nil {
		h := b.pending[0]
		tpm2.FlushContext{FlushHandle: h}.Execute(l)
		// track took h off the list, or the connection is gone.
		b.adopt(h)
	}
	b.pending = nil
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

// commandCode returns cmd's command code, 0 for a malformed command.
func commandCode(cmd []byte) tpm2.TPMCC {
	if len(cmd) < headerSize {
		return 0
	}
	return tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:]))
}

func commandName(cmd []byte) string {
	if len(cmd) < headerSize {
		return "TPM command"
	}
	cc := commandCode(cmd)
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

// begin takes the lock, honouring ctx, and connects when needed. The
// returned function releases the lock.
func (b *Backend) begin(ctx context.Context) (*link, func(), error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	select {
	case b.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, nil, &kms.Error{Backend: "tpm", Op: "wait for the TPM", Kind: b.waitKind(), Err: ctx.Err()}
	}
	if b.closed {
		<-b.sem
		return nil, nil, &kms.Error{Backend: "tpm", Op: "use the TPM", Kind: kms.ErrUnavailable, Err: errors.New("backend closed")}
	}
	l := &link{b: b, ctx: ctx, timeout: b.cfg.Timeout}
	unlock := func() {
		b.flushPending(l)
		<-b.sem
	}
	if err := b.connect(l); err != nil {
		unlock()
		return nil, nil, err
	}
	return l, unlock, nil
}

// inflight is a command on its way to the TPM and back.
type inflight struct {
	sent time.Time
	slow bool // an RSA key generation: seconds are normal
}

// stuckAfter is how long a command other than an RSA key generation may go
// unanswered before calls waiting behind it take the TPM for hung. TPM
// commands take milliseconds to a few hundred on slow chips.
const stuckAfter = time.Second

// waitKind is what a call that gave up waiting for the TPM ran into: a
// busy TPM (ErrResourceExhausted), or one whose command in flight is
// overdue (ErrUnavailable), so that health tells a hung TPM from a key
// generation.
func (b *Backend) waitKind() error {
	if f := b.inflight.Load(); f != nil && !f.slow && time.Since(f.sent) > stuckAfter {
		return kms.ErrUnavailable
	}
	return kms.ErrResourceExhausted
}

// connect opens the connection if there is none, and makes the TPM ready:
// started, no leftover handles, the SRK checked. A failure drops the
// connection, unless the call's context ended between two commands: the
// connection is then in step, and the next call initialises the TPM again.
func (b *Backend) connect(l *link) error {
	if b.conn == nil {
		deadline := time.Now().Add(b.cfg.Timeout)
		if d, ok := l.ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		c, err := dial(l.ctx, b.cfg, deadline)
		if err != nil {
			return &kms.Error{Backend: "tpm", Op: "connect", Kind: kms.ErrUnavailable, Err: err}
		}
		b.conn, b.ready = c, false
	}
	if b.ready {
		return nil
	}
	b.forgetAll()
	if err := b.initTPM(l); err != nil {
		if l.ctx.Err() == nil {
			b.dropConn(nil)
		}
		return err
	}
	b.ready = true
	return nil
}

func (b *Backend) initTPM(l *link) error {
	err := b.flushLeftovers(l, true)
	if isRC(err, tpm2.TPMRCInitialize) {
		// A TPM nobody started (swtpm without startup-clear): TPM2_Startup
		// is a TPM command, not a platform one.
		if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(l); err != nil {
			return classify("start the TPM", err)
		}
		err = b.flushLeftovers(l, true)
	}
	if err != nil {
		return err
	}
	err = b.retry(l, func() error {
		_, err := b.srk(l)
		return err
	})
	if err != nil && !errors.Is(err, ErrDataLoss) {
		return err
	}
	return nil
}

// dropConn closes a connection that failed; the next call reconnects.
func (b *Backend) dropConn(cause error) {
	if b.conn == nil {
		return
	}
	b.conn.Close()
	b.conn, b.ready, b.pending = nil, false, nil
	b.forgetAll()
	if cause != nil {
		b.log.Warn("TPM connection lost; reconnecting on the next call", "err", cause)
	}
}

// shutdown flushes what the backend loaded (objects and their sessions)
// and closes the connection.
func (b *Backend) shutdown(l *link) error {
	if b.conn == nil {
		return nil
	}
	for _, o := range b.objs {
		if err := b.flush(l, o); err != nil {
			b.log.Warn("cannot flush a TPM object at close", "err", err)
			break
		}
	}
	b.forgetAll()
	var err error
	if b.conn != nil {
		err = b.conn.Close()
		b.conn, b.ready, b.pending = nil, false, nil
	}
	return err
}

// retry runs fn, and runs it again when the TPM asked to (TPM_RC_RETRY and
// friends, for a command with sessions, which needs fresh ones: fn drops a
// reusable session that failed), lost track of objects or sessions the
// cache holds (someone flushed them), or ran out of session slots: all the
// backend's business, never the client's.
func (b *Backend) retry(l *link, fn func() error) error {
	backoff := firstBackoff
	for attempt := 0; ; attempt++ {
		err := fn()
		if err == nil || attempt == maxRetries || b.conn == nil {
			return err
		}
		switch {
		case isRC(err, tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting):
			b.log.Debug("TPM asked to retry", "err", err, "attempt", attempt+1)
			if serr := sleep(l.ctx, backoff); serr != nil {
				return err
			}
			backoff *= 2
		case isStaleHandle(err) && attempt < 2:
			b.log.Warn("a TPM object the backend had loaded is gone; reloading", "err", err)
			b.forgetAll()
			if ferr := b.flushLeftovers(l, true); ferr != nil {
				return ferr
			}
		case isRC(err, tpm2.TPMRCSessionMemory) && attempt < 2:
			b.log.Warn("the TPM has no free session slot; flushing sessions", "err", err)
			b.dropSessions(l)
			if ferr := b.flushLeftovers(l, true); ferr != nil {
				return ferr
			}
		case isStaleSession(err) && attempt < 2:
			// A reusable session someone flushed; the command that
			// used it dropped it, and the next run starts another.
			b.log.Warn("a TPM session the backend had started is gone; starting another", "err", err)
		default:
			return err
		}
	}
}
