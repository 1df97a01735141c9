package vxlan

import (
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"consul-overlay/internal/testenv"
)

// TestSharedNeighDump: the peer resyncs of several networks that come
// together read the kernel's neighbour table once, and still repair what
// was removed by hand: on another device before the dump, on a device
// the Manager wrote since the dump (read again on its own), and on a
// device the dump stood for, once the dump is older than neighShareFor.
func TestSharedNeighDump(t *testing.T) {
	inLayouts(t, true, testSharedNeighDump)
}

func testSharedNeighDump(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	ctx := t.Context()
	vnis := []uint32{0x7301, 0x7302, 0x7303}
	peers := map[uint32][]Peer{}
	for i, vni := range vnis {
		if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
			t.Fatal(err)
		}
		for j := range 4 {
			ip := addr(fmt.Sprintf("10.73.%d.%d", i, 2+j))
			peers[vni] = append(peers[vni], Peer{VNI: vni, IP: ip, MAC: MACFromIP(ip), VTEP: addr("192.0.2.2")})
		}
		if _, err := h.m.SetPeers(ctx, vni, peers[vni]); err != nil {
			t.Fatal(err)
		}
	}
	vxNS := h.m.host
	if dp {
		vxNS = h.m.dp
	}
	// removeByHand deletes peer p's neighbour entry, as `ip neigh del`.
	removeByHand := func(p Peer) {
		t.Helper()
		vx, ns := linkIn(t, h, VXLANName(p.VNI))
		if err := ns.Handle().NeighDel(&netlink.Neigh{LinkIndex: vx.Attrs().Index, Family: netlink.FAMILY_V4, IP: net.IP(p.IP.AsSlice())}); err != nil {
			t.Fatal(err)
		}
	}
	has := func(p Peer) bool {
		t.Helper()
		return slices.Contains(entries(t, h, p.VNI).neigh, p.IP.String()+" "+p.MAC.String())
	}
	resyncAll := func(step string) {
		t.Helper()
		for _, vni := range vnis {
			if _, err := h.m.SetPeers(ctx, vni, peers[vni]); err != nil {
				t.Fatalf("%s: %v", step, err)
			}
		}
	}

	time.Sleep(neighShareFor)
	removeByHand(peers[vnis[2]][1])
	before := vxNS.shareDumps
	resyncAll("resync of three networks")
	if n := vxNS.shareDumps - before; n != 2 {
		t.Errorf("the resync of three networks took %d dumps of the namespace's neighbours, want 2 (IPv4 and IPv6)", n)
	}
	if !has(peers[vnis[2]][1]) {
		t.Fatal("an entry removed by hand before the shared dump was not repaired")
	}

	// Written since the dump (a new peer): read again on its own.
	ip := addr("10.73.0.99")
	peers[vnis[0]] = append(peers[vnis[0]], Peer{VNI: vnis[0], IP: ip, MAC: MACFromIP(ip), VTEP: addr("192.0.2.2")})
	if ch, err := h.m.SetPeers(ctx, vnis[0], peers[vnis[0]]); err != nil || ch.Neighbours != 1 {
		t.Fatalf("a new peer: %+v, %v", ch, err)
	}
	removeByHand(peers[vnis[0]][2])
	before = vxNS.shareDumps
	resyncAll("resync within the dump's life")
	if n := vxNS.shareDumps - before; n != 0 {
		t.Errorf("a resync within the dump's life took %d dumps of the namespace's neighbours, want none", n)
	}
	if !has(peers[vnis[0]][2]) {
		t.Fatal("an entry removed by hand on a device written since the dump was not repaired")
	}

	// The dump stood for vnis[1] (no write since): an entry removed now is
	// seen once the dump is older than neighShareFor.
	removeByHand(peers[vnis[1]][0])
	time.Sleep(neighShareFor)
	// Past its life the dump is no longer held (its entries and buffers
	// go back to the heap).
	held := func() int {
		h.m.mu.Lock()
		defer h.m.mu.Unlock()
		return len(vxNS.shares)
	}
	for end := time.Now().Add(2 * time.Second); held() > 0 && time.Now().Before(end); {
		time.Sleep(10 * time.Millisecond)
	}
	if n := held(); n > 0 {
		t.Errorf("%d shared dumps still held after their life (%v)", n, neighShareFor)
	}
	resyncAll("resync after the dump's life")
	if !has(peers[vnis[1]][0]) {
		t.Fatal("an entry removed by hand was not repaired by a resync after the dump's life")
	}
}
