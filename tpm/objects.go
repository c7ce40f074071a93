package tpm

import (
	"bytes"
	"container/list"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
)

// A TPM holds only a few transient objects at once (TPM_PT_HR_TRANSIENT_MIN
// is 3 on swtpm and on most PC Client TPMs, and the kernel resource manager
// gives each connection 3 as well). The backend keeps the SRK, tenant
// parents, signing keys and the attestation key loaded on demand in an LRU
// of at most Config.LoadedObjects entries, reloading from the blobs on a
// miss: the SRK by TPM2_CreatePrimary (the same key every time, from the
// owner seed), a parent by TPM2_Load under the SRK, a key by TPM2_Load under
// its tenant's parent.

// Object ids in the LRU.
const (
	idSRK = "srk"
	idAK  = "ak"
)

func parentID(tenant string) string { return "parent/" + tenant }

// keyID names a loaded key by tenant and blob: the same blob asked for by
// another tenant is another entry, loaded (or not) under that tenant's
// parent, so a cache hit never crosses tenants.
func keyID(tenant string, k *key) string {
	sum := sha256.Sum256(k.encode())
	return "key/" + tenant + "/" + hex.EncodeToString(sum[:])
}

// object is a transient object the backend has loaded.
type object struct {
	id     string
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
	// public and publicRaw (the TPMT_PUBLIC bytes) are set for the SRK (to
	// salt sessions) and the AK (returned with attestations); auth is a
	// parent's auth value.
	public    *tpm2.TPMTPublic
	publicRaw []byte
	auth      []byte
	// sess is a signing key's reusable salted session (see keySession),
	// or nil: it lives and dies with the loaded key.
	sess tpm2.Session
	elem *list.Element
}

// cached returns the loaded object id, marking it recently used, or nil.
func (b *Backend) cached(id string) *object {
	o := b.objs[id]
	if o != nil {
		b.lru.MoveToFront(o.elem)
	}
	return o
}

func (b *Backend) forget(o *object) {
	if b.objs[o.id] == o {
		b.lru.Remove(o.elem)
		delete(b.objs, o.id)
	}
}

// forgetAll empties the cache without flushing: after a reconnect the
// handles are gone (or flushed by the reconnect itself). The objects'
// sessions go with them, so that no stale session handle is ever sent to
// the TPM again.
func (b *Backend) forgetAll() {
	for _, o := range b.objs {
		o.sess = nil
	}
	b.objs = make(map[string]*object)
	b.lru = list.New()
}

// flush unloads o and its session, and then forgets them. A TPM error (the
// handle is already gone) only forgets it; a transport error, which drops
// the connection and forgets everything with it, is returned. The flush is
// sent even when the call's context is done (see link), so an object is
// never forgotten while the TPM still holds it.
func (b *Backend) flush(l *link, o *object) error {
	b.dropSession(l, o)
	_, err := tpm2.FlushContext{FlushHandle: o.handle}.Execute(l)
	var te *kms.Error
	if errors.As(err, &te) {
		return err
	}
	b.forget(o)
	return nil
}

// evictLRU flushes the least recently used object not in keep. It reports
// false when every loaded object is kept.
func (b *Backend) evictLRU(l *link, keep []*object) (bool, error) {
	for e := b.lru.Back(); e != nil; e = e.Prev() {
		o := e.Value.(*object)
		if isKept(o, keep) {
			continue
		}
		return true, b.flush(l, o)
	}
	return false, nil
}

// with returns keep and o, without touching keep's backing array.
func with(keep []*object, o *object) []*object {
	return append(keep[:len(keep):len(keep)], o)
}

func isKept(o *object, keep []*object) bool {
	for _, k := range keep {
		if k == o {
			return true
		}
	}
	return false
}

