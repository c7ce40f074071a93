package cluster_test

// The harness: a 3-member etcd cluster, SoftHSM2 behind p11-kit server as
// the network HSM, and keybrokerd replicas as processes, each a real
// binary started and killed by the test.

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/internal/store/etcd"
	"github.com/keybroker/keybroker/internal/testetcd"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/softhsm/p11kittest"
)

var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kbcluster-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := exec.Command("go", "build", "-o", dir+"/", "github.com/keybroker/keybroker/cmd/keybrokerd").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building keybrokerd: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// Timing of the test cluster: short, so that failover tests take seconds.
const (
	leaseTTL     = 2 * time.Second
	maxStaleness = 3 * time.Second
)

type env struct {
	t        *testing.T
	dir      string
	etcd     *testetcd.Cluster
	hsm      *p11kittest.Server
	replicas []*replica
	prefix   string
	// netnsHost, when set, is the address replicas in a namespace reach
	// etcd at.
	netnsHost string
	ns        *netns
}

type replica struct {
	env  *env
	id   string
	dir  string
	sock string
	cfg  string
	arm  string // the failpoint's arming file
	ns   *netns // network namespace, nil for the host's
	env_ []string
	cmd  *exec.Cmd
	done chan struct{}
	out  *strings.Builder
	cl   *client.Client
}

type envOptions struct {
	replicas  int
	failpoint string // KEYBROKER_FAILPOINT for every replica
	// netns starts the last replica in its own network namespace.
	netns bool
}

// shortDir is a temporary directory with a short path: unix socket paths
// must fit in 108 bytes.
func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "kbc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func newEnv(t *testing.T, o envOptions) *env {
	t.Helper()
	e := &env{t: t, dir: shortDir(t), prefix: "/keybroker/"}
	var ns *netns
	if o.netns {
		ns = newNetns(t)
		e.ns, e.netnsHost = ns, ns.hostAddr
		e.etcd = testetcd.Start(t, 3, testetcd.Options{ListenHost: ns.hostAddr})
	} else {
		e.etcd = testetcd.Start(t, 3)
	}
	e.hsm = p11kittest.Start(t, e.dir)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for _, r := range e.replicas {
			var lines []string
			for _, l := range strings.Split(r.out.String(), "\n") {
				if !strings.Contains(l, "level=DEBUG") {
					lines = append(lines, l)
				}
			}
			t.Logf("%s's log:\n%s", r.id, strings.Join(lines, "\n"))
		}
	})
	for i := range o.replicas {
		r := &replica{env: e, id: fmt.Sprintf("replica-%d", i+1)}
		r.dir = filepath.Join(e.dir, r.id)
		r.sock = filepath.Join(r.dir, "kb.sock")
		r.arm = filepath.Join(r.dir, "armed")
		if ns != nil && i == o.replicas-1 {
			r.ns = ns
		}
		if err := os.MkdirAll(r.dir, 0o700); err != nil {
			t.Fatal(err)
		}
		r.env_ = []string{"P11_KIT_SERVER_ADDRESS=" + e.hsm.Address()}
		if o.failpoint != "" {
			r.env_ = append(r.env_, "KEYBROKER_FAILPOINT="+o.failpoint, "KEYBROKER_FAILPOINT_ARMED="+r.arm)
		}
		r.writeConfig()
		e.replicas = append(e.replicas, r)
	}
	// One after the other: SoftHSM2 processes opening one token at the
	// same moment can fail (CKR_GENERAL_ERROR; systemd would restart).
	for _, r := range e.replicas {
		r.start()
		r.waitServing(30 * time.Second)
	}
	return e
}

func (r *replica) writeConfig() {
	e := r.env
	endpoints := e.etcd.Endpoints()
	if r.ns != nil {
		for i, ep := range endpoints {
			endpoints[i] = strings.Replace(ep, "127.0.0.1", e.netnsHost, 1)
		}
	}
	cfg := fmt.Sprintf(`socket: %s
state_dir: %s
backend: pkcs11
pkcs11:
  module: %s
  token_label: %s
  pin_file: %s
tenants:
  - name: dev
    identities: {uids: [%d]}
    roles: [signer, admin]
rotation:
  check_interval: 1s
limits:
  call_timeout: 10s
log:
  level: debug
  format: text
store:
  backend: etcd
  endpoints: [%s]
  prefix: %s
  replica: %s
  dial_timeout: 2s
  request_timeout: 4s
  lease_ttl: %s
  max_staleness: %s
`, r.sock, filepath.Join(r.dir, "state"), p11kittest.ClientModule, e.hsm.Token.Label, e.hsm.Token.PINFile,
		os.Getuid(), strings.Join(endpoints, ", "), e.prefix, r.id, leaseTTL, maxStaleness)
	r.cfg = filepath.Join(r.dir, "keybroker.yaml")
	if err := os.WriteFile(r.cfg, []byte(cfg), 0o600); err != nil {
		e.t.Fatal(err)
	}
}

