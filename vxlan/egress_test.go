package vxlan

import (
	"bytes"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"consul-overlay/internal/testenv"
)

// egressManager is h's Manager for egress networks: as h.m, with bridged
// traffic tracked (the masquerade needs it in the host's layout).
func (h *testHost) egressManager(t *testing.T) *Manager {
	t.Helper()
	return h.managerWith(t, func(cfg *Config) {
		cfg.NoTrackBridged = false
		cfg.IPTables = nsWrapperWithRestore(t, h.NS, "iptables")
	})
}

// outside joins a new namespace to h's by a veth pair named name (h's
// end) on the /30 p: h's end gets p's first address, the namespace's end
// the second, and the namespace has no other route. It stands for the
// world beyond the host (or, with a bridge, one of Docker's bridge
// networks): what an overlay's container sends there is answered only if
// the host masqueraded it.
func outside(t *testing.T, h *testHost, name string, p netip.Prefix, bridge string) (*testenv.NetNS, netip.Addr) {
	t.Helper()
	o := testenv.NewNetNS(t)
	hostAddr := p.Addr().Next()
	far := hostAddr.Next()
	h.NS.MustRun(t, "ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", o.Name)
	iface := name
	if bridge != "" {
		h.NS.MustRun(t, "ip", "link", "add", bridge, "type", "bridge")
		h.NS.MustRun(t, "ip", "link", "set", name, "master", bridge)
		h.NS.MustRun(t, "ip", "link", "set", bridge, "up")
		iface = bridge
	}
	h.NS.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(hostAddr, p.Bits()).String(), "dev", iface)
	h.NS.MustRun(t, "ip", "link", "set", name, "up")
	o.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(far, p.Bits()).String(), "dev", "eth0")
	o.MustRun(t, "ip", "link", "set", "eth0", "up")
	o.MustRun(t, "ip", "link", "set", "lo", "up")
	return o, far
}

// A network with Egress is its containers' way out: under dockerd's
// FORWARD policy DROP what they start reaches a host beyond this one that
// has no route back to the overlay (so it was masqueraded), while a
// network without Egress stays cut off, the egress network's containers
// reach neither another overlay nor a Docker bridge network, and its
// bridged traffic still flows. Another network's EnsureNetwork and a
// complete Reconcile keep its rules; DeleteNetwork removes them.
func TestEgress(t *testing.T) {
	t.Parallel()
	inLayouts(t, true, testEgress)
}

