package driver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/kvstore"
)

// crashAt runs f with the driver stopping at fault point point as a
// kill -9 would (no undo step runs); it reports whether f stopped there.
func crashAt(d *Driver, point string, f func()) (crashed bool) {
	d.crashAt = func(p string) bool { return p == point }
	defer func() {
		d.crashAt = nil
		if r := recover(); r != nil {
			if r != errCrash {
				panic(r)
			}
			crashed = true
		}
	}()
	f()
	return false
}

func (f *fakeDataplane) counts() (nets, eps int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.networks), len(f.endpoints)
}

func (f *fakeDataplane) peerVTEPs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, p := range f.peers {
		out = append(out, p.VTEP.String())
	}
	slices.Sort(out)
	return out
}

// TestCrashPoints kills host a's driver at each step boundary of each call
// of a container's life, restarts it on the same store and kernel, replays
// what Docker would (the retry, a new NetworkID for a network create, the
// prune of the old one), and checks that the retry succeeds and that
// nothing is left once the network is removed. Host b shares the network
// throughout and keeps its endpoint.
func TestCrashPoints(t *testing.T) {
	points := []string{
		"createnetwork/after-membership", "createnetwork/after-kernel",
		"createendpoint/after-record",
		"join/after-veth", "join/after-record",
		"leave/after-deregister",
		"deleteendpoint/after-deregister", "deleteendpoint/after-veth", "deleteendpoint/after-record",
		"deletenetwork/after-endpoints", "deletenetwork/after-leave", "deletenetwork/after-kernel",
	}
	for _, point := range points {
		t.Run(strings.ReplaceAll(point, "/", "_"), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "s.db")
			dpA, dpB := newFake(), newFake()
			store := openStore(t, path)
			a := newTestDriver(t, store, "a", "192.0.2.1", dpA)
			b := newTestDriver(t, openStore(t, path), "b", "192.0.2.2", dpB)
			mustCreate(t, b, "net-b", "10.1.0.0/24")
			if _, err := b.CreateEndpoint(epReq("net-b", "ep-b", "10.1.0.3/24")); err != nil {
				t.Fatal(err)
			}
			call := strings.SplitN(point, "/", 2)[0]
			netID := "net-a"
			crashed := false
			restart := func() {
				t.Helper()
				a.Close()
				a = newTestDriver(t, store, "a", "192.0.2.1", dpA)
			}
			step := func(name string, f func() error) {
				t.Helper()
				var err error
				if name == call && !crashed {
					if crashed = crashAt(a, point, func() { err = f() }); crashed {
						restart()
						if name == "createnetwork" {
							// Docker never stored the network: the user's
							// retry gets a new ID; the old one is pruned.
							netID = "net-a2"
						}
						err = f()
					}
				} else {
					err = f()
				}
				if err != nil {
					t.Fatalf("%s after a crash at %s: %v", name, point, err)
				}
			}
			step("createnetwork", func() error {
				return a.CreateNetwork(createReq(netID, map[string]interface{}{"name": "app"}, "10.1.0.0/24"))
			})
			if err := a.PruneNetworks(context.Background(), func(_ context.Context, id string) (bool, error) { return id == netID, nil }); err != nil {
				t.Fatal(err)
			}
			step("createendpoint", func() error {
				_, err := a.CreateEndpoint(epReq(netID, "ep-a", "10.1.0.2/24"))
				return err
			})
			step("join", func() error {
				_, err := a.Join(&network.JoinRequest{NetworkID: netID, EndpointID: "ep-a", SandboxKey: "/var/run/docker/netns/abc"})
				return err
			})
			waitFor(t, func() bool { return len(dpB.peerIPs()) == 1 })
			step("leave", func() error { return a.Leave(&network.LeaveRequest{NetworkID: netID, EndpointID: "ep-a"}) })
			step("deleteendpoint", func() error {
				return a.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: netID, EndpointID: "ep-a"})
			})
			step("deletenetwork", func() error { return a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: netID}) })
			if !crashed {
				t.Fatalf("the calls never reached fault point %s", point)
			}
			// A restart after everything settles the kernel too (the
			// crash at deletenetwork/after-leave leaves the overlay to
			// it).
			restart()
			if n, e := dpA.counts(); n != 0 || e != 0 {
				t.Fatalf("host a's kernel holds %d networks and %d endpoints", n, e)
			}
			waitFor(t, func() bool { return len(dpB.peerIPs()) == 0 })
			// b is untouched: its network, membership and endpoint.
			rec, err := b.cl.Network(context.Background(), "name-app")
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := rec.Member("b"); !ok || len(rec.Hosts) != 1 {
				t.Fatalf("members after a left: %v", rec.Hosts)
			}
			if keys := allKeys(t, store); !slices.Equal(keys, []string{"networks/name-app/config", "networks/name-app/config/peers/b", "networks/name-app/endpoints/ep-b", "subnets/10.1.0.0_24", fmt.Sprintf("vnis/%d", rec.VNI)}) {
				t.Fatalf("keys with only b left: %v", keys)
			}
			if err := b.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "net-b", EndpointID: "ep-b"}); err != nil {
				t.Fatal(err)
			}
			if err := b.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "net-b"}); err != nil {
				t.Fatal(err)
			}
			if keys := allKeys(t, store); len(keys) != 0 {
				t.Fatalf("keys left: %v", keys)
			}
		})
	}
}

