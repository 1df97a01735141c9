package driver

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/kvstore"
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
	// A write a kill -9 cut short left its temporary file.
	leftover := filepath.Join(filepath.Dir(path), "."+SnapshotName+".123")
	if err := os.WriteFile(leftover, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
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
	if _, err := os.Stat(leftover); err == nil {
		t.Error("the temporary file of a cut-short write is left")
	}
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

// TestSnapshotMerge: the copy adds what the view lacks for the endpoints
// containers hold (their network, their Docker network in this host's
// membership, the endpoint), everything it has for a view without this
// host, and never replaces or duplicates what the store shows.
func TestSnapshotMerge(t *testing.T) {
	app := cluster.Network{Key: "name-app", Incarnation: "i1", VNI: 4096, Hosts: map[string]cluster.Member{"b": {Node: "b"}}}
	other := cluster.Network{Key: "name-other", Incarnation: "i2", VNI: 4097}
	idle := cluster.Network{Key: "name-idle", Incarnation: "i3", VNI: 4098}
	s := snapshot{
		Networks: []snapshotNetwork{
			{Network: app, NetworkIDs: []string{"n1", "n3"}},
			{Network: other, NetworkIDs: []string{"n2"}},
			{Network: idle, NetworkIDs: []string{"n4"}},
		},
		Endpoint: []cluster.Endpoint{
			{ID: "ep1", NetworkKey: "name-app", NetworkID: "n1", Incarnation: "i1"},
			{ID: "ep2", NetworkKey: "name-app", NetworkID: "n1", Incarnation: "i1"},
			{ID: "ep3", NetworkKey: "name-other", NetworkID: "n2", Incarnation: "i2"},
			{ID: "ep4", NetworkKey: "name-gone", NetworkID: "n9", Incarnation: "i9"},
			{ID: "ep5", NetworkKey: "name-app", NetworkID: "n3", Incarnation: "i1"},
		},
	}
	held := map[string]bool{"ep1": true, "ep3": true, "ep4": true, "ep5": true}
	kernel := []uint32{4096, 4097, 4098}
	member := func(n cluster.Network, ids ...string) cluster.Network {
		n.Hosts = map[string]cluster.Member{"a": {Node: "node-a", NetworkIDs: ids}}
		return n
	}
	for _, c := range []struct {
		name       string
		view       cluster.View
		all        bool
		kernel     []uint32
		nets, eps  string
		membership string // a's Docker networks of app after the merge
	}{
		{name: "proven view without app", view: cluster.View{
			Networks:  []cluster.Network{member(other, "n2")},
			Endpoints: []cluster.Endpoint{{ID: "ep3", NetworkKey: "name-other", MAC: "stored"}},
		}, kernel: kernel, nets: "name-app", eps: "ep1,ep5", membership: "n1,n3"},
		{name: "proven view whose app lacks n3", view: cluster.View{
			Networks:  []cluster.Network{member(app, "n1"), member(other, "n2")},
			Endpoints: []cluster.Endpoint{{ID: "ep1", NetworkKey: "name-app", NetworkID: "n1"}, {ID: "ep3", NetworkKey: "name-other"}},
		}, kernel: kernel, nets: "name-app", eps: "ep5", membership: "n1,n3"},
		{name: "view without a", all: true, kernel: kernel, nets: "name-app,name-other,name-idle", eps: "ep1,ep3,ep5", membership: "n1,n3"},
		{name: "app gone from the kernel", all: true, kernel: []uint32{4097}, nets: "name-other", eps: "ep3"},
		{name: "app's VNI is another network's", view: cluster.View{
			Networks: []cluster.Network{{Key: "name-new", Incarnation: "i7", VNI: 4096}},
		}, all: true, kernel: kernel, nets: "name-other,name-idle", eps: "ep3"},
		{name: "app created again", view: cluster.View{
			Networks: []cluster.Network{{Key: "name-app", Incarnation: "i8", VNI: 5000}},
		}, all: true, kernel: kernel, nets: "name-other,name-idle", eps: "ep3"},
		{name: "app re-asserted", view: cluster.View{
			Networks: []cluster.Network{member(cluster.Network{Key: "name-app", Incarnation: "i9", VNI: 4096}, "n1")},
		}, kernel: kernel, nets: "name-app,name-other", eps: "ep1,ep3,ep5", membership: "n1,n3"},
	} {
		t.Run(c.name, func(t *testing.T) {
			v := c.view
			v.Networks, v.Endpoints = slices.Clone(v.Networks), slices.Clone(v.Endpoints)
			nets, eps := mergeSnapshot(&v, s, "a", "node-a", "192.0.2.7", held, c.kernel, c.all)
			if strings.Join(nets, ",") != c.nets || strings.Join(eps, ",") != c.eps {
				t.Errorf("added networks %v and endpoints %v, want %s and %s", nets, eps, c.nets, c.eps)
			}
			vnis := map[uint32]bool{}
			for _, n := range v.Networks {
				if vnis[n.VNI] {
					t.Errorf("vni %d listed twice: %+v", n.VNI, v.Networks)
				}
				vnis[n.VNI] = true
				if n.Key == "name-app" && n.VNI == 4096 {
					m, ok := n.Member("a")
					if !ok || m.Node != "node-a" || strings.Join(m.NetworkIDs, ",") != c.membership {
						t.Errorf("a's membership of app: %+v %t, want Docker networks %s", m, ok, c.membership)
					}
					if _, ok := n.Hosts["b"]; !ok && c.view.Networks == nil {
						t.Error("b's membership of app lost")
					}
				}
				if n.Key == "name-app" && n.Incarnation == "i8" && n.VNI != 5000 {
					t.Errorf("the store's app replaced: %+v", n)
				}
			}
			seen := map[string]bool{}
			for i, ep := range v.Endpoints {
				if seen[ep.ID] {
					t.Errorf("endpoint %s listed twice", ep.ID)
				}
				seen[ep.ID] = true
				if i < len(c.view.Endpoints) && ep.MAC != c.view.Endpoints[i].MAC {
					t.Errorf("the store's record of %s was replaced", ep.ID)
				}
				if slices.Contains(eps, ep.ID) && ep.VTEP != "192.0.2.7" {
					t.Errorf("%s added with vtep %q, want the one the host runs with", ep.ID, ep.VTEP)
				}
			}
			if _, ok := app.Hosts["a"]; ok {
				t.Error("the merge wrote into the copy's record")
			}
		})
	}
}

// copyHost starts host a with its state copy at path, on store.
func copyHost(t *testing.T, store kvstore.Store, dp *fakeDataplane, path, vtep string) *Driver {
	t.Helper()
	return newHostDriver(t, store, "a", "a", vtep, dp, func(c *Config) { c.Reapable, c.SnapshotPath, c.StoreTag = true, path, "p" })
}

// twoNetworks creates networks app (n1, with container ep1) and other
// (n2) on d.
func twoNetworks(t *testing.T, d *Driver) {
	t.Helper()
	mustCreate(t, d, "n1", "10.1.0.0/24")
	if err := d.CreateNetwork(createReq("n2", map[string]interface{}{"name": "other"}, "10.2.0.0/24")); err != nil {
		t.Fatal(err)
	}
	joinedEndpoint(t, d, "n1", "ep1", "10.1.0.2/24")
}

// waitCopy waits until the copy at path holds want.
func waitCopy(t *testing.T, path, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the state copy lacks %s after 5 s: %s", want, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// evictedWith closes d, marks eps as held by containers, and evicts a.
func evictedWith(t *testing.T, d *Driver, store kvstore.Store, dp *fakeDataplane, eps ...string) {
	t.Helper()
	d.Close()
	dp.mu.Lock()
	dp.inUse = map[string]bool{}
	for _, ep := range eps {
		dp.inUse[ep] = true
	}
	dp.mu.Unlock()
	evict(t, store)
}

// restored checks that d restored networks nets and endpoints eps.
func restored(t *testing.T, d *Driver, nets, eps int) {
	t.Helper()
	n, e, err := d.LocalState(context.Background())
	if err != nil || len(n) != nets || len(e) != eps {
		t.Errorf("restored %d networks and %d endpoints (%v), want %d and %d", len(n), len(e), err, nets, eps)
	}
}

// TestSnapshotAcrossVTEPChange: a host whose underlay address changed
// (at run time, or a restart on a new lease) republishes it at restore and
// reads the view again; the copy's networks and endpoints must survive
// that, carry the new address, and stay in the copy.
func TestSnapshotAcrossVTEPChange(t *testing.T) {
	for _, runtime := range []bool{false, true} {
		t.Run(map[bool]string{false: "restart", true: "runtime"}[runtime], func(t *testing.T) {
			store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
			dp := newFake()
			path := filepath.Join(t.TempDir(), SnapshotName)
			a := copyHost(t, store, dp, path, "192.0.2.1")
			mustCreate(t, a, "n1", "10.1.0.0/24")
			joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
			if runtime {
				if err := a.SetVTEP(context.Background(), netip.MustParseAddr("192.0.2.7")); err != nil {
					t.Fatal(err)
				}
				waitCopy(t, path, `"vtep":"192.0.2.7"`)
			} else {
				waitCopy(t, path, `"id":"ep1"`)
			}
			evictedWith(t, a, store, dp, "ep1")
			b := copyHost(t, store, dp, path, "192.0.2.7")
			restored(t, b, 1, 1)
			_, eps, _ := b.LocalState(context.Background())
			if len(eps) == 1 && eps[0].VTEP != "192.0.2.7" {
				t.Errorf("ep1 restored with vtep %s, want 192.0.2.7", eps[0].VTEP)
			}
			b.Close()
			if b, _ := os.ReadFile(path); !strings.Contains(string(b), `"id":"ep1"`) {
				t.Errorf("the copy lost ep1: %s", b)
			}
		})
	}
}

// TestSnapshotSkipsNetworkGoneFromKernel: network other was removed just
// before a kill -9, before the copy followed. The restart must not build
// it again, bind it, or hand it to the re-assertion.
func TestSnapshotSkipsNetworkGoneFromKernel(t *testing.T) {
	store, dp, path, a := copySetup(t)
	twoNetworks(t, a)
	waitCopy(t, path, "name-other")
	waitCopy(t, path, `"id":"ep1"`)
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	evictedWith(t, a, store, dp, "ep1")
	if err := os.WriteFile(path, before, 0o600); err != nil { // the copy from before the delete
		t.Fatal(err)
	}
	b := copyHost(t, store, dp, path, "192.0.2.1")
	if n, _ := dp.counts(); n != 1 {
		t.Errorf("%d overlays in the kernel, want 1: the removed network was built again", n)
	}
	nets, _, _ := b.LocalState(context.Background())
	if _, ok := nets["n2"]; ok || len(nets) != 1 {
		t.Errorf("restored networks %v, want n1 only", nets)
	}
}

// TestSnapshotFillsIncompleteView: the re-assertion after an eviction
// wrote network app back (and with it members/a, which proves the view)
// and the plugin stopped before network other. The restart's view is
// proven but misses other and its container's endpoint: the copy fills
// them in instead of leaving them out, and out of the copy, for good.
func TestSnapshotFillsIncompleteView(t *testing.T) {
	ctx := context.Background()
	store, dp, path, _ := appReasserted(t)
	if _, err := store.Get(ctx, "members/a"); err != nil || hasKey(t, store, "networks/name-other/config") {
		t.Fatalf("the re-assertion of app alone did not leave a proven view without other (members/a: %v): the test proves nothing", err)
	}
	b := copyHost(t, store, dp, path, "192.0.2.1")
	restored(t, b, 2, 2)
	b.Close()
	if c, _ := os.ReadFile(path); !strings.Contains(string(c), `"id":"ep2"`) || !strings.Contains(string(c), "name-other") {
		t.Errorf("the copy lost network other or ep2: %s", c)
	}
}

// TestSnapshotBindsSecondDockerNetwork: Docker networks n1 and n3 of one
// logical network run a container each; after an eviction the liveness
// check re-asserted n1 and was cut short before n3. The restart's proven
// view binds app to n1 only: the copy must bind n3 too, or its container's
// endpoint is restored on a Docker network the host does not have, and the
// next re-assertion leaves it out (its address free for another host).
func TestSnapshotBindsSecondDockerNetwork(t *testing.T) {
	ctx := context.Background()
	store, dp, path, a := copySetup(t)
	mustCreate(t, a, "n1", "10.1.0.0/24")
	mustCreate(t, a, "n3", "10.1.0.0/24")
	joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
	joinedEndpoint(t, a, "n3", "ep3", "10.1.0.3/24")
	waitCopy(t, path, `"id":"ep3"`)
	local, _ := localOf(t, a)
	evictedWith(t, a, store, dp, "ep1", "ep3")
	for i := range local { // the re-assertion's part for n1
		local[i].NetworkIDs = []string{"n1"}
		local[i].Endpoints = slices.DeleteFunc(local[i].Endpoints, func(ep cluster.Endpoint) bool { return ep.NetworkID != "n1" })
	}
	reassertPart(t, store, local)
	b := copyHost(t, store, dp, path, "192.0.2.1")
	restored(t, b, 2, 2)
	nets, _, _ := b.LocalState(ctx)
	if nets["n3"].Key != "name-app" {
		t.Errorf("n3 bound to %q after the restart, want name-app", nets["n3"].Key)
	}
	// The next re-assertion writes n3 and ep3 back.
	local, _ = localOf(t, b)
	if _, err := reaper.Reassert(ctx, "a", "a", b.cl, &reassertIPAM{held: map[netip.Addr]string{}}, b, local, nil); err != nil {
		t.Fatal(err)
	}
	rec, err := b.cl.Network(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	if m, _ := rec.Member("a"); !slices.Contains(m.NetworkIDs, "n3") || !hasKey(t, store, "networks/name-app/endpoints/ep3") {
		t.Errorf("n3 (%v) or ep3 not written back by the re-assertion", m.NetworkIDs)
	}
}

// TestSnapshotSkipsNetworkCreatedAgain: a was app's only member, was
// evicted while away, and the reap removed app; host b created app again
// (same name: same key, another incarnation and VNI). At a's restart the
// copy's app is not a's any more: taking it would program the new app's
// peers into a's old overlay. a keeps its kernel, refuses, and says so.
func TestSnapshotSkipsNetworkCreatedAgain(t *testing.T) {
	store, dp, path, a := copySetup(t)
	mustCreate(t, a, "n1", "10.1.0.0/24")
	joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
	waitCopy(t, path, `"id":"ep1"`)
	evictedWith(t, a, store, dp, "ep1")
	b := newHostDriver(t, store, "b", "b", "192.0.2.2", newFake())
	if err := b.CreateNetwork(createReq("nb", map[string]interface{}{"name": "app", "vni": "5000"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	joinedEndpoint(t, b, "nb", "epb", "10.1.0.2/24")

	if _, ok := restarted(t, store, dp, path); ok {
		t.Error("a serves with a network the store has as another's")
	}
	dp.mu.Lock()
	defer dp.mu.Unlock()
	if len(dp.networks) != 1 {
		t.Errorf("a's kernel has %d overlays, want its one kept", len(dp.networks))
	}
	for _, p := range dp.peers {
		if p.VTEP.String() == "192.0.2.2" {
			t.Errorf("a programs b's peer %s (vni %d) into its old overlay", p.IP, p.VNI)
		}
	}
}

// restarted starts host a again on store and dp with its copy at path
// and waits until its restore is done: ok if it serves, not if it failed
// (refused, kernel kept).
func restarted(t *testing.T, store kvstore.Store, dp *fakeDataplane, path string) (d *Driver, ok bool) {
	t.Helper()
	d, err := New(Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), Shared: true,
		OwnsAddressSpace: func(s string) bool { return s == "ours" }, Reapable: true, SnapshotPath: path, StoreTag: "p"}, store, dp)
	if err != nil {
		t.Fatal(err)
	}
	d.Start()
	t.Cleanup(func() { d.Close() })
	deadline := time.Now().Add(5 * time.Second)
	for {
		select {
		case <-d.Ready():
			return d, true
		default:
		}
		d.mu.Lock()
		rerr := d.restoreErr
		d.mu.Unlock()
		if rerr != nil {
			return d, false
		}
		if time.Now().After(deadline) {
			t.Fatal("the restore neither served nor failed after 5 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSnapshotSkipsNetworkWhoseVNIWasTaken: the reap of a freed the VNI of
// its network, and the next network created elsewhere (web, another name
// and subnet) took it: the lowest free VNI. The view lists only a's own
// networks, so only the store's VNI reservation tells. Taking the copy's
// network would serve an overlay the re-assertion can never write back
// (its VNI is web's), and one a join of web on a would share. Found by
// review (helper-45).
func TestSnapshotSkipsNetworkWhoseVNIWasTaken(t *testing.T) {
	web := func(t *testing.T, store kvstore.Store, vni uint32) {
		t.Helper()
		b := newHostDriver(t, store, "b", "b", "192.0.2.2", newFake())
		if err := b.CreateNetwork(createReq("nb", map[string]interface{}{"name": "web"}, "10.5.0.0/24")); err != nil {
			t.Fatal(err)
		}
		if rec, err := b.cl.Network(context.Background(), "name-web"); err != nil || rec.VNI != vni {
			t.Fatalf("web has vni %d (%v), want %d, freed by the reap: the test proves nothing", rec.VNI, err, vni)
		}
	}
	t.Run("evicted", func(t *testing.T) {
		store, dp, path, a := copySetup(t)
		mustCreate(t, a, "n1", "10.1.0.0/24")
		joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
		waitCopy(t, path, `"id":"ep1"`)
		local, _ := localOf(t, a)
		evictedWith(t, a, store, dp, "ep1")
		web(t, store, local[0].Network.VNI)
		if a2, ok := restarted(t, store, dp, path); ok {
			nets, _, _ := a2.LocalState(context.Background())
			t.Errorf("a serves app from the copy with web's vni: %v", nets)
		}
		if !dp.hasEndpoint("ep1") {
			t.Error("ep1's veth removed while its container holds it")
		}
	})
	t.Run("proven view", func(t *testing.T) {
		ctx := context.Background()
		store, dp, path, otherVNI := appReasserted(t)
		web(t, store, otherVNI)
		a2 := copyHost(t, store, dp, path, "192.0.2.1")
		nets, _, _ := a2.LocalState(ctx)
		if n, ok := nets["n2"]; ok {
			t.Errorf("n2 bound to %s with vni %d, which the store gives web", n.Key, n.VNI)
		}
		if !dp.hasEndpoint("ep2") {
			t.Error("ep2's veth removed while its container holds it")
		}
		// Nor does a's own network web share the overlay ep2's
		// container holds (TestStrayOverlayVNIKept).
		err := a2.CreateNetwork(createReq("nw", map[string]interface{}{"name": "web"}, "10.5.0.0/24"))
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("vni %d", otherVNI)) {
			t.Errorf("a joining web: %v, want a refusal naming vni %d", err, otherVNI)
		}
	})
}

// copySetup opens a store and a fake kernel and starts host a on them with
// its state copy.
func copySetup(t *testing.T) (kvstore.Store, *fakeDataplane, string, *Driver) {
	t.Helper()
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	path := filepath.Join(t.TempDir(), SnapshotName)
	return store, dp, path, copyHost(t, store, dp, path, "192.0.2.1")
}

// reassertPart re-asserts networks local of host a, as a liveness check
// cut short after them would have.
func reassertPart(t *testing.T, store kvstore.Store, local []reaper.LocalNetwork) {
	t.Helper()
	cl, err := cluster.New(cluster.Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1")}, store)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reaper.Reassert(context.Background(), "a", "a", cl, &reassertIPAM{held: map[netip.Addr]string{}}, nil, local, nil); err != nil {
		t.Fatal(err)
	}
}

// appReasserted runs networks app (n1, container ep1) and other (n2,
// container ep2) on host a with its state copy, evicts a, and re-asserts
// app only: a liveness check cut short before other. It returns other's
// VNI.
func appReasserted(t *testing.T) (kvstore.Store, *fakeDataplane, string, uint32) {
	t.Helper()
	store, dp, path, a := copySetup(t)
	twoNetworks(t, a)
	joinedEndpoint(t, a, "n2", "ep2", "10.2.0.2/24")
	waitCopy(t, path, `"id":"ep2"`)
	local, _ := localOf(t, a)
	evictedWith(t, a, store, dp, "ep1", "ep2")
	var app []reaper.LocalNetwork
	var otherVNI uint32
	for _, ln := range local {
		if ln.Network.Key == "name-app" {
			app = append(app, ln)
		} else {
			otherVNI = ln.Network.VNI
		}
	}
	reassertPart(t, store, app)
	return store, dp, path, otherVNI
}
