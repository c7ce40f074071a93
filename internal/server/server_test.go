package server

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"strings"
	"sync"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/kms"
	"github.com/keybroker/keybroker/kms/kmstest"
	"github.com/keybroker/keybroker/pop"
)

func digestOf(h crypto.Hash, msg string) []byte {
	switch h {
	case crypto.SHA384:
		d := sha512.Sum384([]byte(msg))
		return d[:]
	case crypto.SHA512:
		d := sha512.Sum512([]byte(msg))
		return d[:]
	}
	d := sha256.Sum256([]byte(msg))
	return d[:]
}

// publicKeys fetches the public key of name through GetPublicKey (PEM and
// DER) and through GetJWKS, checks they agree, and returns it.
func (s *stack) publicKey(t *testing.T, name, kid string) crypto.PublicKey {
	t.Helper()
	ctx := ctxT(t)
	resp, err := s.client.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: name})
	if err != nil {
		t.Fatalf("GetPublicKey: %v", err)
	}
	if resp.Kid != kid || resp.Thumbprint != kid {
		t.Fatalf("GetPublicKey kid %q thumbprint %q, want %q", resp.Kid, resp.Thumbprint, kid)
	}
	block, _ := pem.Decode([]byte(resp.Pem))
	if block == nil || block.Type != "PUBLIC KEY" || string(block.Bytes) != string(resp.Der) {
		t.Fatalf("PEM does not hold the DER public key: %q", resp.Pem)
	}
	fromPEM, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	var jwk pop.JWK
	if err := json.Unmarshal([]byte(resp.Jwk), &jwk); err != nil {
		t.Fatal(err)
	}
	if tp, err := jwk.Thumbprint(); err != nil || tp != kid {
		t.Fatalf("JWK thumbprint %q (%v), want kid %q", tp, err, kid)
	}

	jresp, err := s.client.GetJWKS(ctx, &kbv1.GetJWKSRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var set pop.JWKS
	if err := json.Unmarshal([]byte(jresp.Jwks), &set); err != nil {
		t.Fatal(err)
	}
	var fromJWKS crypto.PublicKey
	for _, k := range set.Keys {
		if k.Kid == kid {
			if fromJWKS, err = k.PublicKey(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if fromJWKS == nil {
		t.Fatalf("kid %s not in JWKS %s", kid, jresp.Jwks)
	}
	if !fromJWKS.(interface{ Equal(crypto.PublicKey) bool }).Equal(fromPEM) {
		t.Fatal("JWKS and PEM public keys differ")
	}
	return fromJWKS
}

func TestSignVerifyEveryAlgorithm(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	for _, spec := range kmstest.AllSpecs() {
		t.Run(kmstest.Name(spec), func(t *testing.T) {
			name := strings.ToLower(kmstest.Name(spec))
			ck, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: name, Algorithm: algToProto(spec.Alg), Bits: int32(spec.Bits)})
			if err != nil {
				t.Fatalf("CreateKey: %v", err)
			}
			kid := ck.Key.ActiveKid
			if ck.Key.ActiveVersion != 1 || len(ck.Key.Versions) != 1 || ck.Key.Versions[0].State != kbv1.KeyState_KEY_STATE_ACTIVE {
				t.Fatalf("new key: %v", ck.Key)
			}
			pub := s.publicKey(t, name, kid)
			if !spec.Alg.MatchesPublicKey(pub, spec.Bits) {
				t.Fatalf("public key %T does not match %s", pub, kmstest.Name(spec))
			}

			hash := spec.Alg.Hash()
			digest := digestOf(hash, "hello "+name)
			formats := []kbv1.SignatureFormat{kbv1.SignatureFormat_SIGNATURE_FORMAT_DER, kbv1.SignatureFormat_SIGNATURE_FORMAT_JOSE}
			for _, f := range formats {
				resp, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: name, Digest: digest, Format: f})
				if err != nil {
					t.Fatalf("Sign %v: %v", f, err)
				}
				if resp.Kid != kid || resp.Version != 1 || resp.Algorithm != algToProto(spec.Alg) {
					t.Fatalf("Sign response names kid %q v%d %v, want %q v1 %v", resp.Kid, resp.Version, resp.Algorithm, kid, spec.Alg)
				}
				verify(t, spec.Alg, pub, digest, resp.Signature, f == kbv1.SignatureFormat_SIGNATURE_FORMAT_JOSE)
			}
			if spec.Alg == kms.RS256 {
				// An RS256 key can also sign PSS (TLS 1.3 asks for it).
				resp, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: name, Digest: digest, Padding: kbv1.RSAPadding_RSA_PADDING_PSS})
				if err != nil {
					t.Fatal(err)
				}
				verify(t, kms.PS256, pub, digest, resp.Signature, false)
			}
		})
	}
}

