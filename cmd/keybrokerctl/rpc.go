package main

import (
	"context"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// rpc is the shape of a command that makes one call to keybrokerd: a
// request built from the arguments and flags (checked before any call),
// the call, and the output.
type rpc[Req any, Resp proto.Message] struct {
	request func(cmd *cobra.Command, args []string) (Req, error)
	call    func(kbv1.KeyBrokerClient, context.Context, Req, ...grpc.CallOption) (Resp, error)
	// after, when set, runs on every response first (e.g. writing --out).
	after func(Req, Resp) error
	// text prints the response without --output json, which prints the
	// whole response message instead unless json is set.
	text func(Req, Resp) error
	json func(Req, Resp) error
}

// runE returns the command's RunE.
func (r rpc[Req, Resp]) runE(a *app) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		req, err := r.request(cmd, args)
		if err != nil {
			return err
		}
		return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
			resp, err := r.call(kbv1.NewKeyBrokerClient(conn), ctx, req)
			if err != nil {
				return err
			}
			if r.after != nil {
				if err := r.after(req, resp); err != nil {
					return err
				}
			}
			switch {
			case a.jsonOutput() && r.json != nil:
				return r.json(req, resp)
			case a.jsonOutput():
				return a.printProto(resp)
			}
			return r.text(req, resp)
		})
	}
}
