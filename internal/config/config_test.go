package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestDefaultValidates(t *testing.T) {
	if err := Default().Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
}

func TestParseEmptyIsDefault(t *testing.T) {
	for _, in := range []string{"", "# nothing\n", "---\n"} {
		got, err := Parse(strings.NewReader(in))
		if err != nil {
			t.Fatalf("Parse(%q): %v", in, err)
		}
		if !reflect.DeepEqual(got, Default()) {
			t.Errorf("Parse(%q) = %+v, want Default()", in, got)
		}
	}
}

const fullYAML = `
socket: /run/kb/test.sock
state_dir: /srv/kb
backend: pkcs11
pkcs11:
  module: /opt/hsm/lib/libvendor.so
  token_label: prod-signing
  pin_file: /etc/kb/pin
  softhsm2_conf: /etc/softhsm2.conf
  max_sessions: 32
  pool_wait_timeout: 750ms
tpm:
  device: /dev/tpm0
  socket: /run/swtpm.sock
  address: 127.0.0.1:2321
  timeout: 3s
tenants:
  - name: payments
    identities:
      uids: [1001]
      gids: [2001]
      spiffe_ids: ["spiffe://example.org/payments"]
      dns_names: [payments.internal]
      common_names: [payments]
    roles: [signer, admin]
    quota:
      signs_per_second: 100
      burst: 200
      max_keys: 50
    pkcs11:
      token_label: payments
      pin_file: /etc/kb/payments.pin
    publish_jwks: true
tcp:
  address: 127.0.0.1:8443
  cert_file: /etc/kb/tls.crt
  key_file: /etc/kb/tls.key
  client_ca_file: /etc/kb/clients.crt
audit:
  path: /var/log/kb/audit.jsonl
  write_timeout: 2s
  sync: interval
  sync_interval: 20ms
rotation:
  check_interval: 30s
limits:
  max_recv_msg_size: 131072
  max_concurrent_streams: 64
  call_timeout: 1m30s
  shutdown_timeout: 2s
log:
  level: debug
  format: text
health:
  probe_interval: 2s
  probe_timeout: 1s
admin:
  address: 127.0.0.1:9464
store:
  backend: etcd
  endpoints: [https://10.0.0.1:2379, https://10.0.0.2:2379]
  prefix: /kb/prod/
  dial_timeout: 3s
  request_timeout: 4s
  tls: {ca_file: /etc/kb/etcd-ca.crt, cert_file: /etc/kb/etcd.crt, key_file: /etc/kb/etcd.key}
  replica: kb-1
  lease_ttl: 15s
  max_staleness: 20s
jwks:
  address: 0.0.0.0:443
  cert_file: /etc/kb/jwks.crt
  key_file: /etc/kb/jwks.key
  max_age: 10m
hooks:
  - on: [pending, active]
    exec: /usr/local/bin/push-jwk
    args: [--app, demo]
    timeout: 20s
`

