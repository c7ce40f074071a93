package kms

import "fmt"

// State is the lifecycle state of a key version (docs/design.md "Key model and rotation").
type State int

// Version states. The zero value is invalid.
const (
	StateUnknown State = iota
	StatePending
	StateActive
	StateRetired
	StateExpired
	StateDestroyed
	StateRevoked
)

var stateNames = [...]string{"unknown", "pending", "active", "retired", "expired", "destroyed", "revoked"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// ParseState parses the String form of a state.
func ParseState(s string) (State, error) {
	for i, n := range stateNames {
		if i > 0 && n == s {
			return State(i), nil
		}
	}
	return StateUnknown, fmt.Errorf("unknown key state %q", s)
}

// Published reports whether versions in this state belong in the JWKS.
func (s State) Published() bool {
	return s == StatePending || s == StateActive || s == StateRetired
}

// CanSign reports whether a version in this state may sign when named.
func (s State) CanSign() bool { return s == StateActive || s == StateRetired }

// MarshalText encodes the state's name.
func (s State) MarshalText() ([]byte, error) {
	if s <= StateUnknown || int(s) >= len(stateNames) {
		return nil, fmt.Errorf("invalid key state %d", int(s))
	}
	return []byte(s.String()), nil
}

// UnmarshalText parses the state's name.
func (s *State) UnmarshalText(b []byte) error {
	v, err := ParseState(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}
