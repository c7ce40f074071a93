package tpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"os"
	"testing"
	"testing/iotest"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
)

// response builds a TPM response with code rc and body.
func response(rc tpm2.TPMRC, body ...byte) []byte {
	b := make([]byte, headerSize, headerSize+len(body))
	binary.BigEndian.PutUint16(b, uint16(tpm2.TPMSTNoSessions))
	binary.BigEndian.PutUint32(b[2:], uint32(headerSize+len(body)))
	binary.BigEndian.PutUint32(b[6:], uint32(rc))
	return append(b, body...)
}

func TestReadResponse(t *testing.T) {
	ok := response(0, 0, 2, 0xAB, 0xCD)
	for _, c := range []struct {
		name string
		r    io.Reader
		want []byte
	}{
		{"whole", bytes.NewReader(ok), ok},
		{"one byte at a time", iotest.OneByteReader(bytes.NewReader(ok)), ok},
		{"half at a time", iotest.HalfReader(bytes.NewReader(ok)), ok},
	} {
		got, err := readResponse(c.r)
		if err != nil || !bytes.Equal(got, c.want) {
			t.Errorf("%s: got %x, %v; want %x", c.name, got, err, c.want)
		}
	}
	big := response(0, make([]byte, 6000)...)
	if got, err := readResponse(iotest.HalfReader(bytes.NewReader(big))); err != nil || !bytes.Equal(got, big) {
		t.Errorf("a 6010-byte response: %v", err)
	}
	for _, c := range []struct {
		name string
		in   []byte
	}{
		{"truncated", ok[:len(ok)-1]},
		{"short header", ok[:5]},
		{"size below the header", func() []byte { b := bytes.Clone(ok); binary.BigEndian.PutUint32(b[2:], 4); return b }()},
		{"size too large", func() []byte { b := bytes.Clone(ok); binary.BigEndian.PutUint32(b[2:], 1<<20); return b }()},
		{"bytes after the response", append(bytes.Clone(ok), 0)},
	} {
		if _, err := readResponse(bytes.NewReader(c.in)); err == nil {
			t.Errorf("%s: no error", c.name)
		}
	}
}

// silentDevice never answers, like a hung TPM behind a device file.
type silentDevice struct {
	io.Reader // a pipe nobody writes
	closer    *io.PipeWriter
}

func (silentDevice) Write(p []byte) (int, error) { return len(p), nil }
func (d silentDevice) Close() error              { return d.closer.Close() }

func TestDeviceDeadline(t *testing.T) {
	r, w := io.Pipe()
	d := &devConn{f: silentDevice{Reader: r, closer: w}}
	defer d.Close()
	began := time.Now()
	_, err := d.roundTrip(response(0), began.Add(100*time.Millisecond))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("got %v, want os.ErrDeadlineExceeded", err)
	}
	if took := time.Since(began); took > time.Second {
		t.Errorf("gave up after %v, want about 100ms", took)
	}
}

// fakeConn answers with queued responses and records the commands.
type fakeConn struct {
	rsps [][]byte
	err  error
	cmds [][]byte
}

func (f *fakeConn) roundTrip(cmd []byte, _ time.Time) ([]byte, error) {
	f.cmds = append(f.cmds, cmd)
	if f.err != nil {
		return nil, f.err
	}
	rsp := f.rsps[0]
	f.rsps = f.rsps[1:]
	return rsp, nil
}

func (f *fakeConn) Close() error { return nil }

func fakeBackend(c conn) *Backend {
	b := &Backend{cfg: Config{Timeout: time.Second}, log: slog.New(slog.DiscardHandler), conn: c}
	b.forgetAll()
	return b
}

func TestLinkRetries(t *testing.T) {
	random := append(response(0), 0, 1, 7)
	binary.BigEndian.PutUint32(random[2:], uint32(len(random)))
	fc := &fakeConn{rsps: [][]byte{response(tpm2.TPMRCRetry), response(tpm2.TPMRCYielded), response(tpm2.TPMRCTesting), random}}
	b := fakeBackend(fc)
	l := &link{b: b, ctx: context.Background(), timeout: time.Second}
	rsp, err := tpm2.GetRandom{BytesRequested: 1}.Execute(l)
	if err != nil {
		t.Fatal(err)
	}
	if len(fc.cmds) != 4 || !bytes.Equal(rsp.RandomBytes.Buffer, []byte{7}) {
		t.Errorf("sent %d commands, got %x; want 4 and 07", len(fc.cmds), rsp.RandomBytes.Buffer)
	}

	// A command with sessions is not resent by the transport: the TPM
	// would not accept the same HMAC twice. Backend.retry runs it again.
	fc = &fakeConn{rsps: [][]byte{response(tpm2.TPMRCRetry)}}
	l.b = fakeBackend(fc)
	_, err = tpm2.Load{ParentHandle: tpm2.AuthHandle{Handle: 0x80000000, Name: tpm2.TPM2BName{Buffer: make([]byte, 34)}, Auth: tpm2.PasswordAuth(nil)}}.Execute(l)
	if !errors.Is(err, tpm2.TPMRCRetry) || len(fc.cmds) != 1 {
		t.Errorf("Load: got %v after %d commands, want TPM_RC_RETRY after 1", err, len(fc.cmds))
	}
}

func TestLinkDropsBrokenConnection(t *testing.T) {
	fc := &fakeConn{err: io.ErrUnexpectedEOF}
	b := fakeBackend(fc)
	b.objs["x"] = &object{id: "x"}
	l := &link{b: b, ctx: context.Background(), timeout: time.Second}
	_, err := tpm2.GetRandom{BytesRequested: 1}.Execute(l)
	if !errors.Is(err, kms.ErrUnavailable) || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("got %v, want ErrUnavailable wrapping the cause", err)
	}
	if b.conn != nil || len(b.objs) != 0 {
		t.Error("the broken connection and its objects were kept")
	}
	if _, err := (tpm2.GetRandom{BytesRequested: 1}).Execute(l); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("without a connection: got %v, want ErrUnavailable", err)
	}
}

func TestClassify(t *testing.T) {
	for _, c := range []struct {
		err  error
		want error
	}{
		{tpm2.TPMRCObjectMemory, kms.ErrResourceExhausted},
		{tpm2.TPMRCRetry, kms.ErrUnavailable},
		{tpm2.TPMRCFailure, kms.ErrUnavailable},
		{tpm2.TPMRCInitialize, kms.ErrUnavailable},
	} {
		if got := classify("op", c.err); !errors.Is(got, c.want) {
			t.Errorf("classify(%v) = %v, want %v", c.err, got, c.want)
		}
	}
	if got := classify("op", tpm2.TPMRCScheme); errors.Is(got, kms.ErrUnavailable) || errors.Is(got, kms.ErrInvalidArgument) {
		t.Errorf("classify(TPM_RC_SCHEME) = %v, want an internal error", got)
	}
	if classify("op", nil) != nil {
		t.Error("classify(nil) is not nil")
	}
}