func (r *replica) start() {
	t := r.env.t
	t.Helper()
	args := []string{filepath.Join(binDir, "keybrokerd"), "--config", r.cfg}
	if r.ns != nil {
		args = append(r.ns.enter(), args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), r.env_...)
	r.out = new(strings.Builder)
	cmd.Stdout, cmd.Stderr = r.out, r.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", r.id, err)
	}
	r.cmd, r.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(r.done) }()
	t.Cleanup(r.kill)
	if r.cl == nil {
		cl, err := client.Dial(r.sock, client.WithTimeout(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		r.cl = cl
		t.Cleanup(func() { cl.Close() })
	}
}

// kill sends SIGKILL and waits for the process to end.
func (r *replica) kill() {
	if r.cmd == nil {
		return
	}
	r.cmd.Process.Signal(syscall.SIGCONT)
	r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

func (r *replica) signal(sig syscall.Signal) { r.cmd.Process.Signal(sig) }

// exited reports whether the process has ended.
func (r *replica) exited() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

func (r *replica) api() kbv1.KeyBrokerClient { return r.cl.API() }

func ctxFor(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

func (r *replica) health() healthpb.HealthCheckResponse_ServingStatus {
	ctx, cancel := ctxFor(time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(r.cl.Conn()).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN
	}
	return resp.GetStatus()
}

func (r *replica) waitServing(within time.Duration) {
	t := r.env.t
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if r.health() == healthpb.HealthCheckResponse_SERVING {
			return
		}
		if r.exited() {
			t.Fatalf("%s exited:\n%s", r.id, r.out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s not SERVING within %v:\n%s", r.id, within, r.out)
}

// status is the replica's cluster status, or nil if it does not answer.
func (r *replica) status() *kbv1.GetClusterStatusResponse {
	ctx, cancel := ctxFor(3 * time.Second)
	defer cancel()
	st, err := r.api().GetClusterStatus(ctx, &kbv1.GetClusterStatusRequest{})
	if err != nil {
		return nil
	}
	return st
}

// leader waits until the live replicas agree on a leader among them
// (excluding those in skip), and returns it.
func (e *env) leader(within time.Duration, skip ...*replica) *replica {
	e.t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		var leader string
		agree := true
		for _, r := range e.replicas {
			if r.cmd == nil || contains(skip, r) {
				continue
			}
			st := r.status()
			if st == nil || st.GetLeader() == "" || leader != "" && st.GetLeader() != leader {
				agree = false
				break
			}
			leader = st.GetLeader()
		}
		if agree && leader != "" {
			for _, r := range e.replicas {
				if r.id == leader && r.cmd != nil && !contains(skip, r) {
					return r
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.t.Fatalf("no leader agreed on within %v", within)
	return nil
}

func contains(rs []*replica, r *replica) bool {
	for _, x := range rs {
		if x == r {
			return true
		}
	}
	return false
}

func (e *env) createKey(r *replica, name string, policy *kbv1.RotationPolicy) *kbv1.Key {
	e.t.Helper()
	ctx, cancel := ctxFor(10 * time.Second)
	defer cancel()
	resp, err := r.api().CreateKey(ctx, &kbv1.CreateKeyRequest{Name: name, Algorithm: kbv1.Algorithm_ALGORITHM_ES256, Policy: policy})
	if err != nil {
		e.t.Fatalf("CreateKey %s on %s: %v", name, r.id, err)
	}
	return resp.GetKey()
}

// sign signs a fresh digest on r (with kid, when not "") and verifies the
// signature with the version's public key as r serves it.
func (r *replica) sign(name, kid string) (string, error) {
	digest := sha256.Sum256([]byte(fmt.Sprintf("%s %s %d", r.id, kid, time.Now().UnixNano())))
	ctx, cancel := ctxFor(3 * time.Second)
	defer cancel()
	resp, err := r.api().Sign(ctx, &kbv1.SignRequest{Name: name, Kid: kid, Digest: digest[:], Hash: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA256})
	if err != nil {
		return "", err
	}
	pk, err := r.api().GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: name, Kid: resp.GetKid()})
	if err != nil {
		return "", err
	}
	pub, err := x509.ParsePKIXPublicKey(pk.GetDer())
	if err != nil {
		return "", err
	}
	if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), digest[:], resp.GetSignature()) {
		return "", fmt.Errorf("%s: signature by %s does not verify", r.id, resp.GetKid())
	}
	return resp.GetKid(), nil
}

// eventually retries f every 20 ms until it returns nil or within passes;
// it returns how long that took, and f's last error.
func eventually(within time.Duration, f func() error) (time.Duration, error) {
	start := time.Now()
	for {
		err := f()
		if err == nil || time.Since(start) > within {
			return time.Since(start), err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func code(err error) codes.Code { return status.Code(err) }

// store opens the cluster's etcd store directly, for the test's own reads.
func (e *env) store() *etcd.Store {
	e.t.Helper()
	s, err := etcd.Open(etcd.Config{Endpoints: e.etcd.Endpoints(), Prefix: e.prefix, DialTimeout: 2 * time.Second, RequestTimeout: 5 * time.Second})
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

// records reads the records from etcd directly.
func (e *env) records() []store.Key {
	e.t.Helper()
	s := e.store()
	defer s.Close()
	keys, err := s.Keys(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	return keys
}

// intents reads the intents from etcd directly.
func (e *env) intents() []store.Intent {
	e.t.Helper()
	s := e.store()
	defer s.Close()
	in, err := s.Intents(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	return in
}

// objects lists the key objects on the HSM, through p11-kit like the
// replicas.
func (e *env) objects() []kms.Object {
	e.t.Helper()
	e.t.Setenv("P11_KIT_SERVER_ADDRESS", e.hsm.Address())
	b, err := hsm.Open(hsm.Config{ModulePath: p11kittest.ClientModule, TokenLabel: e.hsm.Token.Label, PIN: e.hsm.Token.PIN, MaxSessions: 2, PoolWaitTimeout: time.Second}, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer b.Close()
	objs, err := b.List(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	return objs
}

// checkConsistent checks the invariants after any crash: every key has
// exactly one ACTIVE version; every version that is not destroyed has its
// object and is in the JWKS of every live replica if published; no object
// without a record.
func (e *env) checkConsistent() {
	e.t.Helper()
	recs := e.records()
	want := map[string]string{} // handle → tenant/name vN
	for _, k := range recs {
		active := 0
		for _, v := range k.Versions {
			if v.State == kms.StateActive {
				active++
			}
			if v.State != kms.StateDestroyed {
				want[string(v.Handle)] = fmt.Sprintf("%s/%s v%d", k.Tenant, k.Name, v.Version)
			}
			if !v.State.Published() {
				continue
			}
			for _, r := range e.replicas {
				if r.cmd == nil {
					continue
				}
				if _, err := eventually(2*time.Second, func() error {
					ctx, cancel := ctxFor(2 * time.Second)
					defer cancel()
					j, err := r.api().GetJWKS(ctx, &kbv1.GetJWKSRequest{})
					if err != nil {
						return err
					}
					if !strings.Contains(j.GetJwks(), `"kid":"`+v.Kid+`"`) {
						return fmt.Errorf("%s: %s/%s v%d (%s) missing from the JWKS", r.id, k.Tenant, k.Name, v.Version, v.Kid)
					}
					return nil
				}); err != nil {
					e.t.Error(err)
				}
			}
		}
		if active != 1 {
			e.t.Errorf("%s/%s has %d ACTIVE versions, want 1", k.Tenant, k.Name, active)
		}
	}
	got := map[string]bool{}
	for _, o := range e.objects() {
		got[string(o.Handle)] = true
		if _, ok := want[string(o.Handle)]; !ok {
			e.t.Errorf("HSM object %x has no record", o.Handle)
		}
	}
	for h, which := range want {
		if !got[h] {
			e.t.Errorf("%s is recorded but its HSM object is missing", which)
		}
	}
}
