package client

import (
	"context"
	"errors"
	"sync"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// signMux carries concurrent Sign calls over one SignStream: each call is a
// message with its own id, answered when its signature is done, so that
// many goroutines share one stream instead of one HTTP/2 stream per call.
// A stream that breaks fails the calls in flight with UNAVAILABLE (the
// daemon may or may not have signed them); the next call opens a new one.
// A daemon without SignStream answers UNIMPLEMENTED, after which every call
// is a unary Sign.
type signMux struct {
	api kbv1.KeyBrokerClient

	mu          sync.Mutex
	cur         *muxStream // nil: none open
	unsupported bool
}

// muxStream is one open SignStream and the calls waiting on it.
type muxStream struct {
	stream kbv1.KeyBroker_SignStreamClient
	cancel context.CancelFunc

	sendMu sync.Mutex // a stream's Send is not safe for concurrent use

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan muxResult
	broken  bool
}

type muxResult struct {
	resp *kbv1.SignResponse
	err  error
	// unary: the daemon has no SignStream and did not see the request.
	unary bool
}

// sign signs req over the stream, or unary when the daemon has no stream.
func (m *signMux) sign(ctx context.Context, req *kbv1.SignRequest) (*kbv1.SignResponse, error) {
	s, err := m.stream()
	if err != nil {
		return nil, err
	}
	if s == nil {
		return m.api.Sign(ctx, req)
	}
	id, ch, ok := s.register()
	if !ok {
		// Broken between stream() and here: the next attempt opens anew.
		return m.sign(ctx, req)
	}
	// A failed Send (io.EOF) means the stream has ended: its status comes
	// from Recv, which then answers every pending call, this one included.
	s.sendMu.Lock()
	_ = s.stream.Send(&kbv1.SignStreamRequest{Id: id, Request: req})
	s.sendMu.Unlock()
	select {
	case r := <-ch:
		if r.unary {
			return m.api.Sign(ctx, req)
		}
		return r.resp, r.err
	case <-ctx.Done():
		s.forget(id)
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// stream returns the open stream, opening one if none is; nil when the
// daemon has no SignStream.
func (m *signMux) stream() (*muxStream, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.unsupported {
		return nil, nil
	}
	if m.cur != nil {
		return m.cur, nil
	}
	// The stream outlives the call that opens it: its context is the
	// client's, ended by Close (the connection's end) or by a break.
	ctx, cancel := context.WithCancel(context.Background())
	st, err := m.api.SignStream(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	s := &muxStream{stream: st, cancel: cancel, pending: map[uint64]chan muxResult{}}
	m.cur = s
	go m.receive(s)
	return s, nil
}

// receive hands each answer to its call until the stream ends, then fails
// the calls still waiting and forgets the stream.
func (m *signMux) receive(s *muxStream) {
	for {
		msg, err := s.stream.Recv()
		if err != nil {
			m.mu.Lock()
			if m.cur == s {
				m.cur = nil
			}
			if status.Code(err) == codes.Unimplemented {
				m.unsupported = true
			}
			m.mu.Unlock()
			s.fail(err)
			s.cancel()
			return
		}
		s.mu.Lock()
		ch, ok := s.pending[msg.GetId()]
		delete(s.pending, msg.GetId())
		s.mu.Unlock()
		if !ok {
			continue // its caller gave up (context done)
		}
		if e := msg.GetError(); e != nil {
			ch <- muxResult{err: status.FromProto(&spb.Status{Code: e.GetCode(), Message: e.GetMessage(), Details: e.GetDetails()}).Err()}
		} else {
			ch <- muxResult{resp: msg.GetResponse()}
		}
	}
}

// register gives a call its id; false once the stream is broken.
func (s *muxStream) register() (uint64, chan muxResult, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken {
		return 0, nil, false
	}
	s.nextID++
	ch := make(chan muxResult, 1)
	s.pending[s.nextID] = ch
	return s.nextID, ch, true
}

func (s *muxStream) forget(id uint64) {
	s.mu.Lock()
	delete(s.pending, id)
	s.mu.Unlock()
}

// fail ends the stream for its waiting calls: UNAVAILABLE (the daemon may
// have signed them, so they are not retried here), or a unary retry when
// the daemon has no SignStream (it saw none of them).
func (s *muxStream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken && len(s.pending) == 0 {
		return
	}
	s.broken = true
	r := muxResult{unary: status.Code(err) == codes.Unimplemented}
	if !r.unary {
		r.err = status.Errorf(codes.Unavailable, "keybroker sign stream broken: %v", streamCause(err))
	}
	for id, ch := range s.pending {
		ch <- r
		delete(s.pending, id)
	}
}

// streamCause is err's message without its own code, for the UNAVAILABLE
// that replaces it.
func streamCause(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Code().String() + ": " + st.Message()
	}
	if errors.Is(err, context.Canceled) {
		return "closed"
	}
	return err.Error()
}
