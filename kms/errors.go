package kms

import (
	"errors"
	"fmt"
)

// Error sentinels shared by every layer. Match them with errors.Is; the gRPC
// server turns them into status codes in one place.
var (
	// ErrInvalidArgument: the request is malformed. Usually a *FieldError.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrNotFound: no such key or version for this caller.
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists: a key with that name exists.
	ErrAlreadyExists = errors.New("already exists")
	// ErrFailedPrecondition: the key exists but cannot be used this way.
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrUnavailable: the hardware cannot be reached right now; retrying may help.
	ErrUnavailable = errors.New("unavailable")
	// ErrResourceExhausted: a pool, quota or hardware capacity is used up.
	ErrResourceExhausted = errors.New("resource exhausted")
	// ErrDataLoss: the hardware that held the key was cleared or replaced;
	// the key cannot be used again.
	ErrDataLoss = errors.New("key material lost")
)

// Error is a failed operation of a hardware backend. Its message names the
// backend, the operation and the driver's error (a CKR_* name, a TPM
// response code) for logs; the server never sends it to a client, only
// what Kind says (a sentinel above, or nil for an internal error).
type Error struct {
	Backend string // "hsm", "tpm"
	Op      string
	Kind    error
	Err     error
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s: %v", e.Backend, e.Op, e.Err) }

func (e *Error) Unwrap() []error {
	if e.Kind == nil {
		return []error{e.Err}
	}
	return []error{e.Kind, e.Err}
}

// FieldError is an invalid request field. Its message is safe to show to
// the client: it names the field and the bad value, never hardware details.
type FieldError struct {
	Field  string
	Reason string
}

func (e *FieldError) Error() string { return fmt.Sprintf("invalid %s: %s", e.Field, e.Reason) }

// Is makes errors.Is(err, ErrInvalidArgument) true.
func (e *FieldError) Is(target error) bool { return target == ErrInvalidArgument }

// ClientError is an error whose message is written for the client: it says
// what is wrong with the request in the caller's own terms (the key name it
// sent), never hardware details. Kind is the kms sentinel it matches.
type ClientError struct {
	Kind error
	Msg  string
	// Reason, when set, is the google.rpc.ErrorInfo reason; Meta its
	// metadata. Both are client-safe.
	Reason string
	Meta   map[string]string
}

func (e *ClientError) Error() string { return e.Msg }
func (e *ClientError) Unwrap() error { return e.Kind }

// ClientMessage is the text the server may send to the client.
func (e *ClientError) ClientMessage() string { return e.Msg }

// ClientMessage is the text the server may send to the client.
func (e *FieldError) ClientMessage() string { return e.Error() }

// NotFound returns a client error for a key that does not exist for the
// caller. The same text is used whether the name exists for another tenant
// or not at all.
func NotFound(what, name string) error {
	return &ClientError{Kind: ErrNotFound, Msg: fmt.Sprintf("%s %q not found", what, name)}
}
