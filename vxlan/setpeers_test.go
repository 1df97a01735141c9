package vxlan

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"

	"consul-overlay/internal/testenv"
)

// SetPeers makes a network's peers exactly the list: kept before the
// network exists, differences only, invalid peers skipped and reported,
// an empty list removes all.
func TestSetPeers(t *testing.T) {
	inLayouts(t, true, testSetPeers)
}

func testSetPeers(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	ctx := t.Context()
	const vni = 0x78
	v1, v2 := addr("192.0.2.2"), addr("192.0.2.3")
	m1, m2, m3 := MACFromIP(addr("10.0.0.2")), MACFromIP(addr("10.0.0.3")), MACFromIP(addr("10.0.0.4"))
	p1v4 := Peer{VNI: vni, IP: addr("10.0.0.2"), MAC: m1, VTEP: v1}
	p1v6 := Peer{VNI: vni, IP: addr("fd00::2"), MAC: m1, VTEP: v1}
	p2 := Peer{VNI: vni, IP: addr("10.0.0.3"), MAC: m2, VTEP: v1}
	p3 := Peer{VNI: vni, IP: addr("10.0.0.4"), MAC: m3, VTEP: v2}
	zero := "00:00:00:00:00:00 "
	n1v4, n1v6, n2, n3 := "10.0.0.2 "+m1.String(), "fd00::2 "+m1.String(), "10.0.0.3 "+m2.String(), "10.0.0.4 "+m3.String()
	f1, f2, f3 := m1.String()+" 192.0.2.2", m2.String()+" 192.0.2.2", m3.String()+" 192.0.2.3"
	check := func(step string, neigh, fdb []string) {
		t.Helper()
		slices.Sort(neigh)
		slices.Sort(fdb)
		got := entries(t, h, vni)
		if !slices.Equal(got.neigh, neigh) {
			t.Errorf("%s: neighbours\n%v\nwant\n%v", step, got.neigh, neigh)
		}
		if !slices.Equal(got.fdb, fdb) {
			t.Errorf("%s: fdb\n%v\nwant\n%v", step, got.fdb, fdb)
		}
	}

	if ch, err := h.m.SetPeers(ctx, vni, []Peer{p1v4, p1v6}); err != nil || ch.Total() != 0 {
		t.Fatalf("SetPeers before the network: %+v, %v", ch, err)
	}
	if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
		t.Fatal(err)
	}
	check("kept until the network exists", []string{n1v4, n1v6}, []string{f1, zero + "192.0.2.2"})

	if _, err := h.m.SetPeers(ctx, vni, []Peer{p1v4, p1v6, p2, p3}); err != nil {
		t.Fatal(err)
	}
	check("all", []string{n1v4, n1v6, n2, n3}, []string{f1, f2, f3, zero + "192.0.2.2", zero + "192.0.2.3"})
	if ch, err := h.m.SetPeers(ctx, vni, []Peer{p3, p2, p1v6, p1v4}); err != nil || ch.Total() != 0 {
		t.Fatalf("same set again: %+v, %v; want no write", ch, err)
	}

	ch, err := h.m.SetPeers(ctx, vni, []Peer{p2, p3})
	if err != nil {
		t.Fatal(err)
	}
	if ch.Neighbours != 2 || ch.FDB != 1 {
		t.Errorf("removing the dual-stack peer: %+v, want 2 neighbour and 1 fdb writes", ch)
	}
	check("dual-stack peer gone", []string{n2, n3}, []string{f2, f3, zero + "192.0.2.2", zero + "192.0.2.3"})

	// Invalid peers are reported; the valid ones still apply.
	self := Peer{VNI: vni, IP: addr("10.0.0.9"), MAC: m1, VTEP: h.Addr}
	other := Peer{VNI: vni + 1, IP: addr("10.0.0.8"), MAC: m1, VTEP: v1}
	if _, err := h.m.SetPeers(ctx, vni, []Peer{p3, self, other}); err == nil {
		t.Fatal("invalid peers accepted silently")
	}
	check("valid peers of a list with invalid ones", []string{n3}, []string{f3, zero + "192.0.2.3"})

	if _, err := h.m.SetPeers(ctx, vni, nil); err != nil {
		t.Fatal(err)
	}
	check("empty list", nil, nil)
	// A peer the kernel holds but the set does not (written behind our
	// back) goes too.
	vx, vxNS := linkIn(t, h, VXLANName(vni))
	if err := vxNS.Handle().NeighSet(&netlink.Neigh{LinkIndex: vx.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: net.ParseIP("10.0.0.77"), HardwareAddr: m2}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.m.SetPeers(ctx, vni, nil); err != nil {
		t.Fatal(err)
	}
	check("foreign entry removed", nil, nil)

	vnis, err := h.m.Networks(ctx)
	if err != nil || !slices.Equal(vnis, []uint32{vni}) {
		t.Fatalf("Networks() = %v, %v; want [%d]", vnis, err, vni)
	}
}

// SetVTEP moves a host's VXLAN devices to a new underlay address: once the
// other host's peers follow, containers ping again.
func TestSetVTEP(t *testing.T) {
	inLayouts(t, true, testSetVTEP)
}

func testSetVTEP(t *testing.T, dp bool) {
	hosts, n, c1, c2 := twoContainersIn(t, dp)
	newAddr := addr("192.0.2.101")
	ul, err := hosts[0].NS.Handle().LinkByName(hosts[0].Link)
	if err != nil {
		t.Fatal(err)
	}
	if err := hosts[0].NS.Handle().AddrAdd(ul, &netlink.Addr{IPNet: &net.IPNet{IP: newAddr.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := hosts[0].m.SetVTEP(t.Context(), addr("2001:db8::1"), []Network{n}); err == nil {
		t.Fatal("family change accepted")
	}
	if _, err := hosts[0].m.SetVTEP(t.Context(), newAddr, []Network{n}); err != nil {
		t.Fatal(err)
	}
	vx, ok := link(t, hosts[0], VXLANName(n.VNI)).(*netlink.Vxlan)
	if !ok {
		t.Fatal("no vxlan device")
	}
	if src, _ := netip.AddrFromSlice(vx.SrcAddr); src.Unmap() != newAddr || vx.MasterIndex == 0 {
		t.Fatalf("vxlan device local %v master %d, want %s on the bridge", vx.SrcAddr, vx.MasterIndex, newAddr)
	}
	// Host 1 learns the new address (in the plugin: through the store).
	var moved []Peer
	for _, p := range c1.peers() {
		p.VTEP = newAddr
		moved = append(moved, p)
	}
	if _, err := hosts[1].m.SetPeers(t.Context(), n.VNI, moved); err != nil {
		t.Fatal(err)
	}
	mustPing(t, c1.ns, addr("10.40.0.3"))
	mustPing(t, c2.ns, addr("fd00:40::2"))
}
