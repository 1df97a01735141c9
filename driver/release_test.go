package driver

import (
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/ipam"
	"consul-overlay/kvstore"
	"consul-overlay/reaper"
)

// TestReassertBetweenDeleteNetworkAndRelease: host a runs n1
// (container ep1) and n2 on one subnet (holds 2, gateway 2) and is
// evicted while it is away (its pool holds, gateway holds and addresses
// go). Back, `docker network rm n2` on an engine that sends DeleteNetwork
// first, then ReleaseAddress of the gateway and ReleasePool (PROTOCOL.md;
// engines 28 and 29 release first). The liveness
// check's re-assertion runs in between: it counts the bound networks (n1)
// and takes one pool hold and one gateway hold. n2's releases then drop
// them: the gateway record and the pool go, and with the pool ep1's
// address record, while n1 and ep1's container still run: the address
// can be handed out a second time. The IPAM ignores the releases
// (Config.Kept, KeptHolds): n1 has an endpoint, so it keeps one hold.
func TestReassertBetweenDeleteNetworkAndRelease(t *testing.T) {
	h := newPoolHost(t, poolOpts{driver: []func(*Config){func(c *Config) { c.Reapable = true }}})
	poolID := h.network("n1")
	ep := h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02").Addr()
	h.network("n2")
	if p, g := h.holds(); p != 2 || g != 2 {
		t.Fatalf("with n1 and n2 a holds the pool %d times and the gateway %d times, want 2 and 2", p, g)
	}
	h.evicted()

	// docker network rm n2, DeleteNetwork first ...
	if err := h.a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	// ... the liveness check's re-assertion ...
	local, _ := localOf(t, h.a)
	if _, err := reaper.Reassert(h.ctx, "a", "a", h.a.cl, h.ip, h.a, local, nil); err != nil {
		t.Fatal(err)
	}
	if holder := h.heldBy(ep); holder != "a" {
		t.Fatalf("after the re-assertion ep1's address is held by %q: the test proves nothing", holder)
	}
	// ... then n2's ReleaseAddress of the gateway and its ReleasePool.
	h.release(poolID)
	if holder := h.heldBy(ep); holder != "a" {
		t.Errorf("after docker network rm n2, ep1's address %s (n1 and its container still run) is held by %q; want a", ep, holder)
	}
	if p, g := h.holds(); p != 1 || g != 1 {
		t.Errorf("after docker network rm n2, a holds the pool %d times and the gateway %d times, want 1 and 1 (n1's)", p, g)
	}
	h.notHandedOut(ep, "ep1")
}

// TestReleaseRepeatedAfterFailedDeleteNetwork: n1 (container
// ep1) and n2 on one subnet of host a: pool and gateway held twice.
// `docker network rm n2` on engine 29 sends ReleaseAddress of the
// gateway and ReleasePool first, then DeleteNetwork; DeleteNetwork fails
// (the store elects a leader, the plugin is still restoring after a
// restart: an answer, so Docker does not retry it) and Docker keeps n2.
// The user runs `docker network rm n2` again: the releases come a second
// time and take n1's holds, the pool goes, and with it ep1's address
// record, while n1 and ep1's container still run. The IPAM ignores the
// second releases (Config.Kept, KeptHolds).
func TestReleaseRepeatedAfterFailedDeleteNetwork(t *testing.T) {
	h := newPoolHost(t, poolOpts{})
	poolID := h.network("n1")
	h.network("n2")
	ep := h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02").Addr()

	h.release(poolID)
	if !crashAt(h.a, "deletenetwork/after-endpoints", func() { h.a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}) }) {
		t.Fatal("DeleteNetwork did not stop: the test proves nothing")
	}
	if h.a.network("n2") == nil {
		t.Fatal("n2 unbound by the failed DeleteNetwork: the test proves nothing")
	}
	// docker network rm n2 again.
	h.release(poolID)
	if err := h.a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	if holder := h.heldBy(ep); holder != "a" {
		t.Errorf("after docker network rm n2 (twice), ep1's address %s (n1 and its container still run) is held by %q; want a", ep, holder)
	}
}

