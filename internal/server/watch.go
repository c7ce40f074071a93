package server

import (
	"bytes"
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"log/slog"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
)

// DefaultWatchBuffer is how many events a WatchKeys stream may fall behind
// before it is cut off (RESOURCE_EXHAUSTED). A rotation makes two or
// three; a thousand is a reader stalled, not a burst.
const DefaultWatchBuffer = 1024

// watchKeysInfo names the call to handle: authorization (methodRoles),
// the audit record and the metrics say WatchKeys.
var watchKeysInfo = &grpc.UnaryServerInfo{FullMethod: kbv1.KeyBroker_WatchKeys_FullMethodName}

// WatchKeys opens a watch of the caller's tenant's keys as one call (see
// handle: authentication, role, audit record and metrics, at open; the
// unary interceptor does not see streams), then streams the snapshot, its
// end marker and every change. It never holds up the keyring: events wait
// in a bounded queue, and a stream that falls Options.WatchBuffer events behind
// ends RESOURCE_EXHAUSTED.
func (s *Server) WatchKeys(req *kbv1.WatchKeysRequest, stream kbv1.KeyBroker_WatchKeysServer) error {
	ctx := stream.Context()
	markSeen(ctx)
	reqID := newRequestID()
	_ = stream.SetHeader(metadata.Pairs("x-request-id", reqID))
	var (
		snap   []keyring.Event
		w      *keyring.Watcher
		callCx context.Context // with the caller and the signing quota (CSRs)
	)
	open := func(ctx context.Context, _ any) (any, error) {
		tenant, err := tenantOf(ctx)
		if err != nil {
			return nil, err
		}
		if req.GetIncludeCsr() && !s.access.Load().has(tenant, RoleSigner) {
			// A CSR is a signature: as CreateCertificateRequest.
			return nil, errPermissionDenied(kbv1.KeyBroker_CreateCertificateRequest_FullMethodName, RoleSigner)
		}
		callCx = ctx
		snap, w, err = s.ring.Watch(tenant, req.GetName(), s.watchBuffer)
		return nil, err
	}
	if _, err := s.handle(ctx, reqID, req, s.takeMalformed(req), watchKeysInfo, open); err != nil {
		return err
	}
	defer w.Stop()
	// Counted when it happens, not when the stream ends: a handler may
	// sit in Send, held by gRPC flow control, until the client reads
	// again (and then learns it was cut off) or leaves.
	ended := make(chan struct{})
	defer close(ended)
	go func() {
		select {
		case <-w.Overflow():
			s.watchCutOff.Add(1)
			s.log.Warn("key watcher fell behind; its stream ends", "request_id", reqID, "buffer", s.watchBuffer)
		case <-ended:
		}
	}()
	send := func(ev keyring.Event) error {
		m := eventProto(ev)
		if ev.Kind == keyring.EventPending && req.GetIncludeCsr() {
			m.CsrDer, m.CsrError = s.pendingCSR(callCx, ev, kbv1.KeyBroker_WatchKeys_FullMethodName, "CSR for a PENDING version, sent with its WatchKeys event")
		}
		return stream.Send(&kbv1.WatchKeysResponse{Event: m})
	}
	for _, ev := range snap {
		if err := send(ev); err != nil {
			return err
		}
	}
	if err := stream.Send(&kbv1.WatchKeysResponse{Event: &kbv1.KeyEvent{Type: kbv1.KeyEventType_KEY_EVENT_TYPE_SNAPSHOT_COMPLETE}}); err != nil {
		return err
	}
	for {
		select {
		case <-w.Overflow():
			return errWatchBehind
		case <-ctx.Done():
			// The client left, or the daemon is stopping
			// (streamUntilStop): either way, watch again.
			return errWatchEnded
		case ev := <-w.C:
			if err := send(ev); err != nil {
				return err
			}
		}
	}
}

// WatchesCutOff counts the WatchKeys streams ended for falling behind
// (a metric).
func (s *Server) WatchesCutOff() int64 { return s.watchCutOff.Load() }