// verify checks a signature the way a JOSE verifier would: JOSE ECDSA must
// be exactly r||s, PSS must use salt = hash length.
func verify(t *testing.T, alg kms.Algorithm, pub crypto.PublicKey, digest, sig []byte, jose bool) {
	t.Helper()
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if jose {
			size := (k.Curve.Params().BitSize + 7) / 8
			if len(sig) != 2*size {
				t.Fatalf("JOSE signature: got %d bytes, want %d", len(sig), 2*size)
			}
			r, s := new(big.Int).SetBytes(sig[:size]), new(big.Int).SetBytes(sig[size:])
			if !ecdsa.Verify(k, digest, r, s) {
				t.Fatal("JOSE ECDSA signature does not verify")
			}
			return
		}
		if !ecdsa.VerifyASN1(k, digest, sig) {
			t.Fatal("DER ECDSA signature does not verify")
		}
	case *rsa.PublicKey:
		var err error
		if alg == kms.PS256 {
			err = rsa.VerifyPSS(k, crypto.SHA256, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		} else {
			err = rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, sig)
		}
		if err != nil {
			t.Fatalf("%v signature: %v", alg, err)
		}
	default:
		t.Fatalf("unexpected key %T", pub)
	}
}

func TestSignOtherHashes(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "ec", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	ck, _ := s.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: "ec"})
	pub := s.publicKey(t, "ec", ck.Key.ActiveKid).(*ecdsa.PublicKey)
	for h, ph := range map[crypto.Hash]kbv1.HashAlgorithm{crypto.SHA384: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA384, crypto.SHA512: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA512} {
		d := digestOf(h, "x")
		resp, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "ec", Digest: d, Hash: ph})
		if err != nil {
			t.Fatalf("%v: %v", h, err)
		}
		if !ecdsa.VerifyASN1(pub, d, resp.Signature) {
			t.Fatalf("%v: signature does not verify", h)
		}
	}
}