// TestUnrecordedEndpointAddressNotSwept: a container holds
// endpoint ep2 on network app while the store lost ep2's record (an
// eviction's re-assertion that failed on it, a store restored from an
// older snapshot); the plugin restarts before the records check wrote it
// back. The restore keeps ep2's veth (KeepStrays) but not the endpoint,
// so AddressMayBeUsed answers false for its address: app is this host's
// and no endpoint it knows holds it. IPAM's orphan sweep turns ep2's
// address record into a tombstone after the grace period and frees it
// after another: it is handed out again, on the same overlay, while ep2's
// container runs with it.
func TestUnrecordedEndpointAddressNotSwept(t *testing.T) {
	h := newPoolHost(t, poolOpts{grace: 20 * time.Millisecond})
	poolID := h.network("n1")
	h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02")
	ep2 := h.endpoint(poolID, "n1", "ep2", "02:42:0a:01:00:03").Addr()
	key := "networks/name-app/endpoints/ep2"
	if !hasKey(t, h.store, key) {
		t.Fatalf("no %s: the test proves nothing", key)
	}
	if err := h.store.Delete(h.ctx, key); err != nil {
		t.Fatal(err)
	}
	h.restarted("ep1", "ep2")
	if !h.dp.hasEndpoint("ep2") {
		t.Fatal("ep2's veth removed while its container holds it")
	}
	for i := 0; i < 3; i++ {
		time.Sleep(30 * time.Millisecond)
		h.sweep()
	}
	if holder := h.heldBy(ep2); holder != "a" {
		t.Errorf("ep2's address %s, which its running container holds, is held by %q after the sweeps; want a", ep2, holder)
	}
	h.notHandedOut(ep2, "ep2")
}

// TestStaleEndpointKeepsNoReleasedPool: host a runs n1 with container
// ep1. The plugin is killed (-9) and ep1's container stops while it is
// down: Docker's forced DeleteEndpoint for ep1 fails and Docker forgets
// the endpoint. The restarted plugin takes ep1 back from its record as a
// live endpoint. `docker network rm n1` (Docker has no endpoint on it):
// the releases first (engines 28 and 29), then DeleteNetwork, which
// removes ep1. ep1's interface is gone from the kernel, so it does not
// keep the pool: the releases are honoured, and the subnet can be used
// again at once with another gateway.
func TestStaleEndpointKeepsNoReleasedPool(t *testing.T) {
	h := newPoolHost(t, poolOpts{})
	poolID := h.network("n1")
	ep := h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02")

	// kill -9; ep1's container stops while the plugin is down.
	h.restarted()

	// docker network rm n1: releases, then DeleteNetwork.
	if err := h.ip.FreeAddress(h.ctx, poolID, ep.Addr()); err != nil {
		t.Fatal(err)
	}
	h.release(poolID)
	if err := h.a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n1"}); err != nil {
		t.Fatal(err)
	}
	if info, err := h.ip.PoolInfo(h.ctx, poolID); err == nil {
		t.Errorf("after docker network rm n1 (its only network) pool %s is still held: holders %v", poolID, info.Holders)
	}
	// docker network create --subnet 10.1.0.0/24 --gateway 10.1.0.254.
	p, err := h.ip.AllocatePool(h.ctx, ipam.PoolRequest{Pool: h.subnet})
	if err != nil {
		t.Fatalf("docker network create --subnet %s after the rm: %v", h.subnet, err)
	}
	if _, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: p.ID, Gateway: true, Address: netip.MustParseAddr("10.1.0.254")}); err != nil {
		t.Errorf("docker network create --subnet %s --gateway 10.1.0.254 right after the rm: %v", h.subnet, err)
	}
}

// TestKeptHoldsWhileRestoring: n1 (container ep1) and n2 on one subnet of
// host a. The plugin restarts and its restore does not finish (its store
// calls fail, the IPAM's do not). `docker network rm n2`: the releases
// (n2's own), then DeleteNetwork, which fails; the user tries again while
// the restore still runs, and the releases come a second time. The
// driver cannot tell yet which networks have endpoints, so KeptHolds
// keeps every hold: ep1's pool and address stay.
func TestKeptHoldsWhileRestoring(t *testing.T) {
	var store *outageStore
	h := newPoolHost(t, poolOpts{
		store: func(s kvstore.Store) kvstore.Store {
			if store == nil {
				store = &outageStore{Store: s}
			}
			return store
		},
		driver: []func(*Config){func(c *Config) { c.CallTimeout = 200 * time.Millisecond }},
	})
	poolID := h.network("n1")
	h.network("n2")
	ep := h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02").Addr()

	// The plugin restarts; its restore cannot finish while its store
	// does not answer (the IPAM's does).
	h.a.Close()
	store.down.Store(true)
	d := h.newDriver()
	d.Start()
	t.Cleanup(func() { d.Close() })
	h.a = d
	rm := func() error {
		t.Helper()
		h.release(poolID)
		return d.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"})
	}
	if err := rm(); err == nil {
		t.Fatal("DeleteNetwork succeeded while restoring: the test proves nothing")
	}
	_ = rm() // docker network rm n2 again, still restoring
	store.down.Store(false)
	<-d.Ready()
	if err := d.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	if holder := h.heldBy(ep); holder != "a" {
		t.Errorf("after docker network rm n2 (twice, while the plugin restored), ep1's address %s (n1 and its container still run) is held by %q; want a", ep, holder)
	}
	h.notHandedOut(ep, "ep1")
}

