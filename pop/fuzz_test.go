package pop

import (
	"encoding/json"
	"testing"
	"time"
)

// FuzzParseJWS: the JWS parser and verifiers never panic on any input.
func FuzzParseJWS(f *testing.F) {
	f.Add("eyJhbGciOiJFUzI1NiJ9.e30.AAAA")
	f.Add("..")
	f.Add("a.b.c.d")
	f.Add(`eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg`)
	f.Fuzz(func(t *testing.T, s string) {
		ParseJWS(s)
		VerifyDPoPProof(s, DPoPCheck{Method: "POST", URL: "https://server.example.com/token", Now: time.Unix(1562262616, 0)})
		VerifySignedHTTPRequest(s, SHRCheck{Method: "GET", URL: "https://a.example/p", Now: time.Now()})
	})
}

// FuzzJWK: parsing a JWK never panics, and one that parses has a stable
// thumbprint.
func FuzzJWK(f *testing.F) {
	f.Add(`{"kty":"EC","crv":"P-256","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs","y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"}`)
	f.Add(`{"kty":"RSA","n":"AQAB","e":"AQAB"}`)
	f.Add(`{}`)
	// encoding/base64 skips CR and LF: "\n" decodes to nothing, and a
	// newline inside x must not give the key a second thumbprint.
	f.Add(`{"kty":"RSA","n":"\n","e":"AQAB"}`)
	f.Add(`{"kty":"RSA","n":"AQAB","e":"\r\n"}`)
	f.Add(`{"kty":"EC","crv":"P-256","x":"l8tFrhx-34tV3hRICRDY9zCkDlpB\nhF42UQUfWVAWBFs","y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"}`)
	f.Fuzz(func(t *testing.T, s string) {
		var j JWK
		if json.Unmarshal([]byte(s), &j) != nil {
			return
		}
		pub, err := j.PublicKey()
		if err != nil {
			return
		}
		tp1, err := j.Thumbprint()
		if err != nil {
			t.Fatalf("parsed JWK has no thumbprint: %v", err)
		}
		tp2, err := Thumbprint(pub)
		if err != nil || tp1 != tp2 {
			t.Fatalf("thumbprints differ: %q vs %q (%v)", tp1, tp2, err)
		}
	})
}