func testEgress(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	m := h.egressManager(t)
	iptables(t, h, "iptables", "-P", "FORWARD", "DROP")
	h.NS.MustRun(t, "sysctl", "-w", "net.ipv4.ip_forward=1")
	worldNS, world := outside(t, h, "egw0", pfx("10.47.9.0/30"), "")
	dockerNS, dockerC := outside(t, h, "egd0", pfx("10.47.9.4/30"), "br-egtest")

	const vniOut, vniIn = 0x46, 0x48
	egress := Network{VNI: vniOut, Egress: true, Gateways: []netip.Prefix{pfx("10.46.0.1/24")}}
	plain := Network{VNI: vniIn, Gateways: []netip.Prefix{pfx("10.48.0.1/24")}}
	for _, n := range []Network{egress, plain} { // the second keeps the first's rules
		if _, err := m.EnsureNetwork(t.Context(), n); err != nil {
			t.Fatal(err)
		}
	}
	iface := BridgeName(vniOut)
	if dp {
		iface = GatewayName(vniOut)
	}
	wantNat := "-A POSTROUTING -s 10.46.0.0/24 ! -o " + iface + " -m comment --comment consul-overlay -j MASQUERADE"
	checkEgressRules := func(when string) {
		t.Helper()
		var want []string
		for _, r := range egressRules(iface, "consul-overlay") {
			want = append(want, "-A "+FirewallChain+" "+strings.Join(r, " "))
		}
		// The set, whole and in order, above the shared DROPs, and
		// under the ACCEPT of bridged frames.
		got := fwRules(t, h, "iptables")
		at, drops := slices.Index(got, want[0]), slices.Index(got, "-A CONSUL-OVERLAY -o vxbr-+ -m comment --comment consul-overlay -j DROP")
		if at < 0 || at+len(want) > drops || !slices.Equal(got[at:at+len(want)], want) {
			t.Errorf("%s: iptables rules:\n%s\nwant, above the shared DROPs:\n%s", when, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if acc := slices.Index(got, "-A CONSUL-OVERLAY -i vxbr-+ -m physdev --physdev-is-bridged -m comment --comment consul-overlay -j ACCEPT"); acc != 0 {
			t.Errorf("%s: the ACCEPT of bridged frames at %d, want it first:\n%s", when, acc, strings.Join(got, "\n"))
		}
		if got := fwRules(t, h, "ip6tables"); slices.ContainsFunc(got, func(r string) bool { return strings.Contains(r, iface) }) {
			t.Errorf("%s: ip6tables rules of %s:\n%s", when, iface, strings.Join(got, "\n"))
		}
		if got := iptables(t, h, "iptables", "-t", "nat", "-S", "POSTROUTING"); !strings.Contains(got, wantNat) {
			t.Errorf("%s: no %q in\n%s", when, wantNat, got)
		}
	}
	checkEgressRules("after EnsureNetwork of both")
	// A second egress network's set goes above the others: the ACCEPT
	// moves back to the top.
	egress2 := Network{VNI: 0x4a, Egress: true, Gateways: []netip.Prefix{pfx("10.74.0.1/24")}}
	if _, err := m.EnsureNetwork(t.Context(), egress2); err != nil {
		t.Fatal(err)
	}
	checkEgressRules("after EnsureNetwork of a second egress network")
	if err := m.DeleteNetwork(t.Context(), egress2.VNI); err != nil {
		t.Fatal(err)
	}

	c1 := h.runWith(t, m, vniOut, []netip.Prefix{pfx("10.46.0.2/24")}, addr("10.46.0.1"))
	c2 := h.runWith(t, m, vniOut, []netip.Prefix{pfx("10.46.0.3/24")}, addr("10.46.0.1"))
	cPlain := h.runWith(t, m, vniIn, []netip.Prefix{pfx("10.48.0.2/24")}, addr("10.48.0.1"))

	mustPing(t, c1.ns, world)                // out, masqueraded: the far end has no route back
	mustPing(t, c1.ns, addr("10.46.0.3"))    // bridged, within the network
	mustNotPing(t, cPlain.ns, world)         // no egress: cut off
	mustNotPing(t, c1.ns, addr("10.48.0.2")) // into another overlay
	mustNotPing(t, c2.ns, dockerC)           // into a Docker bridge network
	// ... but a port published there on the host's address (dockerd's
	// DNAT, and its ACCEPT after our chain) answers, as it does to a
	// container on docker_gwbridge.
	serveIn(t, dockerNS, "tcp", dockerC.String()+":8080")
	iptables(t, h, "iptables", "-t", "nat", "-A", "PREROUTING", "-d", "10.47.9.1", "-p", "tcp", "--dport", "18080",
		"-j", "DNAT", "--to-destination", dockerC.String()+":8080")
	iptables(t, h, "iptables", "-A", "FORWARD", "-d", dockerC.String(), "-o", "br-egtest", "-p", "tcp", "--dport", "8080", "-j", "ACCEPT")
	if got := reach(t, c1.ns, "tcp", "10.47.9.1:18080"); got != "ok" {
		t.Errorf("a port published on a Docker bridge network of the host: %s, want ok", got)
	}
	drop := "-A " + FirewallChain + " " + strings.Join(egressRules(iface, "consul-overlay")[5], " ")
	if n := ruleCounter(t, h, "iptables", drop); n == 0 {
		t.Errorf("the ping into a Docker bridge network was not dropped by %q", drop)
	}
	// Traffic the host forwards between two interfaces of no overlay (a
	// Docker bridge network's, the world's) never enters our chain, so it
	// walks none of the egress networks' rules; the overlay's did.
	if n := forwardJumpPackets(t, h, "iptables"); n == 0 {
		t.Errorf("FORWARD's jumps to %s sent no packet there after the overlay's traffic", FirewallChain)
	}
	worldNS.MustRun(t, "ip", "route", "add", "10.47.9.4/30", "via", "10.47.9.1")
	dockerNS.MustRun(t, "ip", "route", "add", "10.47.9.0/30", "via", "10.47.9.5")
	iptables(t, h, "iptables", "-A", "FORWARD", "-i", "egw0", "-o", "br-egtest", "-j", "ACCEPT")
	iptables(t, h, "iptables", "-A", "FORWARD", "-i", "br-egtest", "-o", "egw0", "-j", "ACCEPT")
	before := forwardJumpPackets(t, h, "iptables")
	mustPing(t, dockerNS, world)
	if after := forwardJumpPackets(t, h, "iptables"); after != before {
		t.Errorf("a ping forwarded between a Docker bridge network and the world: FORWARD's jumps sent %d packets to %s, want none", after-before, FirewallChain)
	}

	st := State{Networks: []Network{egress, plain}}
	for _, c := range []*container{c1, c2, cPlain} {
		st.Endpoints = append(st.Endpoints, Endpoint{ID: c.id, VNI: c.vni, MAC: c.mac})
	}
	if _, err := m.Reconcile(t.Context(), st); err != nil {
		t.Fatal(err)
	}
	checkEgressRules("after a complete Reconcile")
	mustPing(t, c2.ns, world)

	if err := m.DeleteNetwork(t.Context(), vniIn); err != nil {
		t.Fatal(err)
	}
	checkEgressRules("after DeleteNetwork of the other network")
	if err := m.DeleteNetwork(t.Context(), vniOut); err != nil {
		t.Fatal(err)
	}
	if got := fwRules(t, h, "iptables"); len(got) != 0 {
		t.Errorf("iptables rules after the last network:\n%s", strings.Join(got, "\n"))
	}
	if got := iptables(t, h, "iptables", "-t", "nat", "-S", "POSTROUTING"); strings.Contains(got, "consul-overlay") {
		t.Errorf("masquerade rules after the last network:\n%s", got)
	}
}

// EnsureNetwork refuses Egress where it could not work, naming why, and
// leaves nothing behind: on an internal network, and with bridged traffic
// untracked for a bridge in the host's namespace (in the data-plane
// namespace the host's namespace only routes it, tracked). EgressBlocked
// says the same of a new network.
func TestEgressRefused(t *testing.T) {
	t.Parallel()
	inLayouts(t, true, func(t *testing.T, dp bool) {
		h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
		gw := []netip.Prefix{pfx("10.46.0.1/24")}
		_, err := h.egressManager(t).EnsureNetwork(t.Context(), Network{VNI: 0x46, Egress: true, Internal: true, Gateways: gw})
		if err == nil || !strings.Contains(err.Error(), "internal") {
			t.Errorf("internal network with egress: error %v, want one naming internal", err)
		}
		// EgressBlocked, the driver's question for a new network's default,
		// answers as EnsureNetwork would.
		if err := h.egressManager(t).EgressBlocked(); err != nil {
			t.Errorf("EgressBlocked with iptables and bridged traffic tracked: %v", err)
		}
		blocked := h.m.EgressBlocked()
		_, err = h.m.EnsureNetwork(t.Context(), Network{VNI: 0x47, Egress: true, Gateways: gw})
		if (blocked == nil) != (err == nil) {
			t.Errorf("EgressBlocked %v, but EnsureNetwork of an egress network: %v", blocked, err)
		}
		switch {
		case dp && err != nil:
			t.Errorf("egress in the data-plane namespace with NoTrackBridged: %v", err)
		case !dp && (err == nil || !strings.Contains(err.Error(), "BRIDGE_CONNTRACK")):
			t.Errorf("egress with NoTrackBridged: error %v, want one naming BRIDGE_CONNTRACK", err)
		}
		if !dp {
			if got := linkNames(t, h); slices.ContainsFunc(got, func(n string) bool { return strings.Contains(n, "000046") || strings.Contains(n, "000047") }) {
				t.Errorf("links after refused networks: %q", got)
			}
			// A restart that finds the setting changed under an egress
			// network keeps the network, and says so.
			var logged bytes.Buffer
			m := h.managerWith(t, func(cfg *Config) { cfg.Logger = slog.New(slog.NewTextHandler(&logged, nil)) })
			if _, err := m.Reconcile(t.Context(), State{Networks: []Network{{VNI: 0x47, Egress: true, Gateways: gw}}}); err != nil {
				t.Fatalf("reconcile of an egress network with bridged traffic untracked: %v", err)
			}
			if !slices.Contains(linkNames(t, h), BridgeName(0x47)) || !strings.Contains(logged.String(), "egress network without its way out") {
				t.Errorf("reconcile of an egress network with bridged traffic untracked: links %q, log:\n%s", linkNames(t, h), logged.String())
			}
		}
	})
}

// The egress plan, from listings: a set that lost a rule is written again
// whole (its rules could not keep their order otherwise); an EnsureNetwork
// of another network keeps a network's set and masquerade; a complete spec
// drops those of a network it does not list; an ip6tables command gets
// none; and the flavour move reads a network's Egress and subnet back from
// its masquerade rule.
func TestPlanEgress(t *testing.T) {
	f := &firewall{log: slog.New(slog.DiscardHandler), mark: OwnerAlias, v6: map[string]bool{"ip6tables": true}}
	br, other := "vxbr-000046", "vxbr-000047"
	egress := Network{VNI: 0x46, Egress: true, Gateways: []netip.Prefix{pfx("10.46.0.1/24"), pfx("fd46::1/64")}}
	listed := func(lines ...string) listing {
		l := listing{}
		parseListing(l, "", "*filter\n:"+FirewallChain+" - [0:0]\n"+strings.Join(lines, "\n")+"\nCOMMIT\n*nat\n:POSTROUTING ACCEPT [0:0]\n"+
			"-A POSTROUTING -s 10.46.0.0/24 ! -o "+br+" -m comment --comment consul-overlay -j MASQUERADE\nCOMMIT\n")
		return l
	}
	plan := func(bin string, l listing, s fwSpec) []string {
		var b batch
		f.planForward(&b, bin, l, s)
		f.planNat(&b, bin, l, s)
		var out []string
		for _, w := range b {
			out = append(out, w.table+": "+strings.Join(w.args, " "))
		}
		return out
	}
	var set []string
	for _, r := range egressRules(br, OwnerAlias) {
		set = append(set, "-A "+FirewallChain+" "+strings.Join(r, " "))
	}
	whole := listed(set...)
	lost := listed(slices.Delete(slices.Clone(set), 2, 3)...)

	if got := plan("iptables", whole, fwSpec{bridges: map[string]Network{br: egress}}); len(got) != 0 {
		t.Errorf("whole set planned again:\n%s", strings.Join(got, "\n"))
	}
	got := plan("iptables", lost, fwSpec{bridges: map[string]Network{br: egress}})
	if want := 2*len(set) - 1; len(got) != want || !strings.HasPrefix(got[len(got)-1], "filter: -I "+FirewallChain+" 1 -o "+br+" -m conntrack") {
		t.Errorf("a set that lost a rule: plan\n%s\nwant %d deletes and the whole set inserted, its first rule last", strings.Join(got, "\n"), want)
	}
	if got := plan("iptables", whole, fwSpec{bridges: map[string]Network{other: {VNI: 0x47}}, shared: sharedWant}); slices.ContainsFunc(got, func(w string) bool { return strings.Contains(w, br) }) {
		t.Errorf("another network's EnsureNetwork touches the egress network's rules:\n%s", strings.Join(got, "\n"))
	}
	got = plan("iptables", whole, fwSpec{bridges: map[string]Network{other: {VNI: 0x47}}, shared: sharedWant, complete: true})
	if n := len(slices.DeleteFunc(slices.Clone(got), func(w string) bool { return !strings.Contains(w, "-D") || !strings.Contains(w, br) })); n != len(set)+1 {
		t.Errorf("a complete spec without the egress network: plan\n%s\nwant its %d rules and its masquerade deleted", strings.Join(got, "\n"), len(set))
	}
	if got := plan("ip6tables", listing{}, fwSpec{bridges: map[string]Network{br: egress}}); len(got) != 0 {
		t.Errorf("ip6tables plan for an egress network:\n%s", strings.Join(got, "\n"))
	}

	// The ACCEPT of bridged frames stays above every egress rule: a new
	// set goes right under it when it is first; otherwise the ACCEPT is
	// moved in the same transaction when a set goes above it or sits
	// there, and left where it is when nothing would be (no restore
	// command, or already first).
	accept, drops := forwardRules(OwnerAlias)
	acceptLine := "-A " + FirewallChain + " " + strings.Join(accept, " ")
	var dropLines []string
	for _, d := range drops {
		dropLines = append(dropLines, "-A "+FirewallChain+" "+strings.Join(d, " "))
	}
	move := []string{"filter: -D " + FirewallChain + " " + strings.Join(accept, " "), "filter: -I " + FirewallChain + " 1 " + strings.Join(accept, " ")}
	want := fwSpec{bridges: map[string]Network{br: egress}, shared: sharedWant}
	f.restore = map[string]string{"iptables": "iptables-restore"}
	got = plan("iptables", listed(slices.Concat([]string{acceptLine}, dropLines)...), want)
	if len(got) != len(set) || !slices.ContainsFunc(got, func(w string) bool { return strings.Contains(w, "-I "+FirewallChain+" 2 -i "+br+" -m comment") }) ||
		!strings.HasPrefix(got[len(got)-1], "filter: -I "+FirewallChain+" 2 -o "+br+" -m conntrack") {
		t.Errorf("a new egress network under an ACCEPT that is first: plan\n%s\nwant its set inserted right under it (position 2), its first rule last, and no move", strings.Join(got, "\n"))
	}
	var otherSet []string
	for _, r := range egressRules(other, OwnerAlias) {
		otherSet = append(otherSet, "-A "+FirewallChain+" "+strings.Join(r, " "))
	}
	got = plan("iptables", listed(slices.Concat(otherSet, []string{acceptLine}, dropLines)...), want)
	if len(got) != len(set)+2 || !strings.HasPrefix(got[len(set)-1], "filter: -I "+FirewallChain+" 1 -o "+br+" -m conntrack") || !slices.Equal(got[len(set):], move) {
		t.Errorf("a new egress network while another's set is above the ACCEPT: plan\n%s\nwant its set inserted at the top, then the ACCEPT moved there", strings.Join(got, "\n"))
	}
	if got := plan("iptables", listed(slices.Concat(set, []string{acceptLine}, dropLines)...), want); !slices.Equal(got, move) {
		t.Errorf("a whole set above the ACCEPT (an earlier release's order): plan\n%s\nwant the ACCEPT moved:\n%s", strings.Join(got, "\n"), strings.Join(move, "\n"))
	}
	if got := plan("iptables", listed(slices.Concat([]string{acceptLine}, set, dropLines)...), want); len(got) != 0 {
		t.Errorf("the ACCEPT above a whole set: plan\n%s\nwant nothing", strings.Join(got, "\n"))
	}
	f.restore = nil
	if got := plan("iptables", listed(slices.Concat(set, []string{acceptLine}, dropLines)...), want); len(got) != 0 {
		t.Errorf("without iptables-restore: plan\n%s\nwant nothing (a move would leave bridged frames a gap)", strings.Join(got, "\n"))
	}

	held := f.heldNetwork(map[string]listing{"iptables": whole}, br, netip.Addr{})
	if !held.Egress || !slices.Equal(held.Gateways, []netip.Prefix{pfx("10.46.0.0/24")}) {
		t.Errorf("held network %+v, want Egress with 10.46.0.0/24", held)
	}
}
