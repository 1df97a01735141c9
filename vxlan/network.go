package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Steps of the network create path, in order, for fault injection.
var networkSteps = []string{
	"bridge", "bridge-alias", "bridge-addr", "bridge-up",
	"vxlan", "vxlan-alias", "vxlan-master", "vxlan-up",
	"firewall", "peers",
}

// Steps the data-plane layout adds, after "vxlan-up"; "bridge-addr" is
// then the gateway link's.
var gatewaySteps = []string{"gateway", "gateway-alias"}

// EnsureNetwork makes the network's bridge and VXLAN device exist, match n
// and be up, installs its firewall rules and programs the peers already
// known for its VNI. A device that already matches is kept as it is, so
// calling it again never disturbs traffic: an MTU lower than the
// bridge's is not applied while a running container's veth is on the
// bridge (keptMTU; logged at error level), and NetworkInfo.MTU is the MTU
// in force. If a step fails, whatever this call created is removed again,
// the firewall rules it added included.
func (m *Manager) EnsureNetwork(ctx context.Context, n Network) (NetworkInfo, error) {
	if err := validVNI(n.VNI); err != nil {
		return NetworkInfo{}, fmt.Errorf("ensure network: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.egressRefused(n); err != nil {
		return NetworkInfo{}, fmt.Errorf("ensure network (vni %d): %w", n.VNI, err)
	}
	var ch Changes
	info, err := m.ensureNetwork(ctx, n, false, &ch)
	if err != nil {
		return NetworkInfo{}, err
	}
	if ch.Total() > 0 {
		m.log.Info("network ensured", "vni", n.VNI, "link", info.VXLAN, "bridge", info.Bridge, "mtu", info.MTU, "changes", ch.Total())
	}
	return info, nil
}

// egressRefused says why network n, which has Egress, cannot have it on
// this host; nil when it can, or has none. Caller holds m.mu.
func (m *Manager) egressRefused(n Network) error {
	if !n.Egress {
		return nil
	}
	if n.Internal {
		return errors.New("egress on an internal network: an internal network has no way out")
	}
	ns, err := m.nsOf(n.VNI)
	if err != nil {
		return err
	}
	return m.egressBlocked(ns.dp)
}

// EgressBlocked says why a network created now could not have Egress on
// this host (its bridge goes where the data-plane namespace setting puts
// new networks); nil when it could. The driver asks it to choose a new
// network's default egress.
func (m *Manager) EgressBlocked() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.egressBlocked(m.dp != nil)
}

// egressBlocked says why a network whose bridge is in the data-plane
// namespace (dp) or in the host's cannot have Egress on this host; nil
// when it can.
func (m *Manager) egressBlocked(dp bool) error {
	switch {
	case !m.fw.enabled():
		return errors.New("egress without iptables: the masquerade and forwarding rules need it")
	case m.fw.notrack && !dp:
		return errors.New("egress with bridged traffic untracked (BRIDGE_CONNTRACK=false): the masquerade needs it tracked")
	case m.cfg.Sysctl != "-" && forwardingOff(m.cfg.Sysctl):
		return errors.New("egress with IPv4 forwarding off (net.ipv4.ip_forward=0): dockerd turns it on unless started with --ip-forward=false")
	}
	return nil
}

// ensureNetwork is EnsureNetwork with m.mu held, counting into ch. With
// keepEntries it adds the missing neighbour and FDB entries of the peers
// but removes none (Reconcile with KeepStrays).
func (m *Manager) ensureNetwork(ctx context.Context, n Network, keepEntries bool, ch *Changes) (info NetworkInfo, retErr error) {
	return m.ensureNetworkFW(ctx, n, keepEntries, false, ch)
}

