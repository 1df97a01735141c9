package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// peerKey identifies one Peer within a VNI.
type peerKey struct {
	ip   netip.Addr
	mac  [6]byte
	vtep netip.Addr
}

// peerSet is the desired set of remote peers of one VNI and the kernel
// entries it implies:
//   - per IP, one neighbour entry IP→MAC; if several peers claim an IP (a
//     transient duplicate while an address moves) the latest added wins,
//     and the next one takes over when it goes;
//   - per MAC, one FDB entry MAC→VTEP, kept while any peer has the MAC (the
//     IPv4 and IPv6 addresses of one endpoint share it); latest added wins;
//   - per VTEP, one all-zeros FDB destination, kept while any peer is
//     behind that VTEP, so broadcast and multicast reach the host.
type peerSet struct {
	seq   uint64
	peers map[peerKey]uint64 // peer → insertion sequence
	// The peers of each IP and MAC: almost always one (a slice, not a
	// set: a thousand peers' sets would cost a megabyte of small maps).
	byIP  map[netip.Addr][]peerKey
	byMAC map[[6]byte][]peerKey
	vteps map[netip.Addr]int // peers behind each VTEP
}

func newPeerSet() *peerSet {
	return &peerSet{
		peers: map[peerKey]uint64{},
		byIP:  map[netip.Addr][]peerKey{},
		byMAC: map[[6]byte][]peerKey{},
		vteps: map[netip.Addr]int{},
	}
}

// addIndex adds p to k's peers; the caller adds each peer once.
func addIndex[K comparable](idx map[K][]peerKey, k K, p peerKey) {
	idx[k] = append(idx[k], p)
}

func delIndex[K comparable](idx map[K][]peerKey, k K, p peerKey) {
	g := idx[k]
	i := slices.Index(g, p)
	if i < 0 {
		return
	}
	if len(g) == 1 {
		delete(idx, k)
		return
	}
	g[i] = g[len(g)-1]
	g[len(g)-1] = peerKey{}
	idx[k] = g[:len(g)-1]
}

// add adds p; it reports false if p was already present.
func (s *peerSet) add(p peerKey) bool {
	if _, ok := s.peers[p]; ok {
		return false
	}
	s.seq++
	s.peers[p] = s.seq
	addIndex(s.byIP, p.ip, p)
	addIndex(s.byMAC, p.mac, p)
	s.vteps[p.vtep]++
	return true
}

// remove removes p; it reports false if p was absent.
func (s *peerSet) remove(p peerKey) bool {
	if _, ok := s.peers[p]; !ok {
		return false
	}
	delete(s.peers, p)
	delIndex(s.byIP, p.ip, p)
	delIndex(s.byMAC, p.mac, p)
	if s.vteps[p.vtep]--; s.vteps[p.vtep] <= 0 {
		delete(s.vteps, p.vtep)
	}
	return true
}

// latest returns the most recently added peer of a group.
func (s *peerSet) latest(group []peerKey) (peerKey, bool) {
	var best peerKey
	var bestSeq uint64
	for _, p := range group {
		if q := s.peers[p]; q > bestSeq {
			best, bestSeq = p, q
		}
	}
	return best, bestSeq > 0
}

// neighFor is the MAC the neighbour entry of ip should hold.
func (s *peerSet) neighFor(ip netip.Addr) ([6]byte, bool) {
	p, ok := s.latest(s.byIP[ip])
	return p.mac, ok
}

// fdbFor is the VTEP the FDB entry of mac should point to.
func (s *peerSet) fdbFor(mac [6]byte) (netip.Addr, bool) {
	p, ok := s.latest(s.byMAC[mac])
	return p.vtep, ok
}

func (s *peerSet) hasVTEP(v netip.Addr) bool { return s.vteps[v] > 0 }

// list returns the peers of the set as Peers.
func (s *peerSet) list(vni uint32) []Peer {
	out := make([]Peer, 0, len(s.peers))
	for p := range s.peers {
		out = append(out, Peer{VNI: vni, IP: p.ip, MAC: net.HardwareAddr(p.mac[:]), VTEP: p.vtep})
	}
	return out
}

