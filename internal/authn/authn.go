// Package authn says who is calling keybrokerd. It authenticates peers —
// the SO_PEERCRED credentials of a unix-socket peer and the verified client
// certificate of an mTLS peer — and maps their identities to tenants.
//
// Only the gRPC server, the daemon wiring and the config (to validate the
// tenants' identities with [NewResolver]) may import it; the core (kms,
// keyring, backends) sees tenant names, never identities.
package authn

import (
	"context"
	"crypto/x509"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"unicode"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Identity is an authenticated peer.
type Identity struct {
	// Unix is true when the identity comes from SO_PEERCRED on a unix
	// socket; UID, GID and PID are then set and the certificate fields
	// are empty. GID is the peer's primary group only: SO_PEERCRED does
	// not carry supplementary groups.
	Unix     bool
	UID, GID uint32
	// PID is the peer's process id at connect(2) time, as seen from
	// keybrokerd's PID namespace (0 if the peer is in a namespace that
	// keybrokerd cannot see). It is informational: it may have exited or
	// been reused since.
	PID int32

	// From the verified client certificate (the leaf of the verified
	// chain):

	// SPIFFEID is the certificate's spiffe:// URI SAN if it has exactly
	// one and it is a valid SPIFFE ID (SPIFFE X509-SVID, section 2), else
	// empty.
	SPIFFEID string
	// SPIFFEURIs are all the certificate's URI SANs with scheme spiffe,
	// valid SPIFFE IDs or not, in certificate order. A certificate with
	// any is identified by its SPIFFE ID alone (see [Resolver.Resolve]).
	SPIFFEURIs []string
	// DNSNames are the certificate's DNS SANs, in certificate order.
	DNSNames []string
	// CommonName is the certificate's subject CN.
	CommonName string
}

// String names the identity for logs, and for the audit record of a
// caller that maps to no tenant: "uid:1000 gid:1000 pid:42" for a unix
// peer; for a certificate with a SPIFFE ID (a spiffe URI SAN), that ID
// ("spiffe://example.org/a"), or its spiffe URIs joined by commas if it
// has several or an invalid one; else the first DNS SAN ("dns:a.example"),
// else the CN ("cn:a"), else "unknown". The name of a caller that maps
// to a tenant is the identity that matched, from [Resolver.Resolve]. A
// name with spaces, quotes or non-printable characters is quoted, so that
// a certificate cannot forge log fields. It contains no secrets.
func (id Identity) String() string {
	switch {
	case id.Unix:
		return fmt.Sprintf("uid:%d gid:%d pid:%d", id.UID, id.GID, id.PID)
	case id.SPIFFEID != "" && len(id.SPIFFEURIs) <= 1:
		return logSafe(id.SPIFFEID)
	case len(id.SPIFFEURIs) > 0:
		return logSafe(strings.Join(id.SPIFFEURIs, ","))
	case len(id.DNSNames) > 0:
		return "dns:" + logSafe(id.DNSNames[0])
	case id.CommonName != "":
		return "cn:" + logSafe(id.CommonName)
	default:
		return "unknown"
	}
}

// logSafe returns s, quoted if it contains anything but printable
// non-space characters or a double quote.
func logSafe(s string) string {
	if strings.IndexFunc(s, func(r rune) bool {
		return r == '"' || r == unicode.ReplacementChar || !unicode.IsGraphic(r) || unicode.IsSpace(r)
	}) >= 0 {
		return strconv.Quote(s)
	}
	return s
}

// FromContext returns the identity of the peer of the incoming RPC of ctx:
// the SO_PEERCRED credentials attached by [UnixCredentials], or the leaf of
// the verified chain of a TLS peer (see [ServerTLS]). ok is false for any
// other peer: no peer, other credentials (insecure, local), or TLS without
// a verified client chain. It never looks at unverified certificates.
func FromContext(ctx context.Context) (id Identity, ok bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return Identity{}, false
	}
	switch info := p.AuthInfo.(type) {
	case peerCredInfo:
		return Identity{Unix: true, UID: info.uid, GID: info.gid, PID: info.pid}, true
	case credentials.TLSInfo:
		if len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
			return Identity{}, false
		}
		return certIdentity(info.State.VerifiedChains[0][0]), true
	default:
		return Identity{}, false
	}
}

// certIdentity is the identity of a verified leaf certificate.
func certIdentity(leaf *x509.Certificate) Identity {
	return Identity{
		SPIFFEID:   spiffeID(leaf.URIs),
		SPIFFEURIs: spiffeURIs(leaf.URIs),
		DNSNames:   slices.Clone(leaf.DNSNames),
		CommonName: leaf.Subject.CommonName,
	}
}

// spiffeID returns the SPIFFE ID among uris if there is exactly one URI
// with scheme spiffe, and "" otherwise. SPIFFE X509-SVID section 2: an SVID
// contains exactly one SPIFFE ID; a certificate with several is not an
// SVID. SPIFFE ID section 2: spiffe://trust-domain/path, without userinfo,
// port, query or fragment; one that breaks these rules counts as none.
func spiffeID(uris []*url.URL) string {
	var found *url.URL
	for _, u := range uris {
		if u == nil || u.Scheme != "spiffe" {
			continue
		}
		if found != nil {
			return ""
		}
		found = u
	}
	if found == nil || found.Opaque != "" || found.Host == "" || found.User != nil ||
		found.Port() != "" || found.RawQuery != "" || found.ForceQuery || found.Fragment != "" {
		return ""
	}
	return found.String()
}

// spiffeURIs returns the URIs among uris with scheme spiffe, as strings,
// or nil if there are none.
func spiffeURIs(uris []*url.URL) []string {
	var out []string
	for _, u := range uris {
		if u != nil && u.Scheme == "spiffe" {
			out = append(out, u.String())
		}
	}
	return out
}