// ensureNetworkFW is ensureNetwork; with fwDone the caller has already
// synced the firewall for n (Reconcile, once for every network).
func (m *Manager) ensureNetworkFW(ctx context.Context, n Network, keepEntries, fwDone bool, ch *Changes) (info NetworkInfo, retErr error) {
	mtu := m.networkMTU(n)
	if mtu < minMTU {
		return info, fmt.Errorf("ensure network (vni %d): mtu %d below %d", n.VNI, mtu, minMTU)
	}
	info = NetworkInfo{Bridge: BridgeName(n.VNI), VXLAN: VXLANName(n.VNI), MTU: mtu}
	ns, err := m.nsOf(n.VNI)
	if err != nil {
		return info, fmt.Errorf("ensure network (vni %d): %w", n.VNI, err)
	}
	if ns.dp {
		info.Gateway = GatewayName(n.VNI)
	}

	var undo []func() error
	defer func() {
		if retErr == nil {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			if err := undo[i](); err != nil {
				retErr = errors.Join(retErr, fmt.Errorf("undo: %w", err))
			}
		}
	}()
	// The firewall first: the underlay filter must be in place before any
	// VXLAN device exists, and the bridge's rules need no bridge. One
	// listing and at most one transaction per command.
	if m.fw.enabled() && !fwDone {
		existing, err := ns.linkByName(info.Bridge)
		if err != nil {
			return info, err
		}
		// Another owner's network: no rule of ours for it either.
		for _, name := range []string{info.Bridge, info.VXLAN, info.Gateway} {
			l, lns := existing, ns
			if name == "" {
				continue
			}
			if name == info.Gateway {
				lns = m.host
			}
			if name != info.Bridge {
				if l, err = lns.linkByName(name); err != nil {
					return info, err
				}
			}
			if l != nil {
				if err := m.foreign(l); err != nil {
					return info, fmt.Errorf("ensure network (vni %d): %w", n.VNI, err)
				}
			}
		}
		if err := m.step("firewall"); err != nil {
			return info, err
		}
		// Last undo: rules are undone only for a bridge this call
		// creates: on an existing network they protect running
		// containers. The shared rules go if no bridge of ours is left,
		// and the underlay rules this call added (a peer's VTEP, the drop
		// rule of a first network) go too; those that were there stay.
		var added underlayAdded
		if existing == nil {
			undo = append(undo, func() error {
				ctx := context.WithoutCancel(ctx)
				err := m.releaseFirewall(ctx, n.VNI, ch)
				k, uerr := m.fw.removeUnderlay(ctx, m.cfg.Port, m.cfg.VTEP.Is6(), added)
				ch.Rules += k
				if uerr != nil {
					uerr = fmt.Errorf("firewall rules of %q: %w", info.Bridge, uerr)
				}
				return errors.Join(err, uerr)
			})
		}
		if m.cfg.LinkLocal.IsValid() {
			if err := m.step("firewall-linklocal"); err != nil {
				return info, err
			}
		}
		iface := info.Bridge
		if ns.dp {
			iface = info.Gateway
		}
		s := m.fwSpec(map[string]Network{iface: n}, sharedWant)
		s.underlay, s.added = true, &added
		k, err := m.fw.sync(ctx, s)
		ch.Rules += k
		if err != nil {
			return info, fmt.Errorf("firewall of %q (vni %d): %w", info.Bridge, n.VNI, err)
		}
	}

	if n.Encrypted { // before any VXLAN device exists: no plain packet
		wasEncrypted := m.sec.encrypted[n.VNI]
		if err := m.ensureIPsecNetwork(ctx, n.VNI, ch); err != nil {
			return info, err
		}
		if !wasEncrypted {
			undo = append(undo, func() error { return m.dropIPsecNetwork(context.WithoutCancel(ctx), n.VNI, ch) })
		}
	}

	kept, err := m.keptMTU(ns, info.Bridge, mtu)
	if err != nil {
		return info, fmt.Errorf("ensure network (vni %d): %w", n.VNI, err)
	}
	if kept != mtu {
		m.log.Error("network mtu not lowered: running containers use the network on this host; it takes effect once none does",
			"vni", n.VNI, "link", info.Bridge, "asked_mtu", mtu, "kept_mtu", kept)
		mtu, info.MTU = kept, kept
	}
	br, created, err := m.ensureBridge(ns, n, mtu, ch)
	if created {
		undo = append(undo, func() error { return ns.deleteLink(br) })
	}
	if err != nil {
		return info, err
	}
	vx, vxCreated, err := m.ensureVXLAN(ns, n.VNI, mtu, br, ch)
	if vxCreated {
		undo = append(undo, func() error { return ns.deleteLink(vx) })
	}
	if err != nil {
		return info, err
	}
	// The link that carries the host's addresses on the network: the
	// bridge, or in the data-plane namespace the gateway pair's host end.
	gw := br
	if ns.dp {
		g, gwCreated, err := m.ensureGateway(n, mtu, br, ch)
		if gwCreated {
			// By name: deleting either end deletes the pair.
			undo = append(undo, func() error { _, err := m.host.deleteLinkByName(info.Gateway); return err })
		}
		if err != nil {
			return info, err
		}
		gw = g
	}
	if err := m.ensureLinkLocal(gw, ch); err != nil {
		return info, err
	}
	if err := m.syncPeerEntries(ns, vx, n.VNI, keepEntries, false, ch); err != nil {
		return info, err
	}
	if n.Encrypted {
		if err := m.syncXfrm(ch); err != nil {
			return info, fmt.Errorf("ensure network (vni %d): %w", n.VNI, err)
		}
	}
	return info, nil
}

