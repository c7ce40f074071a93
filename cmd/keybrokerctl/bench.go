package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/tpm"
)

const benchLong = `Measure keybrokerd: --concurrency clients call Sign with key NAME (or,
with --rpc jwks, GetJWKS) as fast as they can for --duration, or until
--count calls are done, and print the throughput, the p50/p95/p99 latency
and the errors. The clients share one connection, as an application's
goroutines share one gRPC client; --conns N spreads them over N.

--stream signs over SignStream: each client's Sign is a message of one
stream per connection, shared by the clients (the SDK's
client.WithSignStream), instead of a unary call.

--rpc health calls the gRPC health service's Check instead: no caller
authorization, no audit record, no hardware. It measures the floor that
gRPC itself sets on this machine, for comparison with the other calls.

--baseline first measures the hardware itself, in this process, at the
same concurrency: the same backend package the daemon uses (hsm or tpm)
generates a throwaway key of NAME's algorithm, signs with it, and destroys
it. The ratio daemon / in-process says how much of the hardware's speed
the daemon delivers.

  --backend pkcs11 (the default): --pkcs11-module, --token-label and
  --pin-file name the daemon's token (--softhsm2-conf for SoftHSM2);
  both processes use it at once.
  --backend tpm: --tpm-socket names a swtpm the daemon is NOT connected
  to: a TPM serves one connection at a time, so give a second swtpm (or
  stop the daemon). --tpm-state-dir defaults to a temporary directory.

The per-call deadline is --timeout. Errors are counted, not fatal; the
command fails only when no call succeeded. With --output json it prints
{"daemon":{...},"baseline":{...},"ratio":R}.`

// benchFlags are the flags of "bench".
type benchFlags struct {
	rpc         string
	concurrency int
	conns       int
	duration    time.Duration
	count       int64
	format      string
	baseline    bool
	backend     string // "pkcs11" or "tpm"
	stream      bool

	module, tokenLabel, pinFile, softhsm2Conf string
	maxSessions                               int
	tpmSocket, tpmStateDir                    string
}

// benchResult is one measurement.
type benchResult struct {
	Target      string  `json:"target"` // "daemon" or "in-process"
	RPC         string  `json:"rpc"`    // "Sign", "SignStream", "GetJWKS" or "health.Check"
	Backend     string  `json:"backend,omitempty"`
	Algorithm   string  `json:"algorithm,omitempty"`
	Concurrency int     `json:"concurrency"`
	Ops         int64   `json:"ops"`
	Errors      int64   `json:"errors"`
	Seconds     float64 `json:"seconds"`
	OpsPerSec   float64 `json:"ops_per_sec"`
	P50MS       float64 `json:"p50_ms"`
	P95MS       float64 `json:"p95_ms"`
	P99MS       float64 `json:"p99_ms"`
	FirstError  string  `json:"first_error,omitempty"`

	firstErr error
}

// benchOutput is what "bench --output json" prints.
type benchOutput struct {
	Daemon   benchResult  `json:"daemon"`
	Baseline *benchResult `json:"baseline,omitempty"`
	Ratio    float64      `json:"ratio,omitempty"` // daemon / in-process ops per second
}

func newBenchCmd(a *app) *cobra.Command {
	var f benchFlags
	cmd := &cobra.Command{
		Use:   "bench [NAME]",
		Short: "Measure Sign or GetJWKS throughput and latency, optionally against the hardware itself",
		Long:  benchLong,
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := ""
			if len(args) == 1 {
				name = args[0]
			}
			if err := f.check(name); err != nil {
				return err
			}
			return a.bench(cmd.Context(), f, name)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&f.rpc, "rpc", "sign", "`call` to measure: sign|jwks|health")
	fs.IntVarP(&f.concurrency, "concurrency", "c", 1, "concurrent `clients`")
	fs.IntVar(&f.conns, "conns", 1, "gRPC `connections` the clients share")
	fs.DurationVarP(&f.duration, "duration", "d", 5*time.Second, "how long to measure")
	fs.Int64VarP(&f.count, "count", "n", 0, "measure this many calls instead of a --duration")
	fs.StringVar(&f.format, "format", "der", "ECDSA signature `encoding` asked of the daemon: "+signatureFormats.String())
	fs.BoolVar(&f.stream, "stream", false, "sign over one SignStream per connection instead of unary calls")
	fs.BoolVar(&f.baseline, "baseline", false, "first measure the --backend in-process, and print the ratio")
	fs.StringVar(&f.backend, "backend", "pkcs11", "baseline: the daemon's key `backend`: pkcs11|tpm")
	fs.StringVar(&f.module, "pkcs11-module", "/usr/lib/softhsm/libsofthsm2.so", "baseline: PKCS#11 library `path`")
	fs.StringVar(&f.tokenLabel, "token-label", "keybroker", "baseline: PKCS#11 token `label`")
	fs.StringVar(&f.pinFile, "pin-file", "", "baseline: `file` holding the token's user PIN")
	fs.StringVar(&f.softhsm2Conf, "softhsm2-conf", "", "baseline: SOFTHSM2_CONF `file` (SoftHSM2 only)")
	fs.IntVar(&f.maxSessions, "max-sessions", 16, "baseline: PKCS#11 session pool `size`, as the daemon's pkcs11.max_sessions")
	fs.StringVar(&f.tpmSocket, "tpm-socket", "", "baseline: unix socket `path` of a swtpm the daemon is not using")
	fs.StringVar(&f.tpmStateDir, "tpm-state-dir", "", "baseline: TPM state `directory` (default: a temporary one)")
	return cmd
}

