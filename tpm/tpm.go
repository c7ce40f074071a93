// Package tpm is keybroker's TPM 2.0 backend, built on go-tpm's tpm2
// package. Signing keys are generated inside the TPM under a per-tenant
// storage parent and leave it only as blobs wrapped by that parent; the
// kms.Handle the store persists is such a blob plus the key's auth
// value (see handle.go). It is usable as a library through kms.Backend
// and, by type assertion, kms.Attester.
//
// One connection carries every command, one at a time, each bounded by a
// deadline; a broken connection is reopened by the next call, which also
// reloads what it needs, so a TPM (or swtpm) that restarts is usable again
// without restarting the daemon. At every (re)connection the backend
// flushes leftover transient objects and sessions and checks that the
// storage root key is still the one pinned in the state directory; if it is
// not, the TPM was cleared or replaced and every operation fails with
// ErrDataLoss (see there for the operator's reset).
//
// The owner hierarchy must have an empty auth value (the default, and what
// the kernel and tpm2-tss assume), as the SRK and the attestation key are
// primaries there.
package tpm

import (
	"container/list"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keybroker/keybroker/kms"
)

// Defaults for Config.
const (
	DefaultTimeout       = 30 * time.Second
	DefaultKeyGenTimeout = 2 * time.Minute
	// DefaultLoadedObjects is the number of transient objects the TPM
	// guarantees (TPM_PT_HR_TRANSIENT_MIN on PC Client TPMs and swtpm).
	DefaultLoadedObjects = 3
)

// Config selects the TPM and bounds the backend's use of it.
type Config struct {
	// Exactly one of Device, Socket and Address names the TPM.
	//
	// Device is a TPM character device, normally the kernel resource
	// manager /dev/tpmrm0 (not /dev/tpm0, which allows one opener and no
	// resource management). Device files have no read deadlines: a command
	// that hangs is abandoned at its deadline on a goroutine the kernel's
	// own TPM timeouts release later.
	Device string
	// Socket is the unix socket of swtpm (--server type=unixio).
	Socket string
	// Address is the host:port of swtpm's TCP server (--server type=tcp).
	// It speaks TPM commands only: no mssim platform commands are sent.
	Address string
	// StateDir is where the SRK Name is pinned and the tenants' parent
	// blobs are kept.
	StateDir string
	// Timeout bounds each TPM command; a TPM that does not answer in time
	// is reported unavailable and the connection is reopened. 0 means
	// DefaultTimeout.
	Timeout time.Duration
	// KeyGenTimeout bounds the TPM2_Create of an RSA key, which takes
	// seconds to tens of seconds on hardware TPMs (prime search). 0 means
	// DefaultKeyGenTimeout; never less than Timeout.
	KeyGenTimeout time.Duration
	// LoadedObjects is the most transient objects the backend keeps
	// loaded at once (at least 3: the SRK, a parent and a key). 0 means
	// DefaultLoadedObjects.
	LoadedObjects int
}

func (c Config) withDefaults() (Config, error) {
	n := 0
	for _, s := range []string{c.Device, c.Socket, c.Address} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return c, fmt.Errorf("tpm: config: got %d of device, socket and address, want exactly one", n)
	}
	if c.StateDir == "" {
		return c, errors.New("tpm: config: state dir must be set")
	}
	if c.Timeout < 0 || c.KeyGenTimeout < 0 || c.LoadedObjects < 0 {
		return c, errors.New("tpm: config: timeouts and loaded objects must not be negative")
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.KeyGenTimeout == 0 {
		c.KeyGenTimeout = DefaultKeyGenTimeout
	}
	c.KeyGenTimeout = max(c.KeyGenTimeout, c.Timeout)
	if c.LoadedObjects == 0 {
		c.LoadedObjects = DefaultLoadedObjects
	}
	if c.LoadedObjects < 3 {
		return c, fmt.Errorf("tpm: config: loaded objects: got %d, want at least 3", c.LoadedObjects)
	}
	return c, nil
}

