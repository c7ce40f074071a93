// Package config loads and validates keybrokerd's YAML configuration. Load
// reports every problem at once; nothing is half-applied. Only the daemon's
// wiring imports it.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/internal/authn"
	"github.com/keybroker/keybroker/kms"
)

// Config is the daemon's configuration file.
type Config struct {
	// Socket is the unix socket the daemon serves on (mode 0660).
	Socket string `yaml:"socket"`
	// StateDir holds the metadata store (keybroker.db).
	StateDir string `yaml:"state_dir"`
	// Backend is "pkcs11" or "tpm".
	Backend  string   `yaml:"backend"`
	PKCS11   PKCS11   `yaml:"pkcs11"`
	TPM      TPM      `yaml:"tpm"`
	Tenants  []Tenant `yaml:"tenants"`
	TCP      TCP      `yaml:"tcp"`
	Audit    Audit    `yaml:"audit"`
	Rotation Rotation `yaml:"rotation"`
	Limits   Limits   `yaml:"limits"`
	Log      Log      `yaml:"log"`
	Health   Health   `yaml:"health"`
	Admin    Admin    `yaml:"admin"`
	Store    Store    `yaml:"store"`
	JWKS     JWKS     `yaml:"jwks"`
	// Hooks run programs on key events (see docs/operations.md "Hooks").
	Hooks []Hook `yaml:"hooks"`
}

// Hook runs Exec with Args for every key event named in On, the event as
// one line of JSON on stdin, until it exits 0 (retried with backoff).
type Hook struct {
	On   []string `yaml:"on"`
	Exec string   `yaml:"exec"`
	Args []string `yaml:"args"`
	// Timeout bounds one run; a run still going then is killed (its whole
	// process group) and counts as a failure. Default DefaultHookTimeout.
	Timeout time.Duration `yaml:"timeout"`
}

// HookEvents are the event names a hook's on may list (keyring's
// EventKind names).
var HookEvents = []string{"pending", "active", "retired", "expired", "revoked", "destroyed", "policy", "certificate"}

// Bounds of hooks[].timeout, and its default.
const (
	DefaultHookTimeout = 30 * time.Second
	MinHookTimeout     = time.Second
	MaxHookTimeout     = 10 * time.Minute
	MaxHooks           = 32
)

