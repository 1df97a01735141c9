package vxlan

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"consul-overlay/internal/testenv"
)

// Two hosts, one dual-stack network, a container on each: they ping each
// other over VXLAN with IPv4 and IPv6 overlay addresses, the host reaches
// its own endpoint through the bridge's gateway address (the gateway link
// in the data-plane layout), and the MTU is exact: a full-size packet
// passes, one byte more with DF fails at the sender instead of vanishing.
// In both layouts.
func TestOverlayPing(t *testing.T) {
	for _, tt := range []struct {
		name    string
		v6      bool
		wantMTU int
	}{
		{"ipv4 underlay", false, 1450},
		{"ipv6 underlay", true, 1430},
	} {
		for _, lay := range layouts {
			t.Run(tt.name+"/"+lay.name, func(t *testing.T) {
				t.Parallel()
				testOverlayPing(t, tt.v6, tt.wantMTU, lay.dp)
			})
		}
	}
}

func testOverlayPing(t *testing.T, v6 bool, wantMTU int, dp bool) {
	tt := struct{ wantMTU int }{wantMTU}
	{
		{
			hosts := newHostsIn(t, 2, testenv.UnderlayOptions{IPv6: v6}, dp)
			const vni = 0x1234
			nw := Network{VNI: vni, Gateways: []netip.Prefix{pfx("10.10.0.1/24"), pfx("fd00:10::1/64")}}
			want := NetworkInfo{Bridge: "vxbr-001234", VXLAN: "vx-001234", MTU: tt.wantMTU}
			if dp {
				want.Gateway = "vxg-001234"
			}
			for _, h := range hosts {
				info, err := h.m.EnsureNetwork(t.Context(), nw)
				if err != nil {
					t.Fatal(err)
				}
				if info != want {
					t.Fatalf("NetworkInfo %+v, want %+v", info, want)
				}
			}
			c1 := hosts[0].run(t, vni, []netip.Prefix{pfx("10.10.0.2/24"), pfx("fd00:10::2/64")})
			c2 := hosts[1].run(t, vni, []netip.Prefix{pfx("10.10.0.3/24"), pfx("fd00:10::3/64")})
			c1.announce(t, hosts[1])
			c2.announce(t, hosts[0])

			// The VXLAN device as designed.
			vx, ok := link(t, hosts[0], "vx-001234").(*netlink.Vxlan)
			if !ok {
				t.Fatal("vx-001234 is not a vxlan device")
			}
			src, _ := netip.AddrFromSlice(vx.SrcAddr)
			if vx.VxlanId != vni || vx.Port != DefaultPort || vx.Learning || !vx.Proxy || src.Unmap() != hosts[0].Addr || vx.VtepDevIndex != 0 {
				t.Errorf("vxlan device: id %d port %d learning %v proxy %v local %v dev %d", vx.VxlanId, vx.Port, vx.Learning, vx.Proxy, vx.SrcAddr, vx.VtepDevIndex)
			}
			for _, name := range []string{"vx-001234", "vxbr-001234", HostIfName(c1.id)} {
				l := link(t, hosts[0], name)
				if l.Attrs().Alias != OwnerAlias || l.Attrs().MTU != tt.wantMTU {
					t.Errorf("%s: alias %q mtu %d", name, l.Attrs().Alias, l.Attrs().MTU)
				}
			}
			eth0, err := c1.ns.Handle().LinkByName("eth0")
			if err != nil {
				t.Fatal(err)
			}
			if eth0.Attrs().MTU != tt.wantMTU || eth0.Attrs().HardwareAddr.String() != "02:42:0a:0a:00:02" {
				t.Errorf("container eth0: mtu %d mac %s", eth0.Attrs().MTU, eth0.Attrs().HardwareAddr)
			}

			mustPing(t, c1.ns, addr("10.10.0.3"))
			mustPing(t, c2.ns, addr("10.10.0.2"))
			mustPing(t, c1.ns, addr("fd00:10::3"))
			mustPing(t, c2.ns, addr("fd00:10::2"))
			mustPing(t, hosts[0].NS, addr("10.10.0.2")) // host to its own endpoint

			// Neighbour requests are answered by the VXLAN device from the
			// programmed entries: a peer with no container behind it still
			// resolves, which only the proxy can do.
			ghost := MACFromIP(addr("10.10.0.77"))
			for _, ip := range []string{"10.10.0.77", "fd00:10::77"} {
				if err := hosts[0].m.AddPeer(t.Context(), Peer{VNI: vni, IP: addr(ip), MAC: ghost, VTEP: hosts[1].Addr}); err != nil {
					t.Fatal(err)
				}
				_, _ = ping(t, c1.ns, addr(ip), 1)
				out := c1.ns.MustRun(t, "ip", "neigh", "show", ip)
				if !strings.Contains(out, ghost.String()) {
					t.Errorf("neighbour entry for %s in the container: %q, want it resolved to %s by the proxy", ip, out, ghost)
				}
			}

			t.Run("large packets", func(t *testing.T) {
				for _, dst := range []string{"10.10.0.3", "fd00:10::3"} {
					ip := addr(dst)
					hdr := 28 // IPv4 20 + ICMP 8
					if ip.Is6() {
						hdr = 48 // IPv6 40 + ICMPv6 8
					}
					full := strconv.Itoa(tt.wantMTU - hdr)
					if out, err := ping(t, c1.ns, ip, 2, "-M", "do", "-s", full); err != nil {
						t.Errorf("full-size ping (-s %s) to %s: %v\n%s", full, dst, err, out)
					}
					over := strconv.Itoa(tt.wantMTU - hdr + 1)
					// Without -q, which hides the sender's error.
					out, err := c1.ns.Run(t, "ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", over, dst)
					if err == nil {
						t.Errorf("oversize ping (-s %s) to %s succeeded", over, dst)
					}
					// IPv4 prints "mtu=1450", IPv6 "mtu: 1450".
					if !regexp.MustCompile(`message too long, mtu[=:] ?` + strconv.Itoa(tt.wantMTU) + `\b`).MatchString(out) {
						t.Errorf("oversize ping to %s did not fail at the sender with an MTU error:\n%s", dst, out)
					}
				}
			})
		}
	}
}

