package hsm

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
	"github.com/thales-e-security/pool"

	"github.com/keybroker/keybroker/kms"
)

// ErrModule is wrapped by Open's error when the PKCS#11 module cannot be
// loaded or its C_Initialize fails: the module's file, its configuration or
// its storage is at fault (often not readable by the daemon's user), not the
// token, and opening it again without a change fails the same way.
var ErrModule = errors.New("the PKCS#11 module cannot start")

// ErrPINRefused is wrapped by the error of a login the token refused
// (CKR_PIN_INCORRECT, CKR_PIN_LOCKED, ...): trying again with the same PIN
// would count against the token's PIN retry counter (many lock after 3).
var ErrPINRefused = errors.New("the token refuses the PIN")

// pinRefused are the return values that say the PIN is at fault.
var pinRefused = map[pkcs11.Error]bool{
	pkcs11.CKR_PIN_INCORRECT: true,
	pkcs11.CKR_PIN_LOCKED:    true,
	pkcs11.CKR_PIN_EXPIRED:   true,
	pkcs11.CKR_PIN_INVALID:   true,
	pkcs11.CKR_PIN_LEN_RANGE: true,
}

// unavailable are the return values after which the token, the session or
// the login is gone: retrying on a rebuilt context may succeed, and the
// Backend rebuilds its context.
var unavailable = map[pkcs11.Error]bool{
	pkcs11.CKR_DEVICE_ERROR:             true,
	pkcs11.CKR_DEVICE_REMOVED:           true,
	pkcs11.CKR_TOKEN_NOT_PRESENT:        true,
	pkcs11.CKR_TOKEN_NOT_RECOGNIZED:     true,
	pkcs11.CKR_SESSION_HANDLE_INVALID:   true,
	pkcs11.CKR_SESSION_CLOSED:           true,
	pkcs11.CKR_USER_NOT_LOGGED_IN:       true,
	pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED: true,
	pkcs11.CKR_SESSION_COUNT:            true,
}

// exhausted are the return values of a token that is full or out of memory:
// a rebuilt context would not help, and one tenant filling the token must
// not take it away from everyone.
var exhausted = map[pkcs11.Error]bool{
	pkcs11.CKR_DEVICE_MEMORY: true,
	pkcs11.CKR_HOST_MEMORY:   true,
}

// goneObject are the return values for an object handle that is no longer
// valid: the key was deleted (by a concurrent Destroy or another process).
// CKR_FUNCTION_FAILED and CKR_GENERAL_ERROR stay internal errors of one
// operation: a single occurrence does not mean the token is gone.
var goneObject = map[pkcs11.Error]bool{
	pkcs11.CKR_OBJECT_HANDLE_INVALID: true,
	pkcs11.CKR_KEY_HANDLE_INVALID:    true,
}

// classify wraps err with the kms sentinel that says what a caller can do
// about it. nil stays nil.
func classify(op string, err error) error {
	if err == nil {
		return nil
	}
	var kind error
	var rv pkcs11.Error
	switch {
	case errors.Is(err, kms.ErrUnavailable):
		// Classified already (a call left unanswered by the token).
		kind = kms.ErrUnavailable
	case errors.Is(err, pool.ErrTimeout), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		// crypto11's pool timed out waiting for a free session.
		kind = kms.ErrResourceExhausted
	case errors.Is(err, pool.ErrClosed):
		kind = kms.ErrUnavailable
	case closedContext(err):
		// A call that raced with the retirement of its context.
		kind = kms.ErrUnavailable
	case errors.As(err, &rv):
		switch {
		case unavailable[rv]:
			kind = kms.ErrUnavailable
		case exhausted[rv]:
			kind = kms.ErrResourceExhausted
		case goneObject[rv]:
			kind = kms.ErrNotFound
		case pinRefused[rv]:
			return &kms.Error{Backend: "hsm", Op: op, Kind: kms.ErrFailedPrecondition, Err: fmt.Errorf("%w: %w", ErrPINRefused, err)}
		}
	}
	return &kms.Error{Backend: "hsm", Op: op, Kind: kind, Err: err}
}

// isTemplateError reports whether the token refused an attribute of the
// template (so a looser template may be tried).
func isTemplateError(err error) bool {
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return false
	}
	switch rv {
	case pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, pkcs11.CKR_TEMPLATE_INCONSISTENT:
		return true
	}
	return false
}

// closedContext reports crypto11's errors for a closed Context, which it does
// not export ("context is closed" from its session pool, "cannot used closed
// context" from its methods).
func closedContext(err error) bool {
	msg := strings.ToLower(err.Error())
	return strings.Contains(msg, "context is closed") || strings.Contains(msg, "closed context")
}

// isGoneObject reports whether err says an object handle is no longer valid.
func isGoneObject(err error) bool {
	var rv pkcs11.Error
	return errors.As(err, &rv) && goneObject[rv]
}
