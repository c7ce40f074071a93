package authn

import (
	"context"
	"errors"
	"fmt"
	"net"

	"google.golang.org/grpc/credentials"
)

// ErrNotUnix is returned by the handshake of [UnixCredentials] for a
// connection that is not a unix stream socket.
var ErrNotUnix = errors.New("authn: not a unix socket connection")

// peerCredInfo is the AuthInfo of a connection accepted with
// UnixCredentials: the peer's SO_PEERCRED credentials.
type peerCredInfo struct {
	credentials.CommonAuthInfo
	uid, gid uint32
	pid      int32
}

// AuthType implements credentials.AuthInfo.
func (peerCredInfo) AuthType() string { return "peercred" }

// unixCreds are the TransportCredentials of UnixCredentials.
type unixCreds struct {
	info credentials.ProtocolInfo
}

// UnixCredentials returns server TransportCredentials for unix-socket
// listeners. The handshake exchanges no bytes: it reads the SO_PEERCRED
// credentials of the connection (those of the peer at connect(2) time)
// and attaches them as the connection's AuthInfo, read back with
// [FromContext]. Like grpc's credentials/local for unix sockets, it
// reports security level PrivacyAndIntegrity: the kernel carries the
// bytes and names the peer. A connection that is not a unix stream
// socket fails the handshake with [ErrNotUnix]; so does any client-side
// use. Clients dial the socket with insecure (or local) credentials.
func UnixCredentials() credentials.TransportCredentials {
	return &unixCreds{info: credentials.ProtocolInfo{SecurityProtocol: "peercred"}}
}

// ClientHandshake fails: UnixCredentials are for servers only.
func (*unixCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("authn: UnixCredentials are server credentials; dial with insecure or local credentials")
}

// ServerHandshake reads the peer credentials of conn.
func (*unixCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	cred, err := peerCred(conn)
	if err != nil {
		return nil, nil, fmt.Errorf("authn: peer credentials of %v: %w", remote(conn), err)
	}
	return conn, peerCredInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
		uid:            cred.uid,
		gid:            cred.gid,
		pid:            cred.pid,
	}, nil
}

// Info implements credentials.TransportCredentials.
func (c *unixCreds) Info() credentials.ProtocolInfo { return c.info }

// Clone implements credentials.TransportCredentials.
func (c *unixCreds) Clone() credentials.TransportCredentials { return &unixCreds{info: c.info} }

// OverrideServerName implements credentials.TransportCredentials; gRPC
// no longer calls it.
func (c *unixCreds) OverrideServerName(name string) error {
	c.info.ServerName = name
	return nil
}

// ucred is what SO_PEERCRED returns.
type ucred struct {
	uid, gid uint32
	pid      int32
}

// remote names the peer of conn for errors.
func remote(conn net.Conn) string {
	if a := conn.RemoteAddr(); a != nil {
		return a.Network() + ":" + a.String()
	}
	return "unknown peer"
}