// JWKS is the optional HTTPS listener that publishes the JWK Sets of the
// tenants with publish_jwks (see docs/operations.md "Publishing JWKS over
// HTTPS"). It has no authentication: it serves public keys only.
type JWKS struct {
	// Address, e.g. "0.0.0.0:8443"; empty: off.
	Address  string `yaml:"address"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// MaxAge caps Cache-Control max-age. The answer's max-age is the
	// smaller of MaxAge and half the shortest pre-publication lead of the
	// keys served, so that a relying party's cached copy always holds a
	// pending version before it signs; MaxAge also bounds how long a
	// revoked version may stay in relying parties' caches.
	MaxAge time.Duration `yaml:"max_age"`
}

// MaxJWKSMaxAge bounds jwks.max_age.
const MaxJWKSMaxAge = 7 * 24 * time.Hour

// Store says where the metadata lives: "bbolt" (the default), a file in
// state_dir for one daemon, or "etcd", shared by several replicas in front
// of one network HSM (see docs/operations.md "Running several replicas").
type Store struct {
	Backend     string        `yaml:"backend"`
	Endpoints   []string      `yaml:"endpoints"`
	Prefix      string        `yaml:"prefix"`
	DialTimeout time.Duration `yaml:"dial_timeout"`
	// RequestTimeout bounds each call to etcd.
	RequestTimeout time.Duration `yaml:"request_timeout"`
	TLS            StoreTLS      `yaml:"tls"`
	// Replica names this daemon among the replicas (default: the host
	// name); it is in the cluster status and in every audit record.
	Replica string `yaml:"replica"`
	// LeaseTTL is the rotation leader's etcd lease: a leader that stops
	// renewing it is replaced within about this long.
	LeaseTTL time.Duration `yaml:"lease_ttl"`
	// MaxStaleness is how long a replica cut off from etcd keeps signing
	// from memory after its last confirmed sync before it refuses.
	MaxStaleness time.Duration `yaml:"max_staleness"`
}

// StoreTLS is the client TLS for etcd; empty: plain connections.
type StoreTLS struct {
	CAFile   string `yaml:"ca_file"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// Health configures the backend prober behind grpc.health.v1 and the
// systemd watchdog.
type Health struct {
	// ProbeInterval is how often the backend is probed; health turns
	// NOT_SERVING when a probe fails and SERVING when one succeeds again.
	ProbeInterval time.Duration `yaml:"probe_interval"`
	// ProbeTimeout is how long a probe may take before the backend counts
	// as down (hung hardware answers nothing).
	ProbeTimeout time.Duration `yaml:"probe_timeout"`
}

// Admin is the optional admin HTTP listener (Prometheus /metrics).
type Admin struct {
	// Address, e.g. "127.0.0.1:9464"; empty: off. It must be a loopback
	// address: the endpoint has no authentication.
	Address string `yaml:"address"`
}

// Tenant is a unit of isolation: who may call as it, what they may do,
// how much, and where its keys live.
type Tenant struct {
	Name       string     `yaml:"name"`
	Identities Identities `yaml:"identities"`
	// Roles: "signer" (Sign and reads), "admin" (create, rotate, revoke,
	// policy, and reads).
	Roles []string `yaml:"roles"`
	Quota Quota    `yaml:"quota"`
	// PKCS11, when set, gives the tenant its own token; otherwise its keys
	// live on the shared token (pkcs11.token_label), kept apart by record.
	PKCS11 *TenantToken `yaml:"pkcs11"`
	// PublishJWKS serves the tenant's JWK Set, without authentication, on
	// the jwks listener. Off: the listener says nothing about the tenant.
	PublishJWKS bool `yaml:"publish_jwks"`
}

// Identities are the callers that act as a tenant.
type Identities struct {
	UIDs        []uint32 `yaml:"uids"`         // unix socket peers (SO_PEERCRED)
	GIDs        []uint32 `yaml:"gids"`         // unix socket peers' primary group
	SPIFFEIDs   []string `yaml:"spiffe_ids"`   // mTLS client certificate URI SAN
	DNSNames    []string `yaml:"dns_names"`    // mTLS client certificate DNS SAN
	CommonNames []string `yaml:"common_names"` // mTLS client certificate subject CN
}

// Quota bounds a tenant's use; zero values mean unlimited.
type Quota struct {
	SignsPerSecond float64 `yaml:"signs_per_second"`
	Burst          int     `yaml:"burst"`
	MaxKeys        int     `yaml:"max_keys"`
}

// TenantToken is a tenant's own PKCS#11 token (same module as pkcs11).
type TenantToken struct {
	TokenLabel string `yaml:"token_label"`
	PINFile    string `yaml:"pin_file"`
}

// TCP is the optional TCP listener with mutual TLS.
type TCP struct {
	// Address, e.g. "127.0.0.1:8443"; empty: no TCP listener.
	Address      string `yaml:"address"`
	CertFile     string `yaml:"cert_file"`
	KeyFile      string `yaml:"key_file"`
	ClientCAFile string `yaml:"client_ca_file"` // CA bundle client certificates must chain to
}

// Audit configures the audit log.
type Audit struct {
	// Path of the hash-chained JSON-lines log; default <state_dir>/audit.jsonl.
	Path string `yaml:"path"`
	// WriteTimeout: a call whose record is not durable within it fails
	// with UNAVAILABLE (and a signature is not released).
	WriteTimeout time.Duration `yaml:"write_timeout"`
	// Sync is "always" (a record is synced to disk before its call
	// returns) or "interval" (written before, synced at most every
	// SyncInterval): see docs/operations.md "The audit log's durability".
	Sync         string        `yaml:"sync"`
	SyncInterval time.Duration `yaml:"sync_interval"`
}

// PKCS11 configures the PKCS#11 backend.
type PKCS11 struct {
	// Module is the path of the PKCS#11 library.
	Module string `yaml:"module"`
	// TokenLabel selects the token.
	TokenLabel string `yaml:"token_label"`
	// PINFile holds the user PIN (a trailing newline is ignored). It must
	// not be readable by others.
	PINFile string `yaml:"pin_file"`
	// SoftHSM2Conf, when set, is exported as SOFTHSM2_CONF before the
	// module loads (SoftHSM2 only).
	SoftHSM2Conf string `yaml:"softhsm2_conf"`
	// MaxSessions sizes the session pool.
	MaxSessions int `yaml:"max_sessions"`
	// PoolWaitTimeout bounds the wait for a free session.
	PoolWaitTimeout time.Duration `yaml:"pool_wait_timeout"`
}

// TPM configures the TPM 2.0 backend: exactly one of Device, Socket and
// Address.
type TPM struct {
	// Device is the kernel resource manager, e.g. /dev/tpmrm0.
	Device string `yaml:"device"`
	// Socket is a swtpm unix socket (swtpm socket --server type=unixio).
	Socket string `yaml:"socket"`
	// Address is a swtpm TCP address (host:port of its server port).
	Address string `yaml:"address"`
	// Timeout bounds each TPM command.
	Timeout time.Duration `yaml:"timeout"`
}

// Rotation configures the rotation scheduler.
type Rotation struct {
	// CheckInterval is how often due transitions are applied. Keys are
	// pre-generated a lead time ahead, so this only bounds how late a
	// transition can be.
	CheckInterval time.Duration `yaml:"check_interval"`
}

// Limits bounds what a client can ask of the daemon.
type Limits struct {
	// MaxRecvMsgSize is the largest request in bytes.
	MaxRecvMsgSize int `yaml:"max_recv_msg_size"`
	// MaxConcurrentStreams per client connection.
	MaxConcurrentStreams uint32 `yaml:"max_concurrent_streams"`
	// CallTimeout is the deadline of a call that carries none (and the cap
	// on one that carries a longer one).
	CallTimeout time.Duration `yaml:"call_timeout"`
	// ShutdownTimeout bounds the graceful stop on SIGTERM.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
}

// Log configures logging.
type Log struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // json, text
}

