package vxlan

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"consul-overlay/internal/testenv"
)

// inNS reports which of h's namespaces holds the link: "host", "dp" or ""
// (none).
func inNS(t *testing.T, h *testHost, name string) string {
	t.Helper()
	where := ""
	for _, ns := range h.namespaces() {
		if _, err := ns.Handle().LinkByName(name); err == nil {
			if where != "" {
				t.Errorf("%s in both namespaces", name)
			}
			where = "host"
			if ns == h.dp {
				where = "dp"
			}
		}
	}
	return where
}

// globalAddrs lists the global addresses of the named link of ns.
func globalAddrs(t *testing.T, ns *testenv.NetNS, name string) []string {
	t.Helper()
	l, err := ns.Handle().LinkByName(name)
	if err != nil {
		t.Fatalf("link %s: %v", name, err)
	}
	addrs, err := ns.Handle().AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range addrs {
		if !a.IP.IsLinkLocalUnicast() {
			out = append(out, a.IPNet.String())
		}
	}
	slices.Sort(out)
	return out
}

// udpPorts lists the local ports of the UDP sockets of ns (`ss -uanH`).
func udpPorts(t *testing.T, ns *testenv.NetNS) []string {
	t.Helper()
	var ports []string
	for _, l := range strings.Split(ns.MustRun(t, "ss", "-uanH"), "\n") {
		f := strings.Fields(l)
		if len(f) < 4 {
			continue
		}
		local := f[3]
		ports = append(ports, local[strings.LastIndex(local, ":")+1:])
	}
	return ports
}

