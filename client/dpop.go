package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/keybroker/keybroker/pop"
)

// DPoPTransport is an http.RoundTripper that sends each request with a
// fresh RFC 9449 DPoP proof made by Signer (a keybroker key, via
// Signer.JOSE). With an access token it also sends "Authorization: DPoP
// <token>" and binds the proof to it ("ath"). When a server asks for a
// nonce — a 400 {"error":"use_dpop_nonce"} from an authorization server or a
// 401 WWW-Authenticate: DPoP error="use_dpop_nonce" from a resource server,
// with a DPoP-Nonce header — it retries once with that nonce, and it keeps
// the newest nonce of each origin for the next requests.
type DPoPTransport struct {
	Signer pop.Signer
	// Token returns the access token to send; nil sends none (token
	// requests to an authorization server).
	Token func(ctx context.Context) (string, error)
	// Base does the HTTP; nil means http.DefaultTransport.
	Base http.RoundTripper

	mu     sync.Mutex
	nonces map[string]string // by origin
}

func origin(r *http.Request) string { return strings.ToLower(r.URL.Scheme + "://" + r.URL.Host) }

func (t *DPoPTransport) nonce(o string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nonces[o]
}

func (t *DPoPTransport) remember(o, n string) {
	if n == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nonces == nil {
		t.nonces = map[string]string{}
	}
	t.nonces[o] = n
}

// RoundTrip implements http.RoundTripper. The request is not modified.
func (t *DPoPTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	token := ""
	if t.Token != nil {
		var err error
		if token, err = t.Token(req.Context()); err != nil {
			return nil, fmt.Errorf("dpop: access token: %w", err)
		}
	}
	o := origin(req)
	send := func(r *http.Request) (*http.Response, error) {
		proof, err := pop.NewDPoPProof(r.Context(), t.Signer, pop.DPoPParams{
			Method: r.Method, URL: r.URL.String(), AccessToken: token, Nonce: t.nonce(o), Now: time.Now(),
		})
		if err != nil {
			return nil, fmt.Errorf("dpop: proof: %w", err)
		}
		r.Header.Set("DPoP", proof)
		if token != "" {
			r.Header.Set("Authorization", "DPoP "+token)
		}
		resp, err := base.RoundTrip(r)
		if err != nil {
			return nil, err
		}
		t.remember(o, resp.Header.Get("DPoP-Nonce"))
		return resp, nil
	}
	resp, err := send(cloneRequest(req, req.Body))
	if err != nil {
		return nil, err
	}
	if resp.Header.Get("DPoP-Nonce") == "" || !wantsNonce(resp) {
		return resp, nil
	}
	// One retry with the new nonce, if the body can be sent again.
	var body io.ReadCloser
	if req.Body != nil && req.Body != http.NoBody {
		if req.GetBody == nil {
			return resp, nil
		}
		if body, err = req.GetBody(); err != nil {
			return resp, nil
		}
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	return send(cloneRequest(req, body))
}

func cloneRequest(r *http.Request, body io.ReadCloser) *http.Request {
	c := r.Clone(r.Context())
	c.Body = body
	if body == nil && r.Body != nil {
		c.Body = r.Body
	}
	return c
}

// wantsNonce reports whether resp asks for a DPoP nonce (RFC 9449 §8, §9).
// A 400's JSON body is read and put back.
func wantsNonce(resp *http.Response) bool {
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		for _, v := range resp.Header.Values("WWW-Authenticate") {
			if strings.HasPrefix(strings.ToLower(strings.TrimSpace(v)), "dpop") && strings.Contains(v, `error="use_dpop_nonce"`) {
				return true
			}
		}
	case http.StatusBadRequest:
		b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(b))
		var e struct {
			Error string `json:"error"`
		}
		return err == nil && json.Unmarshal(b, &e) == nil && e.Error == "use_dpop_nonce"
	}
	return false
}

// ReqCnf returns both req_cnf forms for the signer's key: MSAuth 1.0 AT-POP
// (the public JWK) and MSAL SHR PoP ({"kid": thumbprint}, marked as
// hardware-held).
func (s *Signer) ReqCnf() (jwkForm, kidForm string, err error) {
	jwkForm, err = pop.ReqCnfJWK(s.jwk)
	if err != nil {
		return "", "", err
	}
	return jwkForm, pop.ReqCnfKid(s.kid, pop.KSLHardware), nil
}

// PoPAuthorization returns the "Authorization: PoP <SHR>" header value that
// presents accessToken, bound to this key, on req (method, URL; nonce from
// the server's last WWW-Authenticate or Authentication-Info, if any).
func (s *Signer) PoPAuthorization(ctx context.Context, accessToken string, req *http.Request, nonce string) (string, error) {
	if req == nil || req.URL == nil {
		return "", errors.New("client: PoPAuthorization needs a request")
	}
	shr, err := pop.NewSignedHTTPRequest(ctx, s.JOSE(), pop.SHRParams{
		AccessToken: accessToken, Method: req.Method, URL: req.URL.String(), Nonce: nonce, Now: time.Now(),
	})
	if err != nil {
		return "", err
	}
	return pop.PoPAuthorization(shr), nil
}
