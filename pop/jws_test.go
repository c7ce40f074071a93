package pop

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
)

// SignJWS output verifies with an independent verifier and with VerifyJWS,
// and carries exactly the header members asked for.
func TestSignVerifyJWSRoundTrip(t *testing.T) {
	ctx := context.Background()
	payload := []byte(`{"sub":"alice","n":1}`)
	for _, s := range signerCases(t) {
		t.Run(s.alg, func(t *testing.T) {
			pub := s.priv.Public()
			for _, tc := range []struct {
				name     string
				opts     JWSOptions
				wantHdr  string
				checkJWK bool
			}{
				{"default", JWSOptions{Header: map[string]any{"typ": "JWT"}}, "alg,kid,typ", false},
				{"omit kid", JWSOptions{OmitKid: true}, "alg", false},
				{"embed jwk", JWSOptions{EmbedJWK: true, OmitKid: true}, "alg,jwk", true},
				{"matching kid and jwk in Header", JWSOptions{Header: map[string]any{"kid": s.jwk.Kid, "jwk": s.jwk}}, "alg,jwk,kid", false},
			} {
				t.Run(tc.name, func(t *testing.T) {
					jws, err := SignJWS(ctx, s, payload, tc.opts)
					if err != nil {
						t.Fatalf("SignJWS: %v", err)
					}
					if !refVerify(t, jws, pub) {
						t.Fatalf("independent verifier rejects %s", jws)
					}
					hdr := decodeSegment(t, jws, 0)
					if got := keys(hdr); got != tc.wantHdr {
						t.Errorf("header members: got %s, want %s", got, tc.wantHdr)
					}
					if hdr["alg"] != s.alg {
						t.Errorf("alg: got %v, want %s", hdr["alg"], s.alg)
					}
					if kid, ok := hdr["kid"]; ok && kid != s.jwk.Kid {
						t.Errorf("kid: got %v, want %s", kid, s.jwk.Kid)
					}
					if tc.checkJWK {
						j := hdr["jwk"].(map[string]any)
						want := "e,kty,n"
						if s.jwk.Kty == "EC" {
							want = "crv,kty,x,y"
						}
						if got := keys(j); got != want {
							t.Errorf("embedded jwk members: got %s, want %s", got, want)
						}
					}
					gotHdr, gotPayload, err := VerifyJWS(jws, pub)
					if err != nil {
						t.Fatalf("VerifyJWS: %v", err)
					}
					if !bytes.Equal(gotPayload, payload) {
						t.Errorf("payload: got %s, want %s", gotPayload, payload)
					}
					if string(gotHdr["alg"]) != `"`+s.alg+`"` {
						t.Errorf("VerifyJWS header alg: got %s", gotHdr["alg"])
					}
				})
			}
		})
	}
}

