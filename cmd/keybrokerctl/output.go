package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/kms"
)

// enumFlag maps the values of a flag, spelled as its help shows them, to
// enum constants. Parsing ignores case.
type enumFlag[E ~int32] map[string]E

func (m enumFlag[E]) parse(flag, s string) (E, error) {
	for name, v := range m {
		if strings.EqualFold(name, s) {
			return v, nil
		}
	}
	return 0, usageErrorf("--%s: got %q, want %s", flag, s, m)
}

// nameOf returns the flag value that stands for v.
func (m enumFlag[E]) nameOf(v E) string {
	for name, x := range m {
		if x == v {
			return name
		}
	}
	return fmt.Sprint(int32(v))
}

// String lists the names in enum order, as in "der|jose".
func (m enumFlag[E]) String() string {
	names := slices.SortedFunc(maps.Keys(m), func(a, b string) int { return cmp.Compare(m[a], m[b]) })
	return strings.Join(names, "|")
}

func (a *app) jsonOutput() bool { return a.output == "json" }

// printProto prints m in the proto3 JSON mapping, on one line.
func (a *app) printProto(m proto.Message) error {
	b, err := protojson.MarshalOptions{EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	return a.printJSON(b, false)
}

// printJSON prints the JSON text b on one line, or indented. Either way the
// spacing is ours: protojson varies its spacing on purpose.
func (a *app) printJSON(b []byte, indent bool) error {
	var buf bytes.Buffer
	var err error
	if indent {
		err = json.Indent(&buf, b, "", "  ")
	} else {
		err = json.Compact(&buf, b)
	}
	if err != nil {
		return fmt.Errorf("keybrokerd sent invalid JSON: %w", err)
	}
	buf.WriteByte('\n')
	_, err = a.stdout.Write(buf.Bytes())
	return err
}

// algName is the JOSE name of alg (RFC 7518 §3.1), as in "ES256".
func algName(alg kbv1.Algorithm) string {
	return strings.TrimPrefix(alg.String(), "ALGORITHM_")
}

func stateName(s kbv1.KeyState) string {
	return strings.TrimPrefix(s.String(), "KEY_STATE_")
}

// nextStateName is stateName, or "-" when there is no next state.
func nextStateName(s kbv1.KeyState) string {
	if s == kbv1.KeyState_KEY_STATE_UNSPECIFIED {
		return "-"
	}
	return stateName(s)
}

// formatDuration prints d as kms.FormatDuration does ("90d"), or "-"
// when unset.
func formatDuration(d *durationpb.Duration) string {
	if d == nil {
		return "-"
	}
	return kms.FormatDuration(d.AsDuration())
}

// formatTime prints ts in RFC 3339, UTC, or "-" when unset.
func formatTime(ts *timestamppb.Timestamp) string {
	if ts == nil {
		return "-"
	}
	return ts.AsTime().UTC().Format(time.RFC3339)
}
