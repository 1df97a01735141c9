package driver

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/reaper"
)

// TestRestartAfterEvictionUsesSnapshot: host a runs network app with two
// containers (ep1, ep2), and network other without any. It is cut off from
// Consul longer than HOST_GRACE, another host reaps it, and its plugin
// restarts (an upgrade, a kill -9) before its liveness check re-asserted
// anything: the store shows nothing of a while its containers still run.
// Before, the restore refused that view for ever (it cannot tell an
// eviction from a wrong KV_PREFIX), so the plugin answered no call and
// the liveness check, which needs the driver's state, never re-asserted.
// Now it takes its networks and the endpoints containers hold from the
// state copy in DATA_DIR, keeps the kernel, serves, and the re-assertion
// writes them back. A copy written on another store is not used.
func TestRestartAfterEvictionUsesSnapshot(t *testing.T) {
	ctx := context.Background()
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	path := filepath.Join(t.TempDir(), SnapshotName)
	withCopy := func(tag string) func(*Config) {
		return func(c *Config) { c.Reapable, c.SnapshotPath, c.StoreTag = true, path, tag }
	}
	a := newHostDriver(t, store, "a", "a", "192.0.2.1", dp, withCopy("prefix-1"))
	mustCreate(t, a, "n1", "10.1.0.0/24")
	if err := a.CreateNetwork(createReq("n2", map[string]interface{}{"name": "other"}, "10.2.0.0/24")); err != nil {
		t.Fatal(err)
	}
	joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
	joinedEndpoint(t, a, "n1", "ep2", "10.1.0.3/24")
	// The copy follows the changes without a restart.
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), `"id":"ep2"`) && strings.Contains(string(b), "name-other") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("state copy lists neither ep2 nor network other 5 s after their create: %s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
	a.Close()
	dp.mu.Lock()
	dp.inUse = map[string]bool{"ep1": true, "ep2": true}
	dp.mu.Unlock()
	evict(t, store)
	if hasKey(t, store, "networks/name-app/config") || hasKey(t, store, "members/a") {
		t.Fatal("the eviction left a's network or host record: the test proves nothing")
	}

	// On another store (another KV_PREFIX), the copy says nothing.
	d := startNotReady(t, Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), CallTimeout: 300 * time.Millisecond, Shared: true,
		Reapable: true, SnapshotPath: path, StoreTag: "prefix-2"}, store, dp, "an empty view with a copy from another store")
	d.Close()

	b := newHostDriver(t, store, "a", "a", "192.0.2.1", dp, withCopy("prefix-1"))
	if n, _ := dp.counts(); n != 2 {
		t.Errorf("%d overlays in the kernel, want both kept", n)
	}
	for _, ep := range []string{"ep1", "ep2"} {
		if !dp.hasEndpoint(ep) {
			t.Errorf("%s's veth is gone, a running container holds it", ep)
		}
	}
	nets, eps, err := b.LocalState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(nets) != 2 || nets["n1"].Key != "name-app" || nets["n2"].Key != "name-other" {
		t.Errorf("restored networks %v, want n1 (app) and n2 (other)", nets)
	}
	if len(eps) != 2 {
		t.Errorf("restored endpoints %v, want ep1 and ep2 joined", eps)
	}

	// The liveness check re-asserts from that state.
	local, _ := localOf(t, b)
	if _, err := reaper.Reassert(ctx, "a", "a", b.cl, &reassertIPAM{held: map[netip.Addr]string{}}, b, local, nil); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"networks/name-app/config", "networks/name-other/config", "networks/name-app/endpoints/ep1", "networks/name-app/endpoints/ep2"} {
		if !hasKey(t, store, k) {
			t.Errorf("%s not written back by the re-assertion", k)
		}
	}
	rec, err := b.cl.Network(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	if m, ok := rec.Member("a"); !ok || len(m.NetworkIDs) != 1 || m.NetworkIDs[0] != "n1" {
		t.Errorf("a's membership of app after the re-assertion: %+v %t, want n1", m, ok)
	}
	// And it serves.
	joinedEndpoint(t, b, "n1", "ep3", "10.1.0.4/24")
}

// TestSnapshotMerge: the copy adds what the view lacks (a network, the
// endpoints containers hold) and never replaces what the store shows.
func TestSnapshotMerge(t *testing.T) {
	app := cluster.Network{Key: "name-app", VNI: 4096, Hosts: map[string]cluster.Member{"b": {Node: "b"}}}
	other := cluster.Network{Key: "name-other", VNI: 4097}
	s := snapshot{
		Networks: []snapshotNetwork{{Network: app, NetworkIDs: []string{"n1"}}, {Network: other, NetworkIDs: []string{"n2"}}},
		Endpoint: []cluster.Endpoint{
			{ID: "ep1", NetworkKey: "name-app"}, {ID: "ep2", NetworkKey: "name-app"},
			{ID: "ep3", NetworkKey: "name-other"}, {ID: "ep4", NetworkKey: "name-gone"},
		},
	}
	stored := other
	stored.VNI = 5000
	v := cluster.View{Networks: []cluster.Network{stored}, Endpoints: []cluster.Endpoint{{ID: "ep3", NetworkKey: "name-other", MAC: "stored"}}}
	held := map[string]bool{"ep1": true, "ep3": true, "ep4": true}
	nets, eps := mergeSnapshot(&v, s, "a", "node-a", held)
	if strings.Join(nets, ",") != "name-app" || strings.Join(eps, ",") != "ep1" {
		t.Errorf("added networks %v and endpoints %v, want name-app and ep1 (ep2 held by no container, ep3 in the view, ep4's network unknown)", nets, eps)
	}
	if len(v.Networks) != 2 || v.Networks[0].VNI != 5000 {
		t.Errorf("networks %+v: the store's record of other must stay", v.Networks)
	}
	m, ok := v.Networks[1].Member("a")
	if !ok || m.Node != "node-a" || len(m.NetworkIDs) != 1 || m.NetworkIDs[0] != "n1" {
		t.Errorf("a's membership of app from the copy: %+v %t", m, ok)
	}
	if _, ok := app.Hosts["a"]; ok {
		t.Error("the merge wrote into the copy's record")
	}
	if v.Endpoints[0].MAC != "stored" {
		t.Error("the store's record of ep3 was replaced")
	}
}
