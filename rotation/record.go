package rotation

import (
	"time"

	"github.com/keybroker/keybroker/kms"
)

// Key is a key's record: its versions and their states, what rotation
// decides on. The store keeps it as it is, with its revision.
type Key struct {
	Schema   int           `json:"schema"`
	Tenant   string        `json:"tenant"`
	Name     string        `json:"name"`
	Alg      kms.Algorithm `json:"alg"`
	Bits     int           `json:"bits,omitempty"`
	Backend  string        `json:"backend"`
	Created  time.Time     `json:"created"`
	Policy   kms.Policy    `json:"policy"`
	Versions []Version     `json:"versions"`
	// Rev is the store's revision of the record, which an update compares
	// (kept by the store, not in the record).
	Rev int64 `json:"-"`
}

// Version is one version of a key.
type Version struct {
	Version   uint32     `json:"version"`
	Kid       string     `json:"kid"`
	State     kms.State  `json:"state"`
	Handle    kms.Handle `json:"handle"`
	PublicKey []byte     `json:"public_key"` // PKIX DER
	// When the version entered each state (zero: not yet).
	Created   time.Time `json:"created"`
	Activated time.Time `json:"activated,omitzero"`
	Retired   time.Time `json:"retired,omitzero"`
	Expired   time.Time `json:"expired,omitzero"`
	Revoked   time.Time `json:"revoked,omitzero"`
	Destroyed time.Time `json:"destroyed,omitzero"`
	// Certificates is a CA-issued chain for the version's key (DER, leaf
	// first), imported by an admin (ImportCertificate); none until then.
	Certificates [][]byte `json:"certificates,omitempty"`
}

// Index returns the index of version n in k.Versions, or -1.
func (k Key) Index(n uint32) int {
	for i, v := range k.Versions {
		if v.Version == n {
			return i
		}
	}
	return -1
}

// InState returns the index of the first version in state s, or -1.
func (k Key) InState(s kms.State) int {
	for i, v := range k.Versions {
		if v.State == s {
			return i
		}
	}
	return -1
}

// NextVersion is the number the next version gets: one more than any
// version ever recorded, so numbers (like kids) are never reused.
func (k Key) NextVersion() uint32 {
	var n uint32
	for _, v := range k.Versions {
		n = max(n, v.Version)
	}
	return n + 1
}

// Clone returns a copy whose Versions can be changed without touching k.
func (k Key) Clone() Key {
	k.Versions = append([]Version(nil), k.Versions...)
	return k
}
