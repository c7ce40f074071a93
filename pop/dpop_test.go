package pop

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// RFC 9449 §4.1 example proof (PROTOCOLS.md).
const (
	rfc9449Proof = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
	rfc9449IAT   = 1562262616
	rfc9449JTI   = "-BwC3ESc6acc2lTc"
	rfc9449HTU   = "https://server.example.com/token"
)

func TestNormalizeHTU(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		// PROTOCOLS.md vector.
		{"HTTPS://Resource.Example.ORG:443/protectedresource?x=1#frag", "https://resource.example.org/protectedresource"},
		{"https://server.example.com/token", "https://server.example.com/token"},
		{"http://Example.com:80/a", "http://example.com/a"},
		{"http://example.com:443/a", "http://example.com:443/a"},
		{"https://example.com:80/a", "https://example.com:80/a"},
		{"https://example.com:8443", "https://example.com:8443/"},
		{"https://example.com", "https://example.com/"},
		{"https://example.com?q", "https://example.com/"},
		{"https://example.com:/x", "https://example.com/x"},
		{"https://user:pass@example.com/x", "https://example.com/x"},
		{"https://example.com/A/b%7eC/", "https://example.com/A/b%7eC/"},
		{"https://example.com/a/../b", "https://example.com/a/../b"},
		{"https://[2001:DB8::1]:443/x", "https://[2001:db8::1]/x"},
		{"https://[2001:db8::1]:8443/x", "https://[2001:db8::1]:8443/x"},
	} {
		got, err := NormalizeHTU(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("NormalizeHTU(%q): got %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{
		"", "/token", "server.example.com/token", "ftp://example.com/x", "wss://example.com/x",
		"https:opaque", "https:///path", "https://example.com:99999/", "https://example.com:0/",
		"https://exa mple.com/", "://x",
	} {
		if got, err := NormalizeHTU(bad); !errors.Is(err, ErrInvalidURL) {
			t.Errorf("NormalizeHTU(%q): got %q, %v; want ErrInvalidURL", bad, got, err)
		}
	}
}

func TestATHVector(t *testing.T) {
	const token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
	if got, want := ATH(token), "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"; got != want {
		t.Errorf("ATH: got %q, want %q", got, want)
	}
}

// The RFC 9449 example proof verifies as its request, and not as another.
func TestVerifyDPoPProofRFC9449(t *testing.T) {
	now := time.Unix(rfc9449IAT, 0)
	check := DPoPCheck{Method: "POST", URL: rfc9449HTU, Now: now}
	c, err := VerifyDPoPProof(rfc9449Proof, check)
	if err != nil {
		t.Fatalf("VerifyDPoPProof: %v", err)
	}
	if c.JTI != rfc9449JTI || c.HTM != "POST" || c.HTU != rfc9449HTU || c.IAT != rfc9449IAT || c.ATH != "" || c.Nonce != "" {
		t.Errorf("claims: got %+v", c)
	}
	if c.Thumbprint != rfc9449TP {
		t.Errorf("thumbprint: got %q, want %q", c.Thumbprint, rfc9449TP)
	}
	if c.JWK.X != rfc9449X || c.JWK.Y != rfc9449Y || c.JWK.Crv != "P-256" {
		t.Errorf("jwk: got %+v", c.JWK)
	}

	// The same URL written differently still matches after normalization.
	loose := check
	loose.URL = "HTTPS://Server.Example.COM:443/token?grant_type=x#f"
	if _, err := VerifyDPoPProof(rfc9449Proof, loose); err != nil {
		t.Errorf("normalized URL: %v", err)
	}
	// At the edge of the default 60 s window, and just past it.
	edge := check
	edge.Now = now.Add(60 * time.Second)
	if _, err := VerifyDPoPProof(rfc9449Proof, edge); err != nil {
		t.Errorf("iat 60s old: %v", err)
	}
	for _, tc := range []struct {
		name  string
		mod   func(*DPoPCheck)
		claim string
	}{
		{"stale", func(c *DPoPCheck) { c.Now = now.Add(61 * time.Second) }, "iat"},
		{"future", func(c *DPoPCheck) { c.Now = now.Add(-time.Second) }, "iat"},
		{"GET", func(c *DPoPCheck) { c.Method = "GET" }, "htm"},
		{"post lower-case", func(c *DPoPCheck) { c.Method = "post" }, "htm"},
		{"other path", func(c *DPoPCheck) { c.URL = "https://server.example.com/token2" }, "htu"},
		{"other host", func(c *DPoPCheck) { c.URL = "https://server.example.org/token" }, "htu"},
		{"http", func(c *DPoPCheck) { c.URL = "http://server.example.com/token" }, "htu"},
		{"access token but no ath", func(c *DPoPCheck) { c.AccessToken = "tok" }, "ath"},
		{"nonce required", func(c *DPoPCheck) { c.Nonce = "n-1" }, "nonce"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := check
			tc.mod(&c)
			_, err := VerifyDPoPProof(rfc9449Proof, c)
			var ce *ClaimError
			if !errors.As(err, &ce) || ce.Claim != tc.claim {
				t.Errorf("VerifyDPoPProof: got %v, want a *ClaimError for %q", err, tc.claim)
			}
		})
	}
	// Leeway widens the window both ways.
	lee := check
	lee.Leeway = 5 * time.Second
	for _, d := range []time.Duration{-5 * time.Second, 65 * time.Second} {
		lee.Now = now.Add(d)
		if _, err := VerifyDPoPProof(rfc9449Proof, lee); err != nil {
			t.Errorf("leeway 5s, now = iat%+v: %v", d, err)
		}
	}
}