// ParseJWS returns exactly the signed bytes and the raw signature.
func TestParseJWS(t *testing.T) {
	s := newTestSigner(t, "ES256", fixtures().p256)
	jws, err := SignJWS(context.Background(), s, []byte("hello"), JWSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(jws, ".")
	hdr, payload, input, sig, err := ParseJWS(jws)
	if err != nil {
		t.Fatalf("ParseJWS: %v", err)
	}
	if string(input) != parts[0]+"."+parts[1] {
		t.Errorf("signing input: got %q, want %q", input, parts[0]+"."+parts[1])
	}
	if string(payload) != "hello" {
		t.Errorf("payload: got %q", payload)
	}
	if !bytes.Equal(sig, mustB64(t, parts[2])) || len(sig) != 64 {
		t.Errorf("signature: got %x (%d bytes)", sig, len(sig))
	}
	if string(hdr["kid"]) != `"`+s.jwk.Kid+`"` {
		t.Errorf("kid: got %s", hdr["kid"])
	}
}

func TestParseJWSRejects(t *testing.T) {
	b := func(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
	sig := b("sig")
	for _, tc := range []struct {
		name, jws string
	}{
		{"two parts", b(`{"alg":"ES256"}`) + "." + b("x")},
		{"four parts", b(`{"alg":"ES256"}`) + "." + b("x") + "." + sig + ".x"},
		{"JWE-like five parts", "a.b.c.d.e"},
		{"padded header", base64.URLEncoding.EncodeToString([]byte(`{"alg":"ES256" }`)) + "." + b("x") + "." + sig},
		{"standard base64 signature", b(`{"alg":"ES256"}`) + "." + b("x") + "." + "ab+/"},
		{"header not JSON", b(`alg`) + "." + b("x") + "." + sig},
		{"header an array", b(`["alg"]`) + "." + b("x") + "." + sig},
		{"duplicate alg", b(`{"alg":"ES256","alg":"none"}`) + "." + b("x") + "." + sig},
		{"duplicate via escape", b(`{"alg":"ES256","\u0061lg":"none"}`) + "." + b("x") + "." + sig},
		{"trailing data", b(`{"alg":"ES256"}{}`) + "." + b("x") + "." + sig},
		{"no alg", b(`{"typ":"JWT"}`) + "." + b("x") + "." + sig},
		{"alg not a string", b(`{"alg":1}`) + "." + b("x") + "." + sig},
		{"invalid UTF-8", b("{\"alg\":\"ES256\",\"x\":\"\xff\"}") + "." + b("x") + "." + sig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, _, _, err := ParseJWS(tc.jws); !errors.Is(err, ErrMalformedJWS) {
				t.Errorf("ParseJWS: got %v, want ErrMalformedJWS", err)
			}
		})
	}
}

// SignJWS refuses header members it must control, before calling Sign.
func TestSignJWSRefusesHeader(t *testing.T) {
	f := fixtures()
	s := newTestSigner(t, "ES256", f.p256)
	other, err := NewJWK(&f.p384.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	withD := map[string]any{"kty": "EC", "crv": "P-256", "x": s.jwk.X, "y": s.jwk.Y, "d": "AAAA"}
	for _, tc := range []struct {
		name   string
		opts   JWSOptions
		member string
	}{
		{"alg none", JWSOptions{Header: map[string]any{"alg": "none"}}, "alg"},
		{"alg same as signer", JWSOptions{Header: map[string]any{"alg": "ES256"}}, "alg"},
		{"alg HS256", JWSOptions{Header: map[string]any{"alg": "HS256"}}, "alg"},
		{"crit", JWSOptions{Header: map[string]any{"crit": []string{"exp"}}}, "crit"},
		{"b64", JWSOptions{Header: map[string]any{"b64": false}}, "b64"},
		{"other kid", JWSOptions{Header: map[string]any{"kid": "someone-else"}}, "kid"},
		{"kid not a string", JWSOptions{Header: map[string]any{"kid": 7}}, "kid"},
		{"kid with OmitKid", JWSOptions{OmitKid: true, Header: map[string]any{"kid": s.jwk.Kid}}, "kid"},
		{"jwk of another key", JWSOptions{Header: map[string]any{"jwk": other}}, "jwk"},
		{"jwk with private member", JWSOptions{Header: map[string]any{"jwk": withD}}, "jwk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := s.calls.Load()
			jws, err := SignJWS(context.Background(), s, []byte("x"), tc.opts)
			var he *HeaderError
			if !errors.As(err, &he) || he.Member != tc.member {
				t.Fatalf("SignJWS: got %q, %v; want a *HeaderError for %q", jws, err, tc.member)
			}
			if n := s.calls.Load() - before; n != 0 {
				t.Errorf("Sign called %d times for a refused header", n)
			}
		})
	}
}

// SignJWS checks each signature before returning it, so backends that
// return DER, use a maximum PSS salt or sign with another key are caught,
// and it checks the signer before signing.
func TestSignJWSChecksSigner(t *testing.T) {
	ctx := context.Background()
	f := fixtures()

	der := newTestSigner(t, "ES256", f.p256)
	der.mode = signDER
	if _, err := SignJWS(ctx, der, []byte("x"), JWSOptions{}); !errors.Is(err, ErrInvalidSignature) {
		t.Errorf("DER signer: got %v, want ErrInvalidSignature", err)
	}

	maxSalt := newTestSigner(t, "PS256", f.rsa2048)
	maxSalt.mode = signMaxSalt
	if _, err := SignJWS(ctx, maxSalt, []byte("x"), JWSOptions{}); !errors.Is(err, ErrVerification) {
		t.Errorf("max-salt PSS signer: got %v, want ErrVerification", err)
	}

	wrongKey := newTestSigner(t, "ES256", f.p256)
	other := newTestSigner(t, "ES256", mustP256(t))
	wrongKey.jwk = other.jwk
	if _, err := SignJWS(ctx, wrongKey, []byte("x"), JWSOptions{}); !errors.Is(err, ErrVerification) {
		t.Errorf("signer with another key's JWK: got %v, want ErrVerification", err)
	}

	for _, tc := range []struct {
		name string
		s    *testSigner
		want error
	}{
		{"alg none", &testSigner{alg: "none", priv: f.p256, jwk: newTestSigner(t, "ES256", f.p256).jwk}, ErrUnsupportedAlg},
		{"alg HS256", &testSigner{alg: "HS256", priv: f.p256, jwk: newTestSigner(t, "ES256", f.p256).jwk}, ErrUnsupportedAlg},
		{"ES384 with a P-256 key", &testSigner{alg: "ES384", priv: f.p256, jwk: publicMembers(newTestSigner(t, "ES256", f.p256).jwk)}, ErrUnsupportedKey},
		{"RS256 with an EC key", &testSigner{alg: "RS256", priv: f.p256, jwk: publicMembers(newTestSigner(t, "ES256", f.p256).jwk)}, ErrUnsupportedKey},
		{"ES256 with an RSA key", &testSigner{alg: "ES256", priv: f.rsa2048, jwk: publicMembers(newTestSigner(t, "RS256", f.rsa2048).jwk)}, ErrUnsupportedKey},
		{"RSA 1024", newTestSigner(t, "RS256", f.rsa1024), ErrUnsupportedKey},
		{"JWK alg differs", &testSigner{alg: "PS256", priv: f.rsa2048, jwk: newTestSigner(t, "RS256", f.rsa2048).jwk}, ErrInvalidKey},
		{"empty JWK", &testSigner{alg: "ES256", priv: f.p256}, ErrInvalidKey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := SignJWS(ctx, tc.s, []byte("x"), JWSOptions{}); !errors.Is(err, tc.want) {
				t.Errorf("SignJWS: got %v, want %v", err, tc.want)
			}
			if n := tc.s.calls.Load(); n != 0 {
				t.Errorf("Sign called %d times for a bad signer", n)
			}
		})
	}

	failing := &failingSigner{newTestSigner(t, "ES256", f.p256)}
	if _, err := SignJWS(ctx, failing, []byte("x"), JWSOptions{}); !errors.Is(err, errBackend) {
		t.Errorf("failing signer: got %v, want its error wrapped", err)
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	s := newTestSigner(t, "ES256", f.p256)
	if _, err := SignJWS(cancelled, s, []byte("x"), JWSOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: got %v, want context.Canceled", err)
	}
	if _, err := SignJWS(ctx, nil, []byte("x"), JWSOptions{}); err == nil {
		t.Error("nil Signer: got no error")
	}
}

var errBackend = errors.New("backend unavailable")

// failingSigner's Sign always fails, as a backend that is down does.
type failingSigner struct{ *testSigner }

func (failingSigner) Sign(context.Context, []byte) ([]byte, error) { return nil, errBackend }

// mustP256 returns a new P-256 key, other than the fixture's.
func mustP256(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	p, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// VerifyJWS accepts exactly the RFC 7518 encodings and rejects the rest.
func TestVerifyJWSRejects(t *testing.T) {
	f := fixtures()
	hdr := func(alg string) map[string]any { return map[string]any{"alg": alg} }
	payload := map[string]any{"sub": "alice"}
	// Controls: the same constructions with the right parameters verify, so
	// each rejection below is for the reason named.
	for _, tc := range []struct {
		alg  string
		priv crypto.Signer
	}{
		{"ES256", f.p256}, {"ES384", f.p384}, {"ES512", f.p521},
		{"RS256", f.rsa2048}, {"RS384", f.rsa2048}, {"RS512", f.rsa2048},
		{"PS256", f.rsa2048}, {"PS384", f.rsa2048}, {"PS512", f.rsa2048},
	} {
		jws := craftJWS(t, tc.alg, tc.priv, signOK, hdr(tc.alg), payload)
		if _, _, err := VerifyJWS(jws, tc.priv.Public()); err != nil {
			t.Errorf("control %s: VerifyJWS: %v", tc.alg, err)
		}
	}

	good := craftJWS(t, "ES256", f.p256, signOK, hdr("ES256"), payload)
	parts := strings.Split(good, ".")
	otherPayload := base64.RawURLEncoding.EncodeToString([]byte(`{"sub":"mallory"}`))
	noneHdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none"}`))

	for _, tc := range []struct {
		name    string
		jws     string
		pub     crypto.PublicKey
		want    error  // errors.Is target, or nil
		wantHdr string // *HeaderError member, or ""
	}{
		{"alg none, empty signature", noneHdr + "." + parts[1] + ".", &f.p256.PublicKey, ErrUnsupportedAlg, "alg"},
		{"alg none, with signature", noneHdr + "." + parts[1] + "." + parts[2], &f.p256.PublicKey, ErrUnsupportedAlg, "alg"},
		{"alg NONE", craftJWS(t, "ES256", f.p256, signOK, hdr("NONE"), payload), &f.p256.PublicKey, ErrUnsupportedAlg, "alg"},
		{"alg HS256", craftJWS(t, "ES256", f.p256, signOK, hdr("HS256"), payload), &f.p256.PublicKey, ErrUnsupportedAlg, "alg"},
		{"ES256 header, RSA key", good, &f.rsa2048.PublicKey, ErrUnsupportedKey, "alg"},
		{"ES384 header, P-256 key", craftJWS(t, "ES256", f.p256, signOK, hdr("ES384"), payload), &f.p256.PublicKey, ErrUnsupportedKey, "alg"},
		{"RS256 header, EC key", craftJWS(t, "ES256", f.p256, signOK, hdr("RS256"), payload), &f.p256.PublicKey, ErrUnsupportedKey, "alg"},
		{"RSA 1024 key", craftJWS(t, "RS256", f.rsa1024, signOK, hdr("RS256"), payload), &f.rsa1024.PublicKey, ErrUnsupportedKey, "alg"},
		{"nil key", good, nil, ErrUnsupportedKey, "alg"},
		{"PS256 with maximum salt", craftJWS(t, "PS256", f.rsa2048, signMaxSalt, hdr("PS256"), payload), &f.rsa2048.PublicKey, ErrVerification, ""},
		{"PS512 with maximum salt", craftJWS(t, "PS512", f.rsa2048, signMaxSalt, hdr("PS512"), payload), &f.rsa2048.PublicKey, ErrVerification, ""},
		{"RS256 signature under PS256 header", craftJWS(t, "RS256", f.rsa2048, signOK, hdr("PS256"), payload), &f.rsa2048.PublicKey, ErrVerification, ""},
		{"ES256 DER signature", craftJWS(t, "ES256", f.p256, signDER, hdr("ES256"), payload), &f.p256.PublicKey, ErrInvalidSignature, ""},
		{"ES384 DER signature", craftJWS(t, "ES384", f.p384, signDER, hdr("ES384"), payload), &f.p384.PublicKey, ErrInvalidSignature, ""},
		{"ES256 signature one byte short", parts[0] + "." + parts[1] + "." + base64.RawURLEncoding.EncodeToString(mustB64(t, parts[2])[:63]), &f.p256.PublicKey, ErrInvalidSignature, ""},
		{"RSA signature truncated", truncateSig(t, craftJWS(t, "RS256", f.rsa2048, signOK, hdr("RS256"), payload)), &f.rsa2048.PublicKey, ErrInvalidSignature, ""},
		{"tampered payload", parts[0] + "." + otherPayload + "." + parts[2], &f.p256.PublicKey, ErrVerification, ""},
		{"tampered header", base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"ES256","typ":"JWT"}`)) + "." + parts[1] + "." + parts[2], &f.p256.PublicKey, ErrVerification, ""},
		{"other key", good, &f.p384.PublicKey, ErrUnsupportedKey, "alg"},
		{"other P-256 key", good, &mustP256(t).PublicKey, ErrVerification, ""},
		{"crit", craftJWS(t, "ES256", f.p256, signOK, map[string]any{"alg": "ES256", "crit": []string{"b64"}, "b64": false}, payload), &f.p256.PublicKey, nil, "crit"},
		{"duplicate alg", craftJWS(t, "ES256", f.p256, signOK, `{"alg":"ES256","alg":"ES256"}`, payload), &f.p256.PublicKey, ErrMalformedJWS, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := VerifyJWS(tc.jws, tc.pub)
			if err == nil {
				t.Fatal("VerifyJWS: got no error")
			}
			t.Log(err)
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("VerifyJWS: got %v, want %v", err, tc.want)
			}
			var he *HeaderError
			if tc.wantHdr != "" && (!errors.As(err, &he) || he.Member != tc.wantHdr) {
				t.Errorf("VerifyJWS: got %v, want a *HeaderError for %q", err, tc.wantHdr)
			}
		})
	}
}

func truncateSig(t testing.TB, jws string) string {
	t.Helper()
	i := strings.LastIndex(jws, ".")
	sig := mustB64(t, jws[i+1:])
	return jws[:i+1] + base64.RawURLEncoding.EncodeToString(sig[1:])
}

// The HeaderError message names the member; Unwrap exposes the cause.
func TestHeaderError(t *testing.T) {
	err := error(&HeaderError{Member: "alg", Reason: "bad", err: ErrUnsupportedAlg})
	if got, want := err.Error(), `pop: JWS header "alg": bad`; got != want {
		t.Errorf("Error: got %q, want %q", got, want)
	}
	if !errors.Is(err, ErrUnsupportedAlg) {
		t.Error("errors.Is(ErrUnsupportedAlg): false")
	}
}

// decodeObject keeps exact member names and rejects duplicates.
func TestDecodeObject(t *testing.T) {
	obj, err := decodeObject([]byte(` {"a":1, "b":{"c":[1,2]}} `))
	if err != nil {
		t.Fatal(err)
	}
	if string(obj["a"]) != "1" || string(obj["b"]) != `{"c":[1,2]}` || len(obj) != 2 {
		t.Errorf("got %v", obj)
	}
	for _, bad := range []string{``, `null`, `[]`, `{"a":1,"a":2}`, `{"a":1}x`, `{"a":}`, `{"a":1`} {
		if _, err := decodeObject([]byte(bad)); err == nil {
			t.Errorf("decodeObject(%q): got no error", bad)
		}
	}
}

// The RSA key used in the JWS tests really is 2048 bits (the boundary).
func TestMinRSABits(t *testing.T) {
	if got := fixtures().rsa2048.N.BitLen(); got != minRSABits {
		t.Fatalf("fixture modulus: got %d bits, want %d", got, minRSABits)
	}
}