// iptables runs an iptables command in h's namespace.
func iptables(t *testing.T, h *testHost, cmd string, args ...string) string {
	t.Helper()
	return h.NS.MustRun(t, append([]string{cmd, "-w"}, args...)...)
}

// ruleCounter returns the packet counter of the rule of our chain that
// reads rule in `iptables -S` (without counters).
func ruleCounter(t *testing.T, h *testHost, cmd, rule string) int {
	t.Helper()
	out := iptables(t, h, cmd, "-S", FirewallChain, "-v")
	for _, l := range strings.Split(out, "\n") {
		m := countersRE.FindStringSubmatch(l)
		if m == nil || countersRE.ReplaceAllString(l, "") != rule {
			continue
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	t.Fatalf("no rule %q in\n%s", rule, out)
	return 0
}

// forwardJumpLines are FORWARD's jumps to our chain as `iptables -S`
// lists them, in order (forwardJumps).
func forwardJumpLines() []string {
	var out []string
	for _, c := range forwardJumps() {
		out = append(out, jumpLine("FORWARD", FirewallChain, c))
	}
	return out
}

// checkForwardJumps fails the test unless FORWARD's rules, after the
// first `at` of them, start with our jumps, in order.
func checkForwardJumps(t *testing.T, h *testHost, cmd string, at int, when string) {
	t.Helper()
	fwd := strings.Split(strings.TrimSpace(iptables(t, h, cmd, "-S", "FORWARD")), "\n")[1:] // without -P
	want := forwardJumpLines()
	if len(fwd) < at+len(want) || !slices.Equal(fwd[at:at+len(want)], want) {
		t.Errorf("%s: %s FORWARD:\n%s\nwant our jumps after its first %d rules:\n%s", when, cmd, strings.Join(fwd, "\n"), at, strings.Join(want, "\n"))
	}
}

// forwardJumpPackets returns how many packets FORWARD's jumps to our
// chain have sent there.
func forwardJumpPackets(t *testing.T, h *testHost, cmd string) int {
	t.Helper()
	sum := 0
	for _, l := range strings.Split(iptables(t, h, cmd, "-S", "FORWARD", "-v"), "\n") {
		m := countersRE.FindStringSubmatch(l)
		if m == nil || !strings.HasPrefix(l, "-A FORWARD ") || !strings.HasSuffix(countersRE.ReplaceAllString(l, ""), " -j "+FirewallChain) {
			continue
		}
		n, _ := strconv.Atoi(m[1])
		sum += n
	}
	return sum
}

// With dockerd's FORWARD policy DROP and br_netfilter, bridged traffic
// still flows because of our rules, while traffic routed through the host
// from another network into the overlay is dropped by them.
func TestFirewall(t *testing.T) {
	t.Parallel()
	hosts := newHosts(t, 2, testenv.UnderlayOptions{})
	h0 := hosts[0]
	out := h0.NS.MustRun(t, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables")
	if strings.TrimSpace(out) != "1" {
		h0.NS.MustRun(t, "sysctl", "-w", "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
	}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		iptables(t, h0, cmd, "-P", "FORWARD", "DROP")
		// Something else at the top of FORWARD, as dockerd puts there.
		iptables(t, h0, cmd, "-I", "FORWARD", "1", "-i", "eth9", "-j", "ACCEPT")
	}
	h0.NS.MustRun(t, "sysctl", "-w", "net.ipv4.ip_forward=1")

	const vniA, vniB = 0x10, 0x20
	netA := Network{VNI: vniA, Gateways: []netip.Prefix{pfx("10.10.0.1/24"), pfx("fd00:10::1/64")}}
	for _, h := range hosts {
		if _, err := h.m.EnsureNetwork(t.Context(), netA); err != nil {
			t.Fatal(err)
		}
	}
	a1 := h0.run(t, vniA, []netip.Prefix{pfx("10.10.0.2/24"), pfx("fd00:10::2/64")}, addr("10.10.0.1"))
	a2 := hosts[1].run(t, vniA, []netip.Prefix{pfx("10.10.0.3/24"), pfx("fd00:10::3/64")})
	a1.announce(t, hosts[1])
	a2.announce(t, h0)

	for _, cmd := range []string{"iptables", "ip6tables"} {
		checkForwardJumps(t, h0, cmd, 0, "after EnsureNetwork")
		want := []string{
			"-A CONSUL-OVERLAY -i vxbr-+ -m physdev --physdev-is-bridged -m comment --comment consul-overlay -j ACCEPT",
			"-A CONSUL-OVERLAY -o vxbr-+ -m comment --comment consul-overlay -j DROP",
			"-A CONSUL-OVERLAY -i vxbr-+ -m comment --comment consul-overlay -j DROP",
		}
		if got := fwRules(t, h0, cmd); !slices.Equal(got, want) {
			t.Errorf("%s rules:\n%s\nwant:\n%s", cmd, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}

	mustPing(t, a1.ns, addr("10.10.0.3"))
	mustPing(t, a1.ns, addr("fd00:10::3"))
	// The bridged frames went through FORWARD and our ACCEPT let them.
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if n := ruleCounter(t, h0, cmd, "-A CONSUL-OVERLAY -i vxbr-+ -m physdev --physdev-is-bridged -m comment --comment consul-overlay -j ACCEPT"); n == 0 {
			t.Errorf("%s: our ACCEPT rule saw no packets; the test does not exercise br_netfilter", cmd)
		}
	}

	// A second network on the same host, routed towards the first.
	netB := Network{VNI: vniB, Gateways: []netip.Prefix{pfx("10.20.0.1/24")}}
	if _, err := h0.m.EnsureNetwork(t.Context(), netB); err != nil {
		t.Fatal(err)
	}
	b1 := h0.run(t, vniB, []netip.Prefix{pfx("10.20.0.2/24")}, addr("10.20.0.1"))
	mustPing(t, b1.ns, addr("10.20.0.1")) // the host itself is reachable
	mustNotPing(t, b1.ns, addr("10.10.0.2"))
	routedIn := ruleCounter(t, h0, "iptables", "-A CONSUL-OVERLAY -o vxbr-+ -m comment --comment consul-overlay -j DROP")
	routedOut := ruleCounter(t, h0, "iptables", "-A CONSUL-OVERLAY -i vxbr-+ -m comment --comment consul-overlay -j DROP")
	if routedIn+routedOut == 0 {
		t.Error("packets routed from network B into network A were not dropped by our rules")
	}

	// The rule set does not grow with the networks: the same three rules.
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if got := fwRules(t, h0, cmd); len(got) != 3 {
			t.Errorf("%s rules with two networks:\n%s\nwant the same 3", cmd, strings.Join(got, "\n"))
		}
	}

	// The rules stay while a network of ours does, and go with the last.
	if err := h0.m.DeleteNetwork(t.Context(), vniB); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if got := fwRules(t, h0, cmd); len(got) != 3 {
			t.Errorf("%s rules after deleting one of two networks:\n%s\nwant the 3", cmd, strings.Join(got, "\n"))
		}
	}
	mustPing(t, a1.ns, addr("10.10.0.3"))
	if err := h0.m.DeleteNetwork(t.Context(), vniA); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if got := fwRules(t, h0, cmd); len(got) != 0 {
			t.Errorf("%s rules after deleting the last network:\n%s", cmd, strings.Join(got, "\n"))
		}
	}
	// Nor the underlay filter: it would outlive the plugin and drop
	// another VXLAN user's traffic on the port.
	if got := iptables(t, h0, "iptables", "-S", InputChain); strings.Contains(got, "--dport") {
		t.Errorf("underlay filter after deleting the last network:\n%s", got)
	}
}

// A container on another VNI, with addresses in the same subnet, reaches
// neither the first network's local nor its remote containers.
func TestIsolation(t *testing.T) {
	inLayouts(t, true, testIsolation)
}

func testIsolation(t *testing.T, dp bool) {
	hosts := newHostsIn(t, 2, testenv.UnderlayOptions{}, dp)
	const vniA, vniB = 0x100, 0x200
	for _, h := range hosts {
		for _, vni := range []uint32{vniA, vniB} {
			if _, err := h.m.EnsureNetwork(t.Context(), Network{VNI: vni}); err != nil {
				t.Fatal(err)
			}
		}
	}
	a1 := hosts[0].run(t, vniA, []netip.Prefix{pfx("10.30.0.2/24")})
	a2 := hosts[1].run(t, vniA, []netip.Prefix{pfx("10.30.0.3/24")})
	b1 := hosts[0].run(t, vniB, []netip.Prefix{pfx("10.30.0.4/24")})
	b2 := hosts[1].run(t, vniB, []netip.Prefix{pfx("10.30.0.5/24")})
	a1.announce(t, hosts[1])
	a2.announce(t, hosts[0])
	b1.announce(t, hosts[1])
	b2.announce(t, hosts[0])

	mustPing(t, a1.ns, addr("10.30.0.3"))
	mustPing(t, b1.ns, addr("10.30.0.5"))
	mustNotPing(t, b1.ns, addr("10.30.0.3")) // remote, other VNI
	mustNotPing(t, b1.ns, addr("10.30.0.2")) // same host, other VNI
	mustNotPing(t, a2.ns, addr("10.30.0.5"))
}

// Peer entries are refcounted: the FDB entry of a MAC lives while any of
// its addresses is a peer, the all-zeros destination while any peer is
// behind the VTEP; removal is idempotent; a duplicate IP falls back to the
// earlier peer; peers added before their network are programmed with it.
func TestPeerEntries(t *testing.T) {
	inLayouts(t, true, testPeerEntries)
}

func testPeerEntries(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	ctx := t.Context()
	const vni = 0x77
	v1, v2 := addr("192.0.2.2"), addr("192.0.2.3")
	m1, m2, m3, m4 := MACFromIP(addr("10.0.0.2")), MACFromIP(addr("10.0.0.3")), MACFromIP(addr("10.0.0.4")), net.HardwareAddr{2, 0x42, 9, 9, 9, 9}
	p1v4 := Peer{VNI: vni, IP: addr("10.0.0.2"), MAC: m1, VTEP: v1}
	p1v6 := Peer{VNI: vni, IP: addr("fd00::2"), MAC: m1, VTEP: v1}
	p2 := Peer{VNI: vni, IP: addr("10.0.0.3"), MAC: m2, VTEP: v1}
	p3 := Peer{VNI: vni, IP: addr("10.0.0.4"), MAC: m3, VTEP: v2}
	dup := Peer{VNI: vni, IP: addr("10.0.0.4"), MAC: m4, VTEP: v1}

	// Before the network exists: kept, then programmed.
	if err := h.m.AddPeer(ctx, p1v4); err != nil {
		t.Fatal(err)
	}
	if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []Peer{p1v4, p1v6, p2, p3, p3} {
		if err := h.m.AddPeer(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	zero := "00:00:00:00:00:00 "
	check := func(step string, neigh, fdb []string) {
		t.Helper()
		slices.Sort(neigh)
		slices.Sort(fdb)
		got := entries(t, h, vni)
		if !slices.Equal(got.neigh, neigh) {
			t.Errorf("%s: neighbours\n%v\nwant\n%v", step, got.neigh, neigh)
		}
		if !slices.Equal(got.fdb, fdb) {
			t.Errorf("%s: fdb\n%v\nwant\n%v", step, got.fdb, fdb)
		}
	}
	n1v4, n1v6, n2, n3 := "10.0.0.2 "+m1.String(), "fd00::2 "+m1.String(), "10.0.0.3 "+m2.String(), "10.0.0.4 "+m3.String()
	f1, f2, f3 := m1.String()+" 192.0.2.2", m2.String()+" 192.0.2.2", m3.String()+" 192.0.2.3"
	check("all added", []string{n1v4, n1v6, n2, n3}, []string{f1, f2, f3, zero + "192.0.2.2", zero + "192.0.2.3"})

	if err := h.m.DeletePeer(ctx, p1v4); err != nil {
		t.Fatal(err)
	}
	check("v4 of the dual-stack peer removed", []string{n1v6, n2, n3}, []string{f1, f2, f3, zero + "192.0.2.2", zero + "192.0.2.3"})
	if err := h.m.DeletePeer(ctx, p1v6); err != nil {
		t.Fatal(err)
	}
	check("dual-stack peer removed", []string{n2, n3}, []string{f2, f3, zero + "192.0.2.2", zero + "192.0.2.3"})

	if err := h.m.AddPeer(ctx, dup); err != nil {
		t.Fatal(err)
	}
	check("duplicate IP added", []string{n2, "10.0.0.4 " + m4.String()}, []string{f2, f3, m4.String() + " 192.0.2.2", zero + "192.0.2.2", zero + "192.0.2.3"})
	if err := h.m.DeletePeer(ctx, dup); err != nil {
		t.Fatal(err)
	}
	check("duplicate IP removed", []string{n2, n3}, []string{f2, f3, zero + "192.0.2.2", zero + "192.0.2.3"})

	if err := h.m.DeletePeer(ctx, p2); err != nil {
		t.Fatal(err)
	}
	check("last peer on 192.0.2.2 removed", []string{n3}, []string{f3, zero + "192.0.2.3"})
	for _, p := range []Peer{p2, p1v4} {
		if err := h.m.DeletePeer(ctx, p); err != nil {
			t.Fatalf("second delete: %v", err)
		}
	}
	if err := h.m.DeletePeer(ctx, p3); err != nil {
		t.Fatal(err)
	}
	check("all removed", nil, nil)
}

// reconcileState is the desired state of host 0 in the reconcile tests.
func reconcileState(nw Network, local *container, remote *container) State {
	return State{
		Networks:  []Network{nw},
		Endpoints: []Endpoint{{ID: local.id, VNI: local.vni, MAC: local.mac}},
		Peers:     remote.peers(),
	}
}

// twoContainers builds a network on two hosts with one container each.
func twoContainers(t *testing.T) ([]*testHost, Network, *container, *container) {
	return twoContainersIn(t, false)
}

// twoContainersIn is twoContainers; with dp in the data-plane layout.
func twoContainersIn(t *testing.T, dp bool) ([]*testHost, Network, *container, *container) {
	hosts := newHostsIn(t, 2, testenv.UnderlayOptions{}, dp)
	n := Network{VNI: 0xabc, Gateways: []netip.Prefix{pfx("10.40.0.1/24"), pfx("fd00:40::1/64")}}
	for _, h := range hosts {
		if _, err := h.m.EnsureNetwork(t.Context(), n); err != nil {
			t.Fatal(err)
		}
	}
	c1 := hosts[0].run(t, n.VNI, []netip.Prefix{pfx("10.40.0.2/24"), pfx("fd00:40::2/64")})
	c2 := hosts[1].run(t, n.VNI, []netip.Prefix{pfx("10.40.0.3/24"), pfx("fd00:40::3/64")})
	c1.announce(t, hosts[1])
	c2.announce(t, hosts[0])
	mustPing(t, c1.ns, addr("10.40.0.3"))
	return hosts, n, c1, c2
}

// Reconcile restores a damaged kernel, removes our strays and only ours,
// and changes nothing the second time.
func TestReconcile(t *testing.T) {
	t.Parallel()
	hosts, n, c1, c2 := twoContainers(t)
	h0 := hosts[0]
	hh := h0.NS.Handle()
	want := reconcileState(n, c1, c2)

	ch, err := h0.m.Reconcile(t.Context(), want)
	if err != nil {
		t.Fatal(err)
	}
	if ch != (Changes{}) {
		t.Fatalf("Reconcile of a correct kernel changed %+v", ch)
	}

	// Damage: the bridge deleted by hand, strays of ours, links that are
	// not ours, stale entries, a stale rule, the jump pushed down.
	if err := hh.LinkDel(link(t, h0, "vxbr-000abc")); err != nil {
		t.Fatal(err)
	}
	mk := func(l netlink.Link, alias bool) {
		t.Helper()
		if err := hh.LinkAdd(l); err != nil {
			t.Fatalf("add %s: %v", l.Attrs().Name, err)
		}
		if alias {
			if err := hh.LinkSetAlias(l, OwnerAlias); err != nil {
				t.Fatal(err)
			}
		}
	}
	mk(&netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "vx-00beef"}, VxlanId: 0xbeef, SrcAddr: h0.Addr.AsSlice(), Port: DefaultPort}, true)
	mk(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "vxbr-00beef"}}, true)
	mk(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vxh-dead00beef"}, PeerName: "vxc-dead00beef"}, true)
	mk(&netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "vx-00cafe"}, VxlanId: 0xcafe, SrcAddr: h0.Addr.AsSlice(), Port: DefaultPort}, false)
	mk(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br-0123456789ab"}}, true)
	mk(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "veth1234567"}, PeerName: "veth7654321"}, true)
	vx := link(t, h0, "vx-000abc")
	var ch0 Changes
	// setFDB and setNeigh expect their caller to hold m.mu, as the
	// Manager's own callers do (a shared neighbour dump's expiry takes it).
	h0.m.mu.Lock()
	errFDB := h0.m.setFDB(h0.m.host, vx, [6]byte{2, 0x42, 0xde, 0xad, 0xbe, 0xef}, addr("192.0.2.9"), &ch0)
	errNeigh := h0.m.setNeigh(h0.m.host, vx, addr("10.40.0.99"), [6]byte{2, 0x42, 0xde, 0xad, 0xbe, 0xef}, &ch0)
	h0.m.mu.Unlock()
	if err := errors.Join(errFDB, errNeigh); err != nil {
		t.Fatal(err)
	}
	iptables(t, h0, "iptables", "-A", FirewallChain, "-o", "vxbr-00beef", "-j", "DROP")
	iptables(t, h0, "iptables", "-I", "FORWARD", "1", "-i", "eth9", "-j", "ACCEPT")
	mustNotPing(t, c1.ns, addr("10.40.0.3"))

	ch, err = h0.m.Reconcile(t.Context(), want)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("changes: %+v", ch)
	if ch.Links < 4 || ch.FDB == 0 || ch.Neighbours == 0 || ch.Rules < 3 || ch.Addrs < 2 {
		t.Errorf("changes %+v: want the bridge, strays, entries, rules and addresses counted", ch)
	}
	names := linkNames(t, h0)
	wantNames := []string{"br-0123456789ab", HostIfName(c1.id), "veth1234567", "veth7654321", "vx-000abc", "vx-00cafe", "vxbr-000abc"}
	slices.Sort(wantNames)
	if !slices.Equal(names, wantNames) {
		t.Errorf("links after reconcile:\n%v\nwant\n%v", names, wantNames)
	}
	br := link(t, h0, "vxbr-000abc")
	for _, name := range []string{"vx-000abc", HostIfName(c1.id)} {
		if l := link(t, h0, name); l.Attrs().MasterIndex != br.Attrs().Index {
			t.Errorf("%s not on the bridge", name)
		}
	}
	addrs, err := hh.AddrList(br, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range addrs {
		if !a.IP.IsLinkLocalUnicast() {
			got = append(got, a.IPNet.String())
		}
	}
	slices.Sort(got)
	if !slices.Equal(got, []string{"10.40.0.1/24", "fd00:40::1/64"}) {
		t.Errorf("bridge addresses %v", got)
	}
	e := entries(t, h0, n.VNI)
	m2 := c2.mac.String()
	wantFDB := []string{"00:00:00:00:00:00 192.0.2.2", m2 + " 192.0.2.2"}
	wantNeigh := []string{"10.40.0.3 " + m2, "fd00:40::3 " + m2}
	if !slices.Equal(e.fdb, wantFDB) || !slices.Equal(e.neigh, wantNeigh) {
		t.Errorf("entries after reconcile: %+v, want fdb %v neigh %v", e, wantFDB, wantNeigh)
	}
	if rules := fwRules(t, h0, "iptables"); slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, "00beef") }) {
		t.Errorf("stale rule kept: %v", rules)
	}
	checkForwardJumps(t, h0, "iptables", 0, "after Reconcile")
	mustPing(t, c1.ns, addr("10.40.0.3"))
	mustPing(t, c1.ns, addr("fd00:40::3"))

	ch, err = h0.m.Reconcile(t.Context(), want)
	if err != nil {
		t.Fatal(err)
	}
	if ch != (Changes{}) {
		t.Errorf("second Reconcile changed %+v", ch)
	}

	// An empty desired state removes everything of ours, and only that.
	if _, err := h0.m.Reconcile(t.Context(), State{}); err != nil {
		t.Fatal(err)
	}
	if names := linkNames(t, h0); !slices.Equal(names, []string{"br-0123456789ab", "veth1234567", "veth7654321", "vx-00cafe"}) {
		t.Errorf("links after empty reconcile: %v", names)
	}
	if rules := fwRules(t, h0, "iptables"); len(rules) != 0 {
		t.Errorf("rules after empty reconcile: %v", rules)
	}
}

