package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/kms/kmstest"
	"github.com/keybroker/keybroker/tpm/swtpmtest"
)

// open opens a backend on sim with stateDir and closes it when the test
// ends (before swtpmtest checks for leaked handles).
func open(t testing.TB, sim *swtpmtest.Sim, stateDir string, mod func(*Config)) *Backend {
	t.Helper()
	cfg := Config{Socket: sim.Socket, StateDir: stateDir, Timeout: 10 * time.Second}
	if mod != nil {
		mod(&cfg)
	}
	b, err := Open(context.Background(), cfg, testLogger(t))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return b
}

// start runs a fresh swtpm and opens a backend on it.
func start(t testing.TB) (*Backend, *swtpmtest.Sim) {
	t.Helper()
	sim := swtpmtest.Start(t)
	return open(t, sim, t.TempDir(), nil), sim
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func digest(t testing.TB, h crypto.Hash) []byte {
	t.Helper()
	d := make([]byte, h.Size())
	if _, err := rand.Read(d); err != nil {
		t.Fatal(err)
	}
	return d
}

// withTPM runs fn holding the backend's connection, for tests that send
// their own commands (swtpm serves one connection at a time).
func withTPM(t testing.TB, b *Backend, fn func(l *link)) {
	t.Helper()
	l, unlock, err := b.begin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	fn(l)
}

var (
	tenantA = kms.Partition{Tenant: "tenant-a"}
	tenantB = kms.Partition{Tenant: "tenant-b"}
	es256   = kms.KeySpec{Alg: kms.ES256}
)

func TestConformance(t *testing.T) {
	kmstest.Suite{
		New: func(t testing.TB) kms.Backend {
			sim := swtpmtest.Start(t)
			cfg := Config{Socket: sim.Socket, StateDir: t.TempDir(), Timeout: 10 * time.Second}
			b, err := Open(context.Background(), cfg, testLogger(t))
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			return b // the suite closes it
		},
		Specs: []kms.KeySpec{
			{Alg: kms.ES256}, {Alg: kms.ES384},
			{Alg: kms.RS256, Bits: 2048}, {Alg: kms.RS256, Bits: 3072},
			{Alg: kms.PS256, Bits: 2048}, {Alg: kms.PS256, Bits: 3072},
		},
	}.Run(t)
}

// wantAttributes is TPMA_OBJECT fixedTPM (bit 1) | fixedParent (4) |
// sensitiveDataOrigin (5) | userWithAuth (6) | noDA (10) | sign (18), TCG
// TPM 2.0 Part 2 §8.3.2, written out rather than taken from the code under
// test.
const wantAttributes = 0x00040472

// TestKeyAttributes reads each generated key back from the TPM
// (TPM2_ReadPublic) and checks its whole TPMA_OBJECT, and that the TPM
// refuses to duplicate it.
func TestKeyAttributes(t *testing.T) {
	b, _ := start(t)
	ctx := context.Background()
	for _, spec := range []kms.KeySpec{es256, {Alg: kms.ES384}, {Alg: kms.RS256, Bits: 2048}, {Alg: kms.PS256, Bits: 2048}} {
		t.Run(kmstest.Name(spec), func(t *testing.T) {
			h, _, err := b.Generate(ctx, tenantA, spec)
			if err != nil {
				t.Fatal(err)
			}
			k, err := decodeHandle(h)
			if err != nil {
				t.Fatal(err)
			}
			withTPM(t, b, func(l *link) {
				o, err := b.loadKey(l, tenantA.Tenant, k, nil)
				if err != nil {
					t.Fatal(err)
				}
				rp, err := tpm2.ReadPublic{ObjectHandle: o.handle}.Execute(l)
				if err != nil {
					t.Fatalf("TPM2_ReadPublic: %v", err)
				}
				pub, err := rp.OutPublic.Contents()
				if err != nil {
					t.Fatal(err)
				}
				if got := attrBits(pub.ObjectAttributes); got != wantAttributes {
					t.Errorf("TPMA_OBJECT: got 0x%08x, want 0x%08x", got, wantAttributes)
				}
				if !bytes.Equal(rp.OutPublic.Bytes(), k.public) {
					t.Error("the loaded public area differs from the handle's")
				}
				if !bytes.Equal(rp.Name.Buffer, o.name.Buffer) {
					t.Errorf("Name: TPM says %x, backend computed %x", rp.Name.Buffer, o.name.Buffer)
				}

				// TPM2_Duplicate needs the DUP role, which only a policy
				// session can give; even with PolicyCommandCode(Duplicate)
				// the TPM must refuse a fixedParent key.
				sess, closeSess, err := tpm2.PolicySession(l, tpm2.TPMAlgSHA256, 16)
				if err != nil {
					t.Fatal(err)
				}
				defer closeSess()
				if _, err := (tpm2.PolicyCommandCode{PolicySession: sess.Handle(), Code: tpm2.TPMCCDuplicate}).Execute(l); err != nil {
					t.Fatal(err)
				}
				_, err = tpm2.Duplicate{
					ObjectHandle:    tpm2.AuthHandle{Handle: o.handle, Name: o.name, Auth: sess},
					NewParentHandle: tpm2.TPMRHNull,
					Symmetric:       tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
				}.Execute(l)
				if err == nil {
					t.Fatal("TPM2_Duplicate succeeded")
				}
				if !isRC(err, tpm2.TPMRCAttributes, tpm2.TPMRCPolicyFail) {
					t.Errorf("TPM2_Duplicate: got %v, want TPM_RC_ATTRIBUTES or TPM_RC_POLICY_FAIL", err)
				}
				t.Logf("TPM2_Duplicate refused: %v", err)
			})
		})
	}
}

// TestTenantIsolation: a key blob of tenant A does not load under tenant
// B's parent, and is answered like a key that does not exist.
func TestTenantIsolation(t *testing.T) {
	b, _ := start(t)
	ctx := context.Background()
	h, pub, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Generate(ctx, tenantB, es256); err != nil {
		t.Fatal(err)
	}
	d := digest(t, crypto.SHA256)
	sig, err := b.Sign(ctx, tenantB, h, d, crypto.SHA256)
	if err == nil {
		t.Fatalf("tenant B signed with tenant A's key (signature %x)", sig)
	}
	if !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Sign as tenant B: got %v, want ErrNotFound", err)
	}
	if err := b.Destroy(ctx, tenantB, h); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Destroy as tenant B: got %v, want ErrNotFound", err)
	}
	if _, err := b.Attest(ctx, tenantB, h, []byte("nonce")); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Attest as tenant B: got %v, want ErrNotFound", err)
	}
	// Tenant A's key is untouched, also while it is loaded: a cache hit
	// must not cross tenants either.
	for range 2 {
		sig, err = b.Sign(ctx, tenantA, h, d, crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		if err := kmstest.Verify(pub, d, sig, crypto.SHA256); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Sign(ctx, tenantB, h, d, crypto.SHA256); !errors.Is(err, kms.ErrNotFound) {
			t.Errorf("Sign as tenant B with A's key loaded: got %v, want ErrNotFound", err)
		}
	}
	for _, name := range []string{"tenant-a.json", "tenant-b.json"} {
		fi, err := os.Stat(filepath.Join(b.cfg.StateDir, parentsDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", name, fi.Mode().Perm())
		}
	}
	if _, _, err := b.Generate(ctx, kms.Partition{Tenant: "../evil"}, es256); !errors.Is(err, kms.ErrInvalidArgument) {
		t.Errorf("Generate for tenant ../evil: got %v, want ErrInvalidArgument", err)
	}
}

// TestRoundRobin signs with 8 keys from 16 goroutines: far more keys than
// the TPM's 3 transient slots, so nearly every call flushes and reloads.
func TestRoundRobin(t *testing.T) {
	b, _ := start(t)
	ctx := context.Background()
	type k struct {
		h    kms.Handle
		pub  crypto.PublicKey
		hash crypto.Hash
	}
	var keys []k
	for i := range 8 {
		spec := es256
		switch i % 4 {
		case 1:
			spec = kms.KeySpec{Alg: kms.ES384}
		case 3:
			if i == 3 {
				spec = kms.KeySpec{Alg: kms.RS256, Bits: 2048}
			}
		}
		h, pub, err := b.Generate(ctx, tenantA, spec)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k{h, pub, spec.Alg.Hash()})
	}
	const goroutines, rounds = 16, 6
	var wg sync.WaitGroup
	var failures atomic.Int32
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				key := keys[(g+r)%len(keys)]
				d := digest(t, key.hash)
				sig, err := b.Sign(ctx, tenantA, key.h, d, key.hash)
				if err == nil {
					err = kmstest.Verify(key.pub, d, sig, key.hash)
				}
				if err != nil {
					failures.Add(1)
					t.Errorf("goroutine %d round %d: %v", g, r, err)
				}
			}
		}()
	}
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Fatalf("%d of %d signatures failed", n, goroutines*rounds)
	}
	withTPM(t, b, func(l *link) {
		if n := b.lru.Len(); n > b.cfg.LoadedObjects {
			t.Errorf("%d objects cached, want at most %d", n, b.cfg.LoadedObjects)
		}
	})
}

