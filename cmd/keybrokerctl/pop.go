package main

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/kms"
)

// This file holds the proof-of-possession commands: req-cnf, dpop, shr,
// jws, csr, cert and attest. Each checks its flags in a request method,
// before any call to keybrokerd, so that a bad flag exits 2 without one.

// readInput returns the contents of the file at path, or of stdin for "-".
// A file that does not exist is a NOT_FOUND error (exit code 3).
func readInput(path string, stdin io.Reader, what string) ([]byte, error) {
	if path == "-" {
		b, err := io.ReadAll(stdin)
		if err != nil {
			return nil, fmt.Errorf("reading the %s from stdin: %w", what, err)
		}
		return b, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, notFoundAsStatus(err, what+" file "+path)
	}
	return b, nil
}

// checkJSONObject fails unless s is a JSON object.
func checkJSONObject(flag, s string) error {
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		return usageErrorf("--%s: not a JSON object: %v", flag, err)
	}
	if m == nil {
		return usageErrorf("--%s: not a JSON object: got null", flag)
	}
	return nil
}

// printValue prints s on a line of its own.
func (a *app) printValue(s string) error {
	_, err := fmt.Fprintln(a.stdout, strings.TrimSuffix(s, "\n"))
	return err
}

// reqCnfForm is the req_cnf that "req-cnf" prints in text mode.
type reqCnfForm int32

const (
	reqCnfJWK reqCnfForm = iota + 1
	reqCnfKid
)

var reqCnfForms = enumFlag[reqCnfForm]{"jwk": reqCnfJWK, "kid": reqCnfKid}

// reqCnfFlags are the flags of "req-cnf".
type reqCnfFlags struct {
	versionFlags
	format string
}

// request checks the flags and returns the GetConfirmation request for
// key name and the req_cnf form to print.
func (f reqCnfFlags) request(name string) (*kbv1.GetConfirmationRequest, reqCnfForm, error) {
	if err := f.check(); err != nil {
		return nil, 0, err
	}
	form, err := reqCnfForms.parse("format", f.format)
	if err != nil {
		return nil, 0, err
	}
	return &kbv1.GetConfirmationRequest{Name: name, Version: f.version, Kid: f.kid}, form, nil
}

func newReqCnfCmd(a *app) *cobra.Command {
	var f reqCnfFlags
	var form reqCnfForm
	cmd := &cobra.Command{
		Use:   "req-cnf NAME [--format jwk|kid]",
		Short: "Print the req_cnf of a key for a PoP token request",
		Long: `Print the req_cnf that binds a PoP access token to a key's active version,
or the one --version or --kid names, and nothing else, for scripts:

  kid  (default) base64url of {"kid":<thumbprint>,"xms_ksl":"uhw"}, the
       MSAL Signed HTTP Request (SHR) PoP form
  jwk  base64url of the public JWK with "alg" and "kid", the MSAuth 1.0
       AT-POP form

With --output json it prints the whole GetConfirmationResponse, whatever
--format: also the kid and version, the RFC 7638 thumbprint and its
RFC 9278 URI, the DPoP "cnf.jkt" (RFC 9449 §6.1) and the JWK.`,
		Args: cobra.ExactArgs(1),
		RunE: rpc[*kbv1.GetConfirmationRequest, *kbv1.GetConfirmationResponse]{
			request: func(_ *cobra.Command, args []string) (*kbv1.GetConfirmationRequest, error) {
				req, f2, err := f.request(args[0])
				form = f2
				return req, err
			},
			call: kbv1.KeyBrokerClient.GetConfirmation,
			text: func(_ *kbv1.GetConfirmationRequest, resp *kbv1.GetConfirmationResponse) error {
				if form == reqCnfJWK {
					return a.printValue(resp.GetReqCnfJwk())
				}
				return a.printValue(resp.GetReqCnfKid())
			},
		}.runE(a),
	}
	cmd.Flags().StringVar(&f.format, "format", "kid", "req_cnf `form` in text mode: "+reqCnfForms.String())
	f.register(cmd.Flags())
	return cmd
}

// dpopFlags are the flags of "dpop".
type dpopFlags struct {
	versionFlags
	method, url        string
	accessToken, ath   string
	nonce, extraClaims string
}