// keptMTU is the MTU the network's links get when mtu is asked: mtu,
// unless it is lower than the MTU of the existing bridge br and a running
// container's veth is on it. Then the bridge's MTU is kept: the
// container's end keeps the larger MTU it was created with, and frames of
// that size would be dropped at the lowered bridge and VXLAN device. A
// veth whose container end is still in this namespace belongs to no
// running container. Caller holds m.mu.
//
// Equivalent to: `ip -d link show master vxbr-0a1b` and looking for
// vxh-* links whose peer is in another namespace ("link-netnsid").
func (m *Manager) keptMTU(ns *netNS, br string, mtu int) (int, error) {
	l, err := ns.linkByName(br)
	if err != nil || l == nil || m.foreign(l) != nil || l.Attrs().MTU <= mtu {
		return mtu, err
	}
	links, err := ns.linkList()
	if err != nil {
		return mtu, err
	}
	away, err := m.awayCheck(ns, links)
	if err != nil {
		return mtu, err
	}
	for _, p := range links {
		key, ok := strings.CutPrefix(p.Attrs().Name, hostPrefix)
		if !ok || p.Attrs().MasterIndex != l.Attrs().Index || p.Type() != "veth" || m.foreign(p) != nil {
			continue
		}
		if away(p, key) {
			return l.Attrs().MTU, nil
		}
	}
	return mtu, nil
}

