package tpm

import (
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
)

// ErrDataLoss means the TPM's storage root key is not the one pinned in the
// state directory: the TPM was cleared (its owner seed changed) or replaced,
// and every key created before is gone for good. The backend then refuses
// every key operation and Probe, so that nothing is silently re-keyed, until
// an operator resets the pin: stop the daemon, remove srk.name and the
// parents directory from the state directory, and mark the lost keys
// destroyed in the store.
var ErrDataLoss = fmt.Errorf("tpm: the storage root key changed: the TPM was cleared or replaced and its keys are lost: %w", kms.ErrDataLoss)

// classify wraps err from a TPM command with the kms sentinel that says
// what a caller can do about it. Errors the transport already classified
// and nil pass through.
func classify(op string, err error) error {
	if err == nil {
		return nil
	}
	var te *kms.Error
	if errors.As(err, &te) {
		return err
	}
	var kind error
	var rc tpm2.TPMRC
	if errors.As(err, &rc) {
		switch {
		case isMemoryWarning(rc):
			kind = kms.ErrResourceExhausted
		case rc.IsWarning():
			// TPM_RC_RETRY and friends after our own retries,
			// TPM_RC_CANCELED, TPM_RC_NV_RATE, TPM_RC_LOCKOUT: the TPM
			// may answer later.
			kind = kms.ErrUnavailable
		case rc == tpm2.TPMRCFailure, rc == tpm2.TPMRCInitialize:
			// Failure mode, or a TPM that was not started.
			kind = kms.ErrUnavailable
		}
	}
	return &kms.Error{Backend: "tpm", Op: op, Kind: kind, Err: err}
}

// isMemoryWarning reports whether rc says the TPM has no room for another
// object or session (Part 2 §6.6.3).
func isMemoryWarning(rc tpm2.TPMRC) bool {
	return rc == tpm2.TPMRCObjectMemory || rc == tpm2.TPMRCSessionMemory || rc == tpm2.TPMRCObjectHandles
}

// isRC reports whether err carries the TPM response code rc, ignoring the
// handle, parameter or session number of a format-1 code.
func isRC(err error, rcs ...tpm2.TPMRC) bool {
	for _, rc := range rcs {
		if errors.Is(err, rc) {
			return true
		}
	}
	return false
}

// isStaleHandle reports whether err says a handle we believed loaded is not
// (TPM_RC_REFERENCE_H0..H6, TPM_RC_HANDLE): someone flushed it behind our
// back, so the cache of loaded objects is wrong.
func isStaleHandle(err error) bool {
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) {
		return false
	}
	if rc >= tpm2.TPMRCReferenceH0 && rc <= tpm2.TPMRCReferenceH0+6 {
		return true
	}
	var f1 tpm2.TPMFmt1Error
	if errors.As(err, &f1) {
		if isHandle, _ := f1.Handle(); isHandle && errors.Is(err, tpm2.TPMRCHandle) {
			return true
		}
	}
	return false
}

// isStaleSession reports whether err says a session handle in the command's
// authorization area is not loaded (TPM_RC_REFERENCE_S0..S6): a reusable
// session someone flushed behind our back.
func isStaleSession(err error) bool {
	var rc tpm2.TPMRC
	return errors.As(err, &rc) && rc >= tpm2.TPMRCReferenceS0 && rc <= tpm2.TPMRCReferenceS0+6
}
