// Package jwkshttp serves tenants' JWK Sets (RFC 7517 §5) over HTTP for
// relying parties: GET /tenants/{tenant}/jwks.json (the tenant's published
// versions, the same bytes as the GetJWKS RPC) and
// GET /tenants/{tenant}/keys/{name}/jwks.json (one key's). Everything comes
// from the keyring's memory: no hardware call, no store call. Only tenants
// that opt in are served; any other answers exactly like a tenant that does
// not exist. Only the daemon's wiring (internal/daemon) imports it; the TLS
// listener around it is the daemon's.
package jwkshttp

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/pop"
)

// ContentType is the media type of a JWK Set (RFC 7517 §8.5.1).
const ContentType = "application/jwk-set+json"

// MaxIfNoneMatch bounds the If-None-Match header (all its lines together):
// a longer one is answered 400. Real caches send one entity-tag.
const MaxIfNoneMatch = 8 << 10

// EmptyMaxAge is the max-age of a set with no published version: a key's
// first version signs as soon as it is created (it has no pre-publication
// lead), so a relying party should not keep an empty set long.
const EmptyMaxAge = time.Minute

// Error bodies. An unknown tenant and a tenant that does not publish get
// the same one, byte for byte.
const (
	bodyNoTenant    = "no such tenant, or it does not publish its JWKS\n"
	bodyNoKey       = "no such key\n"
	bodyNotFound    = "not found: the paths are /tenants/{tenant}/jwks.json and /tenants/{tenant}/keys/{name}/jwks.json\n"
	bodyBadPath     = "bad path: percent-encoding, empty, '.' and '..' segments are not accepted\n"
	bodyMethod      = "method not allowed: GET or HEAD\n"
	bodyLongINM     = "If-None-Match: longer than 8192 bytes\n"
	bodyUnavailable = "temporarily unavailable\n"
	bodyInternal    = "internal error\n"
)

// Source is what the handler reads: *keyring.Keyring, all from memory.
type Source interface {
	JWKS(ctx context.Context, tenant string) ([]byte, error)
	ListKeys(ctx context.Context, tenant, after string, limit int) ([]keyring.KeyInfo, string, error)
	GetKey(ctx context.Context, tenant, name string) (keyring.KeyInfo, error)
	PublicKey(ctx context.Context, tenant, name string, ref keyring.VersionRef) (keyring.PublicKey, error)
}

// Options configure a Handler.
type Options struct {
	Source Source
	// Published reports whether a tenant publishes its JWKS
	// (publish_jwks). It is asked on every request, so a configuration
	// reload applies at once.
	Published func(tenant string) bool
	// MaxAge caps Cache-Control max-age (jwks.max_age); asked on every
	// request. Nil: no cap beyond half the lead.
	MaxAge func() time.Duration
	Log    *slog.Logger
}

// Handler is the http.Handler. It caches each tenant's document (and each
// key's, once asked) with its ETag, and rebuilds them when the keyring's
// JWKS for the tenant changes.
type Handler struct {
	o Options

	mu      sync.RWMutex
	tenants map[string]*tenantDoc // only tenants that publish
}

// doc is one JWK Set as served.
type doc struct {
	body []byte
	etag string // strong, quoted
	// lead is the shortest pre-publication lead of the keys in the set;
	// 0 when it holds none.
	lead time.Duration
}

// tenantDoc is a tenant's set and the per-key sets built from the same
// keyring state.
type tenantDoc struct {
	doc
	// src is the slice the keyring returned: the keyring rebuilds it
	// (a new slice) whenever one of the tenant's keys changes, policy
	// included, so its identity tells whether this is still current.
	// Were the keyring to stop caching, every request would rebuild: slower,
	// never stale.
	src []byte

	mu   sync.Mutex
	keys map[string]*doc // keys that exist; unknown names are not cached
}

// New returns a handler.
func New(o Options) *Handler {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.MaxAge == nil {
		o.MaxAge = func() time.Duration { return time.Duration(1<<63 - 1) }
	}
	return &Handler{o: o, tenants: make(map[string]*tenantDoc)}
}

