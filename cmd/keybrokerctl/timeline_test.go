package main

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
)

const (
	pending   = kbv1.KeyState_KEY_STATE_PENDING
	active    = kbv1.KeyState_KEY_STATE_ACTIVE
	retired   = kbv1.KeyState_KEY_STATE_RETIRED
	expired   = kbv1.KeyState_KEY_STATE_EXPIRED
	destroyed = kbv1.KeyState_KEY_STATE_DESTROYED
	revoked   = kbv1.KeyState_KEY_STATE_REVOKED
)

// ev is the event "version enters state at midnight UTC of m/d 2026".
func ev(m time.Month, d int, version uint32, state kbv1.KeyState) timelineEvent {
	return timelineEvent{day(m, d).AsTime(), version, state}
}

func (e timelineEvent) String() string {
	return fmt.Sprintf("%s v%d %s", e.Time.Format(time.RFC3339), e.Version, stateName(e.State))
}

// policy30 is 30d rotation period, 10d overlap, 5d lead, 7d destroy delay.
func policy30() *kbv1.RotationPolicy {
	return &kbv1.RotationPolicy{RotationPeriod: days(30), Overlap: days(10), PrePublicationLead: days(5), DestroyDelay: days(7)}
}

// rotatingKey has v1 EXPIRED (destroyed March 4), v2 RETIRED (expires March
// 2) and v3 ACTIVE until March 22, and no PENDING version.
func rotatingKey() *kbv1.Key {
	return &kbv1.Key{
		Name: "k", ActiveVersion: 3, Policy: policy30(), NextRotationTime: day(3, 22),
		Versions: []*kbv1.KeyVersion{
			{Version: 1, State: expired, ActivateTime: day(1, 1), RetireTime: day(1, 31), ExpireTime: day(2, 25),
				NextState: destroyed, NextTransitionTime: day(3, 4)},
			{Version: 2, State: retired, ActivateTime: day(1, 21), RetireTime: day(2, 20),
				NextState: expired, NextTransitionTime: day(3, 2)},
			{Version: 3, State: active, ActivateTime: day(2, 20),
				NextState: retired, NextTransitionTime: day(3, 22)},
		},
	}
}

func TestProjectTimeline(t *testing.T) {
	now := day(3, 1).AsTime()
	tests := []struct {
		name    string
		key     func() *kbv1.Key
		horizon time.Duration
		want    []timelineEvent
	}{
		{
			name:    "no pending version; an event at the horizon",
			key:     rotatingKey,
			horizon: 46 * 24 * time.Hour, // April 16
			want: []timelineEvent{
				ev(3, 2, 2, expired),
				ev(3, 4, 1, destroyed),
				ev(3, 9, 2, destroyed), // expired + destroy delay
				ev(3, 17, 4, pending),  // next rotation - lead
				ev(3, 22, 3, retired),
				ev(3, 22, 4, active),
				ev(4, 1, 3, expired),   // activation + overlap
				ev(4, 8, 3, destroyed), // + destroy delay
				ev(4, 16, 5, pending),  // next activation (April 21) - lead
			},
		},
		{
			name:    "a second short of the last event",
			key:     rotatingKey,
			horizon: 46*24*time.Hour - time.Second,
			want: []timelineEvent{
				ev(3, 2, 2, expired),
				ev(3, 4, 1, destroyed),
				ev(3, 9, 2, destroyed),
				ev(3, 17, 4, pending),
				ev(3, 22, 3, retired),
				ev(3, 22, 4, active),
				ev(4, 1, 3, expired),
				ev(4, 8, 3, destroyed),
			},
		},
		{
			name: "pending version; an overdue destruction; several rotations",
			key: func() *kbv1.Key {
				return &kbv1.Key{
					Name: "k", ActiveVersion: 3, Policy: policy30(), NextRotationTime: day(3, 22),
					Versions: []*kbv1.KeyVersion{
						{Version: 1, State: destroyed, DestroyTime: day(2, 1)},
						{Version: 2, State: revoked, RevokeTime: day(2, 13), NextState: destroyed, NextTransitionTime: day(2, 20)},
						{Version: 3, State: active, ActivateTime: day(2, 13), NextState: retired, NextTransitionTime: day(3, 22)},
						{Version: 4, State: pending, CreateTime: day(3, 17), NextState: active, NextTransitionTime: day(3, 22)},
					},
				}
			},
			horizon: 100 * 24 * time.Hour, // June 9
			want: []timelineEvent{
				ev(2, 20, 2, destroyed),
				ev(3, 22, 3, retired),
				ev(3, 22, 4, active),
				ev(4, 1, 3, expired),
				ev(4, 8, 3, destroyed),
				ev(4, 16, 5, pending),
				ev(4, 21, 4, retired),
				ev(4, 21, 5, active),
				ev(5, 1, 4, expired),
				ev(5, 8, 4, destroyed),
				ev(5, 16, 6, pending),
				ev(5, 21, 5, retired),
				ev(5, 21, 6, active),
				ev(5, 31, 5, expired),
				ev(6, 7, 5, destroyed),
			},
		},
		{
			name: "no policy: only the reported transitions",
			key: func() *kbv1.Key {
				k := rotatingKey()
				k.Policy = nil
				return k
			},
			horizon: 365 * 24 * time.Hour,
			want:    []timelineEvent{ev(3, 2, 2, expired), ev(3, 4, 1, destroyed)},
		},
		{
			name: "period under an hour: only the reported transitions",
			key: func() *kbv1.Key {
				k := rotatingKey()
				k.Policy.RotationPeriod = durationpb.New(30 * time.Minute)
				k.Policy.PrePublicationLead = durationpb.New(time.Minute)
				k.NextRotationTime = day(3, 1)
				return k
			},
			horizon: 3 * 24 * time.Hour,
			want:    []timelineEvent{ev(3, 2, 2, expired), ev(3, 4, 1, destroyed)},
		},
		{
			name: "no next rotation",
			key: func() *kbv1.Key {
				k := rotatingKey()
				k.NextRotationTime = nil
				return k
			},
			horizon: 365 * 24 * time.Hour,
			want:    []timelineEvent{ev(3, 2, 2, expired), ev(3, 4, 1, destroyed), ev(3, 9, 2, destroyed)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := tt.key()
			got := projectTimeline(k, now, tt.horizon)
			if !slices.EqualFunc(got, tt.want, func(a, b timelineEvent) bool {
				return a.Time.Equal(b.Time) && a.Version == b.Version && a.State == b.State
			}) {
				t.Errorf("projectTimeline() =\n%s\nwant:\n%s", eventLines(got), eventLines(tt.want))
			}
			if !proto.Equal(k, tt.key()) {
				t.Errorf("projectTimeline changed the key to %v", k)
			}
		})
	}
}

func eventLines(events []timelineEvent) string {
	var b strings.Builder
	for _, e := range events {
		fmt.Fprintln(&b, e)
	}
	return b.String()
}
