package vxlan

import (
	"bytes"
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
	pool := peerPool(vni, 79, 101)
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

// ChangePeers leaves the kernel as SetPeers does: the random walk of
// TestUpdatePeersSameAsSetPeers, each step given to one host as its
// difference from the step before (UpdatePeers with the whole list when
// it is not applied, as the driver does) and to the other with SetPeers.
// A difference that does not fit the set (a peer removed that is not
// there, one added that is) is not applied and writes nothing.
func TestChangePeersSameAsSetPeers(t *testing.T) {
	inLayouts(t, true, testChangePeersSameAsSetPeers)
}

func testChangePeersSameAsSetPeers(t *testing.T, dp bool) {
	hs := newHostsIn(t, 2, testenv.UnderlayOptions{}, dp)
	chg, set := hs[0], hs[1]
	ctx := t.Context()
	const vni = 0x7b
	for _, h := range hs {
		if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
			t.Fatal(err)
		}
	}
	pool := peerPool(vni, 123, 121)
	rng := rand.New(rand.NewPCG(123, 1))
	var last []Peer
	applied := 0
	for step := range 61 { // the last step after an empty list, so the set is not empty
		var list []Peer
		for _, p := range pool {
			if rng.IntN(3) > 0 {
				list = append(list, p)
			}
		}
		if step%15 == 14 {
			list = nil
		}
		var removed, added []Peer
		for _, p := range last {
			if !slices.ContainsFunc(list, func(q Peer) bool { return sameEntry(p, q) }) {
				removed = append(removed, p)
			}
		}
		for _, p := range list {
			if !slices.ContainsFunc(last, func(q Peer) bool { return sameEntry(p, q) }) {
				added = append(added, p)
			}
		}
		_, ok, err := chg.m.ChangePeers(ctx, vni, removed, added)
		if err != nil {
			t.Fatalf("step %d: ChangePeers: %v", step, err)
		}
		if ok {
			applied++
		} else if _, err := chg.m.UpdatePeers(ctx, vni, list); err != nil {
			t.Fatalf("step %d: UpdatePeers: %v", step, err)
		}
		if _, err := set.m.SetPeers(ctx, vni, list); err != nil {
			t.Fatalf("step %d: SetPeers: %v", step, err)
		}
		got, want := entries(t, chg, vni), entries(t, set, vni)
		if !slices.Equal(got.neigh, want.neigh) || !slices.Equal(got.fdb, want.fdb) {
			t.Fatalf("step %d (%d peers, applied %v): ChangePeers left\n%v\n%v\nSetPeers\n%v\n%v", step, len(list), ok, got.neigh, got.fdb, want.neigh, want.fdb)
		}
		last = list
	}
	// Not applied: only a step after an empty list (no set to change).
	if applied < 50 {
		t.Fatalf("ChangePeers applied %d of 61 steps, want the steps after a non-empty list", applied)
	}
	before := entries(t, chg, vni)
	stranger := Peer{VNI: vni, IP: addr("10.123.9.9"), MAC: MACFromIP(addr("10.123.9.9")), VTEP: pool[0].VTEP}
	for name, d := range map[string][2][]Peer{
		"a peer removed that is not there": {{stranger}, nil},
		"a peer added that is there":       {nil, {last[0]}},
		"an invalid peer added":            {nil, {{VNI: vni, IP: addr("10.123.9.8"), MAC: stranger.MAC}}},
	} {
		if _, ok, err := chg.m.ChangePeers(ctx, vni, d[0], append(d[1], stranger)); ok || err != nil {
			t.Fatalf("%s: applied %v, %v; want not applied", name, ok, err)
		}
		if got := entries(t, chg, vni); !slices.Equal(got.neigh, before.neigh) || !slices.Equal(got.fdb, before.fdb) {
			t.Fatalf("%s: the kernel changed:\n%v\n%v\nwant\n%v\n%v", name, got.neigh, got.fdb, before.neigh, before.fdb)
		}
	}
	// The device removed behind the Manager's back and made again: a
	// difference is not applied to the device the last sync wrote (it
	// is gone), and the whole list, written as the driver then does,
	// fills the new one.
	vx, ns := linkIn(t, chg, VXLANName(vni))
	if err := ns.Handle().LinkDel(vx); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := chg.m.ChangePeers(ctx, vni, nil, []Peer{stranger}); ok || err != nil {
		t.Fatalf("a difference for a device removed since: applied %v, %v; want not applied", ok, err)
	}
	if _, err := chg.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
		t.Fatal(err)
	}
	list := append(slices.Clone(last), stranger)
	if _, err := chg.m.UpdatePeers(ctx, vni, list); err != nil {
		t.Fatal(err)
	}
	if _, err := set.m.SetPeers(ctx, vni, list); err != nil {
		t.Fatal(err)
	}
	if got, want := entries(t, chg, vni), entries(t, set, vni); !slices.Equal(got.neigh, want.neigh) || !slices.Equal(got.fdb, want.fdb) {
		t.Fatalf("after the device was made again: UpdatePeers left\n%v\n%v\nSetPeers\n%v\n%v", got.neigh, got.fdb, want.neigh, want.fdb)
	}
}

func sameEntry(p, q Peer) bool {
	return p.IP == q.IP && bytes.Equal(p.MAC, q.MAC) && p.VTEP == q.VTEP
}

// peerPool is the peers a random walk draws from: 10.<net>.0.0/24
// addresses that repeat (an address moves to another MAC), some IPv6 ones
// beside them, behind three VTEPs from 192.0.2.<vtep>, and one MAC behind
// a second VTEP (the endpoint's host changed).
func peerPool(vni uint32, net, vtep byte) []Peer {
	vteps := []netip.Addr{netip.AddrFrom4([4]byte{192, 0, 2, vtep}), netip.AddrFrom4([4]byte{192, 0, 2, vtep + 1}), netip.AddrFrom4([4]byte{192, 0, 2, vtep + 2})}
	var pool []Peer
	for i := range 12 {
		ip := netip.AddrFrom4([4]byte{10, net, 0, byte(2 + i%8)})
		mac := MACFromIP(netip.AddrFrom4([4]byte{10, net, 1, byte(2 + i)}))
		pool = append(pool, Peer{VNI: vni, IP: ip, MAC: mac, VTEP: vteps[i%3]})
		if i%4 == 0 {
			pool = append(pool, Peer{VNI: vni, IP: netip.MustParseAddr(fmt.Sprintf("fd%02x::%d", net, i+2)), MAC: mac, VTEP: vteps[i%3]})
		}
	}
	return append(pool, Peer{VNI: vni, IP: netip.AddrFrom4([4]byte{10, net, 0, 20}), MAC: pool[0].MAC, VTEP: vteps[2]})
}
