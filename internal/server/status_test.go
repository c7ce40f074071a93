package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keybroker/keybroker/kms"
)

// secretText looks like what a hardware error may carry; none of it may
// reach a client.
const secretText = "C_Sign: CKR_DEVICE_ERROR (0x30) module=/usr/lib/x.so slot=3 handle=0xdeadbeef pin=1234"

var secrets = []string{"CKR_", "DEVICE_ERROR", "0x30", "/usr/lib", "x.so", "pin", "1234", "handle", "deadbeef", "C_Sign"}

// kindErr is a backend-style error: a detailed message for logs that
// matches a kms sentinel through Unwrap.
type kindErr struct {
	kind error
	msg  string
}

func (e *kindErr) Error() string { return e.msg }
func (e *kindErr) Unwrap() error { return e.kind }

// wrap2 wraps err two levels deep, as layers do on the way up.
func wrap2(err error) error {
	return fmt.Errorf("keyring: sign %q: %w", "k", fmt.Errorf("hsm: %w", err))
}

func TestToStatus(t *testing.T) {
	nameErr := &kms.FieldError{Field: "name", Reason: `"A" does not match ^[a-z0-9][a-z0-9._-]{0,62}$`}
	for _, tc := range []struct {
		name   string
		err    error
		code   codes.Code
		reason string
		msg    string // exact message
		field  string // BadRequest field violation, "" for none
	}{
		// Bare sentinels get the fixed text of their kind.
		{"invalid argument", kms.ErrInvalidArgument, codes.InvalidArgument, ReasonInvalidArgument, "invalid argument", ""},
		{"not found", kms.ErrNotFound, codes.NotFound, ReasonKeyNotFound, "key not found", ""},
		{"already exists", kms.ErrAlreadyExists, codes.AlreadyExists, ReasonKeyExists, "key already exists", ""},
		{"failed precondition", kms.ErrFailedPrecondition, codes.FailedPrecondition, ReasonKeyNotUsable, "key cannot be used", ""},
		{"unavailable", kms.ErrUnavailable, codes.Unavailable, ReasonBackendDown, "key backend unavailable, retry later", ""},
		{"resource exhausted", kms.ErrResourceExhausted, codes.ResourceExhausted, ReasonBackendBusy, "key backend busy, retry later", ""},
		{"deadline", context.DeadlineExceeded, codes.DeadlineExceeded, ReasonDeadlineExceeded, "deadline exceeded", ""},
		{"canceled", context.Canceled, codes.Canceled, ReasonCanceled, "canceled", ""},

		// Wrapped two levels deep: same code, and the wrapping text (which
		// may name hardware) is dropped.
		{"wrapped not found", wrap2(kms.ErrNotFound), codes.NotFound, ReasonKeyNotFound, "key not found", ""},
		{"wrapped already exists", wrap2(kms.ErrAlreadyExists), codes.AlreadyExists, ReasonKeyExists, "key already exists", ""},
		{"wrapped failed precondition", wrap2(kms.ErrFailedPrecondition), codes.FailedPrecondition, ReasonKeyNotUsable, "key cannot be used", ""},
		{"wrapped unavailable", wrap2(kms.ErrUnavailable), codes.Unavailable, ReasonBackendDown, "key backend unavailable, retry later", ""},
		{"wrapped resource exhausted", wrap2(kms.ErrResourceExhausted), codes.ResourceExhausted, ReasonBackendBusy, "key backend busy, retry later", ""},
		{"wrapped deadline", wrap2(context.DeadlineExceeded), codes.DeadlineExceeded, ReasonDeadlineExceeded, "deadline exceeded", ""},
		{"wrapped canceled", wrap2(context.Canceled), codes.Canceled, ReasonCanceled, "canceled", ""},

		// Backend errors carrying hardware detail keep their kind, lose their text.
		{"unavailable with secrets", &kindErr{kms.ErrUnavailable, secretText}, codes.Unavailable, ReasonBackendDown, "key backend unavailable, retry later", ""},
		{"wrapped unavailable with secrets", wrap2(fmt.Errorf("%s: %w", secretText, kms.ErrUnavailable)), codes.Unavailable, ReasonBackendDown, "key backend unavailable, retry later", ""},
		{"busy with secrets", wrap2(&kindErr{kms.ErrResourceExhausted, secretText}), codes.ResourceExhausted, ReasonBackendBusy, "key backend busy, retry later", ""},
		{"deadline with secrets", fmt.Errorf("%s: %w", secretText, context.DeadlineExceeded), codes.DeadlineExceeded, ReasonDeadlineExceeded, "deadline exceeded", ""},
		{"not found with secrets", &kindErr{kms.ErrNotFound, "destroy: " + secretText}, codes.NotFound, ReasonKeyNotFound, "key not found", ""},

		// Plain errors become a bare Internal.
		{"plain secret", errors.New(secretText), codes.Internal, ReasonInternal, "internal error", ""},
		{"wrapped plain secret", wrap2(errors.New(secretText)), codes.Internal, ReasonInternal, "internal error", ""},
		{"plain", errors.New("boom"), codes.Internal, ReasonInternal, "internal error", ""},

		// Field errors: their own message, and a BadRequest naming the field.
		{"field error", nameErr, codes.InvalidArgument, ReasonInvalidArgument, nameErr.Error(), "name"},
		{"wrapped field error", wrap2(&kms.FieldError{Field: "digest", Reason: "length: got 31 bytes, want 32 for SHA-256"}),
			codes.InvalidArgument, ReasonInvalidArgument, "invalid digest: length: got 31 bytes, want 32 for SHA-256", "digest"},

		// Client errors: their message, the code of their kind.
		{"client not found", kms.NotFound("key", "k1"), codes.NotFound, ReasonKeyNotFound, `key "k1" not found`, ""},
		{"wrapped client not found", wrap2(kms.NotFound("key", "k1")), codes.NotFound, ReasonKeyNotFound, `key "k1" not found`, ""},
		{"client exists", &kms.ClientError{Kind: kms.ErrAlreadyExists, Msg: `key "k1" already exists`}, codes.AlreadyExists, ReasonKeyExists, `key "k1" already exists`, ""},
		{"client precondition", wrap2(&kms.ClientError{Kind: kms.ErrFailedPrecondition, Msg: `key "k1" version 2 is retired`}), codes.FailedPrecondition, ReasonKeyNotUsable, `key "k1" version 2 is retired`, ""},
		{"client invalid", &kms.ClientError{Kind: kms.ErrInvalidArgument, Msg: "bad page token"}, codes.InvalidArgument, ReasonInvalidArgument, "bad page token", ""},
		// A client message with no kms kind is still an internal error.
		{"client without kind", &kms.ClientError{Kind: errors.New(secretText), Msg: secretText}, codes.Internal, ReasonInternal, "internal error", ""},
		{"client nil kind", &kms.ClientError{Msg: secretText}, codes.Internal, ReasonInternal, "internal error", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := toStatus(tc.err)
			if got == nil {
				t.Fatalf("toStatus(%v) = nil", tc.err)
			}
			st, ok := status.FromError(got)
			if !ok {
				t.Fatalf("toStatus(%v) = %T %v, not a status error", tc.err, got, got)
			}
			if st.Code() != tc.code {
				t.Errorf("code: got %v, want %v", st.Code(), tc.code)
			}
			if st.Message() != tc.msg {
				t.Errorf("message: got %q, want %q", st.Message(), tc.msg)
			}
			for _, s := range secrets {
				if strings.Contains(st.Message(), s) {
					t.Errorf("message %q contains %q", st.Message(), s)
				}
			}
			checkDetails(t, st, tc.reason, tc.field, tc.err)
		})
	}
}

