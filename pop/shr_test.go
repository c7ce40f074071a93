package pop

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"testing"
	"time"
)

// PROTOCOLS.md vectors for the SHR "q" and "h" claims.
const (
	shrQueryVector   = `[["b","a","c"],"u4LgkGUWhP9MsKrEjA4dizIllDXluDku6ZqCeyuR-JY"]`
	shrHeadersVector = `[["content-type","etag"],"P6z5XN4tTzHkfwe3XO1YvVUIurSuhvh_UG10N_j-aGs"]`
)

func vectorHeaders() http.Header {
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	h.Set("ETag", "742-3u8f34-3r2nvv3")
	return h
}

// refHash is base64url(SHA-256(s)), computed here independently.
func refHash(s string) string {
	sum := sha256.Sum256([]byte(s))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

func TestSHRQueryVector(t *testing.T) {
	q, err := SHRQuery([]string{"b", "a", "c"}, "b=bar&a=foo&c=duck")
	if err != nil {
		t.Fatalf("SHRQuery: %v", err)
	}
	got, err := json.Marshal(q)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != shrQueryVector {
		t.Errorf("q: got %s, want %s", got, shrQueryVector)
	}
	// The hash follows the names' order, not the URL's.
	q2, err := SHRQuery([]string{"c", "a"}, "b=bar&a=foo&c=duck")
	if err != nil {
		t.Fatal(err)
	}
	if want := refHash("c=duck&a=foo"); q2.Hash != want || len(q2.Names) != 2 || q2.Names[0] != "c" {
		t.Errorf("q for c,a: got %+v, want hash %s", q2, want)
	}
	// Values are hashed as they appear in the URL, not decoded.
	q3, err := SHRQuery([]string{"x"}, "x=a%20b")
	if err != nil || q3.Hash != refHash("x=a%20b") {
		t.Errorf("encoded value: got %+v, %v", q3, err)
	}
}

func TestSHRQueryRejects(t *testing.T) {
	for _, tc := range []struct {
		name  string
		names []string
		query string
	}{
		{"missing", []string{"d"}, "a=1"},
		{"repeated in query", []string{"a"}, "a=1&a=2"},
		{"listed twice", []string{"a", "a"}, "a=1"},
		{"empty value", []string{"a"}, "a=&b=1"},
		{"no =", []string{"a"}, "a&b=1"},
		{"second =", []string{"a"}, "a=b=c"},
		{"empty name", []string{""}, "=1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q, err := SHRQuery(tc.names, tc.query)
			var ce *ClaimError
			if !errors.As(err, &ce) || ce.Claim != "q" {
				t.Errorf("SHRQuery: got %+v, %v; want a *ClaimError for q", q, err)
			}
		})
	}
}

func TestSHRHeadersVector(t *testing.T) {
	for name, h := range map[string]http.Header{
		"canonical":     vectorHeaders(),
		"non-canonical": {"content-type": {"application/json"}, "etag": {"742-3u8f34-3r2nvv3"}},
	} {
		l, err := SHRHeaders([]string{"Content-Type", "ETag"}, h)
		if err != nil {
			t.Fatalf("%s: SHRHeaders: %v", name, err)
		}
		got, err := json.Marshal(l)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != shrHeadersVector {
			t.Errorf("%s: h: got %s, want %s", name, got, shrHeadersVector)
		}
	}
}

func TestSHRHeadersRejects(t *testing.T) {
	h := vectorHeaders()
	h.Add("Accept", "a")
	h.Add("Accept", "b")
	h.Set("Authorization", "PoP x")
	h.Set("X-Bad", "a\nb")
	for _, tc := range []struct {
		name  string
		names []string
	}{
		{"missing", []string{"x-missing"}},
		{"repeated", []string{"accept"}},
		{"listed twice", []string{"etag", "ETag"}},
		{"authorization", []string{"Authorization"}},
		{"newline in value", []string{"x-bad"}},
		{"bad name", []string{"content type"}},
		{"empty name", []string{""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := SHRHeaders(tc.names, h)
			var ce *ClaimError
			if !errors.As(err, &ce) || ce.Claim != "h" {
				t.Errorf("SHRHeaders: got %+v, %v; want a *ClaimError for h", l, err)
			}
		})
	}
}

