package hsm

// The crypto11 context: opening it, retiring it when the token is lost,
// and reopening it in the background.

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/keybroker/keybroker/kms"
)

// checkModule loads and initialises the module on its own, after
// crypto11 failed, to tell a module that cannot start (ErrModule) from a
// token that cannot be reached or refuses the login.
func checkModule(path string) error {
	mod := pkcs11.New(path)
	if mod == nil {
		return &kms.Error{Backend: "hsm", Op: "load module", Kind: ErrModule, Err: fmt.Errorf("cannot load %s", path)}
	}
	defer mod.Destroy()
	err := mod.Initialize()
	switch {
	case err == nil:
		mod.Finalize()
		return nil
	case errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)):
		// Initialised in this process already (another token's context).
		return nil
	}
	return &kms.Error{Backend: "hsm", Op: "initialise module", Kind: ErrModule, Err: err}
}

// serialModule reports whether calls into the module at path must not
// overlap. p11-kit's RPC client (p11-kit-client.so, "p11-kit server"
// remoting) deadlocks when its server goes away while two threads wait on
// one connection: the thread whose reply is cut off returns without waking
// the thread that read that reply's header for it, which then waits on a
// condition variable forever (rpc_socket_read in p11-kit's
// rpc-transport.c; seen with Debian 12's 0.24.1). Its server answers one
// call at a time per connection anyway, so little is lost.
func serialModule(path string) bool {
	return filepath.Base(path) == "p11-kit-client.so"
}

// defaultCloseTimeout bounds Close: a call stuck in the module must not
// hang the daemon's shutdown.
const defaultCloseTimeout = 10 * time.Second

func configure(cfg Config) (*crypto11.Context, error) {
	return crypto11.Configure(&crypto11.Config{
		Path:            cfg.ModulePath,
		TokenLabel:      cfg.TokenLabel,
		Pin:             cfg.PIN,
		MaxSessions:     cfg.MaxSessions,
		PoolWaitTimeout: cfg.PoolWaitTimeout,
	})
}

// Close logs out and releases the module. Safe to call more than once. It
// gives up after closeTimeout if a rebuild or a call on the token does not
// end (a module stuck in a call); the context is then left open.
func (b *Backend) Close() error {
	var err error
	b.closer.Do(func() {
		deadline := time.NewTimer(b.closeTimeout)
		defer deadline.Stop()
		b.mu.Lock()
		p11, wait := b.p11, b.rebuild
		b.p11, b.closed = nil, true
		b.mu.Unlock()
		if wait != nil {
			select {
			case <-wait:
			case <-deadline.C:
				b.log.Error("PKCS#11 reconnect does not end; closing without it", "token", b.cfg.TokenLabel, "timeout", b.closeTimeout)
				err = fmt.Errorf("hsm: close: reconnect still running after %v", b.closeTimeout)
				return
			}
			b.mu.Lock()
			p11, b.p11 = b.p11, nil
			b.mu.Unlock()
		}
		if p11 == nil {
			return
		}
		done := make(chan error, 1)
		go func() {
			defer func() {
				if r := recover(); r != nil {
					done <- fmt.Errorf("hsm: close: %v", r)
				}
			}()
			done <- p11.Close()
		}()
		select {
		case err = <-done:
		case <-deadline.C:
			b.log.Error("PKCS#11 calls still running; closing without waiting for them", "token", b.cfg.TokenLabel, "timeout", b.closeTimeout)
			err = fmt.Errorf("hsm: close: calls on the token still running after %v", b.closeTimeout)
		}
	})
	return err
}

// ErrRebuilding is wrapped by the errors of calls made while the token is
// being reopened after a failure.
var errRebuilding = fmt.Errorf("hsm: reconnecting to the token: %w", kms.ErrUnavailable)

// context returns the current crypto11 context, or errRebuilding.
func (b *Backend) context() (*crypto11.Context, error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.p11 == nil {
		if b.closed {
			return nil, fmt.Errorf("hsm: backend closed: %w", kms.ErrUnavailable)
		}
		return nil, errRebuilding
	}
	return b.p11, nil
}

// failed looks at an operation's error on context p11: if it says the
// token, a session or the login is gone, that context is retired and a
// rebuild starts (once). It returns err.
func (b *Backend) failed(p11 *crypto11.Context, err error) error {
	if err == nil || !errors.Is(err, kms.ErrUnavailable) {
		return err
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || errors.Is(err, errUnanswered) {
		// A slow or hung token: the call gave up, the context may still
		// be good. Probe reports a hung token; reconnecting would not help.
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.p11 != p11 || b.closed {
		return err // already retired
	}
	b.p11, b.keys = nil, make(map[string]cachedKey)
	done := make(chan struct{})
	b.rebuild = done
	b.log.Error("PKCS#11 token lost; reconnecting", "token", b.cfg.TokenLabel, "err", err)
	go b.reconnect(p11, done)
	return err
}

// reconnect closes the old context and opens new ones until one works or
// the backend is closed. A wrong PIN stops it: PIN counters lock.
func (b *Backend) reconnect(old *crypto11.Context, done chan struct{}) {
	defer close(done)
	// crypto11's Close waits for the old context's sessions: a call stuck
	// in the module (a hung HSM) must not keep the new context from
	// opening. It closes on its own once that call returns.
	closed := make(chan struct{})
	go func() {
		closeQuietly(old)
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(oldContextWait):
		b.log.Warn("PKCS#11 calls still stuck in the old context; reconnecting without waiting for them", "token", b.cfg.TokenLabel)
	}
	delay := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		b.mu.RLock()
		closed := b.closed
		b.mu.RUnlock()
		if closed {
			return
		}
		p11, err := configure(b.cfg)
		if err == nil {
			b.mu.Lock()
			if b.closed {
				b.mu.Unlock()
				closeQuietly(p11)
				return
			}
			b.p11, b.rebuild = p11, nil
			b.mu.Unlock()
			b.log.Info("PKCS#11 token back", "token", b.cfg.TokenLabel, "attempts", attempt)
			return
		}
		if errors.Is(classify("reopen token", err), kms.ErrFailedPrecondition) {
			b.log.Error("PKCS#11 token refuses the PIN; not retrying (PIN counters lock)", "token", b.cfg.TokenLabel)
			return
		}
		if attempt == 1 || attempt%20 == 0 {
			b.log.Warn("PKCS#11 token still unavailable", "token", b.cfg.TokenLabel, "attempt", attempt, "err", err)
		}
		time.Sleep(delay)
		delay = min(2*delay, time.Second)
	}
}

// oldContextWait bounds how long a reconnect waits for the old context
// to close.
const oldContextWait = 2 * time.Second

// closeQuietly closes a context whose sessions may all be dead; crypto11's
// Close panics when called twice and may fail on a lost token.
func closeQuietly(p11 *crypto11.Context) {
	defer func() { _ = recover() }()
	_ = p11.Close()
}