// ensureBridge makes the network's bridge exist in namespace ns with our
// alias, the MTU, exactly the gateway addresses (none in the data-plane
// namespace: the gateway link carries them), and up. created reports
// whether this call created it (br is then set even on error, for the
// undo). A link of the name that carries another owner's mark is left
// alone: *ForeignLinkError.
//
// Equivalent to: `ip link add vxbr-0a1b type bridge && ip link set vxbr-0a1b
// alias consul-overlay-<owner> && ip addr replace 10.10.0.1/24 dev vxbr-0a1b && ip
// link set vxbr-0a1b up`.
func (m *Manager) ensureBridge(ns *netNS, n Network, mtu int, ch *Changes) (br netlink.Link, created bool, err error) {
	name := BridgeName(n.VNI)
	br, err = ns.linkByName(name)
	if err != nil {
		return nil, false, err
	}
	if br != nil {
		if err := m.foreign(br); err != nil {
			return nil, false, fmt.Errorf("ensure bridge (vni %d): %w", n.VNI, err)
		}
	}
	if br != nil && br.Type() != "bridge" {
		m.log.Warn("replacing link that is not a bridge", "link", name, "type", br.Type(), "vni", n.VNI)
		if err := ns.deleteLink(br); err != nil {
			return nil, false, err
		}
		ch.Links++
		br = nil
	}
	if br == nil {
		if err := m.step("bridge"); err != nil {
			return nil, false, err
		}
		// A fixed MAC: otherwise the bridge takes the lowest port MAC and
		// changes it as endpoints come and go, staling ARP caches.
		la := netlink.LinkAttrs{Name: name, MTU: mtu, HardwareAddr: randomMAC()}
		if err := ns.nl.LinkAdd(&netlink.Bridge{LinkAttrs: la}); err != nil {
			return nil, false, fmt.Errorf("create bridge %q (vni %d): %w", name, n.VNI, err)
		}
		ch.Links++
		m.log.Debug("bridge created", "link", name, "vni", n.VNI)
		if br, err = ns.linkByName(name); err != nil || br == nil {
			return nil, false, fmt.Errorf("create bridge %q (vni %d): gone after creation: %w", name, n.VNI, err)
		}
		created = true
	}
	if !m.owns(br) {
		if err := m.step("bridge-alias"); err != nil {
			return br, created, err
		}
		if err := ns.setAlias(br); err != nil {
			return br, created, err
		}
		ch.LinkAttrs++
	}
	if br.Attrs().MTU != mtu {
		if err := ns.setMTU(br, mtu); err != nil {
			return br, created, err
		}
		ch.LinkAttrs++
	}
	gateways := n.Gateways
	if ns.dp {
		gateways = nil
	}
	if err := m.syncBridgeAddrs(ns, br, gateways, ch); err != nil {
		return br, created, err
	}
	if !isUp(br) {
		if err := m.step("bridge-up"); err != nil {
			return br, created, err
		}
		if err := ns.setUp(br); err != nil {
			return br, created, err
		}
		ch.LinkAttrs++
	}
	return br, created, nil
}

// syncBridgeAddrs makes the global addresses of br, the bridge or the
// gateway link of a network, in namespace ns, exactly want. IPv6 addresses
// skip duplicate address detection: the link is the only holder of its
// gateway address.
//
// Equivalent to: `ip addr replace <gw> dev vxbr-0a1b nodad` and `ip addr
// del <other> dev vxbr-0a1b`.
func (m *Manager) syncBridgeAddrs(ns *netNS, br netlink.Link, want []netip.Prefix, ch *Changes) error {
	name := br.Attrs().Name
	have, ok := ns.snap.addrList(br, netlink.FAMILY_ALL)
	if !ok {
		var err error
		if have, err = retryDump(func() ([]netlink.Addr, error) { return ns.nl.AddrList(br, netlink.FAMILY_ALL) }); err != nil {
			return fmt.Errorf("list addresses of %q: %w", name, err)
		}
	}
	present := map[netip.Prefix]bool{}
	for _, a := range have {
		p, ok := prefixOf(a.IPNet)
		if !ok || p.Addr().IsLinkLocalUnicast() || a.Label == linkLocalLabel(name) {
			continue // the well-known address: syncLinkLocalAddr
		}
		if slices.Contains(want, p) {
			present[p] = true
			continue
		}
		ns.snap.forgetAddrs(br)
		if err := ns.nl.AddrDel(br, &a); err != nil && !isNotFound(err) && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("remove address %s from %q: %w", p, name, err)
		}
		ch.Addrs++
		m.log.Debug("bridge address removed", "link", name, "addr", p)
	}
	for _, p := range want {
		if present[p] {
			continue
		}
		if err := m.step("bridge-addr"); err != nil {
			return err
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		ns.snap.forgetAddrs(br)
		if err := ns.nl.AddrReplace(br, a); err != nil {
			return fmt.Errorf("add address %s to %q: %w", p, name, err)
		}
		present[p] = true
		ch.Addrs++
		m.log.Debug("bridge address added", "link", name, "addr", p)
	}
	return nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), ones), true
}