// Proofs built by NewDPoPProof carry exactly the RFC 9449 members, verify
// independently and with VerifyDPoPProof, and bind the key by thumbprint.
func TestDPoPRoundTrip(t *testing.T) {
	ctx := context.Background()
	now := time.Unix(1_700_000_000, 0)
	const token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
	for _, s := range signerCases(t) {
		t.Run(s.alg, func(t *testing.T) {
			proof, err := NewDPoPProof(ctx, s, DPoPParams{
				Method: "GET", URL: "HTTPS://API.Example.com:443/v1/items?id=7#x",
				AccessToken: token, Nonce: "srv-nonce", Now: now,
				Extra: map[string]any{"client_note": "hi"},
			})
			if err != nil {
				t.Fatalf("NewDPoPProof: %v", err)
			}
			if !refVerify(t, proof, s.priv.Public()) {
				t.Fatal("independent verifier rejects the proof")
			}
			hdr := decodeSegment(t, proof, 0)
			if got := keys(hdr); got != "alg,jwk,typ" {
				t.Errorf("header members: got %s, want alg,jwk,typ", got)
			}
			if hdr["typ"] != "dpop+jwt" || hdr["alg"] != s.alg {
				t.Errorf("header: got %v", hdr)
			}
			wantJWK := "e,kty,n"
			if s.jwk.Kty == "EC" {
				wantJWK = "crv,kty,x,y"
			}
			if got := keys(hdr["jwk"].(map[string]any)); got != wantJWK {
				t.Errorf("jwk members: got %s, want %s", got, wantJWK)
			}
			p := decodeSegment(t, proof, 1)
			if got := keys(p); got != "ath,client_note,htm,htu,iat,jti,nonce" {
				t.Errorf("payload members: got %s", got)
			}
			if p["htm"] != "GET" || p["htu"] != "https://api.example.com/v1/items" ||
				p["ath"] != "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo" || p["nonce"] != "srv-nonce" ||
				p["iat"] != json.Number("1700000000") || p["client_note"] != "hi" {
				t.Errorf("payload: got %v", p)
			}
			if jti, _ := p["jti"].(string); len(mustB64(t, jti)) != 16 {
				t.Errorf("jti %q: want 16 random bytes, base64url", jti)
			}

			c, err := VerifyDPoPProof(proof, DPoPCheck{
				Method: "GET", URL: "https://api.example.com/v1/items?id=8",
				AccessToken: token, Nonce: "srv-nonce", Now: now.Add(30 * time.Second),
			})
			if err != nil {
				t.Fatalf("VerifyDPoPProof: %v", err)
			}
			tp, err := Thumbprint(s.priv.Public())
			if err != nil {
				t.Fatal(err)
			}
			if c.Thumbprint != tp || c.Thumbprint != s.jwk.Kid {
				t.Errorf("thumbprint: got %q, want %q", c.Thumbprint, tp)
			}
			if c.ATH != ATH(token) || c.Nonce != "srv-nonce" || c.IAT != now.Unix() || c.HTM != "GET" {
				t.Errorf("claims: got %+v", c)
			}
		})
	}
}

