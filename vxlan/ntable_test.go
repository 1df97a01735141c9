package vxlan

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"consul-overlay/internal/testenv"
)

// The neighbour table limits read through rtnetlink are the sysctls';
// writing the current values back (no change) works in the initial
// namespace and is refused elsewhere, where raising logs and carries on.
func TestNeighTables(t *testing.T) {
	testenv.RequireRoot(t)
	if got := gcThreshWant(); got != [3]uint32{8192, 49152, 65536} {
		t.Errorf("gcThreshWant() = %v", got)
	}
	for _, tt := range neighTables {
		th, err := readNeighTable(tt.family, tt.name)
		if err != nil {
			t.Fatal(err)
		}
		dir := "/proc/sys/" + strings.ReplaceAll(tt.sysctl, ".", "/")
		initNS := true
		for i, v := range th {
			b, err := os.ReadFile(dir + "/gc_thresh" + strconv.Itoa(i+1))
			if err != nil {
				initNS = false // the limits are only shown in the initial namespace
				break
			}
			if want, _ := strconv.Atoi(strings.TrimSpace(string(b))); uint32(want) != v {
				t.Errorf("%s thresh%d = %d, sysctl says %d", tt.name, i+1, v, want)
			}
		}
		if initNS {
			if err := setNeighTable(tt.family, tt.name, th); err != nil {
				t.Errorf("write back the current limits of %s: %v", tt.name, err)
			}
		}
		ns := testenv.NewNetNS(t)
		err = ns.Do(func() error { return setNeighTable(tt.family, tt.name, th) })
		if !errors.Is(err, unix.ENOENT) {
			t.Errorf("set %s in a non-initial namespace: %v, want ENOENT", tt.name, err)
		}
		if err := ns.Do(func() error { raiseNeighTables(testLogger(t)); return nil }); err != nil {
			t.Fatal(err)
		}
	}
}
