package main

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

const digest32 = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"

// wantUsageError fails t unless err is a usage error whose text contains want.
func wantUsageError(t testing.TB, err error, want string) {
	t.Helper()
	if !errors.As(err, new(usageError)) {
		t.Fatalf("err = %v, want a usage error", err)
	}
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("err = %q, want it to contain %q", err, want)
	}
}

func TestParseAlgorithm(t *testing.T) {
	for s, want := range map[string]kbv1.Algorithm{
		"ES256": kbv1.Algorithm_ALGORITHM_ES256,
		"es384": kbv1.Algorithm_ALGORITHM_ES384,
		"Rs256": kbv1.Algorithm_ALGORITHM_RS256,
		"ps256": kbv1.Algorithm_ALGORITHM_PS256,
	} {
		got, err := algorithms.parse("alg", s)
		if err != nil || got != want {
			t.Errorf("parse(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	for _, s := range []string{"", "HS256", "ES512", "ALGORITHM_ES256", "es 256"} {
		_, err := algorithms.parse("alg", s)
		wantUsageError(t, err, `--alg: got "`+s+`", want ES256|ES384|RS256|PS256`)
	}
}

func TestCreateRequest(t *testing.T) {
	tests := []struct {
		alg     string
		bits    int32
		want    *kbv1.CreateKeyRequest
		wantErr string
	}{
		{alg: "es256", want: &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}},
		{alg: "RS256", want: &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_RS256}},
		{alg: "PS256", bits: 3072, want: &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_PS256, Bits: 3072}},
		{alg: "rs256", bits: 4096, want: &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_RS256, Bits: 4096}},
		{alg: "RS256", bits: 1024, wantErr: "--bits: got 1024, want 2048, 3072 or 4096"},
		{alg: "ES384", bits: 2048, wantErr: "--bits: applies to RSA keys only, not ES384"},
		{alg: "HS256", wantErr: `--alg: got "HS256"`},
	}
	for _, tt := range tests {
		got, err := createFlags{alg: tt.alg, bits: tt.bits}.request("k")
		if tt.wantErr != "" {
			wantUsageError(t, err, tt.wantErr)
			continue
		}
		if err != nil || !proto.Equal(got, tt.want) {
			t.Errorf("request(alg %q, bits %d) = %v, %v; want %v", tt.alg, tt.bits, got, err, tt.want)
		}
	}
}

func TestCreateRequestPolicy(t *testing.T) {
	var f createFlags
	f.alg = "ES256"
	for flag, v := range map[*durationFlag]string{&f.policy.period: "1d12h", &f.policy.lead: "90m"} {
		if err := flag.Set(v); err != nil {
			t.Fatalf("Set(%q): %v", v, err)
		}
	}
	got, err := f.request("k")
	want := &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256,
		Policy: &kbv1.RotationPolicy{RotationPeriod: durationpb.New(36 * time.Hour), PrePublicationLead: durationpb.New(90 * time.Minute)}}
	if err != nil || !proto.Equal(got, want) {
		t.Errorf("request() = %v, %v; want %v", got, err, want)
	}
}

func TestDurationFlag(t *testing.T) {
	for s, want := range map[string]time.Duration{
		"90d":   90 * 24 * time.Hour,
		"1d12h": 36 * time.Hour,
		"36h":   36 * time.Hour,
		"1h30m": 90 * time.Minute,
		"0d1s":  time.Second,
	} {
		var f durationFlag
		if err := f.Set(s); err != nil || f.d != want || !f.set {
			t.Errorf("Set(%q): d = %v, set = %t, err = %v; want %v, true, nil", s, f.d, f.set, err, want)
		}
	}
	for _, s := range []string{"", "90x", "90", "-1d", "-5h", "0", "0d", "d", "1.5d", "70000d"} {
		f := durationFlag{d: time.Hour}
		if err := f.Set(s); err == nil || f.set || f.d != time.Hour {
			t.Errorf("Set(%q): d = %v, set = %t, err = %v; want an error and no change", s, f.d, f.set, err)
		}
	}
	for d, want := range map[time.Duration]string{0: "", 365 * 24 * time.Hour: "365d", 36 * time.Hour: "36h0m0s"} {
		f := durationFlag{d: d}
		if got := f.String(); got != want {
			t.Errorf("String() of %v = %q, want %q", d, got, want)
		}
	}
}