// Two hosts with the data-plane layout: each network's bridge, VXLAN
// device, endpoint host ends and the gateway pair's bridge end are in the
// data-plane namespace; the container ends (until Docker moves them), the
// gateway link with the gateway addresses, and the VXLAN device's UDP
// socket are in the host's. Containers on the two hosts reach each other
// over IPv4 and IPv6, the host reaches its own container through vxg/vxp
// and the container the host, and a full-size packet passes.
func TestDataplaneLayout(t *testing.T) {
	t.Parallel()
	hosts := newHostsIn(t, 2, testenv.UnderlayOptions{}, true)
	const vni = 0x4242
	nw := Network{VNI: vni, Gateways: []netip.Prefix{pfx("10.42.0.1/24"), pfx("fd00:42::1/64")}}
	for _, h := range hosts {
		info, err := h.m.EnsureNetwork(t.Context(), nw)
		if err != nil {
			t.Fatal(err)
		}
		want := NetworkInfo{Bridge: "vxbr-004242", VXLAN: "vx-004242", MTU: 1450, Gateway: "vxg-004242"}
		if info != want {
			t.Fatalf("NetworkInfo %+v, want %+v", info, want)
		}
	}
	h0 := hosts[0]
	ep, err := h0.m.EnsureEndpoint(t.Context(), Endpoint{ID: strings.Repeat("ee", 32), VNI: vni, MAC: MACFromIP(addr("10.42.0.9"))})
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{
		"vx-004242": "dp", "vxbr-004242": "dp", "vxp-004242": "dp", ep.HostIf: "dp",
		"vxg-004242": "host", ep.ContainerIf: "host",
	} {
		if got := inNS(t, h0, name); got != want {
			t.Errorf("%s in %q, want %q", name, got, want)
		}
		l := link(t, h0, name)
		if l.Attrs().Alias != OwnerAlias || l.Attrs().MTU != 1450 {
			t.Errorf("%s: alias %q mtu %d", name, l.Attrs().Alias, l.Attrs().MTU)
		}
	}
	br := link(t, h0, "vxbr-004242")
	for _, name := range []string{"vx-004242", "vxp-004242", ep.HostIf} {
		if l := link(t, h0, name); l.Attrs().MasterIndex != br.Attrs().Index {
			t.Errorf("%s not on the bridge", name)
		}
	}
	if got := globalAddrs(t, h0.NS, "vxg-004242"); !slices.Equal(got, []string{"10.42.0.1/24", "fd00:42::1/64"}) {
		t.Errorf("vxg-004242 addresses %v", got)
	}
	if got := globalAddrs(t, h0.dp, "vxbr-004242"); len(got) != 0 {
		t.Errorf("bridge addresses %v, want none", got)
	}
	vx, ok := link(t, h0, "vx-004242").(*netlink.Vxlan)
	if !ok {
		t.Fatal("vx-004242 is not a vxlan device")
	}
	if src, _ := netip.AddrFromSlice(vx.SrcAddr); vx.VxlanId != vni || vx.Port != DefaultPort || vx.Learning || !vx.Proxy || src.Unmap() != h0.Addr {
		t.Errorf("vxlan device: id %d port %d learning %v proxy %v local %v", vx.VxlanId, vx.Port, vx.Learning, vx.Proxy, vx.SrcAddr)
	}
	// The UDP socket of the VXLAN device is the host's: the underlay
	// and its allowlist stay where they are.
	if ports := udpPorts(t, h0.NS); !slices.Contains(ports, fmt.Sprint(DefaultPort)) {
		t.Errorf("host's UDP sockets %v: no %d", ports, DefaultPort)
	}
	if ports := udpPorts(t, h0.dp); len(ports) != 0 {
		t.Errorf("data-plane namespace's UDP sockets %v, want none", ports)
	}
	if err := h0.m.DeleteEndpoint(t.Context(), strings.Repeat("ee", 32)); err != nil {
		t.Fatal(err)
	}

	c1 := h0.run(t, vni, []netip.Prefix{pfx("10.42.0.2/24"), pfx("fd00:42::2/64")}, addr("10.42.0.1"))
	c2 := hosts[1].run(t, vni, []netip.Prefix{pfx("10.42.0.3/24"), pfx("fd00:42::3/64")})
	c1.announce(t, hosts[1])
	c2.announce(t, h0)
	if e := entries(t, h0, vni); !slices.Contains(e.neigh, "10.42.0.3 "+c2.mac.String()) || !slices.Contains(e.fdb, "00:00:00:00:00:00 192.0.2.2") {
		t.Errorf("entries of the device in the data-plane namespace: %+v", e)
	}
	mustPing(t, c1.ns, addr("10.42.0.3"))
	mustPing(t, c2.ns, addr("10.42.0.2"))
	mustPing(t, c1.ns, addr("fd00:42::3"))
	mustPing(t, c2.ns, addr("fd00:42::2"))
	mustPing(t, h0.NS, addr("10.42.0.2"))  // host to its own container, through vxg/vxp
	mustPing(t, h0.NS, addr("fd00:42::2")) // and over IPv6
	mustPing(t, c1.ns, addr("10.42.0.1"))  // the container to its host's gateway address
	if out, err := ping(t, c1.ns, addr("10.42.0.3"), 2, "-M", "do", "-s", "1422"); err != nil {
		t.Errorf("full-size ping: %v\n%s", err, out)
	}

	for _, h := range hosts {
		local, remote := c1, c2
		if h != h0 {
			local, remote = c2, c1
		}
		ch, err := h.m.Reconcile(t.Context(), State{Networks: []Network{nw}, Endpoints: []Endpoint{{ID: local.id, VNI: vni, MAC: local.mac}}, Peers: remote.peers()})
		if err != nil {
			t.Fatal(err)
		}
		if ch != (Changes{}) {
			t.Errorf("Reconcile of a correct kernel changed %+v", ch)
		}
	}
	if inUse, err := h0.m.EndpointInUse(c1.id); err != nil || !inUse {
		t.Errorf("EndpointInUse of a running container: %v, %v", inUse, err)
	}
	if got, err := h0.m.NetworksInUse(); err != nil || !slices.Equal(got[vni], []string{EndpointKey(c1.id)}) {
		t.Errorf("NetworksInUse %v, %v", got, err)
	}
	if got, err := h0.m.OwnedNetworks(); err != nil || !slices.Equal(got, []uint32{vni}) {
		t.Errorf("OwnedNetworks %v, %v", got, err)
	}

	// Deleting the network takes every link of it, the gateway pair too,
	// out of both namespaces.
	if err := h0.m.DeleteNetwork(t.Context(), vni); err != nil {
		t.Fatal(err)
	}
	if names := linkNames(t, h0); len(names) != 0 {
		t.Errorf("links after DeleteNetwork: %v", names)
	}
}

