package kms

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// Day is 24 hours; rotation periods are counted in days.
const Day = 24 * time.Hour

// Policy is a key's rotation schedule (docs/design.md "Key model and rotation").
type Policy struct {
	// RotationPeriod: how long a version is the ACTIVE one.
	RotationPeriod time.Duration `json:"rotation_period"`
	// Overlap: how long a RETIRED version stays published (and may sign
	// when named) after it stops being ACTIVE.
	Overlap time.Duration `json:"overlap"`
	// Lead: how long before its activation the next version is generated
	// and published as PENDING.
	Lead time.Duration `json:"lead"`
	// DestroyDelay: how long an EXPIRED or REVOKED version's hardware object
	// is kept before it is destroyed.
	DestroyDelay time.Duration `json:"destroy_delay"`
}

// DefaultPolicy is 90 days active, 90 days overlap, 7 days pre-publication,
// 30 days before destruction.
func DefaultPolicy() Policy {
	return Policy{RotationPeriod: 90 * Day, Overlap: 90 * Day, Lead: 7 * Day, DestroyDelay: 30 * Day}
}

// MinPeriod bounds how often a key can rotate, so a typo cannot make the
// daemon generate keys in a loop.
const MinPeriod = time.Hour

// Validate checks that every duration is positive and the lead is shorter
// than the period.
func (p Policy) Validate() error {
	switch {
	case p.RotationPeriod < MinPeriod:
		return &FieldError{"policy.rotation_period", fmt.Sprintf("got %s, want at least %s", FormatDuration(p.RotationPeriod), FormatDuration(MinPeriod))}
	case p.Overlap <= 0:
		return &FieldError{"policy.overlap", fmt.Sprintf("got %s, want > 0", FormatDuration(p.Overlap))}
	case p.Lead <= 0:
		return &FieldError{"policy.pre_publication_lead", fmt.Sprintf("got %s, want > 0", FormatDuration(p.Lead))}
	case p.Lead >= p.RotationPeriod:
		return &FieldError{"policy.pre_publication_lead", fmt.Sprintf("got %s, want less than the rotation period %s", FormatDuration(p.Lead), FormatDuration(p.RotationPeriod))}
	case p.DestroyDelay <= 0:
		return &FieldError{"policy.destroy_delay", fmt.Sprintf("got %s, want > 0", FormatDuration(p.DestroyDelay))}
	}
	return nil
}

// ParseDuration is time.ParseDuration plus a leading day count: "90d",
// "1d12h", "36h". A sign may only lead the whole string ("-1h"); the day
// part takes none.
func ParseDuration(s string) (time.Duration, error) {
	days := time.Duration(0)
	if i := strings.IndexByte(s, 'd'); i >= 0 {
		n, err := strconv.ParseUint(s[:i], 10, 16)
		if err != nil {
			return 0, fmt.Errorf("duration %q: bad day count", s)
		}
		days = time.Duration(n) * Day
		s = s[i+1:]
		if s == "" {
			return days, nil
		}
		if s[0] == '+' || s[0] == '-' {
			return 0, fmt.Errorf("duration %q: no sign after the days", s)
		}
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, err
	}
	if d > math.MaxInt64-days {
		return 0, fmt.Errorf("duration: %dd%s is too long", days/Day, s)
	}
	return days + d, nil
}

// FormatDuration prints whole days as "90d" and anything else as Go does.
func FormatDuration(d time.Duration) string {
	if d > 0 && d%Day == 0 {
		return fmt.Sprintf("%dd", d/Day)
	}
	return d.String()
}
