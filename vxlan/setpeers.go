package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"
)

// SetPeers makes the remote peers of network vni exactly peers: the one
// declarative call the cluster state drives the data plane with. Peers
// already programmed stay untouched (no packet is lost); the kernel's
// neighbour and FDB entries of the VXLAN device become those the list
// implies. A peer that is invalid (wrong VNI, this host's VTEP, another
// family) is skipped and reported in the error while the others are
// applied. If the network is not ensured yet, the set is kept and
// programmed by EnsureNetwork. An empty list removes every peer.
//
// Equivalent to: comparing `ip neigh show dev vx-0a1b nud permanent` and
// `bridge fdb show dev vx-0a1b self` with the list, then `ip neigh
// replace|del` and `bridge fdb replace|append|del` for the differences.
func (m *Manager) SetPeers(ctx context.Context, vni uint32, peers []Peer) (Changes, error) {
	return m.setPeers(vni, peers, false)
}

// UpdatePeers is SetPeers for a change of the list: when the last sync of
// the network's peers succeeded on the same device, it writes what
// differs from that list without reading the device's tables back, so a
// change costs its own writes, not three dumps as large as the network.
// An entry another tool removed or changed is repaired by the next
// SetPeers.
func (m *Manager) UpdatePeers(ctx context.Context, vni uint32, peers []Peer) (Changes, error) {
	return m.setPeers(vni, peers, true)
}

