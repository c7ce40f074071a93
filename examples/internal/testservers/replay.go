package testservers

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"sync"
	"time"

	"github.com/keybroker/keybroker/pop"
)

// replayCache remembers one-time identifiers (DPoP jti, client assertion
// jti) until they could no longer be accepted anyway.
type replayCache struct {
	mu   sync.Mutex
	seen map[string]time.Time // id → when it may be forgotten
}

// add records id until until. It reports false when id is already
// recorded: a replay.
func (c *replayCache) add(id string, until, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.seen == nil {
		c.seen = map[string]time.Time{}
	}
	for k, exp := range c.seen {
		if now.After(exp) {
			delete(c.seen, k)
		}
	}
	if _, ok := c.seen[id]; ok {
		return false
	}
	c.seen[id] = until
	return true
}

// nonceSource makes DPoP server nonces (RFC 9449 §8, §9): an HMAC of the
// current period, so a nonce is valid for one to two periods and the server
// keeps no per-client state.
type nonceSource struct {
	key    [32]byte
	period time.Duration
}

func newNonceSource(period time.Duration) *nonceSource {
	n := &nonceSource{period: period}
	rand.Read(n.key[:])
	return n
}

// at is the nonce of the period that contains now.
func (n *nonceSource) at(now time.Time) string {
	var epoch [8]byte
	binary.BigEndian.PutUint64(epoch[:], uint64(now.UnixNano()/int64(n.period)))
	m := hmac.New(sha256.New, n.key[:])
	m.Write(epoch[:])
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil)[:18])
}

// verifyDPoP checks a DPoP proof with pop.VerifyDPoPProof, demanding this
// period's nonce or, in the grace period after a change, the previous one.
// nonceOnly reports that the proof is good but for its nonce: the server
// should answer use_dpop_nonce (RFC 9449 §8, §9) with a fresh one.
func (n *nonceSource) verifyDPoP(proof string, c pop.DPoPCheck) (claims *pop.DPoPClaims, nonceOnly bool, err error) {
	c.Nonce = n.at(c.Now)
	claims, err = pop.VerifyDPoPProof(proof, c)
	if isNonceError(err) {
		c.Nonce = n.at(c.Now.Add(-n.period))
		claims, err = pop.VerifyDPoPProof(proof, c)
	}
	return claims, isNonceError(err), err
}

// isNonceError reports whether err is pop's verdict on the "nonce" claim,
// which it checks last, after the signature and every other claim.
func isNonceError(err error) bool {
	var ce *pop.ClaimError
	return errors.As(err, &ce) && ce.Claim == "nonce"
}
