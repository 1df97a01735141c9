package vxlan

import (
	"net/netip"
	"slices"
	"testing"

	"consul-overlay/internal/testenv"
)

// Inspect reads exactly what a Manager programmed for its owner, and
// nothing of another owner's.
func TestInspect(t *testing.T) {
	hosts := newHosts(t, 2, testenv.UnderlayOptions{})
	a, b := hosts[0], hosts[1]
	const vni = 0x2000
	for _, h := range hosts {
		if _, err := h.m.EnsureNetwork(t.Context(), Network{VNI: vni}); err != nil {
			t.Fatal(err)
		}
	}
	ca := a.run(t, vni, []netip.Prefix{pfx("10.40.0.2/24")})
	cb := b.run(t, vni, []netip.Prefix{pfx("10.40.0.3/24"), pfx("fd00:40::3/64")})
	cb.announce(t, a)
	// Another owner's overlay in the same namespace.
	other := a.manager(t, "other")
	if _, err := other.EnsureNetwork(t.Context(), Network{VNI: vni + 1}); err != nil {
		t.Fatal(err)
	}

	got, err := Inspect(a.NS.Handle(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 {
		t.Fatalf("Inspect: %+v, want the one overlay of the default owner", got)
	}
	n := got[0]
	if n.VNI != vni || n.VXLAN != VXLANName(vni) || n.Bridge != BridgeName(vni) || !n.Up || n.MTU == 0 {
		t.Errorf("network %+v", n)
	}
	if !slices.Equal(n.Ports, []string{HostIfName(ca.id)}) {
		t.Errorf("ports %v, want %v", n.Ports, []string{HostIfName(ca.id)})
	}
	wantNeigh := []NeighEntry{{IP: addr("10.40.0.3"), MAC: cb.mac.String()}, {IP: addr("fd00:40::3"), MAC: cb.mac.String()}}
	if !slices.Equal(n.Neighbours, wantNeigh) {
		t.Errorf("neighbours %v, want %v", n.Neighbours, wantNeigh)
	}
	wantFDB := []FDBEntry{{MAC: FloodMAC, VTEP: b.Addr}, {MAC: cb.mac.String(), VTEP: b.Addr}}
	if !slices.Equal(n.FDB, wantFDB) {
		t.Errorf("fdb %v, want %v", n.FDB, wantFDB)
	}
	got, err = Inspect(a.NS.Handle(), "other")
	if err != nil || len(got) != 1 || got[0].VNI != vni+1 || len(got[0].Neighbours) != 0 {
		t.Errorf("Inspect of the other owner: %+v, %v", got, err)
	}
}
