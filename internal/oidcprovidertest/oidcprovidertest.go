// Package oidcprovidertest runs a real, independent OAuth 2.0 authorization
// server — panva's oidc-provider for Node.js, pinned in test/oidc-provider
// and installed by scripts/install-deps.sh (`make deps`) — for tests that
// prove keybroker's outputs against it: client_credentials with DPoP-bound
// (RFC 9449) and certificate-bound (RFC 8705) access tokens,
// self_signed_tls_client_auth and private_key_jwt (RFC 7523) with a
// jwks_uri. Test code only.
//
// Start runs test/oidc-provider/server.js on a free loopback port, over TLS
// with a certificate from the test's CA, with the clients the test
// registers; the process is stopped when the test ends (and exits by itself
// when the test process dies, as its stdin closes). A machine without node
// or without the npm packages fails the test with how to install them; it
// never skips.
package oidcprovidertest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keybroker/keybroker/internal/testpki"
)

// installHint is how to get node and the pinned packages.
const installHint = "run `make deps` (scripts/install-deps.sh installs nodejs and npm when node is missing and runs `npm ci` in test/oidc-provider)"

// protocolWords start server.js's stdout lines meant for the harness.
var protocolWords = map[string]bool{"READY": true, "CLOCK": true, "EVENTS": true, "FETCHES": true, "ERROR": true}

// Config describes the authorization server to start.
type Config struct {
	// CA issues the server's TLS certificate (for 127.0.0.1), and is the
	// only CA the server trusts when it fetches a client's jwks_uri.
	CA *testpki.CA
	// Clients are registered statically: oidc-provider client metadata
	// (client_id, token_endpoint_auth_method, jwks_uri or jwks,
	// tls_client_certificate_bound_access_tokens, dpop_bound_access_tokens,
	// ...). grant_types defaults to client_credentials, redirect_uris and
	// response_types to none.
	Clients []map[string]any
	// RequireDPoPNonce makes the token endpoint answer a DPoP proof without
	// a nonce with 400 use_dpop_nonce and a DPoP-Nonce header.
	RequireDPoPNonce bool
	// RefreshStaleJwksClients lists clients for which the server also
	// re-fetches a stale cached jwks_uri after a client assertion verified,
	// and refuses the assertion if its key is no longer listed (see
	// test/oidc-provider/server.js). Other clients get oidc-provider's
	// default: a re-fetch only after a verification failure.
	RefreshStaleJwksClients []string
}

// Server is a running oidc-provider.
type Server struct {
	// Issuer is https://127.0.0.1:PORT.
	Issuer string
	// Metadata is the server's discovery document.
	Metadata Metadata

	tls     *tls.Config
	stdin   io.WriteCloser
	replies chan string
	mu      sync.Mutex // serializes commands
	log     *lockedBuffer
}

// Metadata is the part of the discovery document the tests use.
type Metadata struct {
	Issuer                                     string   `json:"issuer"`
	TokenEndpoint                              string   `json:"token_endpoint"`
	IntrospectionEndpoint                      string   `json:"introspection_endpoint"`
	TokenEndpointAuthMethodsSupported          []string `json:"token_endpoint_auth_methods_supported"`
	DPoPSigningAlgValuesSupported              []string `json:"dpop_signing_alg_values_supported"`
	TLSClientCertificateBoundAccessTokens      bool     `json:"tls_client_certificate_bound_access_tokens"`
	TokenEndpointAuthSigningAlgValuesSupported []string `json:"token_endpoint_auth_signing_alg_values_supported"`
}

// Event is an error oidc-provider reported (its grant.error,
// introspection.error, server_error events), with the error_detail it does
// not send to the client.
type Event struct {
	Event            string `json:"event"`
	Error            string `json:"error"`
	ErrorDescription string `json:"error_description"`
	ErrorDetail      string `json:"error_detail"`
	ClientID         string `json:"client_id"`
}

func (e Event) String() string {
	return fmt.Sprintf("%s %s (%s): %s [client %s]", e.Event, e.Error, e.ErrorDescription, e.ErrorDetail, e.ClientID)
}

// Dir is test/oidc-provider, found from this source file.
func Dir(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("oidcprovidertest: cannot locate the source tree")
	}
	return filepath.Join(filepath.Dir(file), "..", "..", "test", "oidc-provider")
}

