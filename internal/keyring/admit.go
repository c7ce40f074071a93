package keyring

import "context"

// A request can carry an admission check for its hardware signatures: the
// daemon's per-tenant signing quota. Sign and Attest call it once per
// signature, after the request is validated and the key version found and
// right before the backend signs, so a request refused for bad input, an
// unknown key or an unusable version takes nothing from the quota.
type admitKey struct{}

// WithAdmission returns a context whose hardware signatures (Sign, Attest,
// and the signers of Signer) each call admit first; an error from admit is
// returned as it is, and nothing is signed.
func WithAdmission(ctx context.Context, admit func() error) context.Context {
	return context.WithValue(ctx, admitKey{}, admit)
}

// admit runs ctx's admission check, if it has one.
func admit(ctx context.Context) error {
	if f, ok := ctx.Value(admitKey{}).(func() error); ok && f != nil {
		return f()
	}
	return nil
}
