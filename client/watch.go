package client

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// WatchKeys calls fn with the key events of the caller's tenant (req.Name:
// one key), as WatchKeys streams them: the versions as they are (Snapshot
// set), a SNAPSHOT_COMPLETE event, then every change, in order. A watch
// the daemon cuts off because fn fell behind (RESOURCE_EXHAUSTED) is
// opened again, and starts with a new snapshot. It returns nil when ctx
// ends, fn's error when fn fails, and the stream's error otherwise
// (UNAVAILABLE when the daemon stops). fn runs on the caller's goroutine:
// the daemon never waits for it, but a slow fn is cut off.
func (c *Client) WatchKeys(ctx context.Context, req *kbv1.WatchKeysRequest, fn func(*kbv1.KeyEvent) error, opts ...WatchOption) error {
	var o watchOptions
	for _, f := range opts {
		f(&o)
	}
	for {
		err := c.watchOnce(ctx, req, fn)
		if ctx.Err() != nil {
			return nil
		}
		if _, cut := err.(cutOff); !cut {
			return err
		}
		if o.rewatch != nil {
			o.rewatch(err)
		}
	}
}

// WatchOption configures WatchKeys.
type WatchOption func(*watchOptions)

type watchOptions struct{ rewatch func(error) }

// OnRewatch calls f before a watch the daemon cut off is opened again.
func OnRewatch(f func(cutOff error)) WatchOption {
	return func(o *watchOptions) { o.rewatch = f }
}

// cutOff is a stream the daemon ended for falling behind.
type cutOff struct{ error }

func (c *Client) watchOnce(ctx context.Context, req *kbv1.WatchKeysRequest, fn func(*kbv1.KeyEvent) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.api.WatchKeys(ctx, req)
	if err != nil {
		return err
	}
	for {
		resp, err := st.Recv()
		if status.Code(err) == codes.ResourceExhausted {
			return cutOff{err}
		}
		if err != nil {
			return err
		}
		if err := fn(resp.GetEvent()); err != nil {
			return err
		}
	}
}