// A precomputed ATH and a caller's JTI are sent unchanged.
func TestDPoPParamsPassThrough(t *testing.T) {
	s := newTestSigner(t, "ES256", fixtures().p256)
	ath := ATH("token")
	proof, err := NewDPoPProof(context.Background(), s, DPoPParams{
		Method: "PATCH", URL: "http://localhost:8080", ATH: ath, JTI: "my-jti", Now: time.Unix(5, 0),
	})
	if err != nil {
		t.Fatal(err)
	}
	p := decodeSegment(t, proof, 1)
	if p["ath"] != ath || p["jti"] != "my-jti" || p["htu"] != "http://localhost:8080/" || p["htm"] != "PATCH" {
		t.Errorf("payload: got %v", p)
	}
	if got := keys(p); got != "ath,htm,htu,iat,jti" {
		t.Errorf("payload members: got %s", got)
	}
	if _, err := VerifyDPoPProof(proof, DPoPCheck{Method: "PATCH", URL: "http://localhost:8080/", AccessToken: "token", Now: time.Unix(5, 0)}); err != nil {
		t.Errorf("VerifyDPoPProof: %v", err)
	}
}

// NewDPoPProof refuses bad parameters before signing.
func TestNewDPoPProofRefuses(t *testing.T) {
	s := newTestSigner(t, "ES256", fixtures().p256)
	base := DPoPParams{Method: "POST", URL: "https://as.example/token", Now: time.Unix(1, 0)}
	for _, tc := range []struct {
		name  string
		mod   func(*DPoPParams)
		claim string
	}{
		{"empty method", func(p *DPoPParams) { p.Method = "" }, "htm"},
		{"method with space", func(p *DPoPParams) { p.Method = "PO ST" }, "htm"},
		{"method with colon", func(p *DPoPParams) { p.Method = "GET:" }, "htm"},
		{"relative URL", func(p *DPoPParams) { p.URL = "/token" }, "htu"},
		{"ftp URL", func(p *DPoPParams) { p.URL = "ftp://as.example/token" }, "htu"},
		{"zero time", func(p *DPoPParams) { p.Now = time.Time{} }, "iat"},
		{"token and ath", func(p *DPoPParams) { p.AccessToken = "t"; p.ATH = ATH("t") }, "ath"},
		{"ath not a hash", func(p *DPoPParams) { p.ATH = "abc" }, "ath"},
		{"extra htu", func(p *DPoPParams) { p.Extra = map[string]any{"htu": "https://evil.example/"} }, "htu"},
		{"extra iat", func(p *DPoPParams) { p.Extra = map[string]any{"iat": 0} }, "iat"},
		{"extra jti", func(p *DPoPParams) { p.Extra = map[string]any{"jti": "x"} }, "jti"},
		{"extra nonce", func(p *DPoPParams) { p.Extra = map[string]any{"nonce": "x"} }, "nonce"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := base
			tc.mod(&p)
			before := s.calls.Load()
			proof, err := NewDPoPProof(context.Background(), s, p)
			var ce *ClaimError
			if !errors.As(err, &ce) || ce.Claim != tc.claim {
				t.Fatalf("NewDPoPProof: got %q, %v; want a *ClaimError for %q", proof, err, tc.claim)
			}
			if s.calls.Load() != before {
				t.Error("Sign was called")
			}
		})
	}
}

