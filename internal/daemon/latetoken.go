package daemon

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/keybroker/keybroker/hsm"
	"github.com/keybroker/keybroker/kms"
)

// lateToken is a tenant's own PKCS#11 token that could not be opened at
// start (not plugged in, its HSM down): the daemon starts and serves the
// other tenants, and this one's calls fail with UNAVAILABLE until a
// background loop has opened it. A refused PIN ends the loop: PIN counters
// lock.
type lateToken struct {
	tenant string
	open   func() (*hsm.Backend, error)
	log    *slog.Logger

	mu      sync.RWMutex
	b       *hsm.Backend // nil until opened
	closed  bool
	stop    chan struct{}
	stopped chan struct{}
}

// lateRetryMax bounds the pause between two attempts to open the token.
const lateRetryMax = 5 * time.Second

func newLateToken(tenant string, open func() (*hsm.Backend, error), first error, log *slog.Logger) *lateToken {
	l := &lateToken{tenant: tenant, open: open, log: log, stop: make(chan struct{}), stopped: make(chan struct{})}
	log.Error("tenant's own PKCS#11 token cannot be opened; serving the other tenants and trying again in the background",
		"tenant", tenant, "err", first)
	go l.retry()
	return l
}

func (l *lateToken) retry() {
	defer close(l.stopped)
	delay := 250 * time.Millisecond
	for attempt := 2; ; attempt++ {
		select {
		case <-l.stop:
			return
		case <-time.After(delay):
		}
		b, err := l.open()
		if err == nil {
			l.mu.Lock()
			if l.closed {
				l.mu.Unlock()
				b.Close()
				return
			}
			l.b = b
			l.mu.Unlock()
			l.log.Info("tenant's own PKCS#11 token opened", "tenant", l.tenant, "attempts", attempt)
			return
		}
		if errors.Is(err, ErrPINRefused) || errors.Is(err, ErrConfig) {
			l.log.Error("tenant's own PKCS#11 token: giving up (fix the cause, then restart)", "tenant", l.tenant, "err", err)
			return
		}
		delay = min(2*delay, lateRetryMax)
	}
}

// errNotOpen is the answer of a lateToken that is not open yet.
var errNotOpen = fmt.Errorf("the tenant's own PKCS#11 token is not open yet: %w", kms.ErrUnavailable)

func (l *lateToken) backend() (*hsm.Backend, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.b == nil {
		return nil, errNotOpen
	}
	return l.b, nil
}

func (l *lateToken) Generate(ctx context.Context, p kms.Partition, spec kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	b, err := l.backend()
	if err != nil {
		return nil, nil, err
	}
	return b.Generate(ctx, p, spec)
}

func (l *lateToken) Sign(ctx context.Context, p kms.Partition, h kms.Handle, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	b, err := l.backend()
	if err != nil {
		return nil, err
	}
	return b.Sign(ctx, p, h, digest, opts)
}

func (l *lateToken) Destroy(ctx context.Context, p kms.Partition, h kms.Handle) error {
	b, err := l.backend()
	if err != nil {
		return err
	}
	return b.Destroy(ctx, p, h)
}

func (l *lateToken) Probe(ctx context.Context) error {
	b, err := l.backend()
	if err != nil {
		return err
	}
	return b.Probe(ctx)
}

// List lists the token's keys once it is open.
func (l *lateToken) List(ctx context.Context) ([]kms.Object, error) {
	b, err := l.backend()
	if err != nil {
		return nil, err
	}
	return b.List(ctx)
}

// Close stops the background loop and closes the token if it was opened.
func (l *lateToken) Close() error {
	l.mu.Lock()
	l.closed = true
	b := l.b
	l.mu.Unlock()
	close(l.stop)
	<-l.stopped
	if b != nil {
		return b.Close()
	}
	return nil
}

var (
	_ kms.Backend = (*lateToken)(nil)
	_ kms.Lister  = (*lateToken)(nil)
)
