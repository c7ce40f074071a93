package server

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
	"github.com/keybroker/keybroker/internal/testpki"
)

// streamAll sends reqs on one SignStream at once (ids 1..n), then reads
// every answer; it fails the test unless each id is answered exactly once.
func streamAll(t *testing.T, c kbv1.KeyBrokerClient, reqs []*kbv1.SignRequest) map[uint64]*kbv1.SignStreamResponse {
	t.Helper()
	ctx := ctxT(t)
	st, err := c.SignStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range reqs {
		if err := st.Send(&kbv1.SignStreamRequest{Id: uint64(i + 1), Request: r}); err != nil {
			t.Fatalf("Send %d: %v", i+1, err)
		}
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	got := map[uint64]*kbv1.SignStreamResponse{}
	for range reqs {
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("Recv after %d of %d answers: %v", len(got), len(reqs), err)
		}
		if _, dup := got[resp.GetId()]; dup || resp.GetId() < 1 || resp.GetId() > uint64(len(reqs)) {
			t.Fatalf("answer with id %d: unknown or repeated", resp.GetId())
		}
		got[resp.GetId()] = resp
	}
	if resp, err := st.Recv(); err == nil {
		t.Fatalf("an answer more than asked: id %d", resp.GetId())
	} else if !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v", err)
	}
	return got
}

func streamStatus(r *kbv1.SignStreamResponse) *status.Status {
	e := r.GetError()
	if e == nil {
		return status.New(codes.OK, "")
	}
	return status.FromProto(&spb.Status{Code: e.GetCode(), Message: e.GetMessage(), Details: e.GetDetails()})
}

// TestSignStreamIsSignPerMessage: every message of a stream is a Sign call
// of the stream's caller — its tenant's keys only, each validated, each
// with its own audit record (whose request id the answer carries) — and
// one message's error does not end the stream. Answers are matched by id.
func TestSignStreamIsSignPerMessage(t *testing.T) {
	ctx := ctxT(t)
	rec := &scriptedAudit{}
	s := newMTLSStack(t, stackOpts{tenants: threeTenants, audit: rec}, "client-a", "client-b")
	a, b := s.clients["client-a"], s.clients["client-b"]
	created, err := a.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "only-b", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	pubResp, err := a.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: "k"})
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.ParsePKIXPublicKey(pubResp.GetDer())
	if err != nil {
		t.Fatal(err)
	}

	const n = 300
	reqs := make([]*kbv1.SignRequest, n)
	for i := range reqs {
		switch i % 5 {
		case 0:
			reqs[i] = &kbv1.SignRequest{Name: "k", Digest: make([]byte, 31)} // bad digest
		case 1:
			reqs[i] = &kbv1.SignRequest{Name: "only-b", Digest: make([]byte, 32)} // another tenant's key
		case 2:
			reqs[i] = &kbv1.SignRequest{Name: "absent", Digest: make([]byte, 32)}
		default:
			reqs[i] = &kbv1.SignRequest{Name: "k", Digest: digestOf(crypto.SHA256, fmt.Sprint("message ", i))}
		}
	}
	got := streamAll(t, a, reqs)

	for id, resp := range got {
		i := int(id - 1)
		st := streamStatus(resp)
		switch i % 5 {
		case 0:
			if st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "digest") {
				t.Errorf("id %d, a 31-byte digest: %v %q, want InvalidArgument naming digest", id, st.Code(), st.Message())
			}
		case 1, 2:
			// Another tenant's key is answered as a key that does not exist.
			want := strings.ReplaceAll(streamStatus(got[3]).Message(), "absent", reqs[i].Name)
			if st.Code() != codes.NotFound || st.Message() != want {
				t.Errorf("id %d (%s): %v %q, want NotFound %q", id, reqs[i].Name, st.Code(), st.Message(), want)
			}
		default:
			if st.Code() != codes.OK {
				t.Fatalf("id %d: %v", id, st.Err())
			}
			r := resp.GetResponse()
			if r.GetKid() != created.GetKey().GetActiveKid() || r.GetAlgorithm() != kbv1.Algorithm_ALGORITHM_ES256 {
				t.Errorf("id %d signed by %q %v, want %q ES256", id, r.GetKid(), r.GetAlgorithm(), created.GetKey().GetActiveKid())
			}
			if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), reqs[i].Digest, r.GetSignature()) {
				t.Errorf("id %d: the signature does not verify with key k of tenant a over its own digest", id)
			}
		}
	}

	// One audit record per message, of tenant a, under the id its answer
	// names; the signed ones with their digest's hash.
	recs := rec.records(kbv1.KeyBroker_SignStream_FullMethodName)
	if len(recs) != n {
		t.Fatalf("%d SignStream audit records for %d messages", len(recs), n)
	}
	byID := map[string]audit.Record{}
	for _, r := range recs {
		byID[r.RequestID] = r
	}
	for id, resp := range got {
		r, ok := byID[resp.GetRequestId()]
		if !ok {
			t.Fatalf("id %d: no audit record with request id %q", id, resp.GetRequestId())
		}
		req := reqs[id-1]
		if r.Tenant != "a" || r.Key != req.Name || r.Code != codeName(streamStatus(resp).Code()) {
			t.Errorf("id %d: audit record %+v, want tenant a, key %q, code %v", id, r, req.Name, streamStatus(resp).Code())
		}
		if streamStatus(resp).Code() == codes.OK && r.DigestSHA256 != audit.DigestSHA256(req.Digest) {
			t.Errorf("id %d: audit digest %q, want the SHA-256 of the signed digest", id, r.DigestSHA256)
		}
	}
}

