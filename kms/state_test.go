package kms

import (
	"encoding/json"
	"testing"
)

func TestStateString(t *testing.T) {
	for s, want := range map[State]string{
		StateUnknown:   "unknown",
		StatePending:   "pending",
		StateActive:    "active",
		StateRetired:   "retired",
		StateExpired:   "expired",
		StateDestroyed: "destroyed",
		StateRevoked:   "revoked",
		State(7):       "State(7)",
		State(-1):      "State(-1)",
	} {
		if got := s.String(); got != want {
			t.Errorf("State(%d).String() = %q, want %q", int(s), got, want)
		}
	}
}

func TestStatePredicates(t *testing.T) {
	for _, tc := range []struct {
		s                  State
		published, canSign bool
	}{
		{StateUnknown, false, false},
		{StatePending, true, false},
		{StateActive, true, true},
		{StateRetired, true, true},
		{StateExpired, false, false},
		{StateDestroyed, false, false},
		{StateRevoked, false, false},
		{State(7), false, false},
		{State(-1), false, false},
	} {
		if got := tc.s.Published(); got != tc.published {
			t.Errorf("%v.Published() = %v, want %v", tc.s, got, tc.published)
		}
		if got := tc.s.CanSign(); got != tc.canSign {
			t.Errorf("%v.CanSign() = %v, want %v", tc.s, got, tc.canSign)
		}
	}
}

func TestParseState(t *testing.T) {
	for _, s := range []State{StatePending, StateActive, StateRetired, StateExpired, StateDestroyed, StateRevoked} {
		got, err := ParseState(s.String())
		if err != nil || got != s {
			t.Errorf("ParseState(%q) = %v, %v; want %v, nil", s.String(), got, err, s)
		}
	}
	for _, in := range []string{"", "unknown", "Active", "ACTIVE", "active ", "State(2)", "2", "deleted"} {
		got, err := ParseState(in)
		if err == nil {
			t.Errorf("ParseState(%q) = %v, nil; want an error", in, got)
		}
		if got != StateUnknown {
			t.Errorf("ParseState(%q) = %v, want StateUnknown", in, got)
		}
	}
}

func TestStateText(t *testing.T) {
	for _, s := range []State{StatePending, StateActive, StateRetired, StateExpired, StateDestroyed, StateRevoked} {
		b, err := s.MarshalText()
		if err != nil {
			t.Fatalf("%v.MarshalText: %v", s, err)
		}
		if string(b) != s.String() {
			t.Errorf("%v.MarshalText() = %q, want %q", s, b, s.String())
		}
		var back State
		if err := back.UnmarshalText(b); err != nil || back != s {
			t.Errorf("UnmarshalText(%q) = %v, %v; want %v", b, back, err, s)
		}
		j, err := json.Marshal(map[string]State{"s": s})
		if err != nil {
			t.Fatal(err)
		}
		if want := `{"s":"` + s.String() + `"}`; string(j) != want {
			t.Errorf("json.Marshal = %s, want %s", j, want)
		}
		var m map[string]State
		if err := json.Unmarshal(j, &m); err != nil || m["s"] != s {
			t.Errorf("json.Unmarshal(%s) = %v, %v; want %v", j, m["s"], err, s)
		}
	}
	for _, s := range []State{StateUnknown, State(7), State(-1)} {
		if b, err := s.MarshalText(); err == nil {
			t.Errorf("State(%d).MarshalText() = %q, nil; want an error", int(s), b)
		}
	}
	for _, in := range []string{"", "unknown", "Active", "gone"} {
		s := StateRetired
		if err := s.UnmarshalText([]byte(in)); err == nil {
			t.Errorf("UnmarshalText(%q) = nil, want an error", in)
		}
		if s != StateRetired {
			t.Errorf("failed UnmarshalText(%q) changed the value to %v", in, s)
		}
	}
}
