package main

import (
	"context"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/kms"
)

// durationFlag is a flag holding a positive duration in the syntax of
// kms.ParseDuration: Go's plus a "d" (day) unit, as in "90d" or "1d12h".
type durationFlag struct {
	d   time.Duration
	set bool // given on the command line
}

func (f *durationFlag) Set(s string) error {
	d, err := kms.ParseDuration(s)
	if err != nil || d <= 0 {
		return errors.New("want a positive duration such as 90d, 1d12h or 36h")
	}
	f.d, f.set = d, true
	return nil
}

func (f *durationFlag) String() string {
	if f.d == 0 {
		return ""
	}
	return kms.FormatDuration(f.d)
}

func (f *durationFlag) Type() string { return "duration" }

// proto returns the flag's value, or nil if it was not given.
func (f *durationFlag) proto() *durationpb.Duration {
	if !f.set {
		return nil
	}
	return durationpb.New(f.d)
}

// policyFlags are the rotation policy flags of "keys create" and "keys
// policy".
type policyFlags struct {
	period, overlap, lead, destroyDelay durationFlag
}

func (f *policyFlags) register(fs *pflag.FlagSet) {
	fs.Var(&f.period, "rotation-period", "time `D` each version is ACTIVE, as 90d, 1d12h or 36h")
	fs.Var(&f.overlap, "overlap", "time `D` a RETIRED version stays published")
	fs.Var(&f.lead, "lead", "time `D` before its activation that the next version is published as PENDING")
	fs.Var(&f.destroyDelay, "destroy-delay", "time `D` an EXPIRED or REVOKED version's hardware object is kept")
}

// proto returns the policy holding the flags given, or nil if none was.
func (f *policyFlags) proto() *kbv1.RotationPolicy {
	if !f.period.set && !f.overlap.set && !f.lead.set && !f.destroyDelay.set {
		return nil
	}
	return &kbv1.RotationPolicy{
		RotationPeriod:     f.period.proto(),
		Overlap:            f.overlap.proto(),
		PrePublicationLead: f.lead.proto(),
		DestroyDelay:       f.destroyDelay.proto(),
	}
}

// rotateRequest checks the flags of "keys rotate" and returns its request.
// ifActiveSet says whether --if-active-version was given: an explicit 0,
// which would rotate unconditionally, is an error.
func rotateRequest(name string, ifActive uint32, ifActiveSet bool) (*kbv1.RotateKeyRequest, error) {
	if ifActiveSet && ifActive == 0 {
		return nil, usageErrorf("--if-active-version: got 0, want a version number (1 or more)")
	}
	return &kbv1.RotateKeyRequest{Name: name, IfActiveVersion: ifActive}, nil
}

func newKeysRotateCmd(a *app) *cobra.Command {
	var ifActive uint32
	cmd := &cobra.Command{
		Use:   "rotate NAME",
		Short: "Rotate a key now",
		Long: `Rotate a key now: its PENDING version, or else a newly generated one,
becomes ACTIVE and the ACTIVE version becomes RETIRED. Print whether this
call rotated, and the active version and kid afterwards.

With --if-active-version N it rotates only if version N is still the
ACTIVE one, so that retried or concurrent calls rotate once; otherwise it
prints "rotated: no" and exits 0.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := rotateRequest(args[0], ifActive, cmd.Flags().Changed("if-active-version"))
			if err != nil {
				return err
			}
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				resp, err := kbv1.NewKeyBrokerClient(conn).RotateKey(ctx, req)
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.printProto(resp)
				}
				rotated := "no"
				if resp.GetRotated() {
					rotated = "yes"
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
				fmt.Fprintf(tw, "rotated:\t%s\n", rotated)
				fmt.Fprintf(tw, "active version:\t%d\n", resp.GetKey().GetActiveVersion())
				fmt.Fprintf(tw, "active kid:\t%s\n", resp.GetKey().GetActiveKid())
				return tw.Flush()
			})
		},
	}
	cmd.Flags().Uint32Var(&ifActive, "if-active-version", 0, "rotate only if version `N` is the ACTIVE one")
	return cmd
}

// revokeRequest checks the flags of "keys revoke" and returns its request.
func revokeRequest(name string, f versionFlags) (*kbv1.RevokeKeyVersionRequest, error) {
	if (f.version == 0) == (f.kid == "") {
		return nil, usageErrorf("--version and --kid: give exactly one")
	}
	return &kbv1.RevokeKeyVersionRequest{Name: name, Version: f.version, Kid: f.kid}, nil
}

func newKeysRevokeCmd(a *app) *cobra.Command {
	var f versionFlags
	cmd := &cobra.Command{
		Use:   "revoke NAME (--version N | --kid KID)",
		Short: "Revoke a key version at once",
		Long: `Revoke a key version at once, as after a key compromise: it leaves the
JWK Set and can no longer sign. If it was the ACTIVE version, the PENDING
one, or else a newly generated one, becomes ACTIVE. Print the key's active
version and its versions afterwards.

Exactly one of --version and --kid is required.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := revokeRequest(args[0], f)
			if err != nil {
				return err
			}
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				resp, err := kbv1.NewKeyBrokerClient(conn).RevokeKeyVersion(ctx, req)
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.printProto(resp)
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
				fmt.Fprintf(tw, "active version:\t%d\n", resp.GetKey().GetActiveVersion())
				fmt.Fprintf(tw, "active kid:\t%s\n", resp.GetKey().GetActiveKid())
				if err := tw.Flush(); err != nil {
					return err
				}
				return a.printVersions(resp.GetKey())
			})
		},
	}
	cmd.Flags().Uint32Var(&f.version, "version", 0, "revoke key version `N`")
	cmd.Flags().StringVar(&f.kid, "kid", "", "revoke the key version with kid `KID`")
	return cmd
}

func newKeysPolicyCmd(a *app) *cobra.Command {
	var f policyFlags
	cmd := &cobra.Command{
		Use:   "policy NAME [--rotation-period D] [--overlap D] [--lead D] [--destroy-delay D]",
		Short: "Print or change a key's rotation policy",
		Long: `Without flags, print a key's rotation policy and next rotation time.
With flags, change the durations given, keep the others, and print the
policy afterwards. Durations are Go's plus a "d" (day) unit: 90d, 1d12h, 36h.

keybrokerd requires a rotation period of at least 1h and a lead shorter
than the rotation period.

With --output json it prints the GetKeyResponse (without flags) or the
UpdatePolicyResponse (with flags): both are {"key": ...}.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			policy := f.proto()
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				kb := kbv1.NewKeyBrokerClient(conn)
				var resp proto.Message
				var key *kbv1.Key
				if policy == nil {
					r, err := kb.GetKey(ctx, &kbv1.GetKeyRequest{Name: args[0]})
					if err != nil {
						return err
					}
					resp, key = r, r.GetKey()
				} else {
					r, err := kb.UpdatePolicy(ctx, &kbv1.UpdatePolicyRequest{Name: args[0], Policy: policy})
					if err != nil {
						return err
					}
					resp, key = r, r.GetKey()
				}
				if a.jsonOutput() {
					return a.printProto(resp)
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
				printPolicy(tw, key)
				return tw.Flush()
			})
		},
	}
	f.register(cmd.Flags())
	return cmd
}
