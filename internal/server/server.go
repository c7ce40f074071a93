// Package server is keybroker's gRPC service: it turns protobuf requests
// into keyring calls and keyring results and errors into responses. It is
// the only package (with the SDK) that imports the generated API code. The
// tenant comes from the caller's identity (TenantFunc), never from a
// request field.
package server

import (
	"context"
	"crypto"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
)

// Auditor records one audit line per RPC (*audit.Log): Write returns once
// it is durable, Queue once it is in line (for publicReads). An error
// withholds the response.
type Auditor interface {
	Write(ctx context.Context, r audit.Record) error
	Queue(r audit.Record) error
}

// publicReads are the methods whose answer is public data (public keys,
// JWK Sets, key metadata): recorded in order like every call, but their
// answer does not wait for the record to reach the disk.
var publicReads = map[string]bool{
	kbv1.KeyBroker_GetJWKS_FullMethodName:      true,
	kbv1.KeyBroker_GetPublicKey_FullMethodName: true,
	kbv1.KeyBroker_GetKey_FullMethodName:       true,
	kbv1.KeyBroker_ListKeys_FullMethodName:     true,
}

// Observer is told about every keybroker.v1 call once it is answered
// (metrics). tenant is "" when the caller was not authenticated.
type Observer interface {
	ObserveRPC(method, tenant string, code codes.Code, latency time.Duration)
	// AuditWriteFailed counts a record that could not be made durable
	// (the call was answered UNAVAILABLE).
	AuditWriteFailed()
}

// Options configure the service.
type Options struct {
	Ring     *keyring.Keyring
	Access   *Access
	Audit    Auditor     // nil: no audit log
	Observer Observer    // nil: none
	Cluster  ClusterView // nil: a single daemon
	Log      *slog.Logger
	// CallTimeout bounds each SignStream message as the daemon bounds a
	// unary call (0: only the stream's context).
	CallTimeout time.Duration
	// WatchBuffer is how many events a WatchKeys stream may fall behind
	// before it is cut off (0: DefaultWatchBuffer).
	WatchBuffer int
}

// Server implements kbv1.KeyBrokerServer.
type Server struct {
	kbv1.UnimplementedKeyBrokerServer
	ring     *keyring.Keyring
	access   atomic.Pointer[Access] // replaced as a whole on reload
	audit    Auditor
	observer Observer
	cluster  ClusterView
	log      *slog.Logger

	callTimeout time.Duration
	watchBuffer int
	watchCutOff atomic.Int64 // WatchKeys streams ended for falling behind
	malformed   sync.Map     // requests that did not decode (malformedCodec)
}

// New returns the service.
func New(o Options) *Server {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.WatchBuffer <= 0 {
		o.WatchBuffer = DefaultWatchBuffer
	}
	s := &Server{ring: o.Ring, audit: o.Audit, observer: o.Observer, cluster: o.Cluster, log: o.Log, callTimeout: o.CallTimeout,
		watchBuffer: o.WatchBuffer}
	s.access.Store(o.Access)
	return s
}

// SetAccess replaces the tenants' access rules and quotas (configuration
// reload). Calls already authorized finish under the old rules; the next
// call sees the new ones.
func (s *Server) SetAccess(a *Access) { s.access.Store(a) }

// UnaryInterceptor wraps every keybroker.v1 call (see handle) and gives it
// a request id, sent in the x-request-id header. The audit record must be
// durable before the response (or the response is withheld: UNAVAILABLE).
// Other services (health, reflection) pass through.
func (s *Server) UnaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	markSeen(ctx)
	malformed := s.takeMalformed(req)
	if !strings.HasPrefix(info.FullMethod, "/"+kbv1.KeyBroker_ServiceDesc.ServiceName+"/") {
		return handler(ctx, req)
	}
	reqID := newRequestID()
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-request-id", reqID))
	return s.handle(ctx, reqID, req, malformed, info, handler)
}

