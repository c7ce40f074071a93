package server

import (
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

func TestRotateKeyOverTheSocket(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	ck, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
	if err != nil {
		t.Fatal(err)
	}
	v1 := ck.Key.ActiveKid
	if ck.Key.Policy.GetRotationPeriod().AsDuration() != 90*24*time.Hour || ck.Key.NextRotationTime == nil {
		t.Errorf("new key policy %v next rotation %v", ck.Key.Policy, ck.Key.NextRotationTime)
	}
	if v := ck.Key.Versions[0]; v.NextState != kbv1.KeyState_KEY_STATE_RETIRED || v.NextTransitionTime == nil || v.ActivateTime == nil {
		t.Errorf("version 1 next transition: %v", v)
	}

	// 100 concurrent guarded rotations: exactly one new version.
	var wg sync.WaitGroup
	var rotated atomic.Int64
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "k", IfActiveVersion: 1})
			if err != nil {
				t.Error(err)
				return
			}
			if resp.Rotated {
				rotated.Add(1)
			}
		}()
	}
	wg.Wait()
	gk, err := s.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: "k"})
	if err != nil {
		t.Fatal(err)
	}
	if rotated.Load() != 1 || len(gk.Key.Versions) != 2 || gk.Key.ActiveVersion != 2 {
		t.Fatalf("%d rotated, %d versions, active v%d", rotated.Load(), len(gk.Key.Versions), gk.Key.ActiveVersion)
	}
	if gk.Key.Versions[0].State != kbv1.KeyState_KEY_STATE_RETIRED || gk.Key.Versions[0].NextState != kbv1.KeyState_KEY_STATE_EXPIRED {
		t.Errorf("v1 after rotation: %v", gk.Key.Versions[0])
	}
	// Both versions are in the JWKS and v1 signs when named.
	jr, _ := s.client.GetJWKS(ctx, &kbv1.GetJWKSRequest{})
	if !strings.Contains(jr.Jwks, v1) || !strings.Contains(jr.Jwks, gk.Key.ActiveKid) {
		t.Errorf("JWKS lacks a version: %s", jr.Jwks)
	}
	sr, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Kid: v1, Digest: make([]byte, 32)})
	if err != nil || sr.Version != 1 {
		t.Errorf("Sign by retired kid: %v %v", err, sr)
	}

	// Revoke v1: out of the JWKS, and Sign names why.
	if _, err := s.client.RevokeKeyVersion(ctx, &kbv1.RevokeKeyVersionRequest{Name: "k", Version: 1}); err != nil {
		t.Fatal(err)
	}
	jr, _ = s.client.GetJWKS(ctx, &kbv1.GetJWKSRequest{})
	if strings.Contains(jr.Jwks, v1) {
		t.Error("revoked kid still in the JWKS")
	}
	_, err = s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Kid: v1, Digest: make([]byte, 32)})
	st := status.Convert(err)
	if st.Code() != codes.FailedPrecondition {
		t.Fatalf("Sign with a revoked kid: %v", err)
	}
	var info *errdetails.ErrorInfo
	for _, d := range st.Details() {
		if i, ok := d.(*errdetails.ErrorInfo); ok {
			info = i
		}
	}
	if info == nil || info.Reason != "KEY_VERSION_NOT_USABLE" || info.Metadata["state"] != "REVOKED" {
		t.Errorf("ErrorInfo %v, want KEY_VERSION_NOT_USABLE with state REVOKED", info)
	}
}

func TestUpdatePolicyOverTheSocket(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	_, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256,
		Policy: &kbv1.RotationPolicy{RotationPeriod: durationpb.New(30 * 24 * time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := s.client.UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: "k", Policy: &kbv1.RotationPolicy{Overlap: durationpb.New(60 * 24 * time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	p := resp.Key.Policy
	if p.RotationPeriod.AsDuration() != 30*24*time.Hour || p.Overlap.AsDuration() != 60*24*time.Hour || p.PrePublicationLead.AsDuration() != 7*24*time.Hour {
		t.Errorf("policy after update: %v", p)
	}
	before := s.backend.calls.Load()
	for field, pol := range map[string]*kbv1.RotationPolicy{
		"policy.pre_publication_lead": {PrePublicationLead: durationpb.New(100 * 24 * time.Hour)},
		"policy.overlap":              {Overlap: durationpb.New(-time.Hour)},
		"policy.rotation_period":      {RotationPeriod: durationpb.New(time.Minute)},
		"policy.destroy_delay":        {DestroyDelay: &durationpb.Duration{Seconds: 1, Nanos: -1}},
	} {
		_, err := s.client.UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: "k", Policy: pol})
		if st := status.Convert(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), field) {
			t.Errorf("%s: got %v, want InvalidArgument naming it", field, err)
		}
		_, err = s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k2", Algorithm: kbv1.Algorithm_ALGORITHM_ES256, Policy: pol})
		if st := status.Convert(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), field) {
			t.Errorf("CreateKey %s: got %v, want InvalidArgument naming it", field, err)
		}
	}
	if n := s.backend.calls.Load() - before; n != 0 {
		t.Errorf("%d backend calls for invalid policies", n)
	}
	if _, err := s.client.UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: "k"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("UpdatePolicy without a policy: %v", err)
	}
	if _, err := s.client.UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: "nope", Policy: &kbv1.RotationPolicy{}}); status.Code(err) != codes.NotFound {
		t.Errorf("UpdatePolicy of a missing key: %v", err)
	}
	if _, err := s.client.RotateKey(ctx, &kbv1.RotateKeyRequest{Name: "nope"}); status.Code(err) != codes.NotFound {
		t.Errorf("RotateKey of a missing key: %v", err)
	}
	if _, err := s.client.RevokeKeyVersion(ctx, &kbv1.RevokeKeyVersionRequest{Name: "k", Version: 9}); status.Code(err) != codes.NotFound {
		t.Errorf("RevokeKeyVersion of a missing version: %v", err)
	}
}
