package main

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// wantRequest fails t unless got equals want.
func wantRequest(t testing.TB, got, want proto.Message) {
	t.Helper()
	if !proto.Equal(got, want) {
		t.Errorf("request = %v, want %v", got, want)
	}
}

// wantResponse fails t unless stdout is one line of protojson equal to
// want, which must be a fresh message of the response's type.
func wantResponse(t testing.TB, stdout string, want proto.Message) {
	t.Helper()
	got := want.ProtoReflect().New().Interface()
	unmarshalLine(t, stdout, got)
	if !proto.Equal(got, want) {
		t.Errorf("response = %v, want %v", got, want)
	}
}

// readFile returns the contents of path, failing t if it cannot be read.
func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestReqCnfCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)

	runAt(socket, "req-cnf", "alpha").check(t, exitOK, "cnf-kid-kid-a2\n", "")
	wantRequest(t, locked(fake, &fake.confReq), &kbv1.GetConfirmationRequest{Name: "alpha"})

	runAt(socket, "req-cnf", "alpha", "--format", "JWK", "--version", "1").check(t, exitOK, "cnf-jwk-kid-a1\n", "")
	wantRequest(t, locked(fake, &fake.confReq), &kbv1.GetConfirmationRequest{Name: "alpha", Version: 1})

	runAt(socket, "req-cnf", "alpha", "--format", "kid", "--kid", "kid-a1").check(t, exitOK, "cnf-kid-kid-a1\n", "")
	wantRequest(t, locked(fake, &fake.confReq), &kbv1.GetConfirmationRequest{Name: "alpha", Kid: "kid-a1"})

	// JSON holds everything, whatever --format.
	r := runAt(socket, "req-cnf", "alpha", "--format", "jwk", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	wantResponse(t, r.stdout, confirmation(2, "kid-a2"))
	r.check(t, exitOK, mustProtoJSON(t, confirmation(2, "kid-a2")), "")

	runAt(socket, "req-cnf", "nope").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
	runAt(socket, "req-cnf", "alpha", "--version", "9").check(t, exitNotFound, "", "keybrokerctl: key version not found\n")
}

func TestDPoPCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)

	runAt(socket, "dpop", "alpha", "--method", "POST", "--url", "https://as.example/token", "--nonce", "n-1", "--claims", `{"client_id":"c"}`).
		check(t, exitOK, "dpop.POST.kid-a2\n", "")
	wantRequest(t, locked(fake, &fake.dpopReq), &kbv1.CreateDPoPProofRequest{
		Name: "alpha", Htm: "POST", Htu: "https://as.example/token", Nonce: "n-1", ExtraClaimsJson: `{"client_id":"c"}`})

	runAt(socket, "dpop", "alpha", "--method", "GET", "--url", "https://rs.example/r?a=1", "--access-token", "at-1", "--version", "1").
		check(t, exitOK, "dpop.GET.kid-a1\n", "")
	wantRequest(t, locked(fake, &fake.dpopReq), &kbv1.CreateDPoPProofRequest{
		Name: "alpha", Version: 1, Htm: "GET", Htu: "https://rs.example/r?a=1", AccessToken: "at-1"})

	r := runAt(socket, "dpop", "alpha", "--method", "GET", "--url", "https://rs.example/", "--ath", "ath-1", "--kid", "kid-a1", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	wantResponse(t, r.stdout, &kbv1.CreateDPoPProofResponse{Proof: "dpop.GET.kid-a1", Kid: "kid-a1", Version: 1, Jkt: "jkt-kid-a1"})
	wantRequest(t, locked(fake, &fake.dpopReq), &kbv1.CreateDPoPProofRequest{
		Name: "alpha", Kid: "kid-a1", Htm: "GET", Htu: "https://rs.example/", Ath: "ath-1"})

	runAt(socket, "dpop", "nope", "--method", "GET", "--url", "https://rs.example/").
		check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

func TestSHRCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)
	body := filepath.Join(t.TempDir(), "body.json")
	if err := os.WriteFile(body, []byte(`{"q":1}`), 0o600); err != nil {
		t.Fatal(err)
	}

	runAt(socket, "shr", "alpha", "--access-token", "at-1", "--method", "POST", "--url", "https://rs.example/r?x=1",
		"--nonce", "n-1", "--header", "Content-Type: application/json", "--header", "x-list:  a, b \t", "--header", "X-Empty:",
		"--body-file", body, "--version", "1").
		check(t, exitOK, "shr.POST.kid-a1\n", "")
	wantRequest(t, locked(fake, &fake.shrReq), &kbv1.CreateSignedHttpRequestRequest{
		Name: "alpha", Version: 1, AccessToken: "at-1", Method: "POST", Url: "https://rs.example/r?x=1", Nonce: "n-1",
		Headers: map[string]string{"Content-Type": "application/json", "x-list": "a, b", "X-Empty": ""},
		Body:    []byte(`{"q":1}`),
	})

	// The body from stdin; no headers.
	r := runAtIn(socket, "from stdin", "shr", "alpha", "--access-token", "at-2", "--method", "PUT", "--url", "https://rs.example/",
		"--body-file", "-", "--kid", "kid-a1", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	wantResponse(t, r.stdout, &kbv1.CreateSignedHttpRequestResponse{Shr: "shr.PUT.kid-a1", Kid: "kid-a1", Version: 1})
	wantRequest(t, locked(fake, &fake.shrReq), &kbv1.CreateSignedHttpRequestRequest{
		Name: "alpha", Kid: "kid-a1", AccessToken: "at-2", Method: "PUT", Url: "https://rs.example/", Body: []byte("from stdin")})

	// A missing body file is found before any call.
	setLocked(fake, &fake.shrReq, nil)
	missing := filepath.Join(t.TempDir(), "missing")
	runAt(socket, "shr", "alpha", "--access-token", "at", "--method", "GET", "--url", "https://rs.example/", "--body-file", missing).
		check(t, exitNotFound, "", "keybrokerctl: body file "+missing+" does not exist\n")
	if got := locked(fake, &fake.shrReq); got != nil {
		t.Errorf("CreateSignedHttpRequest called with %v", got)
	}

	runAt(socket, "shr", "nope", "--access-token", "at", "--method", "GET", "--url", "https://rs.example/").
		check(t, exitNotFound, "", "keybrokerctl: key not found\n")

	help := runAt(socket, "shr", "--help")
	if want := "Authorization: PoP <shr>"; help.code != exitOK || !strings.Contains(help.stdout, want) {
		t.Errorf("shr --help: exit %d, stdout:\n%s\nwant it to contain %q", help.code, help.stdout, want)
	}
}

func TestJWSCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)
	b64 := base64.RawURLEncoding.EncodeToString

	runAtIn(socket, `{"sub":"me"}`, "jws", "alpha", "--payload-file", "-", "--header", `{"typ":"JWT"}`).
		check(t, exitOK, "hdr-kid-a2."+b64([]byte(`{"sub":"me"}`))+".sig\n", "")
	wantRequest(t, locked(fake, &fake.jwsReq), &kbv1.SignJWSRequest{Name: "alpha", HeaderJson: `{"typ":"JWT"}`, Payload: []byte(`{"sub":"me"}`)})

	payload := filepath.Join(t.TempDir(), "payload")
	if err := os.WriteFile(payload, []byte{0, 1, 0xfe, 0xff}, 0o600); err != nil {
		t.Fatal(err)
	}
	r := runAt(socket, "jws", "alpha", "--payload-file", payload, "--version", "1", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	wantResponse(t, r.stdout, &kbv1.SignJWSResponse{Jws: "hdr-kid-a1.AAH-_w.sig", Kid: "kid-a1", Version: 1})
	wantRequest(t, locked(fake, &fake.jwsReq), &kbv1.SignJWSRequest{Name: "alpha", Version: 1, Payload: []byte{0, 1, 0xfe, 0xff}})

	setLocked(fake, &fake.jwsReq, nil)
	missing := filepath.Join(t.TempDir(), "missing")
	runAt(socket, "jws", "alpha", "--payload-file", missing).
		check(t, exitNotFound, "", "keybrokerctl: payload file "+missing+" does not exist\n")
	if got := locked(fake, &fake.jwsReq); got != nil {
		t.Errorf("SignJWS called with %v", got)
	}

	runAtIn(socket, "x", "jws", "nope", "--payload-file", "-").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

func TestCSRCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)
	csrPEM := func(kid string) string { return fakePEM("CERTIFICATE REQUEST", []byte("csr-"+kid)) }

	runAt(socket, "csr", "alpha", "--cn", "client-1", "--dns", "a.example", "--dns", "b.example", "--uri", "spiffe://td/w,x").
		check(t, exitOK, csrPEM("kid-a2"), "")
	wantRequest(t, locked(fake, &fake.csrReq), &kbv1.CreateCertificateRequestRequest{
		Name: "alpha", CommonName: "client-1", DnsNames: []string{"a.example", "b.example"}, Uris: []string{"spiffe://td/w,x"}})

	// With --out, text mode prints nothing; a SAN without --cn is enough.
	out := filepath.Join(t.TempDir(), "req.pem")
	runAt(socket, "csr", "alpha", "--dns", "a.example", "--version", "1", "--out", out).check(t, exitOK, "", "")
	if got := readFile(t, out); got != csrPEM("kid-a1") {
		t.Errorf("--out file:\n%s\nwant:\n%s", got, csrPEM("kid-a1"))
	}
	wantRequest(t, locked(fake, &fake.csrReq), &kbv1.CreateCertificateRequestRequest{Name: "alpha", Version: 1, DnsNames: []string{"a.example"}})

	// JSON has everything, and --out is still written.
	out = filepath.Join(t.TempDir(), "req2.pem")
	r := runAt(socket, "csr", "alpha", "--cn", "c", "--kid", "kid-a1", "--out", out, "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	wantResponse(t, r.stdout, &kbv1.CreateCertificateRequestResponse{
		CsrDer: []byte("csr-kid-a1"), CsrPem: csrPEM("kid-a1"), Kid: "kid-a1", Version: 1})
	if got := readFile(t, out); got != csrPEM("kid-a1") {
		t.Errorf("--out file:\n%s\nwant:\n%s", got, csrPEM("kid-a1"))
	}
	wantRequest(t, locked(fake, &fake.csrReq), &kbv1.CreateCertificateRequestRequest{Name: "alpha", Kid: "kid-a1", CommonName: "c"})

	runAt(socket, "csr", "nope", "--cn", "c").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

func TestCertCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)
	certPEM := func(kid string) string { return fakePEM("CERTIFICATE", []byte("cert-"+kid)) }

	// Without --out: the PEM and nothing else; the daemon picks the validity.
	runAt(socket, "cert", "alpha", "--cn", "client-1", "--uri", "spiffe://td/w").check(t, exitOK, certPEM("kid-a2"), "")
	wantRequest(t, locked(fake, &fake.certReq), &kbv1.CreateSelfSignedCertificateRequest{
		Name: "alpha", CommonName: "client-1", Uris: []string{"spiffe://td/w"}})

	out := filepath.Join(t.TempDir(), "cert.pem")
	runAt(socket, "cert", "alpha", "--cn", "c", "--dns", "a.example", "--validity", "30d", "--version", "1", "--out", out).
		check(t, exitOK, "x5t#S256: x5t-kid-a1\n", "")
	if got := readFile(t, out); got != certPEM("kid-a1") {
		t.Errorf("--out file:\n%s\nwant:\n%s", got, certPEM("kid-a1"))
	}
	wantRequest(t, locked(fake, &fake.certReq), &kbv1.CreateSelfSignedCertificateRequest{
		Name: "alpha", Version: 1, CommonName: "c", DnsNames: []string{"a.example"}, Validity: days(30)})

	r := runAt(socket, "cert", "alpha", "--cn", "c", "--kid", "kid-a1", "--validity", "1d12h", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	wantResponse(t, r.stdout, &kbv1.CreateSelfSignedCertificateResponse{
		CertificateDer: []byte("cert-kid-a1"), CertificatePem: certPEM("kid-a1"), X5TS256: "x5t-kid-a1", Kid: "kid-a1", Version: 1})
	if want := 36 * time.Hour; locked(fake, &fake.certReq).GetValidity().AsDuration() != want {
		t.Errorf("validity = %v, want %v", locked(fake, &fake.certReq).GetValidity(), want)
	}

	// keybrokerd's INVALID_ARGUMENT is a usage error too.
	runAt(socket, "cert", "alpha", "--cn", "c", "--validity", "900d").
		check(t, exitUsage, "", "keybrokerctl: validity: want more than 0 and at most 825 days\n")

	// An --out that cannot be written fails after the call.
	r = runAt(socket, "cert", "alpha", "--cn", "c", "--out", filepath.Join(t.TempDir(), "no", "such", "dir"))
	if r.code != exitFailure || r.stdout != "" || !strings.HasPrefix(r.stderr, "keybrokerctl: open ") {
		t.Errorf("unwritable --out: exit %d, stdout %q, stderr %q; want %d, nothing, an open error", r.code, r.stdout, r.stderr, exitFailure)
	}

	runAt(socket, "cert", "nope", "--cn", "c").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

func TestAttestCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)
	b64 := base64.StdEncoding.EncodeToString

	runAt(socket, "attest", "beta", "--nonce", "00FF").check(t, exitOK, `attest:                 `+b64([]byte("attest-\x00\xff"))+`
signature:              +/8=
certifying key public:  YWs=
key public:             `+b64([]byte("key-kid-b1"))+`
kid:                    kid-b1
version:                1
nonce:                  00ff
`, "")
	wantRequest(t, locked(fake, &fake.attestReq), &kbv1.AttestKeyRequest{Name: "beta", Nonce: []byte{0, 0xff}})

	runAt(socket, "attest", "beta", "--kid", "kid-b1", "--nonce", "01", "-o", "json").check(t, exitOK,
		`{"attest":"`+b64([]byte("attest-\x01"))+`","signature":"+/8=","certifyingKeyPublic":"YWs=","keyPublic":"`+b64([]byte("key-kid-b1"))+`","kid":"kid-b1","version":1,"nonce":"01"}`+"\n", "")
	wantRequest(t, locked(fake, &fake.attestReq), &kbv1.AttestKeyRequest{Name: "beta", Kid: "kid-b1", Nonce: []byte{1}})

	// Without --nonce: 32 random bytes, printed.
	var nonces []string
	for range 2 {
		r := runAt(socket, "attest", "beta", "--version", "1")
		r.check(t, exitOK, r.stdout, "")
		req := locked(fake, &fake.attestReq)
		if len(req.GetNonce()) != 32 || req.GetVersion() != 1 {
			t.Fatalf("request = %v, want version 1 and a 32-byte nonce", req)
		}
		nonce := hex.EncodeToString(req.GetNonce())
		if want := "\nnonce:                  " + nonce + "\n"; !strings.HasSuffix(r.stdout, want) {
			t.Errorf("stdout:\n%s\nwant it to end with %q", r.stdout, want)
		}
		nonces = append(nonces, nonce)
	}
	if nonces[0] == nonces[1] {
		t.Errorf("two calls sent the same nonce %s", nonces[0])
	}

	runAt(socket, "attest", "alpha").check(t, exitConflict, "", "keybrokerctl: key is not in a TPM\n")
	runAt(socket, "attest", "nope").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

