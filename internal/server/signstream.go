package server

import (
	"context"
	"errors"
	"io"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// streamInFlight bounds the requests of one SignStream being handled at
// once. Past it the stream is not read, so gRPC flow control holds the
// client back, as MaxConcurrentStreams does for unary calls.
const streamInFlight = 64

// signStreamInfo names the stream's messages to handle: authorization
// (methodRoles), the audit record and the metrics say SignStream.
var signStreamInfo = &grpc.UnaryServerInfo{FullMethod: kbv1.KeyBroker_SignStream_FullMethodName}

// SignStream handles each request as a unary Sign (see handle): the caller
// is authenticated from the stream's peer for every message, and each
// message has its own request id, quota token, call timeout and durable
// audit record before its response is sent. Requests run concurrently and
// are answered as they complete. A message that does not decode ends the
// stream with INVALID_ARGUMENT (its id cannot be read), after its audit
// record and the answers of the requests already in flight.
func (s *Server) SignStream(stream kbv1.KeyBroker_SignStreamServer) error {
	ctx := stream.Context()
	markSeen(ctx)
	var (
		sendMu  sync.Mutex
		sendErr error
		wg      sync.WaitGroup
		slots   = make(chan struct{}, streamInFlight)
	)
	// The requests in flight are answered before the stream ends, also
	// when it ends because the daemon stops (its context): as a graceful
	// stop lets unary calls finish.
	defer wg.Wait()
	send := func(m *kbv1.SignStreamResponse) {
		sendMu.Lock()
		defer sendMu.Unlock()
		if sendErr == nil {
			sendErr = stream.Send(m)
		}
	}
	sign := func(ctx context.Context, req any) (any, error) { return s.Sign(ctx, req.(*kbv1.SignRequest)) }
	msgs, recvErr := receive(ctx, stream)
	for {
		var msg *kbv1.SignStreamRequest
		select {
		case msg = <-msgs:
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
		reqID := newRequestID()
		if s.takeMalformed(msg) {
			wg.Wait()
			_, err := s.handle(ctx, reqID, &kbv1.SignRequest{}, true, signStreamInfo, sign)
			return err
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
		wg.Go(func() {
			defer func() { <-slots }()
			mctx, cancel := s.callContext(context.WithoutCancel(ctx))
			defer cancel()
			req := msg.GetRequest()
			if req == nil {
				req = &kbv1.SignRequest{}
			}
			resp, err := s.handle(mctx, reqID, req, false, signStreamInfo, sign)
			out := &kbv1.SignStreamResponse{Id: msg.GetId(), RequestId: reqID}
			if err != nil {
				st := status.Convert(err).Proto()
				out.Result = &kbv1.SignStreamResponse_Error{Error: &kbv1.Status{Code: st.GetCode(), Message: st.GetMessage(), Details: st.GetDetails()}}
			} else {
				out.Result = &kbv1.SignStreamResponse_Response{Response: resp.(*kbv1.SignResponse)}
			}
			send(out)
		})
	}
}

// receive reads the stream from a goroutine of its own, so that the
// handler can end the stream when its context ends (the daemon stopping)
// while a Recv waits for the client. The goroutine ends with the stream.
func receive(ctx context.Context, stream kbv1.KeyBroker_SignStreamServer) (<-chan *kbv1.SignStreamRequest, <-chan error) {
	msgs, errc := make(chan *kbv1.SignStreamRequest), make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				errc <- err
				return
			}
			select {
			case msgs <- m:
			case <-ctx.Done():
				return
			}
		}
	}()
	return msgs, errc
}

// callContext bounds one stream message as a unary call is bounded
// (limits.call_timeout); the message's work does not end with the stream.
func (s *Server) callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if s.callTimeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, s.callTimeout)
}
