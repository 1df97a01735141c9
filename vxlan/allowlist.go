package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
)

// InputChain is the filter-table chain, jumped to from the top of INPUT,
// that holds the underlay allowlist and the internal networks' drops. Like
// FirewallChain it is shared by every owner and never removed; each rule
// carries its owner's mark as a comment.
const InputChain = "CONSUL-OVERLAY-INPUT"

// ErrNoUnderlayFilter reports that no iptables command of the underlay's
// family is enabled, so no underlay filter is installed.
var ErrNoUnderlayFilter = errors.New("underlay filter disabled: no iptables command of the underlay's family")

// The underlay allowlist. A VXLAN packet (UDP to Config.Port) reaches the
// VXLAN devices only if it comes from an allowed VTEP; everything else is
// dropped in INPUT, before the UDP socket hands it to a VXLAN device, and
// counted by the drop rule. In the command of the underlay's family
// (iptables for an IPv4 VTEP, ip6tables for an IPv6 one):
//
//	-A INPUT -j CONSUL-OVERLAY-INPUT                                                                          (first in INPUT, shared)
//	-A CONSUL-OVERLAY-INPUT -s 192.0.2.12/32 -p udp -m udp --dport 4789 -m comment --comment <mark> -j RETURN  (per allowed VTEP, inserted at the top)
//	-A CONSUL-OVERLAY-INPUT -p udp -m udp --dport 4789 -m comment --comment <mark> -j DROP                     (the rest, appended; its counter is VXLANDrops)
//
// Allowed packets RETURN rather than ACCEPT: the plugin only ever removes
// reachability, and the rest of INPUT (the administrator's firewall) still
// applies to them. That is also why the allowed VTEPs sit in the shared
// chain rather than in a chain per owner: two owners on one port must each
// let the other's VTEPs through, and only a rule in the same chain can
// return to INPUT. RETURN rules are inserted at the top and DROP rules
// appended, so with several owners every RETURN precedes every DROP; with
// two owners on one port the first DROP counts the drops of both, and
// VXLANDrops sums them all.
//
// The allowed set is the VTEPs SetAllowedVTEPs gave plus those of the
// programmed peers: a peer's VTEP is allowed before its FDB entries are
// written (appendFlood), so traffic to a peer never waits for the next
// SetAllowedVTEPs. Removals happen only in SetAllowedVTEPs, which replaces
// the set in one iptables-restore transaction. With no allowed VTEP the
// drop rule takes all VXLAN: the chain is installed before the first
// VXLAN device is created (ensureNetwork), so there is no window at start,
// and it is never flushed, so a restarted plugin keeps its members' traffic
// flowing until it sets the list again. The owner's rules go with its last
// network (DeleteNetwork, or a Reconcile to no network), with its last
// VXLAN device: left, they would outlive the plugin and drop another
// VXLAN user's traffic on the port.
//
// The drop covers the whole port, not one VNI: another VXLAN user on the
// same port (for example Docker's swarm overlay on 4789) needs its hosts
// allowed too, or another port.

// vxlanMatch is the match of VXLAN packets to port, as -S prints it.
func vxlanMatch(port int) []string {
	return []string{"-p", "udp", "-m", "udp", "--dport", strconv.Itoa(port)}
}

// allowRule is the RETURN rule of one allowed VTEP.
func allowRule(vtep netip.Addr, port int, mark string) []string {
	return slices.Concat([]string{"-s", netip.PrefixFrom(vtep, vtep.BitLen()).String()}, vxlanMatch(port),
		[]string{"-m", "comment", "--comment", mark, "-j", "RETURN"})
}

// vxlanDropRule drops the VXLAN packets no allow rule returned.
func vxlanDropRule(port int, mark string) []string {
	return slices.Concat(vxlanMatch(port), []string{"-m", "comment", "--comment", mark, "-j", "DROP"})
}

// underlayBin is the enabled command of the underlay's family ("": none).
func (f *firewall) underlayBin(v6 bool) string {
	for _, bin := range f.bins {
		if f.v6[bin] == v6 {
			return bin
		}
	}
	return ""
}

// ensureInput makes InputChain exist in every command and be jumped to
// first in INPUT, and in the underlay's command: a RETURN rule for each
// VTEP of want and the drop rule for port. With prune, our RETURN rules of
// VTEPs not in want go too; without, they stay (a restart keeps traffic
// flowing until the caller sets the list). Our VXLAN rules for another
// port, or in the other family's command, are stale and removed. Each
// command gets one transaction. Caller holds Manager.mu.
//
// Equivalent to: `iptables -N CONSUL-OVERLAY-INPUT; iptables -I INPUT 1 -j
// CONSUL-OVERLAY-INPUT; iptables -I CONSUL-OVERLAY-INPUT 1 -s 192.0.2.12/32
// -p udp -m udp --dport 4789 -m comment --comment <mark> -j RETURN;
// iptables -A CONSUL-OVERLAY-INPUT -p udp -m udp --dport 4789 -m comment
// --comment <mark> -j DROP`, each where missing, through
// `iptables-restore --noflush`.
func (f *firewall) ensureInput(ctx context.Context, port int, v6 bool, want map[netip.Addr]bool, prune bool) (int, error) {
	k, err := f.sync(ctx, fwSpec{underlay: true, port: port, v6: v6, vteps: want, prune: prune})
	if err != nil {
		return k, fmt.Errorf("underlay filter: %w", err)
	}
	return k, nil
}

