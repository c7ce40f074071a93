package authn

import (
	"fmt"
	"net"
	"syscall"
)

// peerCred reads SO_PEERCRED (unix(7)) of conn, which must be a unix
// stream socket. The kernel decides what the socket is (SO_DOMAIN,
// SO_TYPE), not the Go address: on a TCP socket SO_PEERCRED succeeds
// with the overflow uid, which must never pass as a caller.
func peerCred(conn net.Conn) (ucred, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return ucred{}, fmt.Errorf("%w: got %T", ErrNotUnix, conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return ucred{}, err
	}
	var (
		cred       *syscall.Ucred
		domain, ty int
		serr       error
	)
	cerr := raw.Control(func(fd uintptr) {
		if domain, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_DOMAIN); serr != nil {
			return
		}
		if ty, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_TYPE); serr != nil {
			return
		}
		if domain != syscall.AF_UNIX || ty != syscall.SOCK_STREAM {
			return
		}
		cred, serr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	switch {
	case cerr != nil:
		return ucred{}, cerr
	case serr != nil:
		return ucred{}, serr
	case domain != syscall.AF_UNIX || ty != syscall.SOCK_STREAM:
		return ucred{}, fmt.Errorf("%w: got socket domain %d type %d, want AF_UNIX (%d) SOCK_STREAM (%d)",
			ErrNotUnix, domain, ty, syscall.AF_UNIX, syscall.SOCK_STREAM)
	}
	return ucred{uid: cred.Uid, gid: cred.Gid, pid: cred.Pid}, nil
}
