package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"consul-overlay/bench/harness"
	"consul-overlay/internal/testenv"
)

// swarmLabState is the state directory of the lab the swarm section runs
// on: the engine-20.10 lab (host A the machine's engine), or with
// LAB_ENGINE=29 in the environment, as lab/up.sh takes it, the engine-29
// lab (LAB_ID as there), both of whose engines live in namespaces.
func swarmLabState() string {
	if os.Getenv("LAB_ENGINE") == "29" {
		return "/run/consul-overlay-lab-" + cmp.Or(os.Getenv("LAB_ID"), "29")
	}
	return labStateDir
}

// benchSwarm compares consul-overlay with Docker's own overlay driver on
// the lab (lab/up.sh): host A is the machine's engine in its own
// namespace (or with LAB_ENGINE=29 an engine 29 in a namespace), host B a
// second engine in a namespace, one underlay. Docker's
// overlay needs Swarm, so the section makes the two engines a two-node
// Swarm for its duration (data path port 4790, so that Docker's VXLAN
// sockets are not shared with consul-overlay's on 4789) and leaves it
// afterwards. It uses the lab when it is up and owned by nobody else
// ("bench" or "manual"); when the lab is down it brings it up (owner
// "bench") and down again, except in quick mode. It also times `docker run
// --rm` on host A on consul-overlay, Docker's overlay and a bridge network.
func benchSwarm(t *runner, cfg *config, rep *report) {
	ctx := t.Context()
	stateDir := swarmLabState()
	env := labEnv(stateDir)
	if env == nil {
		if cfg.quick {
			t.Skip("the lab (lab/up.sh) is not up, and quick mode does not bring it up")
		}
		if _, err := os.Stat("lab/up.sh"); err != nil {
			testenv.Missing(t, "lab/up.sh", "the two-engine lab")
		}
		t.Logf("bringing the lab up (lab/up.sh --owner bench)")
		up := exec.CommandContext(ctx, "lab/up.sh", "--owner", "bench")
		if out, err := up.CombinedOutput(); err != nil {
			_ = exec.Command("lab/down.sh", "--owner", "bench").Run()
			testenv.Missing(t, "the lab", fmt.Sprintf("lab/up.sh --owner bench: %v: %s", err, lastLines(string(out), 5)))
		}
		t.Cleanup(func() {
			if out, err := exec.Command("lab/down.sh", "--owner", "bench").CombinedOutput(); err != nil {
				t.Logf("lab/down.sh: %v: %s", err, lastLines(string(out), 5))
			}
		})
		if env = labEnv(stateDir); env == nil {
			t.Fatal("lab/up.sh succeeded but wrote no env file")
		}
	} else {
		owner, _ := os.ReadFile(stateDir + "/owner")
		if o := strings.TrimSpace(string(owner)); o != "bench" && o != "manual" && o != "" {
			t.Skipf("the lab is up and in use by %q: not switching its engines into Swarm mode under it", o)
		}
	}
	sockA := env["LAB_DOCKER_A"] // "" when host A is the machine's engine
	dockA := func(args ...string) (string, error) { return docker(ctx, hostArgs(sockA, args...)...) }
	dockB := func(args ...string) (string, error) {
		return docker(ctx, append([]string{"-H", env["LAB_DOCKER_B"]}, args...)...)
	}
	must := func(out string, err error) string {
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	for name, d := range map[string]func(...string) (string, error){"A": dockA, "B": dockB} {
		if st := must(d("info", "--format", "{{.Swarm.LocalNodeState}}")); st != "inactive" {
			t.Skipf("host %s's engine is already in Swarm state %q: not touching it", name, st)
		}
	}
	a, b := env["LAB_ADDR_A"], env["LAB_ADDR_B"]
	version := must(dockA("version", "--format", "{{.Server.Version}}"))
	hostAIs := "host A is this machine's engine and namespace"
	if sockA != "" {
		hostAIs = "host A an engine in namespace " + env["LAB_NS_A"]
	}
	label, image, plugin := env["LAB_LABEL"], env["LAB_BUSYBOX"], env["LAB_PLUGIN"]

	must(dockA("swarm", "init", "--advertise-addr", a, "--listen-addr", a+":2377", "--data-path-port", "4790",
		"--default-addr-pool", "10.213.0.0/16", "--default-addr-pool-mask-length", "24"))
	t.Cleanup(func() { _, _ = docker(context.Background(), hostArgs(sockA, "swarm", "leave", "--force")...) })
	token := must(dockA("swarm", "join-token", "-q", "worker"))
	must(dockB("swarm", "join", "--token", token, "--advertise-addr", b, "--listen-addr", b+":2377", a+":2377"))
	t.Cleanup(func() { _, _ = docker(context.Background(), "-H", env["LAB_DOCKER_B"], "swarm", "leave", "--force") })
	// Removing the ingress network before leaving: otherwise Docker 20.10
	// keeps listing it, with its sandbox, until the engine restarts.
	t.Cleanup(func() {
		rm := exec.Command("docker", hostArgs(sockA, "network", "rm", "ingress")...)
		rm.Stdin = strings.NewReader("y\n")
		_ = rm.Run()
		time.Sleep(time.Second)
	})
	if err := eventually(ctx, 60*time.Second, func() error {
		out, err := dockA("node", "ls", "--format", "{{.Status}}")
		if err == nil && strings.Count(out, "Ready") != 2 {
			err = fmt.Errorf("swarm nodes: %q", out)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}

	suffix := harness.RandomID()[:6]
	swarmNet, coNet := "cobench-swarm-"+suffix, "cobench-co-"+suffix
	must(dockA("network", "create", "-d", "overlay", "--attachable", "--subnet", "10.213.200.0/24", "--label", label, swarmNet))
	t.Cleanup(func() { _, _ = docker(context.Background(), hostArgs(sockA, "network", "rm", swarmNet)...) })
	for _, d := range []struct {
		f    func(...string) (string, error)
		host string
	}{{dockA, sockA}, {dockB, env["LAB_DOCKER_B"]}} {
		must(d.f("network", "create", "-d", plugin, "--ipam-driver", plugin, "--subnet", "10.214.0.0/24", "-o", "name="+coNet, "--label", label, coNet))
		host := d.host
		t.Cleanup(func() { _, _ = docker(context.Background(), hostArgs(host, "network", "rm", coNet)...) })
	}

	// One container per engine per network; iperf3 and ping run in their
	// network namespaces from the machine's binaries.
	type ctr struct {
		ns *testenv.NetNS
		ip netip.Addr
	}
	start := func(host, network, name string) ctr {
		must(docker(ctx, hostArgs(host, "run", "-d", "--label", label, "--network", network, "--name", name, image, "sleep", "3600")...))
		t.Cleanup(func() { _, _ = docker(context.Background(), hostArgs(host, "rm", "-f", name)...) })
		pid, err := strconv.Atoi(must(docker(ctx, hostArgs(host, "inspect", "-f", "{{.State.Pid}}", name)...)))
		if err != nil {
			t.Fatalf("pid of %s: %v", name, err)
		}
		ip, err := netip.ParseAddr(must(docker(ctx, hostArgs(host, "inspect", "-f", fmt.Sprintf(`{{(index .NetworkSettings.Networks %q).IPAddress}}`, network), name)...)))
		if err != nil {
			t.Fatalf("address of %s: %v", name, err)
		}
		return ctr{&testenv.NetNS{Name: "container " + name, Path: fmt.Sprintf("/proc/%d/ns/net", pid)}, ip}
	}
	sa, sb := start(sockA, swarmNet, swarmNet+"-a"), start(env["LAB_DOCKER_B"], swarmNet, swarmNet+"-b")
	ca, cb := start(sockA, coNet, coNet+"-a"), start(env["LAB_DOCKER_B"], coNet, coNet+"-b")
	for i, p := range [][2]ctr{{ca, cb}, {sa, sb}} {
		if err := eventually(ctx, 60*time.Second, func() error {
			_, err := nsRun(ctx, p[0].ns, "ping", "-n", "-c", "1", "-W", "1", p[1].ip.String())
			return err
		}); err != nil {
			if i == 0 {
				t.Fatalf("consul-overlay carries no traffic between the lab's hosts: %v", err)
			}
			// The baseline failing is no fault of ours: say so and stop.
			t.Skipf("Docker's overlay carried no traffic between the lab's hosts within 60 s: %v", err)
		}
	}
	hostA := &testenv.NetNS{Name: "host A", Path: "/proc/self/ns/net"}
	if ns := env["LAB_NS_A"]; ns != "" {
		hostA.Path = "/run/netns/" + ns
	}
	hostB := &testenv.NetNS{Name: "host B", Path: "/run/netns/" + env["LAB_NS_B"]}
	ulMTU, _ := mtuOf(ctx, hostA, netip.MustParseAddr(a))
	swMTU, _ := mtuOf(ctx, sa.ns, sa.ip)
	coMTU, _ := mtuOf(ctx, ca.ns, ca.ip)
	// Where the gap to Docker's overlay comes from: the same hand-built
	// VXLAN three times on the lab's hosts. Its bridge in the host's
	// namespace (consul-overlay's layout, let through dockerd's FORWARD
	// policy by one rule as consul-overlay's firewall does), in a
	// namespace of its own (Docker's overlay's layout), and in the host's
	// namespace again with what Docker puts in every container's namespace
	// on a user-defined network: the NAT rules of its embedded DNS server,
	// which turn conntrack on there for all the container's traffic (both
	// overlays' containers carry them).
	labHosts := [2]*testenv.Host{{NS: hostA, Addr: netip.MustParseAddr(a)}, {NS: hostB, Addr: netip.MustParseAddr(b)}}
	inHostNS := func(net byte) ([2]*testenv.NetNS, [2]netip.Addr) {
		suffix := fmt.Sprint(net)
		ctr, addr := buildHand(t, labHosts, coMTU, handLayout{vni: handVNI + int(net), net: net, suffix: suffix})
		if err := acceptBridged(ctx, "-I", "hvbr"+suffix, hostA, hostB); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = acceptBridged(context.Background(), "-D", "hvbr"+suffix, hostA, hostB) })
		return ctr, addr
	}
	hhCtr, hhAddr := inHostNS(1)
	hsCtr, hsAddr := buildHand(t, labHosts, coMTU, handLayout{vni: handVNI + 2, net: 2, suffix: "2", sandbox: true})
	hnCtr, hnAddr := inHostNS(3)
	for _, c := range hnCtr {
		if err := dockerDNSNAT(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	for where, p := range map[string]struct {
		from *testenv.NetNS
		to   netip.Addr
	}{"the host's namespace": {hhCtr[0], hhAddr[1]}, "a namespace of its own": {hsCtr[0], hsAddr[1]},
		"the host's namespace (containers with Docker's DNS NAT)": {hnCtr[0], hnAddr[1]}} {
		if err := eventually(ctx, 10*time.Second, func() error {
			_, err := nsRun(ctx, p.from, "ping", "-n", "-c", "1", "-W", "1", p.to.String())
			return err
		}); err != nil {
			t.Fatalf("the hand-built VXLAN with its bridge in %s carries no traffic between the lab's hosts: %v", where, err)
		}
	}
	paths := []*dataPath{
		{name: "lab underlay (host A to host B)", mtu: ulMTU, client: hostA, server: hostB, dst: netip.MustParseAddr(b)},
		{name: "Docker overlay (Swarm)", mtu: swMTU, client: sa.ns, server: sb.ns, dst: sb.ip},
		{name: "consul-overlay (lab)", mtu: coMTU, client: ca.ns, server: cb.ns, dst: cb.ip},
		// The same containers with conntrack off for bridged overlay
		// frames on both hosts, for the rounds of this path only: how much
		// of the gap to Docker's overlay is conntrack (BENCHMARKS.md,
		// Findings). Docker's overlay bridges live in namespaces of their
		// own, without conntrack or dockerd's rules.
		{name: "consul-overlay (lab), bridged frames untracked", mtu: coMTU, client: ca.ns, server: cb.ns, dst: cb.ip,
			setup:    func(ctx context.Context) error { return untrackBridged(ctx, "-I", hostA, hostB) },
			teardown: func(ctx context.Context) error { return untrackBridged(ctx, "-D", hostA, hostB) }},
		{name: "hand-built VXLAN, bridge in the host's namespace", mtu: coMTU, client: hhCtr[0], server: hhCtr[1], dst: hhAddr[1]},
		{name: "hand-built VXLAN, bridge in a namespace of its own", mtu: coMTU, client: hsCtr[0], server: hsCtr[1], dst: hsAddr[1]},
		{name: "hand-built VXLAN, bridge in the host's namespace, containers with Docker's DNS NAT", mtu: coMTU, client: hnCtr[0], server: hnCtr[1], dst: hnAddr[1]},
	}
	// Left behind by an interrupted run, a rule would skew later runs.
	t.Cleanup(func() {
		for untrackBridged(context.Background(), "-D", hostA, hostB) == nil {
		}
	})
	measurePaths(t, cfg, paths)
	sec := rep.section("Data plane on the lab: consul-overlay against Docker's overlay")
	fmt.Fprintf(sec, "The lab (lab/up.sh), engine %s: %s, host B a second engine in a namespace, "+
		"joined by veths to a bridge in a switch namespace; Consul server and agents as in production. Docker's overlay: "+
		"a two-node Swarm of the two engines made for this run (`docker swarm init --data-path-port 4790`), an attachable "+
		"overlay network; consul-overlay: the lab's plugin on both engines. One busybox container per engine per network; "+
		"iperf3 and ping run in their namespaces. %s\n\n", version, hostAIs, method(cfg))
	rows := pathTable(sec, paths, paths[2], paths[1], paths[0])
	fmt.Fprintf(sec, "\n%s: the same containers, measured interleaved with the others, with `iptables -t raw -I PREROUTING "+
		"-i vxbr+ -j NOTRACK` (and ip6tables) on both hosts during its rounds only, so that bridged overlay frames skip "+
		"conntrack (they still cross the FORWARD chain through br_netfilter).\n\n", paths[3].name)
	againstTable(sec, paths, rows, paths[3], paths[1], paths[2])
	fmt.Fprintf(sec, "\nThe hand-built paths are one VXLAN built with iproute2 (buildHand), the same device settings "+
		"and MTU as consul-overlay's: once with each host's bridge in the host's namespace, where dockerd's rules and "+
		"conntrack see bridged frames (one `-I FORWARD -i hvbr1 -m physdev --physdev-is-bridged -j ACCEPT` lets them through, "+
		"as consul-overlay's firewall does), and once with the bridge in a namespace of its own, the VXLAN device made in "+
		"the host's namespace and moved there, as Docker's overlay does. The third is the first with, in both containers' "+
		"namespaces, the NAT rules Docker gives every container of a user-defined network for its embedded DNS server "+
		"(`iptables -t nat -A OUTPUT -d 127.0.0.11/32 -p udp --dport 53 -j DNAT ...` and their SNAT twins, for udp and tcp), "+
		"which turn conntrack on in the container's namespace: the containers of both overlays carry them.\n\n")
	againstTable(sec, paths, rows, paths[5], paths[4], paths[1], paths[2])
	againstTable(sec, paths, rows, paths[2], paths[6], paths[4])
	co, sw, un := rows[2], rows[1], rows[3]
	hh, hs, hn := rows[4], rows[5], rows[6]
	lab := "lab, engine " + version
	rep.check("consul-overlay TCP, 4 streams, ÷ Docker overlay ("+lab+")", r3(ratio(co.p4, sw.p4)), "≥ 1 (not below)", ratio(co.p4, sw.p4) >= 1)
	rep.check("consul-overlay TCP, 1 stream, ÷ Docker overlay ("+lab+")", r3(ratio(co.p1, sw.p1)), "≥ 1 (not below)", ratio(co.p1, sw.p1) >= 1)
	rep.check("consul-overlay RTT avg − Docker overlay ("+lab+")", fmt.Sprintf("%+.1f µs", co.avg-sw.avg), "≤ +3 µs", co.avg-sw.avg <= 3)
	rep.info("consul-overlay untracked TCP 4 / 1 streams ÷ Docker overlay ("+lab+")", fmt.Sprintf("%s / %s", r3(ratio(un.p4, sw.p4)), r3(ratio(un.p1, sw.p1))))
	rep.info("consul-overlay untracked RTT avg − Docker overlay ("+lab+")", fmt.Sprintf("%+.1f µs", un.avg-sw.avg))
	rep.info("hand-built VXLAN, bridge in its own namespace ÷ in the host's: TCP 4 / 1 streams, RTT Δ ("+lab+")",
		fmt.Sprintf("%s / %s, %+.1f µs", r3(ratio(hs.p4, hh.p4)), r3(ratio(hs.p1, hh.p1)), hs.avg-hh.avg))
	rep.info("consul-overlay ÷ hand-built VXLAN, bridge in the host's namespace: TCP 4 / 1 streams, RTT Δ ("+lab+")",
		fmt.Sprintf("%s / %s, %+.1f µs", r3(ratio(co.p4, hh.p4)), r3(ratio(co.p1, hh.p1)), co.avg-hh.avg))
	rep.info("hand-built VXLAN, bridge in its own namespace ÷ Docker overlay: TCP 4 / 1 streams, RTT Δ ("+lab+")",
		fmt.Sprintf("%s / %s, %+.1f µs", r3(ratio(hs.p4, sw.p4)), r3(ratio(hs.p1, sw.p1)), hs.avg-sw.avg))
	rep.info("hand-built VXLAN, host's namespace, with ÷ without Docker's DNS NAT in the containers: TCP 4 / 1 streams, RTT Δ ("+lab+")",
		fmt.Sprintf("%s / %s, %+.1f µs", r3(ratio(hn.p4, hh.p4)), r3(ratio(hn.p1, hh.p1)), hn.avg-hh.avg))
	rep.info("consul-overlay ÷ hand-built VXLAN, host's namespace, containers with Docker's DNS NAT: TCP 4 / 1 streams, RTT Δ ("+lab+")",
		fmt.Sprintf("%s / %s, %+.1f µs", r3(ratio(co.p4, hn.p4)), r3(ratio(co.p1, hn.p1)), co.avg-hn.avg))

	// docker run --rm on host A: consul-overlay against Docker's overlay
	// and a bridge network, and each --internal (no docker_gwbridge
	// endpoint), so that Docker's cost of a network without a gateway
	// shows apart from the driver's.
	brNet, coInt, swInt, brInt := "cobench-br-"+suffix, coNet+"-int", swarmNet+"-int", "cobench-br-"+suffix+"-int"
	coEg, coDk := coNet+"-eg", coNet+"-dk"
	for _, n := range []struct {
		name string
		args []string
	}{
		{brNet, []string{"--subnet", "10.215.1.0/24"}},
		{coInt, []string{"--internal", "-d", plugin, "--ipam-driver", plugin, "--subnet", "10.215.2.0/24", "-o", "name=" + coInt}},
		{swInt, []string{"--internal", "-d", "overlay", "--attachable", "--subnet", "10.213.201.0/24"}},
		{brInt, []string{"--internal", "--subnet", "10.215.3.0/24"}},
		// The host as the way out: no docker_gwbridge endpoint.
		{coEg, []string{"-d", plugin, "--ipam-driver", plugin, "--subnet", "10.215.4.0/24", "-o", "name=" + coEg, "-o", "egress=host"}},
		// Docker's way out, as for its own overlay: a docker_gwbridge
		// endpoint per container (the default, auto, gives none to a
		// container without published ports).
		{coDk, []string{"-d", plugin, "--ipam-driver", plugin, "--subnet", "10.215.5.0/24", "-o", "name=" + coDk, "-o", "egress=docker"}},
	} {
		must(dockA(append(append([]string{"network", "create", "--label", label}, n.args...), n.name)...))
		name := n.name
		t.Cleanup(func() { _, _ = docker(context.Background(), hostArgs(sockA, "network", "rm", name)...) })
	}
	took := timeDockerRuns(t, sockA, image, []string{coNet, swarmNet, brNet, coInt, swInt, brInt, coEg, coDk}, cfg.dockerRuns)
	cd, sd, bd := took[coNet], took[swarmNet], took[brNet]
	cid, sid, bid := took[coInt], took[swInt], took[brInt]
	ced, cdd := took[coEg], took[coDk]
	dsec := rep.section("docker run --rm on the lab's host A (engine " + version + ")")
	fmt.Fprintf(dsec, "`docker run --rm --network N %s true` on host A of the lab (%s), %d runs per network after 2 warm-ups, "+
		"networks alternating, while the Swarm of the section above is up: consul-overlay (the lab's plugin, Consul through "+
		"the host's agent), Docker's overlay (attachable) and a user-defined bridge network, each also `--internal`, and "+
		"consul-overlay with `-o egress=host` and with `-o egress=docker`. Docker connects a container of a network without a gateway "+
		"(Docker's overlay, consul-overlay with egress=docker) to docker_gwbridge, a second endpoint per run; an `--internal` network "+
		"gets none, nor does an egress=host one or one of the default egress, auto, for a container without published ports "+
		"(its containers get the network's gateway; the host routes and masquerades their traffic).\n\n", image, hostAIs, cfg.dockerRuns)
	runsTable(dsec, []namedDist{{"consul-overlay", cd}, {"Docker overlay (Swarm)", sd}, {"bridge", bd},
		{"consul-overlay, --internal", cid}, {"Docker overlay, --internal", sid}, {"bridge, --internal", bid},
		{"consul-overlay, -o egress=host", ced}, {"consul-overlay, -o egress=docker", cdd}})
	fmt.Fprintf(dsec, "\nAt p50: consul-overlay ÷ bridge %s, ÷ Docker overlay %s; both --internal: ÷ bridge %s, ÷ Docker overlay %s; "+
		"consul-overlay -o egress=host ÷ bridge %s, ÷ Docker overlay %s. "+
		"The docker_gwbridge endpoint costs %s ms on consul-overlay and %s ms on Docker's overlay (each less its --internal twin); "+
		"-o egress=host saves %s ms on consul-overlay; consul-overlay -o egress=docker ÷ Docker overlay %s.\n",
		fr(ratio(cd.p50, bd.p50)), fr(ratio(cd.p50, sd.p50)), fr(ratio(cid.p50, bid.p50)), fr(ratio(cid.p50, sid.p50)),
		fr(ratio(ced.p50, bd.p50)), fr(ratio(ced.p50, sd.p50)),
		f(cdd.p50-cid.p50), f(sd.p50-sid.p50), f(cdd.p50-ced.p50), fr(ratio(cdd.p50, sd.p50)))
	rep.check("docker run --rm, consul-overlay ÷ bridge (p50, "+lab+")", fr(ratio(cd.p50, bd.p50)), "≤ 1.05", ratio(cd.p50, bd.p50) <= 1.05)
	rep.info("docker run --rm, consul-overlay ÷ Docker overlay (p50, "+lab+")", fr(ratio(cd.p50, sd.p50)))
	rep.info("docker run --rm, both --internal, consul-overlay ÷ bridge (p50, "+lab+")", fr(ratio(cid.p50, bid.p50)))
	rep.info("docker run --rm, consul-overlay -o egress=host ÷ bridge (p50, "+lab+")", fr(ratio(ced.p50, bd.p50)))
	rep.info("docker run --rm, consul-overlay -o egress=docker ÷ Docker overlay (p50, "+lab+")", fr(ratio(cdd.p50, sd.p50)))
}

// untrackBridged adds (op "-I") or deletes ("-D") on each host the raw
// rules that take bridged overlay frames out of conntrack. Deleting a rule
// that is not there fails.
//
// Equivalent to: `iptables -t raw -I PREROUTING -i vxbr+ -m comment
// --comment cobench-untracked -j NOTRACK`, and the same with ip6tables.
func untrackBridged(ctx context.Context, op string, hosts ...*testenv.NetNS) error {
	var errs []error
	for _, h := range hosts {
		for _, cmd := range []string{"iptables", "ip6tables"} {
			_, err := nsRun(ctx, h, cmd, "-w", "-t", "raw", op, "PREROUTING", "-i", "vxbr+",
				"-m", "comment", "--comment", "cobench-untracked", "-j", "NOTRACK")
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// acceptBridged adds (op "-I") or deletes ("-D") on each host the rule
// that lets frames bridged by bridge through dockerd's FORWARD policy.
//
// Equivalent to: `iptables -I FORWARD -i <bridge> -m physdev
// --physdev-is-bridged -m comment --comment cobench-hand -j ACCEPT`.
func acceptBridged(ctx context.Context, op, bridge string, hosts ...*testenv.NetNS) error {
	var errs []error
	for _, h := range hosts {
		_, err := nsRun(ctx, h, "iptables", "-w", op, "FORWARD", "-i", bridge, "-m", "physdev", "--physdev-is-bridged",
			"-m", "comment", "--comment", "cobench-hand", "-j", "ACCEPT")
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// dockerDNSNAT gives a container namespace the NAT rules Docker gives a
// container of a user-defined network for its embedded DNS server at
// 127.0.0.11 (the ports are the resolver's, any will do here).
//
// Equivalent to: `iptables -t nat -A OUTPUT -d 127.0.0.11/32 -p udp
// --dport 53 -j DNAT --to-destination 127.0.0.11:5353`, `iptables -t nat
// -A POSTROUTING -s 127.0.0.11/32 -p udp --sport 5353 -j SNAT --to-source
// :53`, and the same for tcp.
func dockerDNSNAT(ctx context.Context, ns *testenv.NetNS) error {
	var errs []error
	for _, proto := range []string{"udp", "tcp"} {
		_, err := nsRun(ctx, ns, "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.11/32", "-p", proto,
			"--dport", "53", "-j", "DNAT", "--to-destination", "127.0.0.11:5353")
		errs = append(errs, err)
		_, err = nsRun(ctx, ns, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", "127.0.0.11/32", "-p", proto,
			"--sport", "5353", "-j", "SNAT", "--to-source", ":53")
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func hostArgs(host string, args ...string) []string {
	if host == "" {
		return args
	}
	return append([]string{"-H", host}, args...)
}

var mtuRE = regexp.MustCompile(`\bmtu (\d+)`)

// mtuOf returns the MTU of the interface that holds ip in ns.
func mtuOf(ctx context.Context, ns *testenv.NetNS, ip netip.Addr) (int, error) {
	out, err := nsRun(ctx, ns, "ip", "-o", "addr", "show")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) > 3 && strings.HasPrefix(f[3], ip.String()+"/") {
			link, err := nsRun(ctx, ns, "ip", "-o", "link", "show", f[1])
			if err != nil {
				return 0, err
			}
			if m := mtuRE.FindStringSubmatch(link); m != nil {
				return strconv.Atoi(m[1])
			}
		}
	}
	return 0, fmt.Errorf("no interface holds %s in %s", ip, ns.Name)
}
