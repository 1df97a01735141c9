package main

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"consul-overlay/bench/harness"
	"consul-overlay/internal/testenv"
	"consul-overlay/vxlan"
)

// benchForward measures what a host's egress networks cost the traffic
// it forwards. One host with the plugin, FORWARD's policy DROP as dockerd
// leaves it, many networks with the default egress (seven FORWARD rules
// each), and two namespaces routed through the host that stand for a
// container of one of Docker's bridge networks and the world beyond the
// host. Round trips, interleaved round by round:
//   - bridge container → world: traffic of no overlay, which FORWARD's
//     jumps keep out of CONSUL-OVERLAY;
//   - the same with an unconditional jump to CONSUL-OVERLAY put first in
//     FORWARD, as releases before the conditional jumps had it: the packet
//     walks every egress network's rules without matching one;
//   - an overlay container → world (egress, masqueraded), on the network
//     whose rules come first in the chain and on the one whose come last:
//     egress traffic still walks the rules of the networks above its own.
func benchForward(t *runner, cfg *config, rep *report) {
	sec := rep.section("Forwarded traffic and the egress networks' rules")
	ctx := t.Context()
	networks := 100
	if cfg.quick {
		networks = 20
	}
	c := harness.NewCluster(t, 1, harness.ClusterOptions{Bin: cfg.bin, LogLevel: "info"})
	h, p := c.Hosts[0], c.Plugins[0]
	ipt := func(args ...string) string {
		t.Helper()
		return h.NS.MustRun(t, append([]string{"iptables", "-w"}, args...)...)
	}
	// Two namespaces on /30s of their own, routed through the host.
	outside := func(name string, pfx netip.Prefix, via netip.Prefix) (*testenv.NetNS, netip.Addr) {
		t.Helper()
		o := testenv.NewNetNS(t)
		hostAddr := pfx.Addr().Next()
		far := hostAddr.Next()
		h.NS.MustRun(t, "ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", o.Name)
		h.NS.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(hostAddr, pfx.Bits()).String(), "dev", name)
		h.NS.MustRun(t, "ip", "link", "set", name, "up")
		o.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(far, pfx.Bits()).String(), "dev", "eth0")
		o.MustRun(t, "ip", "link", "set", "eth0", "up")
		o.MustRun(t, "ip", "link", "set", "lo", "up")
		o.MustRun(t, "ip", "route", "add", via.String(), "via", hostAddr.String())
		return o, far
	}
	bridgeNet, worldNet := netip.MustParsePrefix("10.216.1.0/30"), netip.MustParsePrefix("10.216.1.4/30")
	bridgeNS, _ := outside("fwbr0", bridgeNet, worldNet)
	_, world := outside("fwwo0", worldNet, bridgeNet)
	ipt("-P", "FORWARD", "DROP")

	var nets []*harness.Network
	for i := range networks {
		n, err := p.CreateNetwork(harness.NetSpec{Subnet4: fmt.Sprintf("10.217.%d.0/24", i), Options: map[string]string{"name": fmt.Sprintf("fwd-%d", i)}})
		if err != nil {
			t.Fatalf("network %d: %v", i, err)
		}
		nets = append(nets, n)
	}
	// dockerd's ACCEPTs of its bridge, after our jumps.
	ipt("-A", "FORWARD", "-i", "fwbr0", "-j", "ACCEPT")
	ipt("-A", "FORWARD", "-o", "fwbr0", "-j", "ACCEPT")

	rules := strings.Split(strings.TrimSpace(ipt("-S", vxlan.FirewallChain)), "\n")[1:]
	// first and last: the networks whose egress rules come first and last
	// in the chain, found by their bridges (the link with the gateway).
	firstAt, lastAt := len(rules), -1
	var first, last *harness.Network
	for _, n := range nets {
		gw, _, _ := strings.Cut(n.Gateway4, "/")
		br, _, _ := strings.Cut(strings.TrimSpace(h.NS.MustRun(t, "ip", "-o", "-4", "addr", "show", "to", gw)), " inet ")
		if f := strings.Fields(br); len(f) == 2 {
			br = strings.TrimSuffix(f[1], ":")
		}
		for i, r := range rules {
			if !strings.Contains(r, " "+br+" ") {
				continue
			}
			if i < firstAt {
				firstAt, first = i, n
			}
			if i > lastAt {
				lastAt, last = i, n
			}
			break
		}
	}
	if first == nil || last == nil || first == last {
		t.Fatalf("no egress rules of %d networks in %s:\n%s", networks, vxlan.FirewallChain, strings.Join(rules, "\n"))
	}
	container := func(n *harness.Network) *harness.Endpoint {
		t.Helper()
		e, err := n.Run(t)
		if err != nil {
			t.Fatal(err)
		}
		gw, _, _ := strings.Cut(n.Gateway4, "/")
		e.NS.MustRun(t, "ip", "route", "add", "default", "via", gw)
		return e
	}
	cFirst, cLast := container(first), container(last)

	plain := []string{"FORWARD", "1", "-j", vxlan.FirewallChain}
	type row struct {
		name string
		from *testenv.NetNS
		prep func()
		done func()
		rtt  []float64
	}
	rows := []*row{
		{name: "bridge network container → world (no overlay: FORWARD's jumps pass it by)", from: bridgeNS},
		{name: "… with an unconditional jump to " + vxlan.FirewallChain + " first in FORWARD (releases before)", from: bridgeNS,
			prep: func() { ipt(append([]string{"-I"}, plain...)...) },
			done: func() { ipt("-D", "FORWARD", "-j", vxlan.FirewallChain) }},
		{name: fmt.Sprintf("overlay container → world, the network whose rules come first (rule %d of %d)", firstAt+1, len(rules)), from: cFirst.NS},
		{name: fmt.Sprintf("overlay container → world, the network whose rules come last (rule %d of %d)", lastAt+1, len(rules)), from: cLast.NS},
	}
	for _, r := range rows { // warm-up: ARP, conntrack
		if _, _, err := pingRTT(ctx, r.from, world, 5, 10*time.Millisecond); err != nil {
			t.Fatalf("%s: %v", r.name, err)
		}
	}
	lost := 0
	for round := range cfg.rounds {
		for k := range rows {
			r := rows[k]
			if round%2 == 1 {
				r = rows[len(rows)-1-k]
			}
			if r.prep != nil {
				r.prep()
			}
			rtt, l, err := pingRTT(ctx, r.from, world, cfg.pings, 2*time.Millisecond)
			if r.done != nil {
				r.done()
			}
			if err != nil {
				t.Fatalf("%s: %v", r.name, err)
			}
			r.rtt, lost = append(r.rtt, rtt...), lost+l
		}
	}
	fmt.Fprintf(sec, "One host, FORWARD policy DROP (as dockerd leaves it), %d networks with the default egress (`auto`: seven FORWARD rules each in %s, %d rules there in all). "+
		"Two namespaces routed through the host on /30s stand for a container of a Docker bridge network and the world; "+
		"an overlay container's traffic to the world is masqueraded. ping, %d a round every 2 ms, %d rounds, rows interleaved "+
		"(order reversed every other round), every reply pooled; %d lost.\n\n", networks, vxlan.FirewallChain, len(rules), cfg.pings, cfg.rounds, lost)
	fmt.Fprintln(sec, "| Path | RTT p50 µs | mean µs | p99 µs |")
	fmt.Fprintln(sec, "|---|---:|---:|---:|")
	for _, r := range rows {
		d := summarize(r.rtt)
		fmt.Fprintf(sec, "| %s | %s | %s | %s |\n", r.name, f(d.p50), f(d.mean), f(d.p99))
	}
	b, u := summarize(rows[0].rtt), summarize(rows[1].rtt)
	e1, e2 := summarize(rows[2].rtt), summarize(rows[3].rtt)
	per := (u.mean - b.mean) * 1000 / float64(2*len(rules))
	fmt.Fprintf(sec, "\nThe unconditional jump costs the bridge network's traffic %s µs a round trip (mean), about %s ns a rule a packet; "+
		"egress traffic of the last network's %s µs more than the first's.\n", f(u.mean-b.mean), f(per), f(e2.mean-e1.mean))
	rep.info(fmt.Sprintf("forwarded traffic of no overlay, %d egress networks on the host: RTT mean, with the conditional jumps / an unconditional one", networks),
		fmt.Sprintf("%s / %s µs", f(b.mean), f(u.mean)))
	rep.info(fmt.Sprintf("egress traffic, RTT mean: the first / the last of %d egress networks in the chain", networks),
		fmt.Sprintf("%s / %s µs", f(e1.mean), f(e2.mean)))
}