// checkDetails checks st carries exactly one ErrorInfo with reason, and a
// BadRequest naming field when field is set (none otherwise).
func checkDetails(t *testing.T, st *status.Status, reason, field string, err error) {
	t.Helper()
	var infos []*errdetails.ErrorInfo
	var bads []*errdetails.BadRequest
	var retries []*errdetails.RetryInfo
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			infos = append(infos, d)
		case *errdetails.BadRequest:
			bads = append(bads, d)
		case *errdetails.RetryInfo:
			retries = append(retries, d)
		case error:
			t.Errorf("undecodable detail: %v", d)
		default:
			t.Errorf("unexpected detail %T", d)
		}
	}
	if len(infos) != 1 {
		t.Fatalf("got %d ErrorInfo details, want 1", len(infos))
	}
	// Retryable codes say when to retry; others do not.
	retryable := st.Code() == codes.Unavailable || st.Code() == codes.ResourceExhausted
	if retryable && (len(retries) != 1 || retries[0].GetRetryDelay().AsDuration() != RetryDelay) {
		t.Errorf("%v: RetryInfo %v, want one with %v", st.Code(), retries, RetryDelay)
	}
	if !retryable && len(retries) != 0 {
		t.Errorf("%v carries RetryInfo %v", st.Code(), retries)
	}
	if infos[0].GetDomain() != ErrorDomain || infos[0].GetReason() != reason {
		t.Errorf("ErrorInfo: got domain %q reason %q, want %q %q", infos[0].GetDomain(), infos[0].GetReason(), ErrorDomain, reason)
	}
	if len(infos[0].GetMetadata()) != 0 {
		t.Errorf("ErrorInfo carries metadata %v", infos[0].GetMetadata())
	}
	if field == "" {
		if len(bads) != 0 {
			t.Errorf("got BadRequest %v, want none", bads)
		}
		return
	}
	if len(bads) != 1 {
		t.Fatalf("got %d BadRequest details, want 1", len(bads))
	}
	var fe *kms.FieldError
	if !errors.As(err, &fe) {
		t.Fatalf("test bug: %v has no FieldError", err)
	}
	v := bads[0].GetFieldViolations()
	if len(v) != 1 || v[0].GetField() != field || v[0].GetDescription() != fe.Reason {
		t.Errorf("BadRequest violations: got %v, want one for %q: %q", v, field, fe.Reason)
	}
}