// ServeHTTP answers GET and HEAD of the two paths; anything else is a
// clear 4xx, and nothing a client sends changes any state but the cache.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hdr := w.Header()
	hdr.Set("X-Content-Type-Options", "nosniff")
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		hdr.Set("Allow", "GET, HEAD")
		fail(w, http.StatusMethodNotAllowed, bodyMethod)
		return
	}
	tenant, key, status, msg := route(r.URL.EscapedPath())
	if status != 0 {
		fail(w, status, msg)
		return
	}
	inm, ok := ifNoneMatch(r.Header)
	if !ok {
		fail(w, http.StatusBadRequest, bodyLongINM)
		return
	}
	if kms.ValidateName(tenant) != nil || !h.o.Published(tenant) {
		h.forget(tenant)
		fail(w, http.StatusNotFound, bodyNoTenant)
		return
	}
	td, err := h.tenant(r.Context(), tenant)
	if err != nil {
		h.sourceError(w, tenant, err)
		return
	}
	d := &td.doc
	if key != "" {
		if d, err = h.key(r.Context(), td, tenant, key); err != nil {
			h.sourceError(w, tenant, err)
			return
		}
	}
	hdr.Set("ETag", d.etag)
	hdr.Set("Cache-Control", "public, max-age="+strconv.FormatInt(int64(h.maxAge(d.lead)/time.Second), 10))
	hdr.Set("Access-Control-Allow-Origin", "*") // public keys, for browser-side relying parties too
	if inm != "" && etagMatches(inm, d.etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	hdr.Set("Content-Type", ContentType)
	hdr.Set("Content-Length", strconv.Itoa(len(d.body)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(d.body)
	}
}

// maxAge is half the shortest lead, capped by MaxAge; EmptyMaxAge (capped
// too) for a set with no key. A relying party that caches for at most half
// the lead refetches at least once while a new version is pending, before
// it signs.
func (h *Handler) maxAge(lead time.Duration) time.Duration {
	a := EmptyMaxAge
	if lead > 0 {
		a = lead / 2
	}
	return max(0, min(a, h.o.MaxAge()))
}

// route splits an escaped path into tenant and key name (key "" for the
// tenant's set), or returns the status and body of the refusal.
func route(path string) (tenant, key string, status int, msg string) {
	// Names are [a-z0-9._-]: nothing in a valid path needs escaping, so
	// an escape (%2F, %2E, ...) is refused rather than decoded, and so is
	// a dot segment, rather than cleaned: a cache or proxy in front might
	// resolve it otherwise.
	if strings.IndexByte(path, '%') >= 0 {
		return "", "", http.StatusBadRequest, bodyBadPath
	}
	if path == "/" {
		return "", "", http.StatusNotFound, bodyNotFound
	}
	seg := strings.Split(strings.TrimPrefix(path, "/"), "/")
	for _, s := range seg {
		if s == "" || s == "." || s == ".." {
			return "", "", http.StatusBadRequest, bodyBadPath
		}
	}
	switch {
	case len(seg) == 3 && seg[0] == "tenants" && seg[2] == "jwks.json":
		return seg[1], "", 0, ""
	case len(seg) == 5 && seg[0] == "tenants" && seg[2] == "keys" && seg[4] == "jwks.json":
		return seg[1], seg[3], 0, ""
	}
	return "", "", http.StatusNotFound, bodyNotFound
}

// ifNoneMatch joins the If-None-Match lines; ok is false past
// MaxIfNoneMatch bytes.
func ifNoneMatch(h http.Header) (string, bool) {
	vals := h.Values("If-None-Match")
	n := 0
	for _, v := range vals {
		n += len(v) + 1
	}
	if n > MaxIfNoneMatch {
		return "", false
	}
	return strings.Join(vals, ","), true
}

// etagMatches is If-None-Match's weak comparison (RFC 9110 §13.1.2): "*",
// or any listed entity-tag, W/ or not, whose opaque part equals etag's.
// A malformed list matches nothing: the full answer is always safe.
func etagMatches(list, etag string) bool {
	if strings.TrimSpace(list) == "*" {
		return true
	}
	for list != "" {
		list = strings.TrimLeft(list, " \t,")
		if list == "" {
			break
		}
		list = strings.TrimPrefix(list, "W/")
		if list == "" || list[0] != '"' {
			return false
		}
		end := strings.IndexByte(list[1:], '"')
		if end < 0 {
			return false
		}
		if list[:end+2] == etag {
			return true
		}
		list = list[end+2:]
	}
	return false
}

// tenant returns the tenant's current document, rebuilt if the keyring's
// set changed.
func (h *Handler) tenant(ctx context.Context, tenant string) (*tenantDoc, error) {
	src, err := h.o.Source.JWKS(ctx, tenant)
	if err != nil {
		return nil, err
	}
	h.mu.RLock()
	td := h.tenants[tenant]
	h.mu.RUnlock()
	if td != nil && same(td.src, src) {
		return td, nil
	}
	lead, err := h.tenantLead(ctx, tenant)
	if err != nil {
		return nil, err
	}
	td = &tenantDoc{doc: newDoc(src, lead), src: src, keys: make(map[string]*doc)}
	h.mu.Lock()
	h.tenants[tenant] = td
	h.mu.Unlock()
	return td, nil
}

// same reports whether a and b are the same slice (not just equal bytes).
func same(a, b []byte) bool {
	return len(a) == len(b) && len(a) > 0 && &a[0] == &b[0]
}

// forget drops a tenant that no longer publishes (a reload).
func (h *Handler) forget(tenant string) {
	h.mu.RLock()
	_, ok := h.tenants[tenant]
	h.mu.RUnlock()
	if ok {
		h.mu.Lock()
		delete(h.tenants, tenant)
		h.mu.Unlock()
	}
}

// tenantLead is the shortest lead of the tenant's keys that have a
// published version (0: none).
func (h *Handler) tenantLead(ctx context.Context, tenant string) (time.Duration, error) {
	var lead time.Duration
	after := ""
	for {
		keys, next, err := h.o.Source.ListKeys(ctx, tenant, after, keyring.MaxPageSize)
		if err != nil {
			return 0, err
		}
		for _, k := range keys {
			lead = shorter(lead, k)
		}
		if next == "" {
			return lead, nil
		}
		after = next
	}
}

// shorter folds key k's lead into lead if k has a published version.
func shorter(lead time.Duration, k keyring.KeyInfo) time.Duration {
	for _, v := range k.Versions {
		if v.State.Published() {
			if lead == 0 || k.Policy.Lead < lead {
				return k.Policy.Lead
			}
			return lead
		}
	}
	return lead
}

// errNoKey is a key that does not exist in a tenant that publishes.
var errNoKey = errors.New("no such key")

// key returns key name's document, built from the keyring on first use
// for this state of the tenant.
func (h *Handler) key(ctx context.Context, td *tenantDoc, tenant, name string) (*doc, error) {
	if kms.ValidateName(name) != nil {
		return nil, errNoKey
	}
	td.mu.Lock()
	defer td.mu.Unlock()
	if d := td.keys[name]; d != nil {
		return d, nil
	}
	info, err := h.o.Source.GetKey(ctx, tenant, name)
	if errors.Is(err, kms.ErrNotFound) {
		return nil, errNoKey
	}
	if err != nil {
		return nil, err
	}
	set := pop.PublishedJWKS{}
	for _, v := range info.Versions {
		if !v.State.Published() {
			continue
		}
		pk, err := h.o.Source.PublicKey(ctx, tenant, name, keyring.VersionRef{Version: v.Version})
		if err != nil {
			return nil, err
		}
		set.Keys = append(set.Keys, pk.JWK.WithChain(pk.Chain))
	}
	body, err := json.Marshal(set)
	if err != nil {
		return nil, err
	}
	d := newDoc(body, shorter(0, info))
	td.keys[name] = &d
	return &d, nil
}

func newDoc(body []byte, lead time.Duration) doc {
	sum := sha256.Sum256(body)
	// 128 bits of the digest: an ETag, not a security boundary.
	return doc{body: body, lead: lead, etag: `"` + base64.RawURLEncoding.EncodeToString(sum[:16]) + `"`}
}

// sourceError answers a keyring error: 404 for a missing key, 503 for a
// replica that cannot vouch for its copy, 500 (logged, never detailed to
// the client) for anything else.
func (h *Handler) sourceError(w http.ResponseWriter, tenant string, err error) {
	switch {
	case errors.Is(err, errNoKey):
		fail(w, http.StatusNotFound, bodyNoKey)
	case errors.Is(err, kms.ErrUnavailable):
		w.Header().Set("Retry-After", "1")
		fail(w, http.StatusServiceUnavailable, bodyUnavailable)
	default:
		h.o.Log.Error("jwks: serving a JWK Set", "tenant", tenant, "err", err)
		fail(w, http.StatusInternalServerError, bodyInternal)
	}
}

// fail writes a plain-text refusal that no cache keeps.
func fail(w http.ResponseWriter, status int, body string) {
	hdr := w.Header()
	hdr.Set("Content-Type", "text/plain; charset=utf-8")
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write([]byte(body))
}