// TestObjectMemory: with the LRU larger than the TPM's slots, the TPM's
// TPM_RC_OBJECT_MEMORY is handled by flushing, never returned.
func TestObjectMemory(t *testing.T) {
	sim := swtpmtest.Start(t)
	b := open(t, sim, t.TempDir(), func(c *Config) { c.LoadedObjects = 10 })
	ctx := context.Background()
	var hs []kms.Handle
	var pubs []crypto.PublicKey
	for range 5 {
		h, pub, err := b.Generate(ctx, tenantA, es256)
		if err != nil {
			t.Fatal(err)
		}
		hs, pubs = append(hs, h), append(pubs, pub)
	}
	for r := range 3 {
		for i, h := range hs {
			d := digest(t, crypto.SHA256)
			sig, err := b.Sign(ctx, tenantA, h, d, crypto.SHA256)
			if err != nil {
				t.Fatalf("round %d key %d: %v", r, i, err)
			}
			if err := kmstest.Verify(pubs[i], d, sig, crypto.SHA256); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestRSA4096Refused(t *testing.T) {
	b, _ := start(t)
	for _, alg := range []kms.Algorithm{kms.RS256, kms.PS256} {
		_, _, err := b.Generate(context.Background(), tenantA, kms.KeySpec{Alg: alg, Bits: 4096})
		var fe *kms.FieldError
		if !errors.As(err, &fe) || fe.Field != "bits" || !errors.Is(err, kms.ErrInvalidArgument) {
			t.Fatalf("Generate %v-4096: got %v, want a FieldError on bits", alg, err)
		}
		if !strings.Contains(fe.Reason, "does not support RSA-4096") {
			t.Errorf("reason %q does not say the TPM lacks RSA-4096", fe.Reason)
		}
	}
}

// TestChecksBeforeHardware: with swtpm gone, malformed requests are still
// answered as such, so they never reached the TPM; a good one is
// unavailable.
func TestChecksBeforeHardware(t *testing.T) {
	b, sim := start(t)
	ctx := context.Background()
	h, _, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	sim.Kill()
	for _, c := range []struct {
		name   string
		digest []byte
		opts   crypto.SignerOpts
		field  string
	}{
		{"short digest", make([]byte, 31), crypto.SHA256, "digest"},
		{"SHA-384 length for SHA-256", make([]byte, 48), crypto.SHA256, "digest"},
		{"SHA-1", make([]byte, 20), crypto.SHA1, "hash"},
		{"PSS on EC", make([]byte, 32), &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}, "padding"},
	} {
		_, err := b.Sign(ctx, tenantA, h, c.digest, c.opts)
		var fe *kms.FieldError
		if !errors.As(err, &fe) || fe.Field != c.field {
			t.Errorf("%s: got %v, want a FieldError on %s", c.name, err, c.field)
		}
	}
	if _, err := b.Sign(ctx, tenantA, kms.Handle("garbage"), make([]byte, 32), crypto.SHA256); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Sign with a garbage handle: got %v, want ErrNotFound", err)
	}
	if _, err := b.Sign(ctx, tenantA, h, make([]byte, 32), crypto.SHA256); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Sign with swtpm killed: got %v, want ErrUnavailable", err)
	}
	if err := b.Probe(ctx); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Probe with swtpm killed: got %v, want ErrUnavailable", err)
	}
}

