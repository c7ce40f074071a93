package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/keybroker/keybroker/softhsm"
)

// privateKeyObjects counts the private keys on the token with pkcs11-tool
// (OpenSC), independently of keybroker's own code.
func privateKeyObjects(t *testing.T, tok *softhsm.Token) int {
	t.Helper()
	cmd := exec.Command("pkcs11-tool", "--module", tok.ModulePath, "--token-label", tok.Label,
		"--login", "--pin", tok.PIN, "--list-objects", "--type", "privkey")
	cmd.Env = append(os.Environ(), tok.Env())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool (install opensc: scripts/install-deps.sh): %v\n%s", err, out)
	}
	return strings.Count(string(out), "Private Key Object")
}

type keyJSON struct {
	Key struct {
		ActiveVersion uint32 `json:"activeVersion"`
		ActiveKid     string `json:"activeKid"`
		Versions      []struct {
			Version uint32 `json:"version"`
			Kid     string `json:"kid"`
			State   string `json:"state"`
		} `json:"versions"`
	} `json:"key"`
}

// TestCrashDuringRotation kills the daemon with SIGKILL at each step of a
// rotation — before and after generation, before and after the commit —
// five times each, and checks after every restart: exactly one ACTIVE
// version, no unrecorded hardware object, distinct kids, and signing works
// with a signature that verifies.
func TestCrashDuringRotation(t *testing.T) {
	daemon, ctl := binaries(t)
	tok, sock, cfgPath := daemonConfig(t, "crash", "")
	p := start(t, daemon, ctl, sock, "--config", cfgPath)
	ctlRun(t, ctl, sock, "keys", "create", "k", "--alg", "ES256")
	p.stop(t)

	seen := map[string]bool{}
	runs := 0
	for _, fp := range []string{"before-generate", "after-generate", "before-commit", "after-commit"} {
		for i := 0; i < 5; i++ {
			runs++
			p := startEnv(t, daemon, ctl, sock, []string{"KEYBROKER_FAILPOINT=" + fp}, "--config", cfgPath)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			out, err := exec.CommandContext(ctx, ctl, "--socket", sock, "keys", "rotate", "k").CombinedOutput()
			cancel()
			if err == nil {
				t.Fatalf("%s: rotate succeeded though the daemon was to die: %s", fp, out)
			}
			select {
			case <-p.done:
			case <-time.After(10 * time.Second):
				t.Fatalf("%s: daemon still running after its failpoint", fp)
			}
			if !strings.Contains(p.err.Error(), "killed") {
				t.Fatalf("%s: daemon exit %v, want killed by SIGKILL", fp, p.err)
			}

			p = start(t, daemon, ctl, sock, "--config", cfgPath)
			var k keyJSON
			if err := json.Unmarshal([]byte(ctlRun(t, ctl, sock, "--output", "json", "keys", "get", "k")), &k); err != nil {
				t.Fatal(err)
			}
			active := 0
			live := 0
			for _, v := range k.Key.Versions {
				if v.State == "KEY_STATE_ACTIVE" {
					active++
				}
				if v.State != "KEY_STATE_DESTROYED" {
					live++
				}
				seen[v.Kid] = true
			}
			if active != 1 {
				t.Fatalf("run %d (%s): %d ACTIVE versions after restart", runs, fp, active)
			}
			if len(seen) != int(k.Key.Versions[len(k.Key.Versions)-1].Version) {
				t.Fatalf("run %d (%s): %d distinct kids for %d versions", runs, fp, len(seen), len(k.Key.Versions))
			}
			signAndVerify(t, ctl, sock, "k")
			p.stop(t)
			if got := privateKeyObjects(t, tok); got != live {
				t.Fatalf("run %d (%s): %d private keys on the token, want %d (recorded, not destroyed)", runs, fp, got, live)
			}
		}
	}
	if runs != 20 {
		t.Fatalf("%d runs, want 20", runs)
	}
}

func signAndVerify(t *testing.T, ctl, sock, name string) {
	t.Helper()
	block, _ := pem.Decode([]byte(ctlRun(t, ctl, sock, "pubkey", name, "--format", "pem")))
	if block == nil {
		t.Fatal("no PEM public key")
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("after a crash"))
	var s signOut
	if err := json.Unmarshal([]byte(ctlRun(t, ctl, sock, "--output", "json", "sign", name, "--digest", fmt.Sprintf("%x", d))), &s); err != nil {
		t.Fatal(err)
	}
	sig, _ := base64.RawURLEncoding.DecodeString(s.Signature)
	if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), d[:], sig) {
		t.Fatal("signature after a crash does not verify")
	}
}