// TestBadInput: every malformed request gets INVALID_ARGUMENT naming the
// field, and none reaches the hardware.
func TestBadInput(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "ec", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "rsa", Algorithm: kbv1.Algorithm_ALGORITHM_RS256}); err != nil {
		t.Fatal(err)
	}
	d32, d48 := make([]byte, 32), make([]byte, 48)
	sign := func(r *kbv1.SignRequest) error { _, err := s.client.Sign(ctx, r); return err }
	create := func(r *kbv1.CreateKeyRequest) error { _, err := s.client.CreateKey(ctx, r); return err }
	es := kbv1.Algorithm_ALGORITHM_ES256
	cases := []struct {
		name  string
		field string
		call  func() error
	}{
		{"digest 31 bytes", "digest", func() error { return sign(&kbv1.SignRequest{Name: "ec", Digest: d32[:31]}) }},
		{"digest 33 bytes", "digest", func() error { return sign(&kbv1.SignRequest{Name: "ec", Digest: append(d32, 0)}) }},
		{"empty digest", "digest", func() error { return sign(&kbv1.SignRequest{Name: "rsa"}) }},
		{"sha256 digest for sha384", "digest", func() error {
			return sign(&kbv1.SignRequest{Name: "ec", Digest: d32, Hash: kbv1.HashAlgorithm_HASH_ALGORITHM_SHA384})
		}},
		{"sha384 digest for RS256", "digest", func() error { return sign(&kbv1.SignRequest{Name: "rsa", Digest: d48}) }},
		{"unknown hash", "hash", func() error { return sign(&kbv1.SignRequest{Name: "ec", Digest: d32, Hash: 42}) }},
		{"padding on EC", "padding", func() error {
			return sign(&kbv1.SignRequest{Name: "ec", Digest: d32, Padding: kbv1.RSAPadding_RSA_PADDING_PSS})
		}},
		{"unknown padding", "padding", func() error { return sign(&kbv1.SignRequest{Name: "rsa", Digest: d32, Padding: 9}) }},
		{"unknown format", "format", func() error { return sign(&kbv1.SignRequest{Name: "ec", Digest: d32, Format: 7}) }},
		{"version and kid", "kid", func() error { return sign(&kbv1.SignRequest{Name: "ec", Digest: d32, Version: 1, Kid: "x"}) }},
		{"sign empty name", "name", func() error { return sign(&kbv1.SignRequest{Digest: d32}) }},
		{"sign bad name", "name", func() error { return sign(&kbv1.SignRequest{Name: "../ec", Digest: d32}) }},
		{"unknown algorithm", "algorithm", func() error { return create(&kbv1.CreateKeyRequest{Name: "k", Algorithm: 99}) }},
		{"unspecified algorithm", "algorithm", func() error { return create(&kbv1.CreateKeyRequest{Name: "k"}) }},
		{"RSA 1024", "bits", func() error {
			return create(&kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_RS256, Bits: 1024})
		}},
		{"RSA 5000", "bits", func() error {
			return create(&kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_PS256, Bits: 5000})
		}},
		{"bits on EC", "bits", func() error { return create(&kbv1.CreateKeyRequest{Name: "k", Algorithm: es, Bits: 256}) }},
		{"negative page size", "page_size", func() error { _, err := s.client.ListKeys(ctx, &kbv1.ListKeysRequest{PageSize: -1}); return err }},
		{"bad page token", "page_token", func() error {
			_, err := s.client.ListKeys(ctx, &kbv1.ListKeysRequest{PageToken: "%%"})
			return err
		}},
		{"get bad name", "name", func() error { _, err := s.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: "A"}); return err }},
		{"pubkey bad name", "name", func() error {
			_, err := s.client.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: "a b"})
			return err
		}},
	}
	badNames := []string{"", "Upper", "-lead", ".lead", "_lead", "a/b", "..", "a b", "é", "a\x00b", "ec%2e", strings.Repeat("a", 64), "ＥＣ"}
	for _, n := range badNames {
		cases = append(cases, struct {
			name  string
			field string
			call  func() error
		}{"create name " + n, "name", func() error { return create(&kbv1.CreateKeyRequest{Name: n, Algorithm: es}) }})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := s.backend.calls.Load()
			err := c.call()
			st := status.Convert(err)
			if st.Code() != codes.InvalidArgument {
				t.Fatalf("got %v, want InvalidArgument", err)
			}
			if !strings.Contains(st.Message(), c.field) {
				t.Errorf("message %q does not name the field %q", st.Message(), c.field)
			}
			var br *errdetails.BadRequest
			for _, d := range st.Details() {
				if b, ok := d.(*errdetails.BadRequest); ok {
					br = b
				}
			}
			if br == nil || len(br.FieldViolations) != 1 || br.FieldViolations[0].Field != c.field {
				t.Errorf("BadRequest details %v, want field %q", br, c.field)
			}
			if n := s.backend.calls.Load() - before; n != 0 {
				t.Errorf("%d backend calls for a bad request, want 0", n)
			}
		})
	}
	// 63 characters is the longest valid name.
	if err := create(&kbv1.CreateKeyRequest{Name: strings.Repeat("a", 63), Algorithm: es}); err != nil {
		t.Errorf("63-character name: %v", err)
	}
}

