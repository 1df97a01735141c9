package vxlan

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"consul-overlay/internal/testenv"
)

// Reconcile with one dump of the kernel's tables (the default) repairs
// the same damage with the same writes, and leaves the same kernel, as
// Reconcile reading each device on its own: neighbour and FDB entries
// wrong, missing and stray, bridge addresses missing and stray, a port
// off its bridge, devices down, a stray veth pair of ours.
func TestReconcileDumpSameAsPerDevice(t *testing.T) {
	inLayouts(t, true, testReconcileDumpSameAsPerDevice)
}

func testReconcileDumpSameAsPerDevice(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	hh := h.NS.Handle()
	// The devices' namespace, and the link that carries the addresses.
	dh, gwName := hh, BridgeName
	if dp {
		dh, gwName = h.dp.Handle(), GatewayName
	}
	ctx := t.Context()
	var want State
	for i := range 3 {
		vni := uint32(0x7100 + i)
		want.Networks = append(want.Networks, Network{VNI: vni, Gateways: []netip.Prefix{pfx(fmt.Sprintf("10.71.%d.1/24", i)), pfx(fmt.Sprintf("fd00:71:%d::1/64", i))}})
		for j := range 2 {
			a := addr(fmt.Sprintf("10.71.%d.%d", i, 10+j))
			want.Endpoints = append(want.Endpoints, Endpoint{ID: fmt.Sprintf("%04x%06x%054x", 0x7100+j, vni, 0), VNI: vni, MAC: MACFromIP(a)})
		}
		if i == 2 {
			continue // a network without peers
		}
		for j := range 4 {
			a := addr(fmt.Sprintf("10.71.%d.%d", i, 100+j))
			vtep := addr(fmt.Sprintf("198.51.100.%d", 1+j%2))
			want.Peers = append(want.Peers, Peer{VNI: vni, IP: a, MAC: MACFromIP(a), VTEP: vtep})
		}
	}
	if _, err := h.m.Reconcile(ctx, want); err != nil {
		t.Fatal(err)
	}

	damage := func(t *testing.T) {
		t.Helper()
		var ch Changes
		vx0, vx1, vx2 := link(t, h, VXLANName(0x7100)), link(t, h, VXLANName(0x7101)), link(t, h, VXLANName(0x7102))
		stray := [6]byte{2, 0x42, 0xde, 0xad, 0xbe, 0xef}
		vxNS := h.m.host
		if dp {
			vxNS = h.m.dp
		}
		must := func(err error) {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
		}
		// The Manager's own callers hold m.mu for these writes (a shared
		// neighbour dump's expiry takes it).
		h.m.mu.Lock()
		err := errors.Join(
			h.m.setNeigh(vxNS, vx0, addr("10.71.0.99"), stray, &ch),                                   // stray neighbour
			h.m.setNeigh(vxNS, vx0, addr("10.71.0.100"), stray, &ch),                                  // wrong MAC
			h.m.setFDB(vxNS, vx0, stray, addr("198.51.100.9"), &ch),                                   // stray FDB entry
			h.m.delFDB(vxNS, vx1, [6]byte(MACFromIP(addr("10.71.1.101"))), addr("198.51.100.2"), &ch), // missing FDB entry
			h.m.delFDB(vxNS, vx1, [6]byte{}, addr("198.51.100.1"), &ch),                               // missing flood entry
			h.m.delNeigh(vxNS, vx1, addr("10.71.1.102"), &ch),                                         // missing neighbour
		)
		h.m.mu.Unlock()
		must(err)
		br1 := link(t, h, gwName(0x7101))
		must(hh.AddrDel(br1, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("10.71.1.1").To4(), Mask: net.CIDRMask(24, 32)}}))
		must(hh.AddrAdd(br1, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("10.79.9.1").To4(), Mask: net.CIDRMask(24, 32)}}))
		must(dh.LinkSetNoMaster(link(t, h, HostIfName(want.Endpoints[4].ID))))
		must(dh.LinkSetDown(link(t, h, HostIfName(want.Endpoints[5].ID))))
		must(dh.LinkSetDown(vx2))
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vxh-dead00beef"}, PeerName: "vxc-dead00beef"}
		must(dh.LinkAdd(veth))
		must(dh.LinkSetAlias(veth, OwnerAlias))
	}
	type result struct {
		ch    Changes
		state ownerState
		addrs []string
	}
	run := func(t *testing.T, perDevice bool) result {
		damage(t)
		h.m.mu.Lock()
		h.m.perDevice = perDevice
		h.m.mu.Unlock()
		ch, err := h.m.Reconcile(ctx, want)
		if err != nil {
			t.Fatal(err)
		}
		again, err := h.m.Reconcile(ctx, want)
		if err != nil {
			t.Fatal(err)
		}
		if again != (Changes{}) {
			t.Errorf("perDevice=%v: a second Reconcile changed %+v", perDevice, again)
		}
		r := result{ch: ch, state: snapshot(t, h, "")}
		for _, n := range want.Networks {
			as, err := hh.AddrList(link(t, h, gwName(n.VNI)), netlink.FAMILY_ALL)
			if err != nil {
				t.Fatal(err)
			}
			for _, a := range as {
				if !a.IP.IsLinkLocalUnicast() {
					r.addrs = append(r.addrs, gwName(n.VNI)+" "+a.IPNet.String())
				}
			}
		}
		slices.Sort(r.addrs)
		return r
	}
	per, dump := run(t, true), run(t, false)
	t.Logf("per device: %+v; one dump: %+v", per.ch, dump.ch)
	if per.ch != dump.ch {
		t.Errorf("changes: per device %+v, one dump %+v", per.ch, dump.ch)
	}
	if per.ch.Neighbours < 3 || per.ch.FDB < 3 || per.ch.Addrs < 2 || per.ch.LinkAttrs < 3 || per.ch.Links < 1 {
		t.Errorf("changes %+v: want the damage repaired and counted", per.ch)
	}
	sameState(t, "one dump against per device", dump.state, per.state)
	if !slices.Equal(per.addrs, dump.addrs) {
		t.Errorf("bridge addresses: per device %v, one dump %v", per.addrs, dump.addrs)
	}
	for _, n := range want.Networks[:2] {
		if e := entries(t, h, n.VNI); len(e.neigh) != 4 || len(e.fdb) != 4+2 {
			t.Errorf("vni %#x: entries %+v, want 4 neighbours, 4 FDB entries and 2 flood destinations", n.VNI, e)
		}
	}
}

