package cluster_test

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// netns is a network namespace joined to the host's by a veth pair: a
// replica started in it reaches etcd only over that link, which the test
// takes down (a partition) and up again.
type netns struct {
	t        *testing.T
	name     string
	hostIf   string
	hostAddr string
}

func ip(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatal("ip not found: run `make deps` (scripts/install-deps.sh installs iproute2)")
	}
	if os.Geteuid() != 0 {
		t.Fatal("the partition test makes a network namespace and needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
	}
	n := os.Getpid() % 250
	ns := &netns{t: t, name: fmt.Sprintf("kbtest%d", os.Getpid()), hostIf: fmt.Sprintf("kbh%d", os.Getpid()%100000),
		hostAddr: fmt.Sprintf("10.213.%d.1", n)}
	peer := fmt.Sprintf("kbn%d", os.Getpid()%100000)
	ip(t, "netns", "add", ns.name)
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", ns.hostIf).Run()
		exec.Command("ip", "netns", "del", ns.name).Run()
	})
	ip(t, "link", "add", ns.hostIf, "type", "veth", "peer", "name", peer)
	ip(t, "link", "set", peer, "netns", ns.name)
	ip(t, "addr", "add", ns.hostAddr+"/30", "dev", ns.hostIf)
	ip(t, "link", "set", ns.hostIf, "up")
	ip(t, "netns", "exec", ns.name, "ip", "addr", "add", fmt.Sprintf("10.213.%d.2/30", n), "dev", peer)
	ip(t, "netns", "exec", ns.name, "ip", "link", "set", peer, "up")
	ip(t, "netns", "exec", ns.name, "ip", "link", "set", "lo", "up")
	return ns
}

// cut takes the link down: packets are dropped, connections hang.
func (ns *netns) cut() { ip(ns.t, "link", "set", ns.hostIf, "down") }

// heal brings it up again.
func (ns *netns) heal() { ip(ns.t, "link", "set", ns.hostIf, "up") }
