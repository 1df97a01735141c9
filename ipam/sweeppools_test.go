package ipam

import (
	"net/netip"
	"testing"
	"time"
)

// TestSweepPoolsDuringNetworkDelete: SweepPools takes Docker's
// network list for the number of holds in use, but Docker hides a network
// from GET /networks as soon as it marks it inDelete (Controller.Networks
// skips n.inDelete), which it stores before ipamRelease sends
// ReleaseAddress(gateway) and ReleasePool. A sweep that falls in that
// window drops the hold of the network being deleted as "unused", and
// the ReleasePool that follows drops a second one: the hold of a network
// that is still in use. With this host the pool's only holder the pool is
// then removed with every address record of the live network.
//
//	host a: networks N1 and N2 on subnet S (two holds, older than grace)
//	docker network rm N2: inDelete stored, N2 gone from /networks
//	housekeeping: SweepPools, uses(S)=1 < 2 holds -> drops one hold
//	Docker: ReleasePool(S) for N2               -> drops the last hold
//	=> pool S removed, N1's container address freed while it runs
func TestSweepPoolsDuringNetworkDelete(t *testing.T) {
	clk := newClock()
	s := newMemStore()
	a, err := New(Config{Node: "a", Logger: testLogger()}, s)
	if err != nil {
		t.Fatal(err)
	}
	clk.on(a)
	p := mustPool(t, a, "10.77.0.0/24", "", false).PoolID // N1
	mustAddr(t, a, p, "", gw)
	addr := hostOf(mustAddr(t, a, p, "", map[string]string{EndpointNameOption: "c1", MACAddressOption: "02:00:00:00:00:01"}))
	mustPool(t, a, "10.77.0.0/24", "", false) // N2, same subnet (e.g. another driver using this IPAM)
	mustAddr(t, a, p, "", gw)
	clk.advance(2 * time.Hour)

	// docker network rm N2: N2 is marked inDelete and no longer listed;
	// its ReleaseAddress(gateway) is in flight when housekeeping runs.
	mustRelease(t, a, p, "10.77.0.1")
	if _, err := a.SweepPools(t.Context(), func(string) (int, bool) { return 1, true }); err != nil {
		t.Fatal(err)
	}
	// Docker's ReleasePool for N2.
	mustReleasePool(t, a, p)

	info, err := a.PoolInfo(t.Context(), p)
	if err != nil {
		t.Fatalf("pool of N1, which still runs, after N2's removal: %v", err)
	}
	if info.Holders["a"] != 1 {
		t.Errorf("holds of a: %d, want 1 (N1)", info.Holders["a"])
	}
	ref, _ := parsePoolID(p)
	if _, _, err := a.getAddr(t.Context(), ref, netip.MustParseAddr(addr)); err != nil {
		t.Errorf("address %s of N1's running container: %v", addr, err)
	}
}