// load runs create, which loads one object, with a slot free for it, and
// caches the result under id.
func (b *Backend) load(l *link, id string, keep []*object, create func() (tpm2.TPMHandle, error)) (*object, error) {
	var h tpm2.TPMHandle
	err := b.withSlot(l, keep, func() error {
		var err error
		h, err = create()
		return err
	})
	if err != nil {
		return nil, err
	}
	o := &object{id: id, handle: h}
	o.elem = b.lru.PushFront(o)
	b.objs[id] = o
	return o, nil
}

// withSlot runs fn, which needs a free object slot: it loads an object, or
// creates one (TPM2_Create holds the new object in a slot while it works),
// flushing the least recently used objects not in keep first. It flushes
// more and retries on TPM_RC_OBJECT_MEMORY, which is therefore never
// returned while something can be flushed: the TPM may hold fewer objects
// than LoadedObjects, or objects that are not ours.
func (b *Backend) withSlot(l *link, keep []*object, fn func() error) error {
	for b.lru.Len() >= b.cfg.LoadedObjects {
		evicted, err := b.evictLRU(l, keep)
		if err != nil {
			return err
		}
		if !evicted {
			break
		}
	}
	foreignFlushed := false
	for {
		err := fn()
		if err == nil || !isRC(err, tpm2.TPMRCObjectMemory, tpm2.TPMRCObjectHandles) {
			return err
		}
		evicted, ferr := b.evictLRU(l, keep)
		if ferr != nil {
			return ferr
		}
		if evicted {
			continue
		}
		if foreignFlushed {
			return err
		}
		// Every slot is taken by objects we did not load.
		if ferr := b.flushLeftovers(l, false); ferr != nil {
			return ferr
		}
		foreignFlushed = true
	}
}

// flushLeftovers flushes the transient objects and sessions in the TPM that
// are not in the cache: left by a previous process, or by this one before a
// reconnect. With sessions, it flushes loaded sessions too.
func (b *Backend) flushLeftovers(l *link, sessions bool) error {
	types := []tpm2.TPMHT{tpm2.TPMHTTransient}
	if sessions {
		// GetCapability lists loaded sessions under 0x02 and saved
		// (context-swapped) ones under 0x03 (Part 3 §30.2).
		types = append(types, tpm2.TPMHTHMACSession, tpm2.TPMHTPolicySession)
	}
	ours := make(map[tpm2.TPMHandle]bool, len(b.objs))
	for _, o := range b.objs {
		ours[o.handle] = true
	}
	flushed := 0
	for _, ht := range types {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 64}.Execute(l)
		if err != nil {
			return classify("list handles", err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return classify("list handles", err)
		}
		for _, h := range hs.Handle {
			if ours[h] {
				continue
			}
			if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(l); err != nil {
				var te *kms.Error
				if errors.As(err, &te) {
					return err
				}
				b.log.Warn("cannot flush a leftover TPM handle", "handle", fmt.Sprintf("0x%08x", uint32(h)), "err", err)
				continue
			}
			flushed++
		}
	}
	if flushed > 0 {
		b.log.Info("flushed leftover TPM handles", "count", flushed)
	}
	return nil
}