// request checks the flags and returns the CreateDPoPProof request for
// key name.
func (f dpopFlags) request(name string) (*kbv1.CreateDPoPProofRequest, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	switch {
	case f.method == "":
		return nil, usageErrorf("--method: required")
	case f.url == "":
		return nil, usageErrorf("--url: required")
	}
	if err := checkMethod(f.method); err != nil {
		return nil, err
	}
	switch {
	case f.accessToken != "" && f.ath != "":
		return nil, usageErrorf("--access-token and --ath: give at most one")
	}
	if f.extraClaims != "" {
		if err := checkJSONObject("claims", f.extraClaims); err != nil {
			return nil, err
		}
	}
	return &kbv1.CreateDPoPProofRequest{
		Name: name, Version: f.version, Kid: f.kid, Htm: f.method, Htu: f.url,
		AccessToken: f.accessToken, Ath: f.ath, Nonce: f.nonce, ExtraClaimsJson: f.extraClaims,
	}, nil
}

func newDPoPCmd(a *app) *cobra.Command {
	var f dpopFlags
	cmd := &cobra.Command{
		Use:   "dpop NAME --method M --url U [--access-token T | --ath A] [--nonce N] [--claims JSON]",
		Short: "Make a DPoP proof (RFC 9449) for an HTTP request",
		Long: `Make a DPoP proof (RFC 9449) for one HTTP request with a key's active
version, or the one --version or --kid names, and print it: send it as the
request's "DPoP" header.

--method and --url are the request's method and URL (the proof's "htm" and
"htu"). With a DPoP-bound access token, give it with --access-token, or its
hash with --ath, for the proof's "ath"; a token endpoint request has none.
--nonce is the server's DPoP-Nonce, if it sent one. --claims adds claims as
a JSON object; they cannot replace the standard ones.

With --output json it prints the CreateDPoPProofResponse: the proof, the kid
and version that signed, and the "jkt" the token's cnf must hold.`,
		Args: cobra.ExactArgs(1),
		RunE: rpc[*kbv1.CreateDPoPProofRequest, *kbv1.CreateDPoPProofResponse]{
			request: func(cmd *cobra.Command, args []string) (*kbv1.CreateDPoPProofRequest, error) {
				return f.request(args[0])
			},
			call: kbv1.KeyBrokerClient.CreateDPoPProof,
			text: func(_ *kbv1.CreateDPoPProofRequest, resp *kbv1.CreateDPoPProofResponse) error {
				return a.printValue(resp.GetProof())
			},
		}.runE(a),
	}
	fs := cmd.Flags()
	fs.StringVar(&f.method, "method", "", "HTTP `method` of the request, case-sensitive: GET, not get (required)")
	fs.StringVar(&f.url, "url", "", "`URL` of the request (required)")
	fs.StringVar(&f.accessToken, "access-token", "", "the access `token` sent with the request")
	fs.StringVar(&f.ath, "ath", "", "the access token's hash `A` (base64url SHA-256), instead of --access-token")
	fs.StringVar(&f.nonce, "nonce", "", "the server's DPoP-Nonce `N`")
	fs.StringVar(&f.extraClaims, "claims", "", "extra claims as a `JSON` object")
	f.register(fs)
	return cmd
}

// shrFlags are the flags of "shr".
type shrFlags struct {
	versionFlags
	accessToken, method, url string
	nonce                    string
	headers                  []string
	bodyFile                 string
}

// request checks the flags, reads the body, and returns the
// CreateSignedHttpRequest request for key name.
func (f shrFlags) request(name string, stdin io.Reader) (*kbv1.CreateSignedHttpRequestRequest, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	switch {
	case f.accessToken == "":
		return nil, usageErrorf("--access-token: required")
	case f.method == "":
		return nil, usageErrorf("--method: required")
	case f.url == "":
		return nil, usageErrorf("--url: required")
	}
	if err := checkMethod(f.method); err != nil {
		return nil, err
	}
	headers, err := parseHeaders(f.headers)
	if err != nil {
		return nil, err
	}
	req := &kbv1.CreateSignedHttpRequestRequest{
		Name: name, Version: f.version, Kid: f.kid, AccessToken: f.accessToken,
		Method: f.method, Url: f.url, Nonce: f.nonce, Headers: headers,
	}
	if f.bodyFile != "" {
		if req.Body, err = readInput(f.bodyFile, stdin, "body"); err != nil {
			return nil, err
		}
	}
	return req, nil
}

