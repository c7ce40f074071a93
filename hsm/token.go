package hsm

// Calls on a session of their own, outside crypto11's pool: listing and
// destroying keys by CKA_ID.

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/miekg/pkcs11"

	"github.com/keybroker/keybroker/kms"
)

// destroyKeyPair deletes every private and public key with CKA_ID id whose
// label names p's tenant, and returns how many there were.
func destroyKeyPair(cfg Config, p kms.Partition, id []byte) (int, error) {
	n := 0
	err := withTokenSession(cfg, true, func(mod *pkcs11.Ctx, sess pkcs11.SessionHandle) error {
		for _, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
			template := []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
				pkcs11.NewAttribute(pkcs11.CKA_ID, id),
			}
			handles, err := findObjects(mod, sess, template)
			if err != nil {
				return err
			}
			for _, h := range handles {
				attrs, err := mod.GetAttributeValue(sess, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
				if err != nil {
					// A concurrent deletion may fail the read otherwise
					// too (SoftHSM2: CKR_ATTRIBUTE_VALUE_INVALID): an
					// error only if the object is still there.
					left, ferr := findObjects(mod, sess, template)
					if ferr != nil || slices.Contains(left, h) {
						return err
					}
					continue
				}
				if tenant, ok := labelTenant(string(attrs[0].Value)); !ok || tenant != p.Tenant {
					continue // another partition's: not there for p
				}
				n++
				err = mod.DestroyObject(sess, h)
				if err == nil || isGoneObject(err) {
					continue
				}
				// A concurrent deletion of the same object may fail
				// otherwise (SoftHSM2: CKR_FUNCTION_FAILED): it is an
				// error only if the object is still there.
				left, ferr := findObjects(mod, sess, template)
				if ferr != nil || slices.Contains(left, h) {
					return err
				}
			}
		}
		return nil
	})
	return n, err
}

// List returns every key pair on the token that the daemon created, with
// the partition its label names.
func (b *Backend) List(ctx context.Context) ([]kms.Object, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if _, err := b.context(); err != nil {
		return nil, err
	}
	found, err := listPrivateKeys(b.cfg)
	if err != nil {
		// A session of its own: its errors say nothing about the
		// crypto11 context, which must not be retired for them.
		return nil, classify("list keys", err)
	}
	var objs []kms.Object
	for _, f := range found {
		if len(f.id) != IDLen {
			continue
		}
		tenant, ok := labelTenant(f.label)
		if !ok {
			continue
		}
		objs = append(objs, kms.Object{Partition: kms.Partition{Tenant: tenant}, Handle: kms.Handle(f.id)})
	}
	return objs, nil
}

type foundKey struct {
	id    []byte
	label string
}

// listPrivateKeys reads CKA_ID and CKA_LABEL of every private key on the
// token in one C_FindObjects pass, on a session of its own. (crypto11's
// FindAllKeyPairs looks up each key's public half with another search,
// which makes listing quadratic in the number of keys: minutes at
// start-up for a few thousand keys.)
func listPrivateKeys(cfg Config) ([]foundKey, error) {
	var out []foundKey
	err := withTokenSession(cfg, false, func(mod *pkcs11.Ctx, sess pkcs11.SessionHandle) error {
		handles, err := findObjects(mod, sess, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)})
		if err != nil {
			return err
		}
		out = make([]foundKey, 0, len(handles))
		for _, h := range handles {
			attrs, err := mod.GetAttributeValue(sess, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, nil), pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if isGoneObject(err) {
				continue // destroyed since the search
			}
			if err != nil {
				return err
			}
			var f foundKey
			for _, a := range attrs {
				switch a.Type {
				case pkcs11.CKA_ID:
					f.id = a.Value
				case pkcs11.CKA_LABEL:
					f.label = string(a.Value)
				}
			}
			out = append(out, f)
		}
		return nil
	})
	return out, err
}

// withTokenSession runs f on a logged-in session of its own on the token,
// outside crypto11's pool. The module is usually initialised and logged in
// by crypto11 already, and the session shares that login. Where it is not
// (a p11-kit module gives each caller an instance of its own, or the
// window while a context is rebuilt), it initialises the module (and
// finalises it after) and logs the session in with the PIN: otherwise
// private keys would be invisible, and a listing would miss them.
func withTokenSession(cfg Config, rw bool, f func(*pkcs11.Ctx, pkcs11.SessionHandle) error) error {
	mod := pkcs11.New(cfg.ModulePath)
	if mod == nil {
		return fmt.Errorf("cannot load the PKCS#11 module")
	}
	defer mod.Destroy()
	if err := mod.Initialize(); err == nil {
		defer mod.Finalize()
	} else if !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return err
	}
	slots, err := mod.GetSlotList(true)
	if err != nil {
		return err
	}
	for _, slot := range slots {
		info, err := mod.GetTokenInfo(slot)
		if err != nil || info.Label != cfg.TokenLabel {
			continue
		}
		flags := uint(pkcs11.CKF_SERIAL_SESSION)
		if rw {
			flags |= pkcs11.CKF_RW_SESSION
		}
		sess, err := mod.OpenSession(slot, flags)
		if err != nil {
			return err
		}
		defer mod.CloseSession(sess)
		si, err := mod.GetSessionInfo(sess)
		if err != nil {
			return err
		}
		if si.State != pkcs11.CKS_RO_USER_FUNCTIONS && si.State != pkcs11.CKS_RW_USER_FUNCTIONS {
			err := mod.Login(sess, pkcs11.CKU_USER, cfg.PIN)
			if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
				return err
			}
		}
		return f(mod, sess)
	}
	return pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT)
}

// findObjects returns the handles of every object matching template.
func findObjects(mod *pkcs11.Ctx, sess pkcs11.SessionHandle, template []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := mod.FindObjectsInit(sess, template); err != nil {
		return nil, err
	}
	var handles []pkcs11.ObjectHandle
	for {
		hs, _, err := mod.FindObjects(sess, 1024)
		if err != nil {
			mod.FindObjectsFinal(sess)
			return nil, err
		}
		if len(hs) == 0 {
			break
		}
		handles = append(handles, hs...)
	}
	return handles, mod.FindObjectsFinal(sess)
}