func mustCreate(t *testing.T, d *Driver, id, subnet string) {
	t.Helper()
	if err := d.CreateNetwork(createReq(id, map[string]interface{}{"name": "app"}, subnet)); err != nil {
		t.Fatal(err)
	}
}

func epReq(netID, id, addr string) *network.CreateEndpointRequest {
	return &network.CreateEndpointRequest{NetworkID: netID, EndpointID: id, Interface: &network.EndpointInterface{Address: addr}}
}

// TestPhantomNetwork: Docker retries CreateNetwork under a new ID after a
// crash that left the membership; the retry succeeds, both IDs share the
// overlay, and PruneNetworks drops the one Docker does not have.
func TestPhantomNetwork(t *testing.T) {
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	d := newTestDriver(t, store, "a", "192.0.2.1", dp)
	if !crashAt(d, "createnetwork/after-membership", func() { mustCreate(t, d, "n1", "10.1.0.0/24") }) {
		t.Fatal("no crash")
	}
	d.Close()
	d = newTestDriver(t, store, "a", "192.0.2.1", dp)
	mustCreate(t, d, "n2", "10.1.0.0/24")
	if n, _ := dp.counts(); n != 1 {
		t.Fatalf("kernel networks %d, want one shared overlay", n)
	}
	rec, err := d.cl.Network(context.Background(), "name-app")
	if err != nil {
		t.Fatal(err)
	}
	if m, _ := rec.Member("a"); !slices.Equal(m.NetworkIDs, []string{"n1", "n2"}) {
		t.Fatalf("membership %+v", m)
	}
	// A prune within the grace period keeps a network this process bound.
	exists := func(_ context.Context, id string) (bool, error) { return false, nil }
	if err := d.PruneNetworks(context.Background(), exists); err != nil {
		t.Fatal(err)
	}
	if d.network("n2") == nil {
		t.Fatal("pruned a network bound moments ago")
	}
	if d.network("n1") != nil {
		t.Fatal("phantom network kept")
	}
	// Errors from Docker keep the network.
	d.cfg.PruneGrace = time.Nanosecond
	if err := d.PruneNetworks(context.Background(), func(context.Context, string) (bool, error) { return false, errors.New("docker down") }); err == nil {
		t.Fatal("prune hid Docker's error")
	}
	if d.network("n2") == nil {
		t.Fatal("pruned on an error")
	}
	if n, _ := dp.counts(); n != 1 {
		t.Fatal("overlay removed while a Docker network is bound")
	}
	rec, _ = d.cl.Network(context.Background(), "name-app")
	if m, _ := rec.Member("a"); !slices.Equal(m.NetworkIDs, []string{"n2"}) {
		t.Fatalf("membership after prune %+v", m)
	}
	if err := d.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	if n, _ := dp.counts(); n != 0 {
		t.Fatal("overlay left")
	}
	if keys := allKeys(t, store); len(keys) != 0 {
		t.Fatalf("keys left: %v", keys)
	}
}