func TestToStatusNil(t *testing.T) {
	if err := toStatus(nil); err != nil {
		t.Errorf("toStatus(nil) = %v, want nil", err)
	}
}

// TestToStatusPassesStatusThrough: an error that is already a status (from
// the tenant check, say) is returned unchanged.
func TestToStatusPassesStatusThrough(t *testing.T) {
	withDetail, err := status.New(codes.PermissionDenied, "no tenant for this peer").
		WithDetails(&errdetails.ErrorInfo{Reason: "NO_TENANT", Domain: "x"})
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range []error{
		status.Error(codes.Unauthenticated, "who are you"),
		status.Error(codes.Internal, "internal error"),
		withDetail.Err(),
	} {
		got := toStatus(in)
		if got != in {
			t.Errorf("toStatus(%v) = %v, want the same error", in, got)
		}
		want, _ := status.FromError(in)
		st, _ := status.FromError(got)
		if st.Code() != want.Code() || st.Message() != want.Message() || len(st.Details()) != len(want.Details()) {
			t.Errorf("toStatus(%v) changed the status to %v", in, st)
		}
	}
}

// TestToStatusWrappedStatus: text wrapped around a status error never
// reaches the client; the inner status does.
func TestToStatusWrappedStatus(t *testing.T) {
	in := fmt.Errorf("hsm: CKR_DEVICE_ERROR module=/usr/lib/x.so pin=1234: %w", status.Error(codes.PermissionDenied, "denied"))
	st := status.Convert(toStatus(in))
	if st.Code() != codes.PermissionDenied || st.Message() != "denied" {
		t.Errorf("toStatus(wrapped) = %v %q, want PermissionDenied \"denied\"", st.Code(), st.Message())
	}
}

// TestToStatusMappingOrder: an error matching several kinds takes the first
// in the mapping's order, so a client fault is not reported as a retryable
// outage.
func TestToStatusMappingOrder(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code codes.Code
	}{
		{errors.Join(kms.ErrUnavailable, kms.ErrInvalidArgument), codes.InvalidArgument},
		{errors.Join(context.DeadlineExceeded, kms.ErrNotFound), codes.NotFound},
		{fmt.Errorf("%w: %w", kms.ErrResourceExhausted, kms.ErrUnavailable), codes.Unavailable},
		{errors.Join(context.Canceled, context.DeadlineExceeded), codes.DeadlineExceeded},
	} {
		if got := status.Code(toStatus(tc.err)); got != tc.code {
			t.Errorf("toStatus(%v): got %v, want %v", tc.err, got, tc.code)
		}
	}
}
