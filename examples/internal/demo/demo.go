// Package demo holds what keybroker's examples share but is not the point
// of any of them: finding the daemon, making keys, printing steps, and the
// plain OAuth HTTP plumbing of a client. Only the examples import it.
package demo

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/pop"
)

// DevSocket is where `make run` (keybrokerd --dev) listens, relative to
// the repository root.
const DevSocket = ".keybroker/dev/keybroker.sock"

// Dial connects to keybrokerd at $KEYBROKER_SOCKET; when that is not set,
// at DevSocket if it exists under the current directory, else at
// client.DefaultSocket. It returns the target it used.
func Dial() (*client.Client, string, error) {
	target := os.Getenv("KEYBROKER_SOCKET")
	if target == "" {
		target = client.DefaultSocket
		if _, err := os.Stat(DevSocket); err == nil {
			if abs, err := filepath.Abs(DevSocket); err == nil {
				target = abs
			}
		}
	}
	c, err := client.Dial(target)
	return c, target, err
}

// Key returns a Signer for the ACTIVE version of key name, creating the key
// with alg first if it does not exist.
func Key(ctx context.Context, c *client.Client, name string, alg kbv1.Algorithm) (*client.Signer, error) {
	s, err := c.Signer(ctx, name)
	switch status.Code(err) {
	case codes.OK:
		return s, nil
	case codes.NotFound:
	case codes.Unavailable:
		return nil, fmt.Errorf("keybrokerd is not reachable: start it with `make run` and set KEYBROKER_SOCKET (%w)", err)
	default:
		return nil, fmt.Errorf("key %s: %w", name, err)
	}
	if _, err := c.API().CreateKey(ctx, &kbv1.CreateKeyRequest{Name: name, Algorithm: alg}); err != nil && status.Code(err) != codes.AlreadyExists {
		return nil, fmt.Errorf("create key %s: %w", name, err)
	}
	return c.Signer(ctx, name)
}

// Short abbreviates a long value (a token, a proof) for printing.
func Short(s string) string {
	if len(s) <= 40 {
		return s
	}
	return s[:20] + "…" + s[len(s)-12:]
}

// JSON is v as compact JSON, for printing.
func JSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprintf("%v", v)
	}
	return string(b)
}

// TokenResponse is a successful token response (RFC 6749 §5.1).
type TokenResponse struct {
	AccessToken string `json:"access_token"`
	TokenType   string `json:"token_type"`
	ExpiresIn   int    `json:"expires_in"`
}

// OAuthError is a token endpoint error response (RFC 6749 §5.2), or a
// resource server's refusal.
type OAuthError struct {
	Status      int    `json:"-"`
	Code        string `json:"error"`
	Description string `json:"error_description"`
}

func (e *OAuthError) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Description)
}

// RequestToken POSTs form to a token endpoint and decodes the answer; an
// error answer is an *OAuthError.
func RequestToken(ctx context.Context, hc *http.Client, tokenURL string, form url.Values) (*TokenResponse, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, tokenURL, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		e := &OAuthError{Status: resp.StatusCode}
		if json.Unmarshal(body, e) != nil || e.Code == "" {
			e.Code, e.Description = "http_error", strings.TrimSpace(string(body))
		}
		return nil, e
	}
	var tr TokenResponse
	if err := json.Unmarshal(body, &tr); err != nil {
		return nil, fmt.Errorf("token response: %w", err)
	}
	if tr.AccessToken == "" {
		return nil, errors.New("token response has no access_token")
	}
	return &tr, nil
}

// Response is a resource server's answer.
type Response struct {
	Status    int
	Body      string
	Challenge []string // WWW-Authenticate
	// Code and Description are the error and error_description of a
	// refusal.
	Code, Description string
}

// Err returns nil for a 200 and an *OAuthError otherwise.
func (r *Response) Err() error {
	if r.Status == http.StatusOK {
		return nil
	}
	return &OAuthError{Status: r.Status, Code: r.Code, Description: r.Description}
}

// Do sends req and reads the answer.
func Do(hc *http.Client, req *http.Request) (*Response, error) {
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	r := &Response{Status: resp.StatusCode, Body: strings.TrimSpace(string(body)), Challenge: resp.Header.Values("WWW-Authenticate")}
	if r.Status != http.StatusOK {
		var e OAuthError
		if json.Unmarshal(body, &e) == nil {
			r.Code, r.Description = e.Code, e.Description
		}
	}
	return r, nil
}

// ClientAssertion returns a private_key_jwt client assertion (RFC 7523 §3):
// iss and sub clientID, aud audience (the token endpoint), one minute of
// life and a random jti, signed by s — in the examples, a keybroker key.
func ClientAssertion(ctx context.Context, s pop.Signer, clientID, audience string, now time.Time) (string, error) {
	var jti [16]byte
	rand.Read(jti[:])
	payload, err := json.Marshal(map[string]any{
		"iss": clientID, "sub": clientID, "aud": audience,
		"iat": now.Unix(), "exp": now.Add(time.Minute).Unix(),
		"jti": base64.RawURLEncoding.EncodeToString(jti[:]),
	})
	if err != nil {
		return "", err
	}
	return pop.SignJWS(ctx, s, payload, pop.JWSOptions{Header: map[string]any{"typ": "JWT"}})
}

// DecodeSegment decodes one base64url part of a compact JWS as JSON into a
// map, without verifying anything: for printing.
func DecodeSegment(s string) map[string]any {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil
	}
	var m map[string]any
	if json.Unmarshal(b, &m) != nil {
		return nil
	}
	return m
}

// Claims decodes the payload of a compact JWS without verifying it: for
// printing.
func Claims(jws string) map[string]any {
	parts := strings.Split(jws, ".")
	if len(parts) != 3 {
		return nil
	}
	return DecodeSegment(parts[1])
}