// standardMethods are the methods of RFC 9110 §9.3 and PATCH (RFC 5789).
var standardMethods = []string{"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}

// checkMethod refuses a --method that is not a token (RFC 9110 §9.1), and
// a standard method in the wrong case: method names are case-sensitive, so
// a DPoP proof with "htm":"get" matches no GET at a resource server. The
// RPC takes any method as given; the CLI catches the typo.
func checkMethod(m string) error {
	for _, s := range standardMethods {
		if m != s && strings.EqualFold(m, s) {
			return usageErrorf("--method: got %q, but methods are case-sensitive (RFC 9110 §9.1): did you mean %s?", m, s)
		}
	}
	if !isToken(m) {
		return usageErrorf("--method: got %q, want a method name such as GET (an RFC 9110 token)", m)
	}
	return nil
}

// parseHeaders parses "Name: value" lines (RFC 9110 §5) into a map. A name
// given twice, in any case, is an error: the SHR covers one value a name.
func parseHeaders(lines []string) (map[string]string, error) {
	if len(lines) == 0 {
		return nil, nil
	}
	headers := make(map[string]string, len(lines))
	seen := make(map[string]bool, len(lines))
	for _, line := range lines {
		name, value, ok := strings.Cut(line, ":")
		if !ok || !isToken(name) {
			return nil, usageErrorf("--header: got %q, want 'Name: value'", line)
		}
		if strings.ContainsAny(value, "\r\n\x00") {
			return nil, usageErrorf("--header: %s: the value may not hold CR, LF or NUL", name)
		}
		lower := strings.ToLower(name)
		if seen[lower] {
			return nil, usageErrorf("--header: %s given twice", name)
		}
		seen[lower] = true
		headers[name] = strings.Trim(value, " \t")
	}
	return headers, nil
}

// isToken reports whether s is an RFC 9110 §5.6.2 token, as a header name
// must be.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
		if !ok {
			return false
		}
	}
	return true
}

func newSHRCmd(a *app) *cobra.Command {
	var f shrFlags
	cmd := &cobra.Command{
		Use:   "shr NAME --access-token T --method M --url U [--nonce N] [--header 'Name: value' ...] [--body-file F]",
		Short: "Make a Signed HTTP Request (SHR) for a PoP access token",
		Long: `Make an MSAL Signed HTTP Request (SHR) with a key's active version, or the
one --version or --kid names, and print it. It wraps the PoP access token
--access-token for one request: send it as the request's header

  Authorization: PoP <shr>

--method and --url are the request's method and full URL; the URL's query
is covered. Each --header 'Name: value' is a request header to cover (names
are tokens and may be given once); --body-file covers the request's body,
read from the file F, or stdin for "-". A body file that does not exist
exits 3. --nonce is the server's nonce, if it sent one.

With --output json it prints the CreateSignedHttpRequestResponse: the SHR
and the kid and version that signed.`,
		Args: cobra.ExactArgs(1),
		RunE: rpc[*kbv1.CreateSignedHttpRequestRequest, *kbv1.CreateSignedHttpRequestResponse]{
			request: func(cmd *cobra.Command, args []string) (*kbv1.CreateSignedHttpRequestRequest, error) {
				return f.request(args[0], cmd.InOrStdin())
			},
			call: kbv1.KeyBrokerClient.CreateSignedHttpRequest,
			text: func(_ *kbv1.CreateSignedHttpRequestRequest, resp *kbv1.CreateSignedHttpRequestResponse) error {
				return a.printValue(resp.GetShr())
			},
		}.runE(a),
	}
	fs := cmd.Flags()
	fs.StringVar(&f.accessToken, "access-token", "", "the PoP access `token` (required)")
	fs.StringVar(&f.method, "method", "", "HTTP `method` of the request, case-sensitive: GET, not get (required)")
	fs.StringVar(&f.url, "url", "", "full `URL` of the request (required)")
	fs.StringVar(&f.nonce, "nonce", "", "the server's `nonce`")
	fs.StringArrayVar(&f.headers, "header", nil, "a request header to cover, as `'Name: value'`; repeat for more")
	fs.StringVar(&f.bodyFile, "body-file", "", "`file` holding the request body to cover, - for stdin")
	f.register(fs)
	return cmd
}

// jwsFlags are the flags of "jws".
type jwsFlags struct {
	versionFlags
	payloadFile string
	header      string
}

// request checks the flags, reads the payload, and returns the SignJWS
// request for key name.
func (f jwsFlags) request(name string, stdin io.Reader) (*kbv1.SignJWSRequest, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	if f.payloadFile == "" {
		return nil, usageErrorf("--payload-file: required")
	}
	if f.header != "" {
		if err := checkJSONObject("header", f.header); err != nil {
			return nil, err
		}
	}
	payload, err := readInput(f.payloadFile, stdin, "payload")
	if err != nil {
		return nil, err
	}
	return &kbv1.SignJWSRequest{Name: name, Version: f.version, Kid: f.kid, HeaderJson: f.header, Payload: payload}, nil
}