// Backend is a kms.Backend on one TPM 2.0. It is safe for concurrent
// use; commands reach the TPM one at a time.
type Backend struct {
	cfg Config
	log *slog.Logger

	// sem is the one lock around the connection and everything below; a
	// channel so that waiting for it honours the caller's context.
	sem chan struct{}
	// inflight is the command sent and not answered yet, or nil; read
	// without sem by calls that wait for it.
	inflight atomic.Pointer[inflight]

	conn conn
	// ready is set once the TPM behind conn is initialised (initTPM); a
	// call cancelled during the initialisation keeps the connection for
	// the next call to finish.
	ready     bool
	closed    bool
	pin       []byte // the pinned SRK Name
	dataLoss  bool
	objs      map[string]*object
	lru       *list.List
	parents   map[string]*parentFile
	destroyed map[[sha256.Size]byte]bool
	// pending are sessions started for a command not sent yet (see
	// link.track).
	pending []tpm2.TPMHandle

	// decoded keeps Sign's decoded handles; it has its own lock.
	decoded handleCache

	// Set by Open, read-only after.
	rsaBits map[int]bool
	// pssHashSalt: the TPM's RSASSA-PSS salt is the hash length, as
	// keybroker promises (RFC 7518 §3.5); otherwise PSS is refused.
	pssHashSalt bool
}

var (
	_ kms.Backend = (*Backend)(nil)
)

// Open connects to the TPM, flushes leftover transient objects and
// sessions, creates the SRK and compares its Name with the one pinned in
// StateDir/srk.name (pinning it the first time), and probes what the TPM
// supports (RSA sizes, the PSS salt length). A changed SRK does not fail
// Open: the backend starts in the data loss state, where every operation
// and Probe fail with ErrDataLoss, and says so in the log.
func Open(ctx context.Context, cfg Config, log *slog.Logger) (*Backend, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := makeStateDir(cfg.StateDir); err != nil {
		return nil, err
	}
	pin, err := readPin(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	b := &Backend{
		cfg:       cfg,
		log:       log,
		sem:       make(chan struct{}, 1),
		pin:       pin,
		parents:   make(map[string]*parentFile),
		destroyed: make(map[[sha256.Size]byte]bool),
		rsaBits:   make(map[int]bool),
	}
	b.forgetAll()
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := b.probeCapabilities(l); err != nil {
		b.shutdown(l)
		return nil, err
	}
	log.Info("TPM backend open", "rsa_2048", b.rsaBits[2048], "rsa_3072", b.rsaBits[3072], "rsa_4096", b.rsaBits[4096],
		"pss", b.pssHashSalt, "data_loss", b.dataLoss)
	return b, nil
}

// begin takes the lock, honouring ctx, and connects when needed. The
// returned function releases the lock.
func (b *Backend) begin(ctx context.Context) (*link, func(), error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	select {
	case b.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, nil, &kms.Error{Backend: "tpm", Op: "wait for the TPM", Kind: b.waitKind(), Err: ctx.Err()}
	}
	if b.closed {
		<-b.sem
		return nil, nil, &kms.Error{Backend: "tpm", Op: "use the TPM", Kind: kms.ErrUnavailable, Err: errors.New("backend closed")}
	}
	l := &link{b: b, ctx: ctx, timeout: b.cfg.Timeout}
	unlock := func() {
		b.flushPending(l)
		<-b.sem
	}
	if err := b.connect(l); err != nil {
		unlock()
		return nil, nil, err
	}
	return l, unlock, nil
}

// inflight is a command on its way to the TPM and back.
type inflight struct {
	sent time.Time
	slow bool // an RSA key generation: seconds are normal
}

// stuckAfter is how long a command other than an RSA key generation may go
// unanswered before calls waiting behind it take the TPM for hung. TPM
// commands take milliseconds to a few hundred on slow chips.
const stuckAfter = time.Second

// waitKind is what a call that gave up waiting for the TPM ran into: a
// busy TPM (ErrResourceExhausted), or one whose command in flight is
// overdue (ErrUnavailable), so that health tells a hung TPM from a key
// generation.
func (b *Backend) waitKind() error {
	if f := b.inflight.Load(); f != nil && !f.slow && time.Since(f.sent) > stuckAfter {
		return kms.ErrUnavailable
	}
	return kms.ErrResourceExhausted
}

// connect opens the connection if there is none, and makes the TPM ready:
// started, no leftover handles, the SRK checked. A failure drops the
// connection, unless the call's context ended between two commands: the
// connection is then in step, and the next call initialises the TPM again.
func (b *Backend) connect(l *link) error {
	if b.conn == nil {
		deadline := time.Now().Add(b.cfg.Timeout)
		if d, ok := l.ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		c, err := dial(l.ctx, b.cfg, deadline)
		if err != nil {
			return &kms.Error{Backend: "tpm", Op: "connect", Kind: kms.ErrUnavailable, Err: err}
		}
		b.conn, b.ready = c, false
	}
	if b.ready {
		return nil
	}
	b.forgetAll()
	if err := b.initTPM(l); err != nil {
		if l.ctx.Err() == nil {
			b.dropConn(nil)
		}
		return err
	}
	b.ready = true
	return nil
}

func (b *Backend) initTPM(l *link) error {
	err := b.flushLeftovers(l, true)
	if isRC(err, tpm2.TPMRCInitialize) {
		// A TPM nobody started (swtpm without startup-clear): TPM2_Startup
		// is a TPM command, not a platform one.
		if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(l); err != nil {
			return classify("start the TPM", err)
		}
		err = b.flushLeftovers(l, true)
	}
	if err != nil {
		return err
	}
	err = b.retry(l, func() error {
		_, err := b.srk(l)
		return err
	})
	if err != nil && !errors.Is(err, ErrDataLoss) {
		return err
	}
	return nil
}

// dropConn closes a connection that failed; the next call reconnects.
func (b *Backend) dropConn(cause error) {
	if b.conn == nil {
		return
	}
	b.conn.Close()
	b.conn, b.ready, b.pending = nil, false, nil
	b.forgetAll()
	if cause != nil {
		b.log.Warn("TPM connection lost; reconnecting on the next call", "err", cause)
	}
}

// probeCapabilities records which RSA sizes the TPM supports
// (TPM2_TestParms) and whether its PSS salt is the hash length.
func (b *Backend) probeCapabilities(l *link) error {
	for _, bits := range []int{2048, 3072, 4096} {
		_, err := tpm2.TestParms{Parameters: tpm2.TPMTPublicParms{
			Type: tpm2.TPMAlgRSA,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
				KeyBits:   tpm2.TPMKeyBits(bits),
			}),
		}}.Execute(l)
		var te *kms.Error
		if errors.As(err, &te) {
			return err
		}
		b.rsaBits[bits] = err == nil
	}
	if !b.rsaBits[2048] {
		return nil
	}
	ok, err := b.probePSS(l)
	if err != nil {
		return err
	}
	b.pssHashSalt = ok
	return nil
}

