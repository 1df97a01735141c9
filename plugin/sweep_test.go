package main

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

// TestSweepLeavesOtherDriversAddresses: a Docker network of another
// driver (macvlan, say) that takes its addresses from consul-overlay's
// IPAM with the subnet of a consul-overlay network on the same host is
// not the network driver's to see: the orphan sweep must leave its
// containers' addresses alone, or it frees them two grace periods later
// and hands them out twice. An orphan of a subnet only the driver uses is
// still freed (the sweep ran).
func TestSweepLeavesOtherDriversAddresses(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 1, testenv.UnderlayOptions{})
	p := startPluginEnv(t, "host0", hosts[0], "", "", "IPAM_GRACE=1s")

	shared, err := p.createNetwork(netSpec{subnet4: "10.43.0.0/24", opts: map[string]string{"name": "swept"}})
	if err != nil {
		t.Fatal(err)
	}
	own := shared.run(t)
	// The other driver's network: its pool and gateway, then an address
	// for a container of it. Only IPAM calls reach this plugin.
	var pool struct{ PoolID string }
	p.must("/IpamDriver.RequestPool", map[string]any{"AddressSpace": shared.space, "Pool": "10.43.0.0/24"}, &pool)
	var gw, foreign struct{ Address string }
	p.must("/IpamDriver.RequestAddress", map[string]any{"PoolID": pool.PoolID, "Options": map[string]string{"RequestAddressType": "com.docker.network.gateway"}}, &gw)
	p.must("/IpamDriver.RequestAddress", map[string]any{"PoolID": pool.PoolID, "Options": map[string]string{"com.docker.network.endpoint.macaddress": "02:42:0a:2b:00:63"}}, &foreign)

	// An orphan on a subnet that only a consul-overlay network uses: an
	// address whose CreateEndpoint never came (a crash).
	alone, err := p.createNetwork(netSpec{subnet4: "10.44.0.0/24", opts: map[string]string{"name": "alone"}})
	if err != nil {
		t.Fatal(err)
	}
	var orphan struct{ Address string }
	p.must("/IpamDriver.RequestAddress", map[string]any{"PoolID": alone.pool4, "Options": map[string]string{"com.docker.network.endpoint.macaddress": "02:42:0a:2c:00:63"}}, &orphan)
	orphanIP := netip.MustParsePrefix(orphan.Address).Addr()

	// Tombstoned after one grace period, freed after the next.
	eventually(t, 20*time.Second, func() error {
		for _, line := range strings.Split(p.logText(t), "\n") {
			if strings.Contains(line, "reclaimed address freed") && strings.Contains(line, "address="+orphanIP.String()+" ") {
				return nil
			}
		}
		return fmt.Errorf("the orphan %s not freed yet", orphanIP)
	})
	// Two more sweeps.
	time.Sleep(600 * time.Millisecond)
	for _, a := range []string{foreign.Address, own.addr4.String()} {
		ip := netip.MustParsePrefix(a).Addr()
		var got struct{ Address string }
		err := p.call("/IpamDriver.RequestAddress", map[string]any{"PoolID": pool.PoolID, "Address": ip.String(),
			"Options": map[string]string{"com.docker.network.endpoint.macaddress": "02:42:0a:2b:00:64"}}, &got)
		if err == nil {
			t.Fatalf("address %s, held by a running container, was handed out again (%s) after the orphan sweep", ip, got.Address)
		}
		t.Logf("address %s still held: %v", ip, err)
	}
	foreignIP := netip.MustParsePrefix(foreign.Address).Addr()
	for _, line := range strings.Split(p.logText(t), "\n") {
		if strings.Contains(line, "orphan address reclaimed") && strings.Contains(line, "address="+foreignIP.String()+" ") {
			t.Fatalf("the other driver's address was taken for an orphan: %s", line)
		}
	}
}