// handle runs one keybroker.v1 call, unary or a SignStream message: caller
// authentication and authorization, signing quota, panic recovery, the one
// error → status conversion, a log line, the audit record and the metrics.
func (s *Server) handle(ctx context.Context, reqID string, req any, malformed bool, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	caller, resp, err := s.call(ctx, reqID, req, malformed, info, handler)
	code := status.Code(err)
	// The logger with the call's fields is built only when a line is
	// written: not on the hot path at the default level.
	log := func() *slog.Logger {
		return s.log.With("request_id", reqID, "method", shortMethod(info.FullMethod), "tenant", caller.Tenant)
	}
	level := slog.LevelDebug
	if code == codes.Internal || code == codes.Unavailable || code == codes.Unknown {
		level = slog.LevelWarn
	}
	if s.log.Enabled(ctx, level) {
		log().Log(ctx, level, "rpc", "caller", caller.Identity, "code", code.String(), "latency", time.Since(start))
	}
	if s.audit != nil {
		rec := auditRecord(reqID, info.FullMethod, caller, req, resp, code, time.Since(start))
		var aerr error
		if publicReads[info.FullMethod] {
			aerr = s.audit.Queue(rec)
		} else {
			aerr = s.audit.Write(context.WithoutCancel(ctx), rec)
		}
		switch {
		case aerr != nil && adminChanges[info.FullMethod] && code != codes.Unavailable:
			// The change (or its refusal) happened, and its intent record
			// is durable: the answer stays true.
			log().Error("audit record of an admin change's outcome not written; its intent record stands", "err", aerr)
			s.auditWriteFailed()
		case aerr != nil:
			log().Error("audit record not written; response withheld", "err", aerr)
			resp, err = nil, errAuditUnavailable
			s.auditWriteFailed()
		}
	}
	if s.observer != nil {
		s.observer.ObserveRPC(shortMethod(info.FullMethod), caller.Tenant, status.Code(err), time.Since(start))
	}
	return resp, err
}

// adminChanges are the methods that change keys. Their audit record is
// written ahead, as an intent (see writeIntent), so that an answer is true
// even when the record of the outcome cannot be written: a change is never
// made without a durable record, and never reported as not made once it is.
var adminChanges = map[string]bool{
	kbv1.KeyBroker_CreateKey_FullMethodName:         true,
	kbv1.KeyBroker_RotateKey_FullMethodName:         true,
	kbv1.KeyBroker_RevokeKeyVersion_FullMethodName:  true,
	kbv1.KeyBroker_UpdatePolicy_FullMethodName:      true,
	kbv1.KeyBroker_ImportCertificate_FullMethodName: true,
}

// intentCode is the Code of an admin change's intent record.
const intentCode = "STARTED"

func (s *Server) auditWriteFailed() {
	if s.observer != nil {
		s.observer.AuditWriteFailed()
	}
}

// writeIntent records, before an admin change is attempted, who asks for
// what; the outcome follows in a record with the same request ID.
func (s *Server) writeIntent(ctx context.Context, reqID, method string, caller Caller, req any) error {
	rec := auditRecord(reqID, method, caller, req, nil, codes.OK, 0)
	rec.Code = intentCode
	rec.Note = "admin change about to be attempted; its outcome follows with the same request_id"
	if err := s.audit.Write(context.WithoutCancel(ctx), rec); err != nil {
		s.log.Error("audit intent record not written; admin change not attempted", "request_id", reqID, "method", shortMethod(method), "err", err)
		s.auditWriteFailed()
		return errAuditUnavailable
	}
	return nil
}

// call authenticates, authorizes, applies the quota and runs the handler.
func (s *Server) call(ctx context.Context, reqID string, req any, malformed bool, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (caller Caller, resp any, err error) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("panic in handler", "method", info.FullMethod, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			resp, err = nil, errInternal
		}
	}()
	access := s.access.Load()
	caller, err = access.authorize(ctx, info.FullMethod)
	if err != nil {
		return caller, nil, err
	}
	if malformed {
		return caller, nil, errMalformed
	}
	if s.audit != nil && adminChanges[info.FullMethod] {
		if err := s.writeIntent(ctx, reqID, info.FullMethod, caller, req); err != nil {
			return caller, nil, err
		}
	}
	// The signing quota is charged by each hardware signature the call
	// makes (Sign, the PoP and certificate RPCs, AttestKey), once its
	// request has passed validation: see keyring.WithAdmission.
	ctx = keyring.WithAdmission(ctx, func() error { return access.allowSign(caller.Tenant) })
	resp, err = handler(context.WithValue(ctx, callerKey{}, caller), req)
	if err != nil {
		if _, isStatus := err.(interface{ GRPCStatus() *status.Status }); !isStatus {
			s.log.Warn("rpc failed", "method", info.FullMethod, "tenant", caller.Tenant, "err", err)
		}
		return caller, nil, toStatus(err)
	}
	return caller, resp, nil
}

