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
	// compare exactly; DNS names and CNs ignore ASCII case.
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
// ID, DNS name or CN listed for two tenants is an error naming both.
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
			errs = add(errs, r.dns, asciiLower(name), rule.Tenant, who, fmt.Sprintf("DNS name %q", name))
		}
		for _, name := range rule.CommonNames {
			if name == "" {
				errs = append(errs, fmt.Errorf("authn: %s: empty common name", who))
				continue
			}
			errs = add(errs, r.cn, asciiLower(name), rule.Tenant, who, fmt.Sprintf("common name %q", name))
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

// Tenant maps an identity to its tenant. A unix peer matches by UID
// first, then by (primary) GID; a TLS peer by SPIFFE ID, then by DNS SANs
// in certificate order, then by CN. ok is false for an unknown identity.
func (r *Resolver) Tenant(id Identity) (tenant string, ok bool) {
	if id.Unix {
		if t, ok := r.uids[id.UID]; ok {
			return t, true
		}
		t, ok := r.gids[id.GID]
		return t, ok
	}
	if id.SPIFFEID != "" {
		if t, ok := r.spiffe[id.SPIFFEID]; ok {
			return t, true
		}
	}
	for _, name := range id.DNSNames {
		if name == "" {
			continue
		}
		if t, ok := r.dns[asciiLower(name)]; ok {
			return t, true
		}
	}
	if id.CommonName != "" {
		t, ok := r.cn[asciiLower(id.CommonName)]
		return t, ok
	}
	return "", false
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
