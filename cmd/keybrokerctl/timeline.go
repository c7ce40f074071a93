package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/kms"
)

// kidWidth is how much of a kid "keys timeline" shows in text mode.
const kidWidth = 12

// timelineEvent is a projected transition: version Version enters State at
// Time.
type timelineEvent struct {
	Time    time.Time
	Version uint32
	State   kbv1.KeyState
}

// projectTimeline returns the transitions k is due for until now+horizon
// (inclusive), ordered by time, then version, then state:
//
//   - the next transition of each RETIRED, EXPIRED or REVOKED version, as
//     keybrokerd reports it (next_transition_time), and for a RETIRED one its
//     destruction destroy_delay after expiring;
//   - unless a PENDING version exists, the next version's generation (PENDING)
//     at next_rotation_time - lead;
//   - activations every rotation_period from next_rotation_time, each
//     retiring the version it replaces, which expires overlap later and is
//     destroyed destroy_delay after that, and each followed by the
//     generation of the version after it, lead before its activation.
//
// Overdue transitions (due before now) keep their due time. Without a
// policy (or with a rotation period under kms.MinPeriod) only the
// reported next transitions are projected.
func projectTimeline(k *kbv1.Key, now time.Time, horizon time.Duration) []timelineEvent {
	end := now.Add(horizon)
	var events []timelineEvent
	add := func(t time.Time, version uint32, state kbv1.KeyState) {
		if !t.After(end) {
			events = append(events, timelineEvent{t, version, state})
		}
	}
	p := k.GetPolicy()
	period, overlap := p.GetRotationPeriod().AsDuration(), p.GetOverlap().AsDuration()
	lead, destroyDelay := p.GetPrePublicationLead().AsDuration(), p.GetDestroyDelay().AsDuration()
	// keybrokerd refuses shorter periods; a shorter one here would make the
	// loop below run nearly forever.
	havePolicy := p != nil && period >= kms.MinPeriod

	var active, pending, last uint32
	for _, v := range k.GetVersions() {
		last = max(last, v.GetVersion())
		next := v.GetNextTransitionTime()
		switch v.GetState() {
		case kbv1.KeyState_KEY_STATE_ACTIVE:
			active = v.GetVersion()
		case kbv1.KeyState_KEY_STATE_PENDING:
			pending = v.GetVersion()
		case kbv1.KeyState_KEY_STATE_RETIRED:
			if next != nil {
				add(next.AsTime(), v.GetVersion(), kbv1.KeyState_KEY_STATE_EXPIRED)
				if havePolicy {
					add(next.AsTime().Add(destroyDelay), v.GetVersion(), kbv1.KeyState_KEY_STATE_DESTROYED)
				}
			}
		case kbv1.KeyState_KEY_STATE_EXPIRED, kbv1.KeyState_KEY_STATE_REVOKED:
			if next != nil {
				add(next.AsTime(), v.GetVersion(), kbv1.KeyState_KEY_STATE_DESTROYED)
			}
		}
	}

	if rotation := k.GetNextRotationTime(); havePolicy && rotation != nil {
		at, prev, next := rotation.AsTime(), active, pending
		if next == 0 {
			next = last + 1
			add(at.Add(-lead), next, kbv1.KeyState_KEY_STATE_PENDING)
		}
		for !at.After(end) {
			if prev != 0 {
				add(at, prev, kbv1.KeyState_KEY_STATE_RETIRED)
				add(at.Add(overlap), prev, kbv1.KeyState_KEY_STATE_EXPIRED)
				add(at.Add(overlap+destroyDelay), prev, kbv1.KeyState_KEY_STATE_DESTROYED)
			}
			add(at, next, kbv1.KeyState_KEY_STATE_ACTIVE)
			at, prev, next = at.Add(period), next, next+1
			add(at.Add(-lead), next, kbv1.KeyState_KEY_STATE_PENDING)
		}
	}

	slices.SortFunc(events, func(a, b timelineEvent) int {
		return cmp.Or(a.Time.Compare(b.Time), cmp.Compare(a.Version, b.Version), cmp.Compare(a.State, b.State))
	})
	return events
}

