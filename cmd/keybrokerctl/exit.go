package main

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Exit codes of keybrokerctl; rootLong documents them.
const (
	exitOK          = 0
	exitFailure     = 1
	exitUsage       = 2
	exitNotFound    = 3
	exitUnavailable = 4
	exitConflict    = 5
)

// usageError is an error in how keybrokerctl was invoked: a bad flag or
// argument, found before any call to the daemon.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usageErrorf(format string, a ...any) error {
	return usageError{fmt.Errorf(format, a...)}
}

// exitCode returns the exit code for err: exitUsage for usage errors,
// exitCodeFor the gRPC code otherwise (nil is OK, non-gRPC errors Unknown).
func exitCode(err error) int {
	if errors.As(err, new(usageError)) {
		return exitUsage
	}
	return exitCodeFor(status.Code(err))
}

// exitCodeFor maps a gRPC status code to an exit code.
func exitCodeFor(code codes.Code) int {
	switch code {
	case codes.OK:
		return exitOK
	case codes.InvalidArgument:
		return exitUsage
	case codes.NotFound:
		return exitNotFound
	case codes.Unavailable, codes.DeadlineExceeded:
		return exitUnavailable
	case codes.AlreadyExists, codes.FailedPrecondition:
		return exitConflict
	default:
		return exitFailure
	}
}

// errorMessage is the text printed for err: for a gRPC error its status
// message, not the "rpc error: code = ... desc = ..." dump.
func errorMessage(err error) string {
	var grpcErr interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &grpcErr) {
		return err.Error()
	}
	st := grpcErr.GRPCStatus()
	if st.Message() == "" {
		return st.Code().String()
	}
	return st.Message()
}
