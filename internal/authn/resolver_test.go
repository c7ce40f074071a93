package authn_test

import (
	"strings"
	"testing"

	"github.com/keybroker/keybroker/internal/authn"
)

func TestResolverTenant(t *testing.T) {
	r, err := authn.NewResolver([]authn.Rule{
		{Tenant: "uid", UIDs: []uint32{1000, 0}},
		{Tenant: "gid", GIDs: []uint32{1000, 2000}},
		{Tenant: "spiffe", SPIFFEIDs: []string{"spiffe://example.org/a"}},
		{Tenant: "dns", DNSNames: []string{"A.Example", "c.example"}},
		{Tenant: "dns2", DNSNames: []string{"b.example"}},
		{Tenant: "cn", CommonNames: []string{"Svc-C", "Kelvin"}},
	})
	if err != nil {
		t.Fatalf("NewResolver: %v", err)
	}
	for _, tc := range []struct {
		name   string
		id     authn.Identity
		want   string
		wantOK bool
	}{
		{"uid", authn.Identity{Unix: true, UID: 1000, GID: 5}, "uid", true},
		{"uid before gid", authn.Identity{Unix: true, UID: 1000, GID: 2000}, "uid", true},
		{"gid when uid unknown", authn.Identity{Unix: true, UID: 1001, GID: 2000}, "gid", true},
		{"unknown unix", authn.Identity{Unix: true, UID: 1001, GID: 1001}, "", false},
		{"root listed", authn.Identity{Unix: true, UID: 0, GID: 0}, "uid", true},
		// A TLS identity has UID 0 but is not a unix peer.
		{"TLS never matches uid 0", authn.Identity{CommonName: "nobody"}, "", false},
		{"no names", authn.Identity{}, "", false},
		// Names of unix peers are empty; certificate names never apply.
		{"unix ignores cert names", authn.Identity{Unix: true, UID: 7, GID: 7, CommonName: "svc-c"}, "", false},

		{"spiffe", authn.Identity{SPIFFEID: "spiffe://example.org/a"}, "spiffe", true},
		{"spiffe before dns and cn", authn.Identity{SPIFFEID: "spiffe://example.org/a", DNSNames: []string{"a.example"}, CommonName: "svc-c"}, "spiffe", true},
		{"spiffe exact", authn.Identity{SPIFFEID: "spiffe://example.org/A"}, "", false},
		{"spiffe with its URI", authn.Identity{SPIFFEID: "spiffe://example.org/a", SPIFFEURIs: []string{"spiffe://example.org/a"}}, "spiffe", true},
		// A certificate with a SPIFFE ID is decided by it alone.
		{"unknown spiffe does not fall to dns", authn.Identity{SPIFFEID: "spiffe://example.org/x", SPIFFEURIs: []string{"spiffe://example.org/x"}, DNSNames: []string{"a.example"}}, "", false},
		{"unknown spiffe does not fall to cn", authn.Identity{SPIFFEID: "spiffe://example.org/x", CommonName: "svc-c"}, "", false},
		{"two spiffe IDs", authn.Identity{SPIFFEURIs: []string{"spiffe://example.org/a", "spiffe://example.org/b"}, DNSNames: []string{"a.example"}, CommonName: "svc-c"}, "", false},
		{"two spiffe IDs, one listed", authn.Identity{SPIFFEID: "spiffe://example.org/a", SPIFFEURIs: []string{"spiffe://example.org/a", "spiffe://example.org/a"}}, "", false},
		{"invalid spiffe ID", authn.Identity{SPIFFEURIs: []string{"spiffe://example.org:8443/a"}, DNSNames: []string{"a.example"}, CommonName: "svc-c"}, "", false},
		{"dns case-insensitive", authn.Identity{DNSNames: []string{"a.EXAMPLE"}}, "dns", true},
		{"dns in certificate order", authn.Identity{DNSNames: []string{"x.example", "b.example", "a.example"}}, "dns2", true},
		{"dns in certificate order 2", authn.Identity{DNSNames: []string{"a.example", "b.example"}}, "dns", true},
		{"dns before cn", authn.Identity{DNSNames: []string{"b.example"}, CommonName: "svc-c"}, "dns2", true},
		{"cn case-insensitive", authn.Identity{CommonName: "SVC-c"}, "cn", true},
		{"unknown dns falls to cn", authn.Identity{DNSNames: []string{"x.example"}, CommonName: "svc-c"}, "cn", true},
		// U+212A KELVIN SIGN lowers to "k" in Unicode, not in ASCII.
		{"ascii", authn.Identity{CommonName: "KELVIN"}, "cn", true},
		{"no Unicode folding", authn.Identity{CommonName: "\u212aelvin"}, "", false},
		{"unknown tls", authn.Identity{SPIFFEID: "spiffe://example.org/x", DNSNames: []string{"x.example"}, CommonName: "x"}, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := r.Tenant(tc.id)
			if got != tc.want || ok != tc.wantOK {
				t.Errorf("Tenant(%+v) = %q, %v; want %q, %v", tc.id, got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

func TestNewResolverErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		rules []authn.Rule
		want  [][]string // each problem: substrings of one line of the error
	}{{
		name: "uid conflict",
		rules: []authn.Rule{
			{Tenant: "a", UIDs: []uint32{1000}},
			{Tenant: "b", UIDs: []uint32{1000}},
		},
		want: [][]string{{`"a"`, `"b"`, "uid 1000"}},
	}, {
		name: "all conflicts at once",
		rules: []authn.Rule{
			{Tenant: "a", UIDs: []uint32{1}, GIDs: []uint32{2}, SPIFFEIDs: []string{"spiffe://td/x"}, DNSNames: []string{"a.example"}, CommonNames: []string{"cn-a"}},
			{Tenant: "b", UIDs: []uint32{1}, GIDs: []uint32{2}, SPIFFEIDs: []string{"spiffe://td/x"}, DNSNames: []string{"A.EXAMPLE"}, CommonNames: []string{"CN-A"}},
		},
		want: [][]string{
			{`"a"`, `"b"`, "uid 1"},
			{`"a"`, `"b"`, "gid 2"},
			{`"a"`, `"b"`, `SPIFFE ID "spiffe://td/x"`},
			{`"a"`, `"b"`, `DNS name "A.EXAMPLE"`},
			{`"a"`, `"b"`, `common name "CN-A"`},
		},
	}, {
		// A certificate with CN svc.example would map to a, one that
		// also has it as a DNS SAN to b.
		name: "common name of one tenant, DNS name of another",
		rules: []authn.Rule{
			{Tenant: "a", CommonNames: []string{"svc.example"}},
			{Tenant: "b", DNSNames: []string{"SVC.example"}},
		},
		want: [][]string{{`"a"`, `"b"`, `DNS name "SVC.example"`, "common name"}},
	}, {
		name: "DNS name of one tenant, common name of another",
		rules: []authn.Rule{
			{Tenant: "a", DNSNames: []string{"svc.example"}},
			{Tenant: "b", CommonNames: []string{"svc.EXAMPLE"}, DNSNames: []string{"b.example"}},
			{Tenant: "c", CommonNames: []string{"b.example"}},
		},
		want: [][]string{
			{`"a"`, `"b"`, `common name "svc.EXAMPLE"`, "DNS name"},
			{`"b"`, `"c"`, `common name "b.example"`, "DNS name"},
		},
	}, {
		name: "tenant names",
		rules: []authn.Rule{
			{Tenant: "", UIDs: []uint32{1}},
			{Tenant: "a", UIDs: []uint32{2}},
			{Tenant: "a", UIDs: []uint32{3}},
		},
		want: [][]string{{"rule 0", "empty tenant"}, {"rule 2", `"a"`, "rule 1"}},
	}, {
		name: "bad names",
		rules: []authn.Rule{
			{Tenant: "a", SPIFFEIDs: []string{"", "https://example.org/a", "spiffe://"}, DNSNames: []string{""}, CommonNames: []string{""}},
		},
		want: [][]string{
			{`SPIFFE ID ""`},
			{`SPIFFE ID "https://example.org/a"`},
			{`SPIFFE ID "spiffe://"`},
			{"empty DNS name"},
			{"empty common name"},
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := authn.NewResolver(tc.rules)
			if err == nil {
				t.Fatalf("NewResolver = %v, nil; want error", r)
			}
			lines := strings.Split(err.Error(), "\n")
			if len(lines) != len(tc.want) {
				t.Errorf("got %d problems, want %d:\n%v", len(lines), len(tc.want), err)
			}
			for _, subs := range tc.want {
				found := false
				for _, line := range lines {
					if containsAll(line, subs) {
						found = true
						break
					}
				}
				if !found {
					t.Errorf("no problem mentions all of %q in:\n%v", subs, err)
				}
			}
		})
	}
}

// The same name twice for one tenant, in any case and as a DNS name and
// a CN, is not a conflict; no rules at all is valid (nobody is anyone).
func TestNewResolverValid(t *testing.T) {
	r, err := authn.NewResolver([]authn.Rule{
		{Tenant: "a", UIDs: []uint32{1, 1}, DNSNames: []string{"a.example", "A.example"}, CommonNames: []string{"A.EXAMPLE"}},
	})
	if err != nil {
		t.Fatalf("NewResolver: %v", err)
	}
	if got, ok := r.Tenant(authn.Identity{Unix: true, UID: 1}); got != "a" || !ok {
		t.Errorf("Tenant = %q, %v; want \"a\", true", got, ok)
	}
	r, err = authn.NewResolver(nil)
	if err != nil {
		t.Fatalf("NewResolver(nil): %v", err)
	}
	if got, ok := r.Tenant(authn.Identity{Unix: true}); ok {
		t.Errorf("Tenant with no rules = %q, true; want false", got)
	}
}

// Resolve names the identity that matched, not the first name of the
// certificate.
func TestResolveName(t *testing.T) {
	r, err := authn.NewResolver([]authn.Rule{
		{Tenant: "uid", UIDs: []uint32{1000}},
		{Tenant: "gid", GIDs: []uint32{2000}},
		{Tenant: "spiffe", SPIFFEIDs: []string{"spiffe://example.org/a"}},
		{Tenant: "dns", DNSNames: []string{"B.example"}},
		{Tenant: "cn", CommonNames: []string{"svc-c", "svc c"}},
	})
	if err != nil {
		t.Fatalf("NewResolver: %v", err)
	}
	for _, tc := range []struct {
		name               string
		id                 authn.Identity
		wantTenant, wantID string
		wantOK             bool
	}{
		{"uid", authn.Identity{Unix: true, UID: 1000, GID: 1, PID: 42}, "uid", "uid:1000 gid:1 pid:42", true},
		{"gid", authn.Identity{Unix: true, UID: 1, GID: 2000, PID: 42}, "gid", "uid:1 gid:2000 pid:42", true},
		{"spiffe", authn.Identity{SPIFFEID: "spiffe://example.org/a", SPIFFEURIs: []string{"spiffe://example.org/a"}, DNSNames: []string{"b.example"}, CommonName: "svc-c"}, "spiffe", "spiffe://example.org/a", true},
		{"second DNS SAN", authn.Identity{DNSNames: []string{"x.example", "b.EXAMPLE"}, CommonName: "svc-c"}, "dns", "dns:b.EXAMPLE", true},
		{"CN after unknown DNS SANs", authn.Identity{DNSNames: []string{"x.example"}, CommonName: "SVC-C"}, "cn", "cn:SVC-C", true},
		{"CN quoted", authn.Identity{CommonName: "svc c"}, "cn", `cn:"svc c"`, true},
		// Unmapped: the whole identity, as String names it.
		{"unknown unix", authn.Identity{Unix: true, UID: 1, GID: 1, PID: 42}, "", "uid:1 gid:1 pid:42", false},
		{"unknown spiffe", authn.Identity{SPIFFEID: "spiffe://example.org/x", SPIFFEURIs: []string{"spiffe://example.org/x"}, CommonName: "svc-c"}, "", "spiffe://example.org/x", false},
		{"two spiffe IDs", authn.Identity{SPIFFEURIs: []string{"spiffe://example.org/a", "spiffe://example.org/b"}, CommonName: "svc-c"}, "", "spiffe://example.org/a,spiffe://example.org/b", false},
		{"unknown cn", authn.Identity{DNSNames: []string{"x.example"}, CommonName: "x"}, "", "dns:x.example", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tenant, id, ok := r.Resolve(tc.id)
			if tenant != tc.wantTenant || id != tc.wantID || ok != tc.wantOK {
				t.Errorf("Resolve(%+v) = %q, %q, %v; want %q, %q, %v", tc.id, tenant, id, ok, tc.wantTenant, tc.wantID, tc.wantOK)
			}
		})
	}
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

func TestIdentityString(t *testing.T) {
	for _, tc := range []struct {
		id   authn.Identity
		want string
	}{
		{authn.Identity{Unix: true, UID: 1000, GID: 1000, PID: 42}, "uid:1000 gid:1000 pid:42"},
		{authn.Identity{SPIFFEID: "spiffe://example.org/a", DNSNames: []string{"a.example"}, CommonName: "a"}, "spiffe://example.org/a"},
		{authn.Identity{SPIFFEID: "spiffe://example.org/a", SPIFFEURIs: []string{"spiffe://example.org/a"}, CommonName: "a"}, "spiffe://example.org/a"},
		{authn.Identity{SPIFFEURIs: []string{"spiffe://example.org/a", "spiffe://example.org/b"}, DNSNames: []string{"a.example"}}, "spiffe://example.org/a,spiffe://example.org/b"},
		{authn.Identity{SPIFFEURIs: []string{"spiffe://example.org:1/a"}, CommonName: "a"}, "spiffe://example.org:1/a"},
		{authn.Identity{DNSNames: []string{"a.example", "b.example"}, CommonName: "a"}, "dns:a.example"},
		{authn.Identity{CommonName: "a"}, "cn:a"},
		{authn.Identity{CommonName: "a\nlevel=ERROR"}, `cn:"a\nlevel=ERROR"`},
		{authn.Identity{CommonName: "a b"}, `cn:"a b"`},
		{authn.Identity{}, "unknown"},
	} {
		if got := tc.id.String(); got != tc.want {
			t.Errorf("%+v.String() = %q, want %q", tc.id, got, tc.want)
		}
	}
}
