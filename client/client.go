// Package client is keybroker's Go SDK: it dials keybrokerd (unix socket or
// TCP with mutual TLS) and gives applications hardware-held keys as a
// crypto.Signer (for x509 and crypto/tls client authentication), as a JOSE
// signer for the pop builders, and as an http.RoundTripper that attaches
// DPoP proofs. The private keys never leave the daemon's hardware.
package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// DefaultSocket is where keybrokerd listens by default.
const DefaultSocket = "/run/keybroker/keybroker.sock"

// Client is a connection to keybrokerd. It is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	api     kbv1.KeyBrokerClient
	timeout time.Duration
	mux     *signMux // nil: unary Sign calls
}

type options struct {
	tls     *tls.Config
	timeout time.Duration
	stream  bool
}

// Option configures Dial.
type Option func(*options)

// WithTLS dials over TCP with this TLS configuration; it must carry the
// client certificate the daemon maps to a tenant, and the CA that signed the
// daemon's certificate.
func WithTLS(c *tls.Config) Option { return func(o *options) { o.tls = c } }

// WithTimeout bounds calls made without a deadline (crypto.Signer.Sign,
// http.RoundTripper); default 10 s.
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithSignStream makes the client's Sign calls (and its Signers') messages
// of one SignStream, shared by all goroutines, instead of one unary call
// each: fewer HTTP/2 streams and less work per signature in both
// processes. A daemon without SignStream is called unary. When the stream
// breaks, the calls waiting on it fail with UNAVAILABLE (the daemon may
// have signed some of them) and the next call opens a new stream.
func WithSignStream() Option { return func(o *options) { o.stream = true } }

// Dial connects to keybrokerd. target is a unix socket path (or
// "unix:///path"), or "host:port" with WithTLS. An empty target means
// $KEYBROKER_SOCKET, else DefaultSocket. The connection is made lazily.
func Dial(target string, opts ...Option) (*Client, error) {
	o := options{timeout: 10 * time.Second}
	for _, f := range opts {
		f(&o)
	}
	if target == "" {
		target = os.Getenv("KEYBROKER_SOCKET")
	}
	if target == "" {
		target = DefaultSocket
	}
	var creds credentials.TransportCredentials
	switch {
	case o.tls != nil:
		if strings.HasPrefix(target, "unix:") || strings.HasPrefix(target, "/") {
			return nil, errors.New("client: WithTLS needs a host:port target")
		}
		creds = credentials.NewTLS(o.tls)
	case strings.HasPrefix(target, "unix:"):
		creds = insecure.NewCredentials() // the daemon identifies us by SO_PEERCRED
	case strings.HasPrefix(target, "/") || strings.HasPrefix(target, "."):
		target, creds = "unix:"+target, insecure.NewCredentials()
	default:
		return nil, fmt.Errorf("client: %q: a TCP target needs WithTLS (the daemon requires mutual TLS)", target)
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	c := &Client{conn: conn, api: kbv1.NewKeyBrokerClient(conn), timeout: o.timeout}
	if o.stream {
		c.mux = &signMux{api: c.api}
	}
	return c, nil
}

// Sign makes one Sign call, over the shared SignStream with
// WithSignStream. The client's default timeout applies when ctx has no
// deadline.
func (c *Client) Sign(ctx context.Context, req *kbv1.SignRequest) (*kbv1.SignResponse, error) {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	if c.mux != nil {
		return c.mux.sign(ctx, req)
	}
	return c.api.Sign(ctx, req)
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// API is the generated gRPC client, for RPCs the SDK does not wrap.
func (c *Client) API() kbv1.KeyBrokerClient { return c.api }

// Conn is the connection, for the daemon's other services (grpc.health.v1,
// reflection).
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// withTimeout gives ctx the client's default timeout when it has none.
func (c *Client) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout)
}