// TestHungTPM: a TPM that stops answering yields ErrUnavailable within the
// command timeout, and the backend recovers when it answers again.
func TestHungTPM(t *testing.T) {
	sim := swtpmtest.Start(t)
	const timeout = 500 * time.Millisecond
	b := open(t, sim, t.TempDir(), func(c *Config) { c.Timeout = timeout })
	ctx := context.Background()
	h, pub, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	sim.Pause(t)
	for range 2 {
		began := time.Now()
		_, err := b.Sign(ctx, tenantA, h, digest(t, crypto.SHA256), crypto.SHA256)
		took := time.Since(began)
		if !errors.Is(err, kms.ErrUnavailable) {
			t.Errorf("Sign on a hung TPM: got %v, want ErrUnavailable", err)
		}
		if took > timeout+500*time.Millisecond {
			t.Errorf("Sign on a hung TPM took %v, want about %v", took, timeout)
		}
	}
	sim.Resume(t)
	signWhenBack(t, b, tenantA, h, pub, func(error) bool { return true })
}

// TestWaitBehindCommand: a call that gives up waiting behind another
// call's command is told the TPM is busy (ErrResourceExhausted) while that
// command is young, and that it is hung (ErrUnavailable) once it has gone
// unanswered for stuckAfter: health must not flap during a slow command,
// and must see a frozen TPM.
func TestWaitBehindCommand(t *testing.T) {
	sim := swtpmtest.Start(t)
	b := open(t, sim, t.TempDir(), nil)
	h, _, err := b.Generate(context.Background(), tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	sim.Pause(t)
	holder := make(chan error, 1)
	go func() {
		_, err := b.Sign(context.Background(), tenantA, h, digest(t, crypto.SHA256), crypto.SHA256)
		holder <- err
	}()
	for b.inflight.Load() == nil {
		time.Sleep(time.Millisecond)
	}
	sent := b.inflight.Load().sent
	wait := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, err := b.Sign(ctx, tenantA, h, digest(t, crypto.SHA256), crypto.SHA256)
		return err
	}
	if err := wait(); !errors.Is(err, kms.ErrResourceExhausted) || errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("waiting behind a command sent %v ago: %v, want ErrResourceExhausted", time.Since(sent), err)
	}
	time.Sleep(stuckAfter - time.Since(sent) + 50*time.Millisecond)
	if err := wait(); !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("waiting behind a command sent %v ago: %v, want ErrUnavailable", time.Since(sent), err)
	}
	sim.Resume(t)
	if err := <-holder; err != nil {
		t.Errorf("the held Sign after the TPM came back: %v", err)
	}
}