func TestNotFoundAndExists(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	_, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_RS256})
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("duplicate CreateKey: got %v, want AlreadyExists", err)
	}
	d := make([]byte, 32)
	for name, call := range map[string]func() error{
		"Sign":   func() error { _, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "nope", Digest: d}); return err },
		"GetKey": func() error { _, err := s.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: "nope"}); return err },
		"GetPublicKey": func() error {
			_, err := s.client.GetPublicKey(ctx, &kbv1.GetPublicKeyRequest{Name: "nope"})
			return err
		},
		"Sign version": func() error {
			_, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Version: 2, Digest: d})
			return err
		},
		"Sign kid": func() error {
			_, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Kid: "abc", Digest: d})
			return err
		},
	} {
		if status.Code(call()) != codes.NotFound {
			t.Errorf("%s: got %v, want NotFound", name, call())
		}
	}
	// Naming the active version by number or kid works.
	k, _ := s.client.GetKey(ctx, &kbv1.GetKeyRequest{Name: "k"})
	for _, r := range []*kbv1.SignRequest{{Name: "k", Version: 1, Digest: d}, {Name: "k", Kid: k.Key.ActiveKid, Digest: d}} {
		resp, err := s.client.Sign(ctx, r)
		if err != nil || resp.Kid != k.Key.ActiveKid {
			t.Errorf("Sign %v: %v, kid %q", r, err, resp.GetKid())
		}
	}
}

// TestNoHardwareDetailsLeak: hardware errors reach the client as a fixed
// message with no CKR_ name, handle, path or PIN.
func TestNoHardwareDetailsLeak(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	if _, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k", Algorithm: kbv1.Algorithm_ALGORITHM_ES256}); err != nil {
		t.Fatal(err)
	}
	const pin = "1234-secret-pin"
	secrets := []string{"CKR_", "0x", "/usr/lib", "/tmp", pin, "handle"}
	// Every RPC that signs in hardware, and CreateKey.
	calls := map[string]func() error{
		"Sign": func() error {
			_, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)})
			return err
		},
		"CreateKey": func() error {
			_, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "k2", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
			return err
		},
		"SignJWS": func() error {
			_, err := s.client.SignJWS(ctx, &kbv1.SignJWSRequest{Name: "k", Payload: []byte("{}")})
			return err
		},
		"CreateDPoPProof": func() error {
			_, err := s.client.CreateDPoPProof(ctx, &kbv1.CreateDPoPProofRequest{Name: "k", Htm: "GET", Htu: "https://a.example/x"})
			return err
		},
		"CreateSignedHttpRequest": func() error {
			_, err := s.client.CreateSignedHttpRequest(ctx, &kbv1.CreateSignedHttpRequestRequest{Name: "k", AccessToken: "at", Method: "GET", Url: "https://a.example/x"})
			return err
		},
		"CreateCertificateRequest": func() error {
			_, err := s.client.CreateCertificateRequest(ctx, &kbv1.CreateCertificateRequestRequest{Name: "k", CommonName: "svc"})
			return err
		},
		"CreateSelfSignedCertificate": func() error {
			_, err := s.client.CreateSelfSignedCertificate(ctx, &kbv1.CreateSelfSignedCertificateRequest{Name: "k", CommonName: "svc", DnsNames: []string{"svc.local"}})
			return err
		},
	}
	for _, kind := range []error{kms.ErrUnavailable, kms.ErrResourceExhausted, kms.ErrDataLoss, nil} {
		var injected error = &hwErr{kind: kind, msg: "hsm: sign: pkcs11: 0x32: CKR_DEVICE_REMOVED handle=0xdeadbeef module=/usr/lib/softhsm/libsofthsm2.so pin=" + pin}
		s.backend.fail.Store(&injected)
		want := map[error]codes.Code{kms.ErrUnavailable: codes.Unavailable, kms.ErrResourceExhausted: codes.ResourceExhausted,
			kms.ErrDataLoss: codes.DataLoss, nil: codes.Internal}[kind]
		for method, call := range calls {
			st := status.Convert(call())
			if st.Code() == codes.OK {
				t.Fatalf("%s: the injected failure did not fail the call", method)
			}
			for _, sec := range secrets {
				if strings.Contains(st.Message(), sec) || strings.Contains(strings.ToLower(st.Message()), strings.ToLower(sec)) {
					t.Errorf("%s: client message %q contains %q", method, st.Message(), sec)
				}
			}
			// The same failure is the same code whichever RPC met it.
			if got := st.Code(); got != want {
				t.Errorf("%s with %v: got %v %q, want %v", method, kind, got, st.Message(), want)
			}
		}
	}
	s.backend.fail.Store(nil)
	if _, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "k", Digest: make([]byte, 32)}); err != nil {
		t.Fatalf("Sign after recovery: %v", err)
	}
}