// TestUnprovenViewKeepsKernel: a store that shows nothing of this host
// (another prefix here) while the kernel holds an overlay: nothing is
// removed, calls fail with what to check, and the driver becomes ready
// once the store proves the view. The overlay goes only once no container
// uses it.
func TestUnprovenViewKeepsKernel(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	dp := newFake()
	d := newTestDriver(t, openStore(t, path), "a", "192.0.2.1", dp)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	d.Close()
	// A container runs on the overlay.
	dp.mu.Lock()
	dp.inUse = map[string]bool{"0123456789ab": true}
	dp.mu.Unlock()

	other, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: path, Prefix: "changed/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	d2 := startNotReady(t, Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), CallTimeout: 300 * time.Millisecond}, other, dp, "an unproven view")
	if n, _ := dp.counts(); n != 1 {
		t.Fatal("the running overlay was removed on an empty view")
	}
	err = d2.CreateNetwork(createReq("n9", nil, "10.9.0.0/24"))
	if err == nil || !strings.Contains(err.Error(), "KV_PREFIX") {
		t.Fatalf("call on an unproven view: %v, want what to check", err)
	}
	// The right store comes back (here: the host's record appears).
	val, _ := kvstore.Encode(cluster.Host{HostID: "a", Node: "a", VTEP: "192.0.2.1"})
	if err := other.Create(context.Background(), "members/a", val); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d2.Ready():
	case <-time.After(15 * time.Second):
		t.Fatal("not ready after the view was proven")
	}
	// Proven and empty, but a container holds an endpoint the view does
	// not list: still kept. Once no container does, a restart removes it.
	if n, _ := dp.counts(); n != 1 {
		t.Fatal("the running overlay was removed on a proven view that misses its endpoint")
	}
	d2.Close()
	dp.mu.Lock()
	dp.inUse = nil
	dp.mu.Unlock()
	newTestDriver(t, other, "a", "192.0.2.1", dp)
	if n, _ := dp.counts(); n != 0 {
		t.Fatal("stray overlay kept on a proven view once no container uses it")
	}
}

// TestUnprovenViewUnusedOverlays: the store shows nothing of this host
// (it was reaped while it was away) and the overlays in the kernel carry
// no container: nothing is lost by removing them, so the driver starts,
// removes them, and serves.
func TestUnprovenViewUnusedOverlays(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	dp := newFake()
	d := newTestDriver(t, openStore(t, path), "a", "192.0.2.1", dp)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	d.Close()

	other, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: path, Prefix: "reaped/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	d2, err := New(Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), CallTimeout: 300 * time.Millisecond}, other, dp)
	if err != nil {
		t.Fatal(err)
	}
	d2.Start()
	t.Cleanup(func() { d2.Close() })
	select {
	case <-d2.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("not ready: overlays no container uses kept the driver from starting")
	}
	if n, _ := dp.counts(); n != 0 {
		t.Fatal("the unused overlay of a reaped host was kept")
	}
	mustCreate(t, d2, "n2", "10.2.0.0/24")
}

// TestFreshHostStarts: no membership and no overlay: nothing to lose.
func TestFreshHostStarts(t *testing.T) {
	dp := newFake()
	newTestDriver(t, openStore(t, filepath.Join(t.TempDir(), "s.db")), "a", "192.0.2.1", dp)
	if len(dp.reconcile) != 1 {
		t.Fatalf("reconciles %d", len(dp.reconcile))
	}
}

// TestSameNodeNameTwoHosts: two hosts behind one shared agent (one node
// name, two host IDs) program each other's endpoints, and one host's
// network rm keeps the other's records.
func TestSameNodeNameTwoHosts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	dp1, dp2 := newFake(), newFake()
	h1 := newHostDriver(t, openStore(t, path), "id-1", "agent", "192.0.2.1", dp1)
	h2 := newHostDriver(t, openStore(t, path), "id-2", "agent", "192.0.2.2", dp2)
	mustCreate(t, h1, "n1", "10.1.0.0/24")
	mustCreate(t, h2, "n2", "10.1.0.0/24")
	if _, err := h1.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := h2.CreateEndpoint(epReq("n2", "ep2", "10.1.0.3/24")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		return slices.Equal(dp1.peerIPs(), []string{"10.1.0.3"}) && slices.Equal(dp2.peerIPs(), []string{"10.1.0.2"})
	})
	if err := h2.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "n2", EndpointID: "ep2"}); err != nil {
		t.Fatal(err)
	}
	if err := h2.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	eps, err := h1.cl.Endpoints(context.Background(), "name-app")
	if err != nil || len(eps) != 1 || eps[0].ID != "ep1" {
		t.Fatalf("host 1's records after host 2's network rm: %+v, %v", eps, err)
	}
	waitFor(t, func() bool { return len(dp1.peerIPs()) == 0 })
}

