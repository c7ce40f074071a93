package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
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
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

var (
	created1 = timestamppb.New(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	created2 = timestamppb.New(time.Date(2026, 2, 3, 4, 5, 6, 0, time.UTC))
	// alpha's v2 retires and v1 expires 90 days after created2.
	rotation2 = timestamppb.New(time.Date(2026, 5, 4, 4, 5, 6, 0, time.UTC))
)

// day returns midnight UTC of day d of month m of 2026.
func day(m time.Month, d int) *timestamppb.Timestamp {
	return timestamppb.New(time.Date(2026, m, d, 0, 0, 0, 0, time.UTC))
}

// days returns n days as a proto Duration.
func days(n int) *durationpb.Duration { return durationpb.New(time.Duration(n) * 24 * time.Hour) }

// Kids of the key "rot": RFC 7638 thumbprints are 43 characters.
const (
	rotKid1 = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
	rotKid2 = "0fSWeGgFMVWNqAhd2HqpL3BBx7NDNH4x1B8V4cJ1CaE"
	rotKid3 = "k2Qy-6xXdTG4B6RbKFaqPnkJWX8M0xS0gNsh3VFUzC4"
)

// rotKey is a key with a 30d/10d/5d/7d policy: v1 was destroyed, v2 was
// revoked on March 25 while ACTIVE and replaced by v3, which rotates on
// March 27.
func rotKey() *kbv1.Key {
	return &kbv1.Key{
		Name: "rot", Algorithm: kbv1.Algorithm_ALGORITHM_ES256, Backend: "pkcs11", CreateTime: day(1, 1),
		ActiveVersion: 3, ActiveKid: rotKid3,
		Policy:           &kbv1.RotationPolicy{RotationPeriod: days(30), Overlap: days(10), PrePublicationLead: days(5), DestroyDelay: days(7)},
		NextRotationTime: day(3, 27),
		Versions: []*kbv1.KeyVersion{
			{Version: 1, Kid: rotKid1, State: kbv1.KeyState_KEY_STATE_DESTROYED, CreateTime: day(1, 1),
				ActivateTime: day(1, 1), RetireTime: day(1, 31), ExpireTime: day(2, 10), DestroyTime: day(2, 17)},
			{Version: 2, Kid: rotKid2, State: kbv1.KeyState_KEY_STATE_REVOKED, CreateTime: day(1, 26),
				ActivateTime: day(1, 31), RevokeTime: day(2, 25),
				NextState: kbv1.KeyState_KEY_STATE_DESTROYED, NextTransitionTime: day(3, 4)},
			{Version: 3, Kid: rotKid3, State: kbv1.KeyState_KEY_STATE_ACTIVE, CreateTime: day(2, 25), ActivateTime: day(2, 25),
				NextState: kbv1.KeyState_KEY_STATE_RETIRED, NextTransitionTime: day(3, 27)},
		},
	}
}

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
	rotated    *kbv1.RotateKeyRequest
	revoked    *kbv1.RevokeKeyVersionRequest
	updated    *kbv1.UpdatePolicyRequest
	deadline   time.Time // of the last GetJWKS call

	// The last request of each proof-of-possession RPC.
	confReq   *kbv1.GetConfirmationRequest
	jwsReq    *kbv1.SignJWSRequest
	dpopReq   *kbv1.CreateDPoPProofRequest
	shrReq    *kbv1.CreateSignedHttpRequestRequest
	csrReq    *kbv1.CreateCertificateRequestRequest
	certReq   *kbv1.CreateSelfSignedCertificateRequest
	attestReq *kbv1.AttestKeyRequest
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
				Policy:           &kbv1.RotationPolicy{RotationPeriod: days(90), Overlap: days(90), PrePublicationLead: days(7), DestroyDelay: durationpb.New(36 * time.Hour)},
				NextRotationTime: rotation2,
				Versions: []*kbv1.KeyVersion{
					{Version: 1, Kid: "kid-a1", State: kbv1.KeyState_KEY_STATE_RETIRED, CreateTime: created1, ActivateTime: created1, RetireTime: created2,
						NextState: kbv1.KeyState_KEY_STATE_EXPIRED, NextTransitionTime: rotation2},
					{Version: 2, Kid: "kid-a2", State: kbv1.KeyState_KEY_STATE_ACTIVE, CreateTime: created2, ActivateTime: created2,
						NextState: kbv1.KeyState_KEY_STATE_RETIRED, NextTransitionTime: rotation2},
				},
			},
			"beta":  {Name: "beta", Algorithm: kbv1.Algorithm_ALGORITHM_RS256, Bits: 3072, Backend: "tpm", ActiveVersion: 1, ActiveKid: "kid-b1"},
			"gamma": {Name: "gamma", Algorithm: kbv1.Algorithm_ALGORITHM_PS256, Bits: 2048, Backend: "pkcs11", ActiveVersion: 1, ActiveKid: "kid-g1"},
		},
	}
}