// countingDataplane counts EndpointsInUse calls (one link dump each, under
// the vxlan Manager's lock, on a real host).
type countingDataplane struct {
	*fakeDataplane
	dumps atomic.Int32
}

func (c *countingDataplane) EndpointsInUse() ([]string, error) {
	c.dumps.Add(1)
	return c.fakeDataplane.EndpointsInUse()
}

// TestUnrecordedSweepDumpsOnce: while a container holds an endpoint the
// restart kept without a record, IPAM's orphan sweep of 40 addresses
// asks AddressMayBeUsed 40 times; one link dump answers them all.
func TestUnrecordedSweepDumpsOnce(t *testing.T) {
	var dp *countingDataplane
	h := newPoolHost(t, poolOpts{grace: 10 * time.Millisecond,
		dp: func(f *fakeDataplane) Dataplane { dp = &countingDataplane{fakeDataplane: f}; return dp }})
	poolID := h.network("n1")
	const n = 40
	var ids []string
	for i := 0; i < n; i++ {
		ids = append(ids, fmt.Sprintf("ep%d", i))
		h.endpoint(poolID, "n1", ids[i], fmt.Sprintf("02:42:0a:01:00:%02x", i+2))
	}
	if err := h.store.Delete(h.ctx, "networks/name-app/endpoints/ep0"); err != nil {
		t.Fatal(err)
	}
	h.restarted(ids...)
	time.Sleep(20 * time.Millisecond)
	dp.dumps.Store(0)
	h.sweep()
	if got := dp.dumps.Load(); got > 1 {
		t.Errorf("one orphan sweep of %d addresses did %d link dumps, want at most 1", n, got)
	}
}

// TestKeptHoldsCountsJoinedEndpointBeforeMove: n1 and n2 on one subnet of
// host a (pool and gateway held twice). `docker network rm n2`: the
// releases (2 -> 1), then DeleteNetwork, which stops part way; Docker
// keeps n2. A container starts on n1: CreateEndpoint, then Join, which
// clears vethMade; Docker has not moved the interface into the
// container yet (it does so right after Join answers), so the kernel
// does not report it in use. `docker network rm n2` again: its releases
// come a second time. KeptHolds counts no endpoint on n1 (not vethMade,
// not in a container yet) and lets them take n1's last holds: the pool
// goes with ep1's address record, and the address is handed out again
// while ep1's container is starting with it.
func TestKeptHoldsCountsJoinedEndpointBeforeMove(t *testing.T) {
	h := newPoolHost(t, poolOpts{})
	poolID := h.network("n1")
	h.network("n2")
	h.release(poolID)
	if !crashAt(h.a, "deletenetwork/after-endpoints", func() { h.a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}) }) {
		t.Fatal("DeleteNetwork did not stop: the test proves nothing")
	}
	// docker run --network n1: address, CreateEndpoint, Join; the
	// interface is not in the container yet.
	a, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: poolID, MAC: "02:42:0a:01:00:02"})
	if err != nil {
		t.Fatal(err)
	}
	joinedEndpoint(t, h.a, "n1", "ep1", a.String())

	// docker network rm n2 again.
	h.release(poolID)
	if holder := h.heldBy(a.Addr()); holder != "a" {
		t.Errorf("after docker network rm n2 (twice) while ep1 was joining n1, ep1's address %s is held by %q; want a", a.Addr(), holder)
	}
	if pool, gw := h.holds(); pool != 1 || gw != 1 {
		t.Errorf("n1 (joining container ep1) holds pool %d, gateway %d; want 1 and 1", pool, gw)
	}
}
