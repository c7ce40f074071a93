package server

import (
	"context"
	"sort"

	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/cluster"
	"github.com/keybroker/keybroker/kms"
)

// ClusterView is the replica's view of its cluster (internal/cluster).
type ClusterView interface {
	Status(ctx context.Context) cluster.Status
}

// GetClusterStatus answers from this replica's view; a daemon with the
// bbolt store has no cluster.
func (s *Server) GetClusterStatus(ctx context.Context, _ *kbv1.GetClusterStatusRequest) (*kbv1.GetClusterStatusResponse, error) {
	if s.cluster == nil {
		return nil, &kms.ClientError{Kind: kms.ErrFailedPrecondition, Reason: ReasonNotACluster,
			Msg: "this daemon is not part of a cluster (store.backend is bbolt)"}
	}
	st := s.cluster.Status(ctx)
	resp := &kbv1.GetClusterStatusResponse{Replica: st.Replica, Leader: st.Leader, Replicas: st.Replicas,
		LastSyncAge: durationpb.New(st.SyncAge), Serving: st.Fresh}
	for ep, problem := range st.Endpoints {
		resp.Endpoints = append(resp.Endpoints, &kbv1.EtcdEndpoint{Endpoint: ep, Healthy: problem == ""})
	}
	sort.Slice(resp.Endpoints, func(i, j int) bool { return resp.Endpoints[i].Endpoint < resp.Endpoints[j].Endpoint })
	return resp, nil
}
