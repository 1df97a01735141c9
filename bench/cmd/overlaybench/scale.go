package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"consul-overlay/bench/harness"
	"consul-overlay/internal/testenv"
	"consul-overlay/vxlan"
)

// memUsage is a process's resident and proportional set size in MiB.
type memUsage struct{ rss, pss float64 }

func readMem(pid int) (memUsage, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return memUsage{}, err
	}
	defer f.Close()
	var m memUsage
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 {
			continue
		}
		kb, err := strconv.ParseFloat(fs[1], 64)
		if err != nil {
			continue
		}
		switch fs[0] {
		case "Rss:":
			m.rss = kb / 1024
		case "Pss:":
			m.pss = kb / 1024
		}
	}
	return m, sc.Err()
}

// endpointVNI asks a plugin for the VNI of an endpoint's network
// (EndpointOperInfo).
func endpointVNI(t *runner, p *harness.Plugin, networkID, endpointID string) uint32 {
	var info struct{ Value map[string]string }
	if err := p.Call("/NetworkDriver.EndpointOperInfo", map[string]any{"NetworkID": networkID, "EndpointID": endpointID}, &info); err != nil {
		t.Fatal(err)
	}
	vni, err := strconv.ParseUint(info.Value["vni"], 10, 32)
	if err != nil {
		t.Fatalf("EndpointOperInfo answered vni %q", info.Value["vni"])
	}
	return uint32(vni)
}

// vxIndex waits for the VXLAN device of vni in a namespace.
func vxIndex(ctx context.Context, ns *testenv.NetNS, vni uint32) (int, error) {
	var idx int
	err := eventually(ctx, 10*time.Second, func() error {
		l, err := ns.Handle().LinkByName(vxlan.VXLANName(vni))
		if err != nil {
			return err
		}
		idx = l.Attrs().Index
		return nil
	})
	return idx, err
}

// waitCount polls a host's VXLAN device until it holds want peers
// (neighbour and FDB entries) and returns when.
func waitCount(ctx context.Context, h *netlink.Handle, idx, want int, interval, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	var n, f int
	var err error
	for {
		n, f, err = countPeers(h, idx)
		now := time.Now()
		if err == nil && n >= want && f >= want {
			return now, nil
		}
		if now.After(deadline) {
			return time.Time{}, fmt.Errorf("%d neighbour and %d fdb entries after %s, want %d (last error: %v)", n, f, timeout, want, err)
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(interval):
		}
	}
}

// restoredLine finds the (k+1)-th "state restored" line of a plugin log
// and returns its time and its kernel_changes field.
func restoredLine(log string, k int) (time.Time, string, bool) {
	seen := 0
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, `msg="state restored"`) {
			continue
		}
		if seen < k {
			seen++
			continue
		}
		var at time.Time
		var changes string
		for _, fld := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(fld, "time="); ok {
				at, _ = time.Parse(time.RFC3339Nano, v)
			}
		}
		if i := strings.Index(line, "kernel_changes="); i >= 0 {
			changes = strings.Trim(line[i+len("kernel_changes="):], `"`)
		}
		return at, changes, !at.IsZero()
	}
	return time.Time{}, "", false
}

// kernelBaseline programs n peers (neighbour + FDB entry each) and one
// flood entry per VTEP into a fresh VXLAN device by netlink, the kernel
// work of a host that learns n peers, and returns how long it took.
func kernelBaseline(t *runner, n int, vteps []netip.Addr) time.Duration {
	ns := testenv.NewNetNS(t)
	h := ns.Handle()
	vx := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "kbvx0", MTU: 1450}, VxlanId: 4242, Port: 4789, Learning: false, Proxy: true}
	if err := h.LinkAdd(vx); err != nil {
		t.Fatalf("baseline vxlan: %v", err)
	}
	l, err := h.LinkByName("kbvx0")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	idx := l.Attrs().Index
	type peer struct {
		ip   net.IP
		mac  net.HardwareAddr
		vtep net.IP
	}
	peers := make([]peer, n)
	for i := range peers {
		mac := make(net.HardwareAddr, 6)
		_, _ = rand.Read(mac)
		mac[0] = mac[0]&0xfe | 0x02
		peers[i] = peer{net.IPv4(10, 64, byte(i>>8), byte(i)), mac, vteps[i%len(vteps)].AsSlice()}
	}
	start := time.Now()
	for _, p := range peers {
		if err := h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: p.ip, HardwareAddr: p.mac}); err != nil {
			t.Fatalf("baseline neigh: %v", err)
		}
		if err := h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT, Flags: netlink.NTF_SELF, IP: p.vtep, HardwareAddr: p.mac}); err != nil {
			t.Fatalf("baseline fdb: %v", err)
		}
	}
	for _, v := range vteps {
		if err := h.NeighAppend(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT, Flags: netlink.NTF_SELF, IP: v.AsSlice(), HardwareAddr: make(net.HardwareAddr, 6)}); err != nil {
			t.Fatalf("baseline flood entry: %v", err)
		}
	}
	return time.Since(start)
}

