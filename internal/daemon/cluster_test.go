package daemon

import (
	"errors"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/testetcd"
)

// TestClusterMetricsAndStatus: a replica alone on its etcd store leads,
// and says so in its metrics and its cluster status; a daemon on bbolt
// answers the status call FAILED_PRECONDITION.
func TestClusterMetricsAndStatus(t *testing.T) {
	c := testetcd.Start(t, 1)
	r := startDaemon(t, func(cfg *config.Config) {
		cfg.Admin.Address = "127.0.0.1:0"
		cfg.Store.Backend, cfg.Store.Endpoints, cfg.Store.Replica = "etcd", c.Endpoints(), "solo"
		cfg.Store.LeaseTTL = 2 * time.Second
	}, Options{})
	var st *kbv1.GetClusterStatusResponse
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var err error
		if st, err = r.client.GetClusterStatus(ctx10(t), &kbv1.GetClusterStatusRequest{}); err != nil {
			t.Fatal(err)
		}
		if st.GetLeader() == "solo" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st.GetReplica() != "solo" || st.GetLeader() != "solo" || !st.GetServing() || len(st.GetEndpoints()) != 1 || !st.GetEndpoints()[0].GetHealthy() {
		t.Fatalf("cluster status %v, want replica and leader solo, serving, its endpoint healthy", st)
	}
	m := scrape(t, r.d.AdminAddr())
	for _, want := range []string{"keybroker_cluster_leader 1", "keybroker_cluster_watch_restarts_total 0", "keybroker_cluster_leader_changes_total 1"} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
	age := regexp.MustCompile(`(?m)^keybroker_cluster_sync_age_seconds (\S+)$`).FindStringSubmatch(m)
	if age == nil {
		t.Fatal("metrics lack keybroker_cluster_sync_age_seconds")
	}
	if v, err := strconv.ParseFloat(age[1], 64); err != nil || v < 0 || v > 10 {
		t.Errorf("sync age %s, want a few tenths of a second", age[1])
	}

	single := startDaemon(t, nil, Options{})
	_, err := single.client.GetClusterStatus(ctx10(t), &kbv1.GetClusterStatusRequest{})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "not part of a cluster") {
		t.Errorf("GetClusterStatus on bbolt: %v, want FAILED_PRECONDITION saying it is not a cluster", err)
	}
}

// TestTPMWithEtcdRefused: the TPM backend with the etcd store is a
// configuration error (exit 78), before anything is opened.
func TestTPMWithEtcdRefused(t *testing.T) {
	cfg := config.Default()
	cfg.Backend = "tpm"
	cfg.Store.Backend, cfg.Store.Endpoints = "etcd", []string{"http://127.0.0.1:1"}
	_, err := New(cfg, nil)
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "a TPM key cannot be used from another host") {
		t.Fatalf("New: %v, want ErrConfig explaining the TPM", err)
	}
}

// TestReplicaID: store.replica wins; otherwise the host name, made a valid
// id, so that two hosts never fall back to one shared id by accident.
func TestReplicaID(t *testing.T) {
	cfg := config.Default()
	cfg.Store.Replica = "kb-7"
	if got := ReplicaID(cfg); got != "kb-7" {
		t.Errorf("ReplicaID with store.replica: %q", got)
	}
	for h, want := range map[string]string{
		"web-01.example.com":    "web-01.example.com",
		"Web_02":                "web_02",
		"db 3+x":                "db-3-x",
		"_lead":                 "replica", // no valid id can be made of it
		"":                      "replica",
		strings.Repeat("a", 70): strings.Repeat("a", 63),
	} {
		if got := hostReplicaID(h); got != want {
			t.Errorf("hostReplicaID(%q) = %q, want %q", h, hostReplicaID(h), want)
		}
	}
}