// pssProbeKey is the throwaway software key the PSS probe loads into the
// TPM's null hierarchy, one per process.
var pssProbeKey = sync.OnceValues(func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 2048) })

// probePSS signs with RSASSA-PSS in the TPM and reports whether the salt is
// the hash length. TPM 2.0 Part 1 (before revision 1.59) lets the salt be
// the largest the key and hash allow; FIPS-mode and newer TPMs use the hash
// length. The key is a software one loaded with TPM2_LoadExternal, so the
// probe costs no key generation in the TPM.
func (b *Backend) probePSS(l *link) (bool, error) {
	priv, err := pssProbeKey()
	if err != nil {
		return false, err
	}
	pub := tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgRSA,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{SignEncrypt: true, UserWithAuth: true, NoDA: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
			KeyBits:   2048,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: priv.N.Bytes()}),
	}
	sens := tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgRSA,
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgRSA, &tpm2.TPM2BPrivateKeyRSA{Buffer: priv.Primes[0].Bytes()}),
	}
	var name tpm2.TPM2BName
	o, err := b.load(l, "pss-probe", nil, func() (tpm2.TPMHandle, error) {
		r, err := tpm2.LoadExternal{InPrivate: tpm2.New2B(sens), InPublic: tpm2.New2B(pub), Hierarchy: tpm2.TPMRHNull}.Execute(l)
		if err != nil {
			return 0, err
		}
		name = r.Name
		return r.ObjectHandle, nil
	})
	if err != nil {
		return false, classify("load the PSS probe key", err)
	}
	defer b.flush(l, o)
	digest := sha256.Sum256([]byte("keybroker PSS salt probe"))
	var rsp *tpm2.SignResponse
	err = b.retry(l, func() error {
		var err error
		rsp, err = tpm2.Sign{
			KeyHandle:  tpm2.NamedHandle{Handle: o.handle, Name: name},
			Digest:     tpm2.TPM2BDigest{Buffer: digest[:]},
			InScheme:   sigScheme(tpm2.TPMAlgRSAPSS, tpm2.TPMAlgSHA256),
			Validation: nullTicket(),
		}.Execute(l)
		return err
	})
	if err != nil {
		if isRC(err, tpm2.TPMRCScheme) {
			b.log.Warn("the TPM does not sign RSASSA-PSS; PS256 is refused", "err", err)
			return false, nil
		}
		return false, classify("probe the PSS salt", err)
	}
	sig, err := rsp.Signature.Signature.RSAPSS()
	if err != nil {
		return false, &kms.Error{Backend: "tpm", Op: "probe the PSS salt", Err: err}
	}
	if rsa.VerifyPSS(&priv.PublicKey, crypto.SHA256, digest[:], sig.Sig.Buffer, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}) == nil {
		return true, nil
	}
	salt := pssSaltLength(&priv.PublicKey, crypto.SHA256, sig.Sig.Buffer)
	b.log.Warn("the TPM's RSASSA-PSS salt is not the hash length; PS256 and PSS signatures are refused", "salt_length", salt, "want", sha256.Size)
	return false, nil
}

