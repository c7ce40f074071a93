// Package testetcd starts real etcd clusters for tests: each member is an
// etcd process on loopback ports, with its data in the test's temporary
// directory, stopped when the test ends.
package testetcd

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Cluster is a running etcd cluster.
type Cluster struct {
	t       testing.TB
	Members []*Member
}

// Member is one etcd process.
type Member struct {
	Name      string
	ClientURL string // http://HOST:PORT, as clients reach it
	peerURL   string
	dir       string
	args      []string
	cmd       *exec.Cmd
	done      chan struct{}
}

// Binary returns the etcd binary, or fails the test saying how to get it.
func Binary(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatal("etcd not found in PATH: run `make deps` (scripts/install-deps.sh installs Debian's etcd-server)")
	}
	return p
}

// Options shape a cluster.
type Options struct {
	// ListenHost is the address members listen on for clients, besides
	// 127.0.0.1 (e.g. a veth address that a network namespace reaches).
	ListenHost string
}

// Start starts an n-member cluster and waits until it answers.
func Start(t testing.TB, n int, opts ...Options) *Cluster {
	t.Helper()
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	bin := Binary(t)
	root := t.TempDir()
	c := &Cluster{t: t}
	var initial []string
	ports := freePorts(t, 2*n)
	for i := range n {
		m := &Member{
			Name:      fmt.Sprintf("etcd-%d", i+1),
			ClientURL: fmt.Sprintf("http://127.0.0.1:%d", ports[2*i]),
			peerURL:   fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
			dir:       filepath.Join(root, fmt.Sprintf("etcd-%d", i+1)),
		}
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.peerURL)
	}
	for i, m := range c.Members {
		listen := m.ClientURL
		if o.ListenHost != "" {
			listen += fmt.Sprintf(",http://%s:%d", o.ListenHost, ports[2*i])
		}
		m.args = []string{bin,
			"--name", m.Name, "--data-dir", m.dir,
			"--listen-client-urls", listen, "--advertise-client-urls", m.ClientURL,
			"--listen-peer-urls", m.peerURL, "--initial-advertise-peer-urls", m.peerURL,
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", filepath.Base(root),
			// Fast elections on loopback; the defaults suit real networks.
			"--heartbeat-interval", "50", "--election-timeout", "500",
			"--logger", "zap", "--log-outputs", filepath.Join(root, m.Name+".log"),
		}
		c.start(m)
	}
	t.Cleanup(c.Stop)
	c.WaitHealthy(30 * time.Second)
	return c
}

func (c *Cluster) start(m *Member) {
	c.t.Helper()
	cmd := exec.Command(m.args[0], m.args[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("start %s: %v", m.Name, err)
	}
	m.cmd, m.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(m.done) }()
}

// Endpoints are the members' client URLs.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, m := range c.Members {
		out = append(out, m.ClientURL)
	}
	return out
}

// Kill stops member i with SIGKILL.
func (c *Cluster) Kill(i int) {
	m := c.Members[i]
	if m.cmd == nil {
		return
	}
	m.cmd.Process.Kill()
	<-m.done
	m.cmd = nil
}

// Restart starts a killed member again on its data.
func (c *Cluster) Restart(i int) {
	m := c.Members[i]
	if m.cmd != nil {
		return
	}
	args := append([]string(nil), m.args...)
	for j := range args {
		if args[j] == "new" && args[j-1] == "--initial-cluster-state" {
			args[j] = "existing"
		}
	}
	m.args = args
	c.start(m)
}

// Stop kills every member.
func (c *Cluster) Stop() {
	for i := range c.Members {
		c.Kill(i)
	}
}

// Client returns a client of the cluster, closed when the test ends.
func (c *Cluster) Client() *clientv3.Client {
	c.t.Helper()
	cl, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { cl.Close() })
	return cl
}

// WaitHealthy waits until a write through the cluster commits.
func (c *Cluster) WaitHealthy(within time.Duration) {
	c.t.Helper()
	cl := c.Client()
	deadline := time.Now().Add(within)
	var err error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err = cl.Put(ctx, "/testetcd/health", "ok")
		cancel()
		if err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("etcd cluster not healthy after %v: %v (logs in %s)", within, err, filepath.Dir(c.Members[0].dir))
}

// freePorts returns n loopback ports free right now.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}
