//go:build !linux

package authn

import (
	"errors"
	"net"
	"runtime"
)

// peerCred fails: SO_PEERCRED is Linux's; keybrokerd serves unix-socket
// callers only on Linux.
func peerCred(net.Conn) (ucred, error) {
	return ucred{}, errors.New("authn: unix peer credentials are not supported on " + runtime.GOOS)
}