// srk returns the loaded SRK, creating it from the TCG template and checking
// its Name against the pin. A different Name puts the backend in the data
// loss state.
func (b *Backend) srk(l *link) (*object, error) {
	if o := b.cached(idSRK); o != nil {
		return o, nil
	}
	if b.dataLoss {
		return nil, b.dataLossError()
	}
	var rsp *tpm2.CreatePrimaryResponse
	o, err := b.load(l, idSRK, nil, func() (tpm2.TPMHandle, error) {
		r, err := tpm2.CreatePrimary{
			PrimaryHandle: tpm2.TPMRHOwner,
			InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
		}.Execute(l)
		if err != nil {
			return 0, err
		}
		rsp = r
		return r.ObjectHandle, nil
	})
	if err != nil {
		return nil, classify("create the SRK", err)
	}
	if err := b.setPublic(o, rsp.OutPublic); err != nil {
		b.flush(l, o)
		return nil, err
	}
	switch {
	case b.pin == nil:
		if err := writePin(b.cfg.StateDir, o.name.Buffer); err != nil {
			b.flush(l, o)
			return nil, err
		}
		b.pin = o.name.Buffer
		b.log.Info("pinned the TPM's storage root key", "srk_name", hex.EncodeToString(b.pin))
	case !bytes.Equal(o.name.Buffer, b.pin):
		b.dataLoss = true
		b.log.Error("the TPM's storage root key is not the pinned one: the TPM was cleared or replaced, and every TPM key created before is lost; "+
			"refusing all key operations until an operator resets the pin (stop the daemon, remove srk.name and parents/ from the state dir, mark the lost keys destroyed)",
			"state_dir", b.cfg.StateDir, "pinned_srk_name", hex.EncodeToString(b.pin), "srk_name", hex.EncodeToString(o.name.Buffer))
		if err := b.flush(l, o); err != nil {
			return nil, err
		}
		return nil, b.dataLossError()
	}
	return o, nil
}

// setPublic records the public area of a primary object the TPM returned,
// with its Name computed here rather than taken from the response.
func (b *Backend) setPublic(o *object, pub tpm2.TPM2BPublic) error {
	raw := pub.Bytes()
	contents, err := pub.Contents()
	if err != nil {
		return &kms.Error{Backend: "tpm", Op: "read a public area", Err: err}
	}
	name, err := objectName(raw)
	if err != nil {
		return &kms.Error{Backend: "tpm", Op: "read a public area", Err: err}
	}
	o.public, o.publicRaw, o.name = contents, raw, tpm2.TPM2BName{Buffer: name}
	return nil
}

func (b *Backend) dataLossError() error {
	return &kms.Error{Backend: "tpm", Op: "use the TPM", Kind: ErrDataLoss, Err: errors.New("the storage root key is not the pinned one")}
}

// parent returns the tenant's loaded storage parent, creating it on first
// use.
func (b *Backend) parent(l *link, tenant string, keep []*object) (*object, error) {
	id := parentID(tenant)
	if o := b.cached(id); o != nil {
		return o, nil
	}
	srk, err := b.srk(l)
	if err != nil {
		return nil, err
	}
	pf, err := b.parentFile(l, tenant, srk)
	if err != nil {
		return nil, err
	}
	o, err := b.load(l, id, with(keep, srk), func() (tpm2.TPMHandle, error) {
		r, err := tpm2.Load{
			ParentHandle: tpm2.NamedHandle{Handle: srk.handle, Name: srk.name},
			InPrivate:    tpm2.TPM2BPrivate{Buffer: pf.Private},
			InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](pf.Public),
		}.Execute(l)
		if err != nil {
			return 0, err
		}
		return r.ObjectHandle, nil
	})
	if isParameterError(err) {
		// The blob does not load under this SRK: it was made under
		// another, although the pin matches. Never replace it.
		b.log.Error("a tenant's storage parent does not load under the pinned SRK; its keys are lost", "tenant", tenant, "err", err)
		return nil, &kms.Error{Backend: "tpm", Op: "load the tenant parent", Kind: ErrDataLoss, Err: err}
	}
	if err != nil {
		return nil, classify("load the tenant parent", err)
	}
	name, err := objectName(pf.Public)
	if err != nil {
		b.flush(l, o)
		return nil, &kms.Error{Backend: "tpm", Op: "load the tenant parent", Err: err}
	}
	o.name, o.auth = tpm2.TPM2BName{Buffer: name}, pf.Auth
	return o, nil
}

