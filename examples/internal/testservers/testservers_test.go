package testservers

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keybroker/keybroker/pop"
)

// These tests use software keys and a fake clock; the examples' tests run
// the same servers against keybroker keys.

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func softwareSigner(t *testing.T) pop.Signer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := pop.NewSoftwareSigner(key, pop.AlgES256)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func start(t *testing.T, clk *clock) *Env {
	t.Helper()
	env, err := Start(Config{Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(env.Close)
	return env
}

// popToken gets a token bound to s with req_cnf {"kid": …}, at the clock's
// time.
func popToken(t *testing.T, env *Env, clk *clock, s pop.Signer) string {
	t.Helper()
	ctx := context.Background()
	const id = "c1"
	if err := env.AS.RegisterClient(Client{ID: id, JWKS: []pop.JWK{s.JWK()}}); err != nil {
		t.Fatal(err)
	}
	claims, _ := json.Marshal(map[string]any{"iss": id, "sub": id, "aud": env.AS.TokenURL(), "exp": clk.Now().Add(time.Minute).Unix(), "jti": randomID()})
	assertion, err := pop.SignJWS(ctx, s, claims, pop.JWSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	form := url.Values{
		"grant_type": {GrantClientCredentials}, "client_assertion_type": {ClientAssertionJWTBearer}, "client_assertion": {assertion},
		"token_type": {TokenTypePoP}, "req_cnf": {pop.ReqCnfKid(s.JWK().Kid, "")},
	}
	resp, err := env.HTTPClient().PostForm(env.AS.TokenURL(), form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var tr struct {
		AccessToken string `json:"access_token"`
		TokenType   string `json:"token_type"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&tr); err != nil || resp.StatusCode != 200 || tr.TokenType != "pop" {
		t.Fatalf("token request: %s %v %+v", resp.Status, err, tr)
	}
	return tr.AccessToken
}

// callSHR calls the RS with an SHR made at the clock's time and returns
// the status and error_description.
func callSHR(t *testing.T, env *Env, clk *clock, s pop.Signer, token string) (int, string) {
	t.Helper()
	u := env.RS.URL() + "/api/x"
	shr, err := pop.NewSignedHTTPRequest(context.Background(), s, pop.SHRParams{AccessToken: token, Method: "GET", URL: u, Now: clk.Now()})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", u, nil)
	req.Header.Set("Authorization", pop.PoPAuthorization(shr))
	resp, err := env.HTTPClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e struct {
		Description string `json:"error_description"`
	}
	json.NewDecoder(resp.Body).Decode(&e)
	return resp.StatusCode, e.Description
}

// TestTokenLifetime: the RS accepts a token until it expires, by the
// servers' clock.
func TestTokenLifetime(t *testing.T) {
	clk := &clock{now: time.Now()}
	env := start(t, clk)
	s := softwareSigner(t)
	tok := popToken(t, env, clk, s)
	if status, desc := callSHR(t, env, clk, s, tok); status != 200 {
		t.Fatalf("fresh token: %d %s", status, desc)
	}
	clk.Advance(defaultTokenLifetime + clockLeeway + time.Second)
	if status, desc := callSHR(t, env, clk, s, tok); status != 401 || !strings.Contains(desc, "expired") {
		t.Fatalf("expired token: %d %q, want 401 expired", status, desc)
	}
}

// TestUnboundRequestRefused: the AS issues no unbound tokens.
func TestUnboundRequestRefused(t *testing.T) {
	clk := &clock{now: time.Now()}
	env := start(t, clk)
	s := softwareSigner(t)
	env.AS.RegisterClient(Client{ID: "c1", JWKS: []pop.JWK{s.JWK()}})
	claims, _ := json.Marshal(map[string]any{"iss": "c1", "sub": "c1", "aud": env.AS.Issuer(), "exp": clk.Now().Add(time.Minute).Unix(), "jti": "j1"})
	assertion, _ := pop.SignJWS(context.Background(), s, claims, pop.JWSOptions{})
	resp, err := env.HTTPClient().PostForm(env.AS.TokenURL(), url.Values{
		"grant_type": {GrantClientCredentials}, "client_assertion_type": {ClientAssertionJWTBearer}, "client_assertion": {assertion},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 400 || !strings.Contains(string(b), "only sender-constrained") {
		t.Fatalf("unbound token request: %s %s", resp.Status, b)
	}
}

// TestNonces: a proof with a server nonce is good for that period and the
// next, then the server asks for a new nonce; a proof that is bad for
// another reason is not answered with a nonce.
func TestNonces(t *testing.T) {
	n := newNonceSource(time.Minute)
	s := softwareSigner(t)
	const u = "https://rs.example/api"
	t0 := time.Unix(1_700_000_000, 0)
	nonce := n.at(t0)
	for _, tc := range []struct {
		at                     time.Time
		nonce, url             string
		wantErr, wantNonceOnly bool
	}{
		{t0, nonce, u, false, false},
		{t0.Add(time.Minute), nonce, u, false, false},
		{t0.Add(2 * time.Minute), nonce, u, true, true},
		{t0.Add(-time.Minute), nonce, u, true, true},
		{t0, "", u, true, true},
		{t0, newNonceSource(time.Minute).at(t0), u, true, true},
		{t0, nonce, u + "/other", true, false},
	} {
		proof, err := pop.NewDPoPProof(context.Background(), s, pop.DPoPParams{Method: "GET", URL: tc.url, Nonce: tc.nonce, Now: tc.at})
		if err != nil {
			t.Fatal(err)
		}
		_, nonceOnly, err := n.verifyDPoP(proof, pop.DPoPCheck{Method: "GET", URL: u, Now: tc.at})
		if (err != nil) != tc.wantErr || nonceOnly != tc.wantNonceOnly {
			t.Errorf("nonce %q at %v for %s: error %v, nonce only %v; want error %v, nonce only %v", tc.nonce, tc.at.Sub(t0), tc.url, err, nonceOnly, tc.wantErr, tc.wantNonceOnly)
		}
	}
}

func TestReplayCache(t *testing.T) {
	var c replayCache
	t0 := time.Unix(1_700_000_000, 0)
	if !c.add("a", t0.Add(time.Minute), t0) || c.add("a", t0.Add(time.Minute), t0.Add(time.Second)) {
		t.Fatal("first use refused, or second accepted")
	}
	if !c.add("a", t0.Add(3*time.Minute), t0.Add(2*time.Minute)) {
		t.Fatal("an id is remembered after it expired")
	}
}

func TestMetadata(t *testing.T) {
	env := start(t, &clock{now: time.Now()})
	resp, err := env.HTTPClient().Get(env.AS.Issuer() + "/.well-known/oauth-authorization-server")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m struct {
		Issuer  string            `json:"issuer"`
		Aliases map[string]string `json:"mtls_endpoint_aliases"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil || m.Issuer != env.AS.Issuer() || m.Aliases["token_endpoint"] != env.AS.MTLSTokenURL() {
		t.Fatalf("metadata %+v (%v)", m, err)
	}
}