// DefaultTPMDevice is tpm.device when none of tpm.device, tpm.socket and
// tpm.address is set.
const DefaultTPMDevice = "/dev/tpmrm0"

// Default returns the configuration used for every field a file leaves out.
// The TPM transport is the exception: a file that sets tpm.socket or
// tpm.address does not get tpm.device too (see Parse).
func Default() Config {
	return Config{
		Socket:   client.DefaultSocket,
		StateDir: "/var/lib/keybroker",
		Backend:  "pkcs11",
		PKCS11: PKCS11{
			Module:          "/usr/lib/softhsm/libsofthsm2.so",
			TokenLabel:      "keybroker",
			PINFile:         "/etc/keybroker/pkcs11.pin",
			MaxSessions:     16,
			PoolWaitTimeout: 2 * time.Second,
		},
		TPM:      TPM{Device: DefaultTPMDevice, Timeout: 5 * time.Second},
		Audit:    Audit{WriteTimeout: time.Second, Sync: "always", SyncInterval: 50 * time.Millisecond},
		Rotation: Rotation{CheckInterval: time.Minute},
		Limits: Limits{
			MaxRecvMsgSize:       64 << 10,
			MaxConcurrentStreams: 256,
			CallTimeout:          10 * time.Second,
			ShutdownTimeout:      10 * time.Second,
		},
		Log: Log{Level: "info", Format: "json"},
		// Probed often enough that a hung HSM or TPM turns health
		// NOT_SERVING within a second (interval + timeout), and back
		// within half a second of its return.
		Health: Health{ProbeInterval: 250 * time.Millisecond, ProbeTimeout: 250 * time.Millisecond},
		Store: Store{Backend: "bbolt", Prefix: "/keybroker/", DialTimeout: 5 * time.Second, RequestTimeout: 5 * time.Second,
			LeaseTTL: 10 * time.Second, MaxStaleness: 10 * time.Second},
		JWKS: JWKS{MaxAge: time.Hour},
	}
}

