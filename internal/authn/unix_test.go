package authn_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/keybroker/keybroker/internal/authn"
)

// unixListener listens on a socket in a short temporary directory (unix
// socket paths are limited to 107 bytes; t.TempDir can be longer).
func unixListener(t testing.TB) (net.Listener, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "au")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s")
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	return lis, path
}

func TestUnixCredentials(t *testing.T) {
	lis, path := unixListener(t)
	rec := serve(t, lis, authn.UnixCredentials())

	if err := check(t, "unix://"+path, insecure.NewCredentials()); err != nil {
		t.Fatalf("Check over unix socket: %v", err)
	}
	c := rec.last(t)
	if !c.ok {
		t.Fatal("FromContext: ok = false, want true")
	}
	want := authn.Identity{Unix: true, UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), PID: int32(os.Getpid())}
	if c.id.Unix != want.Unix || c.id.UID != want.UID || c.id.GID != want.GID || c.id.PID != want.PID ||
		c.id.SPIFFEID != "" || c.id.DNSNames != nil || c.id.CommonName != "" {
		t.Errorf("FromContext = %+v, want %+v", c.id, want)
	}
}

// A unix-socket server without UnixCredentials has no identity to give.
func TestFromContextInsecureUnix(t *testing.T) {
	lis, path := unixListener(t)
	rec := serve(t, lis, insecure.NewCredentials())
	if err := check(t, "unix://"+path, insecure.NewCredentials()); err != nil {
		t.Fatalf("Check: %v", err)
	}
	if c := rec.last(t); c.ok {
		t.Errorf("FromContext = %+v, true; want ok = false", c.id)
	}
}

// UnixCredentials on a TCP listener must refuse every connection: on TCP,
// SO_PEERCRED would "succeed" with the overflow uid.
func TestUnixCredentialsRejectTCP(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rec := serve(t, lis, authn.UnixCredentials())
	err = check(t, lis.Addr().String(), insecure.NewCredentials())
	if status.Code(err) != codes.Unavailable {
		t.Errorf("Check over TCP: got %v, want code Unavailable", err)
	}
	if n := rec.count(); n != 0 {
		t.Errorf("interceptor ran %d times, want 0", n)
	}
}

func TestUnixCredentialsHandshake(t *testing.T) {
	creds := authn.UnixCredentials()

	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	client, err := net.Dial("tcp", tcp.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := tcp.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()

	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()

	for name, conn := range map[string]net.Conn{"tcp": server, "pipe": p1} {
		if _, info, err := creds.ServerHandshake(conn); !errors.Is(err, authn.ErrNotUnix) {
			t.Errorf("ServerHandshake(%s) = %v, %v; want error %v", name, info, err, authn.ErrNotUnix)
		}
	}

	lis, path := unixListener(t)
	uc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	if _, _, err := creds.ClientHandshake(t.Context(), "x", uc); err == nil {
		t.Error("ClientHandshake succeeded, want error (server-only credentials)")
	}
	us, err := lis.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer us.Close()
	_, info, err := creds.ServerHandshake(us)
	if err != nil {
		t.Fatalf("ServerHandshake(unix): %v", err)
	}
	ci, ok := info.(interface {
		GetCommonAuthInfo() credentials.CommonAuthInfo
	})
	if !ok {
		t.Fatalf("AuthInfo %T has no CommonAuthInfo", info)
	}
	if got := ci.GetCommonAuthInfo().SecurityLevel; got != credentials.PrivacyAndIntegrity {
		t.Errorf("SecurityLevel = %v, want %v", got, credentials.PrivacyAndIntegrity)
	}
	if got := creds.Info().SecurityProtocol; got == "" {
		t.Error("Info().SecurityProtocol is empty")
	}
	if got := creds.Clone().Info(); got != creds.Info() {
		t.Errorf("Clone().Info() = %+v, want %+v", got, creds.Info())
	}
}
