package vxlan

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// netNS is one network namespace the Manager programs, with the sockets
// bound to it: the host's (Manager.host, always) or the data plane's
// (Manager.dp, with Config.DataplaneNS; docs/dataplane-namespace.md).
// Every link helper reads and writes through the namespace the link is in:
// a link index names a link of one namespace only.
type netNS struct {
	m    *Manager
	nl   *netlink.Handle
	rt   *routeSocket // the attach path's requests (rtnl.go)
	snap *kernelDump  // Reconcile's dump of this namespace while it runs, nil otherwise; guarded by m.mu
	// fd is the namespace, open: the other namespace's requests name it
	// (IFLA_NET_NS_FD) to create a link here. netns.None() for a Manager
	// without the data-plane namespace.
	fd netns.NsHandle
	// announce sends gratuitous ARPs into this namespace's bridges (nil:
	// none; a Manager made by NewAt).
	announce *announcer
	dp       bool // the data-plane namespace
	// shares are the namespace's neighbour entries of every device by
	// family, from one dump each, that the peer resyncs of its networks
	// share (neighshare.go); guarded by m.mu.
	shares     map[int]*neighShare
	shareDumps int // dumps taken for shares, for tests
}

// where names the namespace in errors and logs.
func (ns *netNS) where() string {
	if ns.dp {
		return "data-plane namespace"
	}
	return "host namespace"
}

// close releases the sockets the Manager opened for the namespace.
func (ns *netNS) close(ownHandle bool) {
	if ns == nil {
		return
	}
	ns.announce.close()
	if ownHandle && ns.nl != nil {
		ns.nl.Close()
	}
	ns.rt.close()
	if ns.fd.IsOpen() {
		ns.fd.Close()
	}
}

// linkByName returns the named link of the namespace, or nil if there is
// none.
func (ns *netNS) linkByName(name string) (netlink.Link, error) {
	if l, ok := ns.snap.link(name); ok {
		return l, nil
	}
	l, err := retryDump(func() (netlink.Link, error) { return ns.nl.LinkByName(name) })
	if isNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get link %q: %w", name, err)
	}
	return l, nil
}

// linkList lists the namespace's links.
func (ns *netNS) linkList() ([]netlink.Link, error) {
	ls, err := retryDump(ns.nl.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	return ls, nil
}

// deleteLink deletes a link; a link that is already gone is success.
// Deleting one end of a veth pair deletes both, wherever the other end is.
//
// Equivalent to: `ip link del <name>`.
func (ns *netNS) deleteLink(l netlink.Link) error {
	ns.snap.forget(l)
	err := ns.nl.LinkDel(l)
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("delete link %q: %w", l.Attrs().Name, err)
	}
	ns.m.log.Debug("link deleted", "link", l.Attrs().Name, "ns", ns.where())
	return nil
}

// deleteLinkByName deletes a link by name; not-found is success, and so is
// a link of another owner, which is left alone. It reports whether a link
// was deleted.
func (ns *netNS) deleteLinkByName(name string) (bool, error) {
	l, err := ns.linkByName(name)
	if err != nil || l == nil || !ns.m.deletable(l) {
		return false, err
	}
	return true, ns.deleteLink(l)
}

// setAlias marks a link as ours, by name: the request needs no index.
//
// Equivalent to: `ip link set <name> alias consul-overlay-<owner>` (alias
// consul-overlay for the default owner).
func (ns *netNS) setAlias(l netlink.Link) error {
	ns.snap.forget(l)
	name := l.Attrs().Name
	if err := ns.rt.setAlias(name, ns.m.mark); err != nil {
		return fmt.Errorf("set alias of %q: %w", name, err)
	}
	ns.m.log.Debug("link alias set", "link", name)
	return nil
}

// setMTU sets a link's MTU.
//
// Equivalent to: `ip link set <name> mtu <mtu>`.
func (ns *netNS) setMTU(l netlink.Link, mtu int) error {
	ns.snap.forget(l)
	if err := ns.nl.LinkSetMTU(l, mtu); err != nil {
		return fmt.Errorf("set mtu of %q to %d: %w", l.Attrs().Name, mtu, err)
	}
	ns.m.log.Debug("link mtu set", "link", l.Attrs().Name, "mtu", mtu)
	return nil
}

// setMaster enslaves a link to a bridge of the same namespace.
//
// Equivalent to: `ip link set <name> master <bridge>`.
func (ns *netNS) setMaster(l, br netlink.Link) error {
	ns.snap.forget(l)
	if err := ns.nl.LinkSetMasterByIndex(l, br.Attrs().Index); err != nil {
		return fmt.Errorf("attach %q to bridge %q: %w", l.Attrs().Name, br.Attrs().Name, err)
	}
	// The link as held now says so too: a peer sync may keep it (its
	// announcements go through the master).
	l.Attrs().MasterIndex = br.Attrs().Index
	ns.m.log.Debug("link attached", "link", l.Attrs().Name, "bridge", br.Attrs().Name)
	return nil
}

// setUp brings a link up.
//
// Equivalent to: `ip link set <name> up`.
func (ns *netNS) setUp(l netlink.Link) error {
	ns.snap.forget(l)
	if err := ns.nl.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %q up: %w", l.Attrs().Name, err)
	}
	ns.m.log.Debug("link up", "link", l.Attrs().Name)
	return nil
}

// namespaces lists the namespaces the Manager programs: the host's, then
// the data plane's if it has one.
func (m *Manager) namespaces() []*netNS {
	if m.dp == nil {
		return []*netNS{m.host}
	}
	return []*netNS{m.host, m.dp}
}

// nsOf returns the namespace that holds, or is to hold, network vni's
// bridge and VXLAN device: the host's if either of them is there (a
// network made before the data-plane namespace was configured keeps its
// layout: the kernel refuses to move a bridge, and rebuilding it would
// take its containers' links down), otherwise the data plane's if the
// Manager has one. Caller holds m.mu.
//
// Equivalent to: `ip link show vxbr-0a1b; ip link show vx-0a1b` in the
// host's namespace.
func (m *Manager) nsOf(vni uint32) (*netNS, error) {
	if m.dp == nil {
		return m.host, nil
	}
	for _, name := range []string{BridgeName(vni), VXLANName(vni)} {
		l, err := m.host.linkByName(name)
		if err != nil {
			return nil, err
		}
		if l != nil {
			return m.host, nil
		}
	}
	return m.dp, nil
}

// awayCheck returns a function that reports whether the container end of
// veth host (a vxh- link of namespace ns, one of links, the namespace's
// dump; endpoint key key) has left the host's namespace, where
// EnsureEndpoint creates it: a container uses it. In the host's namespace
// that is peerAway on the same dump. In the data-plane namespace the
// container end is always elsewhere, so the host's namespace is asked
// whether it still holds it: one more dump, of the host's links.
func (m *Manager) awayCheck(ns *netNS, links []netlink.Link) (func(host netlink.Link, key string) bool, error) {
	if ns.dp {
		hostLinks, err := m.host.linkList()
		if err != nil {
			return nil, err
		}
		links = hostLinks
	}
	names := make(map[int]string, len(links))
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	return func(host netlink.Link, key string) bool {
		// The names come from the dump: no lookup fails.
		away, _ := peerAway(host, key, ns.dp, func(index int) (string, bool, error) {
			name, ok := names[index]
			return name, ok, nil
		})
		return away
	}, nil
}
