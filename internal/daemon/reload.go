package daemon

import (
	"context"
	"errors"
	"log/slog"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/keyring"
	"github.com/keybroker/keybroker/kms"
)

// Reload re-reads the configuration with load (SIGHUP) and applies what
// can change while serving: tenants (identities, roles), quotas (signs per
// second, burst, max keys, publish_jwks), the log level, the health probe
// interval, jwks.max_age and the JWKS certificate (re-read from its files).
// A configuration with any problem is refused whole: every problem is
// logged, the running configuration keeps serving, and the problems are
// returned (config.Problems). systemd is told RELOADING=1, then READY=1
// either way.
func (d *Daemon) Reload(load func() (config.Config, error)) error {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	d.notify(sdnotify.SdNotifyReloading + "\nMONOTONIC_USEC=" + monotonicUsec() + "\nSTATUS=reloading the configuration")
	defer d.notify(sdnotify.SdNotifyReady + "\nSTATUS=serving")
	d.log.Info("reloading the configuration")
	err := d.reload(load)
	var p config.Problems
	if errors.As(err, &p) {
		d.log.Error("configuration reload refused; the running configuration keeps serving", "problems", []string(p))
	}
	return err
}

func (d *Daemon) reload(load func() (config.Config, error)) error {
	next, err := load()
	if err != nil {
		return config.Problems{err.Error()}
	}
	var problems config.Problems
	if err := next.Validate(); err != nil {
		var p config.Problems
		if !errors.As(err, &p) {
			p = config.Problems{err.Error()}
		}
		problems = append(problems, p...)
	}
	// Compared with the configuration the daemon started with: that is what
	// the hardware, listeners and store were opened with.
	p, restart := d.cfg.ReloadCheck(next)
	problems = append(problems, p...)
	useCert, err := d.reloadJWKSCert()
	if err != nil {
		problems = append(problems, err.Error())
	}
	if len(problems) > 0 {
		return problems
	}
	access, maxKeys, err := accessFrom(next)
	if err != nil {
		return config.Problems{err.Error()}
	}
	for _, f := range restart {
		d.log.Warn("configuration field changed; it takes effect at the next restart", "field", f)
	}
	access.CarryOver(d.access.Load())
	d.access.Store(access)
	d.svc.SetAccess(access)
	d.maxKeys.Store(&maxKeys)
	useCert()
	d.metrics.SetTenants(tenantNames(next))
	if d.level != nil {
		var level slog.Level
		if err := level.UnmarshalText([]byte(next.Log.Level)); err == nil {
			d.level.Set(level)
		}
	}
	d.live.Store(&next)
	d.log.Info("configuration reloaded", "tenants", len(next.EffectiveTenants()), "log_level", next.Log.Level)
	return nil
}

// Config is the configuration in force (the last one reloaded).
func (d *Daemon) Config() config.Config { return *d.live.Load() }

// keySource feeds the metrics from the keyring at scrape time.
type keySource struct{ d *Daemon }

func (k keySource) Stats() keyring.Stats { return k.d.ring.Stats() }

// VersionStates counts the versions of every configured tenant's keys.
func (k keySource) VersionStates() map[kms.State]int {
	counts := map[kms.State]int{}
	ctx := context.Background()
	for _, t := range k.d.live.Load().EffectiveTenants() {
		after := ""
		for {
			keys, next, err := k.d.ring.ListKeys(ctx, t.Name, after, keyring.MaxPageSize)
			if err != nil {
				k.d.log.Warn("metrics: listing keys", "tenant", t.Name, "err", err)
				break
			}
			for _, key := range keys {
				for _, v := range key.Versions {
					counts[v.State]++
				}
			}
			if next == "" {
				break
			}
			after = next
		}
	}
	return counts
}
