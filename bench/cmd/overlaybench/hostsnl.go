package main

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"consul-overlay/internal/testenv"
)

// peerEvents records, from a netlink subscription in one host's
// namespace, when each neighbour entry (by IP) and each FDB entry with a
// destination (by MAC) first appeared on the host's VXLAN device. Events
// cost the host nothing, unlike polling a dump of a thousand entries every
// millisecond on fifty hosts; the waiter falls back to a dump if an event
// was lost.
type peerEvents struct {
	h     *netlink.Handle
	vxIdx int

	mu    sync.Mutex
	neigh map[netip.Addr]time.Time
	fdb   map[string]time.Time
	err   error // first subscription error
}

func subscribePeers(t *runner, ns *testenv.NetNS, vxIdx int) *peerEvents {
	pe := &peerEvents{h: ns.Handle(), vxIdx: vxIdx, neigh: map[netip.Addr]time.Time{}, fdb: map[string]time.Time{}}
	nsh, err := netns.GetFromPath(ns.Path)
	if err != nil {
		t.Fatalf("open %s: %v", ns.Path, err)
	}
	ch := make(chan netlink.NeighUpdate, 8192)
	done := make(chan struct{})
	err = netlink.NeighSubscribeWithOptions(ch, done, netlink.NeighSubscribeOptions{
		Namespace:              &nsh,
		ErrorCallback:          pe.fail,
		ReceiveBufferSize:      8 << 20,
		ReceiveBufferForceSize: true,
	})
	if err != nil {
		nsh.Close()
		t.Fatalf("subscribe to neighbour events in %s: %v", ns.Name, err)
	}
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for u := range ch {
			pe.record(u)
		}
	}()
	t.Cleanup(func() {
		close(done)
		select {
		case <-finished:
		case <-time.After(2 * time.Second):
		}
		nsh.Close()
	})
	return pe
}

func (pe *peerEvents) fail(err error) {
	pe.mu.Lock()
	if pe.err == nil {
		pe.err = err
	}
	pe.mu.Unlock()
}

func (pe *peerEvents) record(u netlink.NeighUpdate) {
	if u.Type != unix.RTM_NEWNEIGH || u.LinkIndex != pe.vxIdx {
		return
	}
	now := time.Now()
	pe.mu.Lock()
	defer pe.mu.Unlock()
	switch u.Family {
	case unix.AF_INET:
		if u.State&netlink.NUD_PERMANENT == 0 {
			return
		}
		if a, ok := netip.AddrFromSlice(u.IP); ok {
			if _, seen := pe.neigh[a.Unmap()]; !seen {
				pe.neigh[a.Unmap()] = now
			}
		}
	case unix.AF_BRIDGE:
		if u.IP == nil || len(u.HardwareAddr) != 6 || isZeroMAC(u.HardwareAddr) {
			return
		}
		k := u.HardwareAddr.String()
		if _, seen := pe.fdb[k]; !seen {
			pe.fdb[k] = now
		}
	}
}

func isZeroMAC(m net.HardwareAddr) bool {
	for _, b := range m {
		if b != 0 {
			return false
		}
	}
	return true
}

// programmed returns when both of the peer's entries had appeared, or
// false if one has not yet.
func (pe *peerEvents) programmed(ip netip.Addr, mac net.HardwareAddr) (time.Time, bool) {
	pe.mu.Lock()
	defer pe.mu.Unlock()
	n, ok1 := pe.neigh[ip]
	f, ok2 := pe.fdb[mac.String()]
	if !ok1 || !ok2 {
		return time.Time{}, false
	}
	if f.After(n) {
		return f, true
	}
	return n, true
}

// confirm checks by a dump whether both entries are there, and records
// them as seen now if they are (an event lost to a full socket buffer).
func (pe *peerEvents) confirm(ip netip.Addr, mac net.HardwareAddr) bool {
	n, f, err := peerState(pe.h, pe.vxIdx, ip, mac)
	if err != nil || !n || !f {
		return false
	}
	now := time.Now()
	pe.mu.Lock()
	if _, ok := pe.neigh[ip]; !ok {
		pe.neigh[ip] = now
	}
	if _, ok := pe.fdb[mac.String()]; !ok {
		pe.fdb[mac.String()] = now
	}
	pe.mu.Unlock()
	return true
}