// pendingCSR makes the CSR of a PENDING version for a watch with
// include_csr or a hook: a hardware signature, so charged to the signing
// quota (a watch's) and recorded in the audit log, durable before the CSR
// is sent. A failure
// is sent in the event (csr_error), as a client would see it: the watch
// goes on.
func (s *Server) pendingCSR(ctx context.Context, ev keyring.Event, method, note string) ([]byte, string) {
	start := time.Now()
	caller, _ := callerFrom(ctx)
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: ev.Name}, SignatureAlgorithm: sigAlgFor(ev.Alg)}
	der, _, err := s.ring.CertificateRequest(ctx, ev.Tenant, ev.Name, keyring.VersionRef{Kid: ev.Kid}, tmpl)
	err = toStatus(err)
	if s.audit != nil {
		rec := auditRecord(newRequestID(), method, caller, nil, nil, status.Code(err), time.Since(start))
		rec.Key, rec.Version, rec.Kid, rec.Alg = ev.Name, ev.Version, ev.Kid, ev.Alg.String()
		if caller.Tenant == "" {
			rec.Tenant = ev.Tenant
		}
		rec.Note = note
		if aerr := s.audit.Write(context.WithoutCancel(ctx), rec); aerr != nil {
			s.log.Error("audit record of a pending version's CSR not written; CSR withheld", "method", method, "err", aerr)
			s.auditWriteFailed()
			return nil, status.Convert(errAuditUnavailable).Message()
		}
	}
	if err != nil {
		return nil, status.Convert(err).Message()
	}
	return der, ""
}

var eventTypes = map[keyring.EventKind]kbv1.KeyEventType{
	keyring.EventPending:     kbv1.KeyEventType_KEY_EVENT_TYPE_PENDING,
	keyring.EventActive:      kbv1.KeyEventType_KEY_EVENT_TYPE_ACTIVE,
	keyring.EventRetired:     kbv1.KeyEventType_KEY_EVENT_TYPE_RETIRED,
	keyring.EventExpired:     kbv1.KeyEventType_KEY_EVENT_TYPE_EXPIRED,
	keyring.EventRevoked:     kbv1.KeyEventType_KEY_EVENT_TYPE_REVOKED,
	keyring.EventDestroyed:   kbv1.KeyEventType_KEY_EVENT_TYPE_DESTROYED,
	keyring.EventPolicy:      kbv1.KeyEventType_KEY_EVENT_TYPE_POLICY,
	keyring.EventCertificate: kbv1.KeyEventType_KEY_EVENT_TYPE_CERTIFICATE,
}

// eventProto is an event as the API sends it. Everything in it is public.
func eventProto(ev keyring.Event) *kbv1.KeyEvent {
	m := &kbv1.KeyEvent{Type: eventTypes[ev.Kind], Snapshot: ev.Snapshot, Tenant: ev.Tenant, Name: ev.Name,
		Algorithm: algToProto(ev.Alg), Version: ev.Version, Kid: ev.Kid, State: stateToProto(ev.State), Time: ts(ev.Time),
		X5TS256: ev.X5TS256, CertificateExpireTime: ts(ev.CertExpires)}
	if ev.Policy != (kms.Policy{}) {
		m.Policy = policyToProto(ev.Policy)
	}
	if ev.Kid != "" {
		if b, err := json.Marshal(ev.JWK); err == nil {
			m.Jwk = string(b)
		}
	}
	return m
}

// EventJSON is an event in the JSON form keybrokerctl keys watch -o json
// prints (the proto3 JSON mapping of KeyEvent, every field present, on
// one line), for the daemon's hooks.
func EventJSON(ev keyring.Event) ([]byte, error) { return eventJSON(eventProto(ev)) }

// hookCSRTimeout bounds the hardware signature of a hook's CSR.
const hookCSRTimeout = 30 * time.Second

// HookEncoder returns EventJSON for the hooks: a PENDING event also
// carries the version's CSR (CN = the key name; or why none could be
// made), so that a CA can issue its certificate before it signs. Each CSR
// is a hardware signature with its own audit record (method "hook"). It
// needs only the keyring and the audit log, so hooks can start before the
// service does.
func HookEncoder(ring *keyring.Keyring, a Auditor, log *slog.Logger) func(keyring.Event) ([]byte, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{ring: ring, audit: a, log: log}
	return s.hookEventJSON
}

func (s *Server) hookEventJSON(ev keyring.Event) ([]byte, error) {
	m := eventProto(ev)
	if ev.Kind == keyring.EventPending {
		ctx, cancel := context.WithTimeout(context.Background(), hookCSRTimeout)
		defer cancel()
		m.CsrDer, m.CsrError = s.pendingCSR(ctx, ev, "hook", "CSR for a PENDING version, sent to the hooks with its event")
	}
	return eventJSON(m)
}

func eventJSON(m *kbv1.KeyEvent) ([]byte, error) {
	b, err := protojson.MarshalOptions{EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return nil, err
	}
	// protojson varies its spacing on purpose: make it one stable line.
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
