package main

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

var (
	hashes = enumFlag[kbv1.HashAlgorithm]{
		"sha256": kbv1.HashAlgorithm_HASH_ALGORITHM_SHA256,
		"sha384": kbv1.HashAlgorithm_HASH_ALGORITHM_SHA384,
		"sha512": kbv1.HashAlgorithm_HASH_ALGORITHM_SHA512,
	}
	signatureFormats = enumFlag[kbv1.SignatureFormat]{
		"der":  kbv1.SignatureFormat_SIGNATURE_FORMAT_DER,
		"jose": kbv1.SignatureFormat_SIGNATURE_FORMAT_JOSE,
	}
	paddings = enumFlag[kbv1.RSAPadding]{
		"pkcs1v15": kbv1.RSAPadding_RSA_PADDING_PKCS1V15,
		"pss":      kbv1.RSAPadding_RSA_PADDING_PSS,
	}
)

// digestSizes are the digest sizes of the hashes in bytes (FIPS 180-4).
var digestSizes = map[kbv1.HashAlgorithm]int{
	kbv1.HashAlgorithm_HASH_ALGORITHM_SHA256: 32,
	kbv1.HashAlgorithm_HASH_ALGORITHM_SHA384: 48,
	kbv1.HashAlgorithm_HASH_ALGORITHM_SHA512: 64,
}

// versionFlags select a key version by number or by kid; neither selects
// the active version.
type versionFlags struct {
	version uint32
	kid     string
}

func (v *versionFlags) register(fs *pflag.FlagSet) {
	fs.Uint32Var(&v.version, "version", 0, "use key version `N` instead of the active one")
	fs.StringVar(&v.kid, "kid", "", "use the key version with kid `KID` instead of the active one")
}

func (v versionFlags) check() error {
	if v.version != 0 && v.kid != "" {
		return usageErrorf("--version and --kid: give at most one")
	}
	return nil
}

// signFlags are the flags of "sign". Empty enum flags leave the choice to
// keybrokerd, which follows the key's algorithm.
type signFlags struct {
	versionFlags
	digest  string
	hash    string
	format  string
	padding string
}

// request checks the flags and returns the Sign request for key name.
func (f signFlags) request(name string) (*kbv1.SignRequest, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	req := &kbv1.SignRequest{Name: name, Version: f.version, Kid: f.kid}
	var err error
	if f.hash != "" {
		if req.Hash, err = hashes.parse("hash", f.hash); err != nil {
			return nil, err
		}
	}
	if f.format != "" {
		if req.Format, err = signatureFormats.parse("format", f.format); err != nil {
			return nil, err
		}
	}
	if f.padding != "" {
		if req.Padding, err = paddings.parse("padding", f.padding); err != nil {
			return nil, err
		}
	}
	if req.Digest, err = parseDigest(f.digest, req.Hash); err != nil {
		return nil, err
	}
	return req, nil
}

// parseDigest decodes the hex digest s and, when hash is known, checks its
// length.
func parseDigest(s string, hash kbv1.HashAlgorithm) ([]byte, error) {
	if s == "" {
		return nil, usageErrorf("--digest: required")
	}
	digest, err := hex.DecodeString(s)
	if err != nil {
		return nil, usageErrorf("--digest: not hex: %v", err)
	}
	if want, ok := digestSizes[hash]; ok && len(digest) != want {
		return nil, usageErrorf("--digest: got %d bytes, want %d for %s", len(digest), want, hashes.nameOf(hash))
	}
	return digest, nil
}

// signOutput is what "sign --output json" prints.
type signOutput struct {
	Signature string `json:"signature"` // base64url, no padding (RFC 7515 §2)
	Kid       string `json:"kid"`
	Version   uint32 `json:"version"`
	Algorithm string `json:"algorithm"` // JOSE name, as in "ES256"
}

func newSignCmd(a *app) *cobra.Command {
	var f signFlags
	cmd := &cobra.Command{
		Use:   "sign NAME --digest HEX",
		Short: "Sign a digest with a key",
		Long: `Sign a digest with a key's active version, or the one --version or --kid
names, and print the signature in base64url without padding (RFC 7515 §2)
with the kid, version and algorithm that signed.

--hash defaults to the key algorithm's hash; when given, the digest length
is checked against it. --format applies to ECDSA keys (der, or jose: r||s as
RFC 7518 §3.4), --padding to RSA keys; both default to the key algorithm's.

With --output json it prints {"signature","kid","version","algorithm"},
the algorithm as a JOSE name such as "ES256".`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := f.request(args[0])
			if err != nil {
				return err
			}
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				resp, err := kbv1.NewKeyBrokerClient(conn).Sign(ctx, req)
				if err != nil {
					return err
				}
				return a.printSignature(resp)
			})
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&f.digest, "digest", "", "the digest to sign, in `hex` (required)")
	fs.StringVar(&f.hash, "hash", "", "`hash` that made the digest: "+hashes.String())
	fs.StringVar(&f.format, "format", "", "ECDSA signature `encoding`: "+signatureFormats.String())
	fs.StringVar(&f.padding, "padding", "", "RSA signature `scheme`: "+paddings.String())
	f.register(fs)
	return cmd
}

func (a *app) printSignature(resp *kbv1.SignResponse) error {
	out := signOutput{
		Signature: base64.RawURLEncoding.EncodeToString(resp.GetSignature()),
		Kid:       resp.GetKid(),
		Version:   resp.GetVersion(),
		Algorithm: algName(resp.GetAlgorithm()),
	}
	if a.jsonOutput() {
		return json.NewEncoder(a.stdout).Encode(out)
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "signature:\t%s\n", out.Signature)
	fmt.Fprintf(tw, "kid:\t%s\n", out.Kid)
	fmt.Fprintf(tw, "version:\t%d\n", out.Version)
	fmt.Fprintf(tw, "algorithm:\t%s\n", out.Algorithm)
	return tw.Flush()
}
