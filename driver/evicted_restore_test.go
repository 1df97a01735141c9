package driver

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
	"consul-overlay/reaper"
)

// flakyRejoiner is the host's cluster for reaper.Reassert, with the store
// failing the write of one endpoint record (a Consul that has just come
// back after the partition, answering one request with a 5xx).
type flakyRejoiner struct {
	*cluster.Cluster
	fail string
}

func (f flakyRejoiner) CreateEndpoint(ctx context.Context, ep cluster.Endpoint) (cluster.Endpoint, error) {
	if ep.ID == f.fail {
		return cluster.Endpoint{}, fmt.Errorf("record endpoint: consul kv txn: %w (Consul unreachable or without a leader)", kvstore.ErrUnavailable)
	}
	return f.Cluster.CreateEndpoint(ctx, ep)
}

// reassertIPAM models ipam.Driver for Reassert and CheckSelf: ReassertAddress
// makes this host the holder of an address, AddressHolder reports it,
// ReassertPool records the holds asked for.
type reassertIPAM struct {
	mu   sync.Mutex
	held map[netip.Addr]string
	// pools: the holds ReassertPool was asked for, by subnet.
	pools map[netip.Prefix]int
}

func (f *reassertIPAM) AddressHolder(_ context.Context, a netip.Addr) (string, string, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return "pool", f.held[a], "", nil
}

func (f *reassertIPAM) ReassertPool(_ context.Context, want ipam.PoolHolds) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pools == nil {
		f.pools = map[netip.Prefix]int{}
	}
	f.pools[want.Subnet] = want.Holds
	return want.Space + "/" + want.Subnet.String(), nil
}

func (f *reassertIPAM) ReassertAddress(_ context.Context, _ string, a netip.Addr, _ string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.held[a] = "a"
	return nil
}

