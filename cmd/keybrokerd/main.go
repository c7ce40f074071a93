// Command keybrokerd is the keybroker daemon: it keeps signing keys in
// hardware and serves the keybroker.v1 gRPC API on a unix socket. main only
// parses flags and wires the daemon package together.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/keybroker/keybroker/internal/config"
	"github.com/keybroker/keybroker/internal/daemon"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// Exit statuses. The systemd unit lists exitUsage and exitConfig in
// RestartPreventExitStatus=: starting again cannot help, and a refused PIN
// tried again counts against the token's PIN retry counter (tokens lock
// after a few).
const (
	exitFailure = 1  // anything else, possibly transient (hardware unreachable): restarted
	exitUsage   = 2  // unknown flag or argument
	exitConfig  = 78 // EX_CONFIG: invalid configuration, unusable PIN file, a PKCS#11 module that cannot start, or the token refuses the PIN
)

// startFailure is the exit status for an error of daemon.New.
func startFailure(err error) int {
	if errors.Is(err, daemon.ErrConfig) || errors.Is(err, daemon.ErrPINRefused) {
		return exitConfig
	}
	return exitFailure
}

// options are the command-line flags. Flags that are set override the
// configuration file.
type options struct {
	configPath string
	dev        bool
	devDir     string
	fs         *flag.FlagSet
	cfgFlags   config.Config
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{fs: flag.NewFlagSet("keybrokerd", flag.ContinueOnError)}
	fs := o.fs
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: keybrokerd [--config FILE] [flags]\n       keybrokerd --dev [--dev-dir DIR]\n       keybrokerd migrate --from-bbolt FILE --to-config FILE\n\nFlags override the configuration file.\n\n")
		fs.PrintDefaults()
		fmt.Fprintf(stderr, "\nExit status: 0 stopped by SIGTERM or SIGINT; %d usage error; %d configuration refused\n"+
			"(invalid, unusable PIN file, a PKCS#11 module that cannot load or read its own\n"+
			"configuration, or the token refuses the PIN: never retried);\n"+
			"%d any other failure (e.g. hardware unreachable).\n", exitUsage, exitConfig, exitFailure)
	}
	c := &o.cfgFlags
	fs.StringVar(&o.configPath, "config", "", "YAML configuration `file` (default: built-in defaults)")
	fs.BoolVar(&o.dev, "dev", false, "dev mode: provision a SoftHSM2 token under --dev-dir, serve there, create key \"demo\"")
	fs.StringVar(&o.devDir, "dev-dir", ".keybroker/dev", "dev mode `directory`")
	fs.StringVar(&c.Backend, "backend", "", "key `backend`: pkcs11 or tpm")
	fs.StringVar(&c.TPM.Device, "tpm-device", "", "TPM `device`, e.g. /dev/tpmrm0")
	fs.StringVar(&c.TPM.Socket, "tpm-socket", "", "swtpm unix socket `path`")
	fs.StringVar(&c.TPM.Address, "tpm-address", "", "swtpm TCP `host:port`")
	fs.StringVar(&c.Socket, "socket", "", "unix socket `path` to serve on")
	fs.StringVar(&c.StateDir, "state-dir", "", "state `directory` (metadata store)")
	fs.StringVar(&c.PKCS11.Module, "pkcs11-module", "", "PKCS#11 library `path`")
	fs.StringVar(&c.PKCS11.TokenLabel, "token-label", "", "PKCS#11 token `label`")
	fs.StringVar(&c.PKCS11.PINFile, "pin-file", "", "`file` holding the token's user PIN")
	fs.IntVar(&c.PKCS11.MaxSessions, "max-sessions", 0, "PKCS#11 session pool `size`")
	fs.StringVar(&c.Log.Level, "log-level", "", "log `level`: debug, info, warn, error")
	fs.StringVar(&c.Log.Format, "log-format", "", "log `format`: json, text")
	fs.StringVar(&c.JWKS.Address, "jwks-address", "", "HTTPS JWKS listener `host:port` (dev mode: 127.0.0.1:8443)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.dev && o.configPath != "" {
		return nil, errors.New("--dev and --config cannot be combined")
	}
	return o, nil
}

