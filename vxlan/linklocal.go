package vxlan

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The well-known address (Config.LinkLocal, by default 169.254.1.1): one
// address, the same on every host, where the containers of every overlay
// reach their own host's DNS forwarder and, on networks that allow it,
// the Consul API proxy (package linklocal serves both; it binds with
// IP_FREEBIND, so it does not wait for the address).
//
// Kernel side, per overlay bridge of this owner:
//
//	ip addr replace 169.254.1.1/32 dev vxbr-0a1b label vxbr-0a1b:ll
//
// A /32 adds no subnet route; several bridges in one namespace may carry
// the same local address. The label marks the address as ours, so it goes
// when the setting changes or is turned off. Containers get a connected
// route to the address on their overlay interface at Join (the driver's
// JoinResponse), so they ARP for it on the bridge and the host answers
// there; the VXLAN device's proxy flag keeps that ARP request off the
// underlay, as it does for the gateway address that every host's bridge
// also carries.
//
// Firewall, in iptables only (the address is IPv4), in the shared chain
// CONSUL-OVERLAY-INPUT (see allowlist.go), each rule with the owner mark:
//
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-0a1b -p tcp -m tcp --dport 8500 -j RETURN      (per bridge, Network.ConsulAPI only)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-+ -p udp -m udp --dport 53 -j RETURN            (every bridge: DNS)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-+ -p tcp -m tcp --dport 53 -j RETURN            (every bridge: DNS over TCP)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-+ -p tcp -m tcp --dport 8500 -j REJECT --reject-with tcp-reset
//	                                                                                                  (every other bridge: refused at once)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i lo -j RETURN                                         (the host itself)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -j DROP                                                 (everything else: the underlay, other ports)
//
// The RETURN and REJECT rules are inserted at the top, the DROP appended:
// they also precede an internal network's DROP of everything its
// containers send to the host, so internal networks reach the address
// too. A bridge's API RETURN is kept above the wildcard REJECT (the sync
// moves it there in the same transaction when it is not). The shared rules
// exist while a bridge of this owner does; a bridge's API RETURN goes with
// it. The rules are told from the other rules of the chain by their -d
// match, which no other rule of ours has.

// Ports the well-known address serves.
const (
	LinkLocalDNSPort = 53
	LinkLocalAPIPort = 8500
)

// linkLocalLabel is the label of the well-known address on bridge br.
func linkLocalLabel(br string) string { return br + ":ll" }

// syncLinkLocalAddr makes the bridge carry the well-known address as a
// /32 with our label, and no other address with our label.
//
// Equivalent to: `ip addr replace 169.254.1.1/32 dev vxbr-0a1b label
// vxbr-0a1b:ll` and `ip addr del <old>/32 dev vxbr-0a1b` for a stale one.
func (m *Manager) syncLinkLocalAddr(br netlink.Link, ch *Changes) error {
	name := br.Attrs().Name
	label := linkLocalLabel(name)
	have, ok := m.host.snap.addrList(br, netlink.FAMILY_V4)
	if !ok {
		var err error
		if have, err = retryDump(func() ([]netlink.Addr, error) { return m.nl.AddrList(br, netlink.FAMILY_V4) }); err != nil {
			return fmt.Errorf("list addresses of %q: %w", name, err)
		}
	}
	want := netip.PrefixFrom(m.cfg.LinkLocal, 32)
	present := false
	for _, a := range have {
		p, ok := prefixOf(a.IPNet)
		if !ok || a.Label != label {
			continue
		}
		if m.cfg.LinkLocal.IsValid() && p == want {
			present = true
			continue
		}
		m.host.snap.forgetAddrs(br)
		if err := m.nl.AddrDel(br, &a); err != nil && !isNotFound(err) && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("remove link-local address %s from %q: %w", p, name, err)
		}
		ch.Addrs++
		m.log.Debug("link-local address removed", "link", name, "addr", p)
	}
	if !m.cfg.LinkLocal.IsValid() || present {
		return nil
	}
	if err := m.step("bridge-linklocal"); err != nil {
		return err
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: m.cfg.LinkLocal.AsSlice(), Mask: net.CIDRMask(32, 32)}, Label: label}
	m.host.snap.forgetAddrs(br)
	if err := m.nl.AddrReplace(br, a); err != nil {
		return fmt.Errorf("add link-local address %s to %q: %w", want, name, err)
	}
	ch.Addrs++
	m.log.Debug("link-local address added", "link", name, "addr", want)
	return nil
}

// linkLocalWildcardRules are the rules of address ll for every overlay
// bridge, as `iptables -S` prints them after "-A CHAIN": DNS over UDP and
// TCP pass, the API port is refused at once (a network with ConsulAPI has
// a linkLocalAPIRule above it).
func linkLocalWildcardRules(ll netip.Addr, mark string) [][]string {
	return linkLocalRulesOn(ll, mark, wildcard)
}

// linkLocalGatewayRules are linkLocalWildcardRules for every gateway link
// (vxg-+) of the networks in the data-plane namespace, through which
// their containers reach the host.
func linkLocalGatewayRules(ll netip.Addr, mark string) [][]string {
	return linkLocalRulesOn(ll, mark, gatewayWildcard)
}

// linkLocalRulesOn are the rules of address ll for the interfaces iface
// matches.
func linkLocalRulesOn(ll netip.Addr, mark, iface string) [][]string {
	d := []string{"-d", netip.PrefixFrom(ll, 32).String(), "-i", iface}
	c := []string{"-m", "comment", "--comment", mark}
	return [][]string{
		slices.Concat(d, linkLocalPort("udp", LinkLocalDNSPort), c, []string{"-j", "RETURN"}),
		slices.Concat(d, linkLocalPort("tcp", LinkLocalDNSPort), c, []string{"-j", "RETURN"}),
		slices.Concat(d, linkLocalPort("tcp", LinkLocalAPIPort), c, []string{"-j", "REJECT", "--reject-with", "tcp-reset"}),
	}
}

// linkLocalAPIRule lets the containers of bridge br reach the API port of
// address ll (Network.ConsulAPI).
func linkLocalAPIRule(ll netip.Addr, br, mark string) []string {
	return slices.Concat([]string{"-d", netip.PrefixFrom(ll, 32).String(), "-i", br}, linkLocalPort("tcp", LinkLocalAPIPort),
		[]string{"-m", "comment", "--comment", mark, "-j", "RETURN"})
}

func linkLocalPort(proto string, p int) []string {
	return []string{"-p", proto, "-m", proto, "--dport", strconv.Itoa(p)}
}

// linkLocalHostRules are the host-wide rules of address ll: the host's own
// traffic (RETURN, inserted) and everything else (DROP, appended).
func linkLocalHostRules(ll netip.Addr, mark string) (host, drop []string) {
	d := []string{"-d", netip.PrefixFrom(ll, 32).String()}
	c := []string{"-m", "comment", "--comment", mark}
	return slices.Concat(d, []string{"-i", "lo"}, c, []string{"-j", "RETURN"}),
		slices.Concat(d, c, []string{"-j", "DROP"})
}

// ensureLinkLocal puts the well-known address on a network's bridge, or
// its gateway link in the data-plane layout (its rules are the firewall
// sync's). Caller holds m.mu; the link exists in the host's namespace.
func (m *Manager) ensureLinkLocal(br netlink.Link, ch *Changes) error {
	return m.syncLinkLocalAddr(br, ch)
}

// LinkLocal is the well-known address this Manager puts on its bridges
// (invalid: none).
func (m *Manager) LinkLocal() netip.Addr { return m.cfg.LinkLocal }