func TestParseHeaders(t *testing.T) {
	got, err := parseHeaders([]string{"A: 1", "b-c:2", "D:\t x y \t", "E:", "F: a: b"})
	want := map[string]string{"A": "1", "b-c": "2", "D": "x y", "E": "", "F": "a: b"}
	if err != nil || len(got) != len(want) {
		t.Fatalf("parseHeaders() = %v, %v; want %v", got, err, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("header %s = %q, want %q", k, got[k], v)
		}
	}
	if got, err := parseHeaders(nil); got != nil || err != nil {
		t.Errorf("parseHeaders(nil) = %v, %v; want nil, nil", got, err)
	}
	for line, wantErr := range map[string]string{
		"NoColon":      `--header: got "NoColon", want 'Name: value'`,
		"Bad Name: v":  `--header: got "Bad Name: v"`,
		"A : v":        `--header: got "A : v"`,
		": v":          `--header: got ": v"`,
		"A: 1\r\nB: 2": "--header: A: the value may not hold CR, LF or NUL",
	} {
		_, err := parseHeaders([]string{line})
		wantUsageError(t, err, wantErr)
	}
	_, err = parseHeaders([]string{"X-A: 1", "x-a: 2"})
	wantUsageError(t, err, "--header: x-a given twice")
}

func TestAttestRequest(t *testing.T) {
	random := strings.NewReader(strings.Repeat("\x07", 40))
	got, err := attestFlags{}.request("k", false, random)
	want := &kbv1.AttestKeyRequest{Name: "k", Nonce: []byte(strings.Repeat("\x07", 32))}
	if err != nil || !proto.Equal(got, want) {
		t.Errorf("request() = %v, %v; want %v", got, err, want)
	}
	if _, err := (attestFlags{}).request("k", false, strings.NewReader("short")); err == nil || errors.As(err, new(usageError)) {
		t.Errorf("request() with short randomness: err = %v, want a failure that is no usage error", err)
	}
	got, err = attestFlags{nonce: strings.Repeat("ab", 64)}.request("k", true, nil)
	if err != nil || len(got.GetNonce()) != 64 {
		t.Errorf("request() with 64-byte nonce = %v, %v", got, err)
	}
}

// TestMethodCase: a standard method in the wrong case is refused before
// any call, with the method meant (RFC 9110 §9.1: methods are
// case-sensitive, so "htm":"get" matches no GET); other methods go to the
// RPC exactly as given, and a method that is not a token is refused.
func TestMethodCase(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)
	for _, cmd := range [][]string{
		{"dpop", "alpha", "--url", "https://rs.example/"},
		{"shr", "alpha", "--access-token", "at-1", "--url", "https://rs.example/"},
	} {
		for _, tc := range []struct{ method, want string }{
			{"get", "did you mean GET?"},
			{"Get", "did you mean GET?"},
			{"post", "did you mean POST?"},
			{"pAtCh", "did you mean PATCH?"},
			{"options", "did you mean OPTIONS?"},
			{"connect", "did you mean CONNECT?"},
			{"GET /x", `--method: got "GET /x", want a method name`},
			{"", "--method: required"},
		} {
			r := runAt(socket, append(cmd, "--method", tc.method)...)
			if r.code != exitUsage || r.stdout != "" || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("%s --method %q: exit %d, stderr %q; want %d and %q", cmd[0], tc.method, r.code, r.stderr, exitUsage, tc.want)
			}
		}
	}
	if got := locked(fake, &fake.dpopReq); got != nil {
		t.Errorf("a refused dpop reached keybrokerd: %v", got)
	}
	if got := locked(fake, &fake.shrReq); got != nil {
		t.Errorf("a refused shr reached keybrokerd: %v", got)
	}
	// Extension methods (RFC 9110 §16.1), in whatever case, are sent as given.
	for _, m := range []string{"PROPFIND", "purge", "GET"} {
		runAt(socket, "dpop", "alpha", "--method", m, "--url", "https://rs.example/").check(t, exitOK, "dpop."+m+".kid-a2\n", "")
		wantRequest(t, locked(fake, &fake.dpopReq), &kbv1.CreateDPoPProofRequest{Name: "alpha", Htm: m, Htu: "https://rs.example/"})
		runAt(socket, "shr", "alpha", "--access-token", "at-1", "--method", m, "--url", "https://rs.example/").check(t, exitOK, "shr."+m+".kid-a2\n", "")
		wantRequest(t, locked(fake, &fake.shrReq), &kbv1.CreateSignedHttpRequestRequest{Name: "alpha", AccessToken: "at-1", Method: m, Url: "https://rs.example/"})
	}
}
