package demo

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
)

// Printer prints numbered steps and their details, and the servers' log
// lines between them. It is safe for concurrent use.
type Printer struct {
	mu sync.Mutex
	w  io.Writer
	n  int
}

// NewPrinter prints to w.
func NewPrinter(w io.Writer) *Printer { return &Printer{w: w} }

// Step starts a numbered step.
func (p *Printer) Step(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.n++
	fmt.Fprintf(p.w, "\n%d. %s\n", p.n, fmt.Sprintf(format, args...))
}

// Section prints a heading.
func (p *Printer) Section(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, "\n=== %s ===\n", fmt.Sprintf(format, args...))
}

// Info prints a detail of the current step.
func (p *Printer) Info(format string, args ...any) {
	p.line("   " + fmt.Sprintf(format, args...))
}

func (p *Printer) line(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintln(p.w, s)
}

// ServerLog is a logger for the test servers that prints each record as
// "   [AS] msg key=value …" between the steps.
func (p *Printer) ServerLog() *slog.Logger { return slog.New(&lineHandler{p: p}) }

type lineHandler struct {
	p     *Printer
	attrs []slog.Attr
}

func (h *lineHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }

func (h *lineHandler) Handle(_ context.Context, r slog.Record) error {
	server := "server"
	var kv []string
	add := func(a slog.Attr) bool {
		if a.Key == "server" {
			server = a.Value.String()
			return true
		}
		v := a.Value.String()
		if strings.ContainsAny(v, " \"") || v == "" {
			v = fmt.Sprintf("%q", v)
		}
		kv = append(kv, a.Key+"="+v)
		return true
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	h.p.line(fmt.Sprintf("   [%s] %s %s", server, r.Message, strings.Join(kv, " ")))
	return nil
}

func (h *lineHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &lineHandler{p: h.p, attrs: append(h.attrs[:len(h.attrs):len(h.attrs)], attrs...)}
}

func (h *lineHandler) WithGroup(string) slog.Handler { return h }

// Trace is an http.RoundTripper that prints each request it sends (with
// the nonce of its DPoP proof, if any) and the status of the answer, and
// records them. Put it under client.DPoPTransport to watch the nonce
// dance.
type Trace struct {
	Base http.RoundTripper // nil: http.DefaultTransport
	P    *Printer          // nil: record only

	mu   sync.Mutex
	hops []Hop
}

// Hop is one request a Trace saw.
type Hop struct {
	Method, URL string
	Header      http.Header // as sent
	ProofNonce  string      // the DPoP proof's "nonce"
	Status      int
	DPoPNonce   string // the answer's DPoP-Nonce
}

// RoundTrip implements http.RoundTripper.
func (t *Trace) RoundTrip(req *http.Request) (*http.Response, error) {
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	h := Hop{Method: req.Method, URL: req.URL.String(), Header: req.Header.Clone()}
	desc := ""
	if proof := req.Header.Get("DPoP"); proof != "" {
		c := Claims(proof)
		n, _ := c["nonce"].(string)
		h.ProofNonce = n
		if n == "" {
			n = "(none)"
		}
		desc = fmt.Sprintf(" with a DPoP proof (htu %v, nonce %s", c["htu"], n)
		if _, ok := c["ath"]; ok {
			desc += ", ath"
		}
		desc += ")"
	}
	if t.P != nil {
		scheme, _, _ := strings.Cut(req.Header.Get("Authorization"), " ")
		if scheme != "" {
			desc += ", Authorization: " + scheme + " …"
		}
		t.P.Info("→ %s %s%s", req.Method, req.URL.Redacted(), desc)
	}
	resp, err := base.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	h.Status, h.DPoPNonce = resp.StatusCode, resp.Header.Get("DPoP-Nonce")
	if t.P != nil {
		more := ""
		for _, c := range resp.Header.Values("WWW-Authenticate") {
			if strings.Contains(c, "error=") {
				more += " WWW-Authenticate: " + c
			}
		}
		if h.DPoPNonce != "" {
			more += " DPoP-Nonce: " + h.DPoPNonce
		}
		t.P.Info("← %s%s", resp.Status, more)
	}
	t.mu.Lock()
	t.hops = append(t.hops, h)
	t.mu.Unlock()
	return resp, nil
}

// Hops returns the requests seen so far.
func (t *Trace) Hops() []Hop {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]Hop(nil), t.hops...)
}

// Statuses returns the status of each request seen so far.
func (t *Trace) Statuses() []int {
	var s []int
	for _, h := range t.Hops() {
		s = append(s, h.Status)
	}
	return s
}
