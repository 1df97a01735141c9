package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"consul-overlay/bench/harness"
	"consul-overlay/internal/testenv"
)

// dataPath is one way for two endpoints on two hosts to talk: iperf3 and
// ping run from client towards dst, whose server runs in server.
type dataPath struct {
	name           string
	mtu            int
	client, server *testenv.NetNS
	dst            netip.Addr

	p4, p1 []float64 // Gbit/s of each round
	rtt    []float64 // µs, every reply of every round
	lost   int
	sent   int
	err    error // the round that failed; later rounds skip the path

	// setup and teardown, if set, run around each of the path's rounds:
	// a variant of another path (same containers, a setting changed for
	// the round) is then measured interleaved with it.
	setup, teardown func(context.Context) error
}

// Kernel objects of the hand-built VXLAN baseline.
const (
	handVNI    = 1000000 // far above the VNIs the plugin allocates (from 4096)
	handSubnet = "10.211.0.0/24"
	benchPort  = 5201
)

// buildHandVXLAN builds, with iproute2 and nothing else, the data path
// consul-overlay builds, between the same two hosts and with the same MTU:
// per host a bridge, a VXLAN device (same port, local VTEP, nolearning,
// proxy) and a veth into a container namespace, plus static FDB and
// neighbour entries for the other side. It returns the two containers and
// their addresses.
func buildHandVXLAN(t *runner, hosts []*testenv.Host, mtu int) (ctr [2]*testenv.NetNS, addr [2]netip.Addr) {
	return buildHand(t, [2]*testenv.Host{hosts[0], hosts[1]}, mtu, handLayout{vni: handVNI, net: 0, suffix: "0"})
}

// handLayout places one hand-built VXLAN: its VNI, its subnet
// 10.211.<net>.0/24, the suffix of its device names, and whether each
// host's bridge lives in a namespace of its own, as Docker's overlay
// keeps it (the VXLAN device made in the host's namespace, so that its
// socket is the host's, and moved there), rather than in the host's.
type handLayout struct {
	vni     int
	net     byte
	suffix  string
	sandbox bool
}

// buildHand builds a hand-built VXLAN between two hosts (see
// buildHandVXLAN) as l places it.
//
// Equivalent to, on host i (sandbox: the commands after the move run in
// a new namespace SB): `ip link add hvx<s> mtu M type vxlan id VNI local
// <host i> dstport 4789 nolearning proxy` [`&& ip link set hvx<s> netns
// SB`], `ip link add hvbr<s> mtu M type bridge && ip link set hvx<s>
// master hvbr<s> up && ip link add hvh<s> mtu M type veth peer name eth0
// netns C && ip link set hvh<s> master hvbr<s> up`, and `bridge fdb add`
// and `ip neigh add` of the other host's container on hvx<s>.
func buildHand(t *runner, hosts [2]*testenv.Host, mtu int, l handLayout) (ctr [2]*testenv.NetNS, addr [2]netip.Addr) {
	ctx := t.Context()
	var macs [2]net.HardwareAddr
	for i := range 2 {
		ctr[i] = testenv.NewNetNS(t)
		addr[i] = netip.AddrFrom4([4]byte{10, 211, l.net, byte(i + 1)})
		m := make(net.HardwareAddr, 6)
		_, _ = rand.Read(m)
		m[0] = m[0]&0xfe | 0x02
		macs[i] = m
	}
	m := fmt.Sprint(mtu)
	br, vx, vh := "hvbr"+l.suffix, "hvx"+l.suffix, "hvh"+l.suffix
	for i, h := range hosts {
		o := 1 - i
		run := func(ns *testenv.NetNS, cmds ...[]string) {
			for _, c := range cmds {
				if out, err := nsRun(ctx, ns, c...); err != nil {
					t.Fatalf("hand-built vxlan on host%d: %v\n%s", i, err, out)
				}
			}
		}
		run(h.NS, []string{"ip", "link", "add", vx, "mtu", m, "type", "vxlan", "id", fmt.Sprint(l.vni), "local", h.Addr.String(),
			"dstport", "4789", "nolearning", "proxy"})
		at := h.NS
		if l.sandbox {
			at = testenv.NewNetNS(t)
			run(h.NS, []string{"ip", "link", "set", vx, "netns", at.Name})
			run(at, []string{"ip", "link", "set", "lo", "up"})
		} else {
			t.Cleanup(func() { _, _ = nsRun(context.Background(), h.NS, "ip", "link", "del", vx) })
			t.Cleanup(func() { _, _ = nsRun(context.Background(), h.NS, "ip", "link", "del", br) })
		}
		run(at,
			[]string{"ip", "link", "add", br, "mtu", m, "type", "bridge"},
			[]string{"ip", "link", "set", br, "up"},
			[]string{"ip", "link", "set", vx, "master", br, "up"},
			[]string{"ip", "link", "add", vh, "mtu", m, "type", "veth", "peer", "name", "eth0", "mtu", m, "netns", ctr[i].Name},
			[]string{"ip", "link", "set", vh, "master", br, "up"},
			[]string{"bridge", "fdb", "add", macs[o].String(), "dev", vx, "dst", hosts[o].Addr.String(), "self", "permanent"},
			[]string{"bridge", "fdb", "append", "00:00:00:00:00:00", "dev", vx, "dst", hosts[o].Addr.String(), "self", "permanent"},
			[]string{"ip", "neigh", "add", addr[o].String(), "lladdr", macs[o].String(), "dev", vx, "nud", "permanent"},
		)
		run(ctr[i],
			[]string{"ip", "link", "set", "eth0", "address", macs[i].String()},
			[]string{"ip", "addr", "add", addr[i].String() + "/24", "dev", "eth0"},
			[]string{"ip", "link", "set", "eth0", "up"},
		)
	}
	return ctr, addr
}