// pssSaltLength recovers the salt length of a PSS signature (RFC 8017
// §9.1.2), -1 when it is not a valid one. It is only for the log line.
func pssSaltLength(pub *rsa.PublicKey, hash crypto.Hash, sig []byte) int {
	m := new(big.Int).Exp(new(big.Int).SetBytes(sig), big.NewInt(int64(pub.E)), pub.N)
	emBits := pub.N.BitLen() - 1
	emLen := (emBits + 7) / 8
	hLen := hash.Size()
	em := m.FillBytes(make([]byte, emLen))
	if emLen < hLen+2 || em[emLen-1] != 0xbc {
		return -1
	}
	masked, h := em[:emLen-hLen-1], em[emLen-hLen-1:emLen-1]
	// MGF1 with hash.
	mask := make([]byte, 0, len(masked)+hLen)
	for c := uint32(0); len(mask) < len(masked); c++ {
		d := hash.New()
		d.Write(h)
		d.Write([]byte{byte(c >> 24), byte(c >> 16), byte(c >> 8), byte(c)})
		mask = d.Sum(mask)
	}
	db := make([]byte, len(masked))
	for i := range db {
		db[i] = masked[i] ^ mask[i]
	}
	db[0] &= 0xff >> (8*emLen - emBits)
	for i, c := range db {
		if c == 1 {
			return len(db) - i - 1
		}
		if c != 0 {
			return -1
		}
	}
	return -1
}

// shutdown flushes what the backend loaded (objects and their sessions)
// and closes the connection.
func (b *Backend) shutdown(l *link) error {
	if b.conn == nil {
		return nil
	}
	for _, o := range b.objs {
		if err := b.flush(l, o); err != nil {
			b.log.Warn("cannot flush a TPM object at close", "err", err)
			break
		}
	}
	b.forgetAll()
	var err error
	if b.conn != nil {
		err = b.conn.Close()
		b.conn, b.ready, b.pending = nil, false, nil
	}
	return err
}

// Close flushes the loaded objects and sessions and closes the connection.
// It waits for the call in progress, if any. Safe to call more than once.
func (b *Backend) Close() error {
	b.sem <- struct{}{}
	defer func() { <-b.sem }()
	if b.closed {
		return nil
	}
	b.closed = true
	ctx, cancel := context.WithTimeout(context.Background(), b.cfg.Timeout)
	defer cancel()
	if err := b.shutdown(&link{b: b, ctx: ctx, timeout: b.cfg.Timeout}); err != nil {
		return &kms.Error{Backend: "tpm", Op: "close", Err: err}
	}
	return nil
}

