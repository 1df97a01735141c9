package ipam

import (
	"context"
	"errors"
	"net/netip"
	"testing"
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
