package main

import (
	"context"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// importFake is the fake broker with ImportCertificate.
type importFake struct {
	*fakeBroker
	req *kbv1.ImportCertificateRequest
}

func (f *importFake) ImportCertificate(_ context.Context, req *kbv1.ImportCertificateRequest) (*kbv1.ImportCertificateResponse, error) {
	version, kid, err := record(f.fakeBroker, &f.req, req)
	if err != nil {
		return nil, err
	}
	return &kbv1.ImportCertificateResponse{Kid: kid, Version: version, X5TS256: "x5t-" + kid,
		ExpireTime: timestamppb.New(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))}, nil
}

func pemBlocks(blocks ...*pem.Block) string {
	var b strings.Builder
	for _, blk := range blocks {
		b.Write(pem.EncodeToMemory(blk))
	}
	return b.String()
}

func TestImportCertCommand(t *testing.T) {
	fake := &importFake{fakeBroker: newFakeBroker(t)}
	socket, _ := startFake(t, fake)
	dir := t.TempDir()
	chain := filepath.Join(dir, "chain.pem")
	// openssl's bundles put text before each block: skipped.
	if err := os.WriteFile(chain, []byte("subject=CN = leaf\n"+pemBlocks(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("leaf")})+
		"subject=CN = issuer\n"+pemBlocks(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("issuer")})), 0o600); err != nil {
		t.Fatal(err)
	}

	runAt(socket, "import-cert", "alpha", "--chain", chain, "--version", "1").
		check(t, exitOK, "version:\t1\nkid:\tkid-a1\nx5t#S256:\tx5t-kid-a1\nexpires:\t2026-01-02T03:04:05Z\n", "")
	wantRequest(t, locked(fake.fakeBroker, &fake.req), &kbv1.ImportCertificateRequest{Name: "alpha", Version: 1,
		CertificateChain: [][]byte{[]byte("leaf"), []byte("issuer")}})

	leafOnly := pemBlocks(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("leaf")})
	r := runAtIn(socket, leafOnly, "import-cert", "alpha", "--chain", "-", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	wantResponse(t, r.stdout, &kbv1.ImportCertificateResponse{Kid: "kid-a2", Version: 2, X5TS256: "x5t-kid-a2",
		ExpireTime: timestamppb.New(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))})
	wantRequest(t, locked(fake.fakeBroker, &fake.req), &kbv1.ImportCertificateRequest{Name: "alpha", CertificateChain: [][]byte{[]byte("leaf")}})

	// Refused before any call: a bundled private key, no certificate, no
	// --chain, both --version and --kid. A missing file is not found.
	setLocked(fake.fakeBroker, &fake.req, nil)
	withKey := filepath.Join(dir, "with-key.pem")
	os.WriteFile(withKey, []byte(leafOnly+pemBlocks(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte("secret")})), 0o600)
	r = runAt(socket, "import-cert", "alpha", "--chain", withKey)
	if r.code != exitUsage || !strings.Contains(r.stderr, `block 2 is "EC PRIVATE KEY"`) || strings.Contains(r.stderr, "secret") {
		t.Errorf("chain with a private key: exit %d, stderr %q", r.code, r.stderr)
	}
	for _, args := range [][]string{
		{"alpha"},
		{"alpha", "--chain", chain, "--version", "1", "--kid", "kid-a1"},
	} {
		if r := runAt(socket, append([]string{"import-cert"}, args...)...); r.code != exitUsage || r.stdout != "" {
			t.Errorf("%v: exit %d, stderr %q; want a usage error", args, r.code, r.stderr)
		}
	}
	if r := runAtIn(socket, "no pem here\n", "import-cert", "alpha", "--chain", "-"); r.code != exitUsage || !strings.Contains(r.stderr, "no PEM CERTIFICATE block") {
		t.Errorf("no certificate: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := runAt(socket, "import-cert", "alpha", "--chain", filepath.Join(dir, "missing.pem")); r.code != exitNotFound {
		t.Errorf("missing file: exit %d, stderr %q", r.code, r.stderr)
	}
	if got := locked(fake.fakeBroker, &fake.req); got != nil {
		t.Errorf("a refused command called keybrokerd: %v", got)
	}
	runAt(socket, "import-cert", "nope", "--chain", chain).check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

// TestKeysGetShowsCertificates: keys get lists the versions that have an
// imported certificate, with its x5t#S256 and expiry, after the versions;
// a key without one prints no such section.
func TestKeysGetShowsCertificates(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)
	if r := runAt(socket, "keys", "get", "alpha"); r.code != exitOK || strings.Contains(r.stdout, "certificates:") {
		t.Fatalf("keys get without certificates: code %d\n%s", r.code, r.stdout)
	}
	fake.mu.Lock()
	v := fake.keys["alpha"].Versions[len(fake.keys["alpha"].Versions)-1]
	v.X5TS256, v.CertificateExpireTime = "x5t-abc", created2
	fake.mu.Unlock()
	r := runAt(socket, "keys", "get", "alpha")
	want := fmt.Sprintf("certificates:\n  v%d  x5t#S256=x5t-abc  expires 2026-02-03T04:05:06Z\n", v.GetVersion())
	if r.code != exitOK || !strings.HasSuffix(r.stdout, want) {
		t.Fatalf("keys get: code %d\n%s\nwant it to end with\n%s", r.code, r.stdout, want)
	}
}
