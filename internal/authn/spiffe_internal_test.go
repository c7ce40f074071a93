package authn

import (
	"net/url"
	"slices"
	"testing"
)

func TestSPIFFEID(t *testing.T) {
	u := func(s string) *url.URL {
		v, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, tc := range []struct {
		name string
		uris []*url.URL
		want string
	}{
		{"none", nil, ""},
		{"one", []*url.URL{u("spiffe://example.org/a")}, "spiffe://example.org/a"},
		{"one among others", []*url.URL{u("https://example.org/x"), u("spiffe://example.org/a"), u("urn:x:y")}, "spiffe://example.org/a"},
		{"two", []*url.URL{u("spiffe://example.org/a"), u("spiffe://example.org/b")}, ""},
		{"two equal", []*url.URL{u("spiffe://example.org/a"), u("spiffe://example.org/a")}, ""},
		{"no trust domain", []*url.URL{u("spiffe:///a")}, ""},
		{"opaque", []*url.URL{u("spiffe:example.org/a")}, ""},
		{"port", []*url.URL{u("spiffe://example.org:8443/a")}, ""},
		{"userinfo", []*url.URL{u("spiffe://u@example.org/a")}, ""},
		{"query", []*url.URL{u("spiffe://example.org/a?x=1")}, ""},
		{"fragment", []*url.URL{u("spiffe://example.org/a#f")}, ""},
		{"no spiffe", []*url.URL{u("https://example.org/a")}, ""},
	} {
		if got := spiffeID(tc.uris); got != tc.want {
			t.Errorf("%s: spiffeID = %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestSPIFFEURIs(t *testing.T) {
	u := func(s string) *url.URL {
		v, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, tc := range []struct {
		name string
		uris []*url.URL
		want []string
	}{
		{"none", nil, nil},
		{"no spiffe", []*url.URL{u("https://example.org/a")}, nil},
		{"one among others", []*url.URL{u("https://example.org/x"), nil, u("spiffe://example.org/a"), u("urn:x:y")}, []string{"spiffe://example.org/a"}},
		{"invalid ones too", []*url.URL{u("SPIFFE://example.org:1/a"), u("spiffe:///b")}, []string{"spiffe://example.org:1/a", "spiffe:///b"}},
	} {
		if got := spiffeURIs(tc.uris); !slices.Equal(got, tc.want) {
			t.Errorf("%s: spiffeURIs = %q, want %q", tc.name, got, tc.want)
		}
	}
}
