package vxlan

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"consul-overlay/internal/testenv"
)

// UpdatePeers leaves the kernel as SetPeers does: a random walk of peer
// lists (peers coming and going, an IP moving to another MAC, a MAC to
// another VTEP, IPv6 beside IPv4) applied with UpdatePeers on one host
// and with SetPeers on another gives the same neighbour and FDB entries
// after every step.
func TestUpdatePeersSameAsSetPeers(t *testing.T) {
	inLayouts(t, true, testUpdatePeersSameAsSetPeers)
}

func testUpdatePeersSameAsSetPeers(t *testing.T, dp bool) {
	hs := newHostsIn(t, 2, testenv.UnderlayOptions{}, dp)
	upd, set := hs[0], hs[1]
	ctx := t.Context()
	const vni = 0x79
	for _, h := range hs {
		if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
			t.Fatal(err)
		}
	}
	vteps := []netip.Addr{addr("192.0.2.101"), addr("192.0.2.102"), addr("192.0.2.103")}
	var pool []Peer
	for i := range 12 {
		ip := netip.AddrFrom4([4]byte{10, 79, 0, byte(2 + i%8)}) // IPs repeat: an address moves
		mac := MACFromIP(netip.AddrFrom4([4]byte{10, 79, 1, byte(2 + i)}))
		pool = append(pool, Peer{VNI: vni, IP: ip, MAC: mac, VTEP: vteps[i%3]})
		if i%4 == 0 {
			pool = append(pool, Peer{VNI: vni, IP: netip.MustParseAddr(fmt.Sprintf("fd79::%d", i+2)), MAC: mac, VTEP: vteps[i%3]})
		}
	}
	// The same MAC behind another VTEP: the endpoint's host changed.
	pool = append(pool, Peer{VNI: vni, IP: addr("10.79.0.20"), MAC: pool[0].MAC, VTEP: vteps[2]})
	rng := rand.New(rand.NewPCG(79, 1))
	for step := range 60 {
		var list []Peer
		for _, p := range pool {
			if rng.IntN(3) > 0 {
				list = append(list, p)
			}
		}
		if step%15 == 14 {
			list = nil // every peer gone
		}
		if _, err := upd.m.UpdatePeers(ctx, vni, list); err != nil {
			t.Fatalf("step %d: UpdatePeers: %v", step, err)
		}
		if _, err := set.m.SetPeers(ctx, vni, list); err != nil {
			t.Fatalf("step %d: SetPeers: %v", step, err)
		}
		got, want := entries(t, upd, vni), entries(t, set, vni)
		if !slices.Equal(got.neigh, want.neigh) || !slices.Equal(got.fdb, want.fdb) {
			t.Fatalf("step %d (%d peers): UpdatePeers left\n%v\n%v\nSetPeers\n%v\n%v", step, len(list), got.neigh, got.fdb, want.neigh, want.fdb)
		}
	}
}

// UpdatePeers trusts what the last sync left: an entry removed by hand
// stays missing through it, and the next SetPeers (the driver's resync)
// puts it back. A device made anew (the network deleted and ensured
// again) is read, not trusted.
func TestUpdatePeersRepairedBySetPeers(t *testing.T) {
	inLayouts(t, true, testUpdatePeersRepairedBySetPeers)
}

func testUpdatePeersRepairedBySetPeers(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	ctx := t.Context()
	const vni = 0x7a
	if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
		t.Fatal(err)
	}
	v := addr("192.0.2.111")
	p1 := Peer{VNI: vni, IP: addr("10.122.0.2"), MAC: MACFromIP(addr("10.122.0.2")), VTEP: v}
	p2 := Peer{VNI: vni, IP: addr("10.122.0.3"), MAC: MACFromIP(addr("10.122.0.3")), VTEP: v}
	p3 := Peer{VNI: vni, IP: addr("10.122.0.4"), MAC: MACFromIP(addr("10.122.0.4")), VTEP: v}
	n1, n2, n3 := "10.122.0.2 "+p1.MAC.String(), "10.122.0.3 "+p2.MAC.String(), "10.122.0.4 "+p3.MAC.String()
	neigh := func(step string, want ...string) {
		t.Helper()
		slices.Sort(want)
		if got := entries(t, h, vni).neigh; !slices.Equal(got, want) {
			t.Fatalf("%s: neighbours %v, want %v", step, got, want)
		}
	}
	if _, err := h.m.UpdatePeers(ctx, vni, []Peer{p1, p2}); err != nil {
		t.Fatal(err)
	}
	neigh("first list", n1, n2)
	_, vxNS := linkIn(t, h, VXLANName(vni))
	if out, err := vxNS.Run(t, "ip", "neigh", "del", "10.122.0.2", "dev", VXLANName(vni)); err != nil {
		t.Fatalf("ip neigh del: %v: %s", err, out)
	}
	if _, err := h.m.UpdatePeers(ctx, vni, []Peer{p1, p2, p3}); err != nil {
		t.Fatal(err)
	}
	neigh("a change after a hand removal", n2, n3)
	if ch, err := h.m.SetPeers(ctx, vni, []Peer{p1, p2, p3}); err != nil || ch.Neighbours != 1 {
		t.Fatalf("SetPeers: %+v, %v; want the one neighbour written again", ch, err)
	}
	neigh("resync", n1, n2, n3)

	// The device made anew: UpdatePeers reads its (empty) tables.
	if err := h.m.DeleteNetwork(ctx, vni); err != nil {
		t.Fatal(err)
	}
	if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.m.UpdatePeers(ctx, vni, []Peer{p1, p3}); err != nil {
		t.Fatal(err)
	}
	neigh("new device", n1, n3)
}