// key returns a copy of the key name.
func (f *fakeBroker) key(name string) *kbv1.Key {
	f.mu.Lock()
	defer f.mu.Unlock()
	return proto.CloneOf(f.keys[name])
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
		ActiveVersion: 1, ActiveKid: "kid-new", Policy: req.GetPolicy(),
		Versions: []*kbv1.KeyVersion{{Version: 1, Kid: "kid-new", State: kbv1.KeyState_KEY_STATE_ACTIVE, CreateTime: created1}},
	}
	f.keys[k.Name] = k
	return &kbv1.CreateKeyResponse{Key: k}, nil
}

// RotateKey retires the ACTIVE version and adds version n+1 as ACTIVE, with
// kid "kid-NAME-n+1".
func (f *fakeBroker) RotateKey(_ context.Context, req *kbv1.RotateKeyRequest) (*kbv1.RotateKeyResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rotated = req
	k, ok := f.keys[req.GetName()]
	if !ok {
		return nil, status.Error(codes.NotFound, "key not found")
	}
	if v := req.GetIfActiveVersion(); v != 0 && v != k.GetActiveVersion() {
		return &kbv1.RotateKeyResponse{Key: proto.CloneOf(k), Rotated: false}, nil
	}
	for _, v := range k.GetVersions() {
		if v.GetState() == kbv1.KeyState_KEY_STATE_ACTIVE {
			v.State = kbv1.KeyState_KEY_STATE_RETIRED
		}
	}
	n := uint32(len(k.GetVersions())) + 1
	k.ActiveVersion, k.ActiveKid = n, fmt.Sprintf("kid-%s-%d", k.GetName(), n)
	k.Versions = append(k.Versions, &kbv1.KeyVersion{Version: n, Kid: k.ActiveKid, State: kbv1.KeyState_KEY_STATE_ACTIVE})
	return &kbv1.RotateKeyResponse{Key: proto.CloneOf(k), Rotated: true}, nil
}

// RevokeKeyVersion revokes a version that is not ACTIVE.
func (f *fakeBroker) RevokeKeyVersion(_ context.Context, req *kbv1.RevokeKeyVersionRequest) (*kbv1.RevokeKeyVersionResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.revoked = req
	k, ok := f.keys[req.GetName()]
	if !ok {
		return nil, status.Error(codes.NotFound, "key not found")
	}
	for _, v := range k.GetVersions() {
		if v.GetVersion() != req.GetVersion() && v.GetKid() != req.GetKid() {
			continue
		}
		switch v.GetState() {
		case kbv1.KeyState_KEY_STATE_DESTROYED:
			return nil, status.Errorf(codes.FailedPrecondition, "version %d is destroyed", v.GetVersion())
		case kbv1.KeyState_KEY_STATE_ACTIVE:
			return nil, status.Error(codes.Unimplemented, "the fake cannot revoke the ACTIVE version")
		}
		v.State, v.RevokeTime = kbv1.KeyState_KEY_STATE_REVOKED, day(3, 1)
		v.NextState, v.NextTransitionTime = kbv1.KeyState_KEY_STATE_DESTROYED, day(3, 8)
		return &kbv1.RevokeKeyVersionResponse{Key: proto.CloneOf(k)}, nil
	}
	return nil, status.Error(codes.NotFound, "key version not found")
}