// apply copies the flags that were set onto cfg.
func (o *options) apply(cfg *config.Config) {
	f := o.cfgFlags
	o.fs.Visit(func(fl *flag.Flag) {
		switch fl.Name {
		case "backend":
			cfg.Backend = f.Backend
		case "tpm-device", "tpm-socket", "tpm-address":
			// One transport: the flag replaces whatever the file chose.
			cfg.TPM.Device, cfg.TPM.Socket, cfg.TPM.Address = f.TPM.Device, f.TPM.Socket, f.TPM.Address
		case "socket":
			cfg.Socket = f.Socket
		case "state-dir":
			cfg.StateDir = f.StateDir
		case "pkcs11-module":
			cfg.PKCS11.Module = f.PKCS11.Module
		case "token-label":
			cfg.PKCS11.TokenLabel = f.PKCS11.TokenLabel
		case "pin-file":
			cfg.PKCS11.PINFile = f.PKCS11.PINFile
		case "max-sessions":
			cfg.PKCS11.MaxSessions = f.PKCS11.MaxSessions
		case "log-level":
			cfg.Log.Level = f.Log.Level
		case "log-format":
			cfg.Log.Format = f.Log.Format
		case "jwks-address":
			cfg.JWKS.Address = f.JWKS.Address
		}
	})
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "migrate" {
		return runMigrate(args[1:], stdout, stderr)
	}
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "keybrokerd: %v\n", err)
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Caught from the start: SIGHUP's default action would end the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	var cfg config.Config
	var dev *devEnv
	switch {
	case o.dev:
		if dev, err = provisionDev(o.devDir, o.cfgFlags.Backend); err != nil {
			fmt.Fprintf(stderr, "keybrokerd: dev mode: %v\n", err)
			return exitFailure
		}
		cfg = dev.config()
	case o.configPath != "":
		if cfg, err = config.Load(o.configPath); err != nil {
			fmt.Fprintf(stderr, "keybrokerd: %v\n", err)
			return exitConfig
		}
	default:
		cfg = config.Default()
	}
	o.apply(&cfg)
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(stderr, "keybrokerd: %v\n", err)
		return exitConfig
	}
	level := new(slog.LevelVar)
	log := newLogger(cfg.Log, level, stderr)

	d, err := daemon.New(cfg, log, daemon.Options{Failpoint: failpoint(log), LogLevel: level})
	if err != nil {
		log.Error("cannot start", "err", err)
		return startFailure(err)
	}
	defer d.Close()
	lis, activated, err := d.ListenSystemd()
	if err != nil {
		log.Error("listen", "err", err)
		return exitFailure
	}
	if !activated {
		defer os.Remove(cfg.Socket)
	}
	// SIGHUP: re-read the file (flags still override it); dev mode and
	// the built-in defaults have nothing to re-read but reload all the same.
	reload := func() (config.Config, error) {
		next := cfg
		if o.configPath != "" {
			var err error
			if next, err = config.Load(o.configPath); err != nil {
				return config.Config{}, err
			}
			o.apply(&next)
		}
		return next, nil
	}
	go func() {
		select {
		case <-d.Ready():
		case <-ctx.Done():
			return
		}
		for {
			select {
			case <-hup:
				d.Reload(reload)
			case <-ctx.Done():
				return
			}
		}
	}()
	if dev != nil {
		if err := dev.welcome(ctx, d, cfg, stdout); err != nil {
			log.Error("dev mode", "err", err)
			return exitFailure
		}
	}
	if err := d.ServeListener(ctx, lis); err != nil {
		log.Error("serve", "err", err)
		return exitFailure
	}
	log.Info("stopped")
	return 0
}

// newLogger returns the JSON (or text) logger at c.Level, set on level so
// a reload can change it.
func newLogger(c config.Log, level *slog.LevelVar, w io.Writer) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(c.Level)) // validated already
	level.Set(l)
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// failpoint returns, when KEYBROKER_FAILPOINT names a step of a key change
// (for crash tests only), a hook that kills the process with SIGKILL there
// — or, with "STEP:stop", stops it with SIGSTOP (a pause, as a replica
// frozen past its lease). With KEYBROKER_FAILPOINT_ARMED=FILE it fires
// only while FILE exists, so a test can pick the moment.
func failpoint(log *slog.Logger) func(string) {
	at, action, _ := strings.Cut(os.Getenv("KEYBROKER_FAILPOINT"), ":")
	if at == "" {
		return nil
	}
	armed := os.Getenv("KEYBROKER_FAILPOINT_ARMED")
	log.Warn("crash test: the daemon kills itself at a failpoint", "failpoint", at, "action", action, "armed_by", armed)
	return func(step string) {
		if step != at {
			return
		}
		if armed != "" {
			if _, err := os.Stat(armed); err != nil {
				return
			}
		}
		if action == "stop" {
			syscall.Kill(os.Getpid(), syscall.SIGSTOP)
			return // continued: go on with the step
		}
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	}
}
