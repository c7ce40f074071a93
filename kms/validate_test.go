package kms

import (
	"crypto"
	"crypto/rsa"
	"errors"
	"reflect"
	"strings"
	"testing"
)

// wantFieldError fails unless err is a *FieldError for field that matches
// ErrInvalidArgument, and returns it.
func wantFieldError(t testing.TB, err error, field string) *FieldError {
	t.Helper()
	if err == nil {
		t.Fatalf("got nil error, want a *FieldError for %q", field)
	}
	var fe *FieldError
	if !errors.As(err, &fe) {
		t.Fatalf("got %T (%v), want *FieldError", err, err)
	}
	if fe.Field != field {
		t.Errorf("FieldError.Field: got %q, want %q (%v)", fe.Field, field, err)
	}
	if !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("errors.Is(%v, ErrInvalidArgument) is false", err)
	}
	if fe.ClientMessage() != err.Error() {
		t.Errorf("ClientMessage %q differs from Error %q", fe.ClientMessage(), err.Error())
	}
	if !strings.HasPrefix(err.Error(), "invalid "+field+": ") {
		t.Errorf("message %q does not start with %q", err.Error(), "invalid "+field+": ")
	}
	return fe
}

func TestValidateName(t *testing.T) {
	valid := []string{
		"a",
		"0",
		"a.b_c-d",
		"9lives",
		"a.",
		"a..b",
		strings.Repeat("a", MaxNameLen),
		"z" + strings.Repeat("0", MaxNameLen-1),
	}
	for _, name := range valid {
		if err := ValidateName(name); err != nil {
			t.Errorf("ValidateName(%q) = %v, want nil", name, err)
		}
	}

	invalid := []string{
		"",
		strings.Repeat("a", MaxNameLen+1),
		strings.Repeat("a", 1000),
		"A",
		"aB",
		"-a",
		".a",
		"_a",
		"..",
		"a/b",
		"../a",
		"a b",
		" a",
		"a\n",
		"é",
		"caf\u00e9",
		"a\x00",
		"\x00",
		"\uff41",  // U+FF41 FULLWIDTH LATIN SMALL LETTER A
		"\u0430",  // CYRILLIC SMALL LETTER A
		"a\u200b", // ZERO WIDTH SPACE
		"a\xff",   // invalid UTF-8
		"a:b",
		"a*",
	}
	for _, name := range invalid {
		err := ValidateName(name)
		if err == nil {
			t.Errorf("ValidateName(%q) = nil, want an error", name)
			continue
		}
		wantFieldError(t, err, "name")
	}
}

func TestValidateNameMessages(t *testing.T) {
	long := strings.Repeat("x", 70)
	for _, tc := range []struct {
		name string
		want []string
	}{
		{"", []string{"must not be empty"}},
		{long, []string{"got 70 bytes", "want at most 63"}},
		{"Bad", []string{`"Bad"`, "^[a-z0-9][a-z0-9._-]{0,62}$"}},
	} {
		err := ValidateName(tc.name)
		if err == nil {
			t.Fatalf("ValidateName(%q) = nil", tc.name)
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("ValidateName(%q) = %q, want it to contain %q", tc.name, err, w)
			}
		}
	}
	// A too-long name is not echoed back.
	if err := ValidateName(long); strings.Contains(err.Error(), long) {
		t.Errorf("error for a too-long name echoes it: %q", err)
	}
}