// UpdatePolicy overlays the durations set on the key's policy. Rotation
// periods under an hour are invalid.
func (f *fakeBroker) UpdatePolicy(_ context.Context, req *kbv1.UpdatePolicyRequest) (*kbv1.UpdatePolicyResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.updated = req
	p := req.GetPolicy()
	if p == nil {
		return nil, status.Error(codes.InvalidArgument, "policy: must be set")
	}
	if d := p.GetRotationPeriod(); d != nil && d.AsDuration() < time.Hour {
		return nil, status.Errorf(codes.InvalidArgument, "policy.rotation_period: got %s, want at least 1h", d.AsDuration())
	}
	k, ok := f.keys[req.GetName()]
	if !ok {
		return nil, status.Error(codes.NotFound, "key not found")
	}
	if k.Policy == nil {
		k.Policy = &kbv1.RotationPolicy{}
	}
	for _, d := range []struct{ src, dst **durationpb.Duration }{
		{&p.RotationPeriod, &k.Policy.RotationPeriod},
		{&p.Overlap, &k.Policy.Overlap},
		{&p.PrePublicationLead, &k.Policy.PrePublicationLead},
		{&p.DestroyDelay, &k.Policy.DestroyDelay},
	} {
		if *d.src != nil {
			*d.dst = *d.src
		}
	}
	return &kbv1.UpdatePolicyResponse{Key: proto.CloneOf(k)}, nil
}