func (s *Server) CreateKey(ctx context.Context, req *kbv1.CreateKeyRequest) (*kbv1.CreateKeyResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	alg, err := algFromProto(req.GetAlgorithm())
	if err != nil {
		return nil, err
	}
	policy, err := policyFromProto(req.GetPolicy(), kms.DefaultPolicy())
	if err != nil {
		return nil, err
	}
	k, err := s.ring.CreateKey(ctx, tenant, req.GetName(), kms.KeySpec{Alg: alg, Bits: int(req.GetBits())}, policy)
	if err != nil {
		return nil, err
	}
	return &kbv1.CreateKeyResponse{Key: keyToProto(k)}, nil
}

func (s *Server) GetKey(ctx context.Context, req *kbv1.GetKeyRequest) (*kbv1.GetKeyResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	k, err := s.ring.GetKey(ctx, tenant, req.GetName())
	if err != nil {
		return nil, err
	}
	return &kbv1.GetKeyResponse{Key: keyToProto(k)}, nil
}

func (s *Server) ListKeys(ctx context.Context, req *kbv1.ListKeysRequest) (*kbv1.ListKeysResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	keys, next, err := s.ring.ListKeys(ctx, tenant, req.GetPageToken(), int(req.GetPageSize()))
	if err != nil {
		return nil, err
	}
	resp := &kbv1.ListKeysResponse{NextPageToken: next}
	for _, k := range keys {
		resp.Keys = append(resp.Keys, keyToProto(k))
	}
	return resp, nil
}

func (s *Server) Sign(ctx context.Context, req *kbv1.SignRequest) (*kbv1.SignResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	hash, err := hashFromProto(req.GetHash())
	if err != nil {
		return nil, err
	}
	pad, err := paddingFromProto(req.GetPadding())
	if err != nil {
		return nil, err
	}
	jose, err := formatFromProto(req.GetFormat())
	if err != nil {
		return nil, err
	}
	sig, err := s.ring.Sign(ctx, tenant, keyring.SignRequest{
		Name:    req.GetName(),
		Ref:     keyring.VersionRef{Version: req.GetVersion(), Kid: req.GetKid()},
		Digest:  req.GetDigest(),
		Hash:    hash,
		Padding: pad,
		JOSE:    jose,
	})
	if err != nil {
		return nil, err
	}
	return &kbv1.SignResponse{Signature: sig.Signature, Kid: sig.Kid, Version: sig.Version, Algorithm: algToProto(sig.Alg)}, nil
}

func (s *Server) GetPublicKey(ctx context.Context, req *kbv1.GetPublicKeyRequest) (*kbv1.GetPublicKeyResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	pk, err := s.ring.PublicKey(ctx, tenant, req.GetName(), keyring.VersionRef{Version: req.GetVersion(), Kid: req.GetKid()})
	if err != nil {
		return nil, err
	}
	jwk, err := json.Marshal(pk.JWK)
	if err != nil {
		return nil, err
	}
	return &kbv1.GetPublicKeyResponse{
		Kid:        pk.Kid,
		Version:    pk.Version,
		Algorithm:  algToProto(pk.Alg),
		Pem:        string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pk.DER})),
		Der:        pk.DER,
		Jwk:        string(jwk),
		Thumbprint: pk.Kid,
		// The chain is public: it goes to every TLS server the client
		// authenticates to.
		CertificateChain: pk.Chain,
		X5TS256:          pk.X5TS256,
	}, nil
}

