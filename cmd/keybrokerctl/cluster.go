package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

func newClusterCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Replicas sharing an etcd store",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Show the replicas, the rotation leader, and this replica's sync with etcd",
		Long: `Ask the replica behind --socket how it sees its cluster: its own id, the
rotation leader's, the replicas with a live etcd session, the time since it
last proved it holds every change, and each etcd endpoint's health. With
--output json: an object with "replica" and "leader" (replica ids),
"replicas", "lastSyncAge", "serving" and "endpoints". A daemon on the
bbolt store is not a cluster: FAILED_PRECONDITION (exit 5).`,
		Args: cobra.NoArgs,
		RunE: rpc[*kbv1.GetClusterStatusRequest, *kbv1.GetClusterStatusResponse]{
			request: func(*cobra.Command, []string) (*kbv1.GetClusterStatusRequest, error) {
				return &kbv1.GetClusterStatusRequest{}, nil
			},
			call: kbv1.KeyBrokerClient.GetClusterStatus,
			text: func(_ *kbv1.GetClusterStatusRequest, r *kbv1.GetClusterStatusResponse) error {
				leader := r.GetLeader()
				if leader == "" {
					leader = "(none)"
				}
				serving := "serving"
				if !r.GetServing() {
					serving = "NOT serving: past store.max_staleness"
				}
				var eps []string
				for _, e := range r.GetEndpoints() {
					h := "healthy"
					if !e.GetHealthy() {
						h = "UNREACHABLE"
					}
					eps = append(eps, e.GetEndpoint()+" "+h)
				}
				_, err := fmt.Fprintf(a.stdout, "replica:    %s\nleader:     %s\nreplicas:   %s\nlast sync:  %v ago (%s)\netcd:       %s\n",
					r.GetReplica(), leader, strings.Join(r.GetReplicas(), ", "),
					r.GetLastSyncAge().AsDuration().Round(time.Millisecond), serving, strings.Join(eps, ", "))
				return err
			},
		}.runE(a),
	})
	return cmd
}
