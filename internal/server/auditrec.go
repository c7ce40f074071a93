package server

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"google.golang.org/grpc/codes"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/audit"
)

// newRequestID returns 16 random bytes in hex.
func newRequestID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// auditRecord describes one call for the audit log: who, what, which key
// version, the digest's SHA-256 (never the digest), the outcome. Nothing
// secret is in a request or response of this API, and only these fields are
// copied.
func auditRecord(reqID, method string, c Caller, req, resp any, code codes.Code, latency time.Duration) audit.Record {
	r := audit.Record{
		RequestID: reqID,
		Tenant:    c.Tenant,
		Caller:    c.Identity,
		Method:    method,
		Code:      codeName(code),
		LatencyMS: float64(latency.Microseconds()) / 1000,
	}
	if m, ok := req.(interface{ GetName() string }); ok {
		r.Key = m.GetName()
	}
	if m, ok := req.(interface{ GetVersion() uint32 }); ok {
		r.Version = m.GetVersion()
	}
	if m, ok := req.(interface{ GetKid() string }); ok {
		r.Kid = m.GetKid()
	}
	if m, ok := req.(*kbv1.SignRequest); ok && len(m.GetDigest()) > 0 {
		r.DigestSHA256 = audit.DigestSHA256(m.GetDigest())
	}
	if m, ok := req.(*kbv1.CreateKeyRequest); ok {
		r.Alg = algName(m.GetAlgorithm())
	}
	// The version that signed, when the response names it.
	if m, ok := resp.(interface {
		GetKid() string
		GetVersion() uint32
	}); ok && m.GetKid() != "" {
		r.Kid, r.Version = m.GetKid(), m.GetVersion()
	}
	if m, ok := resp.(*kbv1.SignResponse); ok {
		r.Alg = algName(m.GetAlgorithm())
	}
	// Request fields are whatever the caller sent, up to the message size
	// limit: bound them, so that every call's record fits a line.
	r.Key, r.Kid, r.Caller = boundField(r.Key), boundField(r.Kid), boundField(r.Caller)
	return r
}

// maxField bounds a string field of an audit record; longer values are cut
// to their first bytes and the length and SHA-256 of the whole.
const maxField = 256

// boundField returns s, or for s longer than maxField its first bytes
// (whole UTF-8 characters) and "…[N bytes, sha256:HEX]".
func boundField(s string) string {
	if len(s) <= maxField {
		return s
	}
	n := 128
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	sum := sha256.Sum256([]byte(s))
	return fmt.Sprintf("%s…[%d bytes, sha256:%s]", s[:n], len(s), hex.EncodeToString(sum[:]))
}

func algName(a kbv1.Algorithm) string {
	if a == kbv1.Algorithm_ALGORITHM_UNSPECIFIED {
		return ""
	}
	return strings.TrimPrefix(a.String(), "ALGORITHM_")
}

// codeName is the canonical name of a code: PermissionDenied →
// PERMISSION_DENIED.
func codeName(c codes.Code) string {
	var b strings.Builder
	prevLower := false
	for _, r := range c.String() {
		if unicode.IsUpper(r) && prevLower {
			b.WriteByte('_')
		}
		prevLower = unicode.IsLower(r)
		b.WriteRune(unicode.ToUpper(r))
	}
	return b.String()
}