// timelineOutput is what "keys timeline --output json" prints.
type timelineOutput struct {
	Key    json.RawMessage `json:"key"`   // the Key, proto3 JSON mapping
	Until  string          `json:"until"` // now + horizon, RFC 3339
	Events []eventOutput   `json:"events"`
}

type eventOutput struct {
	Time    string `json:"time"` // RFC 3339, UTC
	Version uint32 `json:"version"`
	State   string `json:"state"` // the state entered, as in "ACTIVE"
}

func newKeysTimelineCmd(a *app) *cobra.Command {
	horizon := durationFlag{d: 365 * kms.Day}
	var from string
	cmd := &cobra.Command{
		Use:   "timeline NAME [--horizon D]",
		Short: "Print a key's versions and its projected transitions",
		Long: `Print every version of a key with the times it entered each state and its
next transition, then the transitions projected from the rotation policy
up to --horizon from now: the next versions' generation (PENDING) and
activation, and the retirement, expiry and destruction of the versions
they replace. Transitions keybrokerd runs late (after downtime) or manual
rotations and revocations shift the actual times.

In text mode kids are cut to their first 12 characters.

With --output json it prints {"key","until","events"}: the Key in the
proto3 JSON mapping, now + horizon, and the events as
{"time","version","state"}, state being the one entered, as in "ACTIVE".`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.call(cmd.Context(), func(ctx context.Context, conn *grpc.ClientConn) error {
				resp, err := kbv1.NewKeyBrokerClient(conn).GetKey(ctx, &kbv1.GetKeyRequest{Name: args[0]})
				if err != nil {
					return err
				}
				now := time.Now()
				if from != "" {
					t, err := time.Parse(time.RFC3339, from)
					if err != nil {
						return usageErrorf("--from: %q is not an RFC 3339 time such as 2027-01-01T00:00:00Z", from)
					}
					now = t
				}
				return a.printTimeline(resp.GetKey(), now.Add(horizon.d), projectTimeline(resp.GetKey(), now, horizon.d))
			})
		},
	}
	cmd.Flags().Var(&horizon, "horizon", "project transitions up to time `D` from now, as 365d, 1d12h or 36h")
	cmd.Flags().StringVar(&from, "from", "", "project from `TIME` (RFC 3339) instead of now")
	return cmd
}

func (a *app) printTimeline(k *kbv1.Key, until time.Time, events []timelineEvent) error {
	if a.jsonOutput() {
		key, err := protojson.MarshalOptions{EmitUnpopulated: true}.Marshal(k)
		if err != nil {
			return err
		}
		out := timelineOutput{Key: key, Until: until.UTC().Format(time.RFC3339Nano), Events: []eventOutput{}}
		for _, e := range events {
			out.Events = append(out.Events, eventOutput{e.Time.UTC().Format(time.RFC3339Nano), e.Version, stateName(e.State)})
		}
		b, err := json.Marshal(out)
		if err != nil {
			return err
		}
		return a.printJSON(b, false)
	}

	fmt.Fprintln(a.stdout, "versions:")
	tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  VERSION\tKID\tSTATE\tCREATED\tACTIVATED\tRETIRED\tEXPIRED\tREVOKED\tDESTROYED\tNEXT\tAT")
	for _, v := range k.GetVersions() {
		kid := v.GetKid()
		if len(kid) > kidWidth {
			kid = kid[:kidWidth]
		}
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.GetVersion(), kid, stateName(v.GetState()),
			formatTime(v.GetCreateTime()), formatTime(v.GetActivateTime()), formatTime(v.GetRetireTime()),
			formatTime(v.GetExpireTime()), formatTime(v.GetRevokeTime()), formatTime(v.GetDestroyTime()),
			nextStateName(v.GetNextState()), formatTime(v.GetNextTransitionTime()))
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	fmt.Fprintf(a.stdout, "projected until %s:\n", until.UTC().Format(time.RFC3339))
	if len(events) == 0 {
		_, err := fmt.Fprintln(a.stdout, "  none")
		return err
	}
	tw = tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  TIME\tVERSION\tSTATE")
	for _, e := range events {
		fmt.Fprintf(tw, "  %s\t%d\t%s\n", e.Time.UTC().Format(time.RFC3339), e.Version, stateName(e.State))
	}
	return tw.Flush()
}
