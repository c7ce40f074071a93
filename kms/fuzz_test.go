package kms

import (
	"crypto"
	"errors"
	"testing"
)

// FuzzValidateName: no name panics; every accepted name matches the rule
// and every refused one is a FieldError on "name".
func FuzzValidateName(f *testing.F) {
	for _, s := range []string{"demo", "a", "a.b_c-d", "", "../x", "A", "é", "a\x00", "%2e%2e", "ｂ1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		err := ValidateName(name)
		if err == nil {
			if len(name) == 0 || len(name) > MaxNameLen {
				t.Fatalf("accepted %q", name)
			}
			for i := 0; i < len(name); i++ {
				c := name[i]
				if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || i > 0 && (c == '.' || c == '_' || c == '-')) {
					t.Fatalf("accepted %q with %q at %d", name, c, i)
				}
			}
			return
		}
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != "name" {
			t.Fatalf("ValidateName(%q) = %v, want a FieldError on name", name, err)
		}
	})
}

// FuzzSignerOpts: request validation never panics, and what it accepts has
// a digest of exactly the hash's size.
func FuzzSignerOpts(f *testing.F) {
	f.Add(1, 5, 0, 32)
	f.Add(3, 6, 2, 48)
	f.Add(0, 0, 9, 0)
	f.Fuzz(func(t *testing.T, alg, hash, pad, n int) {
		if n < 0 || n > 1<<12 {
			return
		}
		opts, err := SignerOpts(Algorithm(alg), crypto.Hash(hash), Padding(pad), make([]byte, n))
		if err != nil {
			if !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("error %v is not ErrInvalidArgument", err)
			}
			return
		}
		if opts.HashFunc().Size() != n {
			t.Fatalf("accepted a %d-byte digest for %v", n, opts.HashFunc())
		}
	})
}
