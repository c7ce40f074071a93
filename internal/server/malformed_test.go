package server

import (
	"math/rand"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// rawCodec sends bytes as they are, so a test can put any wire bytes in a
// request.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return v.([]byte), nil }
func (rawCodec) Unmarshal(b []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), b...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// TestMalformedMessages sends 10,000 malformed requests — random bytes,
// truncated and bit-flipped valid messages, invalid UTF-8 in strings,
// unknown fields — to every method. None may crash the server or succeed in
// signing with garbage, and a good request still works afterwards.
func TestMalformedMessages(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	good, _ := proto.Marshal(&kbv1.SignRequest{Name: "k", Digest: make([]byte, 32), Hash: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA256})
	methods := []string{}
	for _, m := range kbv1.KeyBroker_ServiceDesc.Methods {
		methods = append(methods, "/keybroker.v1.KeyBroker/"+m.MethodName)
	}
	rng := rand.New(rand.NewSource(1))
	mutate := func(i int) []byte {
		switch i % 5 {
		case 0: // random bytes
			b := make([]byte, rng.Intn(256))
			rng.Read(b)
			return b
		case 1: // truncated
			return good[:rng.Intn(len(good))]
		case 2: // a bit flipped
			b := append([]byte(nil), good...)
			b[rng.Intn(len(b))] ^= 1 << uint(rng.Intn(8))
			return b
		case 3: // invalid UTF-8 in the name (field 1)
			return append([]byte{0x0a, 0x03, 0xff, 0xfe, 0xfd}, good[5:]...)
		default: // unknown fields and a huge length prefix
			return append(append([]byte(nil), good...), 0xfa, 0x3f, 0xff, 0xff, 0xff, 0xff, 0x0f)
		}
	}
	signed := 0
	for i := 0; i < 10000; i++ {
		var reply []byte
		m := methods[i%len(methods)]
		err := s.conn.Invoke(ctx, m, mutate(i), &reply, grpc.ForceCodec(rawCodec{}))
		if err == nil && m == kbv1.KeyBroker_Sign_FullMethodName {
			signed++
		}
		if st, _ := status.FromError(err); st.Code() == codes.Unavailable {
			t.Fatalf("call %d (%s): server unavailable: %v", i, m, err)
		}
	}
	// Bit flips can leave a valid request now and then; garbage must not.
	if signed > 10000/len(methods)/5 {
		t.Errorf("%d malformed Sign requests signed", signed)
	}
	// Oversized: more than the server takes.
	var reply []byte
	if err := s.conn.Invoke(ctx, kbv1.KeyBroker_Sign_FullMethodName, make([]byte, 5<<20), &reply, grpc.ForceCodec(rawCodec{})); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("5 MiB request: %v, want ResourceExhausted", err)
	}
	if _, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)}); err != nil {
		t.Fatalf("a good Sign after the malformed ones: %v", err)
	}
}