// TestSignStreamRolesAndQuota: the role and the signing quota apply to each
// message as to a Sign call, with the quota's retry delay in the details.
func TestSignStreamRolesAndQuota(t *testing.T) {
	ctx := ctxT(t)
	a := cnTenant("a", RoleSigner|RoleAdmin)
	a.SignsPerSecond, a.Burst = 1.0/3600, 3 // three signatures, then none for an hour
	s := newMTLSStack(t, stackOpts{tenants: []TenantPolicy{a, cnTenant("adm", RoleAdmin)}}, "client-a", "client-adm")
	if _, err := s.clients["client-a"].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.clients["client-adm"].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	reqs := make([]*kbv1.SignRequest, 10)
	for i := range reqs {
		reqs[i] = &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)}
	}
	ok, exhausted := 0, 0
	for id, resp := range streamAll(t, s.clients["client-a"], reqs) {
		st := streamStatus(resp)
		switch st.Code() {
		case codes.OK:
			ok++
		case codes.ResourceExhausted:
			exhausted++
			retry := false
			for _, d := range st.Details() {
				if ri, isRetry := d.(*errdetails.RetryInfo); isRetry && ri.GetRetryDelay().AsDuration() > 0 {
					retry = true
				}
			}
			if !retry {
				t.Errorf("id %d over the quota: no RetryInfo delay in the details", id)
			}
		default:
			t.Errorf("id %d: %v", id, st.Err())
		}
	}
	if ok != 3 || exhausted != 7 {
		t.Errorf("%d signed and %d refused for the quota, want 3 and 7", ok, exhausted)
	}
	for id, resp := range streamAll(t, s.clients["client-adm"], reqs[:4]) {
		if st := streamStatus(resp); st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), "signer") {
			t.Errorf("id %d from an admin-only tenant: %v %q, want PermissionDenied naming the signer role", id, st.Code(), st.Message())
		}
	}
}

// TestSignStreamMalformedEndsIt: a message that does not decode cannot be
// answered by id; it is audited and ends the stream with INVALID_ARGUMENT,
// after the answers of the messages before it.
func TestSignStreamMalformedEndsIt(t *testing.T) {
	ctx := ctxT(t)
	rec := &scriptedAudit{}
	s := newMTLSStack(t, stackOpts{tenants: threeTenants, audit: rec}, "client-a")
	if _, err := s.clients["client-a"].CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	conn := s.dialLeaf(t, s.ca, testpki.Leaf{CommonName: "client-a"})
	desc := &grpc.StreamDesc{StreamName: "SignStream", ServerStreams: true, ClientStreams: true}
	st, err := conn.NewStream(ctx, desc, kbv1.KeyBroker_SignStream_FullMethodName, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	good, _ := proto.Marshal(&kbv1.SignStreamRequest{Id: 7, Request: &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)}})
	if err := st.SendMsg(good); err != nil {
		t.Fatal(err)
	}
	if err := st.SendMsg([]byte{0x0a, 0xff, 0xff}); err != nil { // a length past the end
		t.Fatal(err)
	}
	var raw []byte
	if err := st.RecvMsg(&raw); err != nil {
		t.Fatalf("the answer to the message before the malformed one: %v", err)
	}
	var first kbv1.SignStreamResponse
	if err := proto.Unmarshal(raw, &first); err != nil || first.GetId() != 7 || first.GetResponse() == nil {
		t.Fatalf("first answer: %v %v", &first, err)
	}
	err = st.RecvMsg(&raw)
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("after a malformed message: %v, want the stream ended with InvalidArgument", err)
	}
	var codesSeen []string
	for _, r := range rec.records(kbv1.KeyBroker_SignStream_FullMethodName) {
		codesSeen = append(codesSeen, r.Code)
	}
	if strings.Join(codesSeen, ",") != "OK,INVALID_ARGUMENT" {
		t.Errorf("audit records of the stream: %v, want OK,INVALID_ARGUMENT", codesSeen)
	}
}