func (f *benchFlags) check(name string) error {
	switch f.rpc {
	case "sign":
		if name == "" {
			return usageErrorf("bench --rpc sign: the key NAME is required")
		}
	case "jwks", "health":
		if name != "" {
			return usageErrorf("bench --rpc %s takes no NAME", f.rpc)
		}
		if f.baseline {
			return usageErrorf("--baseline: only for --rpc sign (%s makes no hardware call)", f.rpc)
		}
		if f.stream {
			return usageErrorf("--stream: only for --rpc sign")
		}
	default:
		return usageErrorf("--rpc: got %q, want sign, jwks or health", f.rpc)
	}
	if f.concurrency < 1 {
		return usageErrorf("--concurrency: got %d, want at least 1", f.concurrency)
	}
	if f.conns < 1 {
		return usageErrorf("--conns: got %d, want at least 1", f.conns)
	}
	f.conns = min(f.conns, f.concurrency)
	if f.count < 0 {
		return usageErrorf("--count: got %d, want at least 1", f.count)
	}
	if f.count == 0 && f.duration <= 0 {
		return usageErrorf("--duration: got %s, want more than 0", f.duration)
	}
	if _, err := signatureFormats.parse("format", f.format); err != nil {
		return err
	}
	switch f.backend {
	case "pkcs11":
		if f.baseline && f.pinFile == "" {
			return usageErrorf("--baseline: --pin-file is required")
		}
		if f.maxSessions < 2 {
			return usageErrorf("--max-sessions: got %d, want at least 2", f.maxSessions)
		}
	case "tpm":
		if f.baseline && f.tpmSocket == "" {
			return usageErrorf("--baseline --backend tpm: --tpm-socket is required (a swtpm the daemon is not connected to)")
		}
	default:
		return usageErrorf("--backend: got %q, want pkcs11 or tpm", f.backend)
	}
	return nil
}

