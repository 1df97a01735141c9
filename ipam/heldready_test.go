package ipam

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	ipamapi "github.com/docker/go-plugins-helpers/ipam"
)

// TestAuxAddressWhileRestoring: an --aux-address request (an explicit
// address without an endpoint identity, as `docker network create
// --aux-address` sends it) and a gateway request never ask Config.Held
// (allocStatic asks it only with an identity), so they need not wait for
// the network driver's restore. While the driver restores longer than
// HeldReady waits (5 s in plugin/main.go, against the driver's own 10 s
// call timeout), `docker network create --aux-address` failed with
// "still restoring", and so did any network of another driver on
// consul-overlay's IPAM that has an --aux-address, however long the
// overlay driver restored.
func TestAuxAddressWhileRestoring(t *testing.T) {
	ctx := context.Background()
	restoring := errors.New("consul-overlay is still restoring its state; try again")
	a, err := New(Config{Node: "a", Logger: testLogger(),
		Held:      func(string, netip.Addr) bool { return false },
		HeldReady: func() error { return restoring },
	}, newMemStore())
	if err != nil {
		t.Fatal(err)
	}
	pool, err := a.AllocatePool(ctx, PoolRequest{Pool: netip.MustParsePrefix("10.21.0.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.AllocateAddress(ctx, AddressRequest{PoolID: pool.ID, Gateway: true}); err != nil {
		t.Fatalf("gateway while the driver restores: %v", err)
	}
	aux := netip.MustParseAddr("10.21.0.200")
	if _, err := a.AllocateAddress(ctx, AddressRequest{PoolID: pool.ID, Address: aux}); err != nil {
		t.Errorf("--aux-address %s while the driver restores: %v; want it reserved (Held is not asked for it)", aux, err)
	}
	// An endpoint's address does ask Held: it still waits and fails.
	if _, err := a.AllocateAddress(ctx, AddressRequest{PoolID: pool.ID, MAC: "02:42:0a:15:00:02"}); !errors.Is(err, restoring) {
		t.Errorf("endpoint address while the driver restores: %v; want the restoring error", err)
	}
}

// TestHeldReadyWaitIsNotTheStoresTime: Docker's RequestAddress waits for
// HeldReady (the driver's restore) before its store calls' timeout
// starts: a restore that ends within the wait leaves the request its
// whole Timeout for the store, not "store did not answer in time".
func TestHeldReadyWaitIsNotTheStoresTime(t *testing.T) {
	ctx := context.Background()
	a, err := New(Config{Node: "a", Logger: testLogger(), Timeout: 100 * time.Millisecond,
		Held:      func(string, netip.Addr) bool { return false },
		HeldReady: func() error { time.Sleep(150 * time.Millisecond); return nil },
	}, newMemStore())
	if err != nil {
		t.Fatal(err)
	}
	pool, err := a.AllocatePool(ctx, PoolRequest{Pool: netip.MustParsePrefix("10.22.0.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.RequestAddress(&ipamapi.RequestAddressRequest{PoolID: pool.ID, Options: map[string]string{MACAddressOption: "02:42:0a:16:00:02"}}); err != nil {
		t.Errorf("address request after a restore that took longer than Timeout: %v", err)
	}
}