type hwErr struct {
	kind error
	msg  string
}

func (e *hwErr) Error() string { return e.msg }
func (e *hwErr) Unwrap() error { return e.kind }

func TestConcurrentSign(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	ck, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: "hot", Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
	if err != nil {
		t.Fatal(err)
	}
	pub := s.publicKey(t, "hot", ck.Key.ActiveKid).(*ecdsa.PublicKey)
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := make([]byte, 32)
			rand.Read(d)
			resp, err := s.client.Sign(ctx, &kbv1.SignRequest{Name: "hot", Digest: d})
			switch {
			case err != nil:
				errs <- err.Error()
			case resp.Kid != ck.Key.ActiveKid:
				errs <- "wrong kid " + resp.Kid
			case !ecdsa.VerifyASN1(pub, d, resp.Signature):
				errs <- "signature does not verify"
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

func TestListKeysAndJWKS(t *testing.T) {
	s := newStack(t)
	ctx := ctxT(t)
	names := []string{"c", "a", "e", "b", "d"}
	kids := map[string]string{}
	for _, n := range names {
		ck, err := s.client.CreateKey(ctx, &kbv1.CreateKeyRequest{Name: n, Algorithm: kbv1.Algorithm_ALGORITHM_ES256})
		if err != nil {
			t.Fatal(err)
		}
		kids[n] = ck.Key.ActiveKid
	}
	var got []string
	token := ""
	pages := 0
	for {
		resp, err := s.client.ListKeys(ctx, &kbv1.ListKeysRequest{PageSize: 2, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, k := range resp.Keys {
			got = append(got, k.Name)
		}
		if token = resp.NextPageToken; token == "" || pages > 10 {
			break
		}
	}
	if strings.Join(got, ",") != "a,b,c,d,e" || pages != 3 {
		t.Errorf("ListKeys pages: got %v in %d pages, want a..e in 3", got, pages)
	}
	jr, err := s.client.GetJWKS(ctx, &kbv1.GetJWKSRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var set pop.JWKS
	if err := json.Unmarshal([]byte(jr.Jwks), &set); err != nil {
		t.Fatal(err)
	}
	if len(set.Keys) != len(names) {
		t.Fatalf("JWKS has %d keys, want %d", len(set.Keys), len(names))
	}
	for i, k := range set.Keys {
		want := string(rune('a' + i))
		if k.Kid != kids[want] || k.Alg != "ES256" || k.Use != "sig" {
			t.Errorf("JWKS key %d: %+v, want kid of %q", i, k, want)
		}
	}
	if strings.Contains(jr.Jwks, `"d"`) {
		t.Error("JWKS contains a private member")
	}
}