// bench runs the measurements and prints them.
func (a *app) bench(ctx context.Context, f benchFlags, name string) error {
	var opts []client.Option
	if f.stream {
		opts = append(opts, client.WithSignStream())
	}
	conns, err := a.dialN(f.conns, opts...)
	if err != nil {
		return err
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	out := benchOutput{}
	var newOp func(worker int) func(context.Context) error
	switch f.rpc {
	case "jwks":
		out.Daemon = benchResult{RPC: "GetJWKS"}
		newOp = func(w int) func(context.Context) error {
			c := kbv1.NewKeyBrokerClient(conns[w%len(conns)].Conn())
			return func(ctx context.Context) error {
				_, err := c.GetJWKS(ctx, &kbv1.GetJWKSRequest{})
				return err
			}
		}
	case "health":
		out.Daemon = benchResult{RPC: "health.Check"}
		newOp = func(w int) func(context.Context) error {
			c := healthpb.NewHealthClient(conns[w%len(conns)].Conn())
			return func(ctx context.Context) error {
				_, err := c.Check(ctx, &healthpb.HealthCheckRequest{})
				return err
			}
		}
	case "sign":
		key, err := a.benchKey(ctx, conns[0].Conn(), name)
		if err != nil {
			return err
		}
		alg, err := kms.ParseAlgorithm(algName(key.GetAlgorithm()))
		if err != nil {
			return fmt.Errorf("key %q: %w", name, err)
		}
		bits := int(key.GetBits())
		digest := make([]byte, alg.Hash().Size())
		rand.Read(digest)
		format, _ := signatureFormats.parse("format", f.format)
		if f.baseline {
			b, err := a.benchInProcess(ctx, f, alg, bits, digest)
			if err != nil {
				return fmt.Errorf("baseline: %w", err)
			}
			out.Baseline = &b
		}
		out.Daemon = benchResult{RPC: "Sign", Algorithm: alg.String()}
		if f.stream {
			out.Daemon.RPC = "SignStream"
		}
		req := &kbv1.SignRequest{Name: name, Digest: digest, Format: format}
		newOp = func(w int) func(context.Context) error {
			c := conns[w%len(conns)]
			return func(ctx context.Context) error {
				_, err := c.Sign(ctx, req)
				return err
			}
		}
	}
	r := runLoad(ctx, f.concurrency, f.duration, f.count, a.timeout, newOp)
	r.Target, r.RPC, r.Algorithm = "daemon", out.Daemon.RPC, out.Daemon.Algorithm
	out.Daemon = r
	if out.Baseline != nil && out.Baseline.OpsPerSec > 0 {
		out.Ratio = round(r.OpsPerSec/out.Baseline.OpsPerSec, 3)
	}
	if err := a.printBench(out); err != nil {
		return err
	}
	if r.Ops == 0 && r.Errors > 0 {
		// Exit as the first failure's code says (4 for UNAVAILABLE, ...).
		return status.Errorf(status.Code(r.firstErr), "every call failed; the first: %s", r.FirstError)
	}
	return nil
}

// dialN opens n connections to the daemon's socket (client.Dial). The
// socket is checked first: grpc connects lazily, and a stopped daemon is
// then a plain message rather than a transport error.
func (a *app) dialN(n int, opts ...client.Option) ([]*client.Client, error) {
	if _, err := os.Stat(a.socket); errors.Is(err, fs.ErrNotExist) {
		return nil, status.Errorf(codes.Unavailable, "socket %s does not exist (is keybrokerd running?)", a.socket)
	} else if err != nil {
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	conns := make([]*client.Client, 0, n)
	for range n {
		c, err := client.Dial("unix:"+a.socket, opts...)
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return nil, status.Errorf(codes.Unavailable, "socket %s: %v", a.socket, err)
		}
		conns = append(conns, c)
	}
	return conns, nil
}

// benchKey returns the key's metadata: its algorithm chooses the digest
// and the baseline's key, and a missing key fails before any measurement.
func (a *app) benchKey(ctx context.Context, conn *grpc.ClientConn, name string) (*kbv1.Key, error) {
	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	resp, err := kbv1.NewKeyBrokerClient(conn).GetKey(ctx, &kbv1.GetKeyRequest{Name: name})
	if err != nil {
		return nil, err
	}
	return resp.GetKey(), nil
}

// benchInProcess measures Sign on the backend itself with a throwaway key
// of alg, destroyed afterwards.
func (a *app) benchInProcess(ctx context.Context, f benchFlags, alg kms.Algorithm, bits int, digest []byte) (benchResult, error) {
	var backend kms.Backend
	switch f.backend {
	case "pkcs11":
		if f.softhsm2Conf != "" {
			// Read by libsofthsm2 in C_Initialize.
			if err := os.Setenv("SOFTHSM2_CONF", f.softhsm2Conf); err != nil {
				return benchResult{}, err
			}
		}
		pin, err := readPINFile(f.pinFile)
		if err != nil {
			return benchResult{}, err
		}
		b, err := hsm.Open(hsm.Config{ModulePath: f.module, TokenLabel: f.tokenLabel, PIN: pin,
			MaxSessions: f.maxSessions, PoolWaitTimeout: a.timeout}, nil)
		if err != nil {
			return benchResult{}, err
		}
		backend = b
	case "tpm":
		dir := f.tpmStateDir
		if dir == "" {
			tmp, err := os.MkdirTemp("", "kbbench")
			if err != nil {
				return benchResult{}, err
			}
			defer os.RemoveAll(tmp)
			dir = tmp
		}
		b, err := tpm.Open(ctx, tpm.Config{Socket: f.tpmSocket, StateDir: dir}, nil)
		if err != nil {
			return benchResult{}, err
		}
		backend = b
	}
	defer backend.Close()
	if alg.IsRSA() && bits == 0 {
		bits = 2048
	}
	if alg.IsEC() {
		bits = 0
	}
	p := kms.Partition{Tenant: "bench"}
	genCtx, cancel := context.WithTimeout(ctx, max(a.timeout, 2*time.Minute))
	h, _, err := backend.Generate(genCtx, p, kms.KeySpec{Alg: alg, Bits: bits, Label: "bench-baseline"})
	cancel()
	if err != nil {
		return benchResult{}, fmt.Errorf("generate a %s key: %w", alg, err)
	}
	defer func() {
		if err := backend.Destroy(context.WithoutCancel(ctx), p, h); err != nil {
			fmt.Fprintf(os.Stderr, "keybrokerctl: bench: destroying the baseline key: %v\n", err)
		}
	}()
	opts, err := kms.SignerOpts(alg, 0, kms.PaddingDefault, digest)
	if err != nil {
		return benchResult{}, err
	}
	r := runLoad(ctx, f.concurrency, f.duration, f.count, a.timeout, func(int) func(context.Context) error {
		return func(ctx context.Context) error {
			_, err := backend.Sign(ctx, p, h, digest, opts)
			return err
		}
	})
	r.Target, r.RPC, r.Backend, r.Algorithm = "in-process", "Sign", f.backend, alg.String()
	return r, nil
}

// readPINFile reads a PIN file; one trailing newline is not part of it.
func readPINFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("pin file: %w", err)
	}
	s := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	if s == "" {
		return "", fmt.Errorf("pin file %s is empty", path)
	}
	return s, nil
}

