package config

import (
	"strings"
	"testing"
)

// FuzzParse: any YAML is parsed or refused without a panic, and Validate
// never panics on what parses.
func FuzzParse(f *testing.F) {
	f.Add("socket: /run/kb.sock\n")
	f.Add(fullYAML)
	f.Add("tenants:\n  - name: a\n    identities: {uids: [1]}\n    roles: [signer]\n")
	f.Add("pkcs11: [1, 2]\n")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := Parse(strings.NewReader(s))
		if err != nil {
			return
		}
		c.Validate()
	})
}