// Parse reads YAML over the defaults. Unknown fields are errors. The TPM
// device defaults to DefaultTPMDevice only when the file sets none of
// tpm.device, tpm.socket and tpm.address: `tpm: {socket: ...}` alone
// selects the socket.
func Parse(r io.Reader) (Config, error) {
	cfg := Default()
	cfg.TPM.Device = ""
	dec := yaml.NewDecoder(r)
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	if cfg.TPM.Device == "" && cfg.TPM.Socket == "" && cfg.TPM.Address == "" {
		cfg.TPM.Device = DefaultTPMDevice
	}
	return cfg, nil
}

// Load reads and parses a file (without validating it).
func Load(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	return Parse(bytes.NewReader(b))
}

// Problems is every problem found in a configuration.
type Problems []string

func (p Problems) Error() string {
	return "invalid configuration:\n  - " + strings.Join(p, "\n  - ")
}

// Validate checks the configuration and returns every problem at once (as
// Problems), or nil.
func (c Config) Validate() error {
	var p Problems
	add := func(format string, args ...any) { p = append(p, fmt.Sprintf(format, args...)) }
	if c.Socket == "" {
		add("socket: must be set")
	} else if len(c.Socket) > 107 {
		add("socket: %q is %d bytes, longer than a unix socket path may be (107)", c.Socket, len(c.Socket))
	}
	if c.StateDir == "" {
		add("state_dir: must be set")
	}
	switch c.Backend {
	case "pkcs11":
		if c.PKCS11.Module == "" {
			add("pkcs11.module: must be set")
		} else if !filepath.IsAbs(c.PKCS11.Module) {
			add("pkcs11.module: %q must be an absolute path", c.PKCS11.Module)
		}
		if c.PKCS11.TokenLabel == "" {
			add("pkcs11.token_label: must be set")
		} else if len(c.PKCS11.TokenLabel) > 32 {
			add("pkcs11.token_label: %q is longer than 32 bytes (PKCS#11 CK_TOKEN_INFO.label)", c.PKCS11.TokenLabel)
		}
		if c.PKCS11.PINFile == "" {
			add("pkcs11.pin_file: must be set")
		}
		if c.PKCS11.MaxSessions < 2 || c.PKCS11.MaxSessions > 1024 {
			add("pkcs11.max_sessions: got %d, want 2..1024", c.PKCS11.MaxSessions)
		}
		if c.PKCS11.PoolWaitTimeout <= 0 {
			add("pkcs11.pool_wait_timeout: got %v, want > 0", c.PKCS11.PoolWaitTimeout)
		}
	case "tpm":
		n := 0
		for _, v := range []string{c.TPM.Device, c.TPM.Socket, c.TPM.Address} {
			if v != "" {
				n++
			}
		}
		if n != 1 {
			add("tpm: set exactly one of device, socket and address (got %d)", n)
		}
		if c.TPM.Timeout <= 0 {
			add("tpm.timeout: got %v, want > 0", c.TPM.Timeout)
		}
		for i, t := range c.Tenants {
			if t.PKCS11 != nil {
				add("tenants[%d] (%s).pkcs11: an own PKCS#11 token needs backend pkcs11; with the TPM each tenant has its own parent key", i, t.Name)
			}
		}
	default:
		add("backend: got %q, want pkcs11 or tpm", c.Backend)
	}
	p = append(p, c.validateTenants()...)
	if c.TCP.Address != "" {
		if c.TCP.CertFile == "" || c.TCP.KeyFile == "" || c.TCP.ClientCAFile == "" {
			add("tcp: address is set, so cert_file, key_file and client_ca_file must be too")
		}
	}
	switch c.Audit.Sync {
	case "always":
	case "interval":
		if c.Audit.SyncInterval < time.Millisecond || c.Audit.SyncInterval > 10*time.Second {
			add("audit.sync_interval: got %v, want 1ms..10s", c.Audit.SyncInterval)
		}
	default:
		add("audit.sync: got %q, want always or interval", c.Audit.Sync)
	}
	if c.Audit.WriteTimeout <= 0 || c.Audit.WriteTimeout > time.Minute {
		add("audit.write_timeout: got %v, want > 0 and at most 1m", c.Audit.WriteTimeout)
	}
	if c.Rotation.CheckInterval < time.Second || c.Rotation.CheckInterval > time.Hour {
		add("rotation.check_interval: got %v, want 1s..1h", c.Rotation.CheckInterval)
	}
	if c.Limits.MaxRecvMsgSize < 1024 || c.Limits.MaxRecvMsgSize > 16<<20 {
		add("limits.max_recv_msg_size: got %d, want 1024..16777216", c.Limits.MaxRecvMsgSize)
	}
	if c.Limits.MaxConcurrentStreams == 0 {
		add("limits.max_concurrent_streams: must be > 0")
	}
	if c.Limits.CallTimeout <= 0 {
		add("limits.call_timeout: got %v, want > 0", c.Limits.CallTimeout)
	}
	if c.Limits.ShutdownTimeout <= 0 {
		add("limits.shutdown_timeout: got %v, want > 0", c.Limits.ShutdownTimeout)
	}
	if c.Health.ProbeTimeout < 10*time.Millisecond || c.Health.ProbeTimeout > time.Minute {
		add("health.probe_timeout: got %v, want 10ms..1m", c.Health.ProbeTimeout)
	}
	if c.Health.ProbeInterval < 100*time.Millisecond || c.Health.ProbeInterval > time.Hour {
		add("health.probe_interval: got %v, want 100ms..1h", c.Health.ProbeInterval)
	}
	p = append(p, c.validateStore()...)
	p = append(p, c.validateJWKS()...)
	p = append(p, c.validateHooks()...)
	if c.Admin.Address != "" {
		if err := checkLoopback(c.Admin.Address); err != nil {
			add("admin.address: %v", err)
		}
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		add("log.level: got %q, want debug, info, warn or error", c.Log.Level)
	}
	switch c.Log.Format {
	case "json", "text":
	default:
		add("log.format: got %q, want json or text", c.Log.Format)
	}
	if len(p) > 0 {
		return p
	}
	return nil
}

