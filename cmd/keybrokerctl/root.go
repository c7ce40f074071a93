package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keybroker/keybroker/client"
)

// defaultSocket is where keybrokerd listens unless configured otherwise.
const defaultSocket = client.DefaultSocket

const rootLong = `keybrokerctl operates keybrokerd over its gRPC unix socket: it creates,
inspects, rotates and revokes keys, sets their rotation policy, signs
digests and prints public keys and the JWK Set.

It also proves possession of a key for OAuth and mTLS: "req-cnf" prints a
token request's req_cnf, "dpop" makes a DPoP proof, "shr" a Signed HTTP
Request, "jws" signs a payload as a JWS, "client-assertion" makes an RFC
7523 client assertion (private_key_jwt), "csr" and "cert" make a CSR and a
self-signed certificate, "import-cert" imports the chain a CA issued for a
CSR, and "attest" proves a TPM key lives in the TPM.
These commands take --version N or --kid KID to use a version other than
the active one.

The socket is --socket, else $KEYBROKER_SOCKET, else ` + defaultSocket + `.
--timeout bounds the whole command, including every page of "keys list".

With --output json every command prints one JSON object on one line:
responses in the proto3 JSON mapping, except "sign", "keys timeline" and
"attest" (see their help) and "jwks" (the JWK Set itself). Errors go to stderr as "keybrokerctl: <message>".

Exit codes:
  0  success
  1  any other error
  2  usage error: bad flags or arguments, or the daemon's INVALID_ARGUMENT
  3  not found: NOT_FOUND
  4  unavailable: socket missing, cannot connect, UNAVAILABLE,
     DEADLINE_EXCEEDED, or "health" reports anything but SERVING
  5  conflict: ALREADY_EXISTS or FAILED_PRECONDITION`

// app holds the global flags and the output that every command shares.
type app struct {
	stdout  io.Writer
	socket  string
	output  string
	timeout time.Duration
}

// run runs keybrokerctl with args (without the program name), reading
// os.Stdin, prints any error to stderr and returns the process exit code.
func run(args []string, stdout, stderr io.Writer) int {
	return runIn(args, os.Stdin, stdout, stderr)
}

// runIn is run reading stdin instead of os.Stdin: "jws --payload-file -"
// and "shr --body-file -" read it.
func runIn(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	root := newRootCmd(stdout, stderr)
	root.SetIn(stdin)
	// Never nil: given nil, cobra falls back to os.Args.
	root.SetArgs(append([]string{}, args...))
	cmd, err := root.ExecuteContextC(context.Background())
	if err == nil {
		return exitOK
	}
	fmt.Fprintf(stderr, "keybrokerctl: %s\n", errorMessage(err))
	if errors.As(err, new(usageError)) && cmd != nil {
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
	}
	return exitCode(err)
}

// newRootCmd returns the keybrokerctl command tree writing to stdout and
// stderr. Its errors are returned, not printed: run prints them.
func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	a := &app{stdout: stdout}
	root := &cobra.Command{
		Use:               "keybrokerctl",
		Short:             "Operate keybrokerd: keys, signatures, public keys, proofs of possession",
		Long:              rootLong,
		Args:              cobra.NoArgs,
		RunE:              showHelp,
		PersistentPreRunE: func(*cobra.Command, []string) error { return a.checkGlobalFlags() },
		SilenceUsage:      true,
		SilenceErrors:     true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })

	socket := os.Getenv("KEYBROKER_SOCKET")
	if socket == "" {
		socket = defaultSocket
	}
	f := root.PersistentFlags()
	f.StringVar(&a.socket, "socket", socket, "`path` of keybrokerd's unix socket; $KEYBROKER_SOCKET sets the default")
	f.StringVarP(&a.output, "output", "o", "text", "output `format`: text|json")
	f.DurationVar(&a.timeout, "timeout", 10*time.Second, "deadline for the whole command")

	root.AddCommand(newHealthCmd(a), newKeysCmd(a), newSignCmd(a), newPubkeyCmd(a), newJWKSCmd(a))
	root.AddCommand(newAuditCmd(a), newBenchCmd(a), newClusterCmd(a))
	root.AddCommand(newReqCnfCmd(a), newDPoPCmd(a), newSHRCmd(a), newJWSCmd(a), newCSRCmd(a), newCertCmd(a), newAttestCmd(a))
	root.AddCommand(newClientAssertionCmd(a), newImportCertCmd(a))
	// Add cobra's own commands now, so that argsAreUsageErrors sees them.
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	argsAreUsageErrors(root)
	return root
}

// showHelp is the RunE of commands that only group subcommands.
func showHelp(cmd *cobra.Command, _ []string) error {
	return cmd.Help()
}

// argsAreUsageErrors makes the positional-argument errors of cmd and its
// subcommands (wrong count, unknown subcommand) usage errors.
func argsAreUsageErrors(cmd *cobra.Command) {
	if check := cmd.Args; check != nil {
		cmd.Args = func(cmd *cobra.Command, args []string) error {
			if err := check(cmd, args); err != nil {
				return usageError{err}
			}
			return nil
		}
	}
	for _, sub := range cmd.Commands() {
		argsAreUsageErrors(sub)
	}
}

func (a *app) checkGlobalFlags() error {
	if a.output != "text" && a.output != "json" {
		return usageErrorf("--output: got %q, want text or json", a.output)
	}
	if a.timeout <= 0 {
		return usageErrorf("--timeout: got %s, want more than 0", a.timeout)
	}
	return nil
}

// call runs fn with a connection to keybrokerd and a context that ends
// after --timeout. Failing to reach the daemon is an UNAVAILABLE error.
func (a *app) call(ctx context.Context, fn func(context.Context, *grpc.ClientConn) error) error {
	conns, err := a.dialN(1)
	if err != nil {
		return err
	}
	conn := conns[0]
	defer conn.Close()

	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	err = fn(ctx, conn.Conn())
	if status.Code(err) == codes.DeadlineExceeded {
		// The deadline is --timeout's, whether the client or the daemon
		// noticed first; gRPC's message differs between the two.
		return status.Errorf(codes.DeadlineExceeded, "no answer from keybrokerd within --timeout %s", a.timeout)
	}
	return err
}
