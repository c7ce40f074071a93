package kms

import (
	"crypto"
	"crypto/rsa"
	"fmt"
)

// MaxNameLen is the longest key name.
const MaxNameLen = 63

// ValidateName checks a key name against ^[a-z0-9][a-z0-9._-]{0,62}$.
func ValidateName(name string) error {
	if name == "" {
		return &FieldError{Field: "name", Reason: "must not be empty"}
	}
	if len(name) > MaxNameLen {
		return &FieldError{Field: "name", Reason: fmt.Sprintf("got %d bytes, want at most %d", len(name), MaxNameLen)}
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || i > 0 && (c == '.' || c == '_' || c == '-')
		if !ok {
			return &FieldError{Field: "name", Reason: fmt.Sprintf("%q does not match ^[a-z0-9][a-z0-9._-]{0,62}$", name)}
		}
	}
	return nil
}

// Padding selects the RSA signature scheme.
type Padding int

// RSA paddings. PaddingDefault follows the key's algorithm.
const (
	PaddingDefault Padding = iota
	PaddingPKCS1v15
	PaddingPSS
)

func (p Padding) String() string {
	switch p {
	case PaddingDefault:
		return "default"
	case PaddingPKCS1v15:
		return "PKCS1v15"
	case PaddingPSS:
		return "PSS"
	}
	return fmt.Sprintf("Padding(%d)", int(p))
}

// SignerOpts validates a signing request for a key of algorithm alg and
// returns the options to hand to Backend.Sign. hash 0 means the algorithm's
// hash. It rejects, before any hardware call: hashes other than SHA-256/384/512,
// a digest whose length does not match the hash, and RSA padding on EC keys.
// PSS always uses salt length = hash length (RFC 7518 §3.5).
func SignerOpts(alg Algorithm, hash crypto.Hash, pad Padding, digest []byte) (crypto.SignerOpts, error) {
	if !alg.Valid() {
		return nil, &FieldError{Field: "algorithm", Reason: fmt.Sprintf("unknown algorithm %d", int(alg))}
	}
	if hash == 0 {
		hash = alg.Hash()
	}
	if err := CheckSign(hash, digest); err != nil {
		return nil, err
	}
	if alg.IsEC() {
		if pad != PaddingDefault {
			return nil, &FieldError{Field: "padding", Reason: fmt.Sprintf("got %v, want none for %v keys", pad, alg)}
		}
		return hash, nil
	}
	switch {
	case pad == PaddingPSS, pad == PaddingDefault && alg == PS256:
		return &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: hash}, nil
	case pad == PaddingPKCS1v15, pad == PaddingDefault:
		return hash, nil
	}
	return nil, &FieldError{Field: "padding", Reason: fmt.Sprintf("unknown padding %d", int(pad))}
}

// CheckSign is the check of a signing request that every layer makes —
// the server through SignerOpts, and each Backend's Sign before the
// hardware: opts names SHA-256, SHA-384 or SHA-512, the digest has that
// hash's length, and a PSS salt is the hash length (RFC 7518 §3.5).
func CheckSign(opts crypto.SignerOpts, digest []byte) error {
	if opts == nil {
		return &FieldError{Field: "hash", Reason: "missing"}
	}
	hash := opts.HashFunc()
	switch hash {
	case crypto.SHA256, crypto.SHA384, crypto.SHA512:
	default:
		return &FieldError{Field: "hash", Reason: fmt.Sprintf("got %v, want SHA-256, SHA-384 or SHA-512", hash)}
	}
	if len(digest) != hash.Size() {
		return &FieldError{Field: "digest", Reason: fmt.Sprintf("length: got %d bytes, want %d for %v", len(digest), hash.Size(), hash)}
	}
	if pss, ok := opts.(*rsa.PSSOptions); ok && pss.SaltLength != rsa.PSSSaltLengthEqualsHash && pss.SaltLength != hash.Size() {
		return &FieldError{Field: "padding", Reason: "PSS salt length must equal the hash length"}
	}
	return nil
}