// parentFile returns the tenant's saved parent, creating it under the SRK
// and saving it on first use.
func (b *Backend) parentFile(l *link, tenant string, srk *object) (*parentFile, error) {
	if pf := b.parents[tenant]; pf != nil {
		return pf, nil
	}
	pf, err := readParent(b.cfg.StateDir, tenant)
	if err != nil {
		return nil, err
	}
	if pf != nil {
		if pf.SRKName != hex.EncodeToString(b.pin) {
			b.log.Error("a tenant's storage parent was made under another SRK; its keys are lost", "tenant", tenant, "parent_srk_name", pf.SRKName)
			return nil, &kms.Error{Backend: "tpm", Op: "load the tenant parent", Kind: ErrDataLoss, Err: errors.New("parent made under another SRK")}
		}
		b.parents[tenant] = pf
		return pf, nil
	}
	auth, err := randomAuth()
	if err != nil {
		return nil, err
	}
	var rsp *tpm2.CreateResponse
	err = b.withSlot(l, []*object{srk}, func() error {
		var err error
		rsp, err = tpm2.Create{
			ParentHandle: tpm2.AuthHandle{Handle: srk.handle, Name: srk.name, Auth: b.saltedSession(srk, nil)},
			InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
				UserAuth: tpm2.TPM2BAuth{Buffer: auth},
			}},
			InPublic: tpm2.New2B(parentTemplate()),
		}.Execute(l)
		return err
	})
	if err != nil {
		return nil, classify("create the tenant parent", err)
	}
	pf = &parentFile{
		Version: 1,
		Public:  rsp.OutPublic.Bytes(),
		Private: rsp.OutPrivate.Buffer,
		Auth:    auth,
		SRKName: hex.EncodeToString(b.pin),
	}
	if err := writeParent(b.cfg.StateDir, tenant, pf); err != nil {
		if errors.Is(err, fs.ErrExist) {
			// Another process made one meanwhile: use that one.
			return b.parentFile(l, tenant, srk)
		}
		return nil, err
	}
	b.log.Info("created a tenant storage parent", "tenant", tenant)
	b.parents[tenant] = pf
	return pf, nil
}

// loadKey returns the loaded key k of tenant, loading it under the tenant's
// parent. A blob that does not load there (another tenant's, another TPM's,
// or damaged) is an error wrapping kms.ErrNotFound.
func (b *Backend) loadKey(l *link, tenant string, k *key, keep []*object) (*object, error) {
	id := keyID(tenant, k)
	if o := b.cached(id); o != nil {
		return o, nil
	}
	p, err := b.parent(l, tenant, keep)
	if err != nil {
		return nil, err
	}
	o, err := b.load(l, id, with(keep, p), func() (tpm2.TPMHandle, error) {
		r, err := tpm2.Load{
			ParentHandle: tpm2.AuthHandle{Handle: p.handle, Name: p.name, Auth: tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.Auth(p.auth))},
			InPrivate:    tpm2.TPM2BPrivate{Buffer: k.private},
			InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](k.public),
		}.Execute(l)
		if err != nil {
			return 0, err
		}
		return r.ObjectHandle, nil
	})
	if isParameterError(err) {
		return nil, &kms.Error{Backend: "tpm", Op: "load the key", Kind: kms.ErrNotFound, Err: err}
	}
	if err != nil {
		return nil, classify("load the key", err)
	}
	name, err := objectName(k.public)
	if err != nil {
		b.flush(l, o)
		return nil, &kms.Error{Backend: "tpm", Op: "load the key", Err: err}
	}
	o.name = tpm2.TPM2BName{Buffer: name}
	return o, nil
}

// ak returns the loaded attestation key, a primary in the owner hierarchy:
// the same key on every call and in every process, until the TPM is
// cleared.
func (b *Backend) ak(l *link, keep []*object) (*object, error) {
	if o := b.cached(idAK); o != nil {
		return o, nil
	}
	var rsp *tpm2.CreatePrimaryResponse
	o, err := b.load(l, idAK, keep, func() (tpm2.TPMHandle, error) {
		r, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(akTemplate())}.Execute(l)
		if err != nil {
			return 0, err
		}
		rsp = r
		return r.ObjectHandle, nil
	})
	if err != nil {
		return nil, classify("create the attestation key", err)
	}
	if err := b.setPublic(o, rsp.OutPublic); err != nil {
		b.flush(l, o)
		return nil, err
	}
	return o, nil
}