// checkLoopback accepts host:port where host is a loopback IP or
// "localhost": the admin endpoint has no authentication.
func checkLoopback(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port: %v", addr, err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("%q: port %q is not a number 0..65535", addr, port)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("got %q, want a loopback address such as 127.0.0.1:9464 or [::1]:9464 (the endpoint has no authentication)", addr)
	}
	return nil
}

// credentialsPrefixes start a path inside systemd's credentials directory
// (LoadCredential= in the unit), e.g. "${CREDENTIALS_DIRECTORY}/pkcs11.pin".
var credentialsPrefixes = []string{"${CREDENTIALS_DIRECTORY}/", "$CREDENTIALS_DIRECTORY/"}

// ResolvePath expands a leading $CREDENTIALS_DIRECTORY (set by systemd for
// a unit with LoadCredential=); other paths are returned as they are.
func ResolvePath(path string) (string, error) {
	for _, p := range credentialsPrefixes {
		if rest, ok := strings.CutPrefix(path, p); ok {
			dir := os.Getenv("CREDENTIALS_DIRECTORY")
			if dir == "" {
				return "", fmt.Errorf("%s: CREDENTIALS_DIRECTORY is not set (LoadCredential= in the systemd unit sets it)", path)
			}
			return filepath.Join(dir, rest), nil
		}
	}
	return path, nil
}