// vxlanMismatch says how an existing VXLAN device differs from what we
// want, or "" if it matches. dp: the device is in the data-plane
// namespace, where its UDP socket must still be the host's.
func (m *Manager) vxlanMismatch(l netlink.Link, vni uint32, dp bool) string {
	vx, ok := l.(*netlink.Vxlan)
	if !ok {
		return fmt.Sprintf("type %s, want vxlan", l.Type())
	}
	src, _ := netip.AddrFromSlice(vx.SrcAddr)
	switch {
	case vx.VxlanId != int(vni):
		return fmt.Sprintf("vni %d, want %d", vx.VxlanId, vni)
	case vx.Port != m.cfg.Port:
		return fmt.Sprintf("port %d, want %d", vx.Port, m.cfg.Port)
	case src.Unmap() != m.cfg.VTEP:
		return fmt.Sprintf("local %v, want %s", vx.SrcAddr, m.cfg.VTEP)
	case vx.Learning:
		return "learning on, want off"
	case !vx.Proxy:
		return "proxy off, want on"
	case vx.VtepDevIndex != 0:
		return fmt.Sprintf("bound to link %d, want unbound", vx.VtepDevIndex)
	case dp && vx.NetNsID < 0:
		// IFLA_LINK_NETNSID: the kernel names the namespace of the
		// device's UDP socket only when it is not the device's own.
		return "udp socket in the data-plane namespace, want the host's"
	}
	return ""
}

// ensureVXLAN makes the network's VXLAN device exist in namespace ns,
// always created by a request on the host's socket, so that its UDP socket
// is the host's (in the data-plane namespace: `ip link add vx-0a1b netns
// DP type vxlan ...` run in the host's namespace), with the right VNI,
// port and source, learning off and ARP/ND proxy on, enslaved to br and
// up. A device with the wrong identity is replaced; MTU, master and up are
// fixed in place. created reports whether this call created it. A device
// of another owner is never touched: *ForeignLinkError.
//
// Equivalent to: `ip link add vx-0a1b type vxlan id 2587 local 192.0.2.11
// dstport 4789 nolearning proxy && ip link set vx-0a1b alias
// consul-overlay-<owner> master vxbr-0a1b up`.
func (m *Manager) ensureVXLAN(ns *netNS, vni uint32, mtu int, br netlink.Link, ch *Changes) (vx netlink.Link, created bool, err error) {
	name := VXLANName(vni)
	vx, err = ns.linkByName(name)
	if err != nil {
		return nil, false, err
	}
	if vx != nil {
		if err := m.foreign(vx); err != nil {
			return nil, false, fmt.Errorf("ensure vxlan (vni %d): %w", vni, err)
		}
		if diff := m.vxlanMismatch(vx, vni, ns.dp); diff != "" {
			m.log.Warn("replacing vxlan device", "link", name, "vni", vni, "difference", diff)
			if err := ns.deleteLink(vx); err != nil {
				return nil, false, err
			}
			ch.Links++
			vx = nil
		}
	}
	if vx == nil {
		if err := m.step("vxlan"); err != nil {
			return nil, false, err
		}
		want := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu},
			VxlanId:   int(vni),
			SrcAddr:   m.cfg.VTEP.AsSlice(),
			Port:      m.cfg.Port,
			Learning:  false,
			Proxy:     true,
		}
		if m.cfg.VTEP.Is6() {
			// Older kernels take the device's family from the group;
			// "::" is no group and makes it IPv6 so v6 VTEPs are accepted.
			want.Group = net.IPv6zero
		}
		if ns.dp {
			// Created by the host's socket, in the data-plane namespace:
			// the kernel opens the UDP socket in the namespace of the
			// request and puts the device in the one named.
			want.Namespace = netlink.NsFd(ns.fd)
		}
		if err := m.nl.LinkAdd(want); err != nil {
			if errors.Is(err, unix.EEXIST) {
				err = fmt.Errorf("%w (another vxlan device may hold vni %d on port %d)", err, vni, m.cfg.Port)
			}
			return nil, false, fmt.Errorf("create vxlan %q (vni %d): %w", name, vni, err)
		}
		ch.Links++
		m.log.Debug("vxlan created", "link", name, "vni", vni, "vtep", m.cfg.VTEP, "port", m.cfg.Port)
		if vx, err = ns.linkByName(name); err != nil || vx == nil {
			return nil, false, fmt.Errorf("create vxlan %q (vni %d): gone after creation: %w", name, vni, err)
		}
		created = true
	}
	if !m.owns(vx) {
		if err := m.step("vxlan-alias"); err != nil {
			return vx, created, err
		}
		if err := ns.setAlias(vx); err != nil {
			return vx, created, err
		}
		ch.LinkAttrs++
	}
	if vx.Attrs().MTU != mtu {
		if err := ns.setMTU(vx, mtu); err != nil {
			return vx, created, err
		}
		ch.LinkAttrs++
	}
	if vx.Attrs().MasterIndex != br.Attrs().Index {
		if err := m.step("vxlan-master"); err != nil {
			return vx, created, err
		}
		if err := ns.setMaster(vx, br); err != nil {
			return vx, created, err
		}
		ch.LinkAttrs++
	}
	if !isUp(vx) {
		if err := m.step("vxlan-up"); err != nil {
			return vx, created, err
		}
		if err := ns.setUp(vx); err != nil {
			return vx, created, err
		}
		ch.LinkAttrs++
	}
	return vx, created, nil
}

