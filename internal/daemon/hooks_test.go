package daemon

import (
	"bufio"
	"bytes"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/pop"
)

// TestHooksOnRealKeys: on a daemon over SoftHSM2, a hook gets the events it
// asks for as the JSON keys watch prints (kid and JWK included), a hook
// that hangs is killed at its timeout and retried without holding up
// signing, and each run is an audit record.
func TestHooksOnRealKeys(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "events.jsonl")
	writer := filepath.Join(dir, "write.sh")
	hang := filepath.Join(dir, "hang.sh")
	if err := os.WriteFile(writer, []byte("#!/bin/sh\ncat >> \"$1\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(hang, []byte("#!/bin/sh\nexec sleep 300\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := startDaemon(t, func(c *config.Config) {
		c.Hooks = []config.Hook{
			{On: []string{"active", "retired", "revoked"}, Exec: writer, Args: []string{out}},
			{On: []string{"active"}, Exec: hang, Timeout: time.Second},
		}
	}, Options{})
	ctx := t.Context()
	created, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k"}); err != nil {
		t.Fatal(err)
	}
	// The hanging hook is being killed and retried meanwhile: signing
	// does not wait for it.
	if _, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)}); err != nil {
		t.Fatal(err)
	}
	var lines []map[string]any
	for deadline := time.Now().Add(30 * time.Second); len(lines) < 3; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("hook wrote %d events, want 3", len(lines))
		}
		lines = readJSONLines(t, out)
	}
	want := []struct {
		typ     string
		version float64
	}{{"KEY_EVENT_TYPE_ACTIVE", 1}, {"KEY_EVENT_TYPE_RETIRED", 1}, {"KEY_EVENT_TYPE_ACTIVE", 2}}
	for i, w := range want {
		ev := lines[i]
		if ev["type"] != w.typ || ev["version"] != w.version || ev["tenant"] != config.DefaultTenant || ev["name"] != "k" {
			t.Fatalf("event %d: %v, want %s v%v", i, ev, w.typ, w.version)
		}
		var jwk map[string]string
		if err := json.Unmarshal([]byte(ev["jwk"].(string)), &jwk); err != nil || jwk["kid"] != ev["kid"] || jwk["d"] != "" {
			t.Fatalf("event %d jwk %v (%v)", i, ev["jwk"], err)
		}
	}
	if lines[0]["kid"] != created.GetKey().GetActiveKid() {
		t.Fatalf("v1 kid %v, want %s", lines[0]["kid"], created.GetKey().GetActiveKid())
	}
	// Two runs of the hanging hook killed at 1s each (backoff 1s between).
	for deadline := time.Now().Add(30 * time.Second); countHookRecords(t, r.cfg.AuditPath(), "TIMEOUT") < 2; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the hanging hook was not killed and retried")
		}
	}
	if n := countHookRecords(t, r.cfg.AuditPath(), "OK"); n != 3 {
		t.Fatalf("%d OK hook records, want 3", n)
	}
	if _, err := r.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)}); err != nil {
		t.Fatal(err)
	}
}

func readJSONLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	// Only whole lines: a hook may be writing the file as it is read.
	whole := string(b[:bytes.LastIndexByte(b, '\n')+1])
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSuffix(whole, "\n"), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("hook stdin line %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

func countHookRecords(t *testing.T, path, code string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var rec audit.Record
		if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Method == "hook" && rec.Code == code {
			n++
		}
	}
	return n
}

// TestNewRefusesBadHook: a bad hook is a configuration error naming the
// field.
func TestNewRefusesBadHook(t *testing.T) {
	cfg := config.Default()
	cfg.Hooks = []config.Hook{{On: []string{"pending"}, Exec: "relative/hook.sh"}}
	_, err := New(cfg, nil)
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "hooks[0].exec") {
		t.Fatalf("New: %v, want ErrConfig naming hooks[0].exec", err)
	}
}

// TestHookPendingEventCarriesCSR: a hook's PENDING event carries the new
// version's CSR, signed by that version in the HSM (its key's thumbprint
// is the event's kid), so a CA can issue before the version signs; the
// CSR's signature is an audit record.
func TestHookPendingEventCarriesCSR(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "events.jsonl")
	writer := filepath.Join(dir, "write.sh")
	if err := os.WriteFile(writer, []byte("#!/bin/sh\ncat >> \"$1\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := startDaemon(t, func(c *config.Config) {
		c.Rotation.CheckInterval = time.Second
		c.Hooks = []config.Hook{{On: []string{"pending"}, Exec: writer, Args: []string{out}}}
	}, Options{})
	ctx := t.Context()
	if _, err := r.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	// Due at once: version 2 is published one second into a one-hour period.
	if _, err := r.client.UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: "k", Policy: &kbv1.RotationPolicy{
		RotationPeriod: durationpb.New(time.Hour), PrePublicationLead: durationpb.New(time.Hour - time.Second)}}); err != nil {
		t.Fatal(err)
	}
	var lines []map[string]any
	for deadline := time.Now().Add(30 * time.Second); len(lines) < 1; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no PENDING event reached the hook within 30 s")
		}
		lines = readJSONLines(t, out)
	}
	ev := lines[0]
	if ev["type"] != "KEY_EVENT_TYPE_PENDING" || ev["version"] != float64(2) || ev["csrError"] != "" {
		t.Fatalf("event %v, want PENDING v2 with a CSR", ev)
	}
	der, err := base64.StdEncoding.DecodeString(ev["csrDer"].(string))
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil || csr.Subject.CommonName != "k" {
		t.Fatalf("CSR: CN %q, signature %v", csr.Subject.CommonName, err)
	}
	jwk, err := pop.NewJWK(csr.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	if tp, _ := jwk.Thumbprint(); tp != ev["kid"] {
		t.Fatalf("the CSR's key has thumbprint %s, the event's kid is %v", tp, ev["kid"])
	}
	b, err := os.ReadFile(r.cfg.AuditPath())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"note":"CSR for a PENDING version, sent to the hooks with its event"`) {
		t.Error("no audit record of the hook's CSR")
	}
}