func TestSHRListJSON(t *testing.T) {
	var l SHRList
	if err := json.Unmarshal([]byte(shrHeadersVector), &l); err != nil {
		t.Fatal(err)
	}
	if len(l.Names) != 2 || l.Names[0] != "content-type" || l.Names[1] != "etag" || l.Hash != "P6z5XN4tTzHkfwe3XO1YvVUIurSuhvh_UG10N_j-aGs" {
		t.Errorf("got %+v", l)
	}
	if b, err := json.Marshal(SHRList{Hash: "h"}); err != nil || string(b) != `[[],"h"]` {
		t.Errorf("empty names: got %s, %v", b, err)
	}
	for _, bad := range []string{`null`, `[]`, `[["a"]]`, `[["a"],"h","x"]`, `[["a"],1]`, `["a","h"]`, `[null,"h"]`, `[[1],"h"]`, `{"a":1}`} {
		if err := json.Unmarshal([]byte(bad), &l); err == nil {
			t.Errorf("Unmarshal(%s): got no error", bad)
		}
	}
}

// SHRs built by NewSignedHTTPRequest carry the MSAL members, verify
// independently and with VerifySignedHTTPRequest, and name their key
// consistently: header kid == thumbprint(cnf.jwk) == req_cnf kid.
func TestSignedHTTPRequestRoundTrip(t *testing.T) {
	ctx := context.Background()
	now := time.Unix(1_700_000_000, 0)
	body := []byte(`{"item":"x"}`)
	const url = "https://API.Example.com:8443/v1/items?b=bar&a=foo&c=duck"
	for _, s := range signerCases(t) {
		t.Run(s.alg, func(t *testing.T) {
			shr, err := NewSignedHTTPRequest(ctx, s, SHRParams{
				AccessToken: "at-123", Method: "post", URL: url, Nonce: "nn", Now: now,
				Headers: vectorHeaders(), SignedHeaders: []string{"Content-Type", "ETag"},
				Body: body, HashBody: true, QueryParams: []string{"b", "a", "c"},
			})
			if err != nil {
				t.Fatalf("NewSignedHTTPRequest: %v", err)
			}
			pub := s.priv.Public()
			if !refVerify(t, shr, pub) {
				t.Fatal("independent verifier rejects the SHR")
			}
			tp, err := Thumbprint(pub)
			if err != nil {
				t.Fatal(err)
			}
			hdr := decodeSegment(t, shr, 0)
			if got := keys(hdr); got != "alg,kid,typ" {
				t.Errorf("header members: got %s, want alg,kid,typ", got)
			}
			if hdr["alg"] != s.alg || hdr["kid"] != tp || hdr["typ"] != "pop" {
				t.Errorf("header: got %v", hdr)
			}
			p := decodeSegment(t, shr, 1)
			if got := keys(p); got != "at,b,cnf,h,m,nonce,p,q,ts,u" {
				t.Errorf("payload members: got %s", got)
			}
			if p["at"] != "at-123" || p["m"] != "POST" || p["u"] != "api.example.com:8443" || p["p"] != "/v1/items" ||
				p["nonce"] != "nn" || p["ts"] != json.Number("1700000000") || p["b"] != refHash(string(body)) {
				t.Errorf("payload: got %v", p)
			}
			if got, _ := json.Marshal(p["q"]); string(got) != shrQueryVector {
				t.Errorf("q: got %s, want %s", got, shrQueryVector)
			}
			if got, _ := json.Marshal(p["h"]); string(got) != shrHeadersVector {
				t.Errorf("h: got %s, want %s", got, shrHeadersVector)
			}

			// cnf.jwk: only public key members, with the header's kid as its
			// thumbprint, and the same kid as MSAL's req_cnf for this key.
			cnf := p["cnf"].(map[string]any)
			if got := keys(cnf); got != "jwk" {
				t.Errorf("cnf members: got %s", got)
			}
			raw, _ := json.Marshal(cnf["jwk"])
			var j JWK
			if err := json.Unmarshal(raw, &j); err != nil {
				t.Fatal(err)
			}
			want := "e,kty,n"
			if j.Kty == "EC" {
				want = "crv,kty,x,y"
			}
			if got := keys(cnf["jwk"].(map[string]any)); got != want {
				t.Errorf("cnf.jwk members: got %s, want %s", got, want)
			}
			jtp, err := j.Thumbprint()
			if err != nil || jtp != hdr["kid"] {
				t.Errorf("thumbprint(cnf.jwk): got %q, %v; want header kid %v", jtp, err, hdr["kid"])
			}
			var reqCnf struct{ Kid string }
			if err := json.Unmarshal(mustB64(t, ReqCnfKid(tp, KSLHardware)), &reqCnf); err != nil || reqCnf.Kid != jtp {
				t.Errorf("req_cnf kid: got %q, %v; want %q", reqCnf.Kid, err, jtp)
			}

			c, err := VerifySignedHTTPRequest(shr, SHRCheck{
				AccessToken: "at-123", Method: "POST", URL: url, Now: now.Add(4 * time.Minute),
				Nonce: "nn", Headers: vectorHeaders(), Body: body,
			})
			if err != nil {
				t.Fatalf("VerifySignedHTTPRequest: %v", err)
			}
			if c.Thumbprint != tp || c.AccessToken != "at-123" || c.Method != "POST" || c.Host != "api.example.com:8443" ||
				c.Path != "/v1/items" || c.TS != now.Unix() || c.Nonce != "nn" || c.BodyHash != refHash(string(body)) ||
				c.Query == nil || c.Query.Hash != "u4LgkGUWhP9MsKrEjA4dizIllDXluDku6ZqCeyuR-JY" ||
				c.Headers == nil || c.Headers.Hash != "P6z5XN4tTzHkfwe3XO1YvVUIurSuhvh_UG10N_j-aGs" {
				t.Errorf("claims: got %+v", c)
			}
			// Without AccessToken in the check, "at" is returned for the
			// caller to validate.
			if c, err := VerifySignedHTTPRequest(shr, SHRCheck{Method: "POST", URL: url, Now: now}); err != nil || c.AccessToken != "at-123" {
				t.Errorf("check without AccessToken: got %+v, %v", c, err)
			}
		})
	}
}

