package jwkshttp_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keybroker/keybroker/internal/jwkshttp"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/internal/store"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
)

// softBackend is a software kms.Backend that counts every call: the
// handler must make none.
type softBackend struct {
	calls atomic.Int64
	mu    sync.Mutex
	keys  map[string]*ecdsa.PrivateKey
}

func (b *softBackend) Generate(ctx context.Context, p kms.Partition, s kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	b.calls.Add(1)
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	h := make([]byte, 16)
	rand.Read(h)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.keys[hex.EncodeToString(h)] = k
	return h, &k.PublicKey, nil
}

func (b *softBackend) Sign(ctx context.Context, p kms.Partition, h kms.Handle, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	b.calls.Add(1)
	b.mu.Lock()
	k := b.keys[hex.EncodeToString(h)]
	b.mu.Unlock()
	if k == nil {
		return nil, kms.ErrNotFound
	}
	return k.Sign(rand.Reader, digest, opts)
}

func (b *softBackend) Destroy(ctx context.Context, p kms.Partition, h kms.Handle) error {
	b.calls.Add(1)
	return nil
}

func (b *softBackend) Probe(ctx context.Context) error { b.calls.Add(1); return nil }
func (b *softBackend) Close() error                    { return nil }

// clock is the keyring's injected time.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