func TestPolicyFlagsProto(t *testing.T) {
	var f policyFlags
	if got := f.proto(); got != nil {
		t.Errorf("proto() without flags = %v, want nil", got)
	}
	flags := []*durationFlag{&f.period, &f.overlap, &f.lead, &f.destroyDelay}
	want := &kbv1.RotationPolicy{}
	wantFields := []**durationpb.Duration{&want.RotationPeriod, &want.Overlap, &want.PrePublicationLead, &want.DestroyDelay}
	for i, flag := range flags {
		if err := flag.Set(fmt.Sprintf("%dd", i+1)); err != nil {
			t.Fatal(err)
		}
		*wantFields[i] = durationpb.New(time.Duration(i+1) * 24 * time.Hour)
		if got := f.proto(); !proto.Equal(got, want) {
			t.Errorf("proto() with %d flags = %v, want %v", i+1, got, want)
		}
	}
}

func TestRotateRequest(t *testing.T) {
	tests := []struct {
		ifActive uint32
		set      bool
		want     *kbv1.RotateKeyRequest
		wantErr  string
	}{
		{want: &kbv1.RotateKeyRequest{Name: "k"}},
		{ifActive: 3, set: true, want: &kbv1.RotateKeyRequest{Name: "k", IfActiveVersion: 3}},
		{set: true, wantErr: "--if-active-version: got 0"},
	}
	for _, tt := range tests {
		got, err := rotateRequest("k", tt.ifActive, tt.set)
		if tt.wantErr != "" {
			wantUsageError(t, err, tt.wantErr)
			continue
		}
		if err != nil || !proto.Equal(got, tt.want) {
			t.Errorf("rotateRequest(%d, %t) = %v, %v; want %v", tt.ifActive, tt.set, got, err, tt.want)
		}
	}
}

func TestRevokeRequest(t *testing.T) {
	tests := []struct {
		flags   versionFlags
		want    *kbv1.RevokeKeyVersionRequest
		wantErr string
	}{
		{flags: versionFlags{version: 2}, want: &kbv1.RevokeKeyVersionRequest{Name: "k", Version: 2}},
		{flags: versionFlags{kid: "kid-1"}, want: &kbv1.RevokeKeyVersionRequest{Name: "k", Kid: "kid-1"}},
		{flags: versionFlags{}, wantErr: "--version and --kid: give exactly one"},
		{flags: versionFlags{version: 2, kid: "kid-1"}, wantErr: "--version and --kid: give exactly one"},
	}
	for _, tt := range tests {
		got, err := revokeRequest("k", tt.flags)
		if tt.wantErr != "" {
			wantUsageError(t, err, tt.wantErr)
			continue
		}
		if err != nil || !proto.Equal(got, tt.want) {
			t.Errorf("revokeRequest(%+v) = %v, %v; want %v", tt.flags, got, err, tt.want)
		}
	}
}