// maxKeySessions bounds the reusable sessions the backend keeps loaded. A
// TPM holds at least 3 loaded sessions (TPM_PT_HR_LOADED_MIN on PC Client
// TPMs and swtpm; the kernel resource manager allows 3 per connection):
// one stays free for the one-use sessions of TPM2_Load, TPM2_Create and
// TPM2_Certify.
const maxKeySessions = 2

// keySession returns the reusable session that authorizes TPM2_Sign with
// the loaded key o, whose auth value is auth, starting one if o has none.
// It is a saltedSession that stays loaded (continueSession), so that a
// signature costs one TPM command instead of two: its session key still
// comes from a salt only the pinned SRK can decrypt, it proves knowledge
// of auth, and it encrypts the digest on the wire. srk must be loaded. At
// most min(maxKeySessions, LoadedObjects-2) keys (those beyond the SRK and
// a parent) hold a session: the least recently used key's session is
// flushed to start another.
//
// The caller must dropSession(o) after any error of a command that used
// it: the TPM may have run the command and rolled the session's nonce
// while the response never reached us, and a session out of step fails
// every later command.
func (b *Backend) keySession(l *link, srk, o *object, auth []byte) (tpm2.Session, error) {
	if o.sess != nil {
		return o.sess, nil
	}
	limit := min(maxKeySessions, b.cfg.LoadedObjects-2)
	n := 0
	for e := b.lru.Front(); e != nil; e = e.Next() {
		if p := e.Value.(*object); p.sess != nil {
			// Past the limit, the least recently used go.
			if n++; n >= limit {
				b.dropSession(l, p)
			}
		}
	}
	s, _, err := tpm2.HMACSession(l, tpm2.TPMAlgSHA256, 16,
		tpm2.Auth(auth),
		tpm2.Salted(srk.handle, *srk.public),
		tpm2.AESEncryption(128, tpm2.EncryptIn))
	if err != nil {
		return nil, err
	}
	b.adopt(s.Handle())
	o.sess = s
	return s, nil
}

// dropSession flushes o's session, if it has one, and then forgets it. The
// flush is sent even when the call's context is done (see link). A session
// the TPM no longer has (a TPM error) is gone anyway, and a transport error
// drops the connection, and with it every session.
func (b *Backend) dropSession(l *link, o *object) {
	s := o.sess
	if s == nil {
		return
	}
	if b.conn != nil && s.Handle() != tpm2.TPMRHNull {
		tpm2.FlushContext{FlushHandle: s.Handle()}.Execute(l)
	}
	o.sess = nil
}

// dropSessions flushes every reusable session, best effort.
func (b *Backend) dropSessions(l *link) {
	for e := b.lru.Front(); e != nil; e = e.Next() {
		b.dropSession(l, e.Value.(*object))
	}
}

// saltedSession is a one-use HMAC session salted with the SRK, so its
// session key is known only to this process and the TPM holding the pinned
// SRK. It proves knowledge of auth and encrypts the command's first
// parameter (a digest to sign, a new object's auth value) on the wire. The
// response is not encrypted: TPM2_Sign's first response parameter is not a
// TPM2B, which parameter encryption requires (Part 1 §21.1).
func (b *Backend) saltedSession(srk *object, auth []byte) tpm2.Session {
	return tpm2.HMAC(tpm2.TPMAlgSHA256, 16,
		tpm2.Auth(auth),
		tpm2.Salted(srk.handle, *srk.public),
		tpm2.AESEncryption(128, tpm2.EncryptIn))
}

// isParameterError reports whether err is a TPM format-1 error about a
// command parameter (for TPM2_Load: a blob that is not this parent's).
func isParameterError(err error) bool {
	var f1 tpm2.TPMFmt1Error
	if !errors.As(err, &f1) {
		return false
	}
	isParam, _ := f1.Parameter()
	return isParam
}