// The minimal MSAL SHR: at, ts, m, u, p, cnf; a default port is dropped.
func TestSignedHTTPRequestMinimal(t *testing.T) {
	s := newTestSigner(t, "RS256", fixtures().rsa2048)
	now := time.Unix(1_700_000_000, 0)
	shr, err := NewSignedHTTPRequest(context.Background(), s, SHRParams{
		AccessToken: "tok", Method: "GET", URL: "https://graph.example:443", Now: now,
	})
	if err != nil {
		t.Fatal(err)
	}
	p := decodeSegment(t, shr, 1)
	if got := keys(p); got != "at,cnf,m,p,ts,u" {
		t.Errorf("payload members: got %s", got)
	}
	if p["u"] != "graph.example" || p["p"] != "/" {
		t.Errorf("u, p: got %v, %v", p["u"], p["p"])
	}
	if got := PoPAuthorization(shr); got != "PoP "+shr {
		t.Errorf("PoPAuthorization: got %q", got)
	}
	if _, err := VerifySignedHTTPRequest(shr, SHRCheck{AccessToken: "tok", Method: "get", URL: "https://graph.example/", Now: now}); err != nil {
		t.Errorf("VerifySignedHTTPRequest: %v", err)
	}
}

func TestNewSignedHTTPRequestRefuses(t *testing.T) {
	s := newTestSigner(t, "ES256", fixtures().p256)
	base := SHRParams{AccessToken: "t", Method: "GET", URL: "https://rs.example/x?a=1", Now: time.Unix(1, 0)}
	for _, tc := range []struct {
		name  string
		mod   func(*SHRParams)
		claim string
	}{
		{"no access token", func(p *SHRParams) { p.AccessToken = "" }, "at"},
		{"no method", func(p *SHRParams) { p.Method = "" }, "m"},
		{"bad URL", func(p *SHRParams) { p.URL = "rs.example/x" }, "u"},
		{"zero time", func(p *SHRParams) { p.Now = time.Time{} }, "ts"},
		{"query param missing", func(p *SHRParams) { p.QueryParams = []string{"b"} }, "q"},
		{"header missing", func(p *SHRParams) { p.SignedHeaders = []string{"etag"} }, "h"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := base
			tc.mod(&p)
			shr, err := NewSignedHTTPRequest(context.Background(), s, p)
			var ce *ClaimError
			if !errors.As(err, &ce) || ce.Claim != tc.claim {
				t.Errorf("got %q, %v; want a *ClaimError for %q", shr, err, tc.claim)
			}
			if s.calls.Load() != 0 {
				t.Error("Sign was called")
			}
		})
	}
}