func TestParseFull(t *testing.T) {
	got, err := Parse(strings.NewReader(fullYAML))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := Config{
		Socket:   "/run/kb/test.sock",
		StateDir: "/srv/kb",
		Backend:  "pkcs11",
		PKCS11: PKCS11{
			Module:          "/opt/hsm/lib/libvendor.so",
			TokenLabel:      "prod-signing",
			PINFile:         "/etc/kb/pin",
			SoftHSM2Conf:    "/etc/softhsm2.conf",
			MaxSessions:     32,
			PoolWaitTimeout: 750 * time.Millisecond,
		},
		TPM: TPM{Device: "/dev/tpm0", Socket: "/run/swtpm.sock", Address: "127.0.0.1:2321", Timeout: 3 * time.Second},
		Tenants: []Tenant{{
			Name: "payments",
			Identities: Identities{UIDs: []uint32{1001}, GIDs: []uint32{2001}, SPIFFEIDs: []string{"spiffe://example.org/payments"},
				DNSNames: []string{"payments.internal"}, CommonNames: []string{"payments"}},
			Roles:       []string{"signer", "admin"},
			Quota:       Quota{SignsPerSecond: 100, Burst: 200, MaxKeys: 50},
			PKCS11:      &TenantToken{TokenLabel: "payments", PINFile: "/etc/kb/payments.pin"},
			PublishJWKS: true,
		}},
		TCP:      TCP{Address: "127.0.0.1:8443", CertFile: "/etc/kb/tls.crt", KeyFile: "/etc/kb/tls.key", ClientCAFile: "/etc/kb/clients.crt"},
		Audit:    Audit{Path: "/var/log/kb/audit.jsonl", WriteTimeout: 2 * time.Second, Sync: "interval", SyncInterval: 20 * time.Millisecond},
		Rotation: Rotation{CheckInterval: 30 * time.Second},
		Limits: Limits{
			MaxRecvMsgSize:       131072,
			MaxConcurrentStreams: 64,
			CallTimeout:          90 * time.Second,
			ShutdownTimeout:      2 * time.Second,
		},
		Log:    Log{Level: "debug", Format: "text"},
		Health: Health{ProbeInterval: 2 * time.Second, ProbeTimeout: time.Second},
		Admin:  Admin{Address: "127.0.0.1:9464"},
		Store: Store{Backend: "etcd", Endpoints: []string{"https://10.0.0.1:2379", "https://10.0.0.2:2379"}, Prefix: "/kb/prod/",
			DialTimeout: 3 * time.Second, RequestTimeout: 4 * time.Second,
			TLS:     StoreTLS{CAFile: "/etc/kb/etcd-ca.crt", CertFile: "/etc/kb/etcd.crt", KeyFile: "/etc/kb/etcd.key"},
			Replica: "kb-1", LeaseTTL: 15 * time.Second, MaxStaleness: 20 * time.Second},
		JWKS:  JWKS{Address: "0.0.0.0:443", CertFile: "/etc/kb/jwks.crt", KeyFile: "/etc/kb/jwks.key", MaxAge: 10 * time.Minute},
		Hooks: []Hook{{On: []string{"pending", "active"}, Exec: "/usr/local/bin/push-jwk", Args: []string{"--app", "demo"}, Timeout: 20 * time.Second}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Parse:\n got %+v\nwant %+v", got, want)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	// Every field but Backend (pkcs11 is the only one) differs from the
	// default, so none was left unset.
	got.Backend = "other"
	checkAllDiffer(t, reflect.ValueOf(got), reflect.ValueOf(Default()), "Config")
}

// checkAllDiffer fails for every leaf field of a that equals the one in b.
func checkAllDiffer(t *testing.T, a, b reflect.Value, path string) {
	t.Helper()
	if a.Kind() == reflect.Struct {
		for i := 0; i < a.NumField(); i++ {
			checkAllDiffer(t, a.Field(i), b.Field(i), path+"."+a.Type().Field(i).Name)
		}
		return
	}
	if reflect.DeepEqual(a.Interface(), b.Interface()) {
		t.Errorf("%s = %v, the default; the full YAML should set it", path, a.Interface())
	}
}

func TestParsePartialKeepsDefaults(t *testing.T) {
	got, err := Parse(strings.NewReader("pkcs11:\n  max_sessions: 4\nlog:\n  level: warn\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.PKCS11.MaxSessions = 4
	want.Log.Level = "warn"
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []string
	}{
		{"unknown top-level", "socket: /s\nsokcet: /t\n", []string{"sokcet"}},
		{"unknown nested", "pkcs11:\n  pin: 1234\n", []string{"pin"}},
		{"unknown in limits", "limits:\n  max_streams: 3\n", []string{"max_streams"}},
		{"bad duration", "limits:\n  call_timeout: soon\n", []string{"soon"}},
		{"bad int", "pkcs11:\n  max_sessions: many\n", []string{"many"}},
		{"negative uint", "limits:\n  max_concurrent_streams: -1\n", []string{"-1"}},
		{"not a mapping", "- a\n- b\n", nil},
		{"syntax", "socket: [\n", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(strings.NewReader(tc.in))
			if err == nil {
				t.Fatalf("Parse(%q) = %+v, nil; want an error", tc.in, got)
			}
			if !strings.HasPrefix(err.Error(), "config: ") {
				t.Errorf("error %q does not start with %q", err, "config: ")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
			if !reflect.DeepEqual(got, Config{}) {
				t.Errorf("Parse returned %+v with the error, want the zero Config", got)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keybroker.yaml")
	if err := os.WriteFile(path, []byte("log:\n  format: text\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.Log.Format != "text" || got.Socket != Default().Socket {
		t.Errorf("Load = %+v", got)
	}
	_, err = Load(filepath.Join(t.TempDir(), "missing.yaml"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load of a missing file: got %v, want fs.ErrNotExist", err)
	}
}

func problems(t *testing.T, c Config) Problems {
	t.Helper()
	err := c.Validate()
	if err == nil {
		return nil
	}
	var p Problems
	if !errors.As(err, &p) {
		t.Fatalf("Validate returned %T, want Problems", err)
	}
	return p
}

func TestValidateListsEveryProblem(t *testing.T) {
	c := Default()
	c.Socket = ""
	c.StateDir = ""
	c.PKCS11.Module = "lib/softhsm2.so"
	c.PKCS11.TokenLabel = strings.Repeat("t", 33)
	c.PKCS11.PINFile = ""
	c.PKCS11.MaxSessions = 1
	c.PKCS11.PoolWaitTimeout = 0
	c.Limits.MaxRecvMsgSize = 100
	c.Limits.MaxConcurrentStreams = 0
	c.Limits.CallTimeout = -time.Second
	c.Limits.ShutdownTimeout = 0
	c.Log.Level = "loud"
	c.Log.Format = "xml"

	p := problems(t, c)
	want := []string{
		"socket: must be set",
		"state_dir: must be set",
		`pkcs11.module: "lib/softhsm2.so" must be an absolute path`,
		"pkcs11.token_label:",
		"pkcs11.pin_file: must be set",
		"pkcs11.max_sessions: got 1",
		"pkcs11.pool_wait_timeout: got 0s",
		"limits.max_recv_msg_size: got 100",
		"limits.max_concurrent_streams: must be > 0",
		"limits.call_timeout: got -1s",
		"limits.shutdown_timeout: got 0s",
		`log.level: got "loud"`,
		`log.format: got "xml"`,
	}
	if len(p) != len(want) {
		t.Errorf("got %d problems, want %d:\n%v", len(p), len(want), p)
	}
	msg := p.Error()
	for _, w := range want {
		n := 0
		for _, q := range p {
			if strings.HasPrefix(q, w) {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%d problems start with %q, want 1", n, w)
		}
		if !strings.Contains(msg, "\n  - "+w) {
			t.Errorf("Error() does not list %q:\n%s", w, msg)
		}
	}
	if !strings.HasPrefix(msg, "invalid configuration:\n  - ") {
		t.Errorf("Error() = %q", msg)
	}
}

func TestValidateSingleProblems(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want string // "" means valid
	}{
		{"relative module", func(c *Config) { c.PKCS11.Module = "libsofthsm2.so" }, `pkcs11.module: "libsofthsm2.so" must be an absolute path`},
		{"dot-relative module", func(c *Config) { c.PKCS11.Module = "./x.so" }, "pkcs11.module:"},
		{"empty module", func(c *Config) { c.PKCS11.Module = "" }, "pkcs11.module: must be set"},
		{"socket 107 bytes", func(c *Config) { c.Socket = "/" + strings.Repeat("s", 106) }, ""},
		{"socket 108 bytes", func(c *Config) { c.Socket = "/" + strings.Repeat("s", 107) }, "socket: "},
		{"socket 300 bytes", func(c *Config) { c.Socket = "/" + strings.Repeat("s", 299) }, `socket: "/sss`},
		{"token label 32", func(c *Config) { c.PKCS11.TokenLabel = strings.Repeat("l", 32) }, ""},
		{"token label 33", func(c *Config) { c.PKCS11.TokenLabel = strings.Repeat("l", 33) }, "pkcs11.token_label:"},
		{"token label empty", func(c *Config) { c.PKCS11.TokenLabel = "" }, "pkcs11.token_label: must be set"},
		{"max sessions 2", func(c *Config) { c.PKCS11.MaxSessions = 2 }, ""},
		{"max sessions 1024", func(c *Config) { c.PKCS11.MaxSessions = 1024 }, ""},
		{"max sessions 1025", func(c *Config) { c.PKCS11.MaxSessions = 1025 }, "pkcs11.max_sessions: got 1025, want 2..1024"},
		{"recv 1024", func(c *Config) { c.Limits.MaxRecvMsgSize = 1024 }, ""},
		{"recv 16MiB", func(c *Config) { c.Limits.MaxRecvMsgSize = 16 << 20 }, ""},
		{"recv 16MiB+1", func(c *Config) { c.Limits.MaxRecvMsgSize = 16<<20 + 1 }, "limits.max_recv_msg_size:"},
		{"other backend", func(c *Config) { c.Backend = "hsm2" }, `backend: got "hsm2", want pkcs11 or tpm`},
		{"tpm backend", func(c *Config) { c.Backend = "tpm" }, ""},
		{"tpm two transports", func(c *Config) { c.Backend, c.TPM.Socket = "tpm", "/run/swtpm.sock" }, "tpm: set exactly one of device, socket and address (got 2)"},
		{"tpm no transport", func(c *Config) { c.Backend, c.TPM.Device = "tpm", "" }, "tpm: set exactly one of device, socket and address (got 0)"},
		{"tpm timeout", func(c *Config) { c.Backend, c.TPM.Timeout = "tpm", 0 }, "tpm.timeout:"},
		{"hook ok", func(c *Config) {
			c.Hooks = []Hook{{On: []string{"pending", "active"}, Exec: "/usr/local/bin/push", Timeout: 30 * time.Second}}
		}, ""},
		{"hook default timeout", func(c *Config) { c.Hooks = []Hook{{On: []string{"revoked"}, Exec: "/bin/true"}} }, ""},
		{"hook relative exec", func(c *Config) { c.Hooks = []Hook{{On: []string{"pending"}, Exec: "push.sh"}} }, `hooks[0].exec: got "push.sh", want an absolute, clean path`},
		{"hook unclean exec", func(c *Config) { c.Hooks = []Hook{{On: []string{"pending"}, Exec: "/usr/../bin/x"}} }, "hooks[0].exec: got"},
		{"hook no exec", func(c *Config) { c.Hooks = []Hook{{On: []string{"pending"}}} }, "hooks[0].exec: missing"},
		{"hook no events", func(c *Config) { c.Hooks = []Hook{{Exec: "/bin/true"}} }, "hooks[0].on: none"},
		{"hook unknown event", func(c *Config) {
			c.Hooks = []Hook{{On: []string{"active"}, Exec: "/bin/true"}, {On: []string{"pending", "rotated"}, Exec: "/bin/true"}}
		}, `hooks[1].on[1]: got "rotated", want one of pending, active`},
		{"hook timeout short", func(c *Config) {
			c.Hooks = []Hook{{On: []string{"pending"}, Exec: "/bin/true", Timeout: time.Millisecond}}
		}, "hooks[0].timeout: got 1ms, want 1s..10m0s"},
		{"hook timeout long", func(c *Config) { c.Hooks = []Hook{{On: []string{"pending"}, Exec: "/bin/true", Timeout: time.Hour}} }, "hooks[0].timeout: got 1h0m0s"},
		{"tpm with a tenant token", func(c *Config) {
			c.Backend = "tpm"
			c.Tenants = []Tenant{{Name: "a", Identities: Identities{UIDs: []uint32{7}}, Roles: []string{RoleSigner}, PKCS11: &TenantToken{TokenLabel: "x", PINFile: "/p"}}}
		}, "tenants[0] (a).pkcs11: an own PKCS#11 token needs backend pkcs11"},
		{"level warn", func(c *Config) { c.Log.Level = "warn" }, ""},
		{"probe 100ms", func(c *Config) { c.Health.ProbeInterval = 100 * time.Millisecond }, ""},
		{"probe 99ms", func(c *Config) { c.Health.ProbeInterval = 99 * time.Millisecond }, "health.probe_interval: got 99ms, want 100ms..1h"},
		{"probe 2h", func(c *Config) { c.Health.ProbeInterval = 2 * time.Hour }, "health.probe_interval:"},
		{"admin v4 loopback", func(c *Config) { c.Admin.Address = "127.0.0.1:9464" }, ""},
		{"admin 127/8", func(c *Config) { c.Admin.Address = "127.0.0.2:9464" }, ""},
		{"admin v6 loopback", func(c *Config) { c.Admin.Address = "[::1]:0" }, ""},
		{"admin localhost", func(c *Config) { c.Admin.Address = "localhost:9464" }, ""},
		{"admin all interfaces", func(c *Config) { c.Admin.Address = ":9464" }, `admin.address: got ":9464", want a loopback address`},
		{"admin 0.0.0.0", func(c *Config) { c.Admin.Address = "0.0.0.0:9464" }, "admin.address: got"},
		{"admin public", func(c *Config) { c.Admin.Address = "10.1.2.3:9464" }, "admin.address: got"},
		{"admin hostname", func(c *Config) { c.Admin.Address = "example.org:9464" }, "admin.address: got"},
		{"admin no port", func(c *Config) { c.Admin.Address = "127.0.0.1" }, "admin.address: \"127.0.0.1\" is not host:port"},
		{"admin bad port", func(c *Config) { c.Admin.Address = "127.0.0.1:http" }, "admin.address: \"127.0.0.1:http\": port"},
		{"level upper", func(c *Config) { c.Log.Level = "INFO" }, "log.level:"},
		{"jwks", func(c *Config) { c.JWKS = JWKS{Address: ":8443", CertFile: "/c", KeyFile: "/k", MaxAge: time.Hour} }, ""},
		{"jwks max_age 0", func(c *Config) { c.JWKS.MaxAge = 0 }, ""},
		{"jwks max_age 7d", func(c *Config) { c.JWKS.MaxAge = MaxJWKSMaxAge }, ""},
		{"jwks max_age 7d+1s", func(c *Config) { c.JWKS.MaxAge = MaxJWKSMaxAge + time.Second }, "jwks.max_age: got 168h0m1s, want 0s..168h0m0s"},
		{"jwks max_age negative", func(c *Config) { c.JWKS.MaxAge = -time.Second }, "jwks.max_age: got -1s"},
		{"jwks no cert", func(c *Config) { c.JWKS = JWKS{Address: ":8443", KeyFile: "/k", MaxAge: time.Hour} }, "jwks: address is set, so cert_file and key_file"},
		{"jwks no key", func(c *Config) { c.JWKS = JWKS{Address: ":8443", CertFile: "/c", MaxAge: time.Hour} }, "jwks: address is set, so cert_file and key_file"},
		{"jwks no port", func(c *Config) { c.JWKS = JWKS{Address: "127.0.0.1", CertFile: "/c", KeyFile: "/k"} }, `jwks.address: "127.0.0.1" is not host:port`},
		{"jwks bad port", func(c *Config) { c.JWKS = JWKS{Address: "127.0.0.1:https", CertFile: "/c", KeyFile: "/k"} }, `jwks.address: "127.0.0.1:https": port`},
		{"jwks on the tcp listener", func(c *Config) {
			c.TCP = TCP{Address: "127.0.0.1:8443", CertFile: "/c", KeyFile: "/k", ClientCAFile: "/ca"}
			c.JWKS = JWKS{Address: "127.0.0.1:8443", CertFile: "/c", KeyFile: "/k"}
		}, `jwks.address: "127.0.0.1:8443" is also the tcp or admin listener's address`},
		{"publish_jwks without a listener", func(c *Config) {
			c.Tenants = []Tenant{{Name: "a", Identities: Identities{UIDs: []uint32{7}}, Roles: []string{RoleSigner}, PublishJWKS: true}}
		}, "tenants[0] (a).publish_jwks: set, but jwks.address is empty"},
		{"publish_jwks with a listener", func(c *Config) {
			c.Tenants = []Tenant{{Name: "a", Identities: Identities{UIDs: []uint32{7}}, Roles: []string{RoleSigner}, PublishJWKS: true}}
			c.JWKS = JWKS{Address: "127.0.0.1:8443", CertFile: "/c", KeyFile: "/k"}
		}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			tc.edit(&c)
			p := problems(t, c)
			if tc.want == "" {
				if p != nil {
					t.Fatalf("Validate = %v, want nil", p)
				}
				return
			}
			if len(p) != 1 || !strings.HasPrefix(p[0], tc.want) {
				t.Fatalf("Validate = %q, want one problem starting %q", []string(p), tc.want)
			}
		})
	}
}

// TestValidateOtherBackendSkipsPKCS11: pkcs11 settings are not checked when
// another backend is chosen, so the only problem is the backend.
func TestValidateOtherBackendSkipsPKCS11(t *testing.T) {
	c := Default()
	c.Backend = ""
	c.PKCS11 = PKCS11{}
	p := problems(t, c)
	if len(p) != 1 || !strings.HasPrefix(p[0], "backend:") {
		t.Errorf("Validate = %q, want only the backend problem", []string(p))
	}
}

const testPIN = "s3cr3t-Pin-9876"

func writePIN(t *testing.T, content string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	// Chmod explicitly: WriteFile's mode is subject to the umask.
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestReadPIN(t *testing.T) {
	for _, tc := range []struct {
		name    string
		content string
		mode    os.FileMode
	}{
		{"newline", testPIN + "\n", 0o600},
		{"crlf", testPIN + "\r\n", 0o600},
		{"several newlines", testPIN + "\n\n", 0o400},
		{"no newline", testPIN, 0o600},
		{"group readable", testPIN + "\n", 0o640},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ReadPIN(writePIN(t, tc.content, tc.mode))
			if err != nil {
				t.Fatalf("ReadPIN: %v", err)
			}
			if got != testPIN {
				t.Errorf("ReadPIN = %q, want %q", got, testPIN)
			}
		})
	}
	// Only trailing line ends are dropped; the rest of the PIN is kept as is.
	got, err := ReadPIN(writePIN(t, " a b\n", 0o600))
	if err != nil || got != " a b" {
		t.Errorf("ReadPIN = %q, %v; want %q", got, err, " a b")
	}
}

func TestReadPINRefusesOthersAccess(t *testing.T) {
	for _, mode := range []os.FileMode{0o644, 0o604, 0o602, 0o601, 0o666} {
		path := writePIN(t, testPIN+"\n", mode)
		got, err := ReadPIN(path)
		if err == nil {
			t.Errorf("mode %v: ReadPIN = %q, nil; want an error", mode, got)
			continue
		}
		if got != "" {
			t.Errorf("mode %v: ReadPIN returned %q with the error", mode, got)
		}
		if strings.Contains(err.Error(), testPIN) || strings.Contains(err.Error(), "9876") {
			t.Errorf("mode %v: error contains the PIN: %q", mode, err)
		}
		if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "other users") {
			t.Errorf("mode %v: error %q should name the file and the problem", mode, err)
		}
	}
}

func TestReadPINErrors(t *testing.T) {
	for _, content := range []string{"", "\n", "\r\n\n"} {
		path := writePIN(t, content, 0o600)
		_, err := ReadPIN(path)
		if err == nil || !strings.Contains(err.Error(), "empty") || !strings.Contains(err.Error(), path) {
			t.Errorf("ReadPIN(%q content) = %v, want an error saying %s is empty", content, err, path)
		}
	}
	missing := filepath.Join(t.TempDir(), "nope")
	_, err := ReadPIN(missing)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ReadPIN(missing) = %v, want fs.ErrNotExist", err)
	}
	if err != nil && !strings.HasPrefix(err.Error(), "pin file: ") {
		t.Errorf("ReadPIN(missing) = %q, want a %q prefix", err, "pin file: ")
	}
}

func TestValidateTenants(t *testing.T) {
	base := Default()
	good := Tenant{Name: "app", Identities: Identities{UIDs: []uint32{1000}}, Roles: []string{RoleSigner}}
	cases := []struct {
		name    string
		edit    func(c *Config)
		problem string
	}{
		{"bad name", func(c *Config) { t := good; t.Name = "App/1"; c.Tenants = []Tenant{t} }, "tenants[0] (App/1).name"},
		{"no identities", func(c *Config) { t := good; t.Identities = Identities{}; c.Tenants = []Tenant{t} }, "identities: none"},
		{"no roles", func(c *Config) { t := good; t.Roles = nil; c.Tenants = []Tenant{t} }, "roles: none"},
		{"unknown role", func(c *Config) { t := good; t.Roles = []string{"root"}; c.Tenants = []Tenant{t} }, `roles: "root"`},
		{"negative quota", func(c *Config) { t := good; t.Quota.MaxKeys = -1; c.Tenants = []Tenant{t} }, "quota: values must not be negative"},
		{"rate without burst", func(c *Config) { t := good; t.Quota.SignsPerSecond = 5; c.Tenants = []Tenant{t} }, "quota.burst"},
		{"half a token", func(c *Config) { t := good; t.PKCS11 = &TenantToken{TokenLabel: "x"}; c.Tenants = []Tenant{t} }, "token_label and pin_file must both be set"},
		{"shared token as own", func(c *Config) {
			t := good
			t.PKCS11 = &TenantToken{TokenLabel: c.PKCS11.TokenLabel, PINFile: "/p"}
			c.Tenants = []Tenant{t}
		}, "is the shared token"},
		{"two tenants one token", func(c *Config) {
			a, b := good, good
			b.Name, b.Identities = "other", Identities{UIDs: []uint32{1001}}
			a.PKCS11, b.PKCS11 = &TenantToken{TokenLabel: "t1", PINFile: "/p"}, &TenantToken{TokenLabel: "t1", PINFile: "/q"}
			c.Tenants = []Tenant{a, b}
		}, `is also app's token`},
		{"uid in two tenants", func(c *Config) {
			b := good
			b.Name = "other"
			c.Tenants = []Tenant{good, b}
		}, "tenants: "},
		{"tcp without files", func(c *Config) { c.TCP.Address = "127.0.0.1:0" }, "tcp: address is set"},
		{"audit timeout", func(c *Config) { c.Audit.WriteTimeout = 0 }, "audit.write_timeout"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := base
			tc.edit(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.problem) {
				t.Errorf("Validate: %v, want a problem containing %q", err, tc.problem)
			}
		})
	}
	c := base
	c.Tenants = []Tenant{good}
	if err := c.Validate(); err != nil {
		t.Errorf("a good tenant: %v", err)
	}
}

func TestEffectiveTenants(t *testing.T) {
	c := Default()
	got := c.EffectiveTenants()
	if len(got) != 1 || got[0].Name != DefaultTenant || len(got[0].Identities.UIDs) != 1 || got[0].Identities.UIDs[0] != uint32(os.Getuid()) ||
		len(got[0].Roles) != 2 {
		t.Errorf("implicit tenants: %+v, want default for uid %d with both roles", got, os.Getuid())
	}
	c.Tenants = []Tenant{{Name: "x"}}
	if got := c.EffectiveTenants(); len(got) != 1 || got[0].Name != "x" {
		t.Errorf("configured tenants not used: %+v", got)
	}
	if c.AuditPath() != filepath.Join(c.StateDir, "audit.jsonl") {
		t.Errorf("default audit path %q", c.AuditPath())
	}
}

func TestReadPINFromCredentialsDirectory(t *testing.T) {
	path := writePIN(t, testPIN+"\n", 0o400)
	t.Setenv("CREDENTIALS_DIRECTORY", filepath.Dir(path))
	for _, p := range []string{"${CREDENTIALS_DIRECTORY}/pin", "$CREDENTIALS_DIRECTORY/pin"} {
		got, err := ReadPIN(p)
		if err != nil || got != testPIN {
			t.Errorf("ReadPIN(%q) = %q, %v; want the PIN", p, got, err)
		}
	}
	t.Setenv("CREDENTIALS_DIRECTORY", "")
	_, err := ReadPIN("${CREDENTIALS_DIRECTORY}/pin")
	if err == nil || !strings.Contains(err.Error(), "CREDENTIALS_DIRECTORY is not set") {
		t.Errorf("ReadPIN without CREDENTIALS_DIRECTORY = %v, want an error naming it", err)
	}
	if got, err := ResolvePath("/etc/x/$CREDENTIALS_DIRECTORY/pin"); err != nil || got != "/etc/x/$CREDENTIALS_DIRECTORY/pin" {
		t.Errorf("ResolvePath changed a path that does not start with the variable: %q, %v", got, err)
	}
}

func TestReloadCheck(t *testing.T) {
	base := Default()
	base.Tenants = []Tenant{
		{Name: "a", Identities: Identities{UIDs: []uint32{1}}, Roles: []string{RoleSigner}},
		{Name: "b", Identities: Identities{UIDs: []uint32{2}}, Roles: []string{RoleSigner}, PKCS11: &TenantToken{TokenLabel: "b", PINFile: "/b.pin"}},
	}
	for _, tc := range []struct {
		name     string
		edit     func(*Config)
		problems []string
		restart  []string
	}{
		{"same", func(c *Config) {}, nil, nil},
		{"live changes", func(c *Config) {
			c.Tenants[0].Roles = []string{RoleAdmin}
			c.Tenants[0].Quota = Quota{SignsPerSecond: 5, Burst: 5, MaxKeys: 3}
			c.Tenants[1].Identities.UIDs = []uint32{3}
			c.Tenants = append(c.Tenants, Tenant{Name: "c", Identities: Identities{UIDs: []uint32{4}}, Roles: []string{RoleSigner}})
			c.Log.Level = "debug"
			c.Health.ProbeInterval = time.Second
		}, nil, nil},
		{"tenant removed", func(c *Config) { c.Tenants = c.Tenants[:1] }, nil, nil},
		{"new tenant with a token", func(c *Config) {
			c.Tenants = append(c.Tenants, Tenant{Name: "c", PKCS11: &TenantToken{TokenLabel: "c", PINFile: "/c.pin"}})
		}, []string{"tenants[2] (c).pkcs11: a new tenant with its own token needs a restart"}, nil},
		{"token changed", func(c *Config) { c.Tenants[1].PKCS11 = &TenantToken{TokenLabel: "b2", PINFile: "/b.pin"} },
			[]string{"tenants[1] (b).pkcs11: changing a tenant's own token needs a restart"}, nil},
		{"token dropped", func(c *Config) { c.Tenants[1].PKCS11 = nil }, []string{"tenants[1] (b).pkcs11: changing"}, nil},
		{"token added", func(c *Config) { c.Tenants[0].PKCS11 = &TenantToken{TokenLabel: "a", PINFile: "/a.pin"} }, []string{"tenants[0] (a).pkcs11: changing"}, nil},
		{"restart fields", func(c *Config) {
			c.Socket = "/x.sock"
			c.PKCS11.MaxSessions = 3
			c.Limits.CallTimeout = time.Second
			c.Log.Format = "text"
			c.Admin.Address = "127.0.0.1:1"
		}, nil, []string{"socket", "pkcs11", "limits", "log.format", "admin"}},
		{"jwks live", func(c *Config) {
			c.Tenants[0].PublishJWKS = true
			c.JWKS.MaxAge = time.Minute
		}, nil, nil},
		{"jwks listener", func(c *Config) {
			c.JWKS = JWKS{Address: ":1", CertFile: "/c", KeyFile: "/k"}
		}, nil, []string{"jwks.address", "jwks.cert_file", "jwks.key_file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			next := base
			next.Tenants = append([]Tenant(nil), base.Tenants...)
			tc.edit(&next)
			problems, restart := base.ReloadCheck(next)
			if len(problems) != len(tc.problems) {
				t.Fatalf("problems = %q, want %q", []string(problems), tc.problems)
			}
			for i := range problems {
				if !strings.HasPrefix(problems[i], tc.problems[i]) {
					t.Errorf("problem %d = %q, want it to start %q", i, problems[i], tc.problems[i])
				}
			}
			if !reflect.DeepEqual(restart, tc.restart) {
				t.Errorf("restart = %q, want %q", restart, tc.restart)
			}
		})
	}
}

// TestTPMDeviceDefaultsOnlyWithoutTransport: tpm.device defaults to
// /dev/tpmrm0 only when the file sets no transport, so tpm.socket or
// tpm.address alone is a valid configuration, and two transports set in
// the file are still refused.
func TestTPMDeviceDefaultsOnlyWithoutTransport(t *testing.T) {
	for _, c := range []struct {
		yaml    string
		want    TPM
		problem string
	}{
		{"backend: tpm\ntpm:\n  socket: /run/swtpm/swtpm.sock\n", TPM{Socket: "/run/swtpm/swtpm.sock"}, ""},
		{"backend: tpm\ntpm:\n  address: 127.0.0.1:2321\n", TPM{Address: "127.0.0.1:2321"}, ""},
		{"backend: tpm\n", TPM{Device: DefaultTPMDevice}, ""},
		{"backend: tpm\ntpm:\n  timeout: 2s\n", TPM{Device: DefaultTPMDevice}, ""},
		{"backend: tpm\ntpm:\n  device: /dev/tpm0\n", TPM{Device: "/dev/tpm0"}, ""},
		{"backend: tpm\ntpm:\n  device: /dev/tpmrm0\n  socket: /run/swtpm/swtpm.sock\n", TPM{Device: "/dev/tpmrm0", Socket: "/run/swtpm/swtpm.sock"}, "(got 2)"},
	} {
		cfg, err := Parse(strings.NewReader(c.yaml))
		if err != nil {
			t.Fatalf("%q: %v", c.yaml, err)
		}
		if got := (TPM{Device: cfg.TPM.Device, Socket: cfg.TPM.Socket, Address: cfg.TPM.Address}); got != c.want {
			t.Errorf("%q: transport %+v, want %+v", c.yaml, got, c.want)
		}
		err = cfg.Validate()
		switch {
		case c.problem == "" && err != nil:
			t.Errorf("%q refused: %v", c.yaml, err)
		case c.problem != "" && (err == nil || !strings.Contains(err.Error(), c.problem)):
			t.Errorf("%q: Validate = %v, want a problem with %q", c.yaml, err, c.problem)
		}
	}
}

// TestValidateStore: the etcd store's settings are checked, and a TPM
// with etcd is refused with the reason.
func TestValidateStore(t *testing.T) {
	etcd := func(c *Config) {
		c.Store.Backend = "etcd"
		c.Store.Endpoints = []string{"http://127.0.0.1:2379"}
	}
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want string // "" for valid
	}{
		{"bbolt default", func(*Config) {}, ""},
		{"etcd", etcd, ""},
		{"unknown backend", func(c *Config) { c.Store.Backend = "redis" }, `store.backend: got "redis"`},
		{"endpoints with bbolt", func(c *Config) { c.Store.Endpoints = []string{"http://x:1"} }, "store.endpoints: set, but store.backend is bbolt"},
		{"no endpoints", func(c *Config) { etcd(c); c.Store.Endpoints = nil }, "store.endpoints: backend etcd needs"},
		{"bad endpoint", func(c *Config) { etcd(c); c.Store.Endpoints = []string{"127.0.0.1:2379"} }, "store.endpoints[0]"},
		{"bad prefix", func(c *Config) { etcd(c); c.Store.Prefix = "kb" }, "store.prefix"},
		{"short lease", func(c *Config) { etcd(c); c.Store.LeaseTTL = time.Second }, "store.lease_ttl"},
		{"fractional lease", func(c *Config) { etcd(c); c.Store.LeaseTTL = 2500 * time.Millisecond }, "store.lease_ttl"},
		{"staleness", func(c *Config) { etcd(c); c.Store.MaxStaleness = 0 }, "store.max_staleness"},
		{"replica", func(c *Config) { etcd(c); c.Store.Replica = "Replica 1" }, "store.replica"},
		{"half tls", func(c *Config) { etcd(c); c.Store.TLS.CertFile = "/x" }, "store.tls"},
		{"audit interval", func(c *Config) { c.Audit.Sync = "interval" }, ""},
		{"audit sync", func(c *Config) { c.Audit.Sync = "sometimes" }, `audit.sync: got "sometimes"`},
		{"audit sync interval", func(c *Config) { c.Audit.Sync, c.Audit.SyncInterval = "interval", 0 }, "audit.sync_interval"},
		{"tpm with etcd", func(c *Config) {
			etcd(c)
			c.Backend = "tpm"
		}, "a TPM key cannot be used from another host"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			tc.edit(&c)
			err := c.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("Validate: %v, want it to say %q", err, tc.want)
			}
		})
	}
}