// TestSetVTEP: the peers of the other host switch to the new address, and
// the local data plane is told.
func TestSetVTEP(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	dpA, dpB := newFake(), newFake()
	a := newTestDriver(t, openStore(t, path), "a", "192.0.2.1", dpA)
	b := newTestDriver(t, openStore(t, path), "b", "192.0.2.2", dpB)
	mustCreate(t, a, "na", "10.1.0.0/24")
	mustCreate(t, b, "nb", "10.1.0.0/24")
	if _, err := a.CreateEndpoint(epReq("na", "ep", "10.1.0.2/24")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return slices.Equal(dpB.peerVTEPs(), []string{"192.0.2.1"}) })
	if err := a.SetVTEP(context.Background(), netip.MustParseAddr("192.0.2.11")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return slices.Equal(dpB.peerVTEPs(), []string{"192.0.2.11"}) })
	dpA.mu.Lock()
	got := dpA.vtep
	dpA.mu.Unlock()
	if got != netip.MustParseAddr("192.0.2.11") {
		t.Fatalf("data plane vtep %v", got)
	}
	info, _ := a.EndpointInfo(&network.InfoRequest{NetworkID: "na", EndpointID: "ep"})
	if info.Value["vtep"] != "192.0.2.11" || info.Value["host"] != "a" {
		t.Fatalf("endpoint info %v", info.Value)
	}
}

// TestRestartOnNewVTEP: a host restarted on another underlay address
// republishes it; the other host's peers follow.
func TestRestartOnNewVTEP(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	dpA, dpB := newFake(), newFake()
	storeA := openStore(t, path)
	a := newTestDriver(t, storeA, "a", "192.0.2.1", dpA)
	b := newTestDriver(t, openStore(t, path), "b", "192.0.2.2", dpB)
	mustCreate(t, a, "na", "10.1.0.0/24")
	mustCreate(t, b, "nb", "10.1.0.0/24")
	if _, err := a.CreateEndpoint(epReq("na", "ep", "10.1.0.2/24")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return slices.Equal(dpB.peerVTEPs(), []string{"192.0.2.1"}) })
	a.Close()
	a = newTestDriver(t, storeA, "a", "192.0.2.21", dpA)
	waitFor(t, func() bool { return slices.Equal(dpB.peerVTEPs(), []string{"192.0.2.21"}) })
	rec, err := a.cl.Network(context.Background(), "name-app")
	if err != nil {
		t.Fatal(err)
	}
	if m, _ := rec.Member("a"); m.VTEP != "192.0.2.21" {
		t.Fatalf("membership vtep %s", m.VTEP)
	}
}

// TestUnderlayAllowlistFollowsPeers: a host's VTEP is allowed on the other
// host once it has an endpoint there, stays allowed for a while after its
// last endpoint leaves (a container coming back costs no firewall write),
// and is dropped from the allowlist after the peer resync interval.
func TestUnderlayAllowlistFollowsPeers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	dp1, dp2 := newFake(), newFake()
	const resync = 1500 * time.Millisecond
	h1 := newHostDriver(t, openStore(t, path), "id-1", "a", "192.0.2.1", dp1, func(c *Config) { c.PeerResync = resync })
	h2 := newHostDriver(t, openStore(t, path), "id-2", "b", "192.0.2.2", dp2)
	mustCreate(t, h1, "n1", "10.1.0.0/24")
	mustCreate(t, h2, "n2", "10.1.0.0/24")
	allowed := func(f *fakeDataplane) []string {
		f.mu.Lock()
		defer f.mu.Unlock()
		var out []string
		for _, a := range f.allowed {
			out = append(out, a.String())
		}
		return out
	}
	if _, err := h2.CreateEndpoint(epReq("n2", "ep2", "10.1.0.3/24")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return slices.Equal(allowed(dp1), []string{"192.0.2.2"}) })
	removed := time.Now()
	if err := h2.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "n2", EndpointID: "ep2"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(allowed(dp1)) == 0 })
	if d := time.Since(removed); d < resync {
		t.Errorf("VTEP dropped from the allowlist %s after its last peer left, want it kept for the resync interval (%s)", d, resync)
	}
}

