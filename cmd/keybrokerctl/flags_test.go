package main

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

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
		{[]string{"sign", "k"}, "--digest: required", "keybrokerctl sign"},
		{[]string{"sign", "k", "--digest", "xyz"}, "--digest: not hex", "keybrokerctl sign"},
		{[]string{"sign", "k", "--digest", "00", "--hash", "sha256"}, "--digest: got 1 bytes, want 32 for sha256", "keybrokerctl sign"},
		{[]string{"sign", "k", "--digest", digest32, "--version", "1", "--kid", "x"}, "--version and --kid", "keybrokerctl sign"},
		{[]string{"sign", "k", "--digest", digest32, "--version", "-1"}, `invalid argument "-1" for "--version"`, "keybrokerctl sign"},
		{[]string{"pubkey", "k", "--format", "ssh"}, `--format: got "ssh"`, "keybrokerctl pubkey"},
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