// ReadPIN reads a PIN file. It refuses a file that others can read, and
// never includes the PIN in an error. A path starting with
// ${CREDENTIALS_DIRECTORY}/ is read from systemd's credentials directory.
func ReadPIN(path string) (string, error) {
	path, err := ResolvePath(path)
	if err != nil {
		return "", fmt.Errorf("pin file: %w", err)
	}
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("pin file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("pin file: %w", err)
	}
	if st.Mode().Perm()&0o007 != 0 {
		return "", fmt.Errorf("pin file %s: mode %v lets other users read it; chmod o-rwx it", path, st.Mode().Perm())
	}
	b, err := io.ReadAll(io.LimitReader(f, 1024))
	if err != nil {
		return "", fmt.Errorf("pin file: %w", err)
	}
	pin := strings.TrimRight(string(b), "\r\n")
	if pin == "" {
		return "", fmt.Errorf("pin file %s is empty", path)
	}
	return pin, nil
}

// Roles.
const (
	RoleSigner = "signer"
	RoleAdmin  = "admin"
)

// DefaultTenant is the tenant served when the file declares none: the
// daemon's own user, with both roles.
const DefaultTenant = "default"

// EffectiveTenants returns the configured tenants, or when there are none,
// the implicit tenant "default" for callers with the daemon's own uid.
func (c Config) EffectiveTenants() []Tenant {
	if len(c.Tenants) > 0 {
		return c.Tenants
	}
	return []Tenant{{
		Name:       DefaultTenant,
		Identities: Identities{UIDs: []uint32{uint32(os.Getuid())}},
		Roles:      []string{RoleSigner, RoleAdmin},
	}}
}

// AuditPath is where the audit log goes.
func (c Config) AuditPath() string {
	if c.Audit.Path != "" {
		return c.Audit.Path
	}
	return filepath.Join(c.StateDir, "audit.jsonl")
}

// Rules are the tenants' identities for authn.NewResolver.
func (c Config) Rules() []authn.Rule {
	var rules []authn.Rule
	for _, t := range c.EffectiveTenants() {
		rules = append(rules, authn.Rule{Tenant: t.Name, UIDs: t.Identities.UIDs, GIDs: t.Identities.GIDs,
			SPIFFEIDs: t.Identities.SPIFFEIDs, DNSNames: t.Identities.DNSNames, CommonNames: t.Identities.CommonNames})
	}
	return rules
}

func (c Config) validateTenants() Problems {
	var p Problems
	add := func(format string, args ...any) { p = append(p, fmt.Sprintf(format, args...)) }
	labels := map[string]string{}
	for i, t := range c.Tenants {
		where := fmt.Sprintf("tenants[%d]", i)
		if t.Name != "" {
			where = fmt.Sprintf("tenants[%d] (%s)", i, t.Name)
		}
		if err := kms.ValidateName(t.Name); err != nil {
			add("%s.name: %v", where, strings.TrimPrefix(err.Error(), "invalid name: "))
		}
		id := t.Identities
		if len(id.UIDs)+len(id.GIDs)+len(id.SPIFFEIDs)+len(id.DNSNames)+len(id.CommonNames) == 0 {
			add("%s.identities: none, so no caller could use it", where)
		}
		if len(t.Roles) == 0 {
			add("%s.roles: none; want signer and/or admin", where)
		}
		for _, r := range t.Roles {
			if r != RoleSigner && r != RoleAdmin {
				add("%s.roles: %q, want signer or admin", where, r)
			}
		}
		q := t.Quota
		if q.SignsPerSecond < 0 || q.Burst < 0 || q.MaxKeys < 0 {
			add("%s.quota: values must not be negative", where)
		}
		if q.SignsPerSecond > 0 && q.Burst < 1 {
			add("%s.quota.burst: got %d, want at least 1 when signs_per_second is set", where, q.Burst)
		}
		if tok := t.PKCS11; tok != nil {
			if tok.TokenLabel == "" || tok.PINFile == "" {
				add("%s.pkcs11: token_label and pin_file must both be set", where)
			}
			if tok.TokenLabel == c.PKCS11.TokenLabel {
				add("%s.pkcs11.token_label: %q is the shared token; leave pkcs11 out to use it", where, tok.TokenLabel)
			} else if other, ok := labels[tok.TokenLabel]; ok && tok.TokenLabel != "" {
				add("%s.pkcs11.token_label: %q is also %s's token", where, tok.TokenLabel, other)
			}
			labels[tok.TokenLabel] = t.Name
		}
	}
	if _, err := authn.NewResolver(c.Rules()); err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			add("tenants: %s", line)
		}
	}
	return p
}

