package store

import "testing"

// FuzzDecode: a stored record of any shape is refused or read, never a
// panic, and what is read passes the record checks.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"schema":1,"tenant":"t","name":"k","alg":"ES256","backend":"pkcs11","created":"2026-01-01T00:00:00Z","policy":{},"versions":[{"version":1,"kid":"x","state":"active","handle":"AAAA","public_key":"AAAA","created":"2026-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"schema":2}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := Decode(b)
		if err == nil && check(k) != nil {
			t.Fatalf("decode accepted a record that fails check: %+v", k)
		}
	})
}