// ensureGateway makes the gateway pair of a network in the data-plane
// namespace exist: vxp-<v> a port of the bridge br there, up; vxg-<v> in
// the host's namespace, up, with a fixed MAC (as the bridge's: the host's
// neighbours keep it) and exactly the gateway addresses; both ends marked
// and at mtu. An end without its peer, or two ends that are not each
// other's peer, are replaced. created reports whether this call created
// the pair (g is then set even on error, for the undo). Either end carrying
// another owner's mark fails with *ForeignLinkError and is left alone.
//
// Equivalent to: `ip -n DP link add vxp-0a1b mtu 1450 master vxbr-0a1b up
// type veth peer name vxg-0a1b netns HOST mtu 1450 address <mac> up && ip
// -n DP link set vxp-0a1b alias consul-overlay-<owner> && ip link set
// vxg-0a1b alias consul-overlay-<owner> && ip addr replace 10.10.0.1/24 dev
// vxg-0a1b`.
func (m *Manager) ensureGateway(n Network, mtu int, br netlink.Link, ch *Changes) (g netlink.Link, created bool, err error) {
	gName, pName := GatewayName(n.VNI), PortName(n.VNI)
	look := func() (g, p netlink.Link, err error) {
		if g, err = m.host.linkByName(gName); err != nil {
			return nil, nil, err
		}
		if p, err = m.dp.linkByName(pName); err != nil {
			return nil, nil, err
		}
		return g, p, nil
	}
	g, p, err := look()
	if err != nil {
		return nil, false, err
	}
	for _, l := range []netlink.Link{g, p} {
		if l != nil {
			if err := m.foreign(l); err != nil {
				return nil, false, fmt.Errorf("ensure gateway (vni %d): %w", n.VNI, err)
			}
		}
	}
	paired := g != nil && p != nil && g.Type() == "veth" && p.Type() == "veth" &&
		g.Attrs().ParentIndex == p.Attrs().Index && p.Attrs().ParentIndex == g.Attrs().Index
	if !paired && (g != nil || p != nil) {
		m.log.Warn("replacing gateway links that are not a pair", "link", gName, "peer", pName, "vni", n.VNI)
		for _, d := range []struct {
			ns *netNS
			l  netlink.Link
		}{{m.host, g}, {m.dp, p}} {
			if d.l == nil {
				continue
			}
			if err := d.ns.deleteLink(d.l); err != nil {
				return nil, false, err
			}
			ch.Links++
		}
		g, p = nil, nil
	}
	if g == nil {
		if err := m.step("gateway"); err != nil {
			return nil, false, err
		}
		v := vethPair{name: pName, peer: gName, mtu: mtu, master: br.Attrs().Index, mac: randomMAC(), peerNS: m.host.fd}
		if err := m.dp.rt.addVethPair(v); err != nil {
			return nil, false, fmt.Errorf("create gateway veth %q/%q (vni %d): %w", pName, gName, n.VNI, err)
		}
		ch.Links++
		m.log.Debug("gateway veth created", "link", gName, "peer", pName, "vni", n.VNI)
		if g, p, err = look(); err == nil && (g == nil || p == nil) {
			err = errors.New("gone after creation")
		}
		if err != nil {
			// By name: the caller's undo deletes the pair.
			return &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: gName}}, true, fmt.Errorf("create gateway veth %q (vni %d): %w", gName, n.VNI, err)
		}
		created = true
	}
	for _, e := range []struct {
		ns *netNS
		l  netlink.Link
	}{{m.dp, p}, {m.host, g}} {
		if !m.owns(e.l) {
			if err := m.step("gateway-alias"); err != nil {
				return g, created, err
			}
			if err := e.ns.setAlias(e.l); err != nil {
				return g, created, err
			}
			ch.LinkAttrs++
		}
		if e.l.Attrs().MTU != mtu {
			if err := e.ns.setMTU(e.l, mtu); err != nil {
				return g, created, err
			}
			ch.LinkAttrs++
		}
		if !isUp(e.l) {
			if err := e.ns.setUp(e.l); err != nil {
				return g, created, err
			}
			ch.LinkAttrs++
		}
	}
	if p.Attrs().MasterIndex != br.Attrs().Index {
		if err := m.dp.setMaster(p, br); err != nil {
			return g, created, err
		}
		ch.LinkAttrs++
	}
	if err := m.syncBridgeAddrs(m.host, g, n.Gateways, ch); err != nil {
		return g, created, err
	}
	return g, created, nil
}