// Reconcile on a correct kernel does not drop a single packet of a running
// container.
func TestReconcileKeepsTraffic(t *testing.T) {
	inLayouts(t, true, testReconcileKeepsTraffic)
}

func testReconcileKeepsTraffic(t *testing.T, dp bool) {
	hosts, n, c1, c2 := twoContainersIn(t, dp)
	want := reconcileState(n, c1, c2)
	cmd := c1.ns.Command(t.Context(), "ping", "-n", "-q", "-i", "0.05", "-c", "100", "-W", "1", "10.40.0.3")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		time.Sleep(600 * time.Millisecond)
		ch, err := hosts[0].m.Reconcile(t.Context(), want)
		if err != nil {
			t.Error(err)
		}
		if ch != (Changes{}) {
			t.Errorf("Reconcile changed %+v", ch)
		}
	}
	err := cmd.Wait()
	if err != nil || !strings.Contains(out.String(), " 0% packet loss") {
		t.Fatalf("ping during reconcile: %v\n%s", err, out.String())
	}
}

// A failure at any step of creating a network or an endpoint leaves
// nothing behind: no links, no FDB entries, no firewall rules. With an
// owner and another owner's network next to it, the rollback removes its
// own objects and leaves the other's intact.
func TestRollback(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct{ name, owner, neighbour string }{
		{"default owner", "", ""},
		{"owner beside another", "r1", "r2"},
	} {
		for _, lay := range layouts {
			t.Run(tt.name+"/"+lay.name, func(t *testing.T) {
				t.Parallel()
				testRollback(t, tt.owner, tt.neighbour, lay.dp)
			})
		}
	}
}