func newJWSCmd(a *app) *cobra.Command {
	var f jwsFlags
	cmd := &cobra.Command{
		Use:   "jws NAME --payload-file F|- [--header JSON]",
		Short: "Sign a payload as a compact JWS",
		Long: `Sign the payload read from the file F, or stdin for "-", as a compact JWS
(RFC 7515 §7.1) with a key's active version, or the one --version or --kid
names, and print it. A payload file that does not exist exits 3.

keybrokerd sets the protected header's "alg" and "kid"; --header adds
members as a JSON object, which may not set "alg", "kid", "crit" or "jwk".

With --output json it prints the SignJWSResponse: the JWS and the kid and
version that signed.`,
		Args: cobra.ExactArgs(1),
		RunE: rpc[*kbv1.SignJWSRequest, *kbv1.SignJWSResponse]{
			request: func(cmd *cobra.Command, args []string) (*kbv1.SignJWSRequest, error) {
				return f.request(args[0], cmd.InOrStdin())
			},
			call: kbv1.KeyBrokerClient.SignJWS,
			text: func(_ *kbv1.SignJWSRequest, resp *kbv1.SignJWSResponse) error {
				return a.printValue(resp.GetJws())
			},
		}.runE(a),
	}
	fs := cmd.Flags()
	fs.StringVar(&f.payloadFile, "payload-file", "", "`file` holding the payload, - for stdin (required)")
	fs.StringVar(&f.header, "header", "", "extra protected header members as a `JSON` object")
	f.register(fs)
	return cmd
}

// subjectFlags are the certificate subject flags of "csr" and "cert".
type subjectFlags struct {
	cn        string
	dns, uris []string
	out       string
}

func (f *subjectFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.cn, "cn", "", "subject common `name`")
	fs.StringArrayVar(&f.dns, "dns", nil, "a DNS `name` for the subject alternative name; repeat for more")
	fs.StringArrayVar(&f.uris, "uri", nil, "a `URI` for the subject alternative name; repeat for more")
	fs.StringVar(&f.out, "out", "", "write the PEM to `file` instead of stdout")
}

func (f subjectFlags) check() error {
	if f.cn == "" && len(f.dns) == 0 && len(f.uris) == 0 {
		return usageErrorf("--cn: required, unless --dns or --uri is given")
	}
	return nil
}

// writeOut writes the PEM text pem to the --out file, when one is given.
func (f subjectFlags) writeOut(pem string) error {
	if f.out == "" {
		return nil
	}
	return os.WriteFile(f.out, []byte(strings.TrimSuffix(pem, "\n")+"\n"), 0o644)
}

// csrFlags are the flags of "csr".
type csrFlags struct {
	versionFlags
	subjectFlags
}

// request checks the flags and returns the CreateCertificateRequest
// request for key name.
func (f csrFlags) request(name string) (*kbv1.CreateCertificateRequestRequest, error) {
	if err := f.versionFlags.check(); err != nil {
		return nil, err
	}
	if err := f.subjectFlags.check(); err != nil {
		return nil, err
	}
	return &kbv1.CreateCertificateRequestRequest{
		Name: name, Version: f.version, Kid: f.kid, CommonName: f.cn, DnsNames: f.dns, Uris: f.uris,
	}, nil
}

func newCSRCmd(a *app) *cobra.Command {
	var f csrFlags
	cmd := &cobra.Command{
		Use:   "csr NAME --cn CN [--dns NAME ...] [--uri URI ...] [--out FILE]",
		Short: "Make a PKCS#10 certificate signing request for a key",
		Long: `Make a PKCS#10 certificate signing request (CSR) for a key's active
version, or the one --version or --kid names, signed by it, and print it as
PEM ("CERTIFICATE REQUEST"), or write it to --out FILE and print nothing.

--cn is the subject's common name; --dns and --uri add subject alternative
names. --cn may be left out when a --dns or --uri is given.

With --output json it prints the CreateCertificateRequestResponse (the CSR
in DER and PEM, the kid and version), and still writes --out if given.`,
		Args: cobra.ExactArgs(1),
		RunE: rpc[*kbv1.CreateCertificateRequestRequest, *kbv1.CreateCertificateRequestResponse]{
			request: func(_ *cobra.Command, args []string) (*kbv1.CreateCertificateRequestRequest, error) {
				return f.request(args[0])
			},
			call: kbv1.KeyBrokerClient.CreateCertificateRequest,
			after: func(_ *kbv1.CreateCertificateRequestRequest, resp *kbv1.CreateCertificateRequestResponse) error {
				return f.writeOut(resp.GetCsrPem())
			},
			text: func(_ *kbv1.CreateCertificateRequestRequest, resp *kbv1.CreateCertificateRequestResponse) error {
				if f.out != "" {
					return nil
				}
				return a.printValue(resp.GetCsrPem())
			},
		}.runE(a),
	}
	f.subjectFlags.register(cmd.Flags())
	f.versionFlags.register(cmd.Flags())
	return cmd
}

