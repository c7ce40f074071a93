package kms

import (
	"errors"
	"fmt"
	"testing"
)

var sentinels = []error{ErrInvalidArgument, ErrNotFound, ErrAlreadyExists, ErrFailedPrecondition, ErrUnavailable, ErrResourceExhausted}

func TestSentinelsDistinct(t *testing.T) {
	for i, a := range sentinels {
		for j, b := range sentinels {
			if got := errors.Is(a, b); got != (i == j) {
				t.Errorf("errors.Is(%v, %v) = %v, want %v", a, b, got, i == j)
			}
		}
	}
}

func TestFieldError(t *testing.T) {
	var err error = &FieldError{Field: "digest", Reason: "length: got 1 bytes, want 32 for SHA-256"}
	if got, want := err.Error(), "invalid digest: length: got 1 bytes, want 32 for SHA-256"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	wrapped := fmt.Errorf("sign %q: %w", "k", fmt.Errorf("check: %w", err))
	for _, e := range []error{err, wrapped} {
		if !errors.Is(e, ErrInvalidArgument) {
			t.Errorf("errors.Is(%v, ErrInvalidArgument) is false", e)
		}
		for _, s := range sentinels[1:] {
			if errors.Is(e, s) {
				t.Errorf("errors.Is(%v, %v) is true", e, s)
			}
		}
		var fe *FieldError
		if !errors.As(e, &fe) || fe.Field != "digest" {
			t.Errorf("errors.As(%v) = %+v, want the digest FieldError", e, fe)
		}
	}
	if got := err.(*FieldError).ClientMessage(); got != err.Error() {
		t.Errorf("ClientMessage() = %q, want %q", got, err.Error())
	}
}

func TestClientError(t *testing.T) {
	for _, kind := range sentinels {
		var err error = &ClientError{Kind: kind, Msg: "key \"x\" is pending"}
		if err.Error() != `key "x" is pending` {
			t.Errorf("Error() = %q", err.Error())
		}
		if got := err.(*ClientError).ClientMessage(); got != `key "x" is pending` {
			t.Errorf("ClientMessage() = %q", got)
		}
		wrapped := fmt.Errorf("outer: %w", fmt.Errorf("inner: %w", err))
		for _, s := range sentinels {
			if got := errors.Is(wrapped, s); got != (s == kind) {
				t.Errorf("ClientError{Kind: %v}: errors.Is(_, %v) = %v, want %v", kind, s, got, s == kind)
			}
		}
	}
	if errors.Is(&ClientError{Msg: "no kind"}, ErrNotFound) {
		t.Error("a ClientError without a Kind matches ErrNotFound")
	}
}

func TestNotFound(t *testing.T) {
	err := NotFound("key", "signing-1")
	if got, want := err.Error(), `key "signing-1" not found`; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("errors.Is(%v, ErrNotFound) is false", err)
	}
	if errors.Is(err, ErrInvalidArgument) || errors.Is(err, ErrAlreadyExists) {
		t.Errorf("%v matches another sentinel", err)
	}
	var ce *ClientError
	if !errors.As(err, &ce) || ce.ClientMessage() != `key "signing-1" not found` {
		t.Errorf("errors.As ClientError: %+v", ce)
	}
	// The name is quoted, so odd bytes cannot forge the message.
	if got, want := NotFound("version", "a\nb").Error(), `version "a\nb" not found`; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}
