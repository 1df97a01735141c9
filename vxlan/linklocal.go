package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

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
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-0a1b -p udp -m udp --dport 53 -j RETURN        (per bridge: DNS)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-0a1b -p tcp -m tcp --dport 53 -j RETURN        (per bridge: DNS over TCP)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-0a1b -p tcp -m tcp --dport 8500 -j RETURN      (per bridge, Network.ConsulAPI)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-0a1b -p tcp -m tcp --dport 8500 -j REJECT --reject-with tcp-reset
//	                                                                                                  (per bridge, without ConsulAPI: refused at once)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i lo -j RETURN                                         (the host itself)
//	-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -j DROP                                                 (everything else: the underlay, other bridges, other ports)
//
// The RETURN and REJECT rules are inserted at the top, the DROP appended:
// the per-bridge RETURNs also precede an internal network's DROP of
// everything its containers send to the host, so internal networks reach
// the address too. The host-wide pair exists while a bridge of this owner
// does; the per-bridge rules go with their bridge (removeBridge,
// removeStale). The rules are told from the other rules of the chain by
// their -d match, which no other rule of ours has.

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
	have, err := retryDump(func() ([]netlink.Addr, error) { return m.nl.AddrList(br, netlink.FAMILY_V4) })
	if err != nil {
		return fmt.Errorf("list addresses of %q: %w", name, err)
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
	if err := m.nl.AddrReplace(br, a); err != nil {
		return fmt.Errorf("add link-local address %s to %q: %w", want, name, err)
	}
	ch.Addrs++
	m.log.Debug("link-local address added", "link", name, "addr", want)
	return nil
}

// linkLocalBridgeRules are the per-bridge rules of address ll, as
// `iptables -S` prints them after "-A CHAIN".
func linkLocalBridgeRules(ll netip.Addr, br, mark string, api bool) [][]string {
	d := []string{"-d", netip.PrefixFrom(ll, 32).String(), "-i", br}
	c := []string{"-m", "comment", "--comment", mark}
	port := func(proto string, p int) []string {
		return []string{"-p", proto, "-m", proto, "--dport", strconv.Itoa(p)}
	}
	apiTarget := []string{"-j", "REJECT", "--reject-with", "tcp-reset"}
	if api {
		apiTarget = []string{"-j", "RETURN"}
	}
	return [][]string{
		slices.Concat(d, port("udp", LinkLocalDNSPort), c, []string{"-j", "RETURN"}),
		slices.Concat(d, port("tcp", LinkLocalDNSPort), c, []string{"-j", "RETURN"}),
		slices.Concat(d, port("tcp", LinkLocalAPIPort), c, apiTarget),
	}
}

// linkLocalHostRules are the host-wide rules of address ll: the host's own
// traffic (RETURN, inserted) and everything else (DROP, appended).
func linkLocalHostRules(ll netip.Addr, mark string) (host, drop []string) {
	d := []string{"-d", netip.PrefixFrom(ll, 32).String()}
	c := []string{"-m", "comment", "--comment", mark}
	return slices.Concat(d, []string{"-i", "lo"}, c, []string{"-j", "RETURN"}),
		slices.Concat(d, c, []string{"-j", "DROP"})
}