// runLoad runs concurrency workers, each calling its op in a loop, for d
// or until count calls are done (count > 0), each call bounded by
// perCall. One call per worker warms up first (connections, caches) and
// is not counted.
func runLoad(ctx context.Context, concurrency int, d time.Duration, count int64, perCall time.Duration,
	newOp func(worker int) func(context.Context) error) benchResult {
	ops := make([]func(context.Context) error, concurrency)
	for w := range ops {
		ops[w] = newOp(w)
		cctx, cancel := context.WithTimeout(ctx, perCall)
		_ = ops[w](cctx)
		cancel()
	}
	var (
		tickets  atomic.Int64
		stop     atomic.Bool
		mu       sync.Mutex
		errs     int64
		firstErr error
		wg       sync.WaitGroup
	)
	lat := make([][]time.Duration, concurrency)
	start := time.Now()
	if count == 0 {
		timer := time.AfterFunc(d, func() { stop.Store(true) })
		defer timer.Stop()
	}
	for w := range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mine := make([]time.Duration, 0, 4096)
			for !stop.Load() && ctx.Err() == nil {
				if count > 0 && tickets.Add(1) > count {
					break
				}
				t0 := time.Now()
				cctx, cancel := context.WithTimeout(ctx, perCall)
				err := ops[w](cctx)
				cancel()
				if err != nil {
					mu.Lock()
					errs++
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			lat[w] = mine
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	all := slices.Concat(lat...)
	slices.Sort(all)
	r := benchResult{
		Concurrency: concurrency,
		Ops:         int64(len(all)),
		Errors:      errs,
		Seconds:     round(elapsed.Seconds(), 3),
		OpsPerSec:   round(float64(len(all))/elapsed.Seconds(), 1),
		P50MS:       percentileMS(all, 0.50),
		P95MS:       percentileMS(all, 0.95),
		P99MS:       percentileMS(all, 0.99),
	}
	if firstErr != nil {
		r.FirstError, r.firstErr = errorMessage(firstErr), firstErr
	}
	return r
}

// percentileMS is the q-quantile of the sorted latencies (nearest rank),
// in milliseconds.
func percentileMS(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	i = min(max(i, 0), len(sorted)-1)
	return round(float64(sorted[i].Microseconds())/1000, 3)
}

func round(x float64, places int) float64 {
	p := math.Pow10(places)
	return math.Round(x*p) / p
}

func (a *app) printBench(out benchOutput) error {
	if a.jsonOutput() {
		return json.NewEncoder(a.stdout).Encode(out)
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "target\tcall\talg\tclients\tops/s\tp50 ms\tp95 ms\tp99 ms\tops\terrors")
	rows := []benchResult{out.Daemon}
	if out.Baseline != nil {
		rows = []benchResult{*out.Baseline, out.Daemon}
	}
	for _, r := range rows {
		target := r.Target
		if r.Backend != "" {
			target += " (" + r.Backend + ")"
		}
		alg := r.Algorithm
		if alg == "" {
			alg = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%.0f\t%.3f\t%.3f\t%.3f\t%d\t%d\n",
			target, r.RPC, alg, r.Concurrency, r.OpsPerSec, r.P50MS, r.P95MS, r.P99MS, r.Ops, r.Errors)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if out.Baseline != nil {
		fmt.Fprintf(a.stdout, "ratio daemon/in-process: %.2f\n", out.Ratio)
	}
	for _, r := range rows {
		if r.FirstError != "" {
			fmt.Fprintf(a.stdout, "first error (%s): %s\n", r.Target, r.FirstError)
		}
	}
	return nil
}
