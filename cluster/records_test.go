package cluster

import "testing"

// TestNetworkEgress checks that a given -o egress wins over the first
// host's default, that the default alone is the network's egress and is
// reported as a default, and that a record with neither (created before
// either existed) has none.
func TestNetworkEgress(t *testing.T) {
	for _, tc := range []struct {
		name      string
		options   map[string]string
		egress    string
		defaulted bool
	}{
		{"neither", nil, "", false},
		{"given", map[string]string{OptionEgress: "host"}, "host", false},
		{"default", map[string]string{OptionEgressDefault: "auto"}, "auto", true},
		{"given and default", map[string]string{OptionEgress: "docker", OptionEgressDefault: "auto"}, "docker", false},
		{"given empty", map[string]string{OptionEgress: ""}, "", false},
	} {
		r := Network{Options: tc.options}
		if got := r.Egress(); got != tc.egress {
			t.Errorf("%s: Egress() = %q, want %q", tc.name, got, tc.egress)
		}
		if got := EgressDefaulted(tc.options); got != tc.defaulted {
			t.Errorf("%s: EgressDefaulted = %v, want %v", tc.name, got, tc.defaulted)
		}
	}
}