// ReloadCheck compares the running configuration c with next, a valid
// configuration read on SIGHUP. Tenants (identities, roles, quotas,
// publish_jwks), the log level, the health probe interval and jwks.max_age
// apply live (the daemon also re-reads the jwks certificate files from
// their paths at start). problems are changes
// that cannot: a tenant's own PKCS#11 token added, changed or dropped
// (its keys would go to another token than the one they are on). restart
// names the fields that changed but take effect only at the next start.
func (c Config) ReloadCheck(next Config) (problems Problems, restart []string) {
	tokens := map[string]*TenantToken{}
	for _, t := range c.Tenants {
		tokens[t.Name] = t.PKCS11
	}
	for i, t := range next.Tenants {
		old, existed := tokens[t.Name]
		switch {
		case !existed && t.PKCS11 == nil:
		case !existed:
			problems = append(problems, fmt.Sprintf("tenants[%d] (%s).pkcs11: a new tenant with its own token needs a restart", i, t.Name))
		case old == nil && t.PKCS11 == nil:
		case old == nil || t.PKCS11 == nil || *old != *t.PKCS11:
			problems = append(problems, fmt.Sprintf("tenants[%d] (%s).pkcs11: changing a tenant's own token needs a restart", i, t.Name))
		}
	}
	fixed := []struct {
		name    string
		changed bool
	}{
		{"socket", c.Socket != next.Socket},
		{"state_dir", c.StateDir != next.StateDir},
		{"backend", c.Backend != next.Backend},
		{"pkcs11", c.PKCS11 != next.PKCS11},
		{"tpm", c.TPM != next.TPM},
		{"tcp", c.TCP != next.TCP},
		{"audit", c.Audit != next.Audit},
		{"rotation", c.Rotation != next.Rotation},
		{"limits", c.Limits != next.Limits},
		{"log.format", c.Log.Format != next.Log.Format},
		{"admin", c.Admin != next.Admin},
		{"store", !reflect.DeepEqual(c.Store, next.Store)},
		{"jwks.address", c.JWKS.Address != next.JWKS.Address},
		{"jwks.cert_file", c.JWKS.CertFile != next.JWKS.CertFile},
		{"jwks.key_file", c.JWKS.KeyFile != next.JWKS.KeyFile},
		{"hooks", !reflect.DeepEqual(c.Hooks, next.Hooks)},
	}
	for _, f := range fixed {
		if f.changed {
			restart = append(restart, f.name)
		}
	}
	return problems, restart
}

func (c Config) validateJWKS() Problems {
	var p Problems
	add := func(format string, args ...any) { p = append(p, fmt.Sprintf(format, args...)) }
	j := c.JWKS
	if j.Address != "" {
		if err := checkHostPort(j.Address); err != nil {
			add("jwks.address: %v", err)
		} else if j.Address == c.TCP.Address || j.Address == c.Admin.Address {
			add("jwks.address: %q is also the tcp or admin listener's address", j.Address)
		}
		if j.CertFile == "" || j.KeyFile == "" {
			add("jwks: address is set, so cert_file and key_file must be too")
		}
	}
	if j.MaxAge < 0 || j.MaxAge > MaxJWKSMaxAge {
		add("jwks.max_age: got %v, want 0s..%v", j.MaxAge, MaxJWKSMaxAge)
	}
	if j.Address == "" {
		for i, t := range c.Tenants {
			if t.PublishJWKS {
				add("tenants[%d] (%s).publish_jwks: set, but jwks.address is empty, so nothing would serve it", i, t.Name)
			}
		}
	}
	return p
}

