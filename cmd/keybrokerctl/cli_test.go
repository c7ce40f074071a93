package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

var (
	created1 = timestamppb.New(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	created2 = timestamppb.New(time.Date(2026, 2, 3, 4, 5, 6, 0, time.UTC))
)

// fakeBroker is an in-memory KeyBrokerServer holding a few keys. It
// signs with a fixed signature, knows one public key, and records the
// requests the tests check.
type fakeBroker struct {
	kbv1.UnimplementedKeyBrokerServer
	pub *kbv1.GetPublicKeyResponse

	mu         sync.Mutex
	keys       map[string]*kbv1.Key
	stuckToken string // if set, ListKeys always returns it as next_page_token
	pageTokens []string
	created    *kbv1.CreateKeyRequest
	signed     *kbv1.SignRequest
	pubReq     *kbv1.GetPublicKeyRequest
	deadline   time.Time // of the last GetJWKS call
}

func newFakeBroker(t testing.TB) *fakeBroker {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	return &fakeBroker{
		pub: &kbv1.GetPublicKeyResponse{
			Kid:        "kid-a2",
			Version:    2,
			Algorithm:  kbv1.Algorithm_ALGORITHM_ES256,
			Pem:        string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})),
			Der:        der,
			Jwk:        `{"kty":"EC","kid":"kid-a2","use":"sig"}`,
			Thumbprint: "kid-a2",
		},
		keys: map[string]*kbv1.Key{
			"alpha": {
				Name: "alpha", Algorithm: kbv1.Algorithm_ALGORITHM_ES256, Backend: "pkcs11", CreateTime: created1,
				ActiveVersion: 2, ActiveKid: "kid-a2",
				Versions: []*kbv1.KeyVersion{
					{Version: 1, Kid: "kid-a1", State: kbv1.KeyState_KEY_STATE_RETIRED, CreateTime: created1},
					{Version: 2, Kid: "kid-a2", State: kbv1.KeyState_KEY_STATE_ACTIVE, CreateTime: created2},
				},
			},
			"beta":  {Name: "beta", Algorithm: kbv1.Algorithm_ALGORITHM_RS256, Bits: 3072, Backend: "tpm", ActiveVersion: 1, ActiveKid: "kid-b1"},
			"gamma": {Name: "gamma", Algorithm: kbv1.Algorithm_ALGORITHM_PS256, Bits: 2048, Backend: "pkcs11", ActiveVersion: 1, ActiveKid: "kid-g1"},
		},
	}
}

// locked returns *field, read under f's lock: handlers run on server
// goroutines.
func locked[T any](f *fakeBroker, field *T) T {
	f.mu.Lock()
	defer f.mu.Unlock()
	return *field
}

// setLocked sets *field to v under f's lock.
func setLocked[T any](f *fakeBroker, field *T, v T) {
	f.mu.Lock()
	defer f.mu.Unlock()
	*field = v
}

func (f *fakeBroker) CreateKey(_ context.Context, req *kbv1.CreateKeyRequest) (*kbv1.CreateKeyResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.created = req
	if _, ok := f.keys[req.GetName()]; ok {
		return nil, status.Error(codes.AlreadyExists, "key already exists")
	}
	k := &kbv1.Key{
		Name: req.GetName(), Algorithm: req.GetAlgorithm(), Bits: req.GetBits(), Backend: "pkcs11", CreateTime: created1,
		ActiveVersion: 1, ActiveKid: "kid-new",
		Versions: []*kbv1.KeyVersion{{Version: 1, Kid: "kid-new", State: kbv1.KeyState_KEY_STATE_ACTIVE, CreateTime: created1}},
	}
	f.keys[k.Name] = k
	return &kbv1.CreateKeyResponse{Key: k}, nil
}