func TestSignRequest(t *testing.T) {
	digest := make([]byte, 32)
	for i := range digest {
		digest[i] = byte(i)
	}
	tests := []struct {
		name    string
		flags   signFlags
		want    *kbv1.SignRequest
		wantErr string
	}{
		{
			name:  "defaults",
			flags: signFlags{digest: digest32},
			want:  &kbv1.SignRequest{Name: "k", Digest: digest},
		},
		{
			name:  "everything",
			flags: signFlags{digest: strings.ToUpper(digest32), hash: "SHA256", format: "JOSE", padding: "pss", versionFlags: versionFlags{version: 3}},
			want: &kbv1.SignRequest{Name: "k", Digest: digest, Version: 3,
				Hash: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA256, Format: kbv1.SignatureFormat_SIGNATURE_FORMAT_JOSE, Padding: kbv1.RSAPadding_RSA_PADDING_PSS},
		},
		{
			name:  "kid, der, pkcs1v15",
			flags: signFlags{digest: digest32, format: "der", padding: "PKCS1v15", versionFlags: versionFlags{kid: "kid-1"}},
			want: &kbv1.SignRequest{Name: "k", Digest: digest, Kid: "kid-1",
				Format: kbv1.SignatureFormat_SIGNATURE_FORMAT_DER, Padding: kbv1.RSAPadding_RSA_PADDING_PKCS1V15},
		},
		{
			name:  "unknown digest length without hash",
			flags: signFlags{digest: "00ff"},
			want:  &kbv1.SignRequest{Name: "k", Digest: []byte{0, 0xff}},
		},
		{name: "no digest", flags: signFlags{}, wantErr: "--digest: required"},
		{name: "bad hex", flags: signFlags{digest: "zz"}, wantErr: "--digest: not hex"},
		{name: "odd hex", flags: signFlags{digest: "abc"}, wantErr: "--digest: not hex"},
		{name: "short for sha256", flags: signFlags{digest: digest32[2:], hash: "sha256"}, wantErr: "--digest: got 31 bytes, want 32 for sha256"},
		{name: "short for sha384", flags: signFlags{digest: digest32, hash: "sha384"}, wantErr: "--digest: got 32 bytes, want 48 for sha384"},
		{name: "short for sha512", flags: signFlags{digest: digest32, hash: "SHA512"}, wantErr: "--digest: got 32 bytes, want 64 for sha512"},
		{name: "bad hash", flags: signFlags{digest: digest32, hash: "md5"}, wantErr: `--hash: got "md5", want sha256|sha384|sha512`},
		{name: "bad format", flags: signFlags{digest: digest32, format: "raw"}, wantErr: `--format: got "raw", want der|jose`},
		{name: "bad padding", flags: signFlags{digest: digest32, padding: "oaep"}, wantErr: `--padding: got "oaep", want pkcs1v15|pss`},
		{name: "version and kid", flags: signFlags{digest: digest32, versionFlags: versionFlags{version: 1, kid: "kid-1"}}, wantErr: "--version and --kid: give at most one"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.flags.request("k")
			if tt.wantErr != "" {
				wantUsageError(t, err, tt.wantErr)
				return
			}
			if err != nil || !proto.Equal(got, tt.want) {
				t.Errorf("request() = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

func TestPubkeyRequest(t *testing.T) {
	tests := []struct {
		flags      pubkeyFlags
		want       *kbv1.GetPublicKeyRequest
		wantFormat keyFormat
		wantErr    string
	}{
		{flags: pubkeyFlags{format: "pem"}, want: &kbv1.GetPublicKeyRequest{Name: "k"}, wantFormat: formatPEM},
		{flags: pubkeyFlags{format: "JWK", versionFlags: versionFlags{version: 2}}, want: &kbv1.GetPublicKeyRequest{Name: "k", Version: 2}, wantFormat: formatJWK},
		{flags: pubkeyFlags{format: "der", versionFlags: versionFlags{kid: "kid-1"}}, want: &kbv1.GetPublicKeyRequest{Name: "k", Kid: "kid-1"}, wantFormat: formatDER},
		{flags: pubkeyFlags{format: "ssh"}, wantErr: `--format: got "ssh", want pem|jwk|der`},
		{flags: pubkeyFlags{format: "pem", versionFlags: versionFlags{version: 2, kid: "kid-1"}}, wantErr: "--version and --kid"},
	}
	for _, tt := range tests {
		got, format, err := tt.flags.request("k")
		if tt.wantErr != "" {
			wantUsageError(t, err, tt.wantErr)
			continue
		}
		if err != nil || !proto.Equal(got, tt.want) || format != tt.wantFormat {
			t.Errorf("request(%+v) = %v, %v, %v; want %v, %v", tt.flags, got, format, err, tt.want, tt.wantFormat)
		}
	}
}

// TestUsageErrors runs keybrokerctl against a socket that does not exist:
// a usage error must be found before dialing, which would exit 4.
func TestUsageErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.sock")
	tests := []struct {
		args    []string
		wantErr string
		wantCmd string
	}{
		{[]string{"bogus"}, `unknown command "bogus" for "keybrokerctl"`, "keybrokerctl"},
		{[]string{"keys", "bogus"}, `unknown command "bogus" for "keybrokerctl keys"`, "keybrokerctl keys"},
		{[]string{"--bogus"}, "unknown flag: --bogus", "keybrokerctl"},
		{[]string{"keys", "get"}, "accepts 1 arg(s), received 0", "keybrokerctl keys get"},
		{[]string{"keys", "list", "extra"}, `unknown command "extra" for "keybrokerctl keys list"`, "keybrokerctl keys list"},
		{[]string{"keys", "create", "k", "--alg", "HS256"}, `--alg: got "HS256"`, "keybrokerctl keys create"},
		{[]string{"keys", "create", "k", "--bits", "2048"}, "--bits: applies to RSA keys only, not ES256", "keybrokerctl keys create"},
		{[]string{"keys", "create", "k", "--bits", "many"}, `invalid argument "many" for "--bits"`, "keybrokerctl keys create"},
		{[]string{"keys", "create", "k", "--rotation-period", "90x"}, `invalid argument "90x" for "--rotation-period" flag: want a positive duration such as 90d, 1d12h or 36h`, "keybrokerctl keys create"},
		{[]string{"keys", "create", "k", "--overlap", "-1d"}, `invalid argument "-1d" for "--overlap" flag: want a positive duration`, "keybrokerctl keys create"},
		{[]string{"keys", "create", "k", "--lead=0"}, `invalid argument "0" for "--lead" flag: want a positive duration`, "keybrokerctl keys create"},
		{[]string{"keys", "create", "k", "--destroy-delay", "70000d"}, `invalid argument "70000d" for "--destroy-delay" flag`, "keybrokerctl keys create"},
		{[]string{"keys", "rotate"}, "accepts 1 arg(s), received 0", "keybrokerctl keys rotate"},
		{[]string{"keys", "rotate", "k", "--if-active-version", "0"}, "--if-active-version: got 0, want a version number (1 or more)", "keybrokerctl keys rotate"},
		{[]string{"keys", "rotate", "k", "--if-active-version", "-1"}, `invalid argument "-1" for "--if-active-version"`, "keybrokerctl keys rotate"},
		{[]string{"keys", "revoke", "k"}, "--version and --kid: give exactly one", "keybrokerctl keys revoke"},
		{[]string{"keys", "revoke", "k", "--version", "1", "--kid", "x"}, "--version and --kid: give exactly one", "keybrokerctl keys revoke"},
		{[]string{"keys", "revoke", "--version", "1"}, "accepts 1 arg(s), received 0", "keybrokerctl keys revoke"},
		{[]string{"keys", "policy", "k", "--lead", "-5h"}, `invalid argument "-5h" for "--lead" flag: want a positive duration`, "keybrokerctl keys policy"},
		{[]string{"keys", "policy", "k", "--rotation-period", "1d12x"}, `invalid argument "1d12x" for "--rotation-period" flag`, "keybrokerctl keys policy"},
		{[]string{"keys", "policy", "k", "--overlap", "90"}, `invalid argument "90" for "--overlap" flag`, "keybrokerctl keys policy"},
		{[]string{"keys", "policy", "k", "extra"}, "accepts 1 arg(s), received 2", "keybrokerctl keys policy"},
		{[]string{"keys", "timeline", "k", "--horizon", "0s"}, `invalid argument "0s" for "--horizon" flag: want a positive duration`, "keybrokerctl keys timeline"},
		{[]string{"keys", "timeline", "k", "--horizon", "1y"}, `invalid argument "1y" for "--horizon" flag`, "keybrokerctl keys timeline"},
		{[]string{"sign", "k"}, "--digest: required", "keybrokerctl sign"},
		{[]string{"sign", "k", "--digest", "xyz"}, "--digest: not hex", "keybrokerctl sign"},
		{[]string{"sign", "k", "--digest", "00", "--hash", "sha256"}, "--digest: got 1 bytes, want 32 for sha256", "keybrokerctl sign"},
		{[]string{"sign", "k", "--digest", digest32, "--version", "1", "--kid", "x"}, "--version and --kid", "keybrokerctl sign"},
		{[]string{"sign", "k", "--digest", digest32, "--version", "-1"}, `invalid argument "-1" for "--version"`, "keybrokerctl sign"},
		{[]string{"pubkey", "k", "--format", "ssh"}, `--format: got "ssh"`, "keybrokerctl pubkey"},
		{[]string{"req-cnf"}, "accepts 1 arg(s), received 0", "keybrokerctl req-cnf"},
		{[]string{"req-cnf", "k", "--format", "pem"}, `--format: got "pem", want jwk|kid`, "keybrokerctl req-cnf"},
		{[]string{"req-cnf", "k", "--version", "1", "--kid", "x"}, "--version and --kid: give at most one", "keybrokerctl req-cnf"},
		{[]string{"dpop", "k", "--url", "https://rs.example/"}, "--method: required", "keybrokerctl dpop"},
		{[]string{"dpop", "k", "--method", "GET"}, "--url: required", "keybrokerctl dpop"},
		{[]string{"dpop", "k", "--method", "GET", "--url", "u", "--access-token", "t", "--ath", "a"}, "--access-token and --ath: give at most one", "keybrokerctl dpop"},
		{[]string{"dpop", "k", "--method", "GET", "--url", "u", "--claims", `{"a":`}, "--claims: not a JSON object", "keybrokerctl dpop"},
		{[]string{"dpop", "k", "--method", "GET", "--url", "u", "--claims", `["a"]`}, "--claims: not a JSON object", "keybrokerctl dpop"},
		{[]string{"dpop", "k", "--method", "GET", "--url", "u", "--claims", "null"}, "--claims: not a JSON object: got null", "keybrokerctl dpop"},
		{[]string{"dpop", "k", "--method", "GET", "--url", "u", "--version", "1", "--kid", "x"}, "--version and --kid", "keybrokerctl dpop"},
		{[]string{"shr", "k", "--method", "GET", "--url", "u"}, "--access-token: required", "keybrokerctl shr"},
		{[]string{"shr", "k", "--access-token", "t", "--url", "u"}, "--method: required", "keybrokerctl shr"},
		{[]string{"shr", "k", "--access-token", "t", "--method", "GET"}, "--url: required", "keybrokerctl shr"},
		{[]string{"shr", "k", "--access-token", "t", "--method", "GET", "--url", "u", "--header", "NoColon"}, `--header: got "NoColon", want 'Name: value'`, "keybrokerctl shr"},
		{[]string{"shr", "k", "--access-token", "t", "--method", "GET", "--url", "u", "--header", "Bad Name: v"}, `--header: got "Bad Name: v"`, "keybrokerctl shr"},
		{[]string{"shr", "k", "--access-token", "t", "--method", "GET", "--url", "u", "--header", "A: 1", "--header", "a: 2"}, "--header: a given twice", "keybrokerctl shr"},
		// Flags are checked before the body file is read.
		{[]string{"shr", "k", "--access-token", "t", "--method", "GET", "--url", "u", "--header", ": v", "--body-file", "/nonexistent"}, `--header: got ": v"`, "keybrokerctl shr"},
		{[]string{"shr", "k", "--access-token", "t", "--method", "GET", "--url", "u", "--version", "1", "--kid", "x"}, "--version and --kid", "keybrokerctl shr"},
		{[]string{"jws", "k"}, "--payload-file: required", "keybrokerctl jws"},
		{[]string{"jws", "k", "--payload-file", "/nonexistent", "--header", `"typ"`}, "--header: not a JSON object", "keybrokerctl jws"},
		{[]string{"jws", "k", "--payload-file", "-", "--version", "1", "--kid", "x"}, "--version and --kid", "keybrokerctl jws"},
		{[]string{"csr", "k"}, "--cn: required, unless --dns or --uri is given", "keybrokerctl csr"},
		{[]string{"csr", "k", "--cn", "c", "--version", "1", "--kid", "x"}, "--version and --kid", "keybrokerctl csr"},
		{[]string{"cert", "k", "--out", "f"}, "--cn: required, unless --dns or --uri is given", "keybrokerctl cert"},
		{[]string{"cert", "k", "--cn", "c", "--validity", "90x"}, `invalid argument "90x" for "--validity" flag: want a positive duration`, "keybrokerctl cert"},
		{[]string{"cert", "k", "--cn", "c", "--validity", "0d"}, `invalid argument "0d" for "--validity" flag`, "keybrokerctl cert"},
		{[]string{"cert", "k", "--cn", "c", "--validity", "-1d"}, `invalid argument "-1d" for "--validity" flag`, "keybrokerctl cert"},
		{[]string{"cert", "k", "--cn", "c", "--kid", "x", "--version", "2"}, "--version and --kid", "keybrokerctl cert"},
		{[]string{"attest", "k", "--nonce", "xyz"}, "--nonce: not hex", "keybrokerctl attest"},
		{[]string{"attest", "k", "--nonce", "abc"}, "--nonce: not hex", "keybrokerctl attest"},
		{[]string{"attest", "k", "--nonce", ""}, "--nonce: got 0 bytes, want 1 to 64", "keybrokerctl attest"},
		{[]string{"attest", "k", "--nonce", strings.Repeat("00", 65)}, "--nonce: got 65 bytes, want 1 to 64", "keybrokerctl attest"},
		{[]string{"attest", "k", "--version", "1", "--kid", "x"}, "--version and --kid", "keybrokerctl attest"},
		{[]string{"health", "--output", "yaml"}, `--output: got "yaml", want text or json`, "keybrokerctl health"},
		{[]string{"jwks", "--timeout", "0s"}, "--timeout: got 0s, want more than 0", "keybrokerctl jwks"},
		{[]string{"jwks", "--timeout", "soon"}, `invalid argument "soon" for "--timeout"`, "keybrokerctl jwks"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(append([]string{"--socket", missing}, tt.args...), &stdout, &stderr)
			if code != exitUsage {
				t.Errorf("exit code = %d, want %d; stderr:\n%s", code, exitUsage, stderr.String())
			}
			lines := strings.Split(stderr.String(), "\n")
			if len(lines) != 3 || !strings.HasPrefix(lines[0], "keybrokerctl: ") || !strings.Contains(lines[0], tt.wantErr) {
				t.Errorf("stderr = %q, want \"keybrokerctl: ...%s...\" and a hint", stderr.String(), tt.wantErr)
			}
			if want := "Run '" + tt.wantCmd + " --help' for usage."; len(lines) > 1 && lines[1] != want {
				t.Errorf("hint = %q, want %q", lines[1], want)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout = %q, want nothing", stdout.String())
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{nil, {"--help"}, {"help"}} {
		var stdout, stderr bytes.Buffer
		if code := run(args, &stdout, &stderr); code != exitOK {
			t.Errorf("run(%q) = %d, want %d; stderr:\n%s", args, code, exitOK, stderr.String())
		}
		for _, want := range []string{"Exit codes:", "2  usage error", "5  conflict: ALREADY_EXISTS or FAILED_PRECONDITION", "--socket path"} {
			if !strings.Contains(stdout.String(), want) {
				t.Errorf("run(%q) printed no %q:\n%s", args, want, stdout.String())
			}
		}
	}
}