// DeleteNetwork removes a network's endpoints' veth pairs, its VXLAN
// device, its bridge and its firewall rules, and forgets its peers. It is
// idempotent: a network that does not exist is success. Links that carry
// another owner's mark and that owner's rules are left alone (logged): for
// this owner the network is gone.
func (m *Manager) DeleteNetwork(ctx context.Context, vni uint32) error {
	if err := validVNI(vni); err != nil {
		return fmt.Errorf("delete network: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var ch Changes
	err := m.deleteNetwork(ctx, vni, &ch)
	delete(m.peers, vni)
	delete(m.kept, vni)
	if ch.Total() > 0 {
		m.log.Info("network deleted", "vni", vni, "changes", ch.Total())
	}
	return err
}

// deleteNetwork is DeleteNetwork with m.mu held. It looks in both
// namespaces: the network's devices are in one of them, and whatever a
// crash left in the other goes too. It carries on past failures and joins
// them.
//
// Equivalent to: `ip link del vxh-… ; ip link del vx-0a1b ; ip link del
// vxbr-0a1b` in each namespace, `ip link del vxg-0a1b` (which deletes
// vxp-0a1b) plus the iptables deletes.
func (m *Manager) deleteNetwork(ctx context.Context, vni uint32, ch *Changes) error {
	delete(m.inKernel, vni)
	var errs []error
	brName := BridgeName(vni)
	for _, ns := range m.namespaces() {
		br, err := ns.linkByName(brName)
		if err != nil {
			errs = append(errs, err)
		}
		if br != nil && !m.deletable(br) {
			br = nil // another owner's bridge: its ports are not ours either
		}
		if br != nil {
			links, err := ns.linkList()
			if err != nil {
				errs = append(errs, err)
			}
			for _, l := range links {
				if l.Attrs().MasterIndex == br.Attrs().Index && hostNameRE.MatchString(l.Attrs().Name) && m.deletable(l) {
					if err := ns.deleteLink(l); err != nil {
						errs = append(errs, err)
						continue
					}
					ch.Links++
				}
			}
		}
		names := []string{VXLANName(vni), brName}
		if ns.dp {
			names = append([]string{PortName(vni)}, names...)
		} else {
			names = append([]string{GatewayName(vni)}, names...)
		}
		for _, name := range names {
			deleted, err := ns.deleteLinkByName(name)
			if err != nil {
				errs = append(errs, err)
			}
			if deleted {
				ch.Links++
			}
		}
	}
	if err := m.releaseFirewall(ctx, vni, ch); err != nil {
		errs = append(errs, err)
	}
	if err := m.dropIPsecNetwork(ctx, vni, ch); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete network (vni %d): %w", vni, err)
	}
	return nil
}
