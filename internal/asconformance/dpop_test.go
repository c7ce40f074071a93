package asconformance

import (
	"context"
	"net/http"
	"slices"
	"strings"
	"testing"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/client"
	"github.com/keybroker/keybroker/internal/oidcprovidertest"
	"github.com/keybroker/keybroker/pop"
)

// TestDPoP: for each key type, oidc-provider issues a DPoP-bound token
// (token_type DPoP, cnf.jkt = the keybroker key's thumbprint) to a client
// whose proofs the SDK's DPoPTransport makes with the key — after the AS's
// use_dpop_nonce challenge — and the resource server accepts the token with
// a proof by that key only.
func TestDPoP(t *testing.T) {
	e := newEnv(t)
	other := e.key(t, "dpop-other", kbv1.Algorithm_ALGORITHM_ES256)
	signers := map[kbv1.Algorithm]*client.Signer{}
	clients := []map[string]any{rsClientMetadata()}
	for _, alg := range algs {
		signers[alg] = e.key(t, "dpop-"+algName(alg), alg)
		clients = append(clients, map[string]any{
			"client_id": "dpop-" + algName(alg), "client_secret": rsSecret + algName(alg),
			"token_endpoint_auth_method": "client_secret_basic", "dpop_bound_access_tokens": true,
		})
	}
	as := oidcprovidertest.Start(t, oidcprovidertest.Config{CA: e.ca, Clients: clients, RequireDPoPNonce: true})
	for _, a := range algs {
		if !slices.Contains(as.Metadata.DPoPSigningAlgValuesSupported, a.String()[len("ALGORITHM_"):]) {
			t.Fatalf("AS dpop_signing_alg_values_supported %v: want %s", as.Metadata.DPoPSigningAlgValuesSupported, a)
		}
	}
	res := newRS(t, e.ca, as)
	base := as.HTTPClient(nil).Transport

	for _, alg := range algs {
		t.Run(alg.String(), func(t *testing.T) {
			s := signers[alg]
			id := "dpop-" + algName(alg)
			basic := id + ":" + rsSecret + algName(alg)
			ctx := ctx30(t)

			// The client must send DPoP (dpop_bound_access_tokens).
			tr, err := as.Token(ctx, as.HTTPClient(nil), nil, basic)
			if err != nil {
				t.Fatal(err)
			}
			if tr.Status != http.StatusBadRequest || tr.Error != "invalid_grant" {
				t.Fatalf("token without a DPoP proof: %s, want 400 invalid_grant", tr)
			}
			if ev := lastEvent(t, as); !strings.Contains(ev.ErrorDetail, "DPoP proof JWT not provided") {
				t.Fatalf("AS said %s", ev)
			}

			dpop := &client.DPoPTransport{Signer: s.JOSE(), Base: base}
			tr, err = as.Token(ctx, &http.Client{Transport: dpop}, nil, basic)
			if err != nil {
				t.Fatal(err)
			}
			if tr.Status != http.StatusOK || tr.TokenType != "DPoP" || tr.AccessToken == "" {
				t.Fatalf("token with DPoP: %s, want 200 and a DPoP token\n%v", tr, as.Events(t))
			}
			nonce := false
			for _, ev := range as.Events(t) {
				if ev.Error == "use_dpop_nonce" {
					nonce = true
				} else {
					t.Errorf("unexpected AS error %s", ev)
				}
			}
			if !nonce {
				t.Error("the AS never asked for a DPoP nonce: the SDK's nonce retry was not exercised")
			}

			conf, err := e.c.API().GetConfirmation(ctx, &kbv1.GetConfirmationRequest{Name: s.Name()})
			if err != nil {
				t.Fatal(err)
			}
			tp, err := pop.Thumbprint(s.Public())
			if err != nil {
				t.Fatal(err)
			}
			in, err := as.Introspect(ctx, tr.AccessToken, rsClientID+":"+rsSecret)
			if err != nil {
				t.Fatal(err)
			}
			if !in.Active || in.TokenType != "DPoP" || in.ClientID != id || in.Cnf.JKT != tp || conf.GetJkt() != tp {
				t.Fatalf("introspection %+v: want active DPoP token of %s with cnf.jkt %s (GetConfirmation jkt %s)", in, id, tp, conf.GetJkt())
			}

			own := &http.Client{Transport: &client.DPoPTransport{Signer: s.JOSE(), Base: base, Token: staticToken(tr.AccessToken)}}
			if a := call(t, own, res.URL, nil); a.Status != http.StatusOK || a.Binding != "dpop" || a.ClientID != id {
				t.Fatalf("RS with the key's proof: %+v, want 200 dpop for %s", a, id)
			}
			stolen := &http.Client{Transport: &client.DPoPTransport{Signer: other.JOSE(), Base: base, Token: staticToken(tr.AccessToken)}}
			if a := call(t, stolen, res.URL, nil); a.Status != http.StatusUnauthorized || !strings.Contains(a.Reason, "is not the token's cnf.jkt") {
				t.Fatalf("RS with another key's proof: %+v, want 401 (proof key is not cnf.jkt)", a)
			}
			if a := call(t, as.HTTPClient(nil), res.URL, http.Header{"Authorization": {"Bearer " + tr.AccessToken}}); a.Status != http.StatusUnauthorized || !strings.Contains(a.Reason, "DPoP scheme") {
				t.Fatalf("RS with the token as a bearer token: %+v, want 401", a)
			}
		})
	}
}

// staticToken is a DPoPTransport.Token that sends token.
func staticToken(token string) func(context.Context) (string, error) {
	return func(context.Context) (string, error) { return token, nil }
}