// underlayAdded is what one sync inserted into the underlay filter: the
// RETURN rules of vteps and, with drop, the drop rule.
type underlayAdded struct {
	vteps []netip.Addr
	drop  bool
}

// removeUnderlay removes the underlay rules of a, where they are, from the
// underlay's command: the undo of a failed EnsureNetwork, which leaves the
// rules that were there before it (other networks' peers, SetAllowedVTEPs)
// alone. The removed VTEPs are no longer known to be allowed. Caller holds
// Manager.mu.
//
// Equivalent to: `iptables -D CONSUL-OVERLAY-INPUT -s 192.0.2.12/32 -p udp
// -m udp --dport 4789 -m comment --comment <mark> -j RETURN` for each VTEP
// of a, and `iptables -D CONSUL-OVERLAY-INPUT -p udp -m udp --dport 4789 -m
// comment --comment <mark> -j DROP` with a.drop.
func (f *firewall) removeUnderlay(ctx context.Context, port int, v6 bool, a underlayAdded) (int, error) {
	ul := f.underlayBin(v6)
	if ul == "" || (len(a.vteps) == 0 && !a.drop) {
		return 0, nil
	}
	gone := map[netip.Addr]bool{}
	for _, v := range a.vteps {
		gone[v] = true
	}
	one := &firewall{log: f.log, bins: []string{ul}, restore: f.restore}
	k, err := one.each(ctx, func(bin string) (batch, error) {
		l, err := f.list(ctx, bin, "filter")
		if err != nil {
			return nil, err
		}
		lines, _ := l.chain("filter", InputChain)
		var b batch
		for _, line := range lines {
			r := parseRule(line)
			if !f.ownUnderlayRule(r) || r.value("--dport") != strconv.Itoa(port) {
				continue // another owner's, another port's, or not a VXLAN rule
			}
			if vtep, drop := underlayTarget(r); (drop && a.drop) || (vtep.IsValid() && gone[vtep]) {
				b.add(slices.Concat([]string{"-D", InputChain}, r.fields)...)
			}
		}
		return b, nil
	})
	switch {
	case err != nil:
		f.allowed = nil // unknown: read back next time
	case f.allowed != nil:
		for v := range gone {
			delete(f.allowed, v)
		}
	}
	if err != nil {
		return k, fmt.Errorf("underlay filter: %w", err)
	}
	return k, nil
}

