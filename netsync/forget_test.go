package netsync

import (
	"maps"
	"slices"
	"testing"

	"consul-overlay/cluster"
	"consul-overlay/internal/dockerapi"
)

// TestForget: what the syncer remembers of networks and specs that are
// gone is dropped at the end of a pass; what still applies is kept. Before,
// each map grew with every network and incarnation the engine and the
// cluster ever had, and Status listed conflicts of networks long gone.
func TestForget(t *testing.T) {
	s := &Syncer{}
	s.specs = map[string]cluster.SpecPair{
		"web": {Spec: cluster.Spec{Name: "web", Incarnation: "inc-web"}},
		"old": {Spec: cluster.Spec{Name: "old", Incarnation: "inc-old", Retired: true}},
	}
	s.toRetire = map[string]string{"db": "inc-db"}
	s.retiredSeen = map[string]bool{"inc-old": true, "inc-db": true, "inc-gone": true}
	s.known = map[string]string{"web": "id-web", "api": "id-api"}
	s.reported = map[string]string{
		"conflict/id-web": "kept", "conflict/id-gone": "kept", "duplicate/id-gone2": "x", "stopped/id-api": "x",
		"taken/web": "x", "taken/gone": "x", "published/gone": "inc", "retire/db": "inc-db", "retire/done": "inc",
	}
	s.conflicts = map[string]Conflict{"web": {Network: "web"}, "api": {Network: "api"}, "gone": {Network: "gone"}}
	s.forget([]dockerapi.NetworkDetail{{ID: "id-web", Name: "web"}, {ID: "id-api", Name: "api"}})

	if got, want := slices.Sorted(maps.Keys(s.retiredSeen)), []string{"inc-db", "inc-old"}; !slices.Equal(got, want) {
		t.Errorf("retired incarnations remembered %v, want %v", got, want)
	}
	if got, want := slices.Sorted(maps.Keys(s.reported)), []string{"conflict/id-web", "retire/db", "stopped/id-api", "taken/web"}; !slices.Equal(got, want) {
		t.Errorf("once-only messages remembered %v, want %v", got, want)
	}
	// Status keeps the conflicts of names this engine has (what happened
	// to them, and how), not of gone ones.
	if got, want := slices.Sorted(maps.Keys(s.conflicts)), []string{"api", "web"}; !slices.Equal(got, want) {
		t.Errorf("conflicts in Status %v, want %v", got, want)
	}
}
