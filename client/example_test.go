package client_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"time"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/pop"
)

// The examples run against the daemon TestMain starts; in an application,
// Dial("") finds keybrokerd through $KEYBROKER_SOCKET or the default socket.

func createKey(c *client.Client, name string, alg kbv1.Algorithm) {
	if _, err := c.API().CreateKey(context.Background(), &kbv1.CreateKeyRequest{Name: name, Algorithm: alg}); err != nil {
		log.Fatal(err)
	}
}

func ExampleClient_Signer() {
	c, err := client.Dial("")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	createKey(c, "example-signer", kbv1.Algorithm_ALGORITHM_ES256)

	s, err := c.Signer(context.Background(), "example-signer")
	if err != nil {
		log.Fatal(err)
	}
	digest := sha256.Sum256([]byte("hello"))
	sig, err := s.Sign(nil, digest[:], crypto.SHA256) // a crypto.Signer: DER ECDSA
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("verifies:", ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], sig))
	// Output: verifies: true
}

func ExampleSigner_ReqCnf() {
	c, _ := client.Dial("")
	defer c.Close()
	createKey(c, "example-reqcnf", kbv1.Algorithm_ALGORITHM_RS256)
	s, err := c.Signer(context.Background(), "example-reqcnf")
	if err != nil {
		log.Fatal(err)
	}
	_, kidForm, err := s.ReqCnf()
	if err != nil {
		log.Fatal(err)
	}
	// Send kidForm as req_cnf with token_type=pop; the token's cnf then
	// names this key's thumbprint.
	raw, _ := base64.RawURLEncoding.DecodeString(kidForm)
	fmt.Println(string(raw) == fmt.Sprintf(`{"kid":%q,"xms_ksl":"uhw"}`, s.KeyID()))
	// Output: true
}

func ExampleSigner_PoPAuthorization() {
	c, _ := client.Dial("")
	defer c.Close()
	createKey(c, "example-shr", kbv1.Algorithm_ALGORITHM_ES256)
	s, err := c.Signer(context.Background(), "example-shr")
	if err != nil {
		log.Fatal(err)
	}
	req, _ := http.NewRequest("GET", "https://api.example.com/orders?id=7", nil)
	authz, err := s.PoPAuthorization(context.Background(), "an-access-token", req, "")
	if err != nil {
		log.Fatal(err)
	}
	// What a resource server checks:
	claims, err := pop.VerifySignedHTTPRequest(authz[len("PoP "):], pop.SHRCheck{
		AccessToken: "an-access-token", Method: "GET", URL: req.URL.String(), Now: time.Now(),
	})
	fmt.Println(err == nil, claims.Thumbprint == s.KeyID())
	// Output: true true
}

func ExampleDPoPTransport() {
	c, _ := client.Dial("")
	defer c.Close()
	createKey(c, "example-dpop", kbv1.Algorithm_ALGORITHM_ES256)
	s, err := c.Signer(context.Background(), "example-dpop")
	if err != nil {
		log.Fatal(err)
	}
	// A resource server that accepts only DPoP-bound calls.
	rs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := pop.VerifyDPoPProof(r.Header.Get("DPoP"), pop.DPoPCheck{
			Method: r.Method, URL: "http://" + r.Host + r.URL.Path, AccessToken: "tok", Now: time.Now(),
		})
		if err != nil {
			http.Error(w, "bad proof", http.StatusUnauthorized)
			return
		}
		io.WriteString(w, "hello, bound caller")
	}))
	defer rs.Close()

	hc := &http.Client{Transport: &client.DPoPTransport{
		Signer: s.JOSE(),
		Token:  func(context.Context) (string, error) { return "tok", nil },
	}}
	resp, err := hc.Get(rs.URL + "/data")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(string(body))
	// Output: hello, bound caller
}
