package authn

import (
	"errors"
	"fmt"
	"strings"
)

// Rule maps identities to one tenant (from the config).
type Rule struct {
	Tenant string
	// UIDs and GIDs match unix peers (SO_PEERCRED).
	UIDs, GIDs []uint32
	// SPIFFEIDs, DNSNames and CommonNames match mTLS peers. SPIFFE IDs
	// compare exactly; DNS names and CNs ignore ASCII case. A certificate
	// with a SPIFFE ID matches by it alone (see [Resolver.Resolve]).
	SPIFFEIDs   []string
	DNSNames    []string
	CommonNames []string
}

// Resolver maps identities to tenants. It is immutable and safe for
// concurrent use; a config reload builds a new one.
type Resolver struct {
	uids, gids map[uint32]string
	spiffe     map[string]string
	dns, cn    map[string]string // keys lowered (ASCII)
}

// NewResolver checks rules and returns their Resolver. Tenant names must
// be non-empty and unique, names non-empty and SPIFFE IDs spiffe:// URIs,
// and every identity must map to at most one tenant: a UID, GID, SPIFFE
// ID, DNS name or CN listed for two tenants is an error naming both, and
// so is a name listed as a DNS name of one tenant and a CN of another
// (ignoring ASCII case): which one a certificate matched would depend on
// whether it also carries the name as a DNS SAN.
// All problems are reported at once (errors.Join).
func NewResolver(rules []Rule) (*Resolver, error) {
	r := &Resolver{
		uids:   map[uint32]string{},
		gids:   map[uint32]string{},
		spiffe: map[string]string{},
		dns:    map[string]string{},
		cn:     map[string]string{},
	}
	var errs []error
	seen := map[string]int{} // tenant → index of its rule
	for i, rule := range rules {
		if rule.Tenant == "" {
			errs = append(errs, fmt.Errorf("authn: rule %d: empty tenant name", i))
		} else if j, dup := seen[rule.Tenant]; dup {
			errs = append(errs, fmt.Errorf("authn: rule %d: tenant %q is already declared by rule %d", i, rule.Tenant, j))
		} else {
			seen[rule.Tenant] = i
		}
		who := fmt.Sprintf("rule %d (tenant %q)", i, rule.Tenant)
		for _, uid := range rule.UIDs {
			errs = add(errs, r.uids, uid, rule.Tenant, who, fmt.Sprintf("uid %d", uid))
		}
		for _, gid := range rule.GIDs {
			errs = add(errs, r.gids, gid, rule.Tenant, who, fmt.Sprintf("gid %d", gid))
		}
		for _, id := range rule.SPIFFEIDs {
			if !strings.HasPrefix(id, "spiffe://") || len(id) == len("spiffe://") {
				errs = append(errs, fmt.Errorf("authn: %s: SPIFFE ID %q: want spiffe://trust-domain/path", who, id))
				continue
			}
			errs = add(errs, r.spiffe, id, rule.Tenant, who, fmt.Sprintf("SPIFFE ID %q", id))
		}
		for _, name := range rule.DNSNames {
			if name == "" {
				errs = append(errs, fmt.Errorf("authn: %s: empty DNS name", who))
				continue
			}
			key := asciiLower(name)
			errs = crossKind(errs, r.cn, key, rule.Tenant, who, fmt.Sprintf("DNS name %q", name), "common name")
			errs = add(errs, r.dns, key, rule.Tenant, who, fmt.Sprintf("DNS name %q", name))
		}
		for _, name := range rule.CommonNames {
			if name == "" {
				errs = append(errs, fmt.Errorf("authn: %s: empty common name", who))
				continue
			}
			key := asciiLower(name)
			errs = crossKind(errs, r.dns, key, rule.Tenant, who, fmt.Sprintf("common name %q", name), "DNS name")
			errs = add(errs, r.cn, key, rule.Tenant, who, fmt.Sprintf("common name %q", name))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return r, nil
}

// add maps key to tenant in m, or appends the conflict to errs if key
// already maps to another tenant. Listing a name twice for one tenant is
// harmless.
func add[K comparable](errs []error, m map[K]string, key K, tenant, who, what string) []error {
	if other, ok := m[key]; ok {
		if other != tenant {
			errs = append(errs, fmt.Errorf("authn: %s: %s is already mapped to tenant %q", who, what, other))
		}
		return errs
	}
	m[key] = tenant
	return errs
}

// crossKind appends to errs the conflict of key, a name of tenant, with
// the same name of another kind (other) in m mapped to another tenant.
func crossKind(errs []error, m map[string]string, key, tenant, who, what, other string) []error {
	if t, ok := m[key]; ok && t != tenant {
		errs = append(errs, fmt.Errorf("authn: %s: %s is already mapped to tenant %q as a %s", who, what, t, other))
	}
	return errs
}

// Tenant maps an identity to its tenant, as [Resolver.Resolve] does.
func (r *Resolver) Tenant(id Identity) (tenant string, ok bool) {
	tenant, _, ok = r.Resolve(id)
	return tenant, ok
}

// Resolve maps an identity to its tenant and names, for logs and audit
// records, the identity that matched. A unix peer matches by UID first,
// then by (primary) GID, and is named as by [Identity.String]. A
// certificate with a SPIFFE ID (any URI SAN with scheme spiffe) matches by
// that ID alone, named as it is: it maps to no tenant if the ID is not
// listed, invalid, or one of several (an X509-SVID has exactly one), and
// never falls back to its other names. A certificate without one matches
// by DNS SANs in certificate order ("dns:a.example"), then by CN
// ("cn:a"). ok is false for an identity that maps to no tenant; name is
// then id.String().
func (r *Resolver) Resolve(id Identity) (tenant, name string, ok bool) {
	if t, n, ok := r.resolve(id); ok {
		return t, n, true
	}
	return "", id.String(), false
}

// resolve is Resolve but for the name of an identity that maps to no
// tenant, which it may leave empty.
func (r *Resolver) resolve(id Identity) (tenant, name string, ok bool) {
	if id.Unix {
		if t, ok := r.uids[id.UID]; ok {
			return t, id.String(), true
		}
		t, ok := r.gids[id.GID]
		return t, id.String(), ok
	}
	if id.SPIFFEID != "" || len(id.SPIFFEURIs) > 0 {
		if id.SPIFFEID == "" || len(id.SPIFFEURIs) > 1 {
			return "", "", false
		}
		t, ok := r.spiffe[id.SPIFFEID]
		return t, logSafe(id.SPIFFEID), ok
	}
	for _, n := range id.DNSNames {
		if n == "" {
			continue
		}
		if t, ok := r.dns[asciiLower(n)]; ok {
			return t, "dns:" + logSafe(n), true
		}
	}
	if id.CommonName != "" {
		t, ok := r.cn[asciiLower(id.CommonName)]
		return t, "cn:" + logSafe(id.CommonName), ok
	}
	return "", "", false
}

// asciiLower lowers ASCII letters only, byte by byte: unlike
// strings.ToLower it neither folds non-ASCII look-alikes (U+212A KELVIN
// SIGN → "k") into ASCII names nor rewrites invalid UTF-8.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + ('a' - 'A')
		}
	}
	return string(b)
}