// Probe asks the TPM for one random byte, reconnecting first if needed.
func (b *Backend) Probe(ctx context.Context) error {
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if b.dataLoss {
		return b.dataLossError()
	}
	_, err = tpm2.GetRandom{BytesRequested: 1}.Execute(l)
	return classify("probe", err)
}

// checkPartition returns the tenant name, which names its parent file.
func checkPartition(p kms.Partition) error {
	if err := kms.ValidateName(p.Tenant); err != nil {
		var fe *kms.FieldError
		if errors.As(err, &fe) {
			return &kms.FieldError{Field: "partition", Reason: "tenant " + fe.Reason}
		}
		return err
	}
	return nil
}

// Generate creates a signing key for spec under the tenant's storage
// parent, with a random auth value, and returns its blobs as the handle.
func (b *Backend) Generate(ctx context.Context, p kms.Partition, spec kms.KeySpec) (kms.Handle, crypto.PublicKey, error) {
	spec, err := spec.Validate()
	if err != nil {
		return nil, nil, err
	}
	if spec.Alg.IsRSA() && !b.rsaBits[spec.Bits] {
		return nil, nil, &kms.FieldError{Field: "bits", Reason: fmt.Sprintf("got %d: the TPM does not support RSA-%d keys (want %s)", spec.Bits, spec.Bits, b.supportedRSA())}
	}
	if spec.Alg == kms.PS256 && !b.pssHashSalt {
		return nil, nil, &kms.FieldError{Field: "algorithm", Reason: "PS256: the TPM's RSASSA-PSS salt is not the hash length"}
	}
	if err := checkPartition(p); err != nil {
		return nil, nil, err
	}
	auth, err := randomAuth()
	if err != nil {
		return nil, nil, err
	}
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer unlock()
	if b.dataLoss {
		return nil, nil, b.dataLossError()
	}
	var rsp *tpm2.CreateResponse
	err = b.retry(l, func() error {
		srk, err := b.srk(l)
		if err != nil {
			return err
		}
		parent, err := b.parent(l, p.Tenant, []*object{srk})
		if err != nil {
			return err
		}
		lk := *l
		if spec.Alg.IsRSA() {
			lk.timeout = b.cfg.KeyGenTimeout
		}
		return b.withSlot(l, []*object{srk, parent}, func() error {
			var err error
			rsp, err = tpm2.Create{
				ParentHandle: tpm2.AuthHandle{Handle: parent.handle, Name: parent.name, Auth: b.saltedSession(srk, parent.auth)},
				InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
					UserAuth: tpm2.TPM2BAuth{Buffer: auth},
				}},
				InPublic: tpm2.New2B(keyTemplate(spec)),
			}.Execute(&lk)
			return err
		})
	})
	if err != nil {
		return nil, nil, classify("generate key", err)
	}
	k := &key{public: rsp.OutPublic.Bytes(), private: rsp.OutPrivate.Buffer, auth: auth}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return nil, nil, &kms.Error{Backend: "tpm", Op: "generate key", Err: err}
	}
	// The TPM fills in the template; check it kept every attribute.
	if pub.ObjectAttributes != signingKeyAttributes {
		return nil, nil, &kms.Error{Backend: "tpm", Op: "generate key", Err: fmt.Errorf("key attributes 0x%x, want 0x%x", attrBits(pub.ObjectAttributes), attrBits(signingKeyAttributes))}
	}
	pk, err := publicKey(pub)
	if err != nil {
		return nil, nil, &kms.Error{Backend: "tpm", Op: "generate key", Err: err}
	}
	if !spec.Alg.MatchesPublicKey(pk, spec.Bits) {
		return nil, nil, &kms.Error{Backend: "tpm", Op: "generate key", Err: fmt.Errorf("the TPM returned a %T that is not a %v key", pk, spec.Alg)}
	}
	k.pub = pub
	return k.encode(), pk, nil
}

func (b *Backend) supportedRSA() string {
	s := ""
	for _, bits := range []int{2048, 3072, 4096} {
		if b.rsaBits[bits] {
			if s != "" {
				s += " or "
			}
			s += fmt.Sprint(bits)
		}
	}
	if s == "" {
		return "an EC algorithm"
	}
	return s
}