// buildRouted gives each of the two hosts a container behind a veth pair,
// routed by the hosts over the underlay without encapsulation, with the
// underlay's MTU: the least a container-to-container path costs here (the
// container's veth and the hosts' forwarding on top of the underlay),
// against which the VXLAN's own cost shows.
//
// Equivalent to, on host i with container address 10.212.i.2: `ip link add
// rvh0 mtu M type veth peer name eth0 netns C && ip addr add 10.212.i.1/24
// dev rvh0 && ip route add 10.212.o.0/24 via <host o> && sysctl
// net.ipv4.ip_forward=1`, and in the container the address and a default
// route via 10.212.i.1.
func buildRouted(t *runner, hosts []*testenv.Host, mtu int) (ctr [2]*testenv.NetNS, addr [2]netip.Addr) {
	ctx := t.Context()
	m := fmt.Sprint(mtu)
	sub := func(i int) string { return fmt.Sprintf("10.212.%d", i+1) }
	for i := range 2 {
		ctr[i] = testenv.NewNetNS(t)
		addr[i] = netip.MustParseAddr(sub(i) + ".2")
	}
	for i, h := range hosts[:2] {
		o := 1 - i
		for _, c := range [][]string{
			{"ip", "link", "add", "rvh0", "mtu", m, "type", "veth", "peer", "name", "eth0", "mtu", m, "netns", ctr[i].Name},
			{"ip", "addr", "add", sub(i) + ".1/24", "dev", "rvh0"},
			{"ip", "link", "set", "rvh0", "up"},
			{"ip", "route", "add", sub(o) + ".0/24", "via", hosts[o].Addr.String()},
			{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
		} {
			if out, err := nsRun(ctx, h.NS, c...); err != nil {
				t.Fatalf("routed path on host%d: %v\n%s", i, err, out)
			}
		}
		for _, c := range [][]string{
			{"ip", "addr", "add", addr[i].String() + "/24", "dev", "eth0"},
			{"ip", "link", "set", "eth0", "up"},
			{"ip", "route", "add", "default", "via", sub(i) + ".1"},
		} {
			if out, err := nsRun(ctx, ctr[i], c...); err != nil {
				t.Fatalf("routed container %d: %v\n%s", i, err, out)
			}
		}
	}
	return ctr, addr
}

// linkMTU reads the MTU of a link in a namespace.
func linkMTU(ns *testenv.NetNS, name string) (int, error) {
	l, err := ns.Handle().LinkByName(name)
	if err != nil {
		return 0, fmt.Errorf("find %s in %s: %w", name, ns.Name, err)
	}
	return l.Attrs().MTU, nil
}

// benchDataplane measures throughput and round trips between two
// containers on two hosts over consul-overlay and over its baselines, with
// an underlay of the given MTU.
func benchDataplane(t *runner, cfg *config, rep *report, underlayMTU int) {
	sec := rep.section(fmt.Sprintf("Data plane, underlay MTU %d", underlayMTU))
	ctx := t.Context()
	c := harness.NewCluster(t, 2, harness.ClusterOptions{Bin: cfg.bin, MTU: underlayMTU, LogLevel: "info"})
	spec := harness.NetSpec{Subnet4: "10.210.0.0/24", Options: map[string]string{"name": "dataplane"}}
	var ctrs [2]*harness.Endpoint
	for i, p := range c.Plugins {
		n, err := p.CreateNetwork(spec)
		if err != nil {
			t.Fatalf("host%d: create network: %v", i, err)
		}
		if ctrs[i], err = n.Run(t); err != nil {
			t.Fatalf("host%d: run container: %v", i, err)
		}
	}
	ovDst := ctrs[1].Addr4.Addr()
	if err := eventually(ctx, 10*time.Second, func() error {
		_, err := nsRun(ctx, ctrs[0].NS, "ping", "-n", "-c", "1", "-W", "1", ovDst.String())
		return err
	}); err != nil {
		t.Fatalf("the overlay does not carry traffic: %v", err)
	}
	ovMTU, err := linkMTU(ctrs[0].NS, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	hctr, haddr := buildHandVXLAN(t, c.Hosts, ovMTU)

	rctr, raddr := buildRouted(t, c.Hosts, underlayMTU)

	paths := []*dataPath{
		{name: "underlay (veth, host to host)", mtu: underlayMTU, client: c.Hosts[0].NS, server: c.Hosts[1].NS, dst: c.Hosts[1].Addr},
		{name: "hand-built VXLAN (iproute2)", mtu: ovMTU, client: hctr[0], server: hctr[1], dst: haddr[1]},
		{name: "consul-overlay", mtu: ovMTU, client: ctrs[0].NS, server: ctrs[1].NS, dst: ovDst},
		{name: "routed containers, no encapsulation", mtu: underlayMTU, client: rctr[0], server: rctr[1], dst: raddr[1]},
	}
	measurePaths(t, cfg, paths)

	// The largest packet the overlay advertises passes with DF set; one
	// byte more fails at the sender.
	okMax, outMax := pingOnce(ctx, ctrs[0].NS, ovDst, ovMTU-28)
	okOver, _ := pingOnce(ctx, ctrs[0].NS, ovDst, ovMTU-27)

	fmt.Fprintf(sec, "Two hosts on a veth underlay (MTU %d) through a bridge in a switch namespace. %s\n\n", underlayMTU, method(cfg))
	rows := pathTable(sec, paths, paths[2], paths[1], paths[0], paths[3])
	ov, hb, ul, rt := rows[2], rows[1], rows[0], rows[3]
	fmt.Fprintf(sec, "\nHand-built VXLAN against the underlay: TCP 4 streams %s, 1 stream %s, RTT avg %+.1f µs.\n",
		fr(ratio(hb.p4, ul.p4)), fr(ratio(hb.p1, ul.p1)), hb.avg-ul.avg)
	fmt.Fprintf(sec, "\nRouted containers (a veth pair per host, forwarded by the hosts, no encapsulation, MTU %d) against the underlay: "+
		"TCP 4 streams %s, 1 stream %s, RTT avg %+.1f µs: what a container path costs beyond the underlay without VXLAN. "+
		"Every hop (veth, bridge, VXLAN) carries the TCP stream as unsegmented GSO packets of about 64 KB, so the overlay's "+
		"cost over the routed path is per packet (hops, encapsulation), not per byte.\n",
		underlayMTU, fr(ratio(rt.p4, ul.p4)), fr(ratio(rt.p1, ul.p1)), rt.avg-ul.avg)
	fmt.Fprintf(sec, "\nOverlay MTU %d (underlay %d − 50). `ping -M do -s %d` (the advertised MTU): %s. `-s %d` (one byte more): %s.\n",
		ovMTU, underlayMTU, ovMTU-28, passFail(okMax, outMax), ovMTU-27, passFail(okOver, ""))

	tag := fmt.Sprintf(" (underlay MTU %d)", underlayMTU)
	rep.check("overlay TCP throughput, 4 streams, ÷ hand-built VXLAN"+tag, r3(ratio(ov.p4, hb.p4)), "≥ 0.98", ratio(ov.p4, hb.p4) >= 0.98)
	rep.check("overlay TCP throughput, 1 stream, ÷ hand-built VXLAN"+tag, r3(ratio(ov.p1, hb.p1)), "≥ 0.98", ratio(ov.p1, hb.p1) >= 0.98)
	rep.check("overlay TCP throughput, 4 streams, ÷ underlay"+tag, r3(ratio(ov.p4, ul.p4)), "≥ 0.95", ratio(ov.p4, ul.p4) >= 0.95)
	rep.check("overlay TCP throughput, 1 stream, ÷ underlay"+tag, r3(ratio(ov.p1, ul.p1)), "≥ 0.95", ratio(ov.p1, ul.p1) >= 0.95)
	rep.info("overlay TCP throughput, 4 / 1 streams, ÷ routed containers without encapsulation"+tag,
		fmt.Sprintf("%s / %s", r3(ratio(ov.p4, rt.p4)), r3(ratio(ov.p1, rt.p1))))
	rep.check("overlay RTT avg − hand-built VXLAN"+tag, fmt.Sprintf("%+.1f µs (p50 %+.1f)", ov.avg-hb.avg, ov.p50-hb.p50), "≤ 5 µs", ov.avg-hb.avg <= 5)
	rep.check("overlay MTU"+tag, fmt.Sprint(ovMTU), fmt.Sprintf("= %d", underlayMTU-50), ovMTU == underlayMTU-50)
	rep.check("DF ping at the overlay MTU / one byte more"+tag,
		fmt.Sprintf("%s / %s", passFail(okMax, ""), passFail(okOver, "")), "passes / fails", okMax && !okOver)
	if !okMax {
		t.Errorf("a %d-byte ping with DF set does not cross the overlay (MTU %d): %s", ovMTU-28, ovMTU, outMax)
	}
}

func passFail(ok bool, detail string) string {
	s := "fails"
	if ok {
		s = "passes"
	}
	if detail != "" && !ok {
		s += " (" + strings.ReplaceAll(detail, "\n", "; ") + ")"
	}
	return s
}

// pathRow is a path's summary: median throughputs and round trips.
type pathRow struct{ p4, p1, avg, p50, p99 float64 }

func method(cfg *config) string {
	return fmt.Sprintf("Throughput: iperf3 TCP, %g s per run, %d round(s), paths interleaved (order reversed every other round); "+
		"median of the rounds (range in parentheses). Round trip: ping -i 0.01, %d per round, every reply pooled.", cfg.iperfSecs, cfg.rounds, cfg.pings)
}

// measurePaths runs an iperf3 server at the far end of each path, then
// rounds of iperf3 (4 streams, 1 stream) and ping over every path.
func measurePaths(t *runner, cfg *config, paths []*dataPath) {
	ctx := t.Context()
	for _, p := range paths {
		if err := iperfServer(ctx, p.server, benchPort); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(200 * time.Millisecond)
	for round := range cfg.rounds {
		order := slices.Clone(paths)
		if round%2 == 1 {
			slices.Reverse(order) // no path always runs first or last
		}
		for _, p := range order {
			if p.err != nil {
				continue
			}
			t.Logf("round %d: %s", round+1, p.name)
			if p.err = measureVariant(ctx, cfg, p); p.err != nil {
				// Keep measuring the other paths; the failure is reported.
				t.Errorf("%s, round %d: %v", p.name, round+1, p.err)
			}
		}
		if ctx.Err() != nil {
			t.Fatal(ctx.Err())
		}
	}
}

// measureVariant runs one round over a path between its setup and its
// teardown.
func measureVariant(ctx context.Context, cfg *config, p *dataPath) (retErr error) {
	if p.setup != nil {
		if err := p.setup(ctx); err != nil {
			return fmt.Errorf("set up: %w", err)
		}
	}
	if p.teardown != nil {
		defer func() {
			if err := p.teardown(context.WithoutCancel(ctx)); err != nil {
				retErr = errors.Join(retErr, fmt.Errorf("tear down: %w", err))
			}
		}()
	}
	return measureRound(ctx, cfg, p)
}

// measureRound runs one round of iperf3 and ping over a path.
func measureRound(ctx context.Context, cfg *config, p *dataPath) error {
	for _, streams := range []int{4, 1} {
		r, err := iperf(ctx, p.client, p.dst, benchPort, streams, cfg.iperfSecs)
		if err != nil {
			return err
		}
		if streams == 4 {
			p.p4 = append(p.p4, r.gbps)
		} else {
			p.p1 = append(p.p1, r.gbps)
		}
	}
	rtt, lost, err := pingRTT(ctx, p.client, p.dst, cfg.pings, 10*time.Millisecond)
	if err != nil {
		return err
	}
	p.rtt = append(p.rtt, rtt...)
	p.lost += lost
	p.sent += cfg.pings
	return nil
}

// pathTable writes the paths' table, then subject against each of the
// baselines, and returns the rows in the order of paths.
func pathTable(sec *section, paths []*dataPath, subject *dataPath, baselines ...*dataPath) []pathRow {
	// Throughput: the median of the rounds, with their range, as the
	// machine is shared and a round can lose its CPU to other work.
	tput := func(xs []float64) (float64, string) {
		switch len(xs) {
		case 0:
			return math.NaN(), "n/a"
		case 1:
			return xs[0], f(xs[0])
		}
		m := median(xs)
		return m, fmt.Sprintf("%s (%s–%s)", f(m), f(slices.Min(xs)), f(slices.Max(xs)))
	}
	fmt.Fprintln(sec, "| Path | MTU | TCP 4 streams Gbit/s | TCP 1 stream Gbit/s | RTT avg µs | RTT p50 µs | RTT p99 µs | lost |")
	fmt.Fprintln(sec, "|---|---:|---:|---:|---:|---:|---:|---:|")
	rows := make([]pathRow, len(paths))
	for i, p := range paths {
		d := summarize(p.rtt)
		m4, s4 := tput(p.p4)
		m1, s1 := tput(p.p1)
		rows[i] = pathRow{m4, m1, d.mean, d.p50, d.p99}
		fmt.Fprintf(sec, "| %s | %d | %s | %s | %s | %s | %s | %d/%d |\n", p.name, p.mtu, s4, s1, f(d.mean), f(d.p50), f(d.p99), p.lost, p.sent)
	}
	for _, p := range paths {
		if p.err != nil {
			fmt.Fprintf(sec, "\n**%s failed after %d round(s)**: %s\n", p.name, len(p.p1), strings.ReplaceAll(firstLines(p.err.Error(), 3), "\n", " "))
		}
	}
	againstTable(sec, paths, rows, subject, baselines...)
	return rows
}

// againstTable writes the table of subject against each of the baselines;
// rows are pathTable's, in the order of paths.
func againstTable(sec *section, paths []*dataPath, rows []pathRow, subject *dataPath, baselines ...*dataPath) {
	byPath := map[*dataPath]pathRow{}
	for i, p := range paths {
		byPath[p] = rows[i]
	}
	fmt.Fprintf(sec, "\n| %s against | TCP 4 streams ratio | TCP 1 stream ratio | RTT avg Δ µs | RTT p50 Δ µs | RTT p99 Δ µs |\n", subject.name)
	fmt.Fprintln(sec, "|---|---:|---:|---:|---:|---:|")
	ov := byPath[subject]
	for _, b := range baselines {
		r := byPath[b]
		fmt.Fprintf(sec, "| %s | %s | %s | %+.1f | %+.1f | %+.1f |\n", b.name, fr(ratio(ov.p4, r.p4)), fr(ratio(ov.p1, r.p1)), ov.avg-r.avg, ov.p50-r.p50, ov.p99-r.p99)
	}
}
