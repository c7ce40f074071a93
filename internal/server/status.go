package server

import (
	"context"
	"errors"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keybroker/keybroker/internal/cluster"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of keybroker's errors.
const ErrorDomain = "keybroker.v1"

// RetryDelay is the RetryInfo sent with UNAVAILABLE and RESOURCE_EXHAUSTED
// (the HSM or TPM reconnects in about this time).
const RetryDelay = time.Second

// ErrorInfo reasons.
const (
	ReasonInvalidArgument  = "INVALID_ARGUMENT"
	ReasonKeyNotFound      = "KEY_NOT_FOUND"
	ReasonKeyExists        = "KEY_ALREADY_EXISTS"
	ReasonKeyNotUsable     = keyring.ReasonNotUsable
	ReasonBackendDown      = "BACKEND_UNAVAILABLE"
	ReasonBackendBusy      = "BACKEND_BUSY"
	ReasonInternal         = "INTERNAL"
	ReasonDataLoss         = "KEY_MATERIAL_LOST"
	ReasonDeadlineExceeded = "DEADLINE_EXCEEDED"
	ReasonCanceled         = "CANCELED"
	ReasonUnauthenticated  = "UNAUTHENTICATED"
	ReasonPermissionDenied = "PERMISSION_DENIED"
	ReasonSignQuota        = "SIGN_QUOTA_EXCEEDED"
	ReasonAuditDown        = "AUDIT_LOG_UNAVAILABLE"
	ReasonUnknownMethod    = "UNKNOWN_METHOD"
	ReasonMalformed        = "MALFORMED_REQUEST"
	ReasonNotACluster      = "NOT_A_CLUSTER"
	ReasonReplicaStale     = cluster.ReasonStale
	ReasonWatchBehind      = "WATCH_FELL_BEHIND"
	ReasonWatchEnded       = "WATCH_ENDED"
)

// The answers the server gives before or around a handler — denials, a
// malformed or unknown request, an audit log that cannot record — built
// here, next to the mapping of handler errors, so that every status a
// client sees comes from this file.
var (
	errNoPeer           = denial(codes.Unauthenticated, ReasonUnauthenticated, "unauthenticated: no verified peer identity")
	errUnmapped         = denial(codes.Unauthenticated, ReasonUnauthenticated, "unauthenticated: this identity is not mapped to a tenant")
	errNoCaller         = denial(codes.Unauthenticated, ReasonUnauthenticated, "unauthenticated")
	errUnknownMethod    = denial(codes.Unimplemented, ReasonUnknownMethod, "unknown method")
	errMalformed        = denial(codes.InvalidArgument, ReasonMalformed, "malformed request: the message does not decode")
	errInternal         = denial(codes.Internal, ReasonInternal, "internal error")
	errSignQuotaExhaust = denial(codes.ResourceExhausted, ReasonSignQuota, "signing quota exceeded")
	errAuditUnavailable = retryable(codes.Unavailable, ReasonAuditDown, "audit log unavailable, retry later", RetryDelay)
	// A WatchKeys stream that fell WatchBuffer events behind, or whose
	// daemon is stopping: the client watches again and starts from the new
	// snapshot.
	errWatchBehind = retryable(codes.ResourceExhausted, ReasonWatchBehind, "key watch fell too far behind; watch again for a fresh snapshot", 0)
	errWatchEnded  = retryable(codes.Unavailable, ReasonWatchEnded, "key watch ended (daemon stopping or call cancelled); watch again", RetryDelay)
)

// denial is a status error with an ErrorInfo reason.
func denial(code codes.Code, reason, msg string) error {
	st := status.New(code, msg)
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain}); err == nil {
		st = d
	}
	return st.Err()
}

// retryable is a status error with an ErrorInfo reason and a RetryInfo
// asking the client to wait delay.
func retryable(code codes.Code, reason, msg string, delay time.Duration) error {
	st := status.New(code, msg)
	if d, err := st.WithDetails(
		&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(delay)},
	); err == nil {
		st = d
	}
	return st.Err()
}

// errPermissionDenied says which role method needs.
func errPermissionDenied(method string, need Role) error {
	return denial(codes.PermissionDenied, ReasonPermissionDenied,
		"permission denied: "+shortMethod(method)+" needs the "+roleNames(need)+" role")
}

// errSignQuota says how long to wait for the next signature.
func errSignQuota(delay time.Duration) error {
	return retryable(codes.ResourceExhausted, ReasonSignQuota, "signing quota exceeded, retry later", delay)
}

// mapping lists, in order of precedence, how errors become status codes and
// the text sent when the error carries no client message.
var mapping = []struct {
	err    error
	code   codes.Code
	reason string
	msg    string
}{
	{kms.ErrInvalidArgument, codes.InvalidArgument, ReasonInvalidArgument, "invalid argument"},
	{kms.ErrNotFound, codes.NotFound, ReasonKeyNotFound, "key not found"},
	{kms.ErrAlreadyExists, codes.AlreadyExists, ReasonKeyExists, "key already exists"},
	{kms.ErrFailedPrecondition, codes.FailedPrecondition, ReasonKeyNotUsable, "key cannot be used"},
	{kms.ErrUnavailable, codes.Unavailable, ReasonBackendDown, "key backend unavailable, retry later"},
	{kms.ErrResourceExhausted, codes.ResourceExhausted, ReasonBackendBusy, "key backend busy, retry later"},
	{kms.ErrDataLoss, codes.DataLoss, ReasonDataLoss, "the key's hardware was reset or replaced; the key is lost"},
	{context.DeadlineExceeded, codes.DeadlineExceeded, ReasonDeadlineExceeded, "deadline exceeded"},
	{context.Canceled, codes.Canceled, ReasonCanceled, "canceled"},
}

// clientMessager is implemented by errors whose text is written for the
// client (kms.FieldError, kms.ClientError).
type clientMessager interface{ ClientMessage() string }

// toStatus is the one place where errors become gRPC status. Only messages
// written for clients pass through; every other error (hardware, store,
// internal) is replaced by a fixed text, so no CKR_* name, handle, path or
// PIN can reach a client. It returns nil for nil.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	// A status error passes through as it is; one wrapped in other text
	// passes through without that text.
	if se, ok := err.(interface{ GRPCStatus() *status.Status }); ok && se.GRPCStatus() != nil {
		return err
	}
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) && se.GRPCStatus() != nil {
		return se.GRPCStatus().Err()
	}
	code, reason, msg := codes.Internal, ReasonInternal, "internal error"
	for _, m := range mapping {
		if errors.Is(err, m.err) {
			code, reason, msg = m.code, m.reason, m.msg
			break
		}
	}
	var cm clientMessager
	if code != codes.Internal && errors.As(err, &cm) {
		msg = cm.ClientMessage()
	}
	info := &errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain}
	var ce *kms.ClientError
	if code != codes.Internal && errors.As(err, &ce) && ce.Reason != "" {
		info.Reason, info.Metadata = ce.Reason, ce.Meta
	}
	st := status.New(code, msg)
	details := []protoadapt.MessageV1{info}
	var fe *kms.FieldError
	if code == codes.InvalidArgument && errors.As(err, &fe) {
		details = append(details, &errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: fe.Field, Description: fe.Reason},
		}})
	}
	if code == codes.Unavailable || code == codes.ResourceExhausted {
		// Worth retrying: say when (RetryInfo).
		details = append(details, &errdetails.RetryInfo{RetryDelay: durationpb.New(RetryDelay)})
	}
	if withDetails, derr := st.WithDetails(details...); derr == nil {
		st = withDetails
	}
	return st.Err()
}
