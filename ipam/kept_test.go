package ipam

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// TestReleaseKeepsHoldsInUse: a ReleasePool, or a release of the gateway,
// that would leave this host fewer holds than Config.Kept reports (its
// networks with endpoints on the pool) is ignored; one that leaves enough
// is honoured, and with Kept at 0 the last releases remove the pool.
func TestReleaseKeepsHoldsInUse(t *testing.T) {
	s := newMemStore()
	kept := 1
	a, err := New(Config{Node: "a", Logger: testLogger(), Kept: func(string, netip.Addr) int { return kept }}, s)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, inspect: s}
	p := mustPool(t, a, "10.17.0.0/24", "", false).PoolID
	g := mustAddr(t, a, p, "", gw)
	mustPool(t, a, "10.17.0.0/24", "", false) // a second network on the pool
	mustAddr(t, a, p, hostOf(g), gw)
	holds := func() (pool, gateway int) {
		t.Helper()
		n, err := a.NodeHolds(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return n[netip.MustParsePrefix("10.17.0.0/24")], c.addrRecord(p, hostOf(g)).Holders["a"]
	}
	if pl, gh := holds(); pl != 2 || gh != 2 {
		t.Fatalf("two networks: pool held %d times, gateway %d; want 2 and 2", pl, gh)
	}
	// The second network's releases, then the same again (a retried
	// removal): the first pair leaves 1, the second is ignored.
	for range 2 {
		mustRelease(t, a, p, g)
		mustReleasePool(t, a, p)
	}
	if pl, gh := holds(); pl != 1 || gh != 1 {
		t.Errorf("after the releases: pool held %d times, gateway %d; want 1 and 1 (the network with endpoints)", pl, gh)
	}
	kept = 0 // its endpoints are gone
	mustRelease(t, a, p, g)
	mustReleasePool(t, a, p)
	c.empty()
}

// TestReleaseDeferredUntilRestored: while Config.Kept cannot tell
// (KeptUnknown), a ReleasePool and a release of the gateway change
// nothing; once Config.Restored is closed they are applied, Kept asked
// again.
func TestReleaseDeferredUntilRestored(t *testing.T) {
	s := newMemStore()
	var mu sync.Mutex
	kept := KeptUnknown
	restored := make(chan struct{})
	a, err := New(Config{Node: "a", Logger: testLogger(),
		Kept: func(string, netip.Addr) int {
			mu.Lock()
			defer mu.Unlock()
			return kept
		},
		Restored: func() <-chan struct{} { return restored },
	}, s)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, inspect: s}
	p := mustPool(t, a, "10.17.0.0/24", "", false).PoolID
	g := mustAddr(t, a, p, "", gw)
	before := c.snapshot()
	mustRelease(t, a, p, g)
	mustReleasePool(t, a, p)
	c.unchanged(before, "releases while Kept cannot tell")
	mu.Lock()
	kept = 0
	mu.Unlock()
	close(restored)
	deadline := time.Now().Add(5 * time.Second)
	for len(c.snapshot()) != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	c.empty()
}
