package driver

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/ipam"
	"consul-overlay/reaper"
)

// TestReassertBetweenDeleteNetworkAndRelease: host a runs n1
// (container ep1) and n2 on one subnet (holds 2, gateway 2) and is
// evicted while it is away (its pool holds, gateway holds and addresses
// go). Back, `docker network rm n2` on engine 29 sends DeleteNetwork
// first, then ReleaseAddress of the gateway and ReleasePool. The liveness
// check's re-assertion runs in between: it counts the bound networks (n1)
// and takes one pool hold and one gateway hold. n2's releases then drop
// them: the gateway record and the pool go, and with the pool ep1's
// address record, while n1 and ep1's container still run: the address
// can be handed out a second time. The IPAM ignores the releases
// (Config.Kept, KeptHolds): n1 has an endpoint, so it keeps one hold.
func TestReassertBetweenDeleteNetworkAndRelease(t *testing.T) {
	h := newPoolHost(t, true, func(c *Config) { c.Reapable = true })
	poolID := h.requestPool()
	h.create("n1")
	ep := h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02").Addr()
	h.requestPool()
	h.create("n2")
	if p, g := h.holds(); p != 2 || g != 2 {
		t.Fatalf("with n1 and n2 a holds the pool %d times and the gateway %d times, want 2 and 2", p, g)
	}
	h.evicted()

	// docker network rm n2 on engine 29: DeleteNetwork first ...
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
	// And no other container gets ep1's address.
	if p, err := h.ip.AllocatePool(h.ctx, ipam.PoolRequest{Pool: h.subnet}); err == nil {
		if got, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: p.ID, Address: ep, MAC: "02:42:0a:01:00:99"}); err == nil {
			t.Errorf("ep1's address %s handed out again (%s) while ep1's container runs", ep, got)
		}
	}
}

// TestReleaseRepeatedAfterFailedDeleteNetwork: n1 (container
// ep1) and n2 on one subnet of host a: pool and gateway held twice.
// `docker network rm n2` on engine 20.10 sends ReleaseAddress of the
// gateway and ReleasePool first, then DeleteNetwork; DeleteNetwork fails
// (the store elects a leader, the plugin is still restoring after a
// restart: an answer, so Docker does not retry it) and Docker keeps n2.
// The user runs `docker network rm n2` again: the releases come a second
// time and take n1's holds, the pool goes, and with it ep1's address
// record, while n1 and ep1's container still run. The IPAM ignores the
// second releases (Config.Kept, KeptHolds).
func TestReleaseRepeatedAfterFailedDeleteNetwork(t *testing.T) {
	h := newPoolHost(t, true)
	var poolID string
	for _, id := range []string{"n1", "n2"} {
		poolID = h.requestPool()
		h.create(id)
	}
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
	ctx := context.Background()
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	ip, err := ipam.New(ipam.Config{Node: "a", Grace: 20 * time.Millisecond}, store)
	if err != nil {
		t.Fatal(err)
	}
	dp := newFake()
	opts := func(c *Config) {
		c.OwnsAddressSpace = ip.Owns
		c.HoldPool = ip.HoldPool
	}
	a := newHostDriver(t, store, "a", "a", "192.0.2.1", dp, opts)
	subnet := netip.MustParsePrefix("10.1.0.0/24")
	p, err := ip.AllocatePool(ctx, ipam.PoolRequest{Pool: subnet})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: p.ID, Gateway: true}); err != nil {
		t.Fatal(err)
	}
	req := createReq("n1", map[string]interface{}{"name": "app"}, subnet.String())
	req.IPv4Data[0].AddressSpace = ipam.LocalAddressSpace
	if err := a.CreateNetwork(req); err != nil {
		t.Fatal(err)
	}
	var addrs []netip.Prefix
	for i, id := range []string{"ep1", "ep2"} {
		pfx, err := ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: p.ID, MAC: fmt.Sprintf("02:42:0a:01:00:%02x", i+2)})
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, pfx)
		joinedEndpoint(t, a, "n1", id, pfx.String())
	}
	a.Close()
	dp.mu.Lock()
	dp.inUse = map[string]bool{"ep1": true, "ep2": true}
	dp.mu.Unlock()
	key := "networks/name-app/endpoints/ep2"
	if !hasKey(t, store, key) {
		t.Fatalf("no %s: the test proves nothing", key)
	}
	if err := store.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}

	b := newHostDriver(t, store, "a", "a", "192.0.2.1", dp, opts)
	if !dp.hasEndpoint("ep2") {
		t.Fatal("ep2's veth removed while its container holds it")
	}
	bound := func(poolID string, a netip.Addr) bool {
		_, s, _, err := ipam.ParsePoolID(poolID)
		return err != nil || b.AddressMayBeUsed(s, a)
	}
	for i := 0; i < 3; i++ {
		time.Sleep(30 * time.Millisecond)
		if _, err := ip.Sweep(ctx, bound); err != nil {
			t.Fatal(err)
		}
	}
	if _, holder, _, err := ip.AddressHolder(ctx, addrs[1].Addr()); err != nil || holder != "a" {
		t.Errorf("ep2's address %s, which its running container holds, is held by %q (%v) after the sweeps; want a", addrs[1].Addr(), holder, err)
	}
	if got, err := ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: p.ID, Address: addrs[1].Addr(), MAC: "02:42:0a:01:00:99"}); err == nil {
		t.Errorf("ep2's address handed out again (%s) while ep2's container runs with it", got)
	}
}
