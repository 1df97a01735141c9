package ipam

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"consul-overlay/kvstore"
)

// TestHeldAddressNotHandedOut: addresses without a record that
// Config.Held reports an endpoint of this host has are skipped by the
// cursor, refused as explicit addresses, taken by ReassertAddress, and a
// pool whose only free addresses are such is exhausted (not a give-up).
func TestHeldAddressNotHandedOut(t *testing.T) {
	ctx := context.Background()
	s := newMemStore()
	held := map[netip.Addr]bool{}
	a, err := New(Config{Node: "a", Logger: testLogger(), Held: func(_ string, x netip.Addr) bool { return held[x] }}, s)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := a.AllocatePool(ctx, PoolRequest{Pool: netip.MustParsePrefix("10.18.0.0/29")})
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range []string{"10.18.0.1", "10.18.0.2", "10.18.0.4"} {
		held[netip.MustParseAddr(x)] = true
	}
	got, err := a.AllocateAddress(ctx, AddressRequest{PoolID: pool.ID, MAC: "02:42:0a:12:00:99"})
	if err != nil || got.Addr() != netip.MustParseAddr("10.18.0.3") {
		t.Fatalf("next free address: %s (%v), want 10.18.0.3", got, err)
	}
	two := netip.MustParseAddr("10.18.0.2")
	if got, err := a.AllocateAddress(ctx, AddressRequest{PoolID: pool.ID, Address: two, MAC: "02:42:0a:12:00:98"}); !errors.Is(err, ErrAddressInUse) {
		t.Errorf("explicit request for an address an endpoint of this host has: %s (%v), want ErrAddressInUse", got, err)
	}
	if err := a.ReassertAddress(ctx, pool.ID, two, "02:42:0a:12:00:02"); err != nil {
		t.Errorf("ReassertAddress of it: %v", err)
	}
	for _, x := range []string{"10.18.0.5", "10.18.0.6"} {
		if _, err := a.AllocateAddress(ctx, AddressRequest{PoolID: pool.ID, MAC: "02:42:0a:12:00:97"}); err != nil {
			t.Fatalf("allocate %s: %v", x, err)
		}
	}
	if got, err := a.AllocateAddress(ctx, AddressRequest{PoolID: pool.ID, MAC: "02:42:0a:12:00:96"}); !errors.Is(err, ErrPoolExhausted) {
		t.Errorf("only held addresses left: %s (%v), want ErrPoolExhausted", got, err)
	}
}

// TestHeldRunLongerThanAttempts: after an eviction the store lost the
// address records of this host's 1,100 running containers on a /20; the
// pool starts again at its first address, and each of those is Held.
// `docker run` asks for the next free address: 10.20.4.77 onwards is
// free. allocNext spends one of its maxAddrAttempts (1024) on each held
// candidate it skips and gives up with "claims lost to other hosts"
// (ErrConflict) although no other host claimed anything and half the
// pool is free.
func TestHeldRunLongerThanAttempts(t *testing.T) {
	heldRun(t, newMemStore(), 1100)
}

// heldRun: on a /20 pool of store s, the first n addresses are Held and
// have no record; the next free one is handed out.
func heldRun(t *testing.T, s kvstore.Store, n int) {
	t.Helper()
	ctx := context.Background()
	held := map[netip.Addr]bool{}
	a, err := New(Config{Node: "a", Logger: testLogger(), Held: func(_ string, x netip.Addr) bool { return held[x] }}, s)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := a.AllocatePool(ctx, PoolRequest{Pool: netip.MustParsePrefix("10.20.0.0/20")})
	if err != nil {
		t.Fatal(err)
	}
	x := netip.MustParseAddr("10.20.0.1")
	for i := 0; i < n; i++ {
		held[x] = true
		x = x.Next()
	}
	if lc, ok := s.(*listCounter); ok {
		lc.lists = 0
	}
	got, err := a.AllocateAddress(ctx, AddressRequest{PoolID: pool.ID, MAC: "02:42:0a:14:ff:99"})
	if err != nil || got.Addr() != x {
		t.Fatalf("next free address after %d held ones: %s (%v), want %s", n, got, err, x)
	}
}

// listCounter counts the store's List calls (one listing of a pool's
// address records each: a Consul round trip of the whole pool).
type listCounter struct {
	*memStore
	lists int
}

func (c *listCounter) List(ctx context.Context, prefix string) ([]*kvstore.Pair, error) {
	c.lists++
	return c.memStore.List(ctx, prefix)
}

// TestHeldRunListsOnce: 600 held addresses in a row (fewer than
// maxAddrAttempts). Once the address records are listed, allocNext still
// counts each held address it skips as a lost claim (streak), and lists
// the whole pool again every probeLimit (8) of them: some 75 listings of
// the pool for one docker run, where one would do.
func TestHeldRunListsOnce(t *testing.T) {
	s := &listCounter{memStore: newMemStore()}
	const n = 600
	heldRun(t, s, n)
	if s.lists > 2 {
		t.Errorf("one allocation past %d held addresses listed the pool's records %d times, want at most 2", n, s.lists)
	}
}

// TestHeldEverythingEnds: a Held that reports every address on a /64:
// the request fails, it does not walk the pool for ever.
func TestHeldEverythingEnds(t *testing.T) {
	ctx := context.Background()
	a, err := New(Config{Node: "a", Logger: testLogger(), Held: func(string, netip.Addr) bool { return true }}, newMemStore())
	if err != nil {
		t.Fatal(err)
	}
	pool, err := a.AllocatePool(ctx, PoolRequest{Pool: netip.MustParsePrefix("fd00:20::/64"), V6: true})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := a.AllocateAddress(ctx, AddressRequest{PoolID: pool.ID, MAC: "02:42:0a:14:ff:99"}); err == nil {
		t.Errorf("every address held, yet %s handed out", got)
	}
}
