package server

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/authn"
)

// Some calls are refused by gRPC itself, before a unary interceptor runs: a
// request that does not decode, one over the size limit, a method that does
// not exist. They are RPCs all the same, and each must be one audit record.
// ServerOptions closes these gaps:
//
//   - A KeyBroker request that does not decode reaches the interceptor
//     anyway, empty and marked malformed: it is authenticated, refused with
//     INVALID_ARGUMENT (gRPC alone would say INTERNAL) and recorded like any
//     bad input, durable before the response.
//   - A method that does not exist is answered UNAUTHENTICATED for an
//     unknown caller, else UNIMPLEMENTED, and recorded before the answer.
//   - Whatever else the interceptor did not see — a request over the size
//     limit — is recorded by a stats handler when the call ends: after its
//     response, as gRPC answered before any of this code ran. Nothing was
//     done for such a call, so there is nothing to withhold.
//
// The health and reflection services are not KeyBroker calls and are not
// recorded, as in the interceptor.

// ServerOptions are the options a gRPC server serving s needs besides its
// credentials and interceptors (UnaryInterceptor stays the caller's to
// chain).
func (s *Server) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ForceServerCodecV2(malformedCodec{base: encoding.GetCodecV2(grpcproto.Name), marks: &s.malformed}),
		grpc.StatsHandler(gapRecorder{s}),
		grpc.UnknownServiceHandler(s.unknownMethod),
	}
}

// malformedCodec is the proto codec, except that a KeyBroker request that
// does not decode is reset, remembered in marks and handed on: the
// interceptor, which gets the same message, takes the mark (takeMalformed).
type malformedCodec struct {
	base  encoding.CodecV2
	marks *sync.Map // proto.Message → struct{}
}

func (c malformedCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }
func (c malformedCodec) Name() string                           { return c.base.Name() }

func (c malformedCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.base.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	m, ok := v.(proto.Message)
	if !ok || m.ProtoReflect().Descriptor().ParentFile().Package() != kbv1.File_keybroker_v1_keybroker_proto.Package() {
		return err
	}
	proto.Reset(m)
	c.marks.Store(m, struct{}{})
	return nil
}

// takeMalformed reports whether req is a request that did not decode, and
// forgets it.
func (s *Server) takeMalformed(req any) bool {
	m, ok := req.(proto.Message)
	if !ok {
		return false
	}
	_, bad := s.malformed.LoadAndDelete(m)
	return bad
}

// unknownMethod answers a call of a method no service has, and records it.
func (s *Server) unknownMethod(_ any, stream grpc.ServerStream) error {
	ctx := stream.Context()
	markSeen(ctx)
	start := time.Now()
	method, _ := grpc.MethodFromServerStream(stream)
	var caller Caller
	id, ok := authn.FromContext(ctx)
	if ok {
		caller.Tenant, caller.Identity, ok = s.access.Load().resolver.Resolve(id)
	}
	err := errUnknownMethod
	if !ok {
		err = errUnmapped
	}
	if notRecorded(method) || s.audit == nil {
		return err
	}
	rec := gapRecord(method, caller, status.Code(err), time.Since(start))
	if aerr := s.audit.Write(context.WithoutCancel(ctx), rec); aerr != nil {
		s.auditFailed(rec, aerr)
		return errAuditUnavailable
	}
	return err
}

// gapRecord is the audit record of a call no handler ran.
func gapRecord(method string, caller Caller, code codes.Code, latency time.Duration) audit.Record {
	return audit.Record{
		RequestID: newRequestID(),
		Tenant:    caller.Tenant,
		Caller:    boundField(caller.Identity),
		Method:    boundField(method),
		Code:      codeName(code),
		LatencyMS: float64(latency.Microseconds()) / 1000,
	}
}

// auditFailed logs and counts a record of a call refused by gRPC that could
// not be written.
func (s *Server) auditFailed(rec audit.Record, err error) {
	s.log.Error("audit record of a call refused by gRPC not written", "method", rec.Method, "err", err)
	if s.observer != nil {
		s.observer.AuditWriteFailed()
	}
}

// rpcMark follows one call from the stats handler's tag to its end: seen
// is set once the interceptor has taken the call (and written its record).
type rpcMark struct {
	method string
	seen   atomic.Bool
}

type rpcMarkKey struct{}

// markSeen tells the stats handler that the interceptor has the call.
func markSeen(ctx context.Context) {
	if m, ok := ctx.Value(rpcMarkKey{}).(*rpcMark); ok {
		m.seen.Store(true)
	}
}

// gapRecorder is the stats handler that records the calls the interceptor
// never saw.
type gapRecorder struct{ s *Server }

func (g gapRecorder) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	return context.WithValue(ctx, rpcMarkKey{}, &rpcMark{method: info.FullMethodName})
}

func (g gapRecorder) HandleRPC(ctx context.Context, st stats.RPCStats) {
	end, ok := st.(*stats.End)
	if !ok || g.s.audit == nil {
		return
	}
	m, ok := ctx.Value(rpcMarkKey{}).(*rpcMark)
	if !ok || m.seen.Load() || notRecorded(m.method) {
		return
	}
	var caller Caller
	if id, ok := authn.FromContext(ctx); ok {
		caller.Tenant, caller.Identity, _ = g.s.access.Load().resolver.Resolve(id)
	}
	rec := gapRecord(m.method, caller, status.Code(end.Error), end.EndTime.Sub(end.BeginTime))
	if err := g.s.audit.Write(context.WithoutCancel(ctx), rec); err != nil {
		g.s.auditFailed(rec, err)
	}
}

func (gapRecorder) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (gapRecorder) HandleConn(context.Context, stats.ConnStats)                       {}

// notRecorded tells the services whose calls are not audit records.
func notRecorded(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.v1.") || strings.HasPrefix(method, "/grpc.reflection.")
}