// TestRestartRecovery kills swtpm under load and restarts it on the same
// state: signing resumes without reopening the backend, no call overruns
// its deadline, and outage errors say unavailable.
func TestRestartRecovery(t *testing.T) {
	sim := swtpmtest.Start(t)
	b := open(t, sim, t.TempDir(), func(c *Config) { c.Timeout = time.Second })
	ctx := context.Background()
	h, pub, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	const callDeadline = 2 * time.Second
	var (
		mu         sync.Mutex
		outageErrs int
		unexpected []error
		slowest    time.Duration
		restarted  bool      // set when swtpm runs again
		firstOK    time.Time // the first success after that
		stop       = make(chan struct{})
		wg         sync.WaitGroup
	)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				d := digest(t, crypto.SHA256)
				cctx, cancel := context.WithTimeout(ctx, callDeadline)
				began := time.Now()
				sig, err := b.Sign(cctx, tenantA, h, d, crypto.SHA256)
				took := time.Since(began)
				cancel()
				if err == nil {
					if verr := kmstest.Verify(pub, d, sig, crypto.SHA256); verr != nil {
						err = fmt.Errorf("bad signature: %w", verr)
					}
				}
				mu.Lock()
				slowest = max(slowest, took)
				switch {
				case err == nil:
					if restarted && firstOK.IsZero() {
						firstOK = time.Now()
					}
				case errors.Is(err, kms.ErrUnavailable):
					outageErrs++
				default:
					unexpected = append(unexpected, err)
				}
				mu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond)
				}
			}
		}()
	}
	// Two kill/restart cycles in make test, ten in make soak.
	cycles := 2
	if os.Getenv("KEYBROKER_SOAK") != "" {
		cycles = 10
	}
	for cycle := 1; cycle <= cycles; cycle++ {
		time.Sleep(300 * time.Millisecond)
		mu.Lock()
		restarted, firstOK = false, time.Time{}
		mu.Unlock()
		sim.Kill()
		time.Sleep(time.Second)
		sim.Restart(t)
		restartedAt := time.Now()
		mu.Lock()
		restarted = true
		mu.Unlock()
		for deadline := restartedAt.Add(5 * time.Second); time.Now().Before(deadline); {
			mu.Lock()
			ok := !firstOK.IsZero()
			mu.Unlock()
			if ok {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		mu.Lock()
		back := firstOK
		mu.Unlock()
		if back.IsZero() || back.Sub(restartedAt) > 5*time.Second {
			close(stop)
			wg.Wait()
			t.Fatalf("cycle %d: no signature within 5 s of the restart", cycle)
		}
		t.Logf("cycle %d: signing resumed %v after swtpm answered", cycle, back.Sub(restartedAt).Round(time.Millisecond))
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("%d outage errors; slowest call %v", outageErrs, slowest.Round(time.Millisecond))
	if outageErrs == 0 {
		t.Error("no call failed while swtpm was down")
	}
	for _, err := range unexpected {
		t.Errorf("error during the outage does not wrap ErrUnavailable: %v", err)
	}
	if slowest > callDeadline+500*time.Millisecond {
		t.Errorf("slowest call took %v, want at most %v", slowest, callDeadline+500*time.Millisecond)
	}
	if err := b.Probe(ctx); err != nil {
		t.Errorf("Probe after recovery: %v", err)
	}
}

// TestSRKPin: keys survive a reopen on the same TPM; on another TPM with
// the same state directory, everything fails with ErrDataLoss.
func TestSRKPin(t *testing.T) {
	stateDir := t.TempDir()
	ctx := context.Background()
	sim1 := swtpmtest.Start(t)
	b1 := open(t, sim1, stateDir, nil)
	h, pub, err := b1.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	if err := b1.Close(); err != nil {
		t.Fatal(err)
	}
	pin, err := os.ReadFile(filepath.Join(stateDir, pinFile))
	if err != nil {
		t.Fatal(err)
	}

	// The same TPM again: the key still signs.
	b2 := open(t, sim1, stateDir, nil)
	d := digest(t, crypto.SHA256)
	sig, err := b2.Sign(ctx, tenantA, h, d, crypto.SHA256)
	if err != nil {
		t.Fatalf("Sign after reopening on the same TPM: %v", err)
	}
	if err := kmstest.Verify(pub, d, sig, crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	if err := b2.Close(); err != nil {
		t.Fatal(err)
	}

	// Another TPM (fresh seeds) behind the same state directory.
	sim2 := swtpmtest.Start(t)
	var logs bytes.Buffer
	b3, err := Open(ctx, Config{Socket: sim2.Socket, StateDir: stateDir}, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatalf("Open on a replaced TPM: %v (want success, in the data loss state)", err)
	}
	t.Cleanup(func() { b3.Close() })
	if !strings.Contains(logs.String(), "cleared or replaced") {
		t.Errorf("no log line says the TPM was cleared or replaced; logs:\n%s", logs.String())
	}
	if _, err := b3.Sign(ctx, tenantA, h, d, crypto.SHA256); !errors.Is(err, ErrDataLoss) {
		t.Errorf("Sign of an old key: got %v, want ErrDataLoss", err)
	}
	if err := b3.Probe(ctx); !errors.Is(err, ErrDataLoss) {
		t.Errorf("Probe: got %v, want ErrDataLoss", err)
	}
	if _, _, err := b3.Generate(ctx, tenantA, es256); !errors.Is(err, ErrDataLoss) {
		t.Errorf("Generate: got %v, want ErrDataLoss", err)
	}
	if _, _, err := b3.Generate(ctx, kms.Partition{Tenant: "new-tenant"}, es256); !errors.Is(err, ErrDataLoss) {
		t.Errorf("Generate for a new tenant: got %v, want ErrDataLoss", err)
	}
	if err := b3.Destroy(ctx, tenantA, h); !errors.Is(err, ErrDataLoss) {
		t.Errorf("Destroy: got %v, want ErrDataLoss", err)
	}
	if _, err := b3.Attest(ctx, tenantA, h, nil); !errors.Is(err, ErrDataLoss) {
		t.Errorf("Attest: got %v, want ErrDataLoss", err)
	}
	after, err := os.ReadFile(filepath.Join(stateDir, pinFile))
	if err != nil || !bytes.Equal(after, pin) {
		t.Errorf("the pin changed: %q (%v), was %q", after, err, pin)
	}
	if _, err := os.Stat(filepath.Join(stateDir, parentsDir, "new-tenant.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a parent was created in the data loss state: %v", err)
	}
	if err := b3.Close(); err != nil {
		t.Fatal(err)
	}
	// The first TPM is still the pinned one.
	b4 := open(t, sim1, stateDir, nil)
	if err := b4.Probe(ctx); err != nil {
		t.Errorf("Probe on the pinned TPM: %v", err)
	}
}

func TestAttestation(t *testing.T) {
	b, _ := start(t)
	ctx := context.Background()
	h, _, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	other, _, err := b.Generate(ctx, tenantA, kms.KeySpec{Alg: kms.RS256, Bits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	nonce := digest(t, crypto.SHA256)
	a, err := b.Attest(ctx, tenantA, h, nonce)
	if err != nil {
		t.Fatal(err)
	}
	keyPub, err := PublicArea(h)
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyAttestation(a, keyPub, nonce); err != nil {
		t.Fatalf("VerifyAttestation: %v", err)
	}
	if _, ok := a.CertifyingPublic.(*ecdsa.PublicKey); !ok {
		t.Errorf("certifying public key is a %T", a.CertifyingPublic)
	}

	otherPub, err := PublicArea(other)
	if err != nil {
		t.Fatal(err)
	}
	wrongNonce := append([]byte(nil), nonce...)
	wrongNonce[0] ^= 1
	tampered := *a
	tampered.Attest = append([]byte(nil), a.Attest...)
	tampered.Attest[len(tampered.Attest)-1] ^= 1
	otherKey, err := ecdsa.GenerateKey(a.CertifyingPublic.(*ecdsa.PublicKey).Curve, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	forged := *a
	forged.CertifyingPublic = &otherKey.PublicKey
	for _, c := range []struct {
		name   string
		a      *Attestation
		keyPub []byte
		nonce  []byte
	}{
		{"wrong nonce", a, keyPub, wrongNonce},
		{"no nonce", a, keyPub, nil},
		{"another key's public area", a, otherPub, nonce},
		{"tampered attest", &tampered, keyPub, nonce},
		{"another certifying key", &forged, keyPub, nonce},
		{"nil", nil, keyPub, nonce},
	} {
		if err := VerifyAttestation(c.a, c.keyPub, c.nonce); !errors.Is(err, ErrAttestation) {
			t.Errorf("%s: got %v, want ErrAttestation", c.name, err)
		}
	}

	// The other key certifies too, under the same attestation key.
	a2, err := b.Attest(ctx, tenantA, other, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyAttestation(a2, otherPub, nil); err != nil {
		t.Fatalf("VerifyAttestation of the RSA key: %v", err)
	}
	if !bytes.Equal(a2.CertifyingKey, a.CertifyingKey) {
		t.Error("the attestation key changed between calls")
	}
	// The kms.Attester form carries the key's public area along.
	var ba kms.Attester = b
	ka, err := ba.AttestKey(ctx, tenantA, h, nonce)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ka.KeyPublic, keyPub) {
		t.Error("AttestKey: KeyPublic is not the key's public area")
	}
	viaBroker := &Attestation{Attest: ka.Attest, Signature: ka.Signature, CertifyingKey: ka.CertifyingKey}
	if err := VerifyAttestation(viaBroker, ka.KeyPublic, nonce); err != nil {
		t.Errorf("VerifyAttestation of AttestKey's result: %v", err)
	}
	if _, err := b.Attest(ctx, tenantA, h, make([]byte, 65)); !errors.Is(err, kms.ErrInvalidArgument) {
		t.Errorf("Attest with a 65-byte nonce: got %v, want ErrInvalidArgument", err)
	}
}

// TestPSS: swtpm signs PSS with salt = hash length, so the probe allows it
// and the conformance suite verifies it strictly; a TPM with another salt
// gets PSS refused before any TPM command.
func TestPSS(t *testing.T) {
	b, _ := start(t)
	if !b.pssHashSalt {
		t.Fatal("the probe says swtpm's PSS salt is not the hash length")
	}
	ctx := context.Background()
	h, _, err := b.Generate(ctx, tenantA, kms.KeySpec{Alg: kms.PS256, Bits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	pss := &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}
	if _, err := b.Sign(ctx, tenantA, h, digest(t, crypto.SHA256), &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthAuto}); !errors.Is(err, kms.ErrInvalidArgument) {
		t.Errorf("PSS with the maximal salt: got %v, want ErrInvalidArgument", err)
	}

	b.pssHashSalt = false // as on a TPM that uses the maximal salt
	defer func() { b.pssHashSalt = true }()
	var fe *kms.FieldError
	if _, err := b.Sign(ctx, tenantA, h, digest(t, crypto.SHA256), pss); !errors.As(err, &fe) || fe.Field != "padding" {
		t.Errorf("PSS on a max-salt TPM: got %v, want a FieldError on padding", err)
	}
	if _, _, err := b.Generate(ctx, tenantA, kms.KeySpec{Alg: kms.PS256, Bits: 2048}); !errors.As(err, &fe) || fe.Field != "algorithm" {
		t.Errorf("Generate PS256 on a max-salt TPM: got %v, want a FieldError on algorithm", err)
	}
	// PKCS#1 v1.5 still works with the same key.
	d := digest(t, crypto.SHA256)
	if _, err := b.Sign(ctx, tenantA, h, d, crypto.SHA256); err != nil {
		t.Errorf("PKCS#1 v1.5 on a max-salt TPM: %v", err)
	}
}

func TestPSSSaltLength(t *testing.T) {
	key, err := pssProbeKey()
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	for _, salt := range []int{1, 20, 32, 222} {
		sig, err := rsa.SignPSS(rand.Reader, key, crypto.SHA256, d[:], &rsa.PSSOptions{SaltLength: salt})
		if err != nil {
			t.Fatal(err)
		}
		if got := pssSaltLength(&key.PublicKey, crypto.SHA256, sig); got != salt {
			t.Errorf("salt %d: got %d", salt, got)
		}
	}
	if got := pssSaltLength(&key.PublicKey, crypto.SHA256, make([]byte, 256)); got != -1 {
		t.Errorf("garbage: got %d, want -1", got)
	}
}

func TestDestroy(t *testing.T) {
	b, _ := start(t)
	ctx := context.Background()
	for _, h := range []kms.Handle{nil, kms.Handle("kbtp\x01"), kms.Handle("something else")} {
		if err := b.Destroy(ctx, tenantA, h); !errors.Is(err, kms.ErrNotFound) {
			t.Errorf("Destroy(%q): got %v, want ErrNotFound", h, err)
		}
	}
	h, _, err := b.Generate(ctx, tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Sign(ctx, tenantA, h, digest(t, crypto.SHA256), crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	if err := b.Destroy(ctx, tenantA, h); err != nil {
		t.Fatal(err)
	}
	withTPM(t, b, func(l *link) {
		k, _ := decodeHandle(h)
		if b.objs[keyID(tenantA.Tenant, k)] != nil {
			t.Error("the destroyed key is still loaded")
		}
	})
	if _, err := b.Attest(ctx, tenantA, h, nil); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Attest after Destroy: got %v, want ErrNotFound", err)
	}
	b.decoded.mu.Lock()
	_, cached := b.decoded.m[string(h)]
	b.decoded.mu.Unlock()
	if cached {
		t.Error("the destroyed key's handle is still in the decode cache")
	}
	// A Sign after Destroy decodes h again, is refused, and does not keep it.
	if _, err := b.Sign(ctx, tenantA, h, digest(t, crypto.SHA256), crypto.SHA256); !errors.Is(err, kms.ErrNotFound) {
		t.Errorf("Sign after Destroy: got %v, want ErrNotFound", err)
	}
	b.decoded.mu.Lock()
	_, cached = b.decoded.m[string(h)]
	b.decoded.mu.Unlock()
	if cached {
		t.Error("a Sign after Destroy put the destroyed key's handle back in the decode cache")
	}
}

func TestHandleCache(t *testing.T) {
	b, _ := start(t)
	h, _, err := b.Generate(context.Background(), tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	var c handleCache
	mine := bytes.Clone(h)
	k1, err := c.decode(mine)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k1.encode(), h) {
		t.Fatal("the cached key does not encode to its handle")
	}
	// The caller's bytes are its own: changing them changes nothing cached.
	for i := range mine {
		mine[i] = 0
	}
	k2, err := c.decode(h)
	if err != nil {
		t.Fatal(err)
	}
	if k2 != k1 {
		t.Error("a second decode of the same handle did not come from the cache")
	}
	if !bytes.Equal(k2.encode(), h) {
		t.Error("the cached key changed with the bytes it was decoded from")
	}
	// Errors are not cached, and a bad handle stays bad.
	bad := append(bytes.Clone(h), 0)
	for range 2 {
		if _, err := c.decode(bad); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("decode of a handle with a trailing byte: got %v, want ErrNotFound", err)
		}
	}
	if len(c.m) != 1 {
		t.Errorf("cache holds %d handles, want 1", len(c.m))
	}
	c.forget(h)
	if k3, err := c.decode(h); err != nil || k3 == k1 {
		t.Errorf("decode after forget: got (%p, %v), want a fresh key (not %p)", k3, err, k1)
	}
	// Bounded: the cache starts again rather than grow past maxDecoded.
	c.m = make(map[string]*key, maxDecoded)
	for i := range maxDecoded {
		c.m[fmt.Sprint(i)] = k1
	}
	if _, err := c.decode(h); err != nil {
		t.Fatal(err)
	}
	if len(c.m) != 1 {
		t.Errorf("after overflowing: cache holds %d handles, want 1", len(c.m))
	}
}

func TestHandleEncoding(t *testing.T) {
	b, _ := start(t)
	h, pub, err := b.Generate(context.Background(), tenantA, es256)
	if err != nil {
		t.Fatal(err)
	}
	k, err := decodeHandle(h)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k.encode(), h) {
		t.Error("decode/encode does not round-trip")
	}
	area, err := PublicArea(h)
	if err != nil {
		t.Fatal(err)
	}
	tp, err := tpm2.Unmarshal[tpm2.TPM2BPublic](area)
	if err != nil {
		t.Fatal(err)
	}
	contents, err := tp.Contents()
	if err != nil {
		t.Fatal(err)
	}
	got, err := tpm2.Pub(*contents)
	if err != nil {
		t.Fatal(err)
	}
	if !pub.(*ecdsa.PublicKey).Equal(got) {
		t.Error("PublicArea holds another key than Generate returned")
	}
	for i := range len(h) {
		if _, err := decodeHandle(h[:i]); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("truncated to %d bytes: got %v, want ErrNotFound", i, err)
		}
	}
	if _, err := decodeHandle(append(h[:len(h):len(h)], 0)); err == nil {
		t.Error("a handle with a trailing byte decodes")
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	for _, c := range []Config{
		{StateDir: dir},
		{Socket: "a", Device: "b", StateDir: dir},
		{Socket: "a"},
		{Socket: "a", StateDir: dir, LoadedObjects: 2},
	} {
		if _, err := Open(ctx, c, nil); err == nil {
			t.Errorf("Open(%+v) succeeded", c)
		}
	}
	_, err := Open(ctx, Config{Socket: filepath.Join(dir, "no-such.sock"), StateDir: dir}, nil)
	if !errors.Is(err, kms.ErrUnavailable) {
		t.Errorf("Open of a missing socket: got %v, want ErrUnavailable", err)
	}
}