type fixture struct {
	backend *softBackend
	ring    *keyring.Keyring
	clock   *clock
	srv     *httptest.Server
	publish sync.Map // tenant → true
	maxAge  atomic.Int64
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "kb.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := &fixture{backend: &softBackend{keys: map[string]*ecdsa.PrivateKey{}}, clock: &clock{now: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}}
	f.ring, err = keyring.New(keyring.Options{Backend: f.backend, BackendName: "soft", Store: st, Now: f.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	f.maxAge.Store(int64(24 * time.Hour))
	h := jwkshttp.New(jwkshttp.Options{
		Source:    f.ring,
		Published: func(tenant string) bool { _, ok := f.publish.Load(tenant); return ok },
		MaxAge:    func() time.Duration { return time.Duration(f.maxAge.Load()) },
	})
	f.srv = httptest.NewServer(h)
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fixture) create(t testing.TB, tenant, name string, p kms.Policy) {
	t.Helper()
	if _, err := f.ring.CreateKey(context.Background(), tenant, name, kms.KeySpec{Alg: kms.ES256}, p); err != nil {
		t.Fatal(err)
	}
}

type answer struct {
	status int
	header http.Header
	body   string
}

func (f *fixture) do(t testing.TB, method, path string, header ...string) answer {
	t.Helper()
	req, err := http.NewRequest(method, f.srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if path != "" && !strings.HasPrefix(path, "/") {
		t.Fatalf("path %q", path)
	}
	// http.NewRequest parses the URL: keep what the test wrote on the wire.
	req.URL.Opaque = path
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return answer{resp.StatusCode, resp.Header, string(b)}
}

func parseSet(t testing.TB, body string) []pop.JWK {
	t.Helper()
	var raw struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal([]byte(body), &raw); err != nil {
		t.Fatalf("not a JWK Set: %v: %s", err, body)
	}
	for _, k := range raw.Keys {
		for _, private := range []string{"d", "p", "q", "dp", "dq", "qi", "oth", "k"} {
			if _, ok := k[private]; ok {
				t.Fatalf("JWK has the private member %q: %s", private, body)
			}
		}
	}
	var set pop.JWKS
	if err := json.Unmarshal([]byte(body), &set); err != nil {
		t.Fatal(err)
	}
	return set.Keys
}

func kids(keys []pop.JWK) []string {
	var out []string
	for _, k := range keys {
		out = append(out, k.Kid)
	}
	return out
}

// TestServesTheRPCSet: the tenant path serves the very bytes GetJWKS
// returns, the key path that key's versions, with the headers a relying
// party needs, and no hardware call is made.
func TestServesTheRPCSet(t *testing.T) {
	f := newFixture(t)
	f.publish.Store("acme", true)
	f.create(t, "acme", "a", kms.Policy{})
	short := kms.DefaultPolicy()
	short.Lead = 2 * time.Hour
	f.create(t, "acme", "b", short)
	calls := f.backend.calls.Load()

	want, err := f.ring.JWKS(context.Background(), "acme")
	if err != nil {
		t.Fatal(err)
	}
	got := f.do(t, "GET", "/tenants/acme/jwks.json")
	if got.status != 200 || got.body != string(want) {
		t.Fatalf("GET = %d %q, want 200 %q", got.status, got.body, want)
	}
	if ct := got.header.Get("Content-Type"); ct != "application/jwk-set+json" {
		t.Errorf("Content-Type %q", ct)
	}
	// Half the shortest lead (key b's 2h): 1h.
	if cc := got.header.Get("Cache-Control"); cc != "public, max-age=3600" {
		t.Errorf("Cache-Control %q, want public, max-age=3600", cc)
	}
	if got.header.Get("ETag") == "" || got.header.Get("Content-Length") != fmt.Sprint(len(want)) {
		t.Errorf("ETag %q, Content-Length %q", got.header.Get("ETag"), got.header.Get("Content-Length"))
	}
	if ks := parseSet(t, got.body); len(ks) != 2 {
		t.Fatalf("set holds %d keys, want 2", len(ks))
	}

	a := f.do(t, "GET", "/tenants/acme/keys/a/jwks.json")
	pk, err := f.ring.PublicKey(context.Background(), "acme", "a", keyring.VersionRef{})
	if err != nil {
		t.Fatal(err)
	}
	if ks := parseSet(t, a.body); a.status != 200 || len(ks) != 1 || ks[0] != pk.JWK {
		t.Fatalf("key a: %d %s, want its JWK %+v", a.status, a.body, pk.JWK)
	}
	// Key a alone: half of the default 7 days, capped at 24h by MaxAge.
	if cc := a.header.Get("Cache-Control"); cc != "public, max-age=86400" {
		t.Errorf("key a Cache-Control %q", cc)
	}
	if a.header.Get("ETag") == got.header.Get("ETag") {
		t.Error("key a's set has the tenant set's ETag")
	}
	head := f.do(t, "HEAD", "/tenants/acme/keys/a/jwks.json")
	if head.status != 200 || head.body != "" || head.header.Get("ETag") != a.header.Get("ETag") || head.header.Get("Content-Length") != fmt.Sprint(len(a.body)) {
		t.Errorf("HEAD = %d %q %v", head.status, head.body, head.header)
	}
	if n := f.backend.calls.Load() - calls; n != 0 {
		t.Errorf("%d backend calls while serving, want 0", n)
	}
}

// TestETag: If-None-Match with the current ETag (strong, weak, in a list,
// or *) is 304 with the caching headers and no body; another ETag, or a
// change of the keys, is 200 with a new ETag.
func TestETag(t *testing.T) {
	f := newFixture(t)
	f.publish.Store("acme", true)
	f.create(t, "acme", "a", kms.Policy{})
	first := f.do(t, "GET", "/tenants/acme/jwks.json")
	etag := first.header.Get("ETag")
	for _, inm := range []string{etag, "W/" + etag, `"x", ` + etag, `"x",` + etag + `, "y"`, "*"} {
		got := f.do(t, "GET", "/tenants/acme/jwks.json", "If-None-Match", inm)
		if got.status != 304 || got.body != "" || got.header.Get("ETag") != etag || got.header.Get("Cache-Control") == "" {
			t.Errorf("If-None-Match %s: %d %q %v, want 304 with ETag and Cache-Control", inm, got.status, got.body, got.header)
		}
	}
	for _, inm := range []string{`"x"`, strings.Trim(etag, `"`), etag[:len(etag)-1], `W/"` + etag} {
		got := f.do(t, "GET", "/tenants/acme/jwks.json", "If-None-Match", inm)
		if got.status != 200 || got.body != first.body {
			t.Errorf("If-None-Match %s: %d, want 200 and the set", inm, got.status)
		}
	}
	// Two header lines, the second matching.
	if got := f.do(t, "GET", "/tenants/acme/jwks.json", "If-None-Match", `"x"`, "If-None-Match", etag); got.status != 304 {
		t.Errorf("second If-None-Match line: %d, want 304", got.status)
	}

	if _, _, err := f.ring.RotateKey(context.Background(), "acme", "a", 0); err != nil {
		t.Fatal(err)
	}
	after := f.do(t, "GET", "/tenants/acme/jwks.json", "If-None-Match", etag)
	if after.status != 200 || after.header.Get("ETag") == etag {
		t.Fatalf("after a rotation: %d, ETag %s; want 200 and a new ETag", after.status, after.header.Get("ETag"))
	}
	if ks := parseSet(t, after.body); len(ks) != 2 {
		t.Errorf("after a rotation the set holds %v, want both versions", kids(ks))
	}
}

// TestFollowsRotation: a version that becomes PENDING (on the keyring's
// clock) is in both sets at once, and a revoked one leaves them.
func TestFollowsRotation(t *testing.T) {
	f := newFixture(t)
	f.publish.Store("acme", true)
	p := kms.DefaultPolicy()
	f.create(t, "acme", "a", p)
	before := f.do(t, "GET", "/tenants/acme/keys/a/jwks.json")
	if ks := parseSet(t, before.body); len(ks) != 1 {
		t.Fatalf("before: %v", kids(ks))
	}
	f.clock.Set(f.clock.Now().Add(p.RotationPeriod - p.Lead + time.Minute))
	if err := f.ring.Advance(context.Background(), f.clock.Now()); err != nil {
		t.Fatal(err)
	}
	info, err := f.ring.GetKey(context.Background(), "acme", "a")
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Versions) != 2 || info.Versions[1].State != kms.StatePending {
		t.Fatalf("versions after the lead: %+v", info.Versions)
	}
	pending := info.Versions[1].Kid
	for _, path := range []string{"/tenants/acme/jwks.json", "/tenants/acme/keys/a/jwks.json"} {
		got := f.do(t, "GET", path, "If-None-Match", before.header.Get("ETag"))
		if ks := kids(parseSet(t, got.body)); got.status != 200 || len(ks) != 2 || ks[1] != pending {
			t.Errorf("%s: %d %v, want the pending kid %s too", path, got.status, ks, pending)
		}
	}
	if _, err := f.ring.RevokeKeyVersion(context.Background(), "acme", "a", keyring.VersionRef{Kid: pending}); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/tenants/acme/jwks.json", "/tenants/acme/keys/a/jwks.json"} {
		got := f.do(t, "GET", path)
		if ks := kids(parseSet(t, got.body)); len(ks) != 1 || ks[0] == pending {
			t.Errorf("%s after revoking %s: %v", path, pending, ks)
		}
	}
}

// TestCacheControl: max-age follows the keys served and the configured cap.
func TestCacheControl(t *testing.T) {
	f := newFixture(t)
	f.publish.Store("acme", true)
	f.publish.Store("empty", true)
	if cc := f.do(t, "GET", "/tenants/empty/jwks.json").header.Get("Cache-Control"); cc != "public, max-age=60" {
		t.Errorf("no keys: Cache-Control %q, want public, max-age=60", cc)
	}
	p := kms.DefaultPolicy()
	p.Lead = 90 * time.Minute
	f.create(t, "acme", "a", p)
	if cc := f.do(t, "GET", "/tenants/acme/jwks.json").header.Get("Cache-Control"); cc != "public, max-age=2700" {
		t.Errorf("lead 90m: Cache-Control %q, want max-age=2700", cc)
	}
	// A policy change alone (same keys, same bytes) is seen at once.
	if _, err := f.ring.UpdatePolicy(context.Background(), "acme", "a", func(p kms.Policy) kms.Policy { p.Lead = 20 * time.Minute; return p }); err != nil {
		t.Fatal(err)
	}
	if cc := f.do(t, "GET", "/tenants/acme/keys/a/jwks.json").header.Get("Cache-Control"); cc != "public, max-age=600" {
		t.Errorf("lead 20m: Cache-Control %q, want max-age=600", cc)
	}
	f.maxAge.Store(int64(5 * time.Minute))
	if cc := f.do(t, "GET", "/tenants/acme/jwks.json").header.Get("Cache-Control"); cc != "public, max-age=300" {
		t.Errorf("max_age 5m: Cache-Control %q, want max-age=300", cc)
	}
	f.maxAge.Store(0)
	if cc := f.do(t, "GET", "/tenants/acme/jwks.json").header.Get("Cache-Control"); cc != "public, max-age=0" {
		t.Errorf("max_age 0: Cache-Control %q, want max-age=0", cc)
	}
}

// TestRefusals: every bad request gets a clear answer, the same 404 body
// for a tenant that does not exist and one that does not publish, and
// nothing changes: the keys, and the next good answer, are as before.
func TestRefusals(t *testing.T) {
	f := newFixture(t)
	f.publish.Store("acme", true)
	f.create(t, "acme", "a", kms.Policy{})
	f.create(t, "private", "secret", kms.Policy{}) // does not publish
	good := f.do(t, "GET", "/tenants/acme/jwks.json")
	calls := f.backend.calls.Load()

	unknown := f.do(t, "GET", "/tenants/nobody/jwks.json")
	for _, tc := range []struct {
		method, path string
		header       []string
		status       int
		body         string
	}{
		{"GET", "/tenants/nobody/jwks.json", nil, 404, unknown.body},
		{"GET", "/tenants/private/jwks.json", nil, 404, unknown.body},
		{"GET", "/tenants/private/keys/secret/jwks.json", nil, 404, unknown.body},
		{"HEAD", "/tenants/private/jwks.json", nil, 404, ""},
		{"GET", "/tenants/Bad_Name!/jwks.json", nil, 404, unknown.body},
		{"GET", "/tenants/acme/keys/nope/jwks.json", nil, 404, "no such key\n"},
		{"GET", "/tenants/acme/keys/secret/jwks.json", nil, 404, "no such key\n"}, // another tenant's key
		{"GET", "/tenants/acme/keys/UPPER/jwks.json", nil, 404, "no such key\n"},
		{"GET", "/tenants/acme/../private/jwks.json", nil, 400, ""},
		{"GET", "/tenants/acme/keys/../../private/jwks.json", nil, 400, ""},
		{"GET", "/tenants/./acme/jwks.json", nil, 400, ""},
		{"GET", "/tenants//jwks.json", nil, 400, ""},
		{"GET", "/tenants/acme%2Fkeys%2Fa/jwks.json", nil, 400, ""},
		{"GET", "/tenants/acme/keys/a%2F..%2F..%2Fprivate/jwks.json", nil, 400, ""},
		{"GET", "/tenants/%61cme/jwks.json", nil, 400, ""},
		{"GET", "/tenants/acme/%2e%2e/jwks.json", nil, 400, ""},
		{"GET", "/", nil, 404, ""},
		{"GET", "/tenants/acme", nil, 404, ""},
		{"GET", "/tenants/acme/jwks.json/extra", nil, 404, ""},
		{"GET", "/tenants/acme/keys/a", nil, 404, ""},
		{"POST", "/tenants/acme/jwks.json", nil, 405, "method not allowed: GET or HEAD\n"},
		{"PUT", "/tenants/acme/jwks.json", nil, 405, ""},
		{"DELETE", "/tenants/acme/keys/a/jwks.json", nil, 405, ""},
		{"OPTIONS", "/tenants/acme/jwks.json", nil, 405, ""},
		{"get", "/tenants/acme/jwks.json", nil, 405, ""},
		{"GET", "/tenants/acme/jwks.json", []string{"If-None-Match", `"` + strings.Repeat("a", jwkshttp.MaxIfNoneMatch) + `"`}, 400, "If-None-Match: longer than 8192 bytes\n"},
		{"GET", "/tenants/acme/jwks.json", []string{"If-None-Match", strings.Repeat(`"a",`, 1500), "If-None-Match", strings.Repeat(`"b",`, 1500)}, 400, ""},
	} {
		got := f.do(t, tc.method, tc.path, tc.header...)
		if got.status != tc.status || (tc.body != "" && got.body != tc.body) {
			t.Errorf("%s %s: %d %q, want %d %q", tc.method, tc.path, got.status, got.body, tc.status, tc.body)
		}
		if got.status >= 400 && got.header.Get("Cache-Control") != "no-store" {
			t.Errorf("%s %s: Cache-Control %q on an error, want no-store", tc.method, tc.path, got.header.Get("Cache-Control"))
		}
		if got.status == 405 && got.header.Get("Allow") != "GET, HEAD" {
			t.Errorf("%s: Allow %q", tc.method, got.header.Get("Allow"))
		}
		if strings.Contains(got.body, "secret") || strings.Contains(got.body, "private") {
			t.Errorf("%s %s: the answer names the other tenant: %q", tc.method, tc.path, got.body)
		}
	}
	if unknown.status != 404 || unknown.body == "" {
		t.Fatalf("unknown tenant: %d %q", unknown.status, unknown.body)
	}
	if n := f.backend.calls.Load() - calls; n != 0 {
		t.Errorf("%d backend calls, want 0", n)
	}
	if again := f.do(t, "GET", "/tenants/acme/jwks.json"); again.status != 200 || again.body != good.body || again.header.Get("ETag") != good.header.Get("ETag") {
		t.Errorf("after the refusals: %d %q, want the same answer as before", again.status, again.body)
	}
}

// TestPublishFollowsTheSwitch: a tenant that stops publishing (a reload) is
// 404 at once, like an unknown one; one that starts is served at once.
func TestPublishFollowsTheSwitch(t *testing.T) {
	f := newFixture(t)
	f.create(t, "acme", "a", kms.Policy{})
	unknown := f.do(t, "GET", "/tenants/nobody/jwks.json")
	if got := f.do(t, "GET", "/tenants/acme/jwks.json"); got.status != 404 || got.body != unknown.body {
		t.Fatalf("before opting in: %d %q", got.status, got.body)
	}
	f.publish.Store("acme", true)
	if got := f.do(t, "GET", "/tenants/acme/jwks.json"); got.status != 200 {
		t.Fatalf("opted in: %d %q", got.status, got.body)
	}
	f.publish.Delete("acme")
	if got := f.do(t, "GET", "/tenants/acme/keys/a/jwks.json"); got.status != 404 || got.body != unknown.body {
		t.Fatalf("opted out again: %d %q", got.status, got.body)
	}
}

// unavailable is a source whose replica cannot vouch for its copy.
type unavailable struct{ jwkshttp.Source }

func (unavailable) JWKS(context.Context, string) ([]byte, error) {
	return nil, fmt.Errorf("replica out of sync: %w", kms.ErrUnavailable)
}

type broken struct{ jwkshttp.Source }

func (broken) JWKS(context.Context, string) ([]byte, error) {
	return nil, errors.New("CKR_DEVICE_ERROR at /var/lib/keybroker handle 0x1234")
}

// TestSourceErrors: a stale replica is 503 with Retry-After; any other
// failure is a bare 500 that names nothing inside.
func TestSourceErrors(t *testing.T) {
	for _, tc := range []struct {
		src    jwkshttp.Source
		status int
		body   string
	}{
		{unavailable{}, 503, "temporarily unavailable\n"},
		{broken{}, 500, "internal error\n"},
	} {
		h := jwkshttp.New(jwkshttp.Options{Source: tc.src, Published: func(string) bool { return true }})
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/tenants/acme/jwks.json", nil))
		if rec.Code != tc.status || rec.Body.String() != tc.body {
			t.Errorf("%T: %d %q, want %d %q", tc.src, rec.Code, rec.Body.String(), tc.status, tc.body)
		}
		if tc.status == 503 && rec.Header().Get("Retry-After") == "" {
			t.Error("503 without Retry-After")
		}
	}
}

// TestConcurrentWithRotation: readers in parallel with rotations always
// get a well-formed set whose ETag is the digest of what they got (run
// with -race).
func TestConcurrentWithRotation(t *testing.T) {
	f := newFixture(t)
	f.publish.Store("acme", true)
	f.create(t, "acme", "a", kms.Policy{})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 8 {
		wg.Go(func() {
			seen := map[string]string{}
			for {
				select {
				case <-stop:
					return
				default:
				}
				got := f.do(t, "GET", "/tenants/acme/keys/a/jwks.json")
				if got.status != 200 {
					t.Errorf("status %d", got.status)
					return
				}
				parseSet(t, got.body)
				etag := got.header.Get("ETag")
				if prev, ok := seen[etag]; ok && prev != got.body {
					t.Errorf("ETag %s for two different bodies", etag)
					return
				}
				seen[etag] = got.body
			}
		})
	}
	for range 5 {
		if _, _, err := f.ring.RotateKey(context.Background(), "acme", "a", 0); err != nil {
			t.Error(err)
		}
	}
	close(stop)
	wg.Wait()
}
