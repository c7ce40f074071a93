package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

func newHealthCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "health",
		Short: "Check that keybrokerd is serving",
		Long: `Ask keybrokerd's grpc.health.v1 service about the server as a whole and
print its status (SERVING, NOT_SERVING, ...). Any status but SERVING exits 4.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					err = a.printProto(resp)
				} else {
					_, err = fmt.Fprintln(a.stdout, resp.GetStatus())
				}
				if err != nil {
					return err
				}
				if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
					return status.Errorf(codes.Unavailable, "keybrokerd is %s", resp.GetStatus())
				}
				return nil
			})
		},
	}
}
