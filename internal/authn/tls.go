package authn

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
)

// ServerTLS returns the TLS configuration of keybrokerd's TCP listener:
// the server certificate chain and key from certFile and keyFile (PEM),
// client certificates required and verified against the CA certificates
// of clientCAFile (PEM bundle), TLS 1.2 or later. Pass it to
// credentials.NewTLS. Each error names the file that is bad.
func ServerTLS(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	certPEM, err := readFile("server certificate", certFile)
	if err != nil {
		return nil, err
	}
	if _, err := parseCerts(certPEM); err != nil {
		return nil, fmt.Errorf("authn: server certificate %q: %w", certFile, err)
	}
	keyPEM, err := readFile("server key", keyFile)
	if err != nil {
		return nil, err
	}
	if err := checkKeyPEM(keyPEM); err != nil {
		return nil, fmt.Errorf("authn: server key %q: %w", keyFile, err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// Both files parse on their own: they do not belong together
		// (or the key is of an unsupported type).
		return nil, fmt.Errorf("authn: server certificate %q and key %q: %w", certFile, keyFile, err)
	}

	caPEM, err := readFile("client CA bundle", clientCAFile)
	if err != nil {
		return nil, err
	}
	cas, err := parseCerts(caPEM)
	if err != nil {
		return nil, fmt.Errorf("authn: client CA bundle %q: %w", clientCAFile, err)
	}
	pool := x509.NewCertPool()
	for _, ca := range cas {
		pool.AddCert(ca)
	}

	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// readFile reads name, naming it and what it is on error; the error
// matches fs.ErrNotExist and the like.
func readFile(what, name string) ([]byte, error) {
	b, err := os.ReadFile(name)
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return nil, fmt.Errorf("authn: %s %q: %s: %w", what, name, pe.Op, pe.Err)
	}
	if err != nil {
		return nil, fmt.Errorf("authn: %s %q: %w", what, name, err)
	}
	return b, nil
}

// parseCerts parses the CERTIFICATE blocks of a PEM file, of which there
// must be at least one. Like tls.X509KeyPair and CertPool.AppendCertsFromPEM
// it skips other blocks and text between blocks (bundles carry comments;
// a certificate file may also hold its key).
func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for n := 1; ; n++ {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", n, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block")
	}
	return certs, nil
}

// checkKeyPEM checks that the first PEM private key in data parses, as
// tls.X509KeyPair will parse it, and says nothing of the key in errors.
func checkKeyPEM(data []byte) error {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return errors.New("no PEM PRIVATE KEY block")
		}
		if block.Type != "PRIVATE KEY" && !strings.HasSuffix(block.Type, " PRIVATE KEY") {
			continue // e.g. EC PARAMETERS before an EC PRIVATE KEY
		}
		if block.Type == "ENCRYPTED PRIVATE KEY" || block.Headers["Proc-Type"] != "" {
			return errors.New("private key is encrypted; keybrokerd needs it unencrypted (protect the file instead)")
		}
		if _, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
			return nil
		}
		if _, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
			return nil
		}
		if _, err := x509.ParseECPrivateKey(block.Bytes); err == nil {
			return nil
		}
		return fmt.Errorf("%s block is not a PKCS #1, PKCS #8 or SEC 1 private key", block.Type)
	}
}