func (s *Server) GetJWKS(ctx context.Context, req *kbv1.GetJWKSRequest) (*kbv1.GetJWKSResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	b, err := s.ring.JWKS(ctx, tenant)
	if err != nil {
		return nil, err
	}
	return &kbv1.GetJWKSResponse{Jwks: string(b)}, nil
}

func (s *Server) RotateKey(ctx context.Context, req *kbv1.RotateKeyRequest) (*kbv1.RotateKeyResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	k, rotated, err := s.ring.RotateKey(ctx, tenant, req.GetName(), req.GetIfActiveVersion())
	if err != nil {
		return nil, err
	}
	return &kbv1.RotateKeyResponse{Key: keyToProto(k), Rotated: rotated}, nil
}

func (s *Server) RevokeKeyVersion(ctx context.Context, req *kbv1.RevokeKeyVersionRequest) (*kbv1.RevokeKeyVersionResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	k, err := s.ring.RevokeKeyVersion(ctx, tenant, req.GetName(), keyring.VersionRef{Version: req.GetVersion(), Kid: req.GetKid()})
	if err != nil {
		return nil, err
	}
	return &kbv1.RevokeKeyVersionResponse{Key: keyToProto(k)}, nil
}

func (s *Server) UpdatePolicy(ctx context.Context, req *kbv1.UpdatePolicyRequest) (*kbv1.UpdatePolicyResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	if req.GetPolicy() == nil {
		return nil, &kms.FieldError{Field: "policy", Reason: "must be set"}
	}
	// Check the durations themselves before looking the key up.
	if _, err := policyFromProto(req.GetPolicy(), kms.DefaultPolicy()); err != nil {
		return nil, err
	}
	k, err := s.ring.UpdatePolicy(ctx, tenant, req.GetName(), func(cur kms.Policy) kms.Policy {
		p, _ := policyFromProto(req.GetPolicy(), cur)
		return p
	})
	if err != nil {
		return nil, err
	}
	return &kbv1.UpdatePolicyResponse{Key: keyToProto(k)}, nil
}

// policyFromProto overlays the fields set in pp on base.
func policyFromProto(pp *kbv1.RotationPolicy, base kms.Policy) (kms.Policy, error) {
	fields := []struct {
		name string
		d    *durationpb.Duration
		dst  *time.Duration
	}{
		{"policy.rotation_period", pp.GetRotationPeriod(), &base.RotationPeriod},
		{"policy.overlap", pp.GetOverlap(), &base.Overlap},
		{"policy.pre_publication_lead", pp.GetPrePublicationLead(), &base.Lead},
		{"policy.destroy_delay", pp.GetDestroyDelay(), &base.DestroyDelay},
	}
	for _, f := range fields {
		if f.d == nil {
			continue
		}
		if err := f.d.CheckValid(); err != nil {
			return base, &kms.FieldError{Field: f.name, Reason: "not a valid duration"}
		}
		*f.dst = f.d.AsDuration()
	}
	return base, nil
}

func policyToProto(p kms.Policy) *kbv1.RotationPolicy {
	return &kbv1.RotationPolicy{
		RotationPeriod:     durationpb.New(p.RotationPeriod),
		Overlap:            durationpb.New(p.Overlap),
		PrePublicationLead: durationpb.New(p.Lead),
		DestroyDelay:       durationpb.New(p.DestroyDelay),
	}
}

// ts converts a time, leaving the zero time unset.
func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func keyToProto(k keyring.KeyInfo) *kbv1.Key {
	pk := &kbv1.Key{
		Name:             k.Name,
		Algorithm:        algToProto(k.Alg),
		Bits:             int32(k.Bits),
		Backend:          k.Backend,
		CreateTime:       ts(k.Created),
		ActiveVersion:    k.ActiveVersion,
		ActiveKid:        k.ActiveKid,
		Policy:           policyToProto(k.Policy),
		NextRotationTime: ts(k.NextRotation),
	}
	for _, v := range k.Versions {
		pk.Versions = append(pk.Versions, &kbv1.KeyVersion{
			Version:               v.Version,
			Kid:                   v.Kid,
			State:                 stateToProto(v.State),
			CreateTime:            ts(v.Created),
			ActivateTime:          ts(v.Activated),
			RetireTime:            ts(v.Retired),
			ExpireTime:            ts(v.Expired),
			RevokeTime:            ts(v.Revoked),
			DestroyTime:           ts(v.Destroyed),
			NextState:             stateToProto(v.NextState),
			NextTransitionTime:    ts(v.NextTransition),
			X5TS256:               v.X5TS256,
			CertificateExpireTime: ts(v.CertExpires),
		})
	}
	return pk
}

