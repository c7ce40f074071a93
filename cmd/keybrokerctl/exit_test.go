package main

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestExitCodeFor(t *testing.T) {
	want := map[codes.Code]int{
		codes.OK:                 exitOK,
		codes.Canceled:           exitFailure,
		codes.Unknown:            exitFailure,
		codes.InvalidArgument:    exitUsage,
		codes.DeadlineExceeded:   exitUnavailable,
		codes.NotFound:           exitNotFound,
		codes.AlreadyExists:      exitConflict,
		codes.PermissionDenied:   exitFailure,
		codes.ResourceExhausted:  exitFailure,
		codes.FailedPrecondition: exitConflict,
		codes.Aborted:            exitFailure,
		codes.OutOfRange:         exitFailure,
		codes.Unimplemented:      exitFailure,
		codes.Internal:           exitFailure,
		codes.Unavailable:        exitUnavailable,
		codes.DataLoss:           exitFailure,
		codes.Unauthenticated:    exitFailure,
		codes.Code(99):           exitFailure,
	}
	for code := codes.OK; code <= codes.Unauthenticated; code++ {
		if _, ok := want[code]; !ok {
			t.Errorf("no case for %v", code)
		}
	}
	for code, want := range want {
		if got := exitCodeFor(code); got != want {
			t.Errorf("exitCodeFor(%v) = %d, want %d", code, got, want)
		}
	}
}

func TestExitCode(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want int
	}{
		{"nil", nil, exitOK},
		{"usage", usageErrorf("--alg: bad"), exitUsage},
		{"wrapped usage", fmt.Errorf("create: %w", usageErrorf("--alg: bad")), exitUsage},
		{"not found", status.Error(codes.NotFound, "key not found"), exitNotFound},
		{"wrapped status", fmt.Errorf("get: %w", status.Error(codes.AlreadyExists, "exists")), exitConflict},
		{"invalid argument", status.Error(codes.InvalidArgument, "bad name"), exitUsage},
		{"unavailable", status.Error(codes.Unavailable, "down"), exitUnavailable},
		{"plain error", errors.New("boom"), exitFailure},
		{"context error", context.Canceled, exitFailure},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := exitCode(tt.err); got != tt.want {
				t.Errorf("exitCode(%v) = %d, want %d", tt.err, got, tt.want)
			}
		})
	}
}

func TestErrorMessage(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{status.Error(codes.NotFound, "key not found"), "key not found"},
		{fmt.Errorf("get: %w", status.Error(codes.NotFound, "key not found")), "key not found"},
		{status.Error(codes.Internal, ""), "Internal"},
		{usageErrorf("--alg: got %q", "x"), `--alg: got "x"`},
		{errors.New("boom"), "boom"},
	}
	for _, tt := range tests {
		if got := errorMessage(tt.err); got != tt.want {
			t.Errorf("errorMessage(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}