// A device's neighbour and FDB entries read with the kernel's filter
// (neighDump) are exactly those the library's unfiltered dump gives for
// it, for IPv4 and IPv6 neighbours and FDB, with other devices' entries
// in the namespace (peers of three networks, endpoints on their bridges).
func TestNeighDumpOneDevice(t *testing.T) {
	inLayouts(t, true, testNeighDumpOneDevice)
}

func testNeighDumpOneDevice(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	ctx := t.Context()
	var want State
	for i := range 3 {
		vni := uint32(0x7200 + i)
		want.Networks = append(want.Networks, Network{VNI: vni, Gateways: []netip.Prefix{pfx(fmt.Sprintf("10.72.%d.1/24", i))}})
		want.Endpoints = append(want.Endpoints, Endpoint{ID: fmt.Sprintf("%04x%06x%054x", 0x7200, vni, 0), VNI: vni, MAC: MACFromIP(addr(fmt.Sprintf("10.72.%d.10", i)))})
		for j := range 3 + 2*i {
			a := addr(fmt.Sprintf("10.72.%d.%d", i, 100+j))
			want.Peers = append(want.Peers, Peer{VNI: vni, IP: a, MAC: MACFromIP(a), VTEP: addr(fmt.Sprintf("198.51.100.%d", 1+j%3))})
		}
	}
	if _, err := h.m.Reconcile(ctx, want); err != nil {
		t.Fatal(err)
	}
	vxNS := h.m.host
	if dp {
		vxNS = h.m.dp
	}
	// An IPv6 neighbour on each device, which the plugin's peers (IPv4
	// here) do not give.
	for i := range 3 {
		vx := link(t, h, VXLANName(uint32(0x7200+i)))
		n := &netlink.Neigh{LinkIndex: vx.Attrs().Index, Family: netlink.FAMILY_V6, State: netlink.NUD_PERMANENT,
			IP: net.ParseIP(fmt.Sprintf("fd00:72:%d::5", i)), HardwareAddr: net.HardwareAddr{2, 0x72, 0, 0, 0, byte(i)}}
		if err := vxNS.nl.NeighSet(n); err != nil {
			t.Fatal(err)
		}
	}
	key := func(n netlink.Neigh) string {
		return fmt.Sprintf("%d %d %s %s %d %d", n.LinkIndex, n.Family, n.IP, n.HardwareAddr, n.State, n.Flags)
	}
	keys := func(ns []netlink.Neigh) []string {
		out := make([]string, 0, len(ns))
		for _, n := range ns {
			out = append(out, key(n))
		}
		slices.Sort(out)
		return out
	}
	for i := range 3 {
		vx := link(t, h, VXLANName(uint32(0x7200+i)))
		idx := vx.Attrs().Index
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6, unix.AF_BRIDGE} {
			// The kernel adds entries of its own meanwhile (the
			// multicast neighbour of an MLD report, ff02::16, comes when
			// the device first sends one): compare dumps taken while
			// the library's gives the same before and after.
			var got, lib []netlink.Neigh
			for try := 0; ; try++ {
				before, err := vxNS.nl.NeighList(idx, fam)
				if err != nil {
					t.Fatal(err)
				}
				if got, err = vxNS.neighList(idx, fam); err != nil {
					t.Fatalf("device %d family %d: %v", idx, fam, err)
				}
				if lib, err = vxNS.nl.NeighList(idx, fam); err != nil {
					t.Fatal(err)
				}
				if slices.Equal(keys(before), keys(lib)) || try == 20 {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if len(got) == 0 {
				t.Errorf("device %s family %d: no entries", vx.Attrs().Name, fam)
			}
			if g, w := keys(got), keys(lib); !slices.Equal(g, w) {
				t.Errorf("device %s family %d: filtered dump\n%v\nwant (the library's)\n%v", vx.Attrs().Name, fam, g, w)
			}
		}
	}
}