// certFlags are the flags of "cert".
type certFlags struct {
	versionFlags
	subjectFlags
	validity durationFlag
}

// request checks the flags and returns the CreateSelfSignedCertificate
// request for key name.
func (f *certFlags) request(name string) (*kbv1.CreateSelfSignedCertificateRequest, error) {
	if err := f.versionFlags.check(); err != nil {
		return nil, err
	}
	if err := f.subjectFlags.check(); err != nil {
		return nil, err
	}
	return &kbv1.CreateSelfSignedCertificateRequest{
		Name: name, Version: f.version, Kid: f.kid, CommonName: f.cn, DnsNames: f.dns, Uris: f.uris,
		Validity: f.validity.proto(),
	}, nil
}

func newCertCmd(a *app) *cobra.Command {
	var f certFlags
	cmd := &cobra.Command{
		Use:   "cert NAME --cn CN [--dns NAME ...] [--uri URI ...] [--validity D] [--out FILE]",
		Short: "Make a self-signed certificate for a key (mTLS, RFC 8705)",
		Long: `Make a self-signed X.509 client certificate for a key's active version, or
the one --version or --kid names, as for certificate-bound access tokens
(RFC 8705), and print it as PEM ("CERTIFICATE"). With --out FILE it writes
the PEM there and prints "x5t#S256: <thumbprint>" instead: the
base64url(SHA-256) of the certificate that the token's cnf holds.

--cn is the subject's common name; --dns and --uri add subject alternative
names. --cn may be left out when a --dns or --uri is given. --validity is
a duration such as 90d or 1d12h; keybrokerd's default is 90d and its
maximum 825d.

With --output json it prints the CreateSelfSignedCertificateResponse (the
certificate in DER and PEM, its x5t#S256, the kid and version), and still
writes --out if given.`,
		Args: cobra.ExactArgs(1),
		RunE: rpc[*kbv1.CreateSelfSignedCertificateRequest, *kbv1.CreateSelfSignedCertificateResponse]{
			request: func(_ *cobra.Command, args []string) (*kbv1.CreateSelfSignedCertificateRequest, error) {
				return f.request(args[0])
			},
			call: kbv1.KeyBrokerClient.CreateSelfSignedCertificate,
			after: func(_ *kbv1.CreateSelfSignedCertificateRequest, resp *kbv1.CreateSelfSignedCertificateResponse) error {
				return f.writeOut(resp.GetCertificatePem())
			},
			text: func(_ *kbv1.CreateSelfSignedCertificateRequest, resp *kbv1.CreateSelfSignedCertificateResponse) error {
				if f.out != "" {
					_, err := fmt.Fprintf(a.stdout, "x5t#S256: %s\n", resp.GetX5TS256())
					return err
				}
				return a.printValue(resp.GetCertificatePem())
			},
		}.runE(a),
	}
	f.subjectFlags.register(cmd.Flags())
	cmd.Flags().Var(&f.validity, "validity", "validity period `D` from now, as 90d, 1d12h or 36h (default 90d)")
	f.versionFlags.register(cmd.Flags())
	return cmd
}

// attestNonceSize is the size of attest's random nonce (keybrokerd takes
// up to kms.MaxNonce).
const attestNonceSize = 32

// attestFlags are the flags of "attest".
type attestFlags struct {
	versionFlags
	nonce string
}

