package ipam

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"
)

func init() {
	scenarios = append(scenarios,
		scenario{"EvictNode", scenarioEvictNode},
		scenario{"EvictNodeRacing", scenarioEvictNodeRacing},
		scenario{"EvictNodeLastHolder", scenarioEvictNodeLastHolder},
	)
}

// evictSetup: A and B share 10.9.0.0/24 (B holds it twice, as two of its
// networks use it) and its gateway; B has two addresses (one reclaimed,
// a tombstone) and an aux address, A one address.
func evictSetup(t *testing.T, c *cluster) (a, b *Driver, poolID, addrA string, addrsB []string) {
	a, b = c.host("host-a"), c.host("host-b")
	poolID = mustPool(t, a, "10.9.0.0/24", "", false).PoolID
	mustPool(t, b, "10.9.0.0/24", "", false)
	mustPool(t, b, "10.9.0.0/24", "", false)
	mustAddr(t, a, poolID, "", gw)
	mustAddr(t, b, poolID, "", gw)
	addrA = mustAddr(t, a, poolID, "", ep("ea"))
	b1 := mustAddr(t, b, poolID, "", ep("eb1"))
	b2 := mustAddr(t, b, poolID, "", map[string]string{EndpointNameOption: "eb2", MACAddressOption: "02:00:00:00:00:02"})
	if err := b.ReclaimAddress(context.Background(), poolID, netip.MustParsePrefix(b2).Addr(), Holder{MAC: "02:00:00:00:00:02"}); err != nil {
		t.Fatal(err)
	}
	aux := mustAddr(t, b, poolID, "10.9.0.200", nil)
	return a, b, poolID, addrA, []string{b1, b2, aux}
}

func checkEvicted(t *testing.T, c *cluster, a *Driver, poolID, addrA string, addrsB []string) {
	t.Helper()
	ctx := context.Background()
	for _, s := range addrsB {
		_, holder, _, err := a.AddressHolder(ctx, netip.MustParsePrefix(s).Addr())
		if err != nil || holder != "" {
			t.Errorf("B's address %s: holder %q, %v", s, holder, err)
		}
	}
	if _, holder, e, err := a.AddressHolder(ctx, netip.MustParsePrefix(addrA).Addr()); err != nil || holder != "host-a" || e != "ea" {
		t.Errorf("A's address %s: holder %q %q, %v", addrA, holder, e, err)
	}
	p, err := a.PoolInfo(ctx, poolID)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Holders) != 1 || p.Holders["host-a"] != 1 {
		t.Errorf("pool holders %v", p.Holders)
	}
	if r := c.addrRecord(poolID, "10.9.0.1"); len(r.Holders) != 1 || r.Holders["host-a"] != 1 {
		t.Errorf("gateway holders %v", r.Holders)
	}
}

func scenarioEvictNode(t *testing.T, c *cluster) {
	a, _, poolID, addrA, addrsB := evictSetup(t, c)
	ctx := context.Background()
	if _, err := a.EvictNode(ctx, ""); err == nil {
		t.Error("evict of no host succeeded")
	}
	ev, err := a.EvictNode(ctx, "host-b")
	if err != nil {
		t.Fatal(err)
	}
	if ev != (Evicted{Addresses: 2, SharedHolds: 2, PoolHolds: 2}) {
		t.Errorf("evicted %+v", ev)
	}
	checkEvicted(t, c, a, poolID, addrA, addrsB)
	before := c.snapshot()
	if ev, err := a.EvictNode(ctx, "host-b"); err != nil || ev != (Evicted{}) {
		t.Errorf("second evict: %+v, %v", ev, err)
	}
	c.unchanged(before, "a second evict")
}

func scenarioEvictNodeRacing(t *testing.T, c *cluster) {
	a, _, poolID, addrA, addrsB := evictSetup(t, c)
	others := []*Driver{a, c.host("host-c"), c.host("host-d")}
	var wg sync.WaitGroup
	errs := make([]error, len(others))
	for i, d := range others {
		wg.Add(1)
		go func() { defer wg.Done(); _, errs[i] = d.EvictNode(context.Background(), "host-b") }()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("evictor %d: %v", i, err)
		}
	}
	checkEvicted(t, c, a, poolID, addrA, addrsB)
}

// B alone holds a pool: evicting B removes it, leaving no ipam key.
func scenarioEvictNodeLastHolder(t *testing.T, c *cluster) {
	a, b := c.host("host-a"), c.host("host-b")
	poolID := mustPool(t, b, "10.8.0.0/24", "", false).PoolID
	mustAddr(t, b, poolID, "", gw)
	mustAddr(t, b, poolID, "", ep("x"))
	ev, err := a.EvictNode(context.Background(), "host-b")
	if err != nil {
		t.Fatal(err)
	}
	if ev.PoolsRemoved != 1 {
		t.Errorf("evicted %+v", ev)
	}
	c.empty()
}

// Reassert calls without an address or subnet are refused: AllocateAddress
// and RequestPool would hand out any free one instead.
func TestReassertRefusesZero(t *testing.T) {
	d, err := New(Config{Node: "h1", Logger: testLogger()}, newMemStore())
	if err != nil {
		t.Fatal(err)
	}
	p := mustPool(t, d, "10.9.0.0/24", "", false).PoolID
	if err := d.ReassertAddress(t.Context(), p, netip.Addr{}, ""); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("ReassertAddress without an address: %v, want ErrInvalidRequest", err)
	}
	if id, err := d.ReassertPool(t.Context(), PoolHolds{Space: LocalAddressSpace, Holds: 1}); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("ReassertPool without a subnet: %q, %v, want ErrInvalidRequest", id, err)
	}
}
