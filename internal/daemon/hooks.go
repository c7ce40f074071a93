package daemon

import (
	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/hooks"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/internal/server"
)

// startHooks runs the configured hooks on the keyring's events until the
// daemon stops. Of several replicas only the rotation leader runs them, so
// that an app registration is not pushed once per replica: every replica
// sees every change (the etcd watch), the leader acts on it.
func (d *Daemon) startHooks(cfg config.Config) {
	if len(cfg.Hooks) == 0 {
		return
	}
	var hs []hooks.Hook
	for _, h := range cfg.Hooks {
		hk := hooks.Hook{Exec: h.Exec, Args: h.Args, Timeout: h.Timeout}
		if hk.Timeout == 0 {
			hk.Timeout = config.DefaultHookTimeout
		}
		for _, on := range h.On {
			kind, _ := keyring.ParseEventKind(on) // validated
			hk.On = append(hk.On, kind)
		}
		hs = append(hs, hk)
	}
	o := hooks.Options{Hooks: hs, Encode: server.HookEncoder(d.ring, d.audit, d.log.With("component", "hooks")), Audit: d.audit, Observer: d.metrics, Log: d.log.With("component", "hooks")}
	if d.etcd != nil {
		o.Leading = func() bool {
			c := d.cluster.Load()
			return c != nil && c.Leading()
		}
	}
	r := hooks.New(o)
	_, stop := d.ring.Listen("", "", r.Notify)
	d.hooksDone = make(chan struct{})
	go func() {
		defer close(d.hooksDone)
		defer stop()
		r.Run(d.stopping)
	}()
}