// VerifySignedHTTPRequest rejects SHRs crafted to break each rule.
func TestVerifySignedHTTPRequestRejects(t *testing.T) {
	f := fixtures()
	now := time.Unix(1_700_000_000, 0)
	ecJWK, err := NewJWK(&f.p256.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	tp := ecJWK.thumbprint()
	otherTP, err := Thumbprint(&f.p384.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	jwkMap := func(extra map[string]any) map[string]any {
		m := map[string]any{"kty": "EC", "crv": "P-256", "x": ecJWK.X, "y": ecJWK.Y}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	hdr := func(mod func(map[string]any)) map[string]any {
		h := map[string]any{"alg": "ES256", "kid": tp, "typ": "pop"}
		if mod != nil {
			mod(h)
		}
		return h
	}
	const url = "https://rs.example:8443/api/v1?b=bar&a=foo&c=duck"
	q, err := SHRQuery([]string{"b", "a", "c"}, "b=bar&a=foo&c=duck")
	if err != nil {
		t.Fatal(err)
	}
	h, err := SHRHeaders([]string{"content-type", "etag"}, vectorHeaders())
	if err != nil {
		t.Fatal(err)
	}
	body := []byte("body")
	claims := func(mod func(map[string]any)) map[string]any {
		c := map[string]any{
			"at": "tok", "ts": now.Unix(), "m": "POST", "u": "rs.example:8443", "p": "/api/v1",
			"q": q, "h": h, "b": refHash(string(body)), "nonce": "n-1", "cnf": map[string]any{"jwk": jwkMap(nil)},
		}
		if mod != nil {
			mod(c)
		}
		return c
	}
	check := SHRCheck{AccessToken: "tok", Method: "POST", URL: url, Now: now, Nonce: "n-1", Headers: vectorHeaders(), Body: body}
	sign := func(h, c any) string { return craftJWS(t, "ES256", f.p256, signOK, h, c) }

	// Controls: the crafted SHR verifies, also with u naming the port of a
	// default-port URL.
	if _, err := VerifySignedHTTPRequest(sign(hdr(nil), claims(nil)), check); err != nil {
		t.Fatalf("control SHR: %v", err)
	}
	defaultPort := check
	defaultPort.URL = "https://rs.example/api/v1?b=bar&a=foo&c=duck"
	if _, err := VerifySignedHTTPRequest(sign(hdr(nil), claims(func(c map[string]any) { c["u"] = "RS.example:443" })), defaultPort); err != nil {
		t.Fatalf("control SHR with explicit default port: %v", err)
	}

	d := b64.EncodeToString(f.p256.D.FillBytes(make([]byte, 32)))
	otherHeaders := vectorHeaders()
	otherHeaders.Set("ETag", "other")
	for _, tc := range []struct {
		name   string
		shr    string
		check  func(*SHRCheck)
		header string
		claim  string
		is     error
	}{
		{"wrong at", sign(hdr(nil), claims(func(c map[string]any) { c["at"] = "other" })), nil, "", "at", nil},
		{"at missing", sign(hdr(nil), claims(func(c map[string]any) { delete(c, "at") })), func(c *SHRCheck) { c.AccessToken = "" }, "", "at", nil},
		{"wrong m", sign(hdr(nil), claims(func(c map[string]any) { c["m"] = "GET" })), nil, "", "m", nil},
		{"m lower-case", sign(hdr(nil), claims(func(c map[string]any) { c["m"] = "post" })), nil, "", "m", nil},
		{"wrong u host", sign(hdr(nil), claims(func(c map[string]any) { c["u"] = "evil.example:8443" })), nil, "", "u", nil},
		{"wrong u port", sign(hdr(nil), claims(func(c map[string]any) { c["u"] = "rs.example" })), nil, "", "u", nil},
		{"wrong p", sign(hdr(nil), claims(func(c map[string]any) { c["p"] = "/api/v2" })), nil, "", "p", nil},
		{"stale ts", sign(hdr(nil), claims(func(c map[string]any) { c["ts"] = now.Add(-5*time.Minute - time.Second).Unix() })), nil, "", "ts", nil},
		{"future ts", sign(hdr(nil), claims(func(c map[string]any) { c["ts"] = now.Add(time.Second).Unix() })), nil, "", "ts", nil},
		{"stale with MaxAge 1m", sign(hdr(nil), claims(func(c map[string]any) { c["ts"] = now.Add(-61 * time.Second).Unix() })), func(c *SHRCheck) { c.MaxAge = time.Minute }, "", "ts", nil},
		{"wrong nonce", sign(hdr(nil), claims(func(c map[string]any) { c["nonce"] = "n-0" })), nil, "", "nonce", nil},
		{"nonce missing", sign(hdr(nil), claims(func(c map[string]any) { delete(c, "nonce") })), nil, "", "nonce", nil},
		{"query changed", sign(hdr(nil), claims(nil)), func(c *SHRCheck) { c.URL = "https://rs.example:8443/api/v1?b=bar&a=foo&c=goose" }, "", "q", nil},
		{"query param dropped", sign(hdr(nil), claims(nil)), func(c *SHRCheck) { c.URL = "https://rs.example:8443/api/v1?b=bar&a=foo" }, "", "q", nil},
		{"headers changed", sign(hdr(nil), claims(nil)), func(c *SHRCheck) { c.Headers = otherHeaders }, "", "h", nil},
		{"body changed", sign(hdr(nil), claims(nil)), func(c *SHRCheck) { c.Body = []byte("bodY") }, "", "b", nil},
		{"kid of another key", sign(hdr(func(h map[string]any) { h["kid"] = otherTP }), claims(nil)), nil, "kid", "", nil},
		{"kid missing", sign(hdr(func(h map[string]any) { delete(h, "kid") }), claims(nil)), nil, "kid", "", nil},
		{"typ JWT", sign(hdr(func(h map[string]any) { h["typ"] = "JWT" }), claims(nil)), nil, "typ", "", nil},
		{"alg none", b64.EncodeToString([]byte(`{"alg":"none","kid":"`+tp+`","typ":"pop"}`)) + "." + b64.EncodeToString(mustJSON(t, claims(nil))) + ".", nil, "alg", "", ErrUnsupportedAlg},
		{"cnf.jwk with d", sign(hdr(nil), claims(func(c map[string]any) { c["cnf"] = map[string]any{"jwk": jwkMap(map[string]any{"d": d})} })), nil, "", "cnf", ErrInvalidKey},
		{"cnf missing", sign(hdr(nil), claims(func(c map[string]any) { delete(c, "cnf") })), nil, "", "cnf", nil},
		{"cnf without jwk", sign(hdr(nil), claims(func(c map[string]any) { c["cnf"] = map[string]any{"kid": tp} })), nil, "", "cnf", nil},
		{"signed by another key", craftJWS(t, "ES256", mustP256(t), signOK, hdr(nil), claims(nil)), nil, "", "", ErrVerification},
		{"DER signature", craftJWS(t, "ES256", f.p256, signDER, hdr(nil), claims(nil)), nil, "", "", ErrInvalidSignature},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := check
			if tc.check != nil {
				tc.check(&c)
			}
			got, err := VerifySignedHTTPRequest(tc.shr, c)
			if err == nil {
				t.Fatalf("VerifySignedHTTPRequest: got %+v, want an error", got)
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

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