func TestKeySpecValidate(t *testing.T) {
	for _, tc := range []struct {
		in       KeySpec
		wantBits int
		field    string // "" means valid
	}{
		{KeySpec{Alg: RS256}, 2048, ""},
		{KeySpec{Alg: PS256}, 2048, ""},
		{KeySpec{Alg: RS256, Bits: 2048}, 2048, ""},
		{KeySpec{Alg: RS256, Bits: 3072}, 3072, ""},
		{KeySpec{Alg: PS256, Bits: 4096}, 4096, ""},
		{KeySpec{Alg: ES256}, 0, ""},
		{KeySpec{Alg: ES384, Label: "x"}, 0, ""},
		{KeySpec{Alg: RS256, Bits: 1024}, 0, "bits"},
		{KeySpec{Alg: RS256, Bits: 2047}, 0, "bits"},
		{KeySpec{Alg: PS256, Bits: 8192}, 0, "bits"},
		{KeySpec{Alg: RS256, Bits: -1}, 0, "bits"},
		{KeySpec{Alg: ES256, Bits: 256}, 0, "bits"},
		{KeySpec{Alg: ES384, Bits: 2048}, 0, "bits"},
		{KeySpec{Alg: AlgUnknown}, 0, "algorithm"},
		{KeySpec{Alg: Algorithm(99), Bits: 2048}, 0, "algorithm"},
		{KeySpec{Alg: Algorithm(-1)}, 0, "algorithm"},
	} {
		got, err := tc.in.Validate()
		if tc.field != "" {
			wantFieldError(t, err, tc.field)
			continue
		}
		if err != nil {
			t.Errorf("%+v.Validate() = %v, want nil", tc.in, err)
			continue
		}
		want := tc.in
		want.Bits = tc.wantBits
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%+v.Validate() = %+v, want %+v", tc.in, got, want)
		}
	}
}

func TestKeySpecValidateMessages(t *testing.T) {
	_, err := KeySpec{Alg: RS256, Bits: 1000}.Validate()
	if err == nil || !strings.Contains(err.Error(), "got 1000") || !strings.Contains(err.Error(), "2048, 3072 or 4096") {
		t.Errorf("RSA 1000: got %v, want it to name 1000 and the allowed sizes", err)
	}
	_, err = KeySpec{Alg: ES384, Bits: 384}.Validate()
	if err == nil || !strings.Contains(err.Error(), "got 384") || !strings.Contains(err.Error(), "ES384") {
		t.Errorf("ES384 with bits: got %v, want it to name 384 and ES384", err)
	}
}