func (f *fakeBroker) GetKey(_ context.Context, req *kbv1.GetKeyRequest) (*kbv1.GetKeyResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k, ok := f.keys[req.GetName()]
	if !ok {
		return nil, status.Error(codes.NotFound, "key not found")
	}
	return &kbv1.GetKeyResponse{Key: proto.CloneOf(k)}, nil
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

// version returns the version and kid of key name that a PoP request
// names: version or kid, else the active one.
func (f *fakeBroker) version(name string, version uint32, kid string) (uint32, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k, ok := f.keys[name]
	if !ok {
		return 0, "", status.Error(codes.NotFound, "key not found")
	}
	if version == 0 && kid == "" || version == k.GetActiveVersion() || kid == k.GetActiveKid() {
		return k.GetActiveVersion(), k.GetActiveKid(), nil
	}
	for _, v := range k.GetVersions() {
		if v.GetVersion() == version || v.GetKid() == kid {
			return v.GetVersion(), v.GetKid(), nil
		}
	}
	return 0, "", status.Error(codes.NotFound, "key version not found")
}

// record stores req in *field under f's lock and returns the version and
// kid it names.
func record[T interface {
	GetName() string
	GetVersion() uint32
	GetKid() string
}](f *fakeBroker, field *T, req T) (uint32, string, error) {
	setLocked(f, field, req)
	return f.version(req.GetName(), req.GetVersion(), req.GetKid())
}

// confirmation is the fake's GetConfirmationResponse for a version.
func confirmation(version uint32, kid string) *kbv1.GetConfirmationResponse {
	return &kbv1.GetConfirmationResponse{
		Kid: kid, Version: version, Thumbprint: kid, Jkt: kid,
		ThumbprintUri: "urn:ietf:params:oauth:jwk-thumbprint:sha-256:" + kid,
		ReqCnfJwk:     "cnf-jwk-" + kid, ReqCnfKid: "cnf-kid-" + kid,
		Jwk: `{"kty":"EC","kid":"` + kid + `"}`,
	}
}

func (f *fakeBroker) GetConfirmation(_ context.Context, req *kbv1.GetConfirmationRequest) (*kbv1.GetConfirmationResponse, error) {
	version, kid, err := record(f, &f.confReq, req)
	if err != nil {
		return nil, err
	}
	return confirmation(version, kid), nil
}

// SignJWS returns "header.payload.signature", the payload in base64url.
func (f *fakeBroker) SignJWS(_ context.Context, req *kbv1.SignJWSRequest) (*kbv1.SignJWSResponse, error) {
	version, kid, err := record(f, &f.jwsReq, req)
	if err != nil {
		return nil, err
	}
	jws := "hdr-" + kid + "." + base64.RawURLEncoding.EncodeToString(req.GetPayload()) + ".sig"
	return &kbv1.SignJWSResponse{Jws: jws, Kid: kid, Version: version}, nil
}

func (f *fakeBroker) CreateDPoPProof(_ context.Context, req *kbv1.CreateDPoPProofRequest) (*kbv1.CreateDPoPProofResponse, error) {
	version, kid, err := record(f, &f.dpopReq, req)
	if err != nil {
		return nil, err
	}
	return &kbv1.CreateDPoPProofResponse{Proof: "dpop." + req.GetHtm() + "." + kid, Kid: kid, Version: version, Jkt: "jkt-" + kid}, nil
}

func (f *fakeBroker) CreateSignedHttpRequest(_ context.Context, req *kbv1.CreateSignedHttpRequestRequest) (*kbv1.CreateSignedHttpRequestResponse, error) {
	version, kid, err := record(f, &f.shrReq, req)
	if err != nil {
		return nil, err
	}
	return &kbv1.CreateSignedHttpRequestResponse{Shr: "shr." + req.GetMethod() + "." + kid, Kid: kid, Version: version}, nil
}

// fakePEM returns der as a PEM block of type typ.
func fakePEM(typ string, der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
}

// CreateCertificateRequest returns the kid's bytes as the "DER".
func (f *fakeBroker) CreateCertificateRequest(_ context.Context, req *kbv1.CreateCertificateRequestRequest) (*kbv1.CreateCertificateRequestResponse, error) {
	version, kid, err := record(f, &f.csrReq, req)
	if err != nil {
		return nil, err
	}
	der := []byte("csr-" + kid)
	return &kbv1.CreateCertificateRequestResponse{CsrDer: der, CsrPem: fakePEM("CERTIFICATE REQUEST", der), Kid: kid, Version: version}, nil
}

// CreateSelfSignedCertificate returns the kid's bytes as the "DER". A
// validity over 825 days is invalid.
func (f *fakeBroker) CreateSelfSignedCertificate(_ context.Context, req *kbv1.CreateSelfSignedCertificateRequest) (*kbv1.CreateSelfSignedCertificateResponse, error) {
	version, kid, err := record(f, &f.certReq, req)
	if err != nil {
		return nil, err
	}
	if v := req.GetValidity(); v != nil && v.AsDuration() > 825*24*time.Hour {
		return nil, status.Error(codes.InvalidArgument, "validity: want more than 0 and at most 825 days")
	}
	der := []byte("cert-" + kid)
	return &kbv1.CreateSelfSignedCertificateResponse{
		CertificateDer: der, CertificatePem: fakePEM("CERTIFICATE", der), X5TS256: "x5t-" + kid, Kid: kid, Version: version,
	}, nil
}

// AttestKey attests TPM keys only: beta is the fake's one.
func (f *fakeBroker) AttestKey(_ context.Context, req *kbv1.AttestKeyRequest) (*kbv1.AttestKeyResponse, error) {
	version, kid, err := record(f, &f.attestReq, req)
	if err != nil {
		return nil, err
	}
	if f.key(req.GetName()).GetBackend() != "tpm" {
		return nil, status.Error(codes.FailedPrecondition, "key is not in a TPM")
	}
	// 0xfb 0xff is "+/8=" in standard base64.
	return &kbv1.AttestKeyResponse{
		Attest: append([]byte("attest-"), req.GetNonce()...), Signature: []byte{0xfb, 0xff},
		CertifyingKeyPublic: []byte("ak"), KeyPublic: []byte("key-" + kid), Kid: kid, Version: version,
	}, nil
}

// startFake serves fake and a health service (SERVING) on a unix socket
// and returns the socket's path and the health server. Cleanup stops the
// server and removes the socket.
func startFake(t testing.TB, fake kbv1.KeyBrokerServer) (string, *health.Server) {
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

// runAtIn is runAt with stdin as standard input.
func runAtIn(socket, stdin string, args ...string) result {
	var stdout, stderr bytes.Buffer
	code := runIn(append([]string{"--socket", socket}, args...), strings.NewReader(stdin), &stdout, &stderr)
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
		runAt(socket, "keys", "get", "alpha").check(t, exitOK, `name:             alpha
algorithm:        ES256
backend:          pkcs11
created:          2026-01-02T03:04:05Z
active version:   2
active kid:       kid-a2
rotation period:  90d
overlap:          90d
lead:             7d
destroy delay:    36h0m0s
next rotation:    2026-05-04T04:05:06Z
versions:
  VERSION  STATE    KID     CREATED               NEXT     AT
  1        RETIRED  kid-a1  2026-01-02T03:04:05Z  EXPIRED  2026-05-04T04:05:06Z
  2        ACTIVE   kid-a2  2026-02-03T04:05:06Z  RETIRED  2026-05-04T04:05:06Z
`, "")
	})
	t.Run("get without policy", func(t *testing.T) {
		runAt(socket, "keys", "get", "beta").check(t, exitOK, `name:             beta
algorithm:        RS256
bits:             3072
backend:          tpm
created:          -
active version:   1
active kid:       kid-b1
rotation period:  -
overlap:          -
lead:             -
destroy delay:    -
next rotation:    -
versions:
  VERSION  STATE  KID  CREATED  NEXT  AT
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
		if !strings.HasPrefix(r.stdout, "name:             delta\nalgorithm:        RS256\nbits:             4096\n") {
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
	t.Run("create with policy", func(t *testing.T) {
		r := runAt(socket, "keys", "create", "zeta", "--rotation-period", "1d12h", "--destroy-delay=45d")
		r.check(t, exitOK, r.stdout, "")
		want := &kbv1.CreateKeyRequest{Name: "zeta", Algorithm: kbv1.Algorithm_ALGORITHM_ES256,
			Policy: &kbv1.RotationPolicy{RotationPeriod: durationpb.New(36 * time.Hour), DestroyDelay: days(45)}}
		if got := locked(fake, &fake.created); !proto.Equal(got, want) {
			t.Errorf("request = %v, want %v", got, want)
		}
		if want := "rotation period:  36h0m0s\noverlap:          -\nlead:             -\ndestroy delay:    45d\n"; !strings.Contains(r.stdout, want) {
			t.Errorf("stdout:\n%s\nwant it to contain:\n%s", r.stdout, want)
		}
	})
	t.Run("create with policy json", func(t *testing.T) {
		r := runAt(socket, "keys", "create", "eta", "--overlap", "30d", "--lead", "48h", "-o", "json")
		r.check(t, exitOK, r.stdout, "")
		var got kbv1.CreateKeyResponse
		unmarshalLine(t, r.stdout, &got)
		want := &kbv1.RotationPolicy{Overlap: days(30), PrePublicationLead: days(2)}
		if !proto.Equal(got.GetKey().GetPolicy(), want) {
			t.Errorf("policy = %v, want %v", got.GetKey().GetPolicy(), want)
		}
		if req := locked(fake, &fake.created); !proto.Equal(req.GetPolicy(), want) {
			t.Errorf("request policy = %v, want %v", req.GetPolicy(), want)
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

// startRotFake starts a fake broker that also holds the key "rot".
func startRotFake(t *testing.T) (*fakeBroker, string) {
	t.Helper()
	fake := newFakeBroker(t)
	fake.keys["rot"] = rotKey()
	socket, _ := startFake(t, fake)
	return fake, socket
}

// TestGetRotatedKey checks "keys get" on versions in every state.
func TestGetRotatedKey(t *testing.T) {
	_, socket := startRotFake(t)
	runAt(socket, "keys", "get", "rot").check(t, exitOK, `name:             rot
algorithm:        ES256
backend:          pkcs11
created:          2026-01-01T00:00:00Z
active version:   3
active kid:       k2Qy-6xXdTG4B6RbKFaqPnkJWX8M0xS0gNsh3VFUzC4
rotation period:  30d
overlap:          10d
lead:             5d
destroy delay:    7d
next rotation:    2026-03-27T00:00:00Z
versions:
  VERSION  STATE      KID                                          CREATED               NEXT       AT
  1        DESTROYED  NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs  2026-01-01T00:00:00Z  -          -
  2        REVOKED    0fSWeGgFMVWNqAhd2HqpL3BBx7NDNH4x1B8V4cJ1CaE  2026-01-26T00:00:00Z  DESTROYED  2026-03-04T00:00:00Z
  3        ACTIVE     k2Qy-6xXdTG4B6RbKFaqPnkJWX8M0xS0gNsh3VFUzC4  2026-02-25T00:00:00Z  RETIRED    2026-03-27T00:00:00Z
`, "")
}

func TestRotateCommand(t *testing.T) {
	fake, socket := startRotFake(t)

	runAt(socket, "keys", "rotate", "rot").
		check(t, exitOK, "rotated:         yes\nactive version:  4\nactive kid:      kid-rot-4\n", "")
	if want := (&kbv1.RotateKeyRequest{Name: "rot"}); !proto.Equal(locked(fake, &fake.rotated), want) {
		t.Errorf("request = %v, want %v", locked(fake, &fake.rotated), want)
	}

	// Version 3 is no longer ACTIVE: nothing happens, and that is no error.
	runAt(socket, "keys", "rotate", "rot", "--if-active-version", "3").
		check(t, exitOK, "rotated:         no\nactive version:  4\nactive kid:      kid-rot-4\n", "")
	if want := (&kbv1.RotateKeyRequest{Name: "rot", IfActiveVersion: 3}); !proto.Equal(locked(fake, &fake.rotated), want) {
		t.Errorf("request = %v, want %v", locked(fake, &fake.rotated), want)
	}

	r := runAt(socket, "keys", "rotate", "rot", "--if-active-version", "4", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	var got kbv1.RotateKeyResponse
	unmarshalLine(t, r.stdout, &got)
	if !got.GetRotated() || got.GetKey().GetActiveVersion() != 5 || got.GetKey().GetActiveKid() != "kid-rot-5" {
		t.Errorf("response = %v, want rotated to version 5, kid-rot-5", &got)
	}
	if want := (&kbv1.RotateKeyRequest{Name: "rot", IfActiveVersion: 4}); !proto.Equal(locked(fake, &fake.rotated), want) {
		t.Errorf("request = %v, want %v", locked(fake, &fake.rotated), want)
	}
	// "rotated" is printed even when false.
	runAt(socket, "keys", "rotate", "rot", "--if-active-version", "1", "-o", "json").
		check(t, exitOK, mustProtoJSON(t, &kbv1.RotateKeyResponse{Key: fake.key("rot")}), "")

	runAt(socket, "keys", "rotate", "nope").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

// mustProtoJSON is m as printProto prints it.
func mustProtoJSON(t testing.TB, m proto.Message) string {
	t.Helper()
	var buf bytes.Buffer
	if err := (&app{stdout: &buf}).printProto(m); err != nil {
		t.Fatal(err)
	}
	return buf.String()
}

func TestRevokeCommand(t *testing.T) {
	fake, socket := startRotFake(t)

	runAt(socket, "keys", "revoke", "alpha", "--version", "1").check(t, exitOK, `active version:  2
active kid:      kid-a2
versions:
  VERSION  STATE    KID     CREATED               NEXT       AT
  1        REVOKED  kid-a1  2026-01-02T03:04:05Z  DESTROYED  2026-03-08T00:00:00Z
  2        ACTIVE   kid-a2  2026-02-03T04:05:06Z  RETIRED    2026-05-04T04:05:06Z
`, "")
	if want := (&kbv1.RevokeKeyVersionRequest{Name: "alpha", Version: 1}); !proto.Equal(locked(fake, &fake.revoked), want) {
		t.Errorf("request = %v, want %v", locked(fake, &fake.revoked), want)
	}

	r := runAt(socket, "keys", "revoke", "alpha", "--kid", "kid-a1", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	var got kbv1.RevokeKeyVersionResponse
	unmarshalLine(t, r.stdout, &got)
	if v := got.GetKey().GetVersions()[0]; v.GetKid() != "kid-a1" || v.GetState() != kbv1.KeyState_KEY_STATE_REVOKED {
		t.Errorf("version 1 = %v, want kid-a1 REVOKED", v)
	}
	if want := (&kbv1.RevokeKeyVersionRequest{Name: "alpha", Kid: "kid-a1"}); !proto.Equal(locked(fake, &fake.revoked), want) {
		t.Errorf("request = %v, want %v", locked(fake, &fake.revoked), want)
	}

	runAt(socket, "keys", "revoke", "rot", "--version", "1").check(t, exitConflict, "", "keybrokerctl: version 1 is destroyed\n")
	runAt(socket, "keys", "revoke", "alpha", "--version", "9").check(t, exitNotFound, "", "keybrokerctl: key version not found\n")
	runAt(socket, "keys", "revoke", "nope", "--kid", "x").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}

func TestPolicyCommand(t *testing.T) {
	fake, socket := startRotFake(t)

	t.Run("show", func(t *testing.T) {
		runAt(socket, "keys", "policy", "alpha").check(t, exitOK, `rotation period:  90d
overlap:          90d
lead:             7d
destroy delay:    36h0m0s
next rotation:    2026-05-04T04:05:06Z
`, "")
		r := runAt(socket, "keys", "policy", "rot", "-o", "json")
		r.check(t, exitOK, r.stdout, "")
		var got kbv1.GetKeyResponse
		unmarshalLine(t, r.stdout, &got)
		if !proto.Equal(got.GetKey(), rotKey()) {
			t.Errorf("key = %v, want %v", got.GetKey(), rotKey())
		}
		// Showing the policy does not update it.
		if got := locked(fake, &fake.updated); got != nil {
			t.Errorf("UpdatePolicy called with %v", got)
		}
	})
	t.Run("update", func(t *testing.T) {
		runAt(socket, "keys", "policy", "alpha", "--overlap", "30d", "--lead", "1d12h").check(t, exitOK, `rotation period:  90d
overlap:          30d
lead:             36h0m0s
destroy delay:    36h0m0s
next rotation:    2026-05-04T04:05:06Z
`, "")
		want := &kbv1.UpdatePolicyRequest{Name: "alpha", Policy: &kbv1.RotationPolicy{Overlap: days(30), PrePublicationLead: durationpb.New(36 * time.Hour)}}
		if got := locked(fake, &fake.updated); !proto.Equal(got, want) {
			t.Errorf("request = %v, want %v", got, want)
		}
	})
	t.Run("update json", func(t *testing.T) {
		r := runAt(socket, "keys", "policy", "rot", "--rotation-period", "180d", "--destroy-delay", "1d", "-o", "json")
		r.check(t, exitOK, r.stdout, "")
		var got kbv1.UpdatePolicyResponse
		unmarshalLine(t, r.stdout, &got)
		want := &kbv1.RotationPolicy{RotationPeriod: days(180), Overlap: days(10), PrePublicationLead: days(5), DestroyDelay: days(1)}
		if !proto.Equal(got.GetKey().GetPolicy(), want) {
			t.Errorf("policy = %v, want %v", got.GetKey().GetPolicy(), want)
		}
		wantReq := &kbv1.UpdatePolicyRequest{Name: "rot", Policy: &kbv1.RotationPolicy{RotationPeriod: days(180), DestroyDelay: days(1)}}
		if got := locked(fake, &fake.updated); !proto.Equal(got, wantReq) {
			t.Errorf("request = %v, want %v", got, wantReq)
		}
	})
	t.Run("invalid", func(t *testing.T) {
		runAt(socket, "keys", "policy", "alpha", "--rotation-period", "30m").
			check(t, exitUsage, "", "keybrokerctl: policy.rotation_period: got 30m0s, want at least 1h\n")
	})
	t.Run("not found", func(t *testing.T) {
		runAt(socket, "keys", "policy", "nope").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
		runAt(socket, "keys", "policy", "nope", "--lead", "1d").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
	})
}

func TestTimelineCommand(t *testing.T) {
	fake, socket := startRotFake(t)
	from := time.Date(2026, 3, 1, 0, 0, 0, 0, time.FixedZone("CET", 3600)).Add(time.Hour).Format(time.RFC3339)

	const rotVersions = `versions:
  VERSION  KID           STATE      CREATED               ACTIVATED             RETIRED               EXPIRED               REVOKED               DESTROYED             NEXT       AT
  1        NzbLsXh8uDCc  DESTROYED  2026-01-01T00:00:00Z  2026-01-01T00:00:00Z  2026-01-31T00:00:00Z  2026-02-10T00:00:00Z  -                     2026-02-17T00:00:00Z  -          -
  2        0fSWeGgFMVWN  REVOKED    2026-01-26T00:00:00Z  2026-01-31T00:00:00Z  -                     -                     2026-02-25T00:00:00Z  -                     DESTROYED  2026-03-04T00:00:00Z
  3        k2Qy-6xXdTG4  ACTIVE     2026-02-25T00:00:00Z  2026-02-25T00:00:00Z  -                     -                     -                     -                     RETIRED    2026-03-27T00:00:00Z
`
	t.Run("text", func(t *testing.T) {
		runAt(socket, "keys", "timeline", "--from", from, "rot", "--horizon", "40d").check(t, exitOK, rotVersions+`projected until 2026-04-10T00:00:00Z:
  TIME                  VERSION  STATE
  2026-03-04T00:00:00Z  2        DESTROYED
  2026-03-22T00:00:00Z  4        PENDING
  2026-03-27T00:00:00Z  3        RETIRED
  2026-03-27T00:00:00Z  4        ACTIVE
  2026-04-06T00:00:00Z  3        EXPIRED
`, "")
	})
	t.Run("default horizon", func(t *testing.T) {
		r := runAt(socket, "keys", "timeline", "--from", from, "rot")
		r.check(t, exitOK, runAt(socket, "keys", "timeline", "--from", from, "rot", "--horizon", "365d").stdout, "")
		if want := "\nprojected until 2027-03-01T00:00:00Z:\n"; !strings.Contains(r.stdout, want) {
			t.Errorf("stdout:\n%s\nwant it to contain %q", r.stdout, want)
		}
		if want := "\n  2027-02-20T00:00:00Z  15       ACTIVE\n"; !strings.HasSuffix(r.stdout, want) {
			t.Errorf("stdout:\n%s\nwant it to end with %q", r.stdout, want)
		}
	})
	t.Run("json", func(t *testing.T) {
		r := runAt(socket, "keys", "timeline", "--from", from, "rot", "--horizon", "36d", "-o", "json")
		r.check(t, exitOK, r.stdout, "")
		var got struct {
			Key    json.RawMessage
			Until  string
			Events []eventOutput
		}
		if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
			t.Fatalf("stdout %q: %v", r.stdout, err)
		}
		var key kbv1.Key
		if err := protojson.Unmarshal(got.Key, &key); err != nil {
			t.Fatalf("key %s: %v", got.Key, err)
		}
		if !proto.Equal(&key, rotKey()) {
			t.Errorf("key = %v, want %v", &key, rotKey())
		}
		if want := "2026-04-06T00:00:00Z"; got.Until != want {
			t.Errorf("until = %q, want %q", got.Until, want)
		}
		want := []eventOutput{
			{"2026-03-04T00:00:00Z", 2, "DESTROYED"},
			{"2026-03-22T00:00:00Z", 4, "PENDING"},
			{"2026-03-27T00:00:00Z", 3, "RETIRED"},
			{"2026-03-27T00:00:00Z", 4, "ACTIVE"},
			{"2026-04-06T00:00:00Z", 3, "EXPIRED"},
		}
		if !slices.Equal(got.Events, want) {
			t.Errorf("events = %v, want %v", got.Events, want)
		}
	})
	t.Run("no policy", func(t *testing.T) {
		runAt(socket, "keys", "timeline", "--from", from, "beta").check(t, exitOK, `versions:
  VERSION  KID  STATE  CREATED  ACTIVATED  RETIRED  EXPIRED  REVOKED  DESTROYED  NEXT  AT
projected until 2027-03-01T00:00:00Z:
  none
`, "")
		runAt(socket, "keys", "timeline", "--from", from, "beta", "-o", "json").check(t, exitOK,
			`{"key":`+strings.TrimSuffix(mustProtoJSON(t, fake.key("beta")), "\n")+`,"until":"2027-03-01T00:00:00Z","events":[]}`+"\n", "")
	})
	t.Run("not found", func(t *testing.T) {
		runAt(socket, "keys", "timeline", "nope").check(t, exitNotFound, "", "keybrokerctl: key not found\n")
		if r := runAt(socket, "keys", "timeline", "--from", "yesterday", "beta"); r.code != exitUsage || !strings.Contains(r.stderr, "--from") {
			t.Errorf("bad --from: exit %d, stderr %q", r.code, r.stderr)
		}
	})
}
