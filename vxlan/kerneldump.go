package vxlan

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// kernelDump is one dump of the namespace's links, addresses, neighbour
// entries and FDB entries, taken by Reconcile for every network at once
// (issue 16: with 100 networks, reading each device's tables on its own
// dumped the kernel's whole neighbour and FDB tables 300 times, about 1 s
// of a restart).
//
// It stands for the kernel only until Manager writes to an object: every
// link write forgets the link (and with it its tables), every address
// write forgets the link's addresses, so a later read of that object asks
// the kernel, as it did without a snapshot. A link the snapshot does not
// hold is looked up in the kernel too (one created since). Caller holds
// m.mu for the snapshot's whole life. Each namespace has its own
// (netNS.snap).
type kernelDump struct {
	links  map[string]netlink.Link // by name
	valid  map[int]bool            // link indexes whose tables still stand for the kernel
	addrs  map[int][]netlink.Addr  // by link index, every family
	neighs map[int][]netlink.Neigh // by link index, IPv4 and IPv6
	fdb    map[int][]netlink.Neigh // by link index, AF_BRIDGE
	addrOK map[int]bool            // link indexes whose addresses still stand for the kernel
}

// dumpKernel dumps namespace ns's tables: links (links, when the
// caller already listed them), addresses, neighbours and FDB, one dump
// each.
//
// Equivalent to: `ip -d link show`, `ip addr show`, `ip neigh show` and
// `bridge fdb show`, once each.
func (ns *netNS) dumpKernel(links []netlink.Link) (*kernelDump, error) {
	if links == nil {
		var err error
		if links, err = ns.linkList(); err != nil {
			return nil, err
		}
	}
	s := &kernelDump{
		links:  make(map[string]netlink.Link, len(links)),
		valid:  make(map[int]bool, len(links)),
		addrs:  map[int][]netlink.Addr{},
		neighs: map[int][]netlink.Neigh{},
		fdb:    map[int][]netlink.Neigh{},
		addrOK: make(map[int]bool, len(links)),
	}
	for _, l := range links {
		a := l.Attrs()
		s.links[a.Name] = l
		s.valid[a.Index] = true
		s.addrOK[a.Index] = true
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return ns.nl.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		s.addrs[a.LinkIndex] = append(s.addrs[a.LinkIndex], a)
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		ns, err := retryDump(func() ([]netlink.Neigh, error) { return ns.nl.NeighList(0, fam) })
		if err != nil {
			return nil, fmt.Errorf("list neighbours: %w", err)
		}
		for _, n := range ns {
			s.neighs[n.LinkIndex] = append(s.neighs[n.LinkIndex], n)
		}
	}
	fdb, err := retryDump(func() ([]netlink.Neigh, error) { return ns.nl.NeighList(0, unix.AF_BRIDGE) })
	if err != nil {
		return nil, fmt.Errorf("list fdb: %w", err)
	}
	for _, n := range fdb {
		s.fdb[n.LinkIndex] = append(s.fdb[n.LinkIndex], n)
	}
	return s, nil
}

// link returns the snapshot's link of the name; ok is false when the
// snapshot does not know it (never held, or forgotten).
func (s *kernelDump) link(name string) (l netlink.Link, ok bool) {
	if s == nil {
		return nil, false
	}
	l, ok = s.links[name]
	return l, ok
}

// forget drops a link the Manager is writing to: it is read from the
// kernel from then on.
func (s *kernelDump) forget(l netlink.Link) {
	if s == nil || l == nil {
		return
	}
	a := l.Attrs()
	if held, ok := s.links[a.Name]; ok {
		delete(s.valid, held.Attrs().Index)
		delete(s.addrOK, held.Attrs().Index)
	}
	delete(s.links, a.Name)
	delete(s.valid, a.Index)
	delete(s.addrOK, a.Index)
}

// forgetEntries drops the neighbour and FDB entries of a link the Manager
// writes one to.
func (s *kernelDump) forgetEntries(l netlink.Link) {
	if s != nil && l != nil {
		delete(s.valid, l.Attrs().Index)
	}
}

// forgetAddrs drops the addresses of a link the Manager writes one to.
func (s *kernelDump) forgetAddrs(l netlink.Link) {
	if s != nil && l != nil {
		delete(s.addrOK, l.Attrs().Index)
	}
}

// addrList returns the snapshot's addresses of l of family (FAMILY_ALL,
// FAMILY_V4 or FAMILY_V6), filtered as AddrList(l, family) filters;
// ok is false when the snapshot does not stand for them.
func (s *kernelDump) addrList(l netlink.Link, family int) (out []netlink.Addr, ok bool) {
	if s == nil || !s.addrOK[l.Attrs().Index] {
		return nil, false
	}
	for _, a := range s.addrs[l.Attrs().Index] {
		fam := netlink.FAMILY_V6
		if a.IP.To4() != nil {
			fam = netlink.FAMILY_V4
		}
		if family != netlink.FAMILY_ALL && fam != family {
			continue
		}
		out = append(out, a)
	}
	return out, true
}

// entries returns the snapshot's neighbour entries of link index idx of
// family (FAMILY_V4, FAMILY_V6 or AF_BRIDGE), as NeighList(idx, family)
// returns them; ok is false when the snapshot does not stand for them.
func (s *kernelDump) entries(idx, family int) (out []netlink.Neigh, ok bool) {
	if s == nil || !s.valid[idx] {
		return nil, false
	}
	if family == unix.AF_BRIDGE {
		return s.fdb[idx], true
	}
	for _, n := range s.neighs[idx] {
		if n.Family == family {
			out = append(out, n)
		}
	}
	return out, true
}