// VerifyDPoPProof rejects proofs crafted to break each rule.
func TestVerifyDPoPProofRejects(t *testing.T) {
	f := fixtures()
	now := time.Unix(1_700_000_000, 0)
	pubJWK, err := NewJWK(&f.p256.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	rsaJWK, err := NewJWK(&f.rsa2048.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	jwkMap := func(extra map[string]any) map[string]any {
		m := map[string]any{"kty": "EC", "crv": "P-256", "x": pubJWK.X, "y": pubJWK.Y}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	hdr := func(mod func(map[string]any)) map[string]any {
		h := map[string]any{"typ": "dpop+jwt", "alg": "ES256", "jwk": jwkMap(nil)}
		if mod != nil {
			mod(h)
		}
		return h
	}
	const token = "access-token-1"
	claims := func(mod func(map[string]any)) map[string]any {
		c := map[string]any{"jti": "j-1", "htm": "POST", "htu": "https://rs.example/api", "iat": now.Unix(), "ath": ATH(token), "nonce": "n-1"}
		if mod != nil {
			mod(c)
		}
		return c
	}
	check := DPoPCheck{Method: "POST", URL: "https://rs.example/api", AccessToken: token, Nonce: "n-1", Now: now}
	sign := func(h, c any) string { return craftJWS(t, "ES256", f.p256, signOK, h, c) }

	// Control: the unmodified crafted proof verifies.
	if _, err := VerifyDPoPProof(sign(hdr(nil), claims(nil)), check); err != nil {
		t.Fatalf("control proof: %v", err)
	}
	// A private key's d, taken from the real key, so the JWK is otherwise valid.
	d := b64.EncodeToString(f.p256.D.FillBytes(make([]byte, 32)))
	good := sign(hdr(nil), claims(nil))
	gp := strings.Split(good, ".")
	tampered := gp[0] + "." + b64.EncodeToString([]byte(`{"jti":"j-1","htm":"GET","htu":"https://rs.example/api","iat":1700000000,"ath":"`+ATH(token)+`","nonce":"n-1"}`)) + "." + gp[2]
	noneProof := b64.EncodeToString([]byte(`{"typ":"dpop+jwt","alg":"none","jwk":{"kty":"EC","crv":"P-256","x":"`+pubJWK.X+`","y":"`+pubJWK.Y+`"}}`)) + "." + gp[1] + "."

	for _, tc := range []struct {
		name   string
		proof  string
		check  func(*DPoPCheck)
		header string // *HeaderError member, or
		claim  string // *ClaimError claim, or
		is     error  // errors.Is target
	}{
		{"jwk with d", sign(hdr(func(h map[string]any) { h["jwk"] = jwkMap(map[string]any{"d": d}) }), claims(nil)), nil, "jwk", "", ErrInvalidKey},
		{"jwk with k", sign(hdr(func(h map[string]any) { h["jwk"] = jwkMap(map[string]any{"k": "AAAA"}) }), claims(nil)), nil, "jwk", "", nil},
		{"jwk with p", sign(hdr(func(h map[string]any) { h["jwk"] = jwkMap(map[string]any{"p": "AAAA"}) }), claims(nil)), nil, "jwk", "", nil},
		{"jwk missing", sign(hdr(func(h map[string]any) { delete(h, "jwk") }), claims(nil)), nil, "jwk", "", nil},
		{"jwk not an object", sign(hdr(func(h map[string]any) { h["jwk"] = "x" }), claims(nil)), nil, "jwk", "", nil},
		{"jwk of a symmetric key", sign(hdr(func(h map[string]any) { h["jwk"] = map[string]any{"kty": "oct"} }), claims(nil)), nil, "jwk", "", ErrUnsupportedKey},
		{"jwk of another key", sign(hdr(func(h map[string]any) { h["jwk"] = rsaJWK }), claims(nil)), nil, "alg", "", ErrUnsupportedKey},
		{"jwk alg differs", sign(hdr(func(h map[string]any) { h["jwk"] = jwkMap(map[string]any{"alg": "ES384"}) }), claims(nil)), nil, "jwk", "", nil},
		{"jwk duplicate member", sign(`{"typ":"dpop+jwt","alg":"ES256","jwk":{"kty":"EC","crv":"P-256","x":"`+pubJWK.X+`","x":"`+pubJWK.X+`","y":"`+pubJWK.Y+`"}}`, claims(nil)), nil, "jwk", "", nil},
		{"typ JWT", sign(hdr(func(h map[string]any) { h["typ"] = "JWT" }), claims(nil)), nil, "typ", "", nil},
		{"typ missing", sign(hdr(func(h map[string]any) { delete(h, "typ") }), claims(nil)), nil, "typ", "", nil},
		{"alg none", noneProof, nil, "alg", "", ErrUnsupportedAlg},
		{"alg HS256", sign(hdr(func(h map[string]any) { h["alg"] = "HS256" }), claims(nil)), nil, "alg", "", ErrUnsupportedAlg},
		{"alg RS256 with EC jwk", sign(hdr(func(h map[string]any) { h["alg"] = "RS256" }), claims(nil)), nil, "alg", "", ErrUnsupportedKey},
		{"DER signature", craftJWS(t, "ES256", f.p256, signDER, hdr(nil), claims(nil)), nil, "", "", ErrInvalidSignature},
		{"tampered payload", tampered, nil, "", "", ErrVerification},
		{"signed by another key", craftJWS(t, "ES256", mustP256(t), signOK, hdr(nil), claims(nil)), nil, "", "", ErrVerification},
		{"wrong htm", sign(hdr(nil), claims(func(c map[string]any) { c["htm"] = "GET" })), nil, "", "htm", nil},
		{"wrong htu path", sign(hdr(nil), claims(func(c map[string]any) { c["htu"] = "https://rs.example/other" })), nil, "", "htu", nil},
		{"wrong htu host", sign(hdr(nil), claims(func(c map[string]any) { c["htu"] = "https://evil.example/api" })), nil, "", "htu", nil},
		{"htu not a URL", sign(hdr(nil), claims(func(c map[string]any) { c["htu"] = "api" })), nil, "", "htu", ErrInvalidURL},
		{"stale iat", sign(hdr(nil), claims(func(c map[string]any) { c["iat"] = now.Add(-61 * time.Second).Unix() })), nil, "", "iat", nil},
		{"future iat", sign(hdr(nil), claims(func(c map[string]any) { c["iat"] = now.Add(2 * time.Second).Unix() })), nil, "", "iat", nil},
		{"stale with MaxAge 10s", sign(hdr(nil), claims(func(c map[string]any) { c["iat"] = now.Add(-11 * time.Second).Unix() })), func(c *DPoPCheck) { c.MaxAge = 10 * time.Second }, "", "iat", nil},
		{"iat a string", sign(hdr(nil), claims(func(c map[string]any) { c["iat"] = "1700000000" })), nil, "", "iat", nil},
		{"iat missing", sign(hdr(nil), claims(func(c map[string]any) { delete(c, "iat") })), nil, "", "iat", nil},
		{"wrong ath", sign(hdr(nil), claims(func(c map[string]any) { c["ath"] = ATH("another-token") })), nil, "", "ath", nil},
		{"ath missing", sign(hdr(nil), claims(func(c map[string]any) { delete(c, "ath") })), nil, "", "ath", nil},
		{"wrong nonce", sign(hdr(nil), claims(func(c map[string]any) { c["nonce"] = "n-0" })), nil, "", "nonce", nil},
		{"nonce missing", sign(hdr(nil), claims(func(c map[string]any) { delete(c, "nonce") })), nil, "", "nonce", nil},
		{"jti missing", sign(hdr(nil), claims(func(c map[string]any) { delete(c, "jti") })), nil, "", "jti", nil},
		{"jti empty", sign(hdr(nil), claims(func(c map[string]any) { c["jti"] = "" })), nil, "", "jti", nil},
		{"htm a number", sign(hdr(nil), claims(func(c map[string]any) { c["htm"] = 1 })), nil, "", "htm", nil},
		{"duplicate htm", sign(hdr(nil), `{"jti":"j","htm":"GET","htm":"POST","htu":"https://rs.example/api","iat":1700000000,"ath":"`+ATH(token)+`","nonce":"n-1"}`), nil, "", "", ErrMalformedJWS},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := check
			if tc.check != nil {
				tc.check(&c)
			}
			got, err := VerifyDPoPProof(tc.proof, c)
			if err == nil {
				t.Fatalf("VerifyDPoPProof: got %+v, want an error", got)
			}
			t.Log(err)
			var he *HeaderError
			if tc.header != "" && (!errors.As(err, &he) || he.Member != tc.header) {
				t.Errorf("got %v, want a *HeaderError for %q", err, tc.header)
			}
			var ce *ClaimError
			if tc.claim != "" && (!errors.As(err, &ce) || ce.Claim != tc.claim) {
				t.Errorf("got %v, want a *ClaimError for %q", err, tc.claim)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("got %v, want %v", err, tc.is)
			}
		})
	}
}

// A bad DPoPCheck is an error, not a pass.
func TestVerifyDPoPProofBadCheck(t *testing.T) {
	for _, c := range []DPoPCheck{
		{Method: "POST", URL: rfc9449HTU},                                            // zero Now
		{URL: rfc9449HTU, Now: time.Unix(rfc9449IAT, 0)},                             // no method
		{Method: "POST", URL: "/token", Now: time.Unix(rfc9449IAT, 0)},               // relative URL
		{Method: "POST", URL: rfc9449HTU, Now: time.Unix(rfc9449IAT, 0), MaxAge: -1}, // negative
		{Method: "POST", URL: rfc9449HTU, Now: time.Unix(rfc9449IAT, 0), Leeway: -1},
	} {
		if _, err := VerifyDPoPProof(rfc9449Proof, c); err == nil {
			t.Errorf("VerifyDPoPProof with %+v: got no error", c)
		}
	}
}

// Generated jti values do not repeat across 10,000 proofs, signed
// concurrently by one Signer.
func TestDPoPJTIUnique(t *testing.T) {
	const n = 10_000
	s := newTestSigner(t, "ES256", fixtures().p256)
	p := DPoPParams{Method: "GET", URL: "https://rs.example/", Now: time.Unix(1_700_000_000, 0)}
	jtis := make([]string, n)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	const workers = 8
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += workers {
				proof, err := NewDPoPProof(context.Background(), s, p)
				if err != nil {
					errs <- err
					return
				}
				_, payload, _, _, err := ParseJWS(proof)
				if err != nil {
					errs <- err
					return
				}
				var c struct {
					JTI string `json:"jti"`
				}
				if err := json.Unmarshal(payload, &c); err != nil {
					errs <- err
					return
				}
				jtis[i] = c.JTI
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	seen := make(map[string]int, n)
	for i, j := range jtis {
		if len(mustB64(t, j)) != 16 {
			t.Fatalf("jti %d %q: want 16 bytes", i, j)
		}
		if prev, dup := seen[j]; dup {
			t.Fatalf("jti %q repeated in proofs %d and %d", j, prev, i)
		}
		seen[j] = i
	}
	if len(seen) != n {
		t.Fatalf("got %d distinct jti, want %d", len(seen), n)
	}
}

// NumericDate claims may be fractional (RFC 7519 §2); they are truncated
// towards the past. Anything but a finite JSON number is rejected.
func TestNumericDate(t *testing.T) {
	for raw, want := range map[string]int64{
		`1700000000`: 1700000000, `1700000000.9`: 1700000000, `-1.5`: -2, `1.7e9`: 1700000000, `0`: 0,
	} {
		got, err := numericDate(map[string]json.RawMessage{"iat": json.RawMessage(raw)}, "iat")
		if err != nil || got != want {
			t.Errorf("numericDate(%s): got %d, %v; want %d", raw, got, err, want)
		}
	}
	for _, raw := range []string{`"1700000000"`, `null`, `true`, `1e400`, `1e300`, `[1]`} {
		if got, err := numericDate(map[string]json.RawMessage{"iat": json.RawMessage(raw)}, "iat"); err == nil {
			t.Errorf("numericDate(%s): got %d, want an error", raw, got)
		}
	}
	// A fractional iat in a real proof verifies.
	f := fixtures()
	pub, err := NewJWK(&f.p256.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	proof := craftJWS(t, "ES256", f.p256, signOK,
		map[string]any{"typ": "dpop+jwt", "alg": "ES256", "jwk": pub},
		`{"jti":"j","htm":"GET","htu":"https://rs.example/","iat":1700000000.25}`)
	c, err := VerifyDPoPProof(proof, DPoPCheck{Method: "GET", URL: "https://rs.example/", Now: time.Unix(1_700_000_000, 0)})
	if err != nil || c.IAT != 1700000000 {
		t.Errorf("fractional iat: got %+v, %v", c, err)
	}
}
