package cluster

import (
	"net"
	"net/netip"
	"slices"
	"strings"
)

// A peer watch's delivery as a difference (issue 16, scale).
//
// At 50 hosts of 20 endpoints a network has a thousand peers, and every
// change of one host's endpoints made every other host derive, sort and
// compare all of them, then hand them all to the data plane, which
// compared them again: per change each host's work grew with the network.
// PeerWatch.Next now follows the data plane entries the peers give (an
// address, a MAC and a VTEP: what the kernel's neighbour and FDB entries
// hold) with a count of the peers that give each, and a snapshot that
// changed some hosts' peer records changes the counts by those records'
// peers only. Delta is what appeared and what went; Peers builds the whole
// list only when asked (a resync, a retry).

// dpEntry is what a peer programs in the data plane. An Ethernet MAC is
// held in mac6 (is6), any other length in mac: made at every change for
// each peer of the records that changed, an entry then allocates nothing.
type dpEntry struct {
	ip   netip.Addr
	is6  bool
	mac6 [6]byte
	mac  string
	vtep netip.Addr
}

func entryOf(p Peer) dpEntry {
	e := dpEntry{ip: p.IP, vtep: p.VTEP}
	if e.is6 = len(p.MAC) == len(e.mac6); e.is6 {
		copy(e.mac6[:], p.MAC)
	} else {
		e.mac = string(p.MAC)
	}
	return e
}

// hwaddr is the entry's MAC.
func (e dpEntry) hwaddr() net.HardwareAddr {
	if e.is6 {
		return net.HardwareAddr(e.mac6[:])
	}
	return net.HardwareAddr(e.mac)
}

// PeerDelta is how the data plane entries of a watch's peers changed since
// its last delivery: Removed are entries no peer gives any more, Added
// entries no peer gave before, each given by one peer that gave or gives
// it. An entry several peers give (two records listing one address, MAC
// and VTEP) goes only with the last of them. Added keeps the order of the
// peers that brought the entries.
type PeerDelta struct {
	Removed, Added []Peer
}

// deltaBase says that the entries account for every peer record scanned
// so far under the config of configIndex: the next snapshot's changed
// records alone change them.
type deltaBase struct {
	valid       bool
	configIndex uint64
}

// Delta is how the last Next's peers differ from those before it.
func (w *PeerWatch) Delta() PeerDelta { return w.delta }

// Peers are the peers the last Next computed, sorted as DesiredPeers
// sorts them. The list is built at the first call after a change and
// shared: do not modify it.
func (w *PeerWatch) Peers() []Peer {
	if !w.fullOK {
		w.full, w.fullOK = w.dec.list(w.hosts), true
	}
	return w.full
}

// VTEPs are the underlay addresses of the last Next's peers, a new map at
// every call.
func (w *PeerWatch) VTEPs() map[netip.Addr]bool {
	out := make(map[netip.Addr]bool, len(w.vteps))
	for v := range w.vteps {
		out[v] = true
	}
	return out
}

// SameVTEPs says whether set is VTEPs (without making it).
func (w *PeerWatch) SameVTEPs(set map[netip.Addr]bool) bool {
	if len(set) != len(w.vteps) {
		return false
	}
	for v := range w.vteps {
		if !set[v] {
			return false
		}
	}
	return true
}

// resetTo makes peers the watch's peers, counted again from the list, and
// the delta the difference with the entries before. hosts are the members
// the list was built from (compact), kept for Peers.
func (w *PeerWatch) resetTo(peers []Peer, hosts []string) {
	before := w.entries
	w.entries = make(map[dpEntry]int, len(peers))
	w.vteps = map[netip.Addr]int{}
	w.delta = PeerDelta{}
	for _, p := range peers {
		e := entryOf(p)
		if w.entries[e]++; w.entries[e] == 1 {
			w.vteps[p.VTEP]++
			if before[e] == 0 {
				w.delta.Added = append(w.delta.Added, p)
			}
		}
	}
	for e := range before {
		if w.entries[e] == 0 {
			w.delta.Removed = append(w.delta.Removed, Peer{IP: e.ip, MAC: e.hwaddr(), VTEP: e.vtep})
		}
	}
	w.full, w.fullOK, w.hosts = peers, true, hosts
}

// advance changes the entries by the peer records the last scan found
// changed: the old peers of each member's record go, its new ones come.
// Caller checked that every member has a valid peer record.
func (w *PeerWatch) advance(rec Network, hosts []string) {
	w.delta = PeerDelta{}
	self, pprefix := w.c.cfg.HostID, peersPrefix(w.key)
	type hostChange struct {
		host     string
		old, new []Peer
	}
	var changed []hostChange
	for k, old := range w.dec.changed {
		h := strings.TrimPrefix(k, pprefix)
		if _, member := rec.Hosts[h]; member && h != self {
			changed = append(changed, hostChange{host: h, old: old, new: w.dec.hostPeers(h)})
		}
	}
	if len(changed) == 0 {
		return
	}
	slices.SortFunc(changed, func(a, b hostChange) int { return strings.Compare(a.host, b.host) })
	// The peers a record lists before and after its change are mostly
	// the same, in the same order: those at both ends that give the same
	// entries change no count and are left out.
	for i, c := range changed {
		for len(c.old) > 0 && len(c.new) > 0 && entryOf(c.old[0]) == entryOf(c.new[0]) {
			c.old, c.new = c.old[1:], c.new[1:]
		}
		for len(c.old) > 0 && len(c.new) > 0 && entryOf(c.old[len(c.old)-1]) == entryOf(c.new[len(c.new)-1]) {
			c.old, c.new = c.old[:len(c.old)-1], c.new[:len(c.new)-1]
		}
		changed[i] = c
	}
	// An entry's count before the change, for each entry it touches.
	n := 0
	for _, c := range changed {
		n += len(c.old) + len(c.new)
	}
	touched := make(map[dpEntry]int, n)
	count := func(ps []Peer, by int) {
		for _, p := range ps {
			e := entryOf(p)
			if _, ok := touched[e]; !ok {
				touched[e] = w.entries[e]
			}
			if w.entries[e] += by; w.entries[e] <= 0 {
				delete(w.entries, e)
			}
		}
	}
	for _, c := range changed {
		count(c.old, -1)
	}
	for _, c := range changed {
		count(c.new, +1)
	}
	// In the order of the peers: what went, then what came.
	for _, c := range changed {
		for _, p := range c.old {
			e := entryOf(p)
			if n, ok := touched[e]; ok && n > 0 && w.entries[e] == 0 {
				w.delta.Removed = append(w.delta.Removed, p)
				w.vtepGone(p.VTEP)
				delete(touched, e)
			}
		}
	}
	for _, c := range changed {
		for _, p := range c.new {
			e := entryOf(p)
			if n, ok := touched[e]; ok && n == 0 && w.entries[e] > 0 {
				w.delta.Added = append(w.delta.Added, p)
				w.vteps[p.VTEP]++
				delete(touched, e)
			}
		}
	}
	w.full, w.fullOK, w.hosts = nil, false, hosts
}

func (w *PeerWatch) vtepGone(v netip.Addr) {
	if w.vteps[v]--; w.vteps[v] <= 0 {
		delete(w.vteps, v)
	}
}
