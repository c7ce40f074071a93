package main

import (
	"context"
	"time"

	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// assertionFake is the fake broker with CreateClientAssertion.
type assertionFake struct {
	*fakeBroker
	req *kbv1.CreateClientAssertionRequest
}

func (f *assertionFake) CreateClientAssertion(_ context.Context, req *kbv1.CreateClientAssertionRequest) (*kbv1.CreateClientAssertionResponse, error) {
	version, kid, err := record(f.fakeBroker, &f.req, req)
	if err != nil {
		return nil, err
	}
	if req.GetAudience() == "http://as.example/token" {
		return nil, status.Error(codes.InvalidArgument, "invalid audience: want https")
	}
	return &kbv1.CreateClientAssertionResponse{Assertion: "hdr." + req.GetClientId() + ".sig", Kid: kid, Version: version,
		Jti: "jti-1", ExpireTime: timestamppb.New(time.Unix(1_700_000_300, 0))}, nil
}

func TestClientAssertionCommand(t *testing.T) {
	fake := &assertionFake{fakeBroker: newFakeBroker(t)}
	socket, _ := startFake(t, fake)

	runAt(socket, "client-assertion", "alpha", "--client-id", "app", "--audience", "https://as.example/token").
		check(t, exitOK, "hdr.app.sig\n", "")
	wantRequest(t, locked(fake.fakeBroker, &fake.req), &kbv1.CreateClientAssertionRequest{Name: "alpha", ClientId: "app", Audience: "https://as.example/token"})

	runAt(socket, "client-assertion", "alpha", "--client-id", "app", "--audience", "https://as.example/token", "--lifetime", "1h", "--nbf", "--version", "1").
		check(t, exitOK, "hdr.app.sig\n", "")
	wantRequest(t, locked(fake.fakeBroker, &fake.req), &kbv1.CreateClientAssertionRequest{Name: "alpha", Version: 1, ClientId: "app",
		Audience: "https://as.example/token", Lifetime: durationpb.New(time.Hour), NotBefore: true})

	r := runAt(socket, "client-assertion", "alpha", "--client-id", "app", "--audience", "https://as.example/token", "-o", "json")
	r.check(t, exitOK, r.stdout, "")
	wantResponse(t, r.stdout, &kbv1.CreateClientAssertionResponse{Assertion: "hdr.app.sig", Kid: "kid-a2", Version: 2, Jti: "jti-1",
		ExpireTime: timestamppb.New(time.Unix(1_700_000_300, 0))})

	// Refused before any call (the last request stays the JSON one), and
	// the daemon's INVALID_ARGUMENT, both exit 2.
	setLocked(fake.fakeBroker, &fake.req, nil)
	for _, args := range [][]string{
		{"alpha", "--audience", "https://as.example/token"},
		{"alpha", "--client-id", "app"},
		{"alpha", "--client-id", "app", "--audience", "https://as.example/token", "--lifetime", "61m"},
		{"alpha", "--client-id", "app", "--audience", "https://as.example/token", "--lifetime", "-5m"},
		{"alpha", "--client-id", "app", "--audience", "https://as.example/token", "--version", "1", "--kid", "kid-a1"},
		{"--client-id", "app", "--audience", "https://as.example/token"},
	} {
		if r := runAt(socket, append([]string{"client-assertion"}, args...)...); r.code != exitUsage || r.stdout != "" {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want a usage error", args, r.code, r.stdout, r.stderr)
		}
	}
	if got := locked(fake.fakeBroker, &fake.req); got != nil {
		t.Errorf("a refused command called keybrokerd: %v", got)
	}
	runAt(socket, "client-assertion", "alpha", "--client-id", "app", "--audience", "http://as.example/token").
		check(t, exitUsage, "", "keybrokerctl: invalid audience: want https\n")
	runAt(socket, "client-assertion", "nope", "--client-id", "app", "--audience", "https://as.example/token").
		check(t, exitNotFound, "", "keybrokerctl: key not found\n")
}