// localOf is plugin/reaper.go's localNetworks and the check's endpoint
// list, for one driver.
func localOf(t *testing.T, d *Driver) ([]reaper.LocalNetwork, []reaper.LocalEndpoint) {
	t.Helper()
	nets, eps, err := d.LocalState(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	byKey := map[string]*reaper.LocalNetwork{}
	for id, n := range nets {
		if byKey[n.Key] == nil {
			byKey[n.Key] = &reaper.LocalNetwork{Network: n}
		}
		byKey[n.Key].NetworkIDs = append(byKey[n.Key].NetworkIDs, id)
	}
	var lep []reaper.LocalEndpoint
	for _, ep := range eps {
		n := nets[ep.NetworkID]
		byKey[n.Key].Endpoints = append(byKey[n.Key].Endpoints, ep)
		lep = append(lep, reaper.LocalEndpoint{ID: ep.ID, Network: n.Key, Addrs: []netip.Addr{netip.MustParsePrefix(ep.IPv4).Addr()}})
	}
	var out []reaper.LocalNetwork
	for _, ln := range byKey {
		out = append(out, *ln)
	}
	return out, lep
}

// TestRestoreKeepsEndpointWhoseRecordIsLost: host a runs two containers
// (ep1, ep2) on network app. It is cut off from Consul longer than the
// grace period and another host reaps it (cluster.EvictHost, IPAM
// eviction). It comes back while still running; its liveness check
// re-asserts its state (reaper.Reassert), and the store fails the one
// write of ep2's record. members/a is back (Reassert's Join) and ep2's
// address is this host's again (ReassertAddress), so the eviction check
// (reaper.CheckSelf: Evicted false, nothing Free) finds nothing; only the
// records check, every few minutes, writes ep2's record again
// (TestHealWritesLostEndpointRecord). Before it runs, the plugin restarts
// (an upgrade, a kill -9): the view is proven
// (members/a, the membership) and ep2 is not in it. The restart must keep
// the veth of ep2, which a running container holds: a proven view can
// still miss what the store lost.
func TestRestoreKeepsEndpointWhoseRecordIsLost(t *testing.T) {
	ctx := context.Background()
	store, dp, reapable, a := reapableHost(t)
	for _, ep := range []struct{ id, addr string }{{"ep1", "10.1.0.2/24"}, {"ep2", "10.1.0.3/24"}} {
		if _, err := a.CreateEndpoint(epReq("n1", ep.id, ep.addr)); err != nil {
			t.Fatal(err)
		}
		if _, err := a.Join(&network.JoinRequest{NetworkID: "n1", EndpointID: ep.id, SandboxKey: "/var/run/docker/netns/" + ep.id}); err != nil {
			t.Fatal(err)
		}
	}
	dp.mu.Lock()
	dp.inUse = map[string]bool{"ep1": true, "ep2": true}
	dp.mu.Unlock()

	// Host r reaps a (a is cut off longer than HOST_GRACE).
	r, err := cluster.New(cluster.Config{HostID: "r", Node: "r", VTEP: netip.MustParseAddr("192.0.2.9")}, store)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.EvictHost(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	ipam := &reassertIPAM{held: map[netip.Addr]string{}} // EvictNode freed a's addresses

	// a is back: its check re-asserts; one record write fails.
	local, leps := localOf(t, a)
	if _, err := reaper.Reassert(ctx, "a", "a", flakyRejoiner{Cluster: a.cl, fail: "ep2"}, ipam, a, local, nil); err == nil {
		t.Fatal("the re-assertion failed nothing: the test injects nothing")
	}
	// The next checks: what plugin/reaper.go's check decides on.
	rep, err := reaper.CheckSelf(ctx, "a", "a", a.cl, ipam, leps, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Evicted && len(rep.Free) == 0 {
		t.Logf("CheckSelf: evicted=%v free=%v held=%v: only the records check re-asserts ep2", rep.Evicted, rep.Free, rep.Held)
	}
	if hasKey(t, store, "networks/name-app/endpoints/ep2") {
		t.Fatal("ep2's record is in the store: the test lost nothing")
	}

	// The plugin restarts, ep2's container still running.
	a.Close()
	newHostDriver(t, store, "a", "a", "192.0.2.1", dp, reapable)
	if !dp.hasEndpoint("ep1") {
		t.Fatal("ep1's veth is gone")
	}
	if !dp.hasEndpoint("ep2") {
		t.Fatal("the restart removed the veth of ep2, which a running container holds: its record was missing from a proven view (lost by an eviction whose re-assertion failed once), and restore reconciled the kernel on that view without keeping the endpoints in use")
	}
}

// TestRestoreKeepsEndpointWhoseNetworkIsLost: a reap of host a stopped part
// way (a came back during it: the fence stopped the reaper) removed
// members/a and a's membership of network other, whose container still
// runs on a. Before a's liveness check runs (it runs at the reaper's next
// tick after the session changed, up to 10 s, or 5 min later if that
// check failed), Docker creates a network on a (docker network create,
// compose up, netsync): cluster.Join's ensureHost writes members/a again.
// From then on the eviction check sees members/a and every address held
// by a (IPAM was not evicted), and the restore's partial-reap guard, which
// keys on members/a, does not see the loss. The records check finds it but
// cannot write it back: the create of network third took the VNI that
// other's removal freed (the eviction's doing), and the check says so at
// error level. The next restart must keep the veth of the running
// container all the same.
func TestRestoreKeepsEndpointWhoseNetworkIsLost(t *testing.T) {
	ctx := context.Background()
	store, dp, reapable, a := reapableHost(t)
	if err := a.CreateNetwork(createReq("n2", map[string]interface{}{"name": "other"}, "10.2.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.CreateEndpoint(epReq("n2", "ep-other", "10.2.0.2/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Join(&network.JoinRequest{NetworkID: "n2", EndpointID: "ep-other", SandboxKey: "/var/run/docker/netns/x"}); err != nil {
		t.Fatal(err)
	}
	dp.mu.Lock()
	dp.inUse = map[string]bool{"ep-other": true}
	dp.mu.Unlock()

	// The reap's writes before the fence stopped it: members/a first,
	// then a's membership of other (EvictHost acts as a: Leave).
	if err := store.Delete(ctx, "members/a"); err != nil {
		t.Fatal(err)
	}
	asA, err := cluster.New(cluster.Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1")}, store)
	if err != nil {
		t.Fatal(err)
	}
	if err := asA.Leave(ctx, "name-other", "n2"); err != nil {
		t.Fatal(err)
	}
	// Docker creates a network on a before its check ran.
	if err := a.CreateNetwork(createReq("n3", map[string]interface{}{"name": "third"}, "10.3.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if !hasKey(t, store, "networks/name-app/config") {
		t.Fatal("setup")
	}
	ipam := &reassertIPAM{held: map[netip.Addr]string{netip.MustParseAddr("10.2.0.2"): "a"}} // IPAM not evicted
	_, leps := localOf(t, a)
	rep, err := reaper.CheckSelf(ctx, "a", "a", a.cl, ipam, leps, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("CheckSelf after the network create: evicted=%v free=%v: the plugin's check re-asserts nothing", rep.Evicted, rep.Free)

	a.Close()
	newHostDriver(t, store, "a", "a", "192.0.2.1", dp, reapable)
	if !dp.hasEndpoint("ep-other") {
		t.Fatal("the restart removed the veth of ep-other, which a running container holds: its network's membership was missing from a proven view")
	}
}

// reapableHost starts driver a of a reapable host on a new store and fake
// data plane, with network n1 (10.1.0.0/24), and returns the option that
// makes its restarts reapable too.
func reapableHost(t *testing.T) (kvstore.Store, *fakeDataplane, func(*Config), *Driver) {
	t.Helper()
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	reapable := func(c *Config) { c.Reapable = true }
	a := newHostDriver(t, store, "a", "a", "192.0.2.1", dp, reapable)
	mustCreate(t, a, "n1", "10.1.0.0/24")
	return store, dp, reapable, a
}