// request checks the flags and returns the AttestKey request for key
// name. Unless nonceSet (--nonce was given), the nonce is
// attestNonceSize bytes read from random.
func (f attestFlags) request(name string, nonceSet bool, random io.Reader) (*kbv1.AttestKeyRequest, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	var nonce []byte
	if nonceSet {
		var err error
		if nonce, err = hex.DecodeString(f.nonce); err != nil {
			return nil, usageErrorf("--nonce: not hex: %v", err)
		}
		if len(nonce) == 0 || len(nonce) > kms.MaxNonce {
			return nil, usageErrorf("--nonce: got %d bytes, want 1 to %d", len(nonce), kms.MaxNonce)
		}
	} else {
		nonce = make([]byte, attestNonceSize)
		if _, err := io.ReadFull(random, nonce); err != nil {
			return nil, fmt.Errorf("making a nonce: %w", err)
		}
	}
	return &kbv1.AttestKeyRequest{Name: name, Version: f.version, Kid: f.kid, Nonce: nonce}, nil
}

// attestOutput is what "attest" prints; with --output json it is the
// AttestKeyResponse in the proto3 JSON mapping plus the nonce sent.
type attestOutput struct {
	Attest              string `json:"attest"`              // base64
	Signature           string `json:"signature"`           // base64
	CertifyingKeyPublic string `json:"certifyingKeyPublic"` // base64
	KeyPublic           string `json:"keyPublic"`           // base64
	Kid                 string `json:"kid"`
	Version             uint32 `json:"version"`
	Nonce               string `json:"nonce"` // hex, as --nonce takes it
}

func newAttestCmd(a *app) *cobra.Command {
	var f attestFlags
	cmd := &cobra.Command{
		Use:   "attest NAME [--nonce HEX]",
		Short: "Prove that a TPM key lives in the TPM (TPM2_Certify)",
		Long: `Have the TPM certify a key's active version, or the one --version or --kid
names (TPM2_Certify), proving that the key lives in this TPM. --nonce is
the freshness value to certify, 1 to 64 bytes in hex; by default it is 32
random bytes.

It prints, in standard base64: the TPMS_ATTEST as signed ("attest"), the
certifying key's ECDSA signature over its SHA-256 ("signature", ASN.1 DER),
and the TPM2B_PUBLIC of the certifying key and of the key; then the kid,
the version and the nonce in hex. With --output json it prints
{"attest","signature","certifyingKeyPublic","keyPublic","kid","version","nonce"}.`,
		Args: cobra.ExactArgs(1),
		RunE: rpc[*kbv1.AttestKeyRequest, *kbv1.AttestKeyResponse]{
			request: func(cmd *cobra.Command, args []string) (*kbv1.AttestKeyRequest, error) {
				return f.request(args[0], cmd.Flags().Changed("nonce"), rand.Reader)
			},
			call: kbv1.KeyBrokerClient.AttestKey,
			text: func(req *kbv1.AttestKeyRequest, resp *kbv1.AttestKeyResponse) error {
				return a.printAttestation(resp, req.GetNonce())
			},
			json: func(req *kbv1.AttestKeyRequest, resp *kbv1.AttestKeyResponse) error {
				return a.printAttestation(resp, req.GetNonce())
			},
		}.runE(a),
	}
	cmd.Flags().StringVar(&f.nonce, "nonce", "", fmt.Sprintf("freshness value, 1 to %d bytes in `hex` (default %d random bytes)", kms.MaxNonce, attestNonceSize))
	f.register(cmd.Flags())
	return cmd
}

func (a *app) printAttestation(resp *kbv1.AttestKeyResponse, nonce []byte) error {
	b64 := base64.StdEncoding.EncodeToString
	out := attestOutput{
		Attest:              b64(resp.GetAttest()),
		Signature:           b64(resp.GetSignature()),
		CertifyingKeyPublic: b64(resp.GetCertifyingKeyPublic()),
		KeyPublic:           b64(resp.GetKeyPublic()),
		Kid:                 resp.GetKid(),
		Version:             resp.GetVersion(),
		Nonce:               hex.EncodeToString(nonce),
	}
	if a.jsonOutput() {
		return json.NewEncoder(a.stdout).Encode(out)
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "attest:\t%s\n", out.Attest)
	fmt.Fprintf(tw, "signature:\t%s\n", out.Signature)
	fmt.Fprintf(tw, "certifying key public:\t%s\n", out.CertifyingKeyPublic)
	fmt.Fprintf(tw, "key public:\t%s\n", out.KeyPublic)
	fmt.Fprintf(tw, "kid:\t%s\n", out.Kid)
	fmt.Fprintf(tw, "version:\t%d\n", out.Version)
	fmt.Fprintf(tw, "nonce:\t%s\n", out.Nonce)
	return tw.Flush()
}