// setPeers is SetPeers, or UpdatePeers with delta.
func (m *Manager) setPeers(vni uint32, peers []Peer, delta bool) (Changes, error) {
	var ch Changes
	if err := validVNI(vni); err != nil {
		return ch, fmt.Errorf("set peers: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	// The list is read into the Manager's scratch slice: nothing keeps
	// it past the call, and a network of a thousand peers would otherwise
	// allocate it at every change.
	keys := m.scratchKeys[:0]
	defer func() { m.scratchKeys = keys[:0] }()
	for _, p := range peers {
		if p.VNI != vni {
			errs = append(errs, fmt.Errorf("peer %s: vni %d in the list of vni %d", p.IP, p.VNI, vni))
			continue
		}
		k, err := m.checkPeer(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		keys = append(keys, k)
	}
	if delta && len(errs) == 0 {
		if ch, done, err := m.updateInPlace(vni, keys); done {
			return ch, err
		}
	}
	// Peers already in the set keep their order, so "latest added wins"
	// for a duplicate IP or MAC means what it meant before the call.
	old := m.peers[vni]
	seq := func(k peerKey) uint64 {
		if old == nil {
			return 0
		}
		if s, ok := old.peers[k]; ok {
			return s
		}
		return 0
	}
	slices.SortStableFunc(keys, func(a, b peerKey) int {
		sa, sb := seq(a), seq(b)
		switch {
		case sa == sb:
			return 0
		case sa == 0:
			return 1
		case sb == 0:
			return -1
		case sa < sb:
			return -1
		}
		return 1
	})
	set := newPeerSet()
	for _, k := range keys {
		set.add(k)
	}
	if len(set.peers) == 0 {
		delete(m.peers, vni)
	} else {
		m.peers[vni] = set
	}
	// Encrypted network: states and policies of a new peer before its
	// entries, so its first packet finds them.
	if m.sec.encrypted[vni] {
		if err := m.syncXfrm(&ch); err != nil {
			errs = append(errs, fmt.Errorf("set peers (vni %d): %w", vni, err))
		}
	}
	// Only this owner's device: another instance's is left alone.
	vx, ns, err := m.ownVXLAN(vni)
	if err != nil {
		return ch, errors.Join(append(errs, fmt.Errorf("set peers (vni %d): %w", vni, err))...)
	}
	if vx != nil {
		if err := m.syncPeers(ns, vx, vni, delta, &ch); err != nil {
			errs = append(errs, fmt.Errorf("set peers (vni %d): %w", vni, err))
		}
	}
	if ch.Total() > 0 {
		m.log.Debug("peers set", "vni", vni, "peers", len(set.peers), "changes", ch.Total())
	}
	return ch, errors.Join(errs...)
}

// Networks lists the VNIs of the overlay networks in the kernel: VXLAN
// devices and bridges with our names and our alias.
//
// Equivalent to: `ip -d link show` filtered on the vx-/vxbr- names and the
// consul-overlay alias.
func (m *Manager) Networks(ctx context.Context) ([]uint32, error) {
	return m.OwnedNetworks()
}

// SetVTEP moves this host's underlay address to vtep (same family): the
// VXLAN device of each network in nets is replaced with one that sends
// from the new address, then its peers are programmed again. Other
// networks keep their device until their next EnsureNetwork. Callers must
// not run SetVTEP concurrently with MaxMTU or the other calls that read
// the configuration outside the Manager's lock (AddPeer, DeletePeer).
//
// Equivalent to: `ip link del vx-0a1b && ip link add vx-0a1b type vxlan
// id 2587 local <new> ...` followed by the peer entries.
func (m *Manager) SetVTEP(ctx context.Context, vtep netip.Addr, nets []Network) (Changes, error) {
	var ch Changes
	vtep = vtep.Unmap()
	if !vtep.IsValid() {
		return ch, errors.New("set vtep: no address")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if vtep.Is4() != m.cfg.VTEP.Is4() {
		return ch, fmt.Errorf("set vtep %s: the underlay family cannot change from %s's", vtep, m.cfg.VTEP)
	}
	if vtep == m.cfg.VTEP {
		return ch, nil
	}
	old := m.cfg.VTEP
	m.cfg.VTEP = vtep
	m.inKernel = nil // devices are replaced, entries written again
	// A peer at the new address would now be this host.
	for vni, set := range m.peers {
		for k := range set.peers {
			if k.vtep == vtep {
				set.remove(k)
			}
		}
		if len(set.peers) == 0 {
			delete(m.peers, vni)
		}
	}
	var errs []error
	for _, n := range nets {
		if _, err := m.ensureNetwork(ctx, n, false, &ch); err != nil {
			errs = append(errs, err)
		}
	}
	m.log.Info("vtep changed", "old", old, "vtep", vtep, "networks", len(nets), "changes", ch.Total())
	return ch, errors.Join(errs...)
}

// updateInPlace is UpdatePeers when the network's peer set is the one the
// last sync left in the kernel, on the same device, and the network is not
// encrypted: it changes that set by the difference with keys and writes
// the entries of the addresses, MACs and VTEPs the difference touches,
// instead of building a new set and comparing every entry of the network
// (issue 16: at 25 hosts that comparison was a third of each host's CPU
// per change). It leaves the same entries as the full comparison,
// removals first, the fault point "peers" before the first addition. done
// false: the full comparison must run. Caller holds m.mu.
func (m *Manager) updateInPlace(vni uint32, keys []peerKey) (ch Changes, done bool, err error) {
	set := m.peers[vni]
	last, known := m.inKernel[vni]
	if set == nil || !known || last.set != set || m.sec.encrypted[vni] {
		return ch, false, nil
	}
	if m.scratchWant == nil {
		m.scratchWant = map[peerKey]struct{}{}
	}
	want := m.scratchWant // empty: every call clears it on its way out
	defer clear(want)
	var added []peerKey
	for _, k := range keys {
		if _, dup := want[k]; dup {
			continue
		}
		want[k] = struct{}{}
		if _, ok := set.peers[k]; !ok {
			added = append(added, k)
		}
	}
	var removed []peerKey
	for k := range set.peers {
		if _, ok := want[k]; !ok {
			removed = append(removed, k)
		}
	}
	return m.applyDifference(vni, set, last, removed, added)
}

// ChangePeers is UpdatePeers given as the difference from the list of the
// last call: removed are peers to take out, added peers to put in (a
// PeerDelta of the cluster state). It applies them when the network's
// peer set is the one the last sync left in the kernel, on the same
// device, not encrypted, and the difference fits it: every removed peer in
// the set (or one SetPeers would have refused), every added one valid and
// not in it. Otherwise it writes nothing and returns applied false: call
// UpdatePeers with the whole list. A change then costs its own entries,
// not a pass over the network's peers (issue 16, scale).
func (m *Manager) ChangePeers(ctx context.Context, vni uint32, removed, added []Peer) (ch Changes, applied bool, err error) {
	if err := validVNI(vni); err != nil {
		return ch, false, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	set := m.peers[vni]
	last, known := m.inKernel[vni]
	if set == nil || !known || last.set != set || m.sec.encrypted[vni] {
		return ch, false, nil
	}
	rm := make([]peerKey, 0, len(removed))
	add := make([]peerKey, 0, len(added))
	const gone, comes = 1, 2
	seen := make(map[peerKey]int8, len(removed)+len(added))
	for _, p := range removed {
		k, err := m.checkPeer(p)
		if err != nil || p.VNI != vni {
			continue // never in the set
		}
		if _, ok := set.peers[k]; !ok || seen[k] != 0 {
			return ch, false, nil
		}
		seen[k] = gone
		rm = append(rm, k)
	}
	for _, p := range added {
		k, err := m.checkPeer(p)
		if err != nil || p.VNI != vni {
			return ch, false, nil // SetPeers reports it
		}
		if _, ok := set.peers[k]; ok && seen[k] != gone || seen[k] == comes {
			return ch, false, nil
		}
		seen[k] = comes
		add = append(add, k)
	}
	return m.applyDifference(vni, set, last, rm, add)
}

// applyDifference changes set, the network's peers that the last sync
// left in the kernel (last), by removed and added, and writes the
// entries of the addresses, MACs and VTEPs they touch, on the device the
// last sync wrote. done false: that device is gone, the full comparison
// must run. Caller holds m.mu.
func (m *Manager) applyDifference(vni uint32, set *peerSet, last kernelPeers, removed, added []peerKey) (ch Changes, done bool, err error) {
	if len(added) == 0 && len(removed) == 0 {
		return ch, true, nil
	}
	vx, ns := last.link, last.ns
	// What the entries the difference touches hold now.
	type neigh struct {
		mac [6]byte
		ok  bool
	}
	type fdb struct {
		vtep netip.Addr
		ok   bool
	}
	ips := map[netip.Addr]neigh{}
	macs := map[[6]byte]fdb{}
	vteps := map[netip.Addr]bool{}
	for _, group := range [][]peerKey{removed, added} {
		for _, k := range group {
			if _, seen := ips[k.ip]; !seen {
				mac, ok := set.neighFor(k.ip)
				ips[k.ip] = neigh{mac, ok}
			}
			if _, seen := macs[k.mac]; !seen {
				v, ok := set.fdbFor(k.mac)
				macs[k.mac] = fdb{v, ok}
			}
			if _, seen := vteps[k.vtep]; !seen {
				vteps[k.vtep] = set.hasVTEP(k.vtep)
			}
		}
	}
	// The set changes now; the kernel is known again only once written.
	delete(m.inKernel, vni)
	for _, k := range removed {
		set.remove(k)
	}
	for _, k := range added {
		set.add(k)
	}
	if len(set.peers) == 0 {
		delete(m.peers, vni)
	}
	name := vx.Attrs().Name
	fail := func(err error) (Changes, bool, error) {
		if errors.Is(err, unix.ENODEV) {
			// The device went since the last sync: not applied, the
			// caller writes the whole list, looking the device up.
			return ch, false, nil
		}
		return ch, true, fmt.Errorf("set peers (vni %d): %q: %w", vni, name, err)
	}
	var zero [6]byte
	for ip, before := range ips {
		if _, still := set.neighFor(ip); before.ok && !still {
			if err := m.delNeigh(ns, vx, ip, &ch); err != nil {
				return fail(err)
			}
		}
	}
	for mac, before := range macs {
		if now, ok := set.fdbFor(mac); before.ok && (!ok || now != before.vtep) {
			if err := m.delFDB(ns, vx, mac, before.vtep, &ch); err != nil {
				return fail(err)
			}
		}
	}
	for v, before := range vteps {
		if before && !set.hasVTEP(v) {
			if err := m.delFDB(ns, vx, zero, v, &ch); err != nil {
				return fail(err)
			}
		}
	}
	step := m.stepOnce("peers")
	for v, before := range vteps {
		if !before && set.hasVTEP(v) {
			if err := step(); err != nil {
				return fail(err)
			}
			if err := m.appendFlood(ns, vx, v, &ch); err != nil {
				return fail(err)
			}
		}
	}
	for mac, before := range macs {
		if now, ok := set.fdbFor(mac); ok && (!before.ok || now != before.vtep) {
			if err := step(); err != nil {
				return fail(err)
			}
			if err := m.setFDB(ns, vx, mac, now, &ch); err != nil {
				return fail(err)
			}
		}
	}
	for ip, before := range ips {
		if now, ok := set.neighFor(ip); ok && (!before.ok || now != before.mac) {
			if err := step(); err != nil {
				return fail(err)
			}
			if err := m.setNeigh(ns, vx, ip, now, &ch); err != nil {
				return fail(err)
			}
		}
	}
	if m.inKernel == nil {
		m.inKernel = map[uint32]kernelPeers{}
	}
	m.inKernel[vni] = kernelPeers{set: set, link: vx, ns: ns}
	if ch.Total() > 0 {
		m.log.Debug("peers set", "vni", vni, "peers", len(set.peers), "changes", ch.Total())
	}
	return ch, true, nil
}