// attrBits is the TPMA_OBJECT as the TPM marshals it.
func attrBits(a tpm2.TPMAObject) uint32 {
	m := tpm2.Marshal(a)
	return uint32(m[0])<<24 | uint32(m[1])<<16 | uint32(m[2])<<8 | uint32(m[3])
}

// retry runs fn, and runs it again when the TPM asked to (TPM_RC_RETRY and
// friends, for a command with sessions, which needs fresh ones: fn drops a
// reusable session that failed), lost track of objects or sessions the
// cache holds (someone flushed them), or ran out of session slots: all the
// backend's business, never the client's.
func (b *Backend) retry(l *link, fn func() error) error {
	backoff := firstBackoff
	for attempt := 0; ; attempt++ {
		err := fn()
		if err == nil || attempt == maxRetries || b.conn == nil {
			return err
		}
		switch {
		case isRC(err, tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting):
			b.log.Debug("TPM asked to retry", "err", err, "attempt", attempt+1)
			if serr := sleep(l.ctx, backoff); serr != nil {
				return err
			}
			backoff *= 2
		case isStaleHandle(err) && attempt < 2:
			b.log.Warn("a TPM object the backend had loaded is gone; reloading", "err", err)
			b.forgetAll()
			if ferr := b.flushLeftovers(l, true); ferr != nil {
				return ferr
			}
		case isRC(err, tpm2.TPMRCSessionMemory) && attempt < 2:
			b.log.Warn("the TPM has no free session slot; flushing sessions", "err", err)
			b.dropSessions(l)
			if ferr := b.flushLeftovers(l, true); ferr != nil {
				return ferr
			}
		case isStaleSession(err) && attempt < 2:
			// A reusable session someone flushed; the command that
			// used it dropped it, and the next run starts another.
			b.log.Warn("a TPM session the backend had started is gone; starting another", "err", err)
		default:
			return err
		}
	}
}

var hashAlgs = map[crypto.Hash]tpm2.TPMIAlgHash{
	crypto.SHA256: tpm2.TPMAlgSHA256,
	crypto.SHA384: tpm2.TPMAlgSHA384,
	crypto.SHA512: tpm2.TPMAlgSHA512,
}

func sigScheme(scheme tpm2.TPMAlgID, hash tpm2.TPMIAlgHash) tpm2.TPMTSigScheme {
	return tpm2.TPMTSigScheme{Scheme: scheme, Details: tpm2.NewTPMUSigScheme(scheme, &tpm2.TPMSSchemeHash{HashAlg: hash})}
}

// nullTicket is the TPMT_TK_HASHCHECK for digests the TPM did not hash
// itself, accepted by unrestricted keys (Part 2 §10.7.6).
func nullTicket() tpm2.TPMTTKHashCheck {
	return tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull}
}

