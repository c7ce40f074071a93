package daemon

import (
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	sdnotify "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// notify sends state to systemd when NOTIFY_SOCKET is set (Type=notify);
// elsewhere it does nothing. See sd_notify(3).
func (d *Daemon) notify(state string) {
	if _, err := sdnotify.SdNotify(false, state); err != nil {
		d.log.Warn("systemd notification not sent", "err", err)
	}
}

// sdWatchdog is half the watchdog interval systemd asks for
// (WATCHDOG_USEC, WatchdogSec= in the unit), or 0 when there is none:
// sd_watchdog_enabled(3) recommends pinging at half the interval.
func sdWatchdog() (time.Duration, error) {
	d, err := sdnotify.SdWatchdogEnabled(false)
	return d / 2, err
}

// monotonicUsec is CLOCK_MONOTONIC in microseconds, which systemd wants
// with RELOADING=1 (sd_notify(3), MONOTONIC_USEC=).
func monotonicUsec() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return "0"
	}
	return strconv.FormatInt(ts.Nano()/1e3, 10)
}

// ListenSystemd returns the unix listener to serve on: the one systemd
// passed (socket activation: LISTEN_FDS, keybroker.socket) when there is
// one, else a new socket at the configured path (see Listen). activated
// tells which, so the caller leaves a socket it does not own in place. A
// TCP listener passed along is kept for tcp.address; any other is closed.
func (d *Daemon) ListenSystemd() (lis net.Listener, activated bool, err error) {
	passed, err := activation.Listeners()
	if err != nil {
		return nil, false, fmt.Errorf("socket activation: %w", err)
	}
	for i, l := range passed {
		if l == nil {
			d.log.Warn("socket activation: ignoring a passed file descriptor that is not a stream listener", "fd", 3+i)
			continue
		}
		switch {
		case l.Addr().Network() == "unix" && lis == nil:
			lis = l
		case l.Addr().Network() == "tcp" && d.tcp != nil && d.tcpLis == nil:
			d.tcpLis = l
		default:
			d.log.Warn("socket activation: closing a listener keybrokerd has no use for", "network", l.Addr().Network(), "address", l.Addr().String())
			l.Close()
		}
	}
	if lis != nil {
		d.log.Info("socket activation: serving on the socket systemd passed", "socket", lis.Addr().String())
		return lis, true, nil
	}
	if d.tcpLis != nil {
		d.log.Warn("socket activation: systemd passed a TCP listener but no unix one; creating the unix socket")
	}
	lis, err = d.Listen()
	return lis, false, err
}