func sortedAddrs(s map[netip.Addr]bool) []netip.Addr {
	out := make([]netip.Addr, 0, len(s))
	for a := range s {
		out = append(out, a)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// wantVTEPs is the allowed set: the VTEPs SetAllowedVTEPs gave and those of
// every known peer. Caller holds m.mu.
func (m *Manager) wantVTEPs() map[netip.Addr]bool {
	want := map[netip.Addr]bool{}
	for v := range m.fw.explicit {
		want[v] = true
	}
	for _, set := range m.peers {
		for v := range set.vteps {
			want[v] = true
		}
	}
	for _, set := range m.kept {
		for v := range set {
			want[v] = true
		}
	}
	return want
}

// keepVTEPs records the VTEPs that the FDB entries of this owner's VXLAN
// devices not in nets send to (m.kept), from Reconcile's dump of the
// kernel: with KeepStrays those overlays stay, and so must their peers'
// place in the underlay allowlist, or the kept entries send where replies
// are dropped. Caller holds m.mu; m.host.snap is the dump.
func (m *Manager) keepVTEPs(nets map[uint32]Network) {
	for _, ns := range m.namespaces() {
		if ns.snap == nil {
			continue
		}
		for _, l := range ns.snap.links {
			vx, ok := l.(*netlink.Vxlan)
			if !ok || !m.owns(l) {
				continue
			}
			vni := uint32(vx.VxlanId)
			if _, listed := nets[vni]; listed {
				continue
			}
			for _, n := range ns.snap.fdb[l.Attrs().Index] {
				a, ok := netip.AddrFromSlice(n.IP)
				if !ok || !a.Unmap().IsValid() || a.Unmap() == m.cfg.VTEP {
					continue
				}
				if m.kept == nil {
					m.kept = map[uint32]map[netip.Addr]bool{}
				}
				if m.kept[vni] == nil {
					m.kept[vni] = map[netip.Addr]bool{}
				}
				m.kept[vni][a.Unmap()] = true
			}
		}
	}
}

// allowVTEP makes the underlay filter accept VXLAN from vtep, before an
// FDB entry sends traffic there: the peer's replies must not be dropped.
// It writes only when vtep is not known to be allowed. Caller holds m.mu.
func (m *Manager) allowVTEP(vtep netip.Addr, ch *Changes) error {
	if m.fw.underlayBin(m.cfg.VTEP.Is6()) == "" || m.fw.allowed[vtep] {
		return nil // no filter, or vtep already allowed: no process
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	want := m.wantVTEPs()
	want[vtep] = true
	k, err := m.fw.ensureInput(ctx, m.cfg.Port, m.cfg.VTEP.Is6(), want, false)
	ch.Rules += k
	if err != nil {
		return fmt.Errorf("allow vtep %s: %w", vtep, err)
	}
	return nil
}

// SetAllowedVTEPs replaces the set of underlay addresses from which this
// host accepts VXLAN packets: the VTEPs of the live members of this host's
// networks. The VTEPs of programmed peers stay allowed whatever the set
// (their FDB entries send traffic there). Packets to the VXLAN port from
// any other address are dropped before they reach a VXLAN device and
// counted (VXLANDrops). The change is one iptables-restore transaction;
// VTEPs in both the old and the new set are never dropped in between. The
// VTEPs must be of the local VTEP's family; the local VTEP itself is
// ignored. Without an iptables command of the underlay's family it
// installs nothing and returns nil (a warning was logged).
//
// Equivalent to: `iptables-restore --noflush` of `-I CONSUL-OVERLAY-INPUT
// 1 -s <vtep>/32 -p udp -m udp --dport 4789 -m comment --comment <mark> -j
// RETURN` for each new VTEP and `-D CONSUL-OVERLAY-INPUT …` for each VTEP
// no longer allowed.
func (m *Manager) SetAllowedVTEPs(ctx context.Context, vteps []netip.Addr) error {
	// Under the lock: SetVTEP changes the local VTEP.
	m.mu.Lock()
	defer m.mu.Unlock()
	set := map[netip.Addr]bool{}
	for _, v := range vteps {
		v = v.Unmap()
		switch {
		case !v.IsValid():
			return errors.New("set allowed vteps: invalid address")
		case v.Is4() != m.cfg.VTEP.Is4():
			return fmt.Errorf("set allowed vteps: %s is not of the local vtep's family (%s)", v, m.cfg.VTEP)
		case v == m.cfg.VTEP:
			continue
		}
		set[v] = true
	}
	m.fw.explicit = set
	if !m.fw.enabled() {
		return nil
	}
	// The filter lives with the networks (releaseFirewall): without one
	// the set waits for the first network's sync.
	if has, err := m.hasOwnBridge(""); err != nil {
		return fmt.Errorf("set allowed vteps: %w", err)
	} else if !has {
		return nil
	}
	k, err := m.fw.ensureInput(ctx, m.cfg.Port, m.cfg.VTEP.Is6(), m.wantVTEPs(), true)
	if err != nil {
		return fmt.Errorf("set allowed vteps: %w", err)
	}
	if k > 0 {
		m.log.Info("underlay allowlist set", "vteps", len(set), "allowed", len(m.fw.allowed), "changes", k)
	}
	return nil
}

// countersRE is the packet and byte counters `iptables -S -v` prints.
var countersRE = regexp.MustCompile(` -c (\d+) \d+`)

// VXLANDrops returns how many VXLAN packets (UDP to Config.Port, in the
// underlay's family) the underlay filter dropped: the packet counters of
// the drop rules for the port, of every owner (with two owners on a port
// the first rule counts the drops of both). It is 0 before the filter is
// installed, and ErrNoUnderlayFilter without an iptables command of the
// underlay's family.
//
// Equivalent to: `iptables -S CONSUL-OVERLAY-INPUT -v` and reading the
// `-c <packets> <bytes>` of `-p udp -m udp --dport 4789 … -j DROP`.
func (m *Manager) VXLANDrops() (packets uint64, err error) {
	// The command and the VTEP under the lock (flavour re-detection and
	// SetVTEP change them); the command runs without it.
	m.mu.Lock()
	bin, port := m.fw.underlayBin(m.cfg.VTEP.Is6()), m.cfg.Port
	m.mu.Unlock()
	if bin == "" {
		return 0, ErrNoUnderlayFilter
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := m.fw.run(ctx, bin, "-S", InputChain, "-v")
	if err != nil {
		if exitCode1(err) {
			return 0, nil // no chain yet: nothing dropped
		}
		return 0, fmt.Errorf("vxlan drops: %w", err)
	}
	return sumDrops(out, port), nil
}

// sumDrops adds the packet counters of the VXLAN drop rules for port in
// `iptables -S <InputChain> -v` output.
func sumDrops(out string, port int) uint64 {
	var sum uint64
	for _, l := range strings.Split(out, "\n") {
		c := countersRE.FindStringSubmatch(l)
		if c == nil || !strings.HasPrefix(l, "-A "+InputChain+" ") {
			continue
		}
		r := parseRule(countersRE.ReplaceAllString(strings.TrimSpace(l), ""))
		if r.value("-j") != "DROP" || r.value("-p") != "udp" || r.value("--dport") != strconv.Itoa(port) || r.value("-s") != "" || len(r.ifaces) > 0 {
			continue
		}
		n, err := strconv.ParseUint(c[1], 10, 64)
		if err == nil {
			sum += n
		}
	}
	return sum
}
