package cluster_test

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// netns is a network namespace joined to the host's by a veth pair: a
// replica started in it reaches etcd only over that link, which the test
// takes down (a partition) and up again. The namespace is held by a
// process of its own (no named namespace, so no mounts to clean up) and
// ends with it.
type netns struct {
	t        *testing.T
	holder   *exec.Cmd
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
	for _, tool := range []string{"ip", "unshare", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: run `make deps` (scripts/install-deps.sh installs iproute2; util-linux has unshare and nsenter)", tool)
		}
	}
	if os.Geteuid() != 0 {
		t.Fatal("the partition test makes a network namespace and needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
	}
	holder := exec.Command("unshare", "--net", "sleep", "3600")
	holder.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := holder.Start(); err != nil {
		t.Fatalf("unshare --net: %v", err)
	}
	n := os.Getpid() % 250
	ns := &netns{t: t, holder: holder, hostIf: fmt.Sprintf("kbh%d", os.Getpid()%100000), hostAddr: fmt.Sprintf("10.213.%d.1", n)}
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", ns.hostIf).Run()
		holder.Process.Kill()
		holder.Wait()
	})
	// unshare has made the namespace once sleep runs in it.
	self, _ := os.Readlink("/proc/self/ns/net")
	for i := 0; ; i++ {
		if l, err := os.Readlink(ns.path()); err == nil && l != self {
			break
		}
		if i == 100 {
			t.Fatal("unshare --net did not make a network namespace within 2 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	peer := fmt.Sprintf("kbn%d", os.Getpid()%100000)
	ip(t, "link", "add", ns.hostIf, "type", "veth", "peer", "name", peer)
	ip(t, "link", "set", peer, "netns", fmt.Sprint(holder.Process.Pid))
	ip(t, "addr", "add", ns.hostAddr+"/30", "dev", ns.hostIf)
	ip(t, "link", "set", ns.hostIf, "up")
	ns.ip(t, "addr", "add", fmt.Sprintf("10.213.%d.2/30", n), "dev", peer)
	ns.ip(t, "link", "set", peer, "up")
	ns.ip(t, "link", "set", "lo", "up")
	return ns
}

func (ns *netns) path() string { return fmt.Sprintf("/proc/%d/ns/net", ns.holder.Process.Pid) }

// enter is the command prefix that runs a program in the namespace.
// nsenter only joins the network namespace (`ip netns exec` also remounts
// /sys, which fails in a chroot whose / is not a mount point).
func (ns *netns) enter() []string { return []string{"nsenter", "--net=" + ns.path()} }

// ip runs ip in the namespace.
func (ns *netns) ip(t *testing.T, args ...string) {
	t.Helper()
	cmd := append(ns.enter(), append([]string{"ip"}, args...)...)
	out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd, " "), err, out)
	}
}

// cut takes the link down: packets are dropped, connections hang.
func (ns *netns) cut() { ip(ns.t, "link", "set", ns.hostIf, "down") }

// heal brings it up again.
func (ns *netns) heal() { ip(ns.t, "link", "set", ns.hostIf, "up") }