// Start runs oidc-provider until the test ends.
func Start(t testing.TB, cfg Config) *Server {
	t.Helper()
	if cfg.CA == nil {
		t.Fatal("oidcprovidertest: Config.CA is nil")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("oidcprovidertest: node is not installed (%v): %s", err, installHint)
	}
	dir := Dir(t)
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "oidc-provider", "package.json")); err != nil {
		t.Fatalf("oidcprovidertest: the oidc-provider npm package is not installed in %s (%v): %s", dir, err, installHint)
	}

	tmp := t.TempDir()
	certFile, keyFile, caFile := cfg.CA.ServerFiles(t, tmp)
	clients := make([]map[string]any, len(cfg.Clients))
	for i, c := range cfg.Clients {
		m := map[string]any{"grant_types": []string{"client_credentials"}, "redirect_uris": []string{}, "response_types": []string{}}
		for k, v := range c {
			m[k] = v
		}
		clients[i] = m
	}
	conf, err := json.Marshal(map[string]any{
		"host": "127.0.0.1", "port": 0, "cert": certFile, "key": keyFile, "ca": caFile,
		"clients": clients, "requireDPoPNonce": cfg.RequireDPoPNonce,
		"refreshStaleJwksClients": cfg.RefreshStaleJwksClients,
	})
	if err != nil {
		t.Fatal(err)
	}
	confFile := filepath.Join(tmp, "config.json")
	if err := os.WriteFile(confFile, conf, 0o600); err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(node, filepath.Join(dir, "server.js"), confFile)
	cmd.Dir = dir
	s := &Server{replies: make(chan string, 16), log: &lockedBuffer{}}
	cmd.Stderr = s.log
	if s.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("oidcprovidertest: start node: %v", err)
	}
	exited := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			line := sc.Text()
			if word, _, _ := strings.Cut(line, " "); !protocolWords[word] {
				fmt.Fprintf(s.log, "stdout: %s\n", line)
				continue
			}
			s.replies <- line
		}
		close(s.replies)
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		s.stdin.Close() // server.js exits when its stdin closes
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("oidcprovidertest: oidc-provider exited with %v\n%s", err, s.log.String())
			}
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
			t.Errorf("oidcprovidertest: oidc-provider did not exit within 10s of its stdin closing; killed")
		}
		if t.Failed() {
			t.Logf("oidc-provider log:\n%s", s.log.String())
		}
	})

	var ready struct {
		Issuer string `json:"issuer"`
		Port   int    `json:"port"`
	}
	select {
	case line, ok := <-s.replies:
		if !ok {
			t.Fatalf("oidcprovidertest: oidc-provider exited before it was ready:\n%s", s.log.String())
		}
		rest, found := strings.CutPrefix(line, "READY ")
		if !found {
			t.Fatalf("oidcprovidertest: first line %q, want READY {...}\n%s", line, s.log.String())
		}
		if err := json.Unmarshal([]byte(rest), &ready); err != nil || ready.Issuer == "" {
			t.Fatalf("oidcprovidertest: READY line %q: %v", line, err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("oidcprovidertest: oidc-provider not ready within 60s:\n%s", s.log.String())
	}
	s.Issuer = ready.Issuer
	s.tls = &tls.Config{RootCAs: cfg.CA.Pool()}

	hc := s.HTTPClient(nil)
	resp, err := hc.Get(s.Issuer + "/.well-known/openid-configuration")
	if err != nil {
		t.Fatalf("oidcprovidertest: discovery: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("oidcprovidertest: discovery: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&s.Metadata); err != nil {
		t.Fatalf("oidcprovidertest: discovery: %v", err)
	}
	if s.Metadata.Issuer != s.Issuer || s.Metadata.TokenEndpoint == "" || s.Metadata.IntrospectionEndpoint == "" {
		t.Fatalf("oidcprovidertest: discovery %+v: want issuer %s and token and introspection endpoints", s.Metadata, s.Issuer)
	}
	return s
}

// TLSConfig trusts the server's CA; set Certificates or MaxVersion on a
// copy for mutual TLS.
func (s *Server) TLSConfig() *tls.Config { return s.tls.Clone() }

// HTTPClient talks to the server (and other servers of the same CA) over
// TLS configured by c (nil: TLSConfig()), with no connection reuse, so each
// request presents the certificate c gives.
func (s *Server) HTTPClient(c *tls.Config) *http.Client {
	if c == nil {
		c = s.TLSConfig()
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: c, DisableKeepAlives: true, ForceAttemptHTTP2: false}}
}

// command sends one command and returns the answer after its prefix.
func (s *Server) command(t testing.TB, cmd map[string]any, prefix string) string {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := json.Marshal(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.stdin.Write(append(b, '\n')); err != nil {
		t.Fatalf("oidcprovidertest: command %s: %v", b, err)
	}
	select {
	case line, ok := <-s.replies:
		if !ok {
			t.Fatalf("oidcprovidertest: oidc-provider exited during command %s:\n%s", b, s.log.String())
		}
		rest, found := strings.CutPrefix(line, prefix+" ")
		if !found {
			t.Fatalf("oidcprovidertest: command %s: answer %q, want %s ...", b, line, prefix)
		}
		return rest
	case <-time.After(30 * time.Second):
		t.Fatalf("oidcprovidertest: command %s: no answer within 30s", b)
	}
	return ""
}

// AdvanceClock moves the server's clock d ahead (whole seconds): every
// expiry oidc-provider checks, and its cache of each client's jwks_uri
// response, see the later time. The tests' own clocks are not moved.
func (s *Server) AdvanceClock(t testing.TB, d time.Duration) {
	t.Helper()
	if d < 0 || d%time.Second != 0 {
		t.Fatalf("oidcprovidertest: AdvanceClock(%v): want whole non-negative seconds", d)
	}
	s.command(t, map[string]any{"cmd": "advance", "seconds": int64(d / time.Second)}, "CLOCK")
}

// Events returns the errors reported since the last call.
func (s *Server) Events(t testing.TB) []Event {
	t.Helper()
	var ev []Event
	if err := json.Unmarshal([]byte(s.command(t, map[string]any{"cmd": "events"}, "EVENTS")), &ev); err != nil {
		t.Fatal(err)
	}
	return ev
}

// Fetches returns how many times the server has fetched each URL (the
// clients' jwks_uri).
func (s *Server) Fetches(t testing.TB) map[string]int {
	t.Helper()
	f := map[string]int{}
	if err := json.Unmarshal([]byte(s.command(t, map[string]any{"cmd": "fetches"}, "FETCHES")), &f); err != nil {
		t.Fatal(err)
	}
	return f
}

// Log is what the server wrote to stderr so far.
func (s *Server) Log() string { return s.log.String() }

// TokenResponse is a token endpoint answer, success or error (RFC 6749
// §5.1, §5.2).
type TokenResponse struct {
	Status           int    `json:"-"`
	AccessToken      string `json:"access_token"`
	TokenType        string `json:"token_type"`
	ExpiresIn        int    `json:"expires_in"`
	Error            string `json:"error"`
	ErrorDescription string `json:"error_description"`
	// TLSVersion is the version of the connection that carried the answer.
	TLSVersion uint16 `json:"-"`
}

func (r *TokenResponse) String() string {
	if r.Error != "" {
		return fmt.Sprintf("%d %s: %s", r.Status, r.Error, r.ErrorDescription)
	}
	return fmt.Sprintf("%d %s token", r.Status, r.TokenType)
}

// Token posts a client_credentials request with form (plus grant_type) to
// the token endpoint through hc; basic, if set, is client_secret_basic as
// "id:secret".
func (s *Server) Token(ctx context.Context, hc *http.Client, form url.Values, basic string) (*TokenResponse, error) {
	f := url.Values{"grant_type": {"client_credentials"}}
	for k, v := range form {
		f[k] = v
	}
	body := f.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.Metadata.TokenEndpoint, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(body)), nil }
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if basic != "" {
		id, secret, _ := strings.Cut(basic, ":")
		req.SetBasicAuth(url.QueryEscape(id), url.QueryEscape(secret))
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	tr := &TokenResponse{Status: resp.StatusCode}
	if resp.TLS != nil {
		tr.TLSVersion = resp.TLS.Version
	}
	if err := json.Unmarshal(b, tr); err != nil {
		return nil, fmt.Errorf("token endpoint: %s %q: %w", resp.Status, b, err)
	}
	return tr, nil
}

// Introspection is an RFC 7662 introspection answer.
type Introspection struct {
	Active    bool   `json:"active"`
	ClientID  string `json:"client_id"`
	TokenType string `json:"token_type"`
	Exp       int64  `json:"exp"`
	Cnf       struct {
		JKT     string `json:"jkt"`
		X5TS256 string `json:"x5t#S256"`
	} `json:"cnf"`
}

// Introspect asks the server about token, authenticating as a
// client_secret_basic client ("id:secret").
func (s *Server) Introspect(ctx context.Context, token, basic string) (*Introspection, error) {
	body := url.Values{"token": {token}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.Metadata.IntrospectionEndpoint, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	id, secret, _ := strings.Cut(basic, ":")
	req.SetBasicAuth(url.QueryEscape(id), url.QueryEscape(secret))
	resp, err := s.HTTPClient(nil).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("introspection: %s %s", resp.Status, b)
	}
	var in Introspection
	if err := json.Unmarshal(b, &in); err != nil {
		return nil, fmt.Errorf("introspection %q: %w", b, err)
	}
	return &in, nil
}

// lockedBuffer collects the server's stderr.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
