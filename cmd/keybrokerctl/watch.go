package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
)

func newKeysWatchCmd(a *app) *cobra.Command {
	var csr bool
	cmd := &cobra.Command{
		Use:   "watch [NAME]",
		Short: "Print key events as they happen, until interrupted",
		Long: `Print one line per key event until interrupted (SIGINT, SIGTERM): first
the tenant's versions as they are (marked "snapshot"), then every change —
a version PENDING, ACTIVE, RETIRED, EXPIRED, REVOKED or DESTROYED, a policy
change, a certificate import. NAME limits it to one key.

With --output json each line is one KeyEvent in the proto3 JSON mapping,
the same JSON that hooks get on stdin. --csr adds to PENDING events the
version's CSR (subject CN = the key's name; needs the signer role).

--timeout bounds the connection only. A watch that falls too far behind is
cut off by keybrokerd and started again here (a new snapshot follows); when
the daemon stops, the command fails UNAVAILABLE.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &kbv1.WatchKeysRequest{IncludeCsr: csr}
			if len(args) == 1 {
				req.Name = args[0]
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.watch(ctx, req, cmd.ErrOrStderr())
		},
	}
	cmd.Flags().BoolVar(&csr, "csr", false, "include each PENDING version's CSR")
	return cmd
}

// watch prints events until ctx ends (nil) or the stream fails; a stream
// cut off for falling behind is opened again (client.WatchKeys).
func (a *app) watch(ctx context.Context, req *kbv1.WatchKeysRequest, stderr io.Writer) error {
	conns, err := a.dialN(1)
	if err != nil {
		return err
	}
	defer conns[0].Close()
	return conns[0].WatchKeys(ctx, req, func(ev *kbv1.KeyEvent) error {
		if a.jsonOutput() {
			return a.printProto(ev)
		}
		_, err := fmt.Fprintln(a.stdout, eventLine(ev))
		return err
	}, client.OnRewatch(func(error) { fmt.Fprintln(stderr, "keybrokerctl: the watch fell behind; watching again") }))
}

// eventLine is the text form of an event: time, type, key, version, kid,
// and what else it carries.
func eventLine(ev *kbv1.KeyEvent) string {
	typ := strings.TrimPrefix(ev.GetType().String(), "KEY_EVENT_TYPE_")
	if ev.GetType() == kbv1.KeyEventType_KEY_EVENT_TYPE_SNAPSHOT_COMPLETE {
		return "-- snapshot complete; changes follow --"
	}
	fields := []string{formatTime(ev.GetTime()), typ, ev.GetName()}
	if ev.GetType() == kbv1.KeyEventType_KEY_EVENT_TYPE_POLICY {
		p := ev.GetPolicy()
		fields = append(fields, "rotation_period="+formatDuration(p.GetRotationPeriod()), "overlap="+formatDuration(p.GetOverlap()),
			"lead="+formatDuration(p.GetPrePublicationLead()), "destroy_delay="+formatDuration(p.GetDestroyDelay()))
	} else {
		fields = append(fields, fmt.Sprintf("v%d", ev.GetVersion()), "kid="+ev.GetKid(), "alg="+algName(ev.GetAlgorithm()))
	}
	if ev.GetX5TS256() != "" {
		fields = append(fields, "x5t#S256="+ev.GetX5TS256())
	}
	if len(ev.GetCsrDer()) > 0 {
		fields = append(fields, fmt.Sprintf("csr=%dB", len(ev.GetCsrDer())))
	}
	if ev.GetCsrError() != "" {
		fields = append(fields, fmt.Sprintf("csr_error=%q", ev.GetCsrError()))
	}
	if ev.GetSnapshot() {
		fields = append(fields, "(snapshot)")
	}
	return strings.Join(fields, " ")
}
