package server

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/authn"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
)

// The interceptor path of Sign and GetJWKS — authentication, role check,
// quota, handler, keyring, status conversion, log line, audit record —
// on a backend that answers at once, so only the daemon's own cost per
// call is measured (no gRPC transport, no hardware):
//
//	go test -run '^$' -bench . -benchmem ./internal/server/

// instantBackend generates software P-256 keys and "signs" with one
// fixed DER signature.
type instantBackend struct{ sig []byte }

func (b *instantBackend) Generate(context.Context, kms.Partition, kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	d := sha256.Sum256([]byte("bench"))
	if b.sig, err = ecdsa.SignASN1(rand.Reader, priv, d[:]); err != nil {
		return nil, nil, err
	}
	h := make([]byte, 16)
	rand.Read(h)
	return h, priv.Public(), nil
}

func (b *instantBackend) Sign(context.Context, kms.Partition, kms.Handle, []byte, crypto.SignerOpts) ([]byte, error) {
	return b.sig, nil
}
func (*instantBackend) Destroy(context.Context, kms.Partition, kms.Handle) error { return nil }
func (*instantBackend) Probe(context.Context) error                              { return nil }
func (*instantBackend) Close() error                                             { return nil }

type discardSink struct{}

func (discardSink) Write(p []byte) (int, error) { return len(p), nil }
func (discardSink) Sync() error                 { return nil }

// benchServer serves tenant "bench" (mTLS CN "bench", signer and admin)
// with one ES256 key "k", and returns a context carrying that peer.
func benchServer(b *testing.B, auditTo string) (*Server, context.Context) {
	b.Helper()
	st, err := store.Open(filepath.Join(b.TempDir(), "kb.db"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { st.Close() })
	ring, err := keyring.New(keyring.Options{Backend: &instantBackend{}, BackendName: "bench", Store: st})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := ring.CreateKey(context.Background(), "bench", "k", kms.KeySpec{Alg: kms.ES256}, kms.Policy{}); err != nil {
		b.Fatal(err)
	}
	access, err := NewAccess([]TenantPolicy{{Name: "bench", Identities: authn.Rule{CommonNames: []string{"bench"}}, Roles: RoleSigner | RoleAdmin}})
	if err != nil {
		b.Fatal(err)
	}
	o := Options{Ring: ring, Access: access}
	switch auditTo {
	case "discard":
		l, err := audit.Open("", audit.Options{Sink: discardSink{}})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { l.Close() })
		o.Audit = l
	case "file":
		l, err := audit.Open(filepath.Join(b.TempDir(), "audit.jsonl"), audit.Options{Timeout: 10 * time.Second})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { l.Close() })
		o.Audit = l
	}
	leaf := &x509.Certificate{Subject: pkix.Name{CommonName: "bench"}}
	ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{
		State: tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf}}},
	}})
	// A stream, as gRPC gives every call: without one, the interceptor's
	// SetHeader (x-request-id) fails, and building that error (it formats
	// the context) would be most of what the benchmark measures.
	ctx = grpc.NewContextWithServerTransportStream(ctx, benchStream{})
	return New(o), ctx
}

// benchStream is the grpc.ServerTransportStream of a benchmark call: it
// accepts the headers and trailers the interceptor sets, and drops them.
type benchStream struct{}

func (benchStream) Method() string               { return "" }
func (benchStream) SetHeader(metadata.MD) error  { return nil }
func (benchStream) SendHeader(metadata.MD) error { return nil }
func (benchStream) SetTrailer(metadata.MD) error { return nil }

func BenchmarkInterceptorSign(b *testing.B) {
	digest := sha256.Sum256([]byte("bench"))
	for _, auditTo := range []string{"none", "discard", "file"} {
		b.Run("audit="+auditTo, func(b *testing.B) {
			s, ctx := benchServer(b, auditTo)
			info := &grpc.UnaryServerInfo{FullMethod: kbv1.KeyBroker_Sign_FullMethodName}
			handler := func(ctx context.Context, req any) (any, error) { return s.Sign(ctx, req.(*kbv1.SignRequest)) }
			req := &kbv1.SignRequest{Name: "k", Digest: digest[:], Format: kbv1.SignatureFormat_SIGNATURE_FORMAT_JOSE}
			b.ReportAllocs()
			b.SetParallelism(8)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := s.UnaryInterceptor(ctx, req, info, handler); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

func BenchmarkInterceptorGetJWKS(b *testing.B) {
	s, ctx := benchServer(b, "discard")
	info := &grpc.UnaryServerInfo{FullMethod: kbv1.KeyBroker_GetJWKS_FullMethodName}
	handler := func(ctx context.Context, req any) (any, error) { return s.GetJWKS(ctx, req.(*kbv1.GetJWKSRequest)) }
	req := &kbv1.GetJWKSRequest{}
	b.ReportAllocs()
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.UnaryInterceptor(ctx, req, info, handler); err != nil {
				b.Fatal(err)
			}
		}
	})
}