// readMems reads the memory of each plugin, failing the run on an error.
func readMems(t *runner, plugins []*harness.Plugin) []memUsage {
	out := make([]memUsage, 0, len(plugins))
	for _, p := range plugins {
		m, err := readMem(p.Pid())
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

// memorySettle is how long the scale bench waits after its first memory
// reading (1 s after the last peer) for its second, quiet one: more than
// the plugin's releaseEvery (10 s) and one look (2 s).
const memorySettle = 13 * time.Second

// benchScale loads one network with many endpoints over several hosts,
// adds many networks, then measures memory, a restarted plugin's
// reconcile (with a ping running through it) and a new host's convergence.
func benchScale(t *runner, cfg *config, rep *report) {
	H, E, N := cfg.scaleHosts, cfg.scaleEndpoints, cfg.scaleNetworks
	sec := rep.section(fmt.Sprintf("Scale: %d endpoints on %d hosts in one network, %d networks", E, H, N))
	ctx := t.Context()
	c := harness.NewCluster(t, H+1, harness.ClusterOptions{Bin: cfg.bin, LogLevel: "info", Plugins: H, Env: cfg.pluginEnv})
	time.Sleep(time.Second)
	idle := readMems(t, c.Plugins[:H])

	spec := harness.NetSpec{Subnet4: "10.64.0.0/22", Options: map[string]string{"name": "scale"}}
	for _, kv := range strings.Split(os.Getenv("BENCH_NET_OPTS"), ",") { // experiments
		if k, v, ok := strings.Cut(kv, "="); ok {
			spec.Options[k] = v
		}
	}
	nets := make([]*harness.Network, H)
	for i := range H {
		n, err := c.Plugins[i].CreateNetwork(spec)
		if err != nil {
			t.Fatalf("host%d: %v", i, err)
		}
		nets[i] = n
	}
	ctr0, err := nets[0].Run(t)
	if err != nil {
		t.Fatal(err)
	}
	ctr1, err := nets[1].Run(t)
	if err != nil {
		t.Fatal(err)
	}
	local := make([]int, H)
	local[0], local[1] = 1, 1
	perHost := make([]int, H)
	for i := range E - 2 {
		perHost[i%H]++
	}

	// Endpoints: every host attaches its share, hosts in parallel.
	t.Logf("attaching %d endpoints", E-2)
	start := time.Now()
	errs := make([]error, H)
	var wg sync.WaitGroup
	for i := range H {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perHost[i] {
				if _, err := nets[i].Attach(); err != nil {
					errs[i] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	attachDur := time.Since(start)
	for i, err := range errs {
		if err != nil {
			t.Fatalf("host%d: attach: %v", i, err)
		}
		local[i] += perHost[i]
	}

	// More networks, each on every host.
	t.Logf("creating %d more networks on %d hosts", N-1, H)
	netStart := time.Now()
	for i := range H {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 1; j < N; j++ {
				s := harness.NetSpec{Subnet4: fmt.Sprintf("10.%d.%d.0/24", 100+j/256, j%256), Options: map[string]string{"name": fmt.Sprintf("scale-%d", j)}}
				if _, err := c.Plugins[i].CreateNetwork(s); err != nil {
					errs[i] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	netsDur := time.Since(netStart)
	for i, err := range errs {
		if err != nil {
			t.Fatalf("host%d: create network: %v", i, err)
		}
	}

	vni := endpointVNI(t, c.Plugins[0], nets[0].ID, ctr0.ID)
	idx := make([]int, H+1)
	for i := range H {
		if idx[i], err = vxIndex(ctx, c.Hosts[i].NS, vni); err != nil {
			t.Fatalf("host%d: %v", i, err)
		}
		if _, err := waitCount(ctx, c.Hosts[i].NS.Handle(), idx[i], E-local[i], 10*time.Millisecond, 120*time.Second); err != nil {
			t.Fatalf("host%d never programmed its peers: %v", i, err)
		}
	}
	steady := time.Since(start)
	time.Sleep(time.Second)
	loaded := readMems(t, c.Plugins[:H])
	// And once the plugins are quiet: a plugin returns a burst's free
	// pages within a few seconds of the last allocation (plugin/memory.go).
	time.Sleep(memorySettle)
	settled := readMems(t, c.Plugins[:H])

	// Restart host1's plugin (kill -9) while host0's container pings
	// host1's every 10 ms.
	p1 := c.Plugins[1]
	prevRestores := strings.Count(p1.Log(), `msg="state restored"`)
	pingCmd := ctr0.NS.Command(ctx, "ping", "-n", "-q", "-i", "0.01", "-W", "1", ctr1.Addr4.Addr().String())
	var pingOut strings.Builder
	pingCmd.Stdout, pingCmd.Stderr = &pingOut, &pingOut
	if err := pingCmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	p1.Stop(syscall.SIGKILL)
	time.Sleep(200 * time.Millisecond)
	p1.Start()
	answered := time.Since(p1.Started())
	var restored time.Time
	var changes string
	if err := eventually(ctx, 60*time.Second, func() error {
		var ok bool
		if restored, changes, ok = restoredLine(p1.Log(), prevRestores); !ok {
			return fmt.Errorf("host1's restarted plugin has not restored its state within 60s:\n%s", harness.Tail(p1.Log(), 10))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	reconcile := restored.Sub(p1.Started())
	time.Sleep(time.Second)
	_ = pingCmd.Process.Signal(os.Interrupt)
	_ = pingCmd.Wait()
	sent, recv, ok := pingLossOf(pingOut.String())
	if !ok {
		t.Fatalf("ping through the restart printed no summary:\n%s", pingOut.String())
	}
	n1, f1, _ := countPeers(c.Hosts[1].NS.Handle(), idx[1])
	restartMem, _ := readMem(p1.Pid())

	// A new host joins: its plugin starts and creates the network.
	pn := c.StartPlugin(H)
	time.Sleep(time.Second)
	newIdle, err := readMem(pn.Pid())
	if err != nil {
		t.Fatal(err)
	}
	joinStart := time.Now()
	if _, err := pn.CreateNetwork(spec); err != nil {
		t.Fatalf("host%d: %v", H, err)
	}
	createDur := time.Since(joinStart)
	if idx[H], err = vxIndex(ctx, c.Hosts[H].NS, vni); err != nil {
		t.Fatal(err)
	}
	joined, err := waitCount(ctx, c.Hosts[H].NS.Handle(), idx[H], E, 5*time.Millisecond, 120*time.Second)
	if err != nil {
		t.Fatalf("the new host never programmed its peers: %v", err)
	}
	joinDur := joined.Sub(joinStart)
	time.Sleep(time.Second)
	newLoaded, _ := readMem(pn.Pid())

	var vteps []netip.Addr
	for _, h := range c.Hosts[:H] {
		vteps = append(vteps, h.Addr)
	}
	base := kernelBaseline(t, E, vteps)

	// Report.
	var maxLoaded, maxSettled, meanIdle memUsage
	for i := range loaded {
		maxLoaded.rss = max(maxLoaded.rss, loaded[i].rss)
		maxLoaded.pss = max(maxLoaded.pss, loaded[i].pss)
		maxSettled.rss = max(maxSettled.rss, settled[i].rss)
		maxSettled.pss = max(maxSettled.pss, settled[i].pss)
		meanIdle.rss += idle[i].rss / float64(H)
		meanIdle.pss += idle[i].pss / float64(H)
	}
	fmt.Fprintf(sec, "%d hosts, Consul in host0's namespace. One network (%s) with %d endpoints, %v per host; endpoints other than "+
		"the two ping containers are attached at the protocol level (RequestAddress, CreateEndpoint, Join) and their interface "+
		"stays in the host namespace: no container namespace each, which changes nothing for the plugin or for the peers it "+
		"programs. Then %d more networks (a /24 each, no endpoints), each created on every host, so every plugin watches %d networks.\n\n",
		H, spec.Subnet4, E, perHost, N-1, N)
	fmt.Fprintln(sec, "| Figure | Value | Baseline | Ratio |")
	fmt.Fprintln(sec, "|---|---:|---|---:|")
	row := func(name, val, bname string, r float64) {
		rs := fr(r)
		if bname == "" {
			rs = ""
		}
		fmt.Fprintf(sec, "| %s | %s | %s | %s |\n", name, val, bname, rs)
	}
	row(fmt.Sprintf("attach %d endpoints, hosts in parallel", E-2), fmt.Sprintf("%.1f s (%.0f/s)", attachDur.Seconds(), float64(E-2)/attachDur.Seconds()), "", ratio(0, 0))
	row(fmt.Sprintf("create %d networks on %d hosts in parallel", N-1, H), fmt.Sprintf("%.1f s (%.0f ms per network per host)", netsDur.Seconds(), ms(netsDur)/float64(N-1)), "", ratio(0, 0))
	row("from the first attach until every host has all its peers", fmt.Sprintf("%.1f s", steady.Seconds()), "", ratio(0, 0))
	for i := range loaded {
		row(fmt.Sprintf("host%d plugin memory, RSS / PSS (%d local endpoints, %d peers)", i, local[i], E-local[i]),
			fmt.Sprintf("%.1f / %.1f MiB", loaded[i].rss, loaded[i].pss), fmt.Sprintf("idle plugin %.1f / %.1f MiB", idle[i].rss, idle[i].pss), ratio(loaded[i].rss, idle[i].rss))
	}
	for i := range settled {
		row(fmt.Sprintf("host%d plugin memory %.0f s later (quiet), RSS / PSS", i, memorySettle.Seconds()),
			fmt.Sprintf("%.1f / %.1f MiB", settled[i].rss, settled[i].pss), fmt.Sprintf("idle plugin %.1f / %.1f MiB", idle[i].rss, idle[i].pss), ratio(settled[i].rss, idle[i].rss))
	}
	row("host1 restart (kill -9): start until the socket answers", fmt.Sprintf("%.0f ms", ms(answered)), "", ratio(0, 0))
	row(fmt.Sprintf("**host1 restart: start until state restored** (%d networks, %d local endpoints, %d peers)", N, local[1], E-local[1]),
		fmt.Sprintf("%.0f ms", ms(reconcile)), fmt.Sprintf("kernel writes alone, %d peers: %.0f ms", E, ms(base)), ratio(ms(reconcile), ms(base)))
	row("ping host0 → host1 container every 10 ms through the restart", fmt.Sprintf("%d lost of %d", sent-recv, sent), "", ratio(0, 0))
	row("host1 after the restart: neighbour / FDB entries", fmt.Sprintf("%d / %d (want %d)", n1, f1, E-local[1]), "", ratio(0, 0))
	row("host1 memory after the restart, RSS / PSS", fmt.Sprintf("%.1f / %.1f MiB", restartMem.rss, restartMem.pss), "", ratio(0, 0))
	row(fmt.Sprintf("**new host%d: CreateNetwork until all %d peers programmed**", H, E), fmt.Sprintf("%.0f ms", ms(joinDur)),
		fmt.Sprintf("kernel writes alone, %d peers: %.0f ms", E, ms(base)), ratio(ms(joinDur), ms(base)))
	row(fmt.Sprintf("new host%d: CreateNetwork call", H), fmt.Sprintf("%.0f ms", ms(createDur)), "", ratio(0, 0))
	row(fmt.Sprintf("new host%d memory, RSS / PSS", H), fmt.Sprintf("%.1f / %.1f MiB", newLoaded.rss, newLoaded.pss),
		fmt.Sprintf("idle %.1f / %.1f MiB", newIdle.rss, newIdle.pss), ratio(newLoaded.rss, newIdle.rss))
	fmt.Fprintf(sec, "\nKernel changes the restarted plugin reported: `%s`.\n", changes)

	tag := fmt.Sprintf(" (%d endpoints)", E)
	rep.check(fmt.Sprintf("plugin memory (max RSS over hosts, quiet %.0f s)", memorySettle.Seconds())+tag, fmt.Sprintf("%.1f MiB", maxSettled.rss), "≤ 30 MiB", maxSettled.rss <= 30)
	rep.info("plugin memory (max RSS over hosts, 1 s after the last peer)"+tag, fmt.Sprintf("%.1f MiB", maxLoaded.rss))
	rep.check("reconcile after restart"+tag, fmt.Sprintf("%.0f ms", ms(reconcile)), "≤ 0.5 s", reconcile <= 500*time.Millisecond)
	rep.check("packets lost through the restart", fmt.Sprintf("%d of %d", sent-recv, sent), "0", sent-recv == 0 && sent > 0)
	rep.info("new host: CreateNetwork until all peers programmed"+tag, fmt.Sprintf("%.0f ms (%.1f × kernel writes alone)", ms(joinDur), ratio(ms(joinDur), ms(base))))
}
