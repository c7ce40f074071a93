package client_test

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/internal/testdaemon"
)

// TestSignStreamSigner: with WithSignStream, Signers used from many
// goroutines at once sign over SignStream messages (one audit record each,
// none unary), and every signature verifies with the version's key.
func TestSignStreamSigner(t *testing.T) {
	d := testdaemon.Shared()
	before := auditMethods(t, d.Config.AuditPath())
	c, err := client.Dial(d.Socket, client.WithSignStream())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	signers := []*client.Signer{newKey(t, c, kbv1.Algorithm_ALGORITHM_ES256), newKey(t, c, kbv1.Algorithm_ALGORITHM_RS256)}
	const workers, each = 32, 10
	var wg sync.WaitGroup
	var bad atomic.Int64
	for w := range workers {
		wg.Go(func() {
			s := signers[w%len(signers)]
			for i := range each {
				d := sha256.Sum256(fmt.Appendf(nil, "worker %d call %d", w, i))
				sig, err := s.Sign(nil, d[:], crypto.SHA256)
				if err != nil {
					t.Errorf("worker %d: %v", w, err)
					bad.Add(1)
					return
				}
				var ok bool
				switch pub := s.Public().(type) {
				case *ecdsa.PublicKey:
					ok = ecdsa.VerifyASN1(pub, d[:], sig)
				case *rsa.PublicKey:
					ok = rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig) == nil
				}
				if !ok {
					t.Errorf("worker %d call %d: the signature does not verify", w, i)
					bad.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if bad.Load() > 0 {
		return
	}
	after := auditMethods(t, d.Config.AuditPath())
	stream, unary := after["SignStream"]-before["SignStream"], after["Sign"]-before["Sign"]
	if stream != workers*each || unary != 0 {
		t.Errorf("new audit records: %d SignStream and %d Sign, want %d and 0", stream, unary, workers*each)
	}
}

// auditMethods counts the audit log's records by short method name.
func auditMethods(t *testing.T, path string) map[string]int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r struct{ Method string }
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatal(err)
		}
		n[filepath.Base(r.Method)]++
	}
	return n
}

// streamlessDaemon is a KeyBroker service from before SignStream: its Sign
// answers a fixed signature. A fake: the SDK's fallback is what is tested.
type streamlessDaemon struct {
	kbv1.UnimplementedKeyBrokerServer
	signs atomic.Int64
}

func (f *streamlessDaemon) Sign(context.Context, *kbv1.SignRequest) (*kbv1.SignResponse, error) {
	f.signs.Add(1)
	return &kbv1.SignResponse{Signature: []byte("unary")}, nil
}

// breakingDaemon answers nothing on its first stream and ends it with
// INTERNAL once it has read `hold` messages; later streams sign.
type breakingDaemon struct {
	kbv1.UnimplementedKeyBrokerServer
	hold    int
	streams atomic.Int64
}

func (f *breakingDaemon) SignStream(st kbv1.KeyBroker_SignStreamServer) error {
	first := f.streams.Add(1) == 1
	for n := 0; ; n++ {
		if first && n == f.hold {
			return status.Error(codes.Internal, "daemon fell over")
		}
		m, err := st.Recv()
		if err != nil {
			return err
		}
		if !first {
			if err := st.Send(&kbv1.SignStreamResponse{Id: m.GetId(), Result: &kbv1.SignStreamResponse_Response{Response: &kbv1.SignResponse{Signature: []byte("stream")}}}); err != nil {
				return err
			}
		}
	}
}

// serveFake serves srv on a unix socket and returns its path.
func serveFake(t *testing.T, srv kbv1.KeyBrokerServer) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kbf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	kbv1.RegisterKeyBrokerServer(g, srv)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	return sock
}

// TestSignStreamFallsBackToUnary: a daemon without SignStream is called
// unary, the calls that met the UNIMPLEMENTED included; none fails.
func TestSignStreamFallsBackToUnary(t *testing.T) {
	fake := &streamlessDaemon{}
	c, err := client.Dial(serveFake(t, fake), client.WithSignStream())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const n = 40
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			resp, err := c.Sign(context.Background(), &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)})
			if err != nil || string(resp.GetSignature()) != "unary" {
				t.Errorf("Sign against a daemon without SignStream: %q, %v", resp.GetSignature(), err)
			}
		})
	}
	wg.Wait()
	if got := fake.signs.Load(); got != n {
		t.Errorf("%d unary Sign calls reached the daemon, want %d (each call once)", got, n)
	}
}

// TestSignStreamBreaks: a stream that ends fails the calls waiting on it
// with UNAVAILABLE, and the next call opens a new stream.
func TestSignStreamBreaks(t *testing.T) {
	const inFlight = 5
	fake := &breakingDaemon{hold: inFlight}
	c, err := client.Dial(serveFake(t, fake), client.WithSignStream(), client.WithTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	for range inFlight {
		wg.Go(func() {
			_, err := c.Sign(context.Background(), &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)})
			if status.Code(err) != codes.Unavailable {
				t.Errorf("a call in flight when the stream broke: %v, want Unavailable", err)
			}
		})
	}
	wg.Wait()
	resp, err := c.Sign(context.Background(), &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)})
	if err != nil || string(resp.GetSignature()) != "stream" {
		t.Fatalf("the call after the break: %q, %v; want a signature over a new stream", resp.GetSignature(), err)
	}
	if got := fake.streams.Load(); got != 2 {
		t.Errorf("%d streams opened, want 2", got)
	}
}