// checkPeer validates p and returns its key.
func (m *Manager) checkPeer(p Peer) (peerKey, error) {
	if err := validVNI(p.VNI); err != nil {
		return peerKey{}, err
	}
	if !p.IP.IsValid() {
		return peerKey{}, errors.New("peer ip is not set")
	}
	if err := validUnicastMAC(p.MAC); err != nil {
		return peerKey{}, fmt.Errorf("peer %s: %w", p.IP, err)
	}
	vtep := p.VTEP.Unmap()
	switch {
	case !vtep.IsValid():
		return peerKey{}, fmt.Errorf("peer %s: vtep is not set", p.IP)
	case vtep.Is4() != m.cfg.VTEP.Is4():
		return peerKey{}, fmt.Errorf("peer %s: vtep %s is not of the local vtep's family (%s)", p.IP, vtep, m.cfg.VTEP)
	case vtep == m.cfg.VTEP:
		return peerKey{}, fmt.Errorf("peer %s: vtep %s is this host", p.IP, vtep)
	}
	return peerKey{ip: p.IP.Unmap(), mac: [6]byte(p.MAC), vtep: vtep}, nil
}

// AddPeer programs a remote endpoint address: its neighbour entry, its
// FDB entry and the all-zeros FDB destination of its VTEP. Adding a peer
// twice is harmless. A peer of a network that is not ensured yet (or whose
// VXLAN device belongs to another owner) is kept and programmed when the
// network is ensured.
func (m *Manager) AddPeer(ctx context.Context, p Peer) error {
	k, err := m.checkPeer(p)
	if err != nil {
		return fmt.Errorf("add peer: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.inKernel, p.VNI) // written entry by entry
	set := m.peers[p.VNI]
	if set == nil {
		set = newPeerSet()
		m.peers[p.VNI] = set
	}
	set.add(k)
	if m.sec.encrypted[p.VNI] {
		var ch Changes
		if err := m.syncXfrm(&ch); err != nil {
			return fmt.Errorf("add peer %s (vni %d): %w", p.IP, p.VNI, err)
		}
	}
	vx, ns, err := m.ownVXLAN(p.VNI)
	if err != nil {
		return fmt.Errorf("add peer %s (vni %d): %w", p.IP, p.VNI, err)
	}
	if vx == nil {
		m.log.Debug("peer kept until its network exists", "vni", p.VNI, "peer", p.IP, "vtep", k.vtep)
		return nil
	}
	var ch Changes
	if err := m.applyPeer(ns, vx, set, k, true, &ch); err != nil {
		return fmt.Errorf("add peer %s (vni %d, vtep %s): %w", p.IP, p.VNI, k.vtep, err)
	}
	return nil
}

// DeletePeer removes a remote endpoint address. Its neighbour entry goes
// unless another peer claims the IP; its FDB entry goes when no peer has
// the MAC any more; the all-zeros destination goes with the last peer
// behind the VTEP. Deleting an unknown peer is success.
func (m *Manager) DeletePeer(ctx context.Context, p Peer) error {
	k, err := m.checkPeer(p)
	if err != nil {
		return fmt.Errorf("delete peer: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.inKernel, p.VNI) // written entry by entry
	set := m.peers[p.VNI]
	if set == nil {
		set = newPeerSet()
	}
	set.remove(k)
	if len(set.peers) == 0 {
		delete(m.peers, p.VNI)
	}
	vx, ns, err := m.ownVXLAN(p.VNI)
	if err != nil {
		return fmt.Errorf("delete peer %s (vni %d): %w", p.IP, p.VNI, err)
	}
	if vx == nil {
		return nil
	}
	var ch Changes
	if err := m.applyPeer(ns, vx, set, k, false, &ch); err != nil {
		return fmt.Errorf("delete peer %s (vni %d, vtep %s): %w", p.IP, p.VNI, k.vtep, err)
	}
	if m.sec.encrypted[p.VNI] {
		if err := m.syncXfrm(&ch); err != nil {
			return fmt.Errorf("delete peer %s (vni %d): %w", p.IP, p.VNI, err)
		}
	}
	return nil
}

// ownVXLAN returns the VXLAN device of vni and its namespace, or nil if
// there is none or it
// belongs to another owner: peers of a network we do not hold are kept
// and programmed when we ensure it, never written into another instance's
// device.
func (m *Manager) ownVXLAN(vni uint32) (netlink.Link, *netNS, error) {
	ns, err := m.nsOf(vni)
	if err != nil {
		return nil, nil, err
	}
	vx, err := ns.linkByName(VXLANName(vni))
	if err != nil || vx == nil {
		return nil, nil, err
	}
	if err := m.foreign(vx); err != nil {
		m.log.Debug("peer not programmed", "vni", vni, "reason", err)
		return nil, nil, nil
	}
	return vx, ns, nil
}

// applyPeer brings the three kernel entries that peer k touches in line
// with set. On add the FDB goes first so a resolved neighbour always has a
// path; on delete the neighbour goes first.
func (m *Manager) applyPeer(ns *netNS, vx netlink.Link, set *peerSet, k peerKey, adding bool, ch *Changes) error {
	neigh := func() error {
		if mac, ok := set.neighFor(k.ip); ok {
			return m.setNeigh(ns, vx, k.ip, mac, ch)
		}
		return m.delNeigh(ns, vx, k.ip, ch)
	}
	fdb := func() error {
		if vtep, ok := set.fdbFor(k.mac); ok {
			return m.setFDB(ns, vx, k.mac, vtep, ch)
		}
		return m.delFDB(ns, vx, k.mac, k.vtep, ch)
	}
	flood := func() error {
		if set.hasVTEP(k.vtep) {
			return m.appendFlood(ns, vx, k.vtep, ch)
		}
		return m.delFDB(ns, vx, [6]byte{}, k.vtep, ch)
	}
	order := []func() error{flood, fdb, neigh}
	if !adding {
		order = []func() error{neigh, fdb, flood}
	}
	for _, f := range order {
		if err := f(); err != nil {
			return err
		}
	}
	return nil
}

func ipFamily(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// setNeigh writes a permanent neighbour entry on the VXLAN device, which
// answers ARP and neighbour solicitations for ip from it (proxy).
//
// Equivalent to: `ip neigh replace 10.10.0.3 lladdr 02:42:0a:0a:00:03 dev
// vx-0a1b nud permanent`.
func (m *Manager) setNeigh(ns *netNS, vx netlink.Link, ip netip.Addr, mac [6]byte, ch *Changes) error {
	n := &netlink.Neigh{LinkIndex: vx.Attrs().Index, Family: ipFamily(ip), State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: net.HardwareAddr(mac[:])}
	ns.forgetShared(n.LinkIndex)
	if err := ns.nl.NeighSet(n); err != nil {
		return fmt.Errorf("set neighbour %s lladdr %s: %w", ip, n.HardwareAddr, err)
	}
	ch.Neighbours++
	m.log.Debug("neighbour set", "link", vx.Attrs().Name, "peer", ip, "mac", n.HardwareAddr)
	// Tell the local containers, which may hold an old MAC for this
	// address, through the bridge the VXLAN device is enslaved to.
	if br := vx.Attrs().MasterIndex; br > 0 {
		if err := ns.announce.garp(br, ip, n.HardwareAddr); err != nil {
			m.log.Warn("announce peer", "link", vx.Attrs().Name, "peer", ip, "error", err)
		}
	}
	return nil
}

// delNeigh removes a neighbour entry; not-found is success.
//
// Equivalent to: `ip neigh del 10.10.0.3 dev vx-0a1b`.
func (m *Manager) delNeigh(ns *netNS, vx netlink.Link, ip netip.Addr, ch *Changes) error {
	n := &netlink.Neigh{LinkIndex: vx.Attrs().Index, Family: ipFamily(ip), IP: ip.AsSlice()}
	ns.forgetShared(n.LinkIndex)
	if err := ns.nl.NeighDel(n); err != nil {
		if isNotFound(err) {
			return nil
		}
		return fmt.Errorf("delete neighbour %s: %w", ip, err)
	}
	ch.Neighbours++
	m.log.Debug("neighbour deleted", "link", vx.Attrs().Name, "peer", ip)
	return nil
}

// setFDB points a MAC at a remote VTEP, replacing any previous entry.
//
// Equivalent to: `bridge fdb replace 02:42:0a:0a:00:03 dev vx-0a1b dst
// 192.0.2.12 self permanent`.
func (m *Manager) setFDB(ns *netNS, vx netlink.Link, mac [6]byte, vtep netip.Addr, ch *Changes) error {
	n := fdbEntry(vx.Attrs().Index, mac, vtep)
	if err := ns.nl.NeighSet(n); err != nil {
		return fmt.Errorf("set fdb %s dst %s: %w", n.HardwareAddr, vtep, err)
	}
	ch.FDB++
	m.log.Debug("fdb set", "link", vx.Attrs().Name, "mac", n.HardwareAddr, "vtep", vtep)
	return nil
}

// appendFlood adds a VTEP to the all-zeros entry that floods broadcast,
// multicast and unknown unicast.
//
// Equivalent to: `bridge fdb append 00:00:00:00:00:00 dev vx-0a1b dst
// 192.0.2.12 self permanent`.
func (m *Manager) appendFlood(ns *netNS, vx netlink.Link, vtep netip.Addr, ch *Changes) error {
	if err := m.allowVTEP(vtep, ch); err != nil { // its replies must pass the underlay filter
		return err
	}
	n := fdbEntry(vx.Attrs().Index, [6]byte{}, vtep)
	if err := ns.nl.NeighAppend(n); err != nil {
		return fmt.Errorf("append fdb 00:00:00:00:00:00 dst %s: %w", vtep, err)
	}
	ch.FDB++
	m.log.Debug("fdb flood destination added", "link", vx.Attrs().Name, "vtep", vtep)
	return nil
}

// delFDB removes one destination of an FDB entry (the whole entry when it
// is the last); not-found is success.
//
// Equivalent to: `bridge fdb del 02:42:0a:0a:00:03 dev vx-0a1b dst
// 192.0.2.12 self`.
func (m *Manager) delFDB(ns *netNS, vx netlink.Link, mac [6]byte, vtep netip.Addr, ch *Changes) error {
	n := fdbEntry(vx.Attrs().Index, mac, vtep)
	if err := ns.nl.NeighDel(n); err != nil {
		if isNotFound(err) {
			return nil
		}
		return fmt.Errorf("delete fdb %s dst %s: %w", n.HardwareAddr, vtep, err)
	}
	ch.FDB++
	m.log.Debug("fdb deleted", "link", vx.Attrs().Name, "mac", n.HardwareAddr, "vtep", vtep)
	return nil
}

func fdbEntry(idx int, mac [6]byte, vtep netip.Addr) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    idx,
		Family:       unix.AF_BRIDGE,
		State:        netlink.NUD_PERMANENT,
		Flags:        netlink.NTF_SELF,
		IP:           vtep.AsSlice(),
		HardwareAddr: net.HardwareAddr(mac[:]),
	}
}

// syncPeers makes the neighbour and FDB entries of a VXLAN device exactly
// those the VNI's peer set implies, writing only the differences.
// Neighbour entries that are not permanent (none of ours) are left to the
// kernel unless they block one of ours.
//
// Equivalent to: comparing `ip neigh show dev vx-0a1b nud permanent` and
// `bridge fdb show dev vx-0a1b self` with the peers, then the `ip neigh
// del`, `bridge fdb del`, `bridge fdb append`, `bridge fdb replace` and
// `ip neigh replace` commands above for the differences.
func (m *Manager) syncPeers(ns *netNS, vx netlink.Link, vni uint32, delta bool, ch *Changes) error {
	return m.syncPeerEntries(ns, vx, vni, false, delta, ch)
}

// kernelPeers is what the last successful sync of a network's peers left
// in its VXLAN device's tables: the entries of set, a peer set no call
// changes any more (SetPeers makes a new one; the calls that change one in
// place, AddPeer, DeletePeer, Reconcile and SetVTEP, drop the record).
type kernelPeers struct {
	set *peerSet
	// The device (its index is the device's the entries are on) and its
	// namespace as that sync found them: a change written as a
	// difference (applyDifference) writes to them without looking the
	// device up again. A device removed since fails the write, and the
	// full comparison runs; every path that replaces a device drops the
	// record.
	link netlink.Link
	ns   *netNS
}

// syncPeerEntries is syncPeers; with keepAll it only adds and replaces
// entries and removes none. With delta, and when the last sync of the
// network succeeded on the same device, it compares with what that sync
// left instead of reading the device's tables (three dumps, each as large
// as the network): a change then costs the writes it needs. SetPeers
// reads the tables always, so what another tool changed is repaired by
// the next resync.
func (m *Manager) syncPeerEntries(ns *netNS, vx netlink.Link, vni uint32, keepAll, delta bool, ch *Changes) (retErr error) {
	set := m.peers[vni]
	if set == nil {
		set = newPeerSet()
	}
	idx := vx.Attrs().Index
	name := vx.Attrs().Name
	last, known := m.inKernel[vni]
	delete(m.inKernel, vni)
	defer func() {
		if retErr == nil && !keepAll {
			if m.inKernel == nil {
				m.inKernel = map[uint32]kernelPeers{}
			}
			m.inKernel[vni] = kernelPeers{set: set, link: vx, ns: ns}
		}
	}()
	if delta && known && last.link.Attrs().Index == idx {
		old := last.set
		haveNeigh := make(map[netip.Addr][6]byte, len(old.byIP))
		for ip := range old.byIP {
			haveNeigh[ip], _ = old.neighFor(ip)
		}
		var zero [6]byte
		haveFDB := make(map[[6]byte][]netip.Addr, len(old.byMAC)+1)
		for mac := range old.byMAC {
			v, _ := old.fdbFor(mac)
			haveFDB[mac] = []netip.Addr{v}
		}
		for v := range old.vteps {
			haveFDB[zero] = append(haveFDB[zero], v)
		}
		return m.writePeerEntries(ns, vx, set, haveNeigh, haveFDB, keepAll, ch)
	}
	// What the kernel holds.
	// Reconcile's snapshot when it stands for this device's tables.
	list := func(fam int) ([]netlink.Neigh, error) {
		if ns, ok := ns.snap.entries(idx, fam); ok {
			return ns, nil
		}
		if fam != unix.AF_BRIDGE {
			// The kernel walks its whole neighbour table for a dump of
			// one device's: the networks' resyncs, which come together,
			// share one dump (neighshare.go).
			return ns.sharedNeighs(idx, fam)
		}
		return retryDump(func() ([]netlink.Neigh, error) { return ns.neighList(idx, fam) })
	}
	haveNeigh := map[netip.Addr][6]byte{}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		ns, err := list(fam)
		if err != nil {
			return fmt.Errorf("list neighbours of %q: %w", name, err)
		}
		for _, n := range ns {
			ip, ok := netip.AddrFromSlice(n.IP)
			if !ok || n.State != netlink.NUD_PERMANENT || len(n.HardwareAddr) != 6 {
				continue
			}
			haveNeigh[ip.Unmap()] = [6]byte(n.HardwareAddr)
		}
	}
	haveFDB := map[[6]byte][]netip.Addr{}
	fdbs, err := list(unix.AF_BRIDGE)
	// Read once: what this call writes is not in the snapshot.
	ns.snap.forgetEntries(vx)
	if err != nil {
		return fmt.Errorf("list fdb of %q: %w", name, err)
	}
	for _, n := range fdbs {
		// NTF_SELF: the VXLAN device's own table; NTF_MASTER entries
		// belong to the bridge.
		if n.Flags&netlink.NTF_SELF == 0 || n.Flags&netlink.NTF_MASTER != 0 || len(n.HardwareAddr) != 6 {
			continue
		}
		vtep, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		mac := [6]byte(n.HardwareAddr)
		haveFDB[mac] = append(haveFDB[mac], vtep.Unmap())
	}
	return m.writePeerEntries(ns, vx, set, haveNeigh, haveFDB, keepAll, ch)
}

// writePeerEntries makes the device's entries those set implies, given
// what it holds: its permanent neighbours (IP to MAC) and its own FDB
// entries (MAC to VTEPs; the all-zeros MAC holds the flood list).
func (m *Manager) writePeerEntries(ns *netNS, vx netlink.Link, set *peerSet, haveNeigh map[netip.Addr][6]byte, haveFDB map[[6]byte][]netip.Addr, keepAll bool, ch *Changes) error {
	name := vx.Attrs().Name
	step := m.stepOnce("peers")

	// Remove what is not wanted: neighbours first.
	for ip := range haveNeigh {
		if _, ok := set.byIP[ip]; ok || keepAll {
			continue
		}
		if err := m.delNeigh(ns, vx, ip, ch); err != nil {
			return fmt.Errorf("%q: %w", name, err)
		}
	}
	var zero [6]byte
	for mac, vteps := range haveFDB {
		for _, v := range vteps {
			var keep bool
			if mac == zero {
				keep = set.hasVTEP(v)
			} else {
				want, ok := set.fdbFor(mac)
				keep = ok && want == v && len(vteps) == 1
			}
			if keep || keepAll {
				continue
			}
			if err := m.delFDB(ns, vx, mac, v, ch); err != nil {
				return fmt.Errorf("%q: %w", name, err)
			}
		}
	}

	// Add what is missing: flood destinations, FDB, then neighbours.
	haveFlood := map[netip.Addr]bool{}
	for _, v := range haveFDB[zero] {
		haveFlood[v] = true
	}
	for v := range set.vteps {
		if haveFlood[v] {
			continue
		}
		if err := step(); err != nil {
			return err
		}
		if err := m.appendFlood(ns, vx, v, ch); err != nil {
			return fmt.Errorf("%q: %w", name, err)
		}
	}
	for mac := range set.byMAC {
		want, _ := set.fdbFor(mac)
		if have := haveFDB[mac]; len(have) == 1 && have[0] == want {
			continue
		}
		if err := step(); err != nil {
			return err
		}
		if err := m.setFDB(ns, vx, mac, want, ch); err != nil {
			return fmt.Errorf("%q: %w", name, err)
		}
	}
	for ip := range set.byIP {
		want, _ := set.neighFor(ip)
		if have, ok := haveNeigh[ip]; ok && have == want {
			continue
		}
		if err := step(); err != nil {
			return err
		}
		if err := m.setNeigh(ns, vx, ip, want, ch); err != nil {
			return fmt.Errorf("%q: %w", name, err)
		}
	}
	return nil
}