// checkHostPort accepts host:port with a numeric port (the host may be
// empty: every interface).
func checkHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port: %v", addr, err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("%q: port %q is not a number 0..65535", addr, port)
	}
	return nil
}

func (c Config) validateStore() Problems {
	var p Problems
	add := func(format string, args ...any) { p = append(p, fmt.Sprintf(format, args...)) }
	s := c.Store
	switch s.Backend {
	case "bbolt":
		if len(s.Endpoints) > 0 {
			add("store.endpoints: set, but store.backend is bbolt (set backend: etcd to use them)")
		}
		return p
	case "etcd":
	default:
		add("store.backend: got %q, want bbolt or etcd", s.Backend)
		return p
	}
	if c.Backend == "tpm" {
		add("store.backend: etcd shares keys between hosts, and a TPM key cannot be used from another host; " +
			"with backend tpm run one keybrokerd per host with store.backend bbolt")
	}
	if len(s.Endpoints) == 0 {
		add("store.endpoints: backend etcd needs at least one endpoint")
	}
	for i, e := range s.Endpoints {
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			add("store.endpoints[%d]: %q, want http://HOST:PORT or https://HOST:PORT", i, e)
		}
	}
	if !strings.HasPrefix(s.Prefix, "/") || !strings.HasSuffix(s.Prefix, "/") || len(s.Prefix) < 2 {
		add("store.prefix: %q must start and end with / and not be / alone", s.Prefix)
	}
	if s.DialTimeout <= 0 || s.RequestTimeout <= 0 {
		add("store.dial_timeout and store.request_timeout: must be > 0")
	}
	if s.LeaseTTL < 2*time.Second || s.LeaseTTL > 5*time.Minute || s.LeaseTTL%time.Second != 0 {
		add("store.lease_ttl: got %v, want whole seconds in 2s..5m", s.LeaseTTL)
	}
	if s.MaxStaleness < time.Second || s.MaxStaleness > 10*time.Minute {
		add("store.max_staleness: got %v, want 1s..10m", s.MaxStaleness)
	}
	if s.Replica != "" && kms.ValidateName(s.Replica) != nil {
		add("store.replica: %q, want ^[a-z0-9][a-z0-9._-]{0,62}$", s.Replica)
	}
	t := s.TLS
	if (t.CertFile == "") != (t.KeyFile == "") {
		add("store.tls: cert_file and key_file go together")
	}
	return p
}

func (c Config) validateHooks() Problems {
	var p Problems
	add := func(format string, args ...any) { p = append(p, fmt.Sprintf(format, args...)) }
	if len(c.Hooks) > MaxHooks {
		add("hooks: got %d, want at most %d", len(c.Hooks), MaxHooks)
	}
	for i, h := range c.Hooks {
		where := fmt.Sprintf("hooks[%d]", i)
		switch {
		case h.Exec == "":
			add("%s.exec: missing; want the absolute path of a program", where)
		case !filepath.IsAbs(h.Exec) || filepath.Clean(h.Exec) != h.Exec:
			// Not looked up in PATH, nor relative to a working directory
			// that systemd chooses.
			add("%s.exec: got %q, want an absolute, clean path", where, h.Exec)
		}
		if len(h.On) == 0 {
			add("%s.on: none; want some of %s", where, strings.Join(HookEvents, ", "))
		}
		for j, e := range h.On {
			if !slices.Contains(HookEvents, e) {
				add("%s.on[%d]: got %q, want one of %s", where, j, e, strings.Join(HookEvents, ", "))
			}
		}
		if h.Timeout != 0 && (h.Timeout < MinHookTimeout || h.Timeout > MaxHookTimeout) {
			add("%s.timeout: got %v, want %v..%v (unset: %v)", where, h.Timeout, MinHookTimeout, MaxHookTimeout, DefaultHookTimeout)
		}
	}
	return p
}