// Sign signs digest with the key h: ECDSA signatures come back as ASN.1 DER,
// RSA ones per opts (crypto.Hash for PKCS#1 v1.5, *rsa.PSSOptions with the
// salt equal to the hash length for PSS). The digest is checked against the
// hash before any TPM command, and travels encrypted in a salted session,
// the key's reusable one (see keySession).
func (b *Backend) Sign(ctx context.Context, p kms.Partition, h kms.Handle, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := kms.CheckSign(opts, digest); err != nil {
		return nil, err
	}
	hash := opts.HashFunc()
	hashAlg := hashAlgs[hash]
	_, isPSS := opts.(*rsa.PSSOptions)
	k, err := b.decoded.decode(h)
	if err != nil {
		return nil, err
	}
	var scheme tpm2.TPMTSigScheme
	switch {
	case k.pub.Type == tpm2.TPMAlgECC && isPSS:
		return nil, &kms.FieldError{Field: "padding", Reason: "PSS is for RSA keys"}
	case k.pub.Type == tpm2.TPMAlgECC:
		scheme = sigScheme(tpm2.TPMAlgECDSA, hashAlg)
	case isPSS && !b.pssHashSalt:
		return nil, &kms.FieldError{Field: "padding", Reason: "PSS: the TPM's salt is not the hash length"}
	case isPSS:
		scheme = sigScheme(tpm2.TPMAlgRSAPSS, hashAlg)
	default:
		scheme = sigScheme(tpm2.TPMAlgRSASSA, hashAlg)
	}
	if err := checkPartition(p); err != nil {
		return nil, err
	}
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := b.checkUsable(h); err != nil {
		b.decoded.forget(h) // decoded above: a destroyed key's handle is not kept
		return nil, err
	}
	var rsp *tpm2.SignResponse
	err = b.retry(l, func() error {
		srk, err := b.srk(l)
		if err != nil {
			return err
		}
		o, err := b.loadKey(l, p.Tenant, k, []*object{srk})
		if err != nil {
			return err
		}
		sess, err := b.keySession(l, srk, o, k.auth)
		if err != nil {
			return err
		}
		rsp, err = tpm2.Sign{
			KeyHandle:  tpm2.AuthHandle{Handle: o.handle, Name: o.name, Auth: sess},
			Digest:     tpm2.TPM2BDigest{Buffer: digest},
			InScheme:   scheme,
			Validation: nullTicket(),
		}.Execute(l)
		if err != nil {
			// Its nonces may be out of step with the TPM's: a retry
			// starts a fresh one.
			b.dropSession(l, o)
		}
		return err
	})
	if err != nil {
		return nil, classify("sign", err)
	}
	if k.pub.Type == tpm2.TPMAlgECC {
		sig, err := rsp.Signature.Signature.ECDSA()
		if err != nil {
			return nil, &kms.Error{Backend: "tpm", Op: "sign", Err: err}
		}
		return derSignature(sig)
	}
	var sig *tpm2.TPMSSignatureRSA
	if isPSS {
		sig, err = rsp.Signature.Signature.RSAPSS()
	} else {
		sig, err = rsp.Signature.Signature.RSASSA()
	}
	if err != nil {
		return nil, &kms.Error{Backend: "tpm", Op: "sign", Err: err}
	}
	return sig.Sig.Buffer, nil
}

// derSignature encodes an ECDSA signature as ASN.1 DER (RFC 3279 §2.2.3),
// the crypto.Signer form.
func derSignature(sig *tpm2.TPMSSignatureECC) ([]byte, error) {
	der, err := asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(sig.SignatureR.Buffer),
		new(big.Int).SetBytes(sig.SignatureS.Buffer),
	})
	if err != nil {
		return nil, &kms.Error{Backend: "tpm", Op: "encode signature", Err: err}
	}
	return der, nil
}

// checkUsable refuses destroyed keys and, in the data loss state, every
// key.
func (b *Backend) checkUsable(h kms.Handle) error {
	if b.destroyed[sha256.Sum256(h)] {
		return &kms.Error{Backend: "tpm", Op: "use the key", Kind: kms.ErrNotFound, Err: errors.New("key destroyed")}
	}
	if b.dataLoss {
		return b.dataLossError()
	}
	return nil
}

// Destroy unloads the key h. A TPM key has no existence in the TPM beyond
// its loaded copy: it is destroyed by deleting its blob, which the daemon
// does when it records the key DESTROYED. Destroy checks that h is a key of
// this tenant on this TPM (by loading it), flushes it, and remembers, for
// the life of this process, that it is destroyed: Sign and Destroy of it
// then fail with kms.ErrNotFound. A later process would load the blob
// again if asked; the store, which has dropped the handle, never asks.
func (b *Backend) Destroy(ctx context.Context, p kms.Partition, h kms.Handle) error {
	k, err := decodeHandle(h)
	if err != nil {
		return err
	}
	if err := checkPartition(p); err != nil {
		return err
	}
	l, unlock, err := b.begin(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if err := b.checkUsable(h); err != nil {
		return err
	}
	var o *object
	err = b.retry(l, func() error {
		var err error
		o, err = b.loadKey(l, p.Tenant, k, nil)
		return err
	})
	if err != nil {
		return classify("destroy key", err)
	}
	if err := b.flush(l, o); err != nil {
		return err
	}
	b.destroyed[sha256.Sum256(h)] = true
	b.decoded.forget(h)
	return nil
}
