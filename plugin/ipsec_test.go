package main

import (
	"strings"
	"testing"
	"time"
)

// ENCRYPTION_KEY_ROTATION and ENCRYPTION_KEY_GRACE are durations with a
// floor; empty takes the keyring's defaults.
func TestIPsecSettings(t *testing.T) {
	for _, tc := range []struct {
		rot, grace string
		want       [2]time.Duration
		bad        string
	}{
		{"", "", [2]time.Duration{}, ""},
		{"1h", "10s", [2]time.Duration{time.Hour, 10 * time.Second}, ""},
		{"30s", "", [2]time.Duration{}, "ENCRYPTION_KEY_ROTATION"},
		{"12h", "soon", [2]time.Duration{}, "ENCRYPTION_KEY_GRACE"},
		{"1m", "", [2]time.Duration{}, "4 times ENCRYPTION_KEY_GRACE"},
	} {
		env := map[string]string{"ENCRYPTION_KEY_ROTATION": tc.rot, "ENCRYPTION_KEY_GRACE": tc.grace}
		c, err := ipsecSettings(func(k string) string { return env[k] })
		switch {
		case tc.bad != "" && (err == nil || !strings.Contains(err.Error(), tc.bad)):
			t.Errorf("%q %q: err %v, want one naming %s", tc.rot, tc.grace, err, tc.bad)
		case tc.bad == "" && (err != nil || c.Rotation != tc.want[0] || c.Grace != tc.want[1]):
			t.Errorf("%q %q: %+v %v", tc.rot, tc.grace, c, err)
		}
	}
}
