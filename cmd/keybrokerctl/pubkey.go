package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// keyFormat is how "pubkey" prints a public key in text mode.
type keyFormat int32

const (
	formatPEM keyFormat = iota + 1
	formatJWK
	formatDER
)

var keyFormats = enumFlag[keyFormat]{"pem": formatPEM, "jwk": formatJWK, "der": formatDER}

// pubkeyFlags are the flags of "pubkey".
type pubkeyFlags struct {
	versionFlags
	format string
}

// request checks the flags and returns the GetPublicKey request for key
// name and the format to print.
func (f pubkeyFlags) request(name string) (*kbv1.GetPublicKeyRequest, keyFormat, error) {
	if err := f.check(); err != nil {
		return nil, 0, err
	}
	format, err := keyFormats.parse("format", f.format)
	if err != nil {
		return nil, 0, err
	}
	return &kbv1.GetPublicKeyRequest{Name: name, Version: f.version, Kid: f.kid}, format, nil
}

func newPubkeyCmd(a *app) *cobra.Command {
	var f pubkeyFlags
	cmd := &cobra.Command{
		Use:   "pubkey NAME",
		Short: "Print the public key of a key version",
		Long: `Print the public key of a key's active version, or the one --version or
--kid names: as PEM (PKIX "PUBLIC KEY"), as a JWK, or as DER in base64.

With --output json it prints the whole GetPublicKeyResponse, whatever --format.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req, format, err := f.request(args[0])
			if err != nil {
				return err
			}
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				resp, err := kbv1.NewKeyBrokerClient(conn).GetPublicKey(ctx, req)
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.printProto(resp)
				}
				return a.printPublicKey(resp, format)
			})
		},
	}
	cmd.Flags().StringVar(&f.format, "format", "pem", "`format` in text mode: "+keyFormats.String())
	f.register(cmd.Flags())
	return cmd
}

func (a *app) printPublicKey(resp *kbv1.GetPublicKeyResponse, format keyFormat) error {
	var err error
	switch format {
	case formatPEM:
		_, err = fmt.Fprint(a.stdout, strings.TrimSuffix(resp.GetPem(), "\n")+"\n")
	case formatJWK:
		err = a.printJSON([]byte(resp.GetJwk()), true)
	case formatDER:
		_, err = fmt.Fprintln(a.stdout, base64.StdEncoding.EncodeToString(resp.GetDer()))
	}
	return err
}

func newJWKSCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "jwks",
		Short: "Print the JWK Set of the published public keys",
		Long: `Print the JWK Set (RFC 7517 §5) of the published key versions, indented.
With --output json it prints the JWK Set itself on one line.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				resp, err := kbv1.NewKeyBrokerClient(conn).GetJWKS(ctx, &kbv1.GetJWKSRequest{})
				if err != nil {
					return err
				}
				return a.printJSON([]byte(resp.GetJwks()), !a.jsonOutput())
			})
		},
	}
}
