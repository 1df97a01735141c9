package vxlan

import (
	"time"

	"github.com/vishvananda/netlink"
)

// neighShareFor is how long one dump of a namespace's neighbour entries
// stands for the devices no write touched since: long enough for the peer
// resyncs of all the host's networks, which the driver starts together,
// short enough that an entry removed by hand meanwhile is seen by the
// next resync.
const neighShareFor = 2 * time.Second

// neighShare is one dump of a namespace's neighbour entries of one family,
// every device's, grouped by device (issue 16, scale). A dump of one
// device's entries costs the kernel a walk of its whole neighbour table
// (NDA_IFINDEX filters what it sends, not what it reads), and on a host
// with many networks each network's resync walked it again; sharing one
// dump makes that one walk for them all.
type neighShare struct {
	at    time.Time
	byIdx map[int][]netlink.Neigh
	stale map[int]bool // devices written since the dump
}

// sharedNeighs returns device idx's neighbour entries of family fam (as
// neighList does), from the namespace's shared dump when it is younger
// than neighShareFor and no write touched the device since; else from a
// new dump of the whole namespace, shared from then on, or, for a device
// written since the dump, from a dump of that device alone. Caller holds
// m.mu.
func (ns *netNS) sharedNeighs(idx, fam int) ([]netlink.Neigh, error) {
	s := ns.shares[fam]
	now := time.Now()
	switch {
	case s != nil && now.Sub(s.at) < neighShareFor && s.stale[idx]:
		return retryDump(func() ([]netlink.Neigh, error) { return ns.neighList(idx, fam) })
	case s != nil && now.Sub(s.at) < neighShareFor:
		return s.byIdx[idx], nil
	}
	all, err := retryDump(func() ([]netlink.Neigh, error) { return ns.nl.NeighList(0, fam) })
	if err != nil {
		return nil, err
	}
	ns.shareDumps++
	s = &neighShare{at: now, byIdx: map[int][]netlink.Neigh{}, stale: map[int]bool{}}
	for _, n := range all {
		s.byIdx[n.LinkIndex] = append(s.byIdx[n.LinkIndex], n)
	}
	if ns.shares == nil {
		ns.shares = map[int]*neighShare{}
	}
	ns.shares[fam] = s
	// Past its life the dump serves nothing, yet it would hold every
	// device's entries and the netlink buffers they were parsed from
	// (some 0.7 MiB with 1,000 peers) until the next resync: it is
	// dropped when its life ends.
	time.AfterFunc(neighShareFor, func() { ns.dropShare(fam, s) })
	return s.byIdx[idx], nil
}

// dropShare forgets the shared dump s of family fam unless a newer one
// has replaced it.
func (ns *netNS) dropShare(fam int, s *neighShare) {
	ns.m.mu.Lock()
	defer ns.m.mu.Unlock()
	if ns.shares[fam] == s {
		delete(ns.shares, fam)
	}
}

// forgetShared marks device idx's entries in the shared dumps as stale: a
// write to it is coming. Caller holds m.mu.
func (ns *netNS) forgetShared(idx int) {
	for _, s := range ns.shares {
		s.stale[idx] = true
	}
}
