package kms

import (
	"strings"
	"testing"
	"time"
)

func TestDefaultPolicy(t *testing.T) {
	// docs/design.md "Key model and rotation": 90 days active, 90 days overlap,
	// 7 days lead, 30 days before destruction.
	want := Policy{RotationPeriod: 90 * 24 * time.Hour, Overlap: 90 * 24 * time.Hour, Lead: 7 * 24 * time.Hour, DestroyDelay: 30 * 24 * time.Hour}
	if got := DefaultPolicy(); got != want {
		t.Errorf("DefaultPolicy() = %+v, want %+v", got, want)
	}
	if err := DefaultPolicy().Validate(); err != nil {
		t.Errorf("DefaultPolicy().Validate() = %v, want nil", err)
	}
}

func TestPolicyValidate(t *testing.T) {
	valid := []Policy{
		DefaultPolicy(),
		// The shortest period allowed, with every other field minimal.
		{RotationPeriod: MinPeriod, Overlap: 1, Lead: 1, DestroyDelay: 1},
		{RotationPeriod: MinPeriod, Overlap: time.Second, Lead: MinPeriod - 1, DestroyDelay: time.Second},
		{RotationPeriod: 365 * Day, Overlap: 1000 * Day, Lead: 364 * Day, DestroyDelay: 1000 * Day},
	}
	for _, p := range valid {
		if err := p.Validate(); err != nil {
			t.Errorf("%+v: Validate() = %v, want nil", p, err)
		}
	}

	with := func(f func(*Policy)) Policy {
		p := DefaultPolicy()
		f(&p)
		return p
	}
	for _, tc := range []struct {
		name   string
		p      Policy
		field  string
		reason string // a substring of the reason: the bad value
	}{
		{"zero period", with(func(p *Policy) { p.RotationPeriod = 0 }), "policy.rotation_period", "got 0s, want at least 1h0m0s"},
		{"negative period", with(func(p *Policy) { p.RotationPeriod = -90 * Day }), "policy.rotation_period", "got -2160h0m0s"},
		{"period under an hour", with(func(p *Policy) { p.RotationPeriod, p.Lead = 59*time.Minute, time.Minute }), "policy.rotation_period", "got 59m0s"},
		{"period an hour less a nanosecond", with(func(p *Policy) { p.RotationPeriod, p.Lead = MinPeriod-1, time.Minute }), "policy.rotation_period", "got 59m59.999999999s"},
		{"zero overlap", with(func(p *Policy) { p.Overlap = 0 }), "policy.overlap", "got 0s, want > 0"},
		{"negative overlap", with(func(p *Policy) { p.Overlap = -Day }), "policy.overlap", "got -24h0m0s"},
		{"zero lead", with(func(p *Policy) { p.Lead = 0 }), "policy.pre_publication_lead", "got 0s, want > 0"},
		{"negative lead", with(func(p *Policy) { p.Lead = -time.Nanosecond }), "policy.pre_publication_lead", "got -1ns"},
		{"lead equal to period", with(func(p *Policy) { p.Lead = p.RotationPeriod }), "policy.pre_publication_lead", "got 90d, want less than the rotation period 90d"},
		{"lead over period", with(func(p *Policy) { p.Lead = 91 * Day }), "policy.pre_publication_lead", "got 91d"},
		{"zero destroy delay", with(func(p *Policy) { p.DestroyDelay = 0 }), "policy.destroy_delay", "got 0s, want > 0"},
		{"negative destroy delay", with(func(p *Policy) { p.DestroyDelay = -30 * Day }), "policy.destroy_delay", "got -720h0m0s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fe := wantFieldError(t, tc.p.Validate(), tc.field)
			if !strings.Contains(fe.Reason, tc.reason) {
				t.Errorf("reason %q does not contain %q", fe.Reason, tc.reason)
			}
		})
	}
}

func TestParseDuration(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
	}{
		{"90d", 90 * 24 * time.Hour},
		{"1d", 24 * time.Hour},
		{"1d12h", 36 * time.Hour},
		{"36h", 36 * time.Hour},
		{"7d30m", 7*24*time.Hour + 30*time.Minute},
		{"1h30m", 90 * time.Minute},
		{"1.5h", 90 * time.Minute},
		{"500ms", 500 * time.Millisecond},
		{"0s", 0},
		// "0d" parses; Policy.Validate is what refuses a zero duration.
		{"0d", 0},
		{"65535d", 65535 * 24 * time.Hour},
	} {
		got, err := ParseDuration(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v, nil", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{
		"",
		"x",
		"d",
		"-1d",
		"+1d",
		"90x",
		"90",
		"1.5d",
		"d12h",
		"1d2",
		"1d1d",
		"12h1d",
		"65536d", // more days than the day count allows
		" 1d",
		"1d-12h",
		"1d+1h",
		"65535d2562047h", // overflows
	} {
		if got, err := ParseDuration(in); err == nil {
			t.Errorf("ParseDuration(%q) = %v, nil; want an error", in, got)
		}
	}
}

func TestFormatDuration(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{90 * Day, "90d"},
		{Day, "1d"},
		{36 * time.Hour, "36h0m0s"},
		{Day + time.Nanosecond, "24h0m0.000000001s"},
		{time.Hour, "1h0m0s"},
		{0, "0s"},
		{-Day, "-24h0m0s"},
	} {
		if got := FormatDuration(tc.d); got != tc.want {
			t.Errorf("FormatDuration(%d) = %q, want %q", tc.d, got, tc.want)
		}
	}
	// What FormatDuration prints, ParseDuration reads back.
	for _, d := range []time.Duration{90 * Day, 36 * time.Hour, time.Hour, Day + time.Second, 0} {
		s := FormatDuration(d)
		if got, err := ParseDuration(s); err != nil || got != d {
			t.Errorf("ParseDuration(FormatDuration(%v) = %q) = %v, %v; want %v, nil", d, s, got, err, d)
		}
	}
}