func TestSignerOpts(t *testing.T) {
	d := func(n int) []byte { return make([]byte, n) }
	pss := func(h crypto.Hash) crypto.SignerOpts {
		return &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: h}
	}
	for _, tc := range []struct {
		name   string
		alg    Algorithm
		hash   crypto.Hash
		pad    Padding
		digest []byte
		want   crypto.SignerOpts // nil when an error is expected
		field  string
		substr []string // in the error message
	}{
		// Default hash per algorithm.
		{name: "ES256 default", alg: ES256, digest: d(32), want: crypto.SHA256},
		{name: "ES384 default", alg: ES384, digest: d(48), want: crypto.SHA384},
		{name: "RS256 default", alg: RS256, digest: d(32), want: crypto.SHA256},
		{name: "PS256 default", alg: PS256, digest: d(32), want: pss(crypto.SHA256)},
		// Other allowed hashes.
		{name: "ES256 SHA-512", alg: ES256, hash: crypto.SHA512, digest: d(64), want: crypto.SHA512},
		{name: "ES384 SHA-256", alg: ES384, hash: crypto.SHA256, digest: d(32), want: crypto.SHA256},
		{name: "RS256 SHA-384", alg: RS256, hash: crypto.SHA384, digest: d(48), want: crypto.SHA384},
		{name: "RS256 SHA-512", alg: RS256, hash: crypto.SHA512, digest: d(64), want: crypto.SHA512},
		{name: "PS256 SHA-512", alg: PS256, hash: crypto.SHA512, digest: d(64), want: pss(crypto.SHA512)},
		// Padding choices on RSA.
		{name: "RS256 PSS", alg: RS256, pad: PaddingPSS, digest: d(32), want: pss(crypto.SHA256)},
		{name: "RS256 PSS SHA-384", alg: RS256, hash: crypto.SHA384, pad: PaddingPSS, digest: d(48), want: pss(crypto.SHA384)},
		{name: "RS256 PKCS1v15", alg: RS256, pad: PaddingPKCS1v15, digest: d(32), want: crypto.SHA256},
		{name: "PS256 PKCS1v15", alg: PS256, pad: PaddingPKCS1v15, digest: d(32), want: crypto.SHA256},
		{name: "PS256 PSS", alg: PS256, pad: PaddingPSS, digest: d(32), want: pss(crypto.SHA256)},
		// Rejected hashes.
		{name: "SHA-1", alg: RS256, hash: crypto.SHA1, digest: d(20), field: "hash", substr: []string{"got SHA-1"}},
		{name: "MD5", alg: ES256, hash: crypto.MD5, digest: d(16), field: "hash"},
		{name: "SHA-224", alg: ES256, hash: crypto.SHA224, digest: d(28), field: "hash"},
		{name: "SHA3-256", alg: PS256, hash: crypto.SHA3_256, digest: d(32), field: "hash"},
		// Digest length mismatches.
		{name: "ES256 short", alg: ES256, digest: d(31), field: "digest", substr: []string{"got 31", "want 32"}},
		{name: "ES256 long", alg: ES256, digest: d(33), field: "digest", substr: []string{"got 33", "want 32"}},
		{name: "ES384 SHA-256 digest", alg: ES384, digest: d(32), field: "digest", substr: []string{"got 32", "want 48"}},
		{name: "SHA-512 short", alg: RS256, hash: crypto.SHA512, digest: d(32), field: "digest", substr: []string{"got 32", "want 64"}},
		{name: "empty digest", alg: PS256, digest: nil, field: "digest", substr: []string{"got 0", "want 32"}},
		// Padding on EC.
		{name: "ES256 PSS", alg: ES256, pad: PaddingPSS, digest: d(32), field: "padding", substr: []string{"PSS", "ES256"}},
		{name: "ES384 PKCS1v15", alg: ES384, pad: PaddingPKCS1v15, digest: d(48), field: "padding", substr: []string{"PKCS1v15", "ES384"}},
		{name: "ES256 bogus padding", alg: ES256, pad: Padding(9), digest: d(32), field: "padding"},
		// Unknown padding and algorithm.
		{name: "RS256 bogus padding", alg: RS256, pad: Padding(9), digest: d(32), field: "padding", substr: []string{"9"}},
		{name: "unknown alg", alg: AlgUnknown, digest: d(32), field: "algorithm"},
		{name: "alg 42", alg: Algorithm(42), digest: d(32), field: "algorithm", substr: []string{"42"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := SignerOpts(tc.alg, tc.hash, tc.pad, tc.digest)
			if tc.field != "" {
				if got != nil {
					t.Errorf("got opts %#v with the error, want nil", got)
				}
				wantFieldError(t, err, tc.field)
				for _, s := range tc.substr {
					if err != nil && !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not contain %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("SignerOpts: %v", err)
			}
			switch want := tc.want.(type) {
			case crypto.Hash:
				h, ok := got.(crypto.Hash)
				if !ok || h != want {
					t.Fatalf("got %T %#v, want crypto.Hash %v", got, got, want)
				}
			case *rsa.PSSOptions:
				p, ok := got.(*rsa.PSSOptions)
				if !ok {
					t.Fatalf("got %T %#v, want *rsa.PSSOptions", got, got)
				}
				if *p != *want {
					t.Fatalf("got %+v, want %+v", *p, *want)
				}
			}
			if got.HashFunc() != tc.want.HashFunc() {
				t.Errorf("HashFunc: got %v, want %v", got.HashFunc(), tc.want.HashFunc())
			}
		})
	}
}

func TestPaddingString(t *testing.T) {
	for p, want := range map[Padding]string{
		PaddingDefault:  "default",
		PaddingPKCS1v15: "PKCS1v15",
		PaddingPSS:      "PSS",
		Padding(7):      "Padding(7)",
		Padding(-1):     "Padding(-1)",
	} {
		if got := p.String(); got != want {
			t.Errorf("Padding(%d).String() = %q, want %q", int(p), got, want)
		}
	}
}
