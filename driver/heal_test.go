package driver

import (
	"context"
	"maps"
	"net/netip"
	"slices"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/kvstore"
	"consul-overlay/reaper"
)

// joinedEndpoint creates and joins endpoint id on Docker network netID.
func joinedEndpoint(t *testing.T, d *Driver, netID, id, addr string) {
	t.Helper()
	if _, err := d.CreateEndpoint(epReq(netID, id, addr)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Join(&network.JoinRequest{NetworkID: netID, EndpointID: id, SandboxKey: "/var/run/docker/netns/" + id}); err != nil {
		t.Fatal(err)
	}
}

// evict removes host a from the cluster as another host's reaper does.
func evict(t *testing.T, store kvstore.Store) {
	t.Helper()
	r, err := cluster.New(cluster.Config{HostID: "r", Node: "r", VTEP: netip.MustParseAddr("192.0.2.9")}, store)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.EvictHost(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
}

// TestHealWritesLostEndpointRecord: host a was evicted while it was away,
// and its re-assertion failed on the write of ep2's record. members/a is
// back and every address is a's again, so the eviction check finds nothing
// any more (before, nothing ever wrote ep2's record again: the other hosts
// never reached ep2's container, and only a restart's guard kept its
// veth). The next check finds the lost record and writes it again.
func TestHealWritesLostEndpointRecord(t *testing.T) {
	ctx := context.Background()
	store, _, _, a := reapableHost(t)
	joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
	joinedEndpoint(t, a, "n1", "ep2", "10.1.0.3/24")
	evict(t, store)
	ipam := &reassertIPAM{held: map[netip.Addr]string{}}
	local, _ := localOf(t, a)
	if _, err := reaper.Reassert(ctx, "a", "a", flakyRejoiner{Cluster: a.cl, fail: "ep2"}, ipam, a, local, nil); err == nil {
		t.Fatal("the re-assertion failed nothing: the test injects nothing")
	}
	if hasKey(t, store, "networks/name-app/endpoints/ep2") {
		t.Fatal("ep2's record is in the store: the test lost nothing")
	}

	h, err := reaper.Heal(ctx, "a", "a", a.cl, ipam, a, nil, local, nil)
	if err != nil {
		t.Fatal(err)
	}
	if h.Self.Evicted || len(h.Self.Free) != 0 {
		t.Fatalf("the eviction check found something (%+v): the test does not show a loss only CheckRecords sees", h.Self)
	}
	if !slices.Equal(h.Lost.Endpoints, []string{"ep2"}) || len(h.Lost.NetworkIDs) != 0 {
		t.Errorf("lost: %+v, want endpoint ep2 only", h.Lost)
	}
	if !hasKey(t, store, "networks/name-app/endpoints/ep2") {
		t.Fatal("ep2's record was not written again: the other hosts never reach its running container")
	}
	// Nothing lost any more: the next check writes nothing.
	h, err = reaper.Heal(ctx, "a", "a", a.cl, ipam, a, nil, local, nil)
	if err != nil || !h.Lost.Empty() || h.Reasserted != nil {
		t.Errorf("second check: %+v, %v; want nothing lost, nothing re-asserted", h, err)
	}
}

// TestHealWritesLostMembership: host a's membership of network other,
// whose container still runs, is gone while members/a stayed (a reap that
// stopped part way, after which a network create on a wrote members/a
// again; or an operator's delete), so the eviction check finds nothing.
// The check finds the lost membership and writes it, and the endpoint's
// record, again.
func TestHealWritesLostMembership(t *testing.T) {
	ctx := context.Background()
	store, _, _, a := reapableHost(t)
	if err := a.CreateNetwork(createReq("n2", map[string]interface{}{"name": "other"}, "10.2.0.0/24")); err != nil {
		t.Fatal(err)
	}
	joinedEndpoint(t, a, "n2", "ep-other", "10.2.0.2/24")
	asA, err := cluster.New(cluster.Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1")}, store)
	if err != nil {
		t.Fatal(err)
	}
	if err := asA.Leave(ctx, "name-other", "n2"); err != nil {
		t.Fatal(err)
	}
	ipam := &reassertIPAM{held: map[netip.Addr]string{netip.MustParseAddr("10.2.0.2"): "a"}}
	local, _ := localOf(t, a)

	h, err := reaper.Heal(ctx, "a", "a", a.cl, ipam, a, nil, local, nil)
	if err != nil {
		t.Fatal(err)
	}
	if h.Self.Evicted || len(h.Self.Free) != 0 {
		t.Fatalf("the eviction check found something (%+v)", h.Self)
	}
	if !slices.Equal(h.Lost.NetworkIDs, []string{"n2"}) || !slices.Equal(h.Lost.Endpoints, []string{"ep-other"}) {
		t.Errorf("lost: %+v, want network n2 and endpoint ep-other", h.Lost)
	}
	rec, err := a.cl.Network(ctx, "name-other")
	if err != nil {
		t.Fatalf("network other is not back: %v", err)
	}
	if !slices.Contains(rec.Hosts["a"].NetworkIDs, "n2") {
		t.Errorf("a's membership of other is not back: %+v", rec.Hosts)
	}
	if !hasKey(t, store, "networks/name-other/endpoints/ep-other") {
		t.Error("ep-other's record is not back")
	}
}

// TestReassertSkipsEndpointRemovedSinceRead: the check reads what host a
// runs, then `docker rm` removes ep1 (Leave, DeleteEndpoint, and IPAM's
// release) before the re-assertion writes. Nothing of ep1 is written back:
// no record and no address hold that no container uses and nobody removes.
func TestReassertSkipsEndpointRemovedSinceRead(t *testing.T) {
	ctx := context.Background()
	store, _, _, a := reapableHost(t)
	joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
	joinedEndpoint(t, a, "n1", "ep2", "10.1.0.3/24")
	evict(t, store)
	ipam := &reassertIPAM{held: map[netip.Addr]string{}}
	local, _ := localOf(t, a)

	if err := a.Leave(&network.LeaveRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}

	rep, err := reaper.Reassert(ctx, "a", "a", a.cl, ipam, a, local, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Endpoints != 1 {
		t.Errorf("re-asserted %d endpoints, want 1 (ep2)", rep.Endpoints)
	}
	if hasKey(t, store, "networks/name-app/endpoints/ep1") {
		t.Error("ep1's record was written back after docker rm removed it: a record of no container that nobody removes")
	}
	if h := ipam.held[netip.MustParseAddr("10.1.0.2")]; h != "" {
		t.Errorf("ep1's address was taken again (holder %q) after docker rm released it", h)
	}
	if !hasKey(t, store, "networks/name-app/endpoints/ep2") {
		t.Error("ep2's record was not written back")
	}
}

// TestReassertSkipsNetworkRemovedSinceRead: the check reads what host a
// runs, then `docker network rm` removes network other before the
// re-assertion writes: its membership is not written back, and its pool
// hold is not taken again (its ReleasePool, which follows, would not
// release it).
func TestReassertSkipsNetworkRemovedSinceRead(t *testing.T) {
	ctx := context.Background()
	store, _, _, a := reapableHost(t)
	if err := a.CreateNetwork(createReq("n2", map[string]interface{}{"name": "other"}, "10.2.0.0/24")); err != nil {
		t.Fatal(err)
	}
	joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
	evict(t, store)
	ipam := &reassertIPAM{held: map[netip.Addr]string{}}
	local, _ := localOf(t, a)
	if err := a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}

	rep, err := reaper.Reassert(ctx, "a", "a", a.cl, ipam, a, local, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Networks != 1 {
		t.Errorf("re-asserted %d memberships, want 1 (n1)", rep.Networks)
	}
	if rec, err := a.cl.Network(ctx, "name-other"); err == nil {
		t.Errorf("network other was written back after docker network rm removed it: %+v", rec.Hosts)
	}
	want := map[netip.Prefix]int{netip.MustParsePrefix("10.1.0.0/24"): 1}
	if !maps.Equal(ipam.pools, want) {
		t.Errorf("pool holds re-asserted %v, want %v (none for the removed network's 10.2.0.0/24)", ipam.pools, want)
	}
}