// ensureLinkLocalRules makes the iptables rules of the well-known address
// match: the host-wide pair when hostWide, the rules of bridge br (if not
// "") with or without the API port. Our rules of another address (the
// setting changed), and br's rules that differ, are removed; other
// bridges' rules of the current address stay. With no address set, every
// rule of ours with a -d match goes. InputChain must exist. Caller holds
// Manager.mu.
//
// Equivalent to: `iptables -I CONSUL-OVERLAY-INPUT 1 -d 169.254.1.1/32 -i
// vxbr-0a1b -p udp -m udp --dport 53 -m comment --comment <mark> -j
// RETURN` and so on for each rule of the comment above that is missing,
// and `iptables -D …` for each stale one, in one iptables-restore
// transaction.
func (f *firewall) ensureLinkLocalRules(ctx context.Context, ll netip.Addr, hostWide bool, br string, api bool) (int, error) {
	var top, bottom [][]string
	if ll.IsValid() {
		if hostWide {
			host, drop := linkLocalHostRules(ll, f.mark)
			top, bottom = append(top, host), append(bottom, drop)
		}
		if br != "" {
			top = append(top, linkLocalBridgeRules(ll, br, f.mark, api)...)
		}
	}
	want := map[string]bool{}
	for _, r := range slices.Concat(top, bottom) {
		want[strings.Join(r, " ")] = true
	}
	cur := ""
	if ll.IsValid() {
		cur = netip.PrefixFrom(ll, 32).String()
	}
	return f.each(ctx, func(bin string) (batch, error) {
		var b batch
		if f.v6[bin] {
			return nil, nil
		}
		lines, ok, err := f.rules(ctx, bin, InputChain)
		if err != nil {
			return nil, err
		}
		if !ok {
			if len(want) == 0 {
				return nil, nil
			}
			return nil, fmt.Errorf("link-local address %s: chain %s missing in %s", ll, InputChain, bin)
		}
		have := map[string]bool{}
		for _, l := range lines {
			r := parseRule(l)
			dst := r.value("-d")
			if !r.marked || r.comment != f.mark || dst == "" {
				continue
			}
			text := strings.Join(r.fields, " ")
			ifaces := r.ifaces
			switch {
			case want[text]:
				have[text] = true
				continue
			case dst != cur:
			case len(ifaces) == 1 && ifaces[0] == br:
			case hostWide && (len(ifaces) == 0 || ifaces[0] == "lo"):
			default:
				continue // another bridge's rule, or a host-wide rule left alone
			}
			b.add(slices.Concat([]string{"-D", InputChain}, r.fields)...)
		}
		for _, r := range top {
			if !have[strings.Join(r, " ")] {
				b.add(slices.Concat([]string{"-I", InputChain, "1"}, r)...)
			}
		}
		for _, r := range bottom {
			if !have[strings.Join(r, " ")] {
				b.add(slices.Concat([]string{"-A", InputChain}, r)...)
			}
		}
		return b, nil
	})
}

// ensureLinkLocal programs the well-known address of a network's bridge:
// the /32 on the bridge, the bridge's rules and the host-wide ones.
// Caller holds m.mu; the bridge exists.
func (m *Manager) ensureLinkLocal(ctx context.Context, br netlink.Link, n Network, ch *Changes) error {
	if err := m.syncLinkLocalAddr(br, ch); err != nil {
		return err
	}
	// Turned off: Reconcile (at every start) removes the rules.
	if !m.fw.enabled() || !m.cfg.LinkLocal.IsValid() {
		return nil
	}
	if err := m.step("firewall-linklocal"); err != nil {
		return err
	}
	k, err := m.fw.ensureLinkLocalRules(ctx, m.cfg.LinkLocal, true, br.Attrs().Name, n.ConsulAPI)
	ch.Rules += k
	if err != nil {
		return fmt.Errorf("link-local address %s on %q: %w", m.cfg.LinkLocal, br.Attrs().Name, err)
	}
	return nil
}

// releaseLinkLocal removes the host-wide rules of the well-known address
// when no bridge of this owner is left (the per-bridge rules went with
// their bridges). Turned off, it leaves the rules to Reconcile. Caller
// holds m.mu.
func (m *Manager) releaseLinkLocal(ctx context.Context, ch *Changes) error {
	if !m.fw.enabled() || !m.cfg.LinkLocal.IsValid() {
		return nil
	}
	links, err := m.linkList()
	if err != nil {
		return err
	}
	for _, l := range links {
		if m.owns(l) && bridgeNameRE.MatchString(l.Attrs().Name) {
			return nil
		}
	}
	k, err := m.fw.ensureLinkLocalRules(ctx, netip.Addr{}, true, "", false)
	ch.Rules += k
	return err
}

// syncLinkLocalHostRules makes the host-wide rules match the setting and
// the bridges of this owner: present while one exists and the address is
// set, gone otherwise. Reconcile calls it. Caller holds m.mu.
func (m *Manager) syncLinkLocalHostRules(ctx context.Context, bridges int, ch *Changes) error {
	if !m.fw.enabled() {
		return nil
	}
	ll := m.cfg.LinkLocal
	if bridges == 0 {
		ll = netip.Addr{}
	}
	k, err := m.fw.ensureLinkLocalRules(ctx, ll, true, "", false)
	ch.Rules += k
	return err
}

// LinkLocal is the well-known address this Manager puts on its bridges
// (invalid: none).
func (m *Manager) LinkLocal() netip.Addr { return m.cfg.LinkLocal }
