package linklocal

import (
	"regexp"
	"testing"
)

// isDomain accepts exactly what the regular expression it replaced accepts.
func FuzzIsDomain(f *testing.F) {
	re := regexp.MustCompile(`^([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+$`)
	for _, s := range []string{"consul.", "a.", "a-b.c.", "-a.", "a-.", ".", "", "a..", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if re.MatchString(s) != isDomain(s) {
			t.Fatalf("%q: re %v, isDomain %v", s, re.MatchString(s), isDomain(s))
		}
	})
}