// A network made before the data-plane namespace was configured keeps its
// bridge in the host's namespace when a Manager with it reconciles: its
// containers keep their links; a new network goes to the data-plane
// namespace. Both work, both are listed, and a second Reconcile writes
// nothing.
func TestDataplaneMixedLayout(t *testing.T) {
	t.Parallel()
	hosts := newHostsIn(t, 2, testenv.UnderlayOptions{}, false)
	const old, fresh = 0x51, 0x52
	oldNet := Network{VNI: old, Gateways: []netip.Prefix{pfx("10.51.0.1/24")}}
	newNet := Network{VNI: fresh, Gateways: []netip.Prefix{pfx("10.52.0.1/24")}}
	for _, h := range hosts {
		if _, err := h.m.EnsureNetwork(t.Context(), oldNet); err != nil {
			t.Fatal(err)
		}
	}
	o1 := hosts[0].run(t, old, []netip.Prefix{pfx("10.51.0.2/24")})
	o2 := hosts[1].run(t, old, []netip.Prefix{pfx("10.51.0.3/24")})
	o1.announce(t, hosts[1])
	o2.announce(t, hosts[0])
	mustPing(t, o1.ns, addr("10.51.0.3"))
	brBefore := link(t, hosts[0], "vxbr-000051")

	// The plugin restarts with the data-plane namespace.
	for _, h := range hosts {
		h.dp = testenv.NewNetNS(t)
		h.m.Close()
		h.m = h.manager(t, "")
	}
	h0 := hosts[0]
	want := func(h *testHost, cs ...*container) State {
		s := State{Networks: []Network{oldNet, newNet}}
		for _, c := range cs {
			if c.host == h {
				s.Endpoints = append(s.Endpoints, Endpoint{ID: c.id, VNI: c.vni, MAC: c.mac})
			} else {
				s.Peers = append(s.Peers, c.peers()...)
			}
		}
		return s
	}
	for _, h := range hosts {
		ch, err := h.m.Reconcile(t.Context(), want(h, o1, o2))
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("first reconcile with the data-plane namespace: %+v", ch)
	}
	if br := link(t, h0, "vxbr-000051"); br.Attrs().Index != brBefore.Attrs().Index || inNS(t, h0, "vxbr-000051") != "host" {
		t.Errorf("old network's bridge moved or replaced: index %d, was %d, in %s", br.Attrs().Index, brBefore.Attrs().Index, inNS(t, h0, "vxbr-000051"))
	}
	for name, where := range map[string]string{
		"vx-000051": "host", HostIfName(o1.id): "host", "vxg-000051": "",
		"vxbr-000052": "dp", "vx-000052": "dp", "vxp-000052": "dp", "vxg-000052": "host",
	} {
		if got := inNS(t, h0, name); got != where {
			t.Errorf("%s in %q, want %q", name, got, where)
		}
	}
	if got := globalAddrs(t, h0.NS, "vxbr-000051"); !slices.Equal(got, []string{"10.51.0.1/24"}) {
		t.Errorf("old bridge's addresses %v", got)
	}
	n1 := h0.run(t, fresh, []netip.Prefix{pfx("10.52.0.2/24")})
	n2 := hosts[1].run(t, fresh, []netip.Prefix{pfx("10.52.0.3/24")})
	for _, h := range hosts {
		if _, err := h.m.Reconcile(t.Context(), want(h, o1, o2, n1, n2)); err != nil {
			t.Fatal(err)
		}
	}
	mustPing(t, o1.ns, addr("10.51.0.3"))
	mustPing(t, n1.ns, addr("10.52.0.3"))
	mustPing(t, h0.NS, addr("10.51.0.2"))
	mustPing(t, h0.NS, addr("10.52.0.2"))
	for _, h := range hosts {
		ch, err := h.m.Reconcile(t.Context(), want(h, o1, o2, n1, n2))
		if err != nil {
			t.Fatal(err)
		}
		if ch != (Changes{}) {
			t.Errorf("second Reconcile changed %+v", ch)
		}
	}
	if got, err := h0.m.OwnedNetworks(); err != nil || !slices.Equal(got, []uint32{old, fresh}) {
		t.Errorf("OwnedNetworks %v, %v", got, err)
	}
	kn, err := InspectDataplane(h0.NS.Handle(), h0.dp.Handle(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(kn) != 2 {
		t.Fatalf("InspectDataplane: %+v, want two networks", kn)
	}
	peer := func(c *container) []NeighEntry { return []NeighEntry{{IP: c.addrs[0].Addr(), MAC: c.mac.String()}} }
	for i, want := range []struct {
		vni       uint32
		dataplane bool
		gateway   string
		port      string
		neigh     []NeighEntry
	}{
		{old, false, "", HostIfName(o1.id), peer(o2)},
		{fresh, true, "vxg-000052", HostIfName(n1.id), peer(n2)},
	} {
		n := kn[i]
		if n.VNI != want.vni || n.Dataplane != want.dataplane || n.Gateway != want.gateway || n.Bridge != BridgeName(want.vni) ||
			n.VXLAN != VXLANName(want.vni) || !n.Up || !slices.Equal(n.Ports, []string{want.port}) || !slices.Equal(n.Neighbours, want.neigh) || len(n.FDB) != 2 {
			t.Errorf("InspectDataplane network %d: %+v, want %+v", i, n, want)
		}
	}
	inUse, err := h0.m.NetworksInUse()
	if err != nil || !slices.Equal(inUse[old], []string{EndpointKey(o1.id)}) || !slices.Equal(inUse[fresh], []string{EndpointKey(n1.id)}) {
		t.Errorf("NetworksInUse %v, %v", inUse, err)
	}
	// Without the old network, Reconcile removes it from the host's
	// namespace and leaves the new one.
	s := want(h0, n1, n2)
	s.Networks = []Network{newNet}
	if _, err := h0.m.Reconcile(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"vxbr-000051", "vx-000051", HostIfName(o1.id)} {
		if got := inNS(t, h0, name); got != "" {
			t.Errorf("%s left in %s", name, got)
		}
	}
	mustPing(t, n1.ns, addr("10.52.0.3"))
}

// An endpoint of a network in the data-plane namespace is in use once its
// container end has left the host's namespace, not before; DeleteEndpoint
// removes the pair from either namespace.
func TestDataplaneEndpointInUse(t *testing.T) {
	t.Parallel()
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, true)[0]
	const vni = 0x61
	if _, err := h.m.EnsureNetwork(t.Context(), Network{VNI: vni}); err != nil {
		t.Fatal(err)
	}
	id := strings.Repeat("61", 32)
	info, err := h.m.CreateEndpoint(t.Context(), Endpoint{ID: id, VNI: vni, MAC: MACFromIP(addr("10.61.0.2"))})
	if err != nil {
		t.Fatal(err)
	}
	if inUse, err := h.m.EndpointInUse(id); err != nil || inUse {
		t.Errorf("EndpointInUse before the move: %v, %v", inUse, err)
	}
	if keys, err := h.m.EndpointsInUse(); err != nil || len(keys) != 0 {
		t.Errorf("EndpointsInUse before the move: %v, %v", keys, err)
	}
	c := testenv.NewNetNS(t)
	if err := testenv.MoveAndConfigure(h.NS, c, info.ContainerIf, "eth0", []netip.Prefix{pfx("10.61.0.2/24")}); err != nil {
		t.Fatal(err)
	}
	if inUse, err := h.m.EndpointInUse(id); err != nil || !inUse {
		t.Errorf("EndpointInUse after the move: %v, %v", inUse, err)
	}
	if keys, err := h.m.EndpointsInUse(); err != nil || !slices.Equal(keys, []string{EndpointKey(id)}) {
		t.Errorf("EndpointsInUse after the move: %v, %v", keys, err)
	}
	// EnsureEndpoint keeps a pair whose container end is in a container.
	if _, err := h.m.EnsureEndpoint(t.Context(), Endpoint{ID: id, VNI: vni, MAC: MACFromIP(addr("10.61.0.2"))}); err != nil {
		t.Fatal(err)
	}
	if err := h.m.DeleteEndpoint(t.Context(), id); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Handle().LinkByName("eth0"); err == nil {
		t.Error("the container's eth0 outlived DeleteEndpoint")
	}
	if got := inNS(t, h, info.HostIf); got != "" {
		t.Errorf("%s left in %s", info.HostIf, got)
	}
}

// The firewall of networks in the data-plane namespace is on their gateway
// links: with the host's FORWARD policy ACCEPT and forwarding on (the
// worst case), nothing is routed through the host from one overlay into
// another; an internal network's containers do not reach the host, which
// still reaches them; the well-known address answers DNS on every
// network and the API only on a network with ConsulAPI. Everything goes
// with the last network.
func TestDataplaneFirewall(t *testing.T) {
	t.Parallel()
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, true)[0]
	m := h.linkLocalManager(t, testLinkLocal)
	for _, cmd := range []string{"iptables", "ip6tables"} {
		iptables(t, h, cmd, "-P", "FORWARD", "ACCEPT")
	}
	h.NS.MustRun(t, "sysctl", "-w", "net.ipv4.ip_forward=1")
	const vniAPI, vniInt, vniB = 0x41, 0x42, 0x43
	nets := []Network{
		{VNI: vniAPI, ConsulAPI: true, Gateways: []netip.Prefix{pfx("10.41.0.1/24")}},
		{VNI: vniInt, Internal: true, Gateways: []netip.Prefix{pfx("10.42.0.1/24")}},
		{VNI: vniB, Gateways: []netip.Prefix{pfx("10.43.0.1/24")}},
	}
	for _, n := range nets {
		if _, err := m.EnsureNetwork(t.Context(), n); err != nil {
			t.Fatal(err)
		}
	}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		want := []string{
			"-A CONSUL-OVERLAY -i vxbr-+ -m physdev --physdev-is-bridged -m comment --comment consul-overlay -j ACCEPT",
			"-A CONSUL-OVERLAY -o vxbr-+ -m comment --comment consul-overlay -j DROP",
			"-A CONSUL-OVERLAY -i vxbr-+ -m comment --comment consul-overlay -j DROP",
			"-A CONSUL-OVERLAY -o vxg-+ -m comment --comment consul-overlay -j DROP",
			"-A CONSUL-OVERLAY -i vxg-+ -m comment --comment consul-overlay -j DROP",
		}
		if got := fwRules(t, h, cmd); !slices.Equal(got, want) {
			t.Errorf("%s rules:\n%s\nwant:\n%s", cmd, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	input := iptables(t, h, "iptables", "-S", InputChain)
	for _, r := range []string{
		"-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxg-000041 -p tcp -m tcp --dport 8500 -m comment --comment consul-overlay -j RETURN",
		"-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxg-+ -p udp -m udp --dport 53 -m comment --comment consul-overlay -j RETURN",
		"-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxg-+ -p tcp -m tcp --dport 8500 -m comment --comment consul-overlay -j REJECT --reject-with tcp-reset",
		"-A CONSUL-OVERLAY-INPUT -i vxg-000042 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment consul-overlay -j RETURN",
		"-A CONSUL-OVERLAY-INPUT -i vxg-000042 -m comment --comment consul-overlay -j DROP",
	} {
		if !strings.Contains(input, r) {
			t.Errorf("no rule %q in\n%s", r, input)
		}
	}
	if strings.Contains(input, "vxbr-00004") {
		t.Errorf("a rule of a bridge in the data-plane namespace in\n%s", input)
	}

	ll := testLinkLocal.String()
	serveIn(t, h.NS, "udp", ll+":53")
	serveIn(t, h.NS, "tcp", ll+":8500")
	serveIn(t, h.NS, "tcp", "0.0.0.0:2222")
	cAPI := h.runWith(t, m, vniAPI, []netip.Prefix{pfx("10.41.0.2/24")}, addr("10.41.0.1"))
	cInt := h.runWith(t, m, vniInt, []netip.Prefix{pfx("10.42.0.2/24")})
	cB := h.runWith(t, m, vniB, []netip.Prefix{pfx("10.43.0.2/24")}, addr("10.43.0.1"))
	for _, c := range []*container{cAPI, cInt, cB} {
		c.ns.MustRun(t, "ip", "route", "add", ll+"/32", "dev", "eth0", "scope", "link")
	}

	mustPing(t, cAPI.ns, addr("10.41.0.1")) // the host, from an ordinary network
	mustPing(t, h.NS, addr("10.42.0.2"))    // the host to an internal network's container
	mustNotPing(t, cInt.ns, addr("10.42.0.1"))
	mustNotPing(t, cB.ns, addr("10.41.0.2")) // routed from one overlay into another
	routed := ruleCounter(t, h, "iptables", "-A CONSUL-OVERLAY -o vxg-+ -m comment --comment consul-overlay -j DROP") +
		ruleCounter(t, h, "iptables", "-A CONSUL-OVERLAY -i vxg-+ -m comment --comment consul-overlay -j DROP")
	if routed == 0 {
		t.Error("packets routed from one overlay into another were not dropped by our rules")
	}
	checkReach(t, ll, []reachCase{
		{"consul_api network", cAPI.ns, "udp", "53", "ok"},
		{"consul_api network", cAPI.ns, "tcp", "8500", "ok"},
		{"consul_api network", cAPI.ns, "tcp", "2222", "timeout"},
		{"internal network", cInt.ns, "udp", "53", "ok"},
		{"internal network", cInt.ns, "tcp", "8500", "refused"},
		{"ordinary network", cB.ns, "udp", "53", "ok"},
		{"ordinary network", cB.ns, "tcp", "8500", "refused"},
	})
	vxg := link(t, h, "vxg-000041")
	as, err := h.NS.Handle().AddrList(vxg, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range as {
		got = append(got, a.IPNet.String()+" "+a.Label)
	}
	slices.Sort(got)
	if want := []string{"10.41.0.1/24 vxg-000041", "169.254.1.1/32 vxg-000041:ll"}; !slices.Equal(got, want) {
		t.Errorf("vxg-000041 addresses %q, want %q", got, want)
	}

	for _, n := range nets {
		if err := m.DeleteNetwork(t.Context(), n.VNI); err != nil {
			t.Fatal(err)
		}
	}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if got := fwRules(t, h, cmd); len(got) != 0 {
			t.Errorf("%s rules after the last network:\n%s", cmd, strings.Join(got, "\n"))
		}
	}
	if got := linkLocalRules(t, h); len(got) != 0 {
		t.Errorf("link-local rules after the last network:\n%s", strings.Join(got, "\n"))
	}
	if got := iptables(t, h, "iptables", "-S", InputChain); strings.Contains(got, "vxg-") {
		t.Errorf("rules of a gateway link after the last network:\n%s", got)
	}
}

// Reconcile repairs a network in the data-plane namespace: a gateway pair
// and a VXLAN device deleted by hand, an endpoint's host end off the
// bridge, a stale FDB entry and strays of ours in the data-plane namespace;
// links that are not ours stay. KeepStrays with nothing listed removes
// nothing; an empty state removes everything of ours from both namespaces.
func TestDataplaneReconcile(t *testing.T) {
	t.Parallel()
	hosts, n, c1, c2 := twoContainersIn(t, true)
	h0 := hosts[0]
	dh, hh := h0.dp.Handle(), h0.NS.Handle()
	want := reconcileState(n, c1, c2)
	if ch, err := h0.m.Reconcile(t.Context(), want); err != nil || ch != (Changes{}) {
		t.Fatalf("Reconcile of a correct kernel: %+v, %v", ch, err)
	}

	mustPing(t, h0.NS, addr("10.40.0.2"))
	for _, l := range []netlink.Link{link(t, h0, "vxg-000abc"), link(t, h0, "vx-000abc")} {
		_, ns := linkIn(t, h0, l.Attrs().Name)
		if err := ns.Handle().LinkDel(l); err != nil {
			t.Fatal(err)
		}
	}
	if err := dh.LinkSetNoMaster(link(t, h0, HostIfName(c1.id))); err != nil {
		t.Fatal(err)
	}
	mk := func(h *netlink.Handle, l netlink.Link, alias bool) {
		t.Helper()
		if err := h.LinkAdd(l); err != nil {
			t.Fatalf("add %s: %v", l.Attrs().Name, err)
		}
		if alias {
			if err := h.LinkSetAlias(l, OwnerAlias); err != nil {
				t.Fatal(err)
			}
		}
	}
	mk(dh, &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "vxbr-00beef"}}, true)
	mk(dh, &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vxh-dead00beef"}, PeerName: "vxp-00beef"}, true)
	mk(dh, &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br-0123456789ab"}}, true)
	mk(hh, &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vxg-00cafe"}, PeerName: "veth7654321"}, false)
	mustNotPing(t, h0.NS, addr("10.40.0.2"))

	ch, err := h0.m.Reconcile(t.Context(), want)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("changes: %+v", ch)
	if ch.Links < 4 || ch.Addrs < 2 || ch.FDB == 0 || ch.Neighbours == 0 {
		t.Errorf("changes %+v: want the gateway pair, the device, the strays, the addresses and entries counted", ch)
	}
	wantNames := []string{"dp/br-0123456789ab", "dp/" + HostIfName(c1.id), "dp/vx-000abc", "dp/vxbr-000abc", "dp/vxp-000abc",
		"veth7654321", "vxg-000abc", "vxg-00cafe"}
	slices.Sort(wantNames)
	if names := linkNames(t, h0); !slices.Equal(names, wantNames) {
		t.Errorf("links after reconcile:\n%v\nwant\n%v", names, wantNames)
	}
	br := link(t, h0, "vxbr-000abc")
	for _, name := range []string{"vx-000abc", "vxp-000abc", HostIfName(c1.id)} {
		if l := link(t, h0, name); l.Attrs().MasterIndex != br.Attrs().Index {
			t.Errorf("%s not on the bridge", name)
		}
	}
	if got := globalAddrs(t, h0.NS, "vxg-000abc"); !slices.Equal(got, []string{"10.40.0.1/24", "fd00:40::1/64"}) {
		t.Errorf("vxg-000abc addresses %v", got)
	}
	m2 := c2.mac.String()
	if e := entries(t, h0, n.VNI); !slices.Equal(e.fdb, []string{"00:00:00:00:00:00 192.0.2.2", m2 + " 192.0.2.2"}) ||
		!slices.Equal(e.neigh, []string{"10.40.0.3 " + m2, "fd00:40::3 " + m2}) {
		t.Errorf("entries after reconcile: %+v", e)
	}
	mustPing(t, c1.ns, addr("10.40.0.3"))
	mustPing(t, h0.NS, addr("10.40.0.2"))
	if ch, err := h0.m.Reconcile(t.Context(), want); err != nil || ch != (Changes{}) {
		t.Errorf("second Reconcile: %+v, %v", ch, err)
	}

	before := linkNames(t, h0)
	if ch, err := h0.m.Reconcile(t.Context(), State{KeepStrays: true}); err != nil || ch.Links != 0 {
		t.Errorf("Reconcile with KeepStrays and nothing listed: %+v, %v", ch, err)
	}
	if names := linkNames(t, h0); !slices.Equal(names, before) {
		t.Errorf("links after KeepStrays: %v, want %v", names, before)
	}
	if _, err := h0.m.Reconcile(t.Context(), State{}); err != nil {
		t.Fatal(err)
	}
	if names := linkNames(t, h0); !slices.Equal(names, []string{"dp/br-0123456789ab", "veth7654321", "vxg-00cafe"}) {
		t.Errorf("links after an empty reconcile: %v", names)
	}
	if _, err := c1.ns.Handle().LinkByName("eth0"); err == nil {
		t.Error("the container's eth0 outlived its endpoint's removal")
	}
}

// A data-plane namespace that cannot be opened, or that is the Manager's
// own namespace, is refused at once: no Manager is made.
func TestDataplaneNSRefused(t *testing.T) {
	t.Parallel()
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, false)[0]
	for _, tc := range []struct{ name, path, want string }{
		{"missing", filepath.Join(t.TempDir(), "none"), "open data-plane namespace"},
		{"the manager's own", h.NS.Path, "is the Manager's own namespace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := NewAt(Config{VTEP: h.Addr, IPTables: "-", IP6Tables: "-", Sysctl: "-", DataplaneNS: tc.path}, h.NS.Path)
			if err == nil {
				m.Close()
				t.Fatalf("NewAt with data-plane namespace %s: no error", tc.path)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to say %q", err, tc.want)
			}
		})
	}
}

// A VXLAN device of ours in the data-plane namespace whose UDP socket is
// that namespace's (made there, not by the host's socket) cannot reach the
// underlay: EnsureNetwork replaces it with one whose socket is the host's.
func TestDataplaneVXLANSocketReplaced(t *testing.T) {
	t.Parallel()
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, true)[0]
	const vni = 0x71
	dh := h.dp.Handle()
	wrong := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: VXLANName(vni)}, VxlanId: vni, SrcAddr: h.Addr.AsSlice(), Port: DefaultPort, Proxy: true}
	if err := dh.LinkAdd(wrong); err != nil {
		t.Fatal(err)
	}
	if err := dh.LinkSetAlias(wrong, OwnerAlias); err != nil {
		t.Fatal(err)
	}
	if err := dh.LinkSetUp(wrong); err != nil { // the socket opens with the device
		t.Fatal(err)
	}
	if ports := udpPorts(t, h.dp); !slices.Contains(ports, fmt.Sprint(DefaultPort)) {
		t.Fatalf("the device made in the data-plane namespace has no socket there: %v", ports)
	}
	before := link(t, h, VXLANName(vni)).Attrs().Index
	ch := Changes{}
	h.m.mu.Lock()
	_, err := h.m.ensureNetwork(t.Context(), Network{VNI: vni}, false, &ch)
	h.m.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if vx := link(t, h, VXLANName(vni)); vx.Attrs().Index == before || vx.Attrs().NetNsID < 0 || inNS(t, h, VXLANName(vni)) != "dp" {
		t.Errorf("vxlan device not replaced: index %d (was %d), link-netnsid %d", vx.Attrs().Index, before, vx.Attrs().NetNsID)
	}
	if ports := udpPorts(t, h.dp); len(ports) != 0 {
		t.Errorf("data-plane namespace's UDP sockets %v, want none", ports)
	}
	if ports := udpPorts(t, h.NS); !slices.Contains(ports, fmt.Sprint(DefaultPort)) {
		t.Errorf("host's UDP sockets %v: no %d", ports, DefaultPort)
	}
	if ch, err := h.m.Reconcile(t.Context(), State{Networks: []Network{{VNI: vni}}}); err != nil || ch != (Changes{}) {
		t.Errorf("Reconcile after the replacement: %+v, %v", ch, err)
	}
}
