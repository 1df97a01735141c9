package testenv

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// UnderlayOptions shape the network NewUnderlay builds.
type UnderlayOptions struct {
	// IPv6 gives the hosts IPv6 underlay addresses (2001:db8::/64) instead
	// of IPv4 ones (192.0.2.0/24).
	IPv6 bool
	// MTU of the hosts' underlay links (0: 1500).
	MTU int
	// Forwarding turns IPv4 forwarding on in each host
	// (net.ipv4.ip_forward=1), as dockerd does on a real host; the
	// plugin's new networks then get their default egress, auto, as
	// there.
	Forwarding bool
}

// Host is one simulated machine: a network namespace joined to the
// underlay.
type Host struct {
	NS   *NetNS
	Addr netip.Addr // underlay address, the host's VTEP
	Link string     // name of the underlay link in NS ("ul0")
}

// UnderlayLink is the name of each host's underlay link.
const UnderlayLink = "ul0"

// NewUnderlay builds n hosts joined by a switch: a namespace holding a
// bridge, and per host a namespace with a veth into that bridge carrying
// the host's address (documentation ranges, only ever inside the test's
// namespaces). Host i (from 0) gets 192.0.2.(i+1) or 2001:db8::(i+1).
// Everything is removed when the test ends.
func NewUnderlay(t testing.TB, n int, opts UnderlayOptions) []*Host {
	t.Helper()
	if opts.MTU == 0 {
		opts.MTU = 1500
	}
	sw := NewNetNS(t)
	swh := sw.Handle()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "sw0", MTU: opts.MTU}}
	if err := swh.LinkAdd(br); err != nil {
		t.Fatalf("create switch bridge: %v", err)
	}
	if err := swh.LinkSetUp(br); err != nil {
		t.Fatalf("set switch bridge up: %v", err)
	}
	swfd, err := netns.GetFromPath(sw.Path)
	if err != nil {
		t.Fatalf("open switch namespace: %v", err)
	}
	defer swfd.Close()

	hosts := make([]*Host, n)
	for i := range hosts {
		h := &Host{NS: NewNetNS(t), Link: UnderlayLink}
		if opts.IPv6 {
			h.Addr = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i + 1)})
		} else {
			h.Addr = netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)})
		}
		port := fmt.Sprintf("port%d", i)
		if err := plugHost(h, port, opts.MTU, swh, int(swfd)); err != nil {
			t.Fatalf("join host %d (%s) to the underlay: %v", i, h.Addr, err)
		}
		if opts.Forwarding {
			h.NS.MustRun(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		}
		hosts[i] = h
	}
	return hosts
}

// plugHost makes the veth ul0 (in the host) / port (in the switch), puts
// the host's address on ul0 and attaches port to the switch bridge.
func plugHost(h *Host, port string, mtu int, swh *netlink.Handle, swfd int) error {
	hh := h.NS.Handle()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: h.Link, MTU: mtu},
		PeerName:      port,
		PeerMTU:       uint32(mtu),
		PeerNamespace: netlink.NsFd(swfd),
	}
	if err := hh.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth: %w", err)
	}
	p, err := swh.LinkByName(port)
	if err != nil {
		return err
	}
	sw, err := swh.LinkByName("sw0")
	if err != nil {
		return err
	}
	if err := swh.LinkSetMaster(p, sw); err != nil {
		return err
	}
	if err := swh.LinkSetUp(p); err != nil {
		return err
	}
	bits := 24
	if h.Addr.Is6() {
		bits = 64
	}
	ul, err := hh.LinkByName(h.Link)
	if err != nil {
		return err
	}
	if err := addAddr(hh, ul, netip.PrefixFrom(h.Addr, bits)); err != nil {
		return err
	}
	return hh.LinkSetUp(ul)
}

// addAddr adds an address; IPv6 skips duplicate address detection so the
// address is usable at once.
func addAddr(h *netlink.Handle, l netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(l, a); err != nil {
		return fmt.Errorf("add %s to %s: %w", p, l.Attrs().Name, err)
	}
	return nil
}

// MoveAndConfigure plays Docker's part at Join: it moves the link ifname
// from one namespace into another (a container), renames it newName, adds
// the addresses, brings it up and adds a default route via each gateway.
func MoveAndConfigure(from, to *NetNS, ifname, newName string, addrs []netip.Prefix, gateways ...netip.Addr) error {
	if err := moveLink(from, to, ifname); err != nil {
		return err
	}
	h := to.Handle()
	l, err := h.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", ifname, to.Name, err)
	}
	if newName != "" && newName != ifname {
		if err := h.LinkSetName(l, newName); err != nil {
			return fmt.Errorf("rename %s to %s: %w", ifname, newName, err)
		}
	}
	for _, p := range addrs {
		if err := addAddr(h, l, p); err != nil {
			return err
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", newName, err)
	}
	for _, gw := range gateways {
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw.AsSlice()}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	return nil
}

// MoveBack plays Docker's part at Leave: it takes the link ifname down in
// its namespace, renames it newName and moves it to another namespace
// (the host's), where the driver deletes it.
func MoveBack(from, to *NetNS, ifname, newName string) error {
	h := from.Handle()
	l, err := h.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", ifname, from.Name, err)
	}
	if err := h.LinkSetDown(l); err != nil {
		return fmt.Errorf("set %s down: %w", ifname, err)
	}
	if newName != "" && newName != ifname {
		if err := h.LinkSetName(l, newName); err != nil {
			return fmt.Errorf("rename %s to %s: %w", ifname, newName, err)
		}
		ifname = newName
	}
	return moveLink(from, to, ifname)
}

// moveLink moves a link by name between namespaces.
func moveLink(from, to *NetNS, ifname string) error {
	l, err := from.Handle().LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", ifname, from.Name, err)
	}
	fd, err := netns.GetFromPath(to.Path)
	if err != nil {
		return fmt.Errorf("open %s: %w", to.Path, err)
	}
	defer fd.Close()
	if err := from.Handle().LinkSetNsFd(l, int(fd)); err != nil {
		return fmt.Errorf("move %s from %s to %s: %w", ifname, from.Name, to.Name, err)
	}
	return nil
}
