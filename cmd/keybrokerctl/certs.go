package main

import (
	"encoding/pem"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

// importCertFlags are the flags of "import-cert".
type importCertFlags struct {
	versionFlags
	chain string
}

// request checks the flags, reads the chain, and returns the
// ImportCertificate request for key name.
func (f importCertFlags) request(name string, stdin io.Reader) (*kbv1.ImportCertificateRequest, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	if f.chain == "" {
		return nil, usageErrorf("--chain: required")
	}
	b, err := readInput(f.chain, stdin, "certificate chain")
	if err != nil {
		return nil, err
	}
	chain, err := pemCertificates(b)
	if err != nil {
		return nil, usageErrorf("--chain %s: %v", f.chain, err)
	}
	return &kbv1.ImportCertificateRequest{Name: name, Version: f.version, Kid: f.kid, CertificateChain: chain}, nil
}

// pemCertificates returns the DER of each CERTIFICATE block of b, in
// order. Text around the blocks (openssl's "subject=" lines) is skipped;
// any other block is refused, so that a private key that was bundled by
// mistake never leaves the machine.
func pemCertificates(b []byte) ([][]byte, error) {
	var chain [][]byte
	for i := 1; ; i++ {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("block %d is %q: give only CERTIFICATE blocks, leaf first", i, blk.Type)
		}
		chain = append(chain, blk.Bytes)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("no PEM CERTIFICATE block")
	}
	return chain, nil
}

func newImportCertCmd(a *app) *cobra.Command {
	var f importCertFlags
	cmd := &cobra.Command{
		Use:   "import-cert NAME --chain FILE [--version N | --kid KID]",
		Short: "Import a CA-issued certificate chain for a key version (admin)",
		Long: `Import the certificate chain a CA issued for a key version (from the CSR
that "csr" made) and print its x5t#S256. The SDK's TLS client certificate
then presents it (the ACTIVE version's), GetConfirmation reports its
x5t#S256, and client assertions carry it in their header.

--chain is a PEM file ("-": stdin) of CERTIFICATE blocks, leaf first, each
followed by its issuer; the root may be left out. Any other PEM block (a
private key) is refused before anything is sent. keybrokerd checks that the
leaf certifies the version's key, that each certificate is issued by the
next, and that none has expired; it replaces the version's chain, if any.

--version or --kid names the version; without either, the version is the
one whose key the leaf certifies. A PENDING version takes a chain too, so
that the certificate is ready when it becomes ACTIVE.

With --output json it prints the ImportCertificateResponse.`,
		Args: cobra.ExactArgs(1),
		RunE: rpc[*kbv1.ImportCertificateRequest, *kbv1.ImportCertificateResponse]{
			request: func(cmd *cobra.Command, args []string) (*kbv1.ImportCertificateRequest, error) {
				return f.request(args[0], cmd.InOrStdin())
			},
			call: kbv1.KeyBrokerClient.ImportCertificate,
			text: func(_ *kbv1.ImportCertificateRequest, resp *kbv1.ImportCertificateResponse) error {
				_, err := fmt.Fprintf(a.stdout, "version:\t%d\nkid:\t%s\nx5t#S256:\t%s\nexpires:\t%s\n",
					resp.GetVersion(), resp.GetKid(), resp.GetX5TS256(), formatTime(resp.GetExpireTime()))
				return err
			},
		}.runE(a),
	}
	cmd.Flags().StringVar(&f.chain, "chain", "", "PEM `FILE` of the chain, leaf first (\"-\": stdin) (required)")
	f.register(cmd.Flags())
	return cmd
}