var algs = map[kbv1.Algorithm]kms.Algorithm{
	kbv1.Algorithm_ALGORITHM_ES256: kms.ES256,
	kbv1.Algorithm_ALGORITHM_ES384: kms.ES384,
	kbv1.Algorithm_ALGORITHM_RS256: kms.RS256,
	kbv1.Algorithm_ALGORITHM_PS256: kms.PS256,
}

func algFromProto(a kbv1.Algorithm) (kms.Algorithm, error) {
	if alg, ok := algs[a]; ok {
		return alg, nil
	}
	return kms.AlgUnknown, &kms.FieldError{Field: "algorithm", Reason: fmt.Sprintf("got %v, want ES256, ES384, RS256 or PS256", a)}
}

func algToProto(a kms.Algorithm) kbv1.Algorithm {
	for p, alg := range algs {
		if alg == a {
			return p
		}
	}
	return kbv1.Algorithm_ALGORITHM_UNSPECIFIED
}

func stateToProto(s kms.State) kbv1.KeyState {
	switch s {
	case kms.StatePending:
		return kbv1.KeyState_KEY_STATE_PENDING
	case kms.StateActive:
		return kbv1.KeyState_KEY_STATE_ACTIVE
	case kms.StateRetired:
		return kbv1.KeyState_KEY_STATE_RETIRED
	case kms.StateExpired:
		return kbv1.KeyState_KEY_STATE_EXPIRED
	case kms.StateDestroyed:
		return kbv1.KeyState_KEY_STATE_DESTROYED
	case kms.StateRevoked:
		return kbv1.KeyState_KEY_STATE_REVOKED
	}
	return kbv1.KeyState_KEY_STATE_UNSPECIFIED
}

func hashFromProto(h kbv1.HashAlgorithm) (crypto.Hash, error) {
	switch h {
	case kbv1.HashAlgorithm_HASH_ALGORITHM_UNSPECIFIED:
		return 0, nil
	case kbv1.HashAlgorithm_HASH_ALGORITHM_SHA256:
		return crypto.SHA256, nil
	case kbv1.HashAlgorithm_HASH_ALGORITHM_SHA384:
		return crypto.SHA384, nil
	case kbv1.HashAlgorithm_HASH_ALGORITHM_SHA512:
		return crypto.SHA512, nil
	}
	return 0, &kms.FieldError{Field: "hash", Reason: fmt.Sprintf("unknown hash %d", int32(h))}
}

func paddingFromProto(p kbv1.RSAPadding) (kms.Padding, error) {
	switch p {
	case kbv1.RSAPadding_RSA_PADDING_UNSPECIFIED:
		return kms.PaddingDefault, nil
	case kbv1.RSAPadding_RSA_PADDING_PKCS1V15:
		return kms.PaddingPKCS1v15, nil
	case kbv1.RSAPadding_RSA_PADDING_PSS:
		return kms.PaddingPSS, nil
	}
	return 0, &kms.FieldError{Field: "padding", Reason: fmt.Sprintf("unknown padding %d", int32(p))}
}

func formatFromProto(f kbv1.SignatureFormat) (jose bool, err error) {
	switch f {
	case kbv1.SignatureFormat_SIGNATURE_FORMAT_UNSPECIFIED, kbv1.SignatureFormat_SIGNATURE_FORMAT_DER:
		return false, nil
	case kbv1.SignatureFormat_SIGNATURE_FORMAT_JOSE:
		return true, nil
	}
	return false, &kms.FieldError{Field: "format", Reason: fmt.Sprintf("unknown signature format %d", int32(f))}
}
