package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// algorithms are the values of --alg, by JOSE name (RFC 7518 §3.1).
var algorithms = enumFlag[kbv1.Algorithm]{
	"ES256": kbv1.Algorithm_ALGORITHM_ES256,
	"ES384": kbv1.Algorithm_ALGORITHM_ES384,
	"RS256": kbv1.Algorithm_ALGORITHM_RS256,
	"PS256": kbv1.Algorithm_ALGORITHM_PS256,
}

// rsaBits are the RSA modulus sizes keybrokerd accepts; 0 lets it choose.
var rsaBits = []int32{0, 2048, 3072, 4096}

func newKeysCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keys",
		Short: "Create, inspect, rotate and revoke keys",
		Args:  cobra.NoArgs,
		RunE:  showHelp,
	}
	cmd.AddCommand(newKeysCreateCmd(a), newKeysListCmd(a), newKeysGetCmd(a),
		newKeysRotateCmd(a), newKeysRevokeCmd(a), newKeysPolicyCmd(a), newKeysTimelineCmd(a), newKeysWatchCmd(a))
	return cmd
}

// createFlags are the flags of "keys create".
type createFlags struct {
	alg    string
	bits   int32
	policy policyFlags
}

// request checks the flags and returns the CreateKey request for name.
func (f createFlags) request(name string) (*kbv1.CreateKeyRequest, error) {
	alg, err := algorithms.parse("alg", f.alg)
	if err != nil {
		return nil, err
	}
	rsa := alg == kbv1.Algorithm_ALGORITHM_RS256 || alg == kbv1.Algorithm_ALGORITHM_PS256
	switch {
	case !rsa && f.bits != 0:
		return nil, usageErrorf("--bits: applies to RSA keys only, not %s", algName(alg))
	case rsa && !slices.Contains(rsaBits, f.bits):
		return nil, usageErrorf("--bits: got %d, want 2048, 3072 or 4096", f.bits)
	}
	return &kbv1.CreateKeyRequest{Name: name, Algorithm: alg, Bits: f.bits, Policy: f.policy.proto()}, nil
}

func newKeysCreateCmd(a *app) *cobra.Command {
	var f createFlags
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a key (version 1) in hardware",
		Long: `Create a key (version 1) in hardware and print it.

NAME matches ^[a-z0-9][a-z0-9._-]{0,62}$. --bits is for RSA keys only
(RS256, PS256) and defaults to 2048.

The rotation policy flags take durations such as 90d, 1d12h or 36h; those
not given take keybrokerd's defaults: --rotation-period 90d, --overlap 90d,
--lead 7d, --destroy-delay 30d.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := f.request(args[0])
			if err != nil {
				return err
			}
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				resp, err := kbv1.NewKeyBrokerClient(conn).CreateKey(ctx, req)
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.printProto(resp)
				}
				return a.printKey(resp.GetKey())
			})
		},
	}
	cmd.Flags().StringVar(&f.alg, "alg", "ES256", "key `algorithm`: "+algorithms.String())
	cmd.Flags().Int32Var(&f.bits, "bits", 0, "RSA modulus size in `bits`: 2048|3072|4096 (default 2048)")
	f.policy.register(cmd.Flags())
	return cmd
}

func newKeysGetCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "get NAME",
		Short: "Print a key and its versions",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				resp, err := kbv1.NewKeyBrokerClient(conn).GetKey(ctx, &kbv1.GetKeyRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.printProto(resp)
				}
				return a.printKey(resp.GetKey())
			})
		},
	}
}

func newKeysListCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List all keys, by name",
		Long: `List all keys, by name, fetching every page.

With --output json it prints one ListKeysResponse holding all keys.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				keys, err := listKeys(ctx, kbv1.NewKeyBrokerClient(conn))
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.printProto(&kbv1.ListKeysResponse{Keys: keys})
				}
				return a.printKeyTable(keys)
			})
		},
	}
}

