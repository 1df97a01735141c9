package main

import (
	"errors"
	"log/slog"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"consul-overlay/ipam"
	"consul-overlay/kvstore"
)

// fakeEndpoints is the network driver for addressInContainer: inUse are
// the addresses its running containers hold, nets its networks by subnet.
type fakeEndpoints struct {
	inUse map[netip.Addr]bool
	nets  map[netip.Prefix]int
}

func (f *fakeEndpoints) AddressInContainer(_ netip.Prefix, a netip.Addr, _ time.Duration) bool {
	return f.inUse[a]
}

func (f *fakeEndpoints) NetworksOn(_ string, subnet netip.Prefix, _ time.Duration) (int, bool) {
	return f.nets[subnet], true
}

// TestAddressInContainerOtherDrivers: a container on a macvlan (or bridge)
// network that uses consul-overlay's IPAM runs with --ip X under name web;
// `docker rename web web-old`; `docker run --name web --ip X` asks for X
// again under the same endpoint name. The network driver has no endpoint
// on that network and said no container holds X, so IPAM granted X a
// second time. Now the request is refused while the subnet may be another
// driver's on this host, and granted again (Docker's retry) only on a
// subnet whose every pool hold is a consul-overlay network's.
func TestAddressInContainerOtherDrivers(t *testing.T) {
	store, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: filepath.Join(t.TempDir(), "state.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	log := slog.New(slog.DiscardHandler)
	drv := &fakeEndpoints{inUse: map[netip.Addr]bool{}, nets: map[netip.Prefix]int{}}
	var ip *ipam.Driver
	ip, err = ipam.New(ipam.Config{Node: "host-1", Logger: log, InContainer: func(poolID string, a netip.Addr) bool {
		return addressInContainer(log, drv, ip, "host-1", poolID, a, time.Second)
	}}, store)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	subnet := netip.MustParsePrefix("10.77.0.0/24")
	pool, err := ip.AllocatePool(ctx, ipam.PoolRequest{Pool: subnet})
	if err != nil {
		t.Fatal(err)
	}
	x := netip.MustParseAddr("10.77.0.10")
	req := ipam.AddressRequest{PoolID: pool.ID, Address: x, Endpoint: "web", MAC: "02:42:0a:4d:00:0a"}
	if _, err := ip.AllocateAddress(ctx, req); err != nil {
		t.Fatal(err)
	}
	again := func() error {
		_, err := ip.AllocateAddress(ctx, req)
		return err
	}

	// Only another driver's network on the subnet (one pool hold, no
	// consul-overlay network).
	if err := again(); !errors.Is(err, ipam.ErrAddressInUse) {
		t.Errorf("another driver's subnet: address %s granted again under the same name (%v); a renamed running container may hold it", x, err)
	}
	// A consul-overlay network and another driver's on the subnet: two
	// holds, one network the driver sees.
	drv.nets[subnet] = 1
	if _, err := ip.AllocatePool(ctx, ipam.PoolRequest{Pool: subnet}); err != nil {
		t.Fatal(err)
	}
	if err := again(); !errors.Is(err, ipam.ErrAddressInUse) {
		t.Errorf("subnet shared with another driver's network: address %s granted again (%v)", x, err)
	}
	// The other network gone: the subnet is consul-overlay's alone, and no
	// container of the driver holds x: Docker's retry gets it again.
	if err := ip.FreePool(ctx, pool.ID); err != nil {
		t.Fatal(err)
	}
	if err := again(); err != nil {
		t.Errorf("consul-overlay's subnet, no container holds %s: the retry was refused: %v", x, err)
	}
	// A container of the driver holds it (renamed): refused.
	drv.inUse[x] = true
	if err := again(); !errors.Is(err, ipam.ErrAddressInUse) {
		t.Errorf("a running container holds %s: granted again (%v)", x, err)
	}
	// A pool that cannot be read: refused.
	drv.inUse[x] = false
	if addressInContainer(log, drv, ip, "host-1", ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix("10.78.0.0/24"), netip.Prefix{}), netip.MustParseAddr("10.78.0.5"), time.Second) != true {
		t.Error("a pool that does not exist: answered that no container holds the address")
	}
}