// TestReclaimUnjoined: an endpoint record that never joined goes once it
// is older than the grace period; a joined one, a young one and one whose
// interface a container holds stay.
func TestReclaimUnjoined(t *testing.T) {
	dp := newFake()
	d := newTestDriver(t, openStore(t, filepath.Join(t.TempDir(), "s.db")), "a", "192.0.2.1", dp)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	for _, ep := range []struct{ id, addr string }{{"orphan", "10.1.0.2/24"}, {"joined", "10.1.0.3/24"}, {"held", "10.1.0.4/24"}} {
		if _, err := d.CreateEndpoint(epReq("n1", ep.id, ep.addr)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.Join(&network.JoinRequest{NetworkID: "n1", EndpointID: "joined", SandboxKey: "/var/run/docker/netns/0123456789ab"}); err != nil {
		t.Fatal(err)
	}
	dp.mu.Lock()
	dp.inUse = map[string]bool{"held": true}
	dp.mu.Unlock()
	if n := d.ReclaimUnjoined(context.Background(), time.Hour); n != 0 {
		t.Fatalf("reclaimed %d young endpoints", n)
	}
	if n := d.ReclaimUnjoined(context.Background(), 0); n != 1 {
		t.Fatalf("reclaimed %d endpoints, want the orphan alone", n)
	}
	eps, err := d.cl.Endpoints(context.Background(), "name-app")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, ep := range eps {
		ids = append(ids, ep.ID)
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []string{"held", "joined"}) {
		t.Fatalf("endpoint records after the reclaim: %v, want held and joined", ids)
	}
}

// TestPartialEvictionKeepsKernel: a reap of this host stopped part way
// (the host came back during it) leaves memberships without the host
// record (members/<id> goes first). Some networks may be gone from the
// store while containers use them: the restarted driver treats the view
// as a reaped host's (keeps the kernel, refuses calls, retries) instead of
// reconciling the running overlays away; once the view is whole again it
// starts.
func TestPartialEvictionKeepsKernel(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	store := openStore(t, path)
	dp := newFake()
	d := newTestDriver(t, store, "a", "192.0.2.1", dp)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	if err := d.CreateNetwork(createReq("n2", map[string]interface{}{"name": "other"}, "10.2.0.0/24")); err != nil {
		t.Fatal(err)
	}
	d.Close()
	dp.mu.Lock()
	dp.inUse = map[string]bool{"0123456789ab": true}
	dp.mu.Unlock()
	// The reap's first write, then a stop: n2's membership gone too.
	host, err := store.Get(context.Background(), "members/a")
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Delete(context.Background(), "members/a"); err != nil {
		t.Fatal(err)
	}
	cl, err := cluster.New(cluster.Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1")}, store)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Leave(context.Background(), "name-other", "n2"); err != nil {
		t.Fatal(err)
	}

	// A host on a store without a reaper (the embedded store), or whose
	// identity was just adopted from a version that wrote no members/
	// record, starts on such a view as before.
	d1, err := New(Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), CallTimeout: 300 * time.Millisecond, Shared: true}, store, newFake())
	if err != nil {
		t.Fatal(err)
	}
	d1.Start()
	select {
	case <-d1.Ready():
	case <-time.After(15 * time.Second):
		t.Fatal("a driver that cannot be reaped did not start on a view without its host record")
	}
	d1.Close()

	d2 := startNotReady(t, Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), CallTimeout: 300 * time.Millisecond, Shared: true, Reapable: true}, store, dp, "a partial view")
	if n, _ := dp.counts(); n != 2 {
		t.Fatalf("%d overlays in the kernel, want both kept (a container uses them)", n)
	}
	if err := d2.CreateNetwork(createReq("n9", nil, "10.9.0.0/24")); err == nil {
		t.Fatal("a call on a partial view succeeded")
	}
	// The host record back (the host's re-assertion): it starts.
	if err := store.Create(context.Background(), "members/a", host.Value); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d2.Ready():
	case <-time.After(15 * time.Second):
		t.Fatal("not ready once the view was whole")
	}
}

// startNotReady starts a driver and fails the test if it is ready within a
// second: its restore must refuse the view (what).
func startNotReady(t *testing.T, cfg Config, store kvstore.Store, dp Dataplane, what string) *Driver {
	t.Helper()
	d, err := New(cfg, store, dp)
	if err != nil {
		t.Fatal(err)
	}
	d.Start()
	t.Cleanup(func() { d.Close() })
	time.Sleep(time.Second)
	select {
	case <-d.Ready():
		t.Fatalf("ready on %s", what)
	default:
	}
	return d
}
