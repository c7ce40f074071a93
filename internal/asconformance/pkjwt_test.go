package asconformance

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/internal/oidcprovidertest"
	"github.com/keybroker/keybroker/pop"
)

// assertionLifetime is how long a client assertion is valid.
const assertionLifetime = 5 * time.Minute

// clientAssertion makes an RFC 7523 §3 client assertion — iss = sub =
// clientID, aud, a fresh jti, iat, exp — signed by version (0: the ACTIVE
// one) of key name through keybroker's CreateClientAssertion RPC.
func clientAssertion(ctx context.Context, c *client.Client, name string, version uint32, clientID, aud string) (string, error) {
	resp, err := c.API().CreateClientAssertion(ctx, &kbv1.CreateClientAssertionRequest{
		Name: name, Version: version, ClientId: clientID, Audience: aud, Lifetime: durationpb.New(assertionLifetime)})
	if err != nil {
		return "", fmt.Errorf("CreateClientAssertion %s v%d: %w", name, version, err)
	}
	return resp.GetAssertion(), nil
}

// withAssertion is a client_credentials request authenticated by a
// private_key_jwt assertion.
func withAssertion(a string) map[string][]string {
	return form("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", "client_assertion", a)
}

// present sends assertion a to the token endpoint.
func present(t *testing.T, as *oidcprovidertest.Server, a string) *oidcprovidertest.TokenResponse {
	t.Helper()
	tr, err := as.Token(ctx30(t), as.HTTPClient(nil), withAssertion(a), "")
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

// accepted fails the test unless the AS issued a token for assertion a.
func accepted(t *testing.T, as *oidcprovidertest.Server, what, a string) {
	t.Helper()
	if tr := present(t, as, a); tr.Status != http.StatusOK || tr.AccessToken == "" {
		t.Fatalf("%s: %s, want 200 and a token\n%v", what, tr, as.Events(t))
	}
}

// refused fails the test unless the AS refused assertion a as
// invalid_client with an error_detail containing detail.
func refused(t *testing.T, as *oidcprovidertest.Server, what, a, detail string) {
	t.Helper()
	if tr := present(t, as, a); tr.Status != http.StatusUnauthorized || tr.Error != "invalid_client" {
		t.Fatalf("%s: %s, want 401 invalid_client", what, tr)
	}
	if ev := lastEvent(t, as); !strings.Contains(ev.ErrorDetail, detail) {
		t.Fatalf("%s: AS said %s, want %q", what, ev, detail)
	}
}

// TestPrivateKeyJWT: for each key type, oidc-provider accepts a client
// assertion signed by keybroker for a client registered with the key's
// jwks_uri on keybroker's JWKS listener, with aud the token endpoint or the
// issuer; it refuses one for another client, and a replayed one.
func TestPrivateKeyJWT(t *testing.T) {
	e := newEnv(t)
	var clients []map[string]any
	for _, alg := range algs {
		id := "pkjwt-" + algName(alg)
		e.key(t, id, alg)
		clients = append(clients, map[string]any{"client_id": id, "token_endpoint_auth_method": "private_key_jwt", "jwks_uri": e.keyJWKSURI(id)})
	}
	as := oidcprovidertest.Start(t, oidcprovidertest.Config{CA: e.ca, Clients: clients})
	for _, alg := range algs {
		t.Run(alg.String(), func(t *testing.T) {
			id := "pkjwt-" + algName(alg)
			ctx := ctx30(t)
			for _, aud := range []string{as.Metadata.TokenEndpoint, as.Issuer} {
				a, err := clientAssertion(ctx, e.c, id, 0, id, aud)
				if err != nil {
					t.Fatal(err)
				}
				accepted(t, as, "assertion with aud "+aud, a)
				refused(t, as, "the same assertion again", a, "client assertion tokens must only be used once")
			}
			// Signed by this key but claiming another client: that
			// client's jwks_uri does not hold the key.
			otherID := "pkjwt-" + algName(algs[(indexOf(alg)+1)%len(algs)])
			a, err := clientAssertion(ctx, e.c, id, 0, otherID, as.Metadata.TokenEndpoint)
			if err != nil {
				t.Fatal(err)
			}
			refused(t, as, "assertion for another client", a, "no applicable key found")
		})
	}
	if f := as.Fetches(t); len(f) != len(algs) {
		t.Errorf("the AS fetched %v, want each client's jwks_uri", f)
	}
}

func indexOf(alg kbv1.Algorithm) int {
	for i, a := range algs {
		if a == alg {
			return i
		}
	}
	return -1
}

// TestPrivateKeyJWTRotation drives one key through pre-publication,
// activation and revocation while oidc-provider authenticates three
// clients by the key's jwks_uri, never reconfigured:
//
//   - "rp-prepub" first fetched the jwks_uri while the next version was
//     PENDING, so it accepts the new ACTIVE version at once, with no fetch,
//     and the RETIRED one during the overlap;
//   - "rp-stale" fetched it before the next version was published: it
//     refuses the new version until its copy is stale (oidc-provider keeps
//     a copy at least 60 s and re-fetches only when an assertion fails to
//     verify), then re-fetches and accepts it;
//   - after RevokeKeyVersion the revoked version is gone from the jwks_uri
//     at once, yet oidc-provider's default keeps accepting it from
//     "rp-prepub" while its cached copy verifies the assertion — even once
//     that copy is stale, since only a failure triggers a re-fetch — whereas
//     "rp-strict", with the assertJwtClientAuthClaimsAndHeader hook that
//     re-fetches a stale copy (test/oidc-provider/server.js), refuses it
//     once the copy is stale.
//
// The pending version comes from the daemon's real rotation scheduler (a
// policy whose pre-publication lead is the rotation period less a second,
// checked every second); RotateKey activates it. The AS's clock, not the
// test's, is moved past its cache lifetime.
func TestPrivateKeyJWTRotation(t *testing.T) {
	e := newEnv(t)
	const name = "rot"
	e.key(t, name, kbv1.Algorithm_ALGORITHM_ES256)
	uri := e.keyJWKSURI(name)
	as := oidcprovidertest.Start(t, oidcprovidertest.Config{CA: e.ca, RefreshStaleJwksClients: []string{"rp-strict"}, Clients: []map[string]any{
		{"client_id": "rp-stale", "token_endpoint_auth_method": "private_key_jwt", "jwks_uri": uri},
		{"client_id": "rp-prepub", "token_endpoint_auth_method": "private_key_jwt", "jwks_uri": uri},
		{"client_id": "rp-strict", "token_endpoint_auth_method": "private_key_jwt", "jwks_uri": uri},
	}})
	ctx := ctx30(t)
	aud := as.Metadata.TokenEndpoint
	assert := func(clientID string, version uint32) string {
		t.Helper()
		a, err := clientAssertion(ctx, e.c, name, version, clientID, aud)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	fetches := func(want int) {
		t.Helper()
		if got := as.Fetches(t)[uri]; got != want {
			t.Fatalf("the AS fetched %s %d times, want %d", uri, got, want)
		}
	}
	// oidc-provider keeps a jwks_uri copy for max(60 s, max-age); the
	// steps that rely on a fresh copy must run well within that.
	const cacheLife = 60 * time.Second
	fresh := func(since time.Time, what string) {
		t.Helper()
		if d := time.Since(since); d > cacheLife-15*time.Second {
			t.Fatalf("%s: %v since the AS fetched the jwks_uri, too close to its %v cache lifetime for this step to mean anything; the machine is too slow", what, d, cacheLife)
		}
	}

	// 1. Only version 1 is published.
	accepted(t, as, "rp-stale, version 1", assert("rp-stale", 0))
	staleFetched := time.Now()
	fetches(1)

	// 2. The scheduler publishes version 2 as PENDING.
	if _, err := e.c.API().UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: name, Policy: &kbv1.RotationPolicy{
		RotationPeriod: durationpb.New(time.Hour), PrePublicationLead: durationpb.New(time.Hour - time.Second),
	}}); err != nil {
		t.Fatal(err)
	}
	var v1, v2 *kbv1.KeyVersion
	deadline := time.Now().Add(20 * time.Second)
	for v2 == nil {
		k, err := e.c.API().GetKey(ctx, &kbv1.GetKeyRequest{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range k.GetKey().GetVersions() {
			switch v.GetState() {
			case kbv1.KeyState_KEY_STATE_ACTIVE:
				v1 = v
			case kbv1.KeyState_KEY_STATE_PENDING:
				v2 = v
			}
		}
		if v2 == nil && time.Now().After(deadline) {
			t.Fatalf("no PENDING version within 20s: %v", k.GetKey().GetVersions())
		}
		if v2 == nil {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if v1 == nil || v1.GetVersion() != 1 || v2.GetVersion() != 2 {
		t.Fatalf("versions: active %v, pending %v; want 1 and 2", v1, v2)
	}
	if kids := e.published(t, name); !kids[v1.GetKid()] || !kids[v2.GetKid()] || len(kids) != 2 {
		t.Fatalf("jwks_uri lists %v, want versions 1 (%s) and 2 (%s)", kids, v1.GetKid(), v2.GetKid())
	}

	// 3. rp-prepub and rp-strict fetch while version 2 is pending.
	accepted(t, as, "rp-prepub, version 1", assert("rp-prepub", 0))
	accepted(t, as, "rp-strict, version 1", assert("rp-strict", 0))
	prepubFetched := time.Now()
	fetches(3)

	// 4. Version 2 becomes ACTIVE, version 1 RETIRED.
	rot, err := e.c.API().RotateKey(ctx, &kbv1.RotateKeyRequest{Name: name, IfActiveVersion: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !rot.GetRotated() || rot.GetKey().GetActiveVersion() != 2 || rot.GetKey().GetActiveKid() != v2.GetKid() {
		t.Fatalf("RotateKey: rotated %v, active v%d %s; want the pending version 2 %s", rot.GetRotated(), rot.GetKey().GetActiveVersion(), rot.GetKey().GetActiveKid(), v2.GetKid())
	}
	newest := assert("rp-prepub", 0)
	if h, _, _, _, err := pop.ParseJWS(newest); err != nil || string(h["kid"]) != `"`+v2.GetKid()+`"` {
		t.Fatalf("assertion after rotation: header %s (%v), want kid %s", h["kid"], err, v2.GetKid())
	}
	fresh(prepubFetched, "new version at rp-prepub")
	accepted(t, as, "rp-prepub, version 2 (new ACTIVE, pre-published)", newest)
	accepted(t, as, "rp-prepub, version 1 (RETIRED, overlap)", assert("rp-prepub", 1))
	accepted(t, as, "rp-strict, version 2", assert("rp-strict", 0))
	fetches(3) // nothing re-fetched: the pending version was already there

	// 5. rp-stale's copy predates version 2 and is still fresh: refused,
	// and not re-fetched (oidc-provider re-fetches a stale copy only).
	fresh(staleFetched, "new version at rp-stale")
	refused(t, as, "rp-stale, version 2 before its copy is stale", assert("rp-stale", 0), "no applicable key found")
	fetches(3)

	// 6. Revoke version 1: assertions signed before, kept for later.
	early := map[string][]string{}
	for _, id := range []string{"rp-prepub", "rp-strict"} {
		for range 3 {
			early[id] = append(early[id], assert(id, 1))
		}
	}
	if _, err := e.c.API().RevokeKeyVersion(ctx, &kbv1.RevokeKeyVersionRequest{Name: name, Version: 1}); err != nil {
		t.Fatal(err)
	}
	if kids := e.published(t, name); kids[v1.GetKid()] || !kids[v2.GetKid()] {
		t.Fatalf("jwks_uri after revoking version 1 lists %v, want only %s", kids, v2.GetKid())
	}
	if _, err := clientAssertion(ctx, e.c, name, 1, "rp-prepub", aud); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("SignJWS with the revoked version 1: %v, want FailedPrecondition", err)
	}
	// Within the AS's cache lifetime both clients still accept it: the
	// window a relying party's cache leaves after a revocation.
	fresh(prepubFetched, "revoked version within the cache lifetime")
	accepted(t, as, "rp-prepub, revoked version 1 within the cache lifetime", early["rp-prepub"][0])
	accepted(t, as, "rp-strict, revoked version 1 within the cache lifetime", early["rp-strict"][0])

	// 7. The AS's clock passes its cache lifetime.
	as.AdvanceClock(t, cacheLife+time.Second)
	accepted(t, as, "rp-stale, version 2 once its copy is stale", assert("rp-stale", 0))
	fetches(4)
	// oidc-provider's default: the stale copy still verifies the revoked
	// version, so nothing is re-fetched and the assertion is accepted.
	accepted(t, as, "rp-prepub (default), revoked version 1 after the cache lifetime", early["rp-prepub"][1])
	fetches(4)
	// With the hook: the stale copy is re-fetched and version 1 is gone.
	refused(t, as, "rp-strict, revoked version 1 after the cache lifetime", early["rp-strict"][1], "is no longer in the client's jwks_uri")
	fetches(5)
	accepted(t, as, "rp-strict, version 2 after the re-fetch", assert("rp-strict", 0))
	accepted(t, as, "rp-prepub, version 2", assert("rp-prepub", 0))

	// rp-prepub's copy is re-fetched once an assertion fails to verify:
	// one signed by a key that was never published.
	stray := strayAssertion(t, "rp-prepub", aud)
	refused(t, as, "rp-prepub, an unpublished key", stray, "no applicable key found")
	fetches(6)
	refused(t, as, "rp-prepub, revoked version 1 after that re-fetch", early["rp-prepub"][2], "no applicable key found")
	refused(t, as, "rp-strict, revoked version 1 again", early["rp-strict"][2], "no applicable key found")
	fetches(6)
}

// strayAssertion is a client assertion for clientID signed by a software
// key that no jwks_uri lists.
func strayAssertion(t *testing.T, clientID, aud string) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := pop.NewSoftwareSigner(k, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	payload, err := json.Marshal(map[string]any{"iss": clientID, "sub": clientID, "aud": aud, "jti": randomString(),
		"iat": now.Unix(), "exp": now.Add(assertionLifetime).Unix()})
	if err != nil {
		t.Fatal(err)
	}
	a, err := pop.SignJWS(ctx30(t), s, payload, pop.JWSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return a
}