func testRollback(t *testing.T, owner, neighbour string, dp bool) {
	th := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	h := &testHost{Host: th.Host, dp: th.dp, m: th.manager(t, owner)}
	ctx := t.Context()
	const vni = 0x55
	n := Network{VNI: vni, Gateways: []netip.Prefix{pfx("10.50.0.1/24"), pfx("fd00:50::1/64")}}
	if neighbour != "" {
		other := h.manager(t, neighbour)
		const ovni = 0x56
		if _, err := other.EnsureNetwork(ctx, Network{VNI: ovni, Gateways: []netip.Prefix{pfx("10.51.0.1/24")}}); err != nil {
			t.Fatal(err)
		}
		if _, err := other.EnsureEndpoint(ctx, Endpoint{ID: strings.Repeat("56", 32), VNI: ovni, MAC: MACFromIP(addr("10.51.0.2"))}); err != nil {
			t.Fatal(err)
		}
		if err := other.AddPeer(ctx, Peer{VNI: ovni, IP: addr("10.51.0.9"), MAC: MACFromIP(addr("10.51.0.9")), VTEP: addr("192.0.2.2")}); err != nil {
			t.Fatal(err)
		}
	}
	fdbDsts := func() []string {
		var out []string
		for _, ns := range h.namespaces() {
			for _, l := range strings.Split(ns.MustRun(t, "bridge", "fdb", "show"), "\n") {
				if strings.Contains(l, "dst") {
					out = append(out, l)
				}
			}
		}
		return out
	}
	baseLinks, baseFDB := linkNames(t, h), fdbDsts()
	baseRules := map[string][]string{}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		baseRules[cmd] = fwRules(t, h, cmd)
	}
	var baseOther ownerState
	if neighbour != "" {
		baseOther = snapshot(t, h, neighbour)
		wantLinks, wantRules := 4, 3 // vx, vxbr, vxh, vxc; the FORWARD rules
		if dp {
			wantLinks, wantRules = 6, 5 // and vxp, vxg; and the gateway links' DROPs
		}
		if len(baseOther.Links) != wantLinks || len(baseFDB) == 0 || len(baseRules["iptables"]) != wantRules {
			t.Fatalf("neighbour's network not set up: %+v", baseOther)
		}
	}

	// A peer known before the network, so the create path programs it.
	if err := h.m.AddPeer(ctx, Peer{VNI: vni, IP: addr("10.50.0.9"), MAC: MACFromIP(addr("10.50.0.9")), VTEP: addr("192.0.2.2")}); err != nil {
		t.Fatal(err)
	}
	injected := errors.New("injected")
	failAt := func(step string, hit *bool) func(string) error {
		return func(s string) error {
			if s == step {
				*hit = true
				return injected
			}
			return nil
		}
	}
	clean := func(step string) {
		t.Helper()
		if names := linkNames(t, h); !slices.Equal(names, baseLinks) {
			t.Errorf("step %s: links %v, want %v", step, names, baseLinks)
		}
		if got := fdbDsts(); !slices.Equal(got, baseFDB) {
			t.Errorf("step %s: fdb entries\n%s\nwant\n%s", step, strings.Join(got, "\n"), strings.Join(baseFDB, "\n"))
		}
		for _, cmd := range []string{"iptables", "ip6tables"} {
			if rules := fwRules(t, h, cmd); !slices.Equal(rules, baseRules[cmd]) {
				t.Errorf("step %s: %s rules %v, want %v", step, cmd, rules, baseRules[cmd])
			}
		}
		if neighbour != "" {
			sameState(t, "step "+step+": neighbour", snapshot(t, h, neighbour), baseOther)
		}
	}
	steps := networkSteps
	if dp {
		steps = slices.Concat(networkSteps, gatewaySteps)
	}
	for _, step := range steps {
		t.Run("network/"+step, func(t *testing.T) {
			var hit bool
			h.m.failAt = failAt(step, &hit)
			defer func() { h.m.failAt = nil }()
			_, err := h.m.EnsureNetwork(ctx, n)
			if !hit {
				t.Fatalf("step %s never reached", step)
			}
			if !errors.Is(err, injected) {
				t.Fatalf("EnsureNetwork error %v, want the injected one", err)
			}
			clean(step)
		})
	}

	// Endpoint steps: the network stays, the veth pair goes.
	if _, err := h.m.EnsureNetwork(ctx, n); err != nil {
		t.Fatal(err)
	}
	before := linkNames(t, h)
	ep := Endpoint{ID: strings.Repeat("ab", 32), VNI: vni, MAC: MACFromIP(addr("10.50.0.2"))}
	for _, step := range endpointSteps {
		t.Run("endpoint/"+step, func(t *testing.T) {
			var hit bool
			h.m.failAt = failAt(step, &hit)
			defer func() { h.m.failAt = nil }()
			_, err := h.m.EnsureEndpoint(ctx, ep)
			if !hit {
				t.Fatalf("step %s never reached", step)
			}
			if !errors.Is(err, injected) {
				t.Fatalf("EnsureEndpoint error %v, want the injected one", err)
			}
			if names := linkNames(t, h); !slices.Equal(names, before) {
				t.Errorf("links %v, want %v", names, before)
			}
		})
	}
	if _, err := h.m.EnsureEndpoint(ctx, ep); err != nil {
		t.Fatal(err)
	}
	if err := h.m.DeleteNetwork(ctx, vni); err != nil {
		t.Fatal(err)
	}
	clean("delete network")
	// Deletes are idempotent.
	if err := h.m.DeleteNetwork(ctx, vni); err != nil {
		t.Errorf("second DeleteNetwork: %v", err)
	}
	if err := h.m.DeleteEndpoint(ctx, ep.ID); err != nil {
		t.Errorf("DeleteEndpoint of a gone endpoint: %v", err)
	}
}