func (f *fakeBroker) GetKey(_ context.Context, req *kbv1.GetKeyRequest) (*kbv1.GetKeyResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k, ok := f.keys[req.GetName()]
	if !ok {
		return nil, status.Error(codes.NotFound, "key not found")
	}
	return &kbv1.GetKeyResponse{Key: k}, nil
}

// ListKeys returns pages of two keys; a page token names the first key of
// its page.
func (f *fakeBroker) ListKeys(_ context.Context, req *kbv1.ListKeysRequest) (*kbv1.ListKeysResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pageTokens = append(f.pageTokens, req.GetPageToken())
	names := slices.Sorted(func(yield func(string) bool) {
		for name := range f.keys {
			if name >= req.GetPageToken() && !yield(name) {
				return
			}
		}
	})
	resp := &kbv1.ListKeysResponse{}
	for i, name := range names {
		if i == 2 {
			resp.NextPageToken = name
			break
		}
		resp.Keys = append(resp.Keys, f.keys[name])
	}
	if f.stuckToken != "" {
		resp.NextPageToken = f.stuckToken
	}
	return resp, nil
}

func (f *fakeBroker) Sign(ctx context.Context, req *kbv1.SignRequest) (*kbv1.SignResponse, error) {
	f.mu.Lock()
	f.signed = req
	k, ok := f.keys[req.GetName()]
	f.mu.Unlock()
	switch {
	case req.GetName() == "slow":
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	case !ok:
		return nil, status.Error(codes.NotFound, "key not found")
	case req.GetKid() == "revoked":
		return nil, status.Error(codes.FailedPrecondition, "key version is revoked")
	case len(req.GetDigest()) != 32:
		return nil, status.Errorf(codes.InvalidArgument, "digest length: got %d, want 32", len(req.GetDigest()))
	}
	version, kid := k.GetActiveVersion(), k.GetActiveKid()
	if req.GetKid() != "" {
		version, kid = 1, req.GetKid()
	}
	// 0xfb 0xff is "+/8=" in standard base64 and "-_8" in base64url.
	return &kbv1.SignResponse{Signature: []byte{0xfb, 0xff}, Kid: kid, Version: version, Algorithm: k.GetAlgorithm()}, nil
}

func (f *fakeBroker) GetPublicKey(_ context.Context, req *kbv1.GetPublicKeyRequest) (*kbv1.GetPublicKeyResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pubReq = req
	if req.GetName() != "alpha" {
		return nil, status.Error(codes.NotFound, "key not found")
	}
	return f.pub, nil
}

func (f *fakeBroker) GetJWKS(ctx context.Context, _ *kbv1.GetJWKSRequest) (*kbv1.GetJWKSResponse, error) {
	deadline, _ := ctx.Deadline()
	setLocked(f, &f.deadline, deadline)
	return &kbv1.GetJWKSResponse{Jwks: `{"keys":[{"kid":"kid-a2"}]}`}, nil
}

// startFake serves fake and a health service (SERVING) on a unix socket
// and returns the socket's path and the health server. Cleanup stops the
// server and removes the socket.
func startFake(t testing.TB, fake *fakeBroker) (string, *health.Server) {
	t.Helper()
	// Not t.TempDir(): its path embeds the test name and can exceed the
	// 107 bytes a unix socket path may have.
	dir, err := os.MkdirTemp("", "kbctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "kb.sock")
	lis, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	kbv1.RegisterKeyBrokerServer(srv, fake)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Stop()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return socket, hs
}

type result struct {
	stdout, stderr string
	code           int
}

// runAt runs keybrokerctl with --socket socket and args.
func runAt(socket string, args ...string) result {
	var stdout, stderr bytes.Buffer
	code := run(append([]string{"--socket", socket}, args...), &stdout, &stderr)
	return result{stdout.String(), stderr.String(), code}
}

// check fails t unless r is what the test wants.
func (r result) check(t testing.TB, wantCode int, wantStdout, wantStderr string) {
	t.Helper()
	if r.code != wantCode {
		t.Errorf("exit code = %d, want %d; stderr: %q", r.code, wantCode, r.stderr)
	}
	if r.stdout != wantStdout {
		t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, wantStdout)
	}
	if r.stderr != wantStderr {
		t.Errorf("stderr = %q, want %q", r.stderr, wantStderr)
	}
}