// listKeys follows next_page_token until the last page. A token seen
// before is an error rather than an endless loop.
func listKeys(ctx context.Context, kb kbv1.KeyBrokerClient) ([]*kbv1.Key, error) {
	var keys []*kbv1.Key
	req := &kbv1.ListKeysRequest{}
	seen := map[string]bool{"": true}
	for {
		resp, err := kb.ListKeys(ctx, req)
		if err != nil {
			return nil, err
		}
		keys = append(keys, resp.GetKeys()...)
		next := resp.GetNextPageToken()
		if next == "" {
			return keys, nil
		}
		if seen[next] {
			return nil, fmt.Errorf("keybrokerd returned page token %q twice", next)
		}
		seen[next] = true
		req = &kbv1.ListKeysRequest{PageToken: next}
	}
}

func (a *app) printKey(k *kbv1.Key) error {
	tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "name:\t%s\n", k.GetName())
	fmt.Fprintf(tw, "algorithm:\t%s\n", algName(k.GetAlgorithm()))
	if k.GetBits() != 0 {
		fmt.Fprintf(tw, "bits:\t%d\n", k.GetBits())
	}
	fmt.Fprintf(tw, "backend:\t%s\n", k.GetBackend())
	fmt.Fprintf(tw, "created:\t%s\n", formatTime(k.GetCreateTime()))
	fmt.Fprintf(tw, "active version:\t%d\n", k.GetActiveVersion())
	fmt.Fprintf(tw, "active kid:\t%s\n", k.GetActiveKid())
	printPolicy(tw, k)
	if err := tw.Flush(); err != nil {
		return err
	}
	return a.printVersions(k)
}

// printPolicy writes k's rotation policy and next rotation time to tw.
func printPolicy(tw io.Writer, k *kbv1.Key) {
	p := k.GetPolicy()
	fmt.Fprintf(tw, "rotation period:\t%s\n", formatDuration(p.GetRotationPeriod()))
	fmt.Fprintf(tw, "overlap:\t%s\n", formatDuration(p.GetOverlap()))
	fmt.Fprintf(tw, "lead:\t%s\n", formatDuration(p.GetPrePublicationLead()))
	fmt.Fprintf(tw, "destroy delay:\t%s\n", formatDuration(p.GetDestroyDelay()))
	fmt.Fprintf(tw, "next rotation:\t%s\n", formatTime(k.GetNextRotationTime()))
}

// printVersions prints k's versions with their state and next transition.
func (a *app) printVersions(k *kbv1.Key) error {
	fmt.Fprintln(a.stdout, "versions:")
	tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  VERSION\tSTATE\tKID\tCREATED\tNEXT\tAT")
	for _, v := range k.GetVersions() {
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\n", v.GetVersion(), stateName(v.GetState()), v.GetKid(), formatTime(v.GetCreateTime()),
			nextStateName(v.GetNextState()), formatTime(v.GetNextTransitionTime()))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	return a.printCertificates(k)
}

// printCertificates lists the versions' imported certificates, if any.
func (a *app) printCertificates(k *kbv1.Key) error {
	var lines []string
	for _, v := range k.GetVersions() {
		if v.GetX5TS256() != "" {
			lines = append(lines, fmt.Sprintf("  v%d  x5t#S256=%s  expires %s", v.GetVersion(), v.GetX5TS256(), formatTime(v.GetCertificateExpireTime())))
		}
	}
	if len(lines) == 0 {
		return nil
	}
	_, err := fmt.Fprintf(a.stdout, "certificates:\n%s\n", strings.Join(lines, "\n"))
	return err
}

func (a *app) printKeyTable(keys []*kbv1.Key) error {
	tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tALGORITHM\tBITS\tACTIVE\tKID\tBACKEND")
	for _, k := range keys {
		bits := "-"
		if k.GetBits() != 0 {
			bits = fmt.Sprint(k.GetBits())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", k.GetName(), algName(k.GetAlgorithm()), bits, k.GetActiveVersion(), k.GetActiveKid(), k.GetBackend())
	}
	return tw.Flush()
}