// The MTU follows the underlay (jumbo frames) and a per-network override,
// on every link of the network.
func TestMTUOnLinks(t *testing.T) {
	inLayouts(t, true, testMTUOnLinks)
}

func testMTUOnLinks(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{MTU: 9000}, dp)[0]
	for _, tt := range []struct {
		net  Network
		want int
	}{
		{Network{VNI: 1}, 8950},
		{Network{VNI: 2, MTU: 1300}, 1300},
	} {
		t.Run(fmt.Sprint(tt.net.VNI), func(t *testing.T) {
			info, err := h.m.EnsureNetwork(t.Context(), tt.net)
			if err != nil {
				t.Fatal(err)
			}
			ep, err := h.m.EnsureEndpoint(t.Context(), Endpoint{ID: fmt.Sprintf("%010d", tt.net.VNI), VNI: tt.net.VNI, MAC: net.HardwareAddr{2, 0x42, 1, 1, 1, byte(tt.net.VNI)}})
			if err != nil {
				t.Fatal(err)
			}
			if info.MTU != tt.want || ep.MTU != tt.want {
				t.Errorf("info mtu %d, endpoint mtu %d, want %d", info.MTU, ep.MTU, tt.want)
			}
			names := []string{info.Bridge, info.VXLAN, ep.HostIf, ep.ContainerIf}
			if dp {
				names = append(names, info.Gateway, PortName(tt.net.VNI))
			}
			for _, name := range names {
				if got := link(t, h, name).Attrs().MTU; got != tt.want {
					t.Errorf("%s mtu %d, want %d", name, got, tt.want)
				}
			}
		})
	}
	// Changing the override adjusts the links in place.
	if _, err := h.m.EnsureNetwork(t.Context(), Network{VNI: 2, MTU: 1200}); err != nil {
		t.Fatal(err)
	}
	names := []string{"vxbr-000002", "vx-000002"}
	if dp {
		names = append(names, "vxg-000002", "vxp-000002")
	}
	for _, name := range names {
		if got := link(t, h, name).Attrs().MTU; got != 1200 {
			t.Errorf("%s mtu %d after override change, want 1200", name, got)
		}
	}
}