// unmarshalLine fails t unless stdout is one line of protojson for m.
func unmarshalLine(t testing.TB, stdout string, m proto.Message) {
	t.Helper()
	if strings.Count(stdout, "\n") != 1 || !strings.HasSuffix(stdout, "\n") {
		t.Fatalf("stdout = %q, want one line", stdout)
	}
	if err := protojson.Unmarshal([]byte(stdout), m); err != nil {
		t.Fatalf("stdout %q: %v", stdout, err)
	}
}

func TestHealthCommand(t *testing.T) {
	socket, hs := startFake(t, newFakeBroker(t))
	runAt(socket, "health").check(t, exitOK, "SERVING\n", "")
	runAt(socket, "health", "-o", "json").check(t, exitOK, `{"status":"SERVING"}`+"\n", "")

	t.Setenv("KEYBROKER_SOCKET", socket)
	var stdout, stderr bytes.Buffer
	code := run([]string{"health"}, &stdout, &stderr)
	result{stdout.String(), stderr.String(), code}.check(t, exitOK, "SERVING\n", "")

	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	runAt(socket, "health").check(t, exitUnavailable, "NOT_SERVING\n", "keybrokerctl: keybrokerd is NOT_SERVING\n")
}

func TestKeysCommands(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)

	t.Run("get", func(t *testing.T) {
		runAt(socket, "keys", "get", "alpha").check(t, exitOK, `name:            alpha
algorithm:       ES256
backend:         pkcs11
created:         2026-01-02T03:04:05Z
active version:  2
active kid:      kid-a2
versions:
  VERSION  STATE    KID     CREATED
  1        RETIRED  kid-a1  2026-01-02T03:04:05Z
  2        ACTIVE   kid-a2  2026-02-03T04:05:06Z
`, "")
	})
	t.Run("get json", func(t *testing.T) {
		r := runAt(socket, "keys", "get", "alpha", "--output", "json")
		r.check(t, exitOK, r.stdout, "")
		var got kbv1.GetKeyResponse
		unmarshalLine(t, r.stdout, &got)
		if want := fake.keys["alpha"]; !proto.Equal(got.GetKey(), want) {
			t.Errorf("key = %v, want %v", got.GetKey(), want)
		}
	})
	t.Run("get missing", func(t *testing.T) {
		runAt(socket, "keys", "get", "nope").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
	})
	t.Run("list", func(t *testing.T) {
		setLocked(fake, &fake.pageTokens, nil)
		runAt(socket, "keys", "list").check(t, exitOK, `NAME   ALGORITHM  BITS  ACTIVE  KID     BACKEND
alpha  ES256      -     2       kid-a2  pkcs11
beta   RS256      3072  1       kid-b1  tpm
gamma  PS256      2048  1       kid-g1  pkcs11
`, "")
		if want := []string{"", "gamma"}; !slices.Equal(locked(fake, &fake.pageTokens), want) {
			t.Errorf("page tokens = %q, want %q", locked(fake, &fake.pageTokens), want)
		}
	})
	t.Run("list json", func(t *testing.T) {
		r := runAt(socket, "keys", "list", "-o", "json")
		r.check(t, exitOK, r.stdout, "")
		var got kbv1.ListKeysResponse
		unmarshalLine(t, r.stdout, &got)
		var names []string
		for _, k := range got.GetKeys() {
			names = append(names, k.GetName())
		}
		if want := []string{"alpha", "beta", "gamma"}; !slices.Equal(names, want) {
			t.Errorf("names = %q, want %q", names, want)
		}
		// Empty fields are printed, so that scripts need no null checks.
		if !strings.Contains(r.stdout, `"name":"beta","algorithm":"ALGORITHM_RS256","bits":3072,"backend":"tpm","createTime":null,"activeVersion":1,"activeKid":"kid-b1","versions":[]`) {
			t.Errorf("stdout = %s, want beta with every field", r.stdout)
		}
	})
	t.Run("list stuck page token", func(t *testing.T) {
		setLocked(fake, &fake.stuckToken, "alpha")
		defer setLocked(fake, &fake.stuckToken, "")
		runAt(socket, "keys", "list").check(t, exitFailure, "", "keybrokerctl: keybrokerd returned page token \"alpha\" twice\n")
	})
	t.Run("create", func(t *testing.T) {
		r := runAt(socket, "keys", "create", "delta", "--alg", "rs256", "--bits", "4096")
		r.check(t, exitOK, r.stdout, "")
		want := &kbv1.CreateKeyRequest{Name: "delta", Algorithm: kbv1.Algorithm_ALGORITHM_RS256, Bits: 4096}
		if got := locked(fake, &fake.created); !proto.Equal(got, want) {
			t.Errorf("request = %v, want %v", got, want)
		}
		if !strings.HasPrefix(r.stdout, "name:            delta\nalgorithm:       RS256\nbits:            4096\n") {
			t.Errorf("stdout:\n%s", r.stdout)
		}
	})
	t.Run("create default alg json", func(t *testing.T) {
		r := runAt(socket, "keys", "create", "epsilon", "-o", "json")
		r.check(t, exitOK, r.stdout, "")
		var got kbv1.CreateKeyResponse
		unmarshalLine(t, r.stdout, &got)
		if got.GetKey().GetName() != "epsilon" || got.GetKey().GetAlgorithm() != kbv1.Algorithm_ALGORITHM_ES256 {
			t.Errorf("key = %v, want epsilon ES256", got.GetKey())
		}
	})
	t.Run("create existing", func(t *testing.T) {
		runAt(socket, "keys", "create", "alpha").check(t, exitConflict, "", "keybrokerctl: key already exists\n")
	})
}

func TestSignCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)

	t.Run("text", func(t *testing.T) {
		runAt(socket, "sign", "alpha", "--digest", digest32, "--hash", "SHA256", "--format", "jose", "--kid", "kid-a1").
			check(t, exitOK, "signature:  -_8\nkid:        kid-a1\nversion:    1\nalgorithm:  ES256\n", "")
		digest, _ := parseDigest(digest32, 0)
		want := &kbv1.SignRequest{Name: "alpha", Kid: "kid-a1", Digest: digest,
			Hash: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA256, Format: kbv1.SignatureFormat_SIGNATURE_FORMAT_JOSE}
		if got := locked(fake, &fake.signed); !proto.Equal(got, want) {
			t.Errorf("request = %v, want %v", got, want)
		}
	})
	t.Run("json", func(t *testing.T) {
		runAt(socket, "sign", "beta", "--digest", digest32, "--padding", "pss", "--version", "1", "-o", "json").
			check(t, exitOK, `{"signature":"-_8","kid":"kid-b1","version":1,"algorithm":"RS256"}`+"\n", "")
		if got := locked(fake, &fake.signed); got.GetVersion() != 1 || got.GetPadding() != kbv1.RSAPadding_RSA_PADDING_PSS {
			t.Errorf("request = %v, want version 1 and PSS", got)
		}
	})
	t.Run("not found", func(t *testing.T) {
		runAt(socket, "sign", "nope", "--digest", digest32).check(t, exitNotFound, "", "keybrokerctl: key not found\n")
	})
	t.Run("failed precondition", func(t *testing.T) {
		runAt(socket, "sign", "alpha", "--digest", digest32, "--kid", "revoked").
			check(t, exitConflict, "", "keybrokerctl: key version is revoked\n")
	})
	t.Run("invalid argument from daemon", func(t *testing.T) {
		runAt(socket, "sign", "alpha", "--digest", digest32[2:]).
			check(t, exitUsage, "", "keybrokerctl: digest length: got 31, want 32\n")
	})
	t.Run("timeout", func(t *testing.T) {
		runAt(socket, "--timeout", "50ms", "sign", "slow", "--digest", digest32).
			check(t, exitUnavailable, "", "keybrokerctl: no answer from keybrokerd within --timeout 50ms\n")
	})
}

func TestPubkeyCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)

	runAt(socket, "pubkey", "alpha").check(t, exitOK, fake.pub.GetPem(), "")
	runAt(socket, "pubkey", "alpha", "--format", "jwk", "--version", "2").
		check(t, exitOK, "{\n  \"kty\": \"EC\",\n  \"kid\": \"kid-a2\",\n  \"use\": \"sig\"\n}\n", "")
	if want := (&kbv1.GetPublicKeyRequest{Name: "alpha", Version: 2}); !proto.Equal(locked(fake, &fake.pubReq), want) {
		t.Errorf("request = %v, want %v", locked(fake, &fake.pubReq), want)
	}

	r := runAt(socket, "pubkey", "alpha", "--format", "DER", "--kid", "kid-a2")
	r.check(t, exitOK, base64.StdEncoding.EncodeToString(fake.pub.GetDer())+"\n", "")
	if want := (&kbv1.GetPublicKeyRequest{Name: "alpha", Kid: "kid-a2"}); !proto.Equal(locked(fake, &fake.pubReq), want) {
		t.Errorf("request = %v, want %v", locked(fake, &fake.pubReq), want)
	}

	r = runAt(socket, "pubkey", "alpha", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	var got kbv1.GetPublicKeyResponse
	unmarshalLine(t, r.stdout, &got)
	if !proto.Equal(&got, fake.pub) {
		t.Errorf("response = %v, want %v", &got, fake.pub)
	}

	runAt(socket, "pubkey", "nope").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

func TestJWKSCommand(t *testing.T) {
	fake := newFakeBroker(t)
	socket, _ := startFake(t, fake)
	runAt(socket, "jwks").check(t, exitOK, "{\n  \"keys\": [\n    {\n      \"kid\": \"kid-a2\"\n    }\n  ]\n}\n", "")
	runAt(socket, "jwks", "-o", "json").check(t, exitOK, `{"keys":[{"kid":"kid-a2"}]}`+"\n", "")

	// --timeout becomes the deadline the daemon sees.
	before := time.Now()
	runAt(socket, "jwks", "--timeout", "1h").check(t, exitOK, "{\n  \"keys\": [\n    {\n      \"kid\": \"kid-a2\"\n    }\n  ]\n}\n", "")
	after := time.Now()
	if got := locked(fake, &fake.deadline); got.Before(before.Add(59*time.Minute)) || got.After(after.Add(61*time.Minute)) {
		t.Errorf("deadline = %v, want about an hour after %v", got, before)
	}
}

func TestUnavailable(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	runAt(missing, "health").
		check(t, exitUnavailable, "", "keybrokerctl: socket "+missing+" does not exist (is keybrokerd running?)\n")

	// A file that is not a listening socket: the connection is refused.
	notListening := filepath.Join(dir, "stale.sock")
	if err := os.WriteFile(notListening, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r := runAt(notListening, "keys", "list")
	if r.code != exitUnavailable || r.stdout != "" {
		t.Errorf("exit code = %d, stdout = %q; want %d and nothing", r.code, r.stdout, exitUnavailable)
	}
	if !strings.HasPrefix(r.stderr, "keybrokerctl: ") || strings.Contains(r.stderr, "rpc error") {
		t.Errorf("stderr = %q, want keybrokerctl: and the status message only", r.stderr)
	}
}
