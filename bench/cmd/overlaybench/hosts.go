package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"consul-overlay/bench/harness"
	"consul-overlay/internal/testenv"
)

// hostsResult is what one size of the hosts benchmark measured.
type hostsResult struct {
	hosts, perHost, networks, samples int

	startPlugins, createNets time.Duration
	burstAttach, burstSettle time.Duration
	burstLoad, steadyLoad    meterDiff
	convLoad, joinLoad       meterDiff
	openMin, openMax         int
	openMean                 float64

	conv, convEach []float64 // ms: per sample the slowest host; per sample and host

	pluginCPUBurst, pluginCPUSteady, pluginCPUPerChange time.Duration // per host (mean)
	consulCPUBurst, consulCPUSteady, consulCPUPerChange time.Duration
	rssIdle, rssMean, rssMax, consulRSS                 float64

	joinPeers int
	join      time.Duration
	joinCPU   time.Duration
	lostEvts  int // peers confirmed by dump because their event never came

	attachRetries int // attaches of the burst tried again after a store timeout

	// Over the whole size: writes of hosts-lost/ records (a live host saw
	// a host record without its session: a host's liveness lapsed), and
	// sessions created.
	lostWrites, sessions int64

	floor  floorResult            // hostsfloor.go: shape key
	shapes map[string]floorResult // the other shapes
}

// benchHosts simulates many hosts (a namespace and a plugin process each,
// all on one Consul server) at several sizes and measures how the cost
// of the design grows with the number of hosts.
func benchHosts(t *runner, cfg *config, rep *report) {
	var results []hostsResult
	for _, h := range cfg.hostsSizes {
		var res hostsResult
		name := fmt.Sprintf("hosts-%d", h)
		t.Logf("%s: start at %s", name, time.Now().Format(time.TimeOnly))
		_, err := runSection(t.Context(), name, t.logw, func(st *runner) { res = hostsOnce(st, cfg, h) })
		if err != nil {
			hostsReport(cfg, rep, results) // what the smaller sizes measured
			t.Fatal(err)
		}
		results = append(results, res)
		t.Logf("%s: done at %s; convergence p50 %.1f ms p99 %.1f ms", name, time.Now().Format(time.TimeOnly), summarize(res.conv).p50, summarize(res.conv).p99)
	}
	hostsReport(cfg, rep, results)
}

// hostCPU reads every plugin's CPU time (and Consul's, last).
func hostCPU(pids []int) []time.Duration {
	out := make([]time.Duration, len(pids))
	for i, p := range pids {
		out[i], _ = cpuTime(p)
	}
	return out
}

// cpuDiff returns the mean of b-a over the first n entries and b-a of the
// last one (Consul).
func cpuDiff(a, b []time.Duration) (meanPlugin, consul time.Duration) {
	n := len(a) - 1
	var sum time.Duration
	for i := range n {
		sum += b[i] - a[i]
	}
	return sum / time.Duration(n), b[n] - a[n]
}

func hostsOnce(t *runner, cfg *config, H int) hostsResult {
	ctx := t.Context()
	E, N := cfg.hostsPerHost, cfg.hostsNetworks
	r := hostsResult{hosts: H, perHost: E, networks: N, samples: cfg.hostsSamples}
	bin := cfg.bin
	if bin == "" {
		bin = harness.Build(t)
	}
	hosts := testenv.NewUnderlay(t, H+1, testenv.UnderlayOptions{Forwarding: true}) // as dockerd leaves a host
	// Every blocking query holds a connection, and all of them come from
	// the meter: lift the agent's per-client limit (200).
	agent := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()),
		testenv.WithArgs("-hcl", "limits { http_max_conns_per_client = 16384 }"))
	meter := startConsulMeter(t, hosts[0], agent)
	mStart := meter.snap()
	consulPid := pidOfConsul(agent.NodeName)
	if consulPid == 0 {
		t.Fatalf("no process found for the consul agent %s", agent.NodeName)
	}
	prefix := "co-hosts-" + harness.RandomID()[:8] + "/"
	plugins := make([]*harness.Plugin, H+1)
	// All plugins are stopped at once when the size ends (the harness
	// stops each again, a no-op, one after the other).
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, p := range plugins {
			if p != nil {
				wg.Add(1)
				go func() { defer wg.Done(); p.Stop(syscall.SIGTERM) }()
			}
		}
		wg.Wait()
	})
	start := time.Now()
	for i := range H {
		if ctx.Err() != nil {
			t.Fatal(ctx.Err())
		}
		plugins[i] = harness.StartPlugin(t, bin, fmt.Sprintf("host%d", i), hosts[i], harness.PluginOptions{
			ConsulAddr: meter.Addr, Prefix: prefix, LogLevel: "info", Env: hostsPluginEnv(cfg.pluginEnv),
		})
	}
	r.startPlugins = time.Since(start)
	pids := make([]int, H+1)
	for i := range H {
		pids[i] = plugins[i].Pid()
	}
	pids[H] = consulPid
	time.Sleep(time.Second)
	for _, p := range pids[:H] {
		r.rssIdle += vmRSS(p) / float64(H)
	}

	// One network with E endpoints per host, N more networks, each on
	// every host.
	spec := harness.NetSpec{Subnet4: "10.72.0.0/21", Options: map[string]string{"name": "hosts"}}
	nets := make([]*harness.Network, H)
	errs := make([]error, H)
	par := func(fn func(i int) error) error {
		var wg sync.WaitGroup
		for i := range H {
			wg.Add(1)
			go func() { defer wg.Done(); errs[i] = fn(i) }()
		}
		wg.Wait()
		var all []error
		for i, err := range errs {
			if err != nil {
				all = append(all, fmt.Errorf("host%d: %w", i, err))
			}
		}
		return errors.Join(all...)
	}
	// A few hosts at a time: fifty real hosts would each have their own
	// CPUs for the firewall commands a network costs; here they share two
	// with everything else, and the plugin times a slow command out.
	t.Logf("%s %d hosts: create %d networks on each", time.Now().Format(time.TimeOnly), H, N+1)
	start = time.Now()
	sem := make(chan struct{}, 4)
	if err := par(func(i int) error {
		select {
		case sem <- struct{}{}:
			defer func() { <-sem }()
		case <-ctx.Done():
			return ctx.Err()
		}
		var err error
		if nets[i], err = createRetrying(ctx, plugins[i], spec); err != nil {
			return err
		}
		for j := range N {
			s := harness.NetSpec{Subnet4: fmt.Sprintf("10.73.%d.0/24", j), Options: map[string]string{"name": fmt.Sprintf("hosts-%d", j)}}
			if _, err := createRetrying(ctx, plugins[i], s); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("create networks: %v", err)
	}
	r.createNets = time.Since(start)

	// The burst: every host attaches E endpoints at once.
	t.Logf("%s %d hosts: burst of %d attaches", time.Now().Format(time.TimeOnly), H, H*E)
	first := make([]*harness.Endpoint, H)
	m0, c0 := meter.snap(), hostCPU(pids)
	start = time.Now()
	// At most 8 attaches at once over all hosts: with every host
	// attaching at once, from 25 hosts on this machine Consul answered
	// the plugins' IPAM requests too late (their 5 s store timeout).
	// An attach that fails so (or finds the store unavailable) is counted
	// and tried again.
	asem := make(chan struct{}, 8)
	var retriedMu sync.Mutex
	if err := par(func(i int) error {
		for k := range E {
			var e *harness.Endpoint
			for try := 0; ; try++ {
				select {
				case asem <- struct{}{}:
				case <-ctx.Done():
					return ctx.Err()
				}
				var err error
				e, err = nets[i].Attach()
				<-asem
				if err == nil {
					break
				}
				if try == 2 || !strings.Contains(err.Error(), "store did not answer in time") && !strings.Contains(err.Error(), "store unavailable") {
					return err
				}
				retriedMu.Lock()
				r.attachRetries++
				retriedMu.Unlock()
			}
			if k == 0 {
				first[i] = e
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("attach: %v", err)
	}
	r.burstAttach = time.Since(start)
	vni := endpointVNI(t, plugins[0], nets[0].ID, first[0].ID)
	var err error
	idx := make([]int, H+1)
	for i := range H {
		if idx[i], err = vxIndex(ctx, hosts[i].NS, vni); err != nil {
			t.Fatalf("host%d: %v", i, err)
		}
		if _, err := waitCount(ctx, hosts[i].NS.Handle(), idx[i], (H-1)*E, 10*time.Millisecond, 180*time.Second); err != nil {
			t.Fatalf("host%d never programmed its peers: %v", i, err)
		}
	}
	r.burstSettle = time.Since(start)
	m1, c1 := meter.snap(), hostCPU(pids)
	r.burstLoad = diffSnaps(m0, m1)
	r.pluginCPUBurst, r.consulCPUBurst = cpuDiff(c0, c1)

	// Steady state: nothing happens; what does Consul see?
	t.Logf("%s %d hosts: steady state", time.Now().Format(time.TimeOnly), H)
	sleepCtx(ctx, 2*time.Second)
	m0, c0 = meter.snap(), hostCPU(pids)
	sleepCtx(ctx, cfg.hostsSteady)
	open := meter.openBlocking()
	m1, c1 = meter.snap(), hostCPU(pids)
	r.steadyLoad = diffSnaps(m0, m1)
	r.pluginCPUSteady, r.consulCPUSteady = cpuDiff(c0, c1)
	r.openMin = math.MaxInt
	for _, h := range hosts[:H] {
		n := open[h.Addr.String()]
		r.openMin, r.openMax = min(r.openMin, n), max(r.openMax, n)
		r.openMean += float64(n) / float64(H)
	}

	// Convergence: one new endpoint at a time, on each host in turn,
	// until every other host has programmed it.
	evs := make([]*peerEvents, H)
	for i := range H {
		evs[i] = subscribePeers(t, hosts[i].NS, idx[i])
	}
	t.Logf("%s %d hosts: convergence", time.Now().Format(time.TimeOnly), H)
	m0, c0 = meter.snap(), hostCPU(pids)
	for s := range cfg.hostsSamples {
		k := s % H
		e := nets[k].NewEndpoint()
		if err := e.RequestAddress(); err != nil {
			t.Fatalf("sample %d: %v", s, err)
		}
		t0 := time.Now()
		if err := e.Create(); err != nil {
			t.Fatalf("sample %d: %v", s, err)
		}
		if err := e.Join(hosts[k].NS.Path); err != nil {
			t.Fatalf("sample %d: %v", s, err)
		}
		mac, err := net.ParseMAC(e.MAC)
		if err != nil {
			t.Fatalf("sample %d: endpoint MAC %q: %v", s, e.MAC, err)
		}
		ip := e.Addr4.Addr()
		each, lost, err := waitAllHosts(ctx, evs, k, ip, mac, t0)
		if err != nil {
			t.Fatalf("sample %d (endpoint %s on host%d): %v", s, ip, k, err)
		}
		r.lostEvts += lost
		r.convEach = append(r.convEach, each...)
		r.conv = append(r.conv, slices.Max(each))
		sleepCtx(ctx, 20*time.Millisecond)
	}
	m1, c1 = meter.snap(), hostCPU(pids)
	r.convLoad = diffSnaps(m0, m1)
	pc, cc := cpuDiff(c0, c1)
	r.pluginCPUPerChange = pc / time.Duration(cfg.hostsSamples)
	r.consulCPUPerChange = cc / time.Duration(cfg.hostsSamples)
	for _, p := range pids[:H] {
		rss := vmRSS(p)
		r.rssMean += rss / float64(H)
		r.rssMax = max(r.rssMax, rss)
	}
	r.consulRSS = vmRSS(consulPid)

	// A new host joins the network.
	t.Logf("%s %d hosts: a new host joins", time.Now().Format(time.TimeOnly), H)
	plugins[H] = harness.StartPlugin(t, bin, fmt.Sprintf("host%d", H), hosts[H], harness.PluginOptions{
		ConsulAddr: meter.Addr, Prefix: prefix, LogLevel: "info", Env: hostsPluginEnv(cfg.pluginEnv),
	})
	sleepCtx(ctx, 500*time.Millisecond)
	r.joinPeers = H*E + cfg.hostsSamples
	m0 = meter.snap()
	cj0, _ := cpuTime(plugins[H].Pid())
	start = time.Now()
	if _, err := createRetrying(ctx, plugins[H], spec); err != nil {
		t.Fatalf("host%d: %v", H, err)
	}
	if idx[H], err = vxIndex(ctx, hosts[H].NS, vni); err != nil {
		t.Fatal(err)
	}
	joined, err := waitCount(ctx, hosts[H].NS.Handle(), idx[H], r.joinPeers, 5*time.Millisecond, 120*time.Second)
	if err != nil {
		t.Fatalf("the new host never programmed its peers: %v", err)
	}
	r.join = joined.Sub(start)
	end := meter.snap()
	r.joinLoad = diffSnaps(m0, end)
	all := diffSnaps(mStart, end)
	r.lostWrites = all.counts["PUT /v1/kv/…/hosts-lost"]
	r.sessions = all.counts["PUT /v1/session/create"]
	cj1, _ := cpuTime(plugins[H].Pid())
	r.joinCPU = cj1 - cj0

	// The floor: the same change through the least a Consul watch can do.
	t.Logf("%s %d hosts: floor", time.Now().Format(time.TimeOnly), H)
	r.shapes = map[string]floorResult{}
	for n, shape := range floorShapes {
		fl := hostsFloor(t, cfg, hosts, H, idx, evs, meter, consulPid, shape, n)
		if fl.err != "" {
			t.Logf("%d hosts: floor %s: %s", H, shape, fl.err)
		}
		if shape == shapeKey {
			r.floor = fl
		} else {
			r.shapes[shape] = fl
		}
	}
	return r
}

// createRetrying creates a network, retrying while the plugin answers
// that it is still starting (as the engine would find it ready later).
func createRetrying(ctx context.Context, p *harness.Plugin, spec harness.NetSpec) (*harness.Network, error) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n, err := p.CreateNetwork(spec)
		if err == nil || !strings.Contains(err.Error(), "try again") || time.Now().After(deadline) || ctx.Err() != nil {
			return n, err
		}
		sleepCtx(ctx, 200*time.Millisecond)
	}
}

// waitAllHosts waits until every host but k has programmed the peer and
// returns each one's delay from t0. Events are read every millisecond;
// after a second a host still without them is also checked by a dump, in
// case its event was lost.
func waitAllHosts(ctx context.Context, evs []*peerEvents, k int, ip netip.Addr, mac net.HardwareAddr, t0 time.Time) ([]float64, int, error) {
	each := make([]float64, 0, len(evs)-1)
	done := make([]bool, len(evs))
	done[k] = true
	left, lost := len(evs)-1, 0
	deadline := t0.Add(20 * time.Second)
	lastDump := t0
	for left > 0 {
		now := time.Now()
		dump := now.Sub(t0) > time.Second && now.Sub(lastDump) > 100*time.Millisecond
		if dump {
			lastDump = now
		}
		for i, pe := range evs {
			if done[i] {
				continue
			}
			at, ok := pe.programmed(ip, mac)
			if !ok && dump && pe.confirm(ip, mac) {
				at, ok = pe.programmed(ip, mac)
				lost++
			}
			if ok {
				done[i] = true
				left--
				each = append(each, ms(at.Sub(t0)))
			}
		}
		if left == 0 {
			break
		}
		if now.After(deadline) {
			var missing []string
			for i, d := range done {
				if !d {
					missing = append(missing, "host"+strconv.Itoa(i))
				}
			}
			return nil, lost, fmt.Errorf("not programmed after 20s on %s", strings.Join(missing, ", "))
		}
		select {
		case <-ctx.Done():
			return nil, lost, ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	return each, lost, nil
}

// growth describes how a figure grows from the first size to the last:
// the exponent k of value ∝ hosts^k.
func growth(first, last float64, h0, h1 int) string {
	if first <= 0 || last <= 0 || math.IsNaN(first) || math.IsNaN(last) || h0 == h1 {
		return "n/a"
	}
	k := math.Log(last/first) / math.Log(float64(h1)/float64(h0))
	var what string
	switch {
	case k < 0.3:
		what = "≈ constant"
	case k < 0.75:
		what = "sub-linear"
	case k < 1.3:
		what = "≈ linear"
	case k < 1.75:
		what = "super-linear"
	case k < 2.3:
		what = "≈ quadratic"
	default:
		what = "worse than quadratic"
	}
	return fmt.Sprintf("×%.1f, k=%.2f (%s)", last/first, k, what)
}

func hostsReport(cfg *config, rep *report, rs []hostsResult) {
	if len(rs) == 0 {
		return
	}
	var sizes []string
	for _, r := range rs {
		sizes = append(sizes, strconv.Itoa(r.hosts))
	}
	sec := rep.section(fmt.Sprintf("Scale with hosts: %s simulated hosts on one Consul server", strings.Join(sizes, " / ")))
	r0, rl := rs[0], rs[len(rs)-1]
	fmt.Fprintf(sec, "Each host is a network namespace on one underlay with its own plugin process (log level info); one Consul "+
		"dev server in host0's namespace, reached by every plugin through a counting reverse proxy (the requests below are "+
		"exact). Per size: one network with %d endpoints per host (attached at the protocol level, interface left in the host "+
		"namespace, as in the Scale section) plus %d more networks, each created on every host. Convergence: %d new endpoints, "+
		"one at a time on each host in turn, from the start of CreateEndpoint until every other host has the neighbour and "+
		"FDB entries (netlink events in each host's namespace, a dump if an event was lost). Growth: the exponent k of "+
		"figure ∝ hosts^k from %d to %d hosts (1 is linear, 2 quadratic). The plugins' registrar compares its services "+
		"with the agent's every %s instead of 30 s (ANTI_ENTROPY_INTERVAL, unless BENCH_PLUGIN_ENV sets it): the hosts share "+
		"one agent, so each pass lists every host's services, which a host's own agent does not hold, and 50 such passes "+
		"falling in a convergence window made its CPU per change vary by half. The floor: after the new host, the same "+
		"number of changes through the least any design that learns of a change from Consul can do: one key, overwritten "+
		"from the sample's host with the new peer, and on every host a watcher process (this program) holding one blocking "+
		"GET of that key through the same proxy, which writes the peer's neighbour and FDB entries on the host's VXLAN "+
		"device; measured by the same events, with the plugins still running. One shared key would lose changes made at "+
		"once: it is a floor, not a design. Two request shapes a design could use are measured the same way (each "+
		"host's entry padded to a peer record's size): a key listing whose names carry each record's version (the writer "+
		"renames its entry in the write's transaction) followed by a GET of the new name (the plugin's two requests since its records are stamped), and a list of one small stamp per "+
		"host (written in the record's transaction) followed by a GET of the record whose stamp moved; and the plugin's "+
		"shape before its records were stamped (a key listing, a check transaction of every record, a GET of the one that "+
		"changed; still the shape for records an older release writes), to tell the requests' share of the plugin's figure "+
		"from the rest. Then Consul's CPU for one request of each kind, %d of each in turn with nothing "+
		"changing (its CPU time counts in 10 ms ticks).\n\n",
		r0.perHost, r0.networks, r0.samples, r0.hosts, rl.hosts, hostsAntiEntropy, costRounds)
	fmt.Fprintf(sec, "| Figure | %s | Growth %d→%d |\n|---|%s---|\n", strings.Join(prefixAll(sizes, "", " hosts"), " | "), r0.hosts, rl.hosts, strings.Repeat("---:|", len(rs)))
	row := func(name string, val func(r hostsResult) float64, format func(float64) string) {
		var cells []string
		for _, r := range rs {
			cells = append(cells, format(val(r)))
		}
		fmt.Fprintf(sec, "| %s | %s | %s |\n", name, strings.Join(cells, " | "), growth(val(r0), val(rl), r0.hosts, rl.hosts))
	}
	num := func(x float64) string { return f(x) }
	msf := func(x float64) string { return f(x) + " ms" }
	sf := func(x float64) string { return fmt.Sprintf("%.1f s", x) }
	mib := func(x float64) string { return fmt.Sprintf("%.1f MiB", x) }
	kib := func(x float64) string { return fmt.Sprintf("%.0f KiB", x) }
	row("**convergence p50: new endpoint on all other hosts**", func(r hostsResult) float64 { return summarize(r.conv).p50 }, msf)
	row("**convergence p99: new endpoint on all other hosts**", func(r hostsResult) float64 { return summarize(r.conv).p99 }, msf)
	row("convergence p50 / p99 of each single host", func(r hostsResult) float64 { return summarize(r.convEach).p50 }, msf)
	fmt.Fprintf(sec, "| … p99 of each single host | %s | |\n", strings.Join(mapR(rs, func(r hostsResult) string { return msf(summarize(r.convEach).p99) }), " | "))
	nanUnless := func(ok bool, x float64) float64 {
		if !ok {
			return math.NaN()
		}
		return x
	}
	row("floor, the least a Consul watch costs here: convergence p50 (one key overwritten with the peer, one watcher process a host holding one blocking GET of it and making the plugin's two kernel writes)", func(r hostsResult) float64 { return r.floor.p50() }, msf)
	row("**floor: convergence p99**", func(r hostsResult) float64 { return r.floor.p99() }, msf)
	row("convergence p50 ÷ floor p50", func(r hostsResult) float64 { return ratio(summarize(r.conv).p50, r.floor.p50()) }, fr)
	row("convergence p99 ÷ floor p99", func(r hostsResult) float64 { return ratio(summarize(r.conv).p99, r.floor.p99()) }, fr)
	row("floor per change: watcher CPU, mean per host", func(r hostsResult) float64 { return nanUnless(r.floor.done(), r.floor.cpuPerChange) }, msf)
	row("floor per change: Consul CPU", func(r hostsResult) float64 { return nanUnless(r.floor.done(), r.floor.consulCPUPerChange) }, msf)
	row("floor per change: Consul requests", func(r hostsResult) float64 { return nanUnless(r.floor.done(), r.floor.requestsPerChange) }, num)
	for _, sh := range []struct{ shape, what string }{
		{shapeNames, "a blocking key listing whose names carry each record's version, then a GET of the new name (the plugin's requests, its records stamped)"},
		{shapeStamps, "a blocking list of one small stamp per host, then a GET of the record whose stamp moved"},
		{shapeLean, "the plugin's before stamped records: a blocking key listing, a check transaction of every record, a GET of the one that changed"},
	} {
		get := func(r hostsResult) floorResult { return r.shapes[sh.shape] }
		row("request shape, "+sh.what+" (a watcher process a host, the same kernel writes): convergence p50", func(r hostsResult) float64 { return get(r).p50() }, msf)
		row("… its convergence p99", func(r hostsResult) float64 { return get(r).p99() }, msf)
		row("… per change: watcher CPU, mean per host", func(r hostsResult) float64 { return nanUnless(get(r).done(), get(r).cpuPerChange) }, msf)
		row("… per change: Consul CPU", func(r hostsResult) float64 { return nanUnless(get(r).done(), get(r).consulCPUPerChange) }, msf)
		row("… per change: Consul requests", func(r hostsResult) float64 { return nanUnless(get(r).done(), get(r).requestsPerChange) }, num)
	}
	for _, k := range costKinds {
		row("Consul CPU for one request alone: "+k, func(r hostsResult) float64 {
			if v, ok := r.floor.cost[k]; ok {
				return v
			}
			return math.NaN()
		}, func(x float64) string { return f(x) + " µs" })
	}
	row("per change: Consul requests", func(r hostsResult) float64 { return float64(r.convLoad.total) / float64(r.samples) }, num)
	row("per change: bytes Consul answered", func(r hostsResult) float64 { return float64(r.convLoad.bytes) / 1024 / float64(r.samples) }, kib)
	row("… of which the agent API's (the registrar's list of the agent's services: one agent for all hosts here, each host's own on real hosts)", func(r hostsResult) float64 {
		return float64(r.convLoad.agentBytes) / 1024 / float64(r.samples)
	}, kib)
	row("per change: plugin CPU, mean per host", func(r hostsResult) float64 { return ms(r.pluginCPUPerChange) }, msf)
	row("per change: plugin CPU, all hosts", func(r hostsResult) float64 { return ms(r.pluginCPUPerChange) * float64(r.hosts) }, msf)
	row("per change: Consul CPU", func(r hostsResult) float64 { return ms(r.consulCPUPerChange) }, msf)
	row("**steady state: Consul requests/s**", func(r hostsResult) float64 { return r.steadyLoad.rate() }, num)
	pct := func(x float64) string { return fmt.Sprintf("%.0f %%", x) }
	row("steady state: of which blocking queries (all were opened together after the burst, so few time out in the window)", func(r hostsResult) float64 {
		return 100 * float64(r.steadyLoad.blocking) / float64(max(1, r.steadyLoad.total))
	}, pct)
	row("steady state: of which to the agent API (a host's own agent answers them: liveness check passes, the registrar's list), per s", func(r hostsResult) float64 {
		return float64(r.steadyLoad.agent) / r.steadyLoad.secs
	}, num)
	row("**steady state: requests that reach the servers, per s**", func(r hostsResult) float64 {
		return float64(r.steadyLoad.total-r.steadyLoad.agent) / r.steadyLoad.secs
	}, num)
	row("**steady state: of those, blocking queries**", func(r hostsResult) float64 { return 100 * r.steadyLoad.serverShare() }, pct)
	row("steady state: the blocking queries' own rate (open ÷ 30 s wait), all hosts, per s", func(r hostsResult) float64 { return r.openMean * float64(r.hosts) / 30 }, num)
	row("steady state: open blocking queries per host (mean)", func(r hostsResult) float64 { return r.openMean }, num)
	fmt.Fprintf(sec, "| … min / max per host | %s | |\n", strings.Join(mapR(rs, func(r hostsResult) string { return fmt.Sprintf("%d / %d", r.openMin, r.openMax) }), " | "))
	row("steady state: plugin CPU per host", func(r hostsResult) float64 { return 100 * r.pluginCPUSteady.Seconds() / r.steadyLoad.secs },
		func(x float64) string { return fmt.Sprintf("%.2f %%", x) })
	row("steady state: Consul CPU", func(r hostsResult) float64 { return 100 * r.consulCPUSteady.Seconds() / r.steadyLoad.secs },
		func(x float64) string { return fmt.Sprintf("%.1f %%", x) })
	row("burst: attach rate, all hosts in parallel, 8 at a time (attaches/s)", func(r hostsResult) float64 { return float64(r.hosts*r.perHost) / r.burstAttach.Seconds() }, num)
	row("burst: attaches tried again after a store timeout", func(r hostsResult) float64 { return float64(r.attachRetries) }, num)
	row("burst: first attach until every host has every peer", func(r hostsResult) float64 { return r.burstSettle.Seconds() }, sf)
	row("**burst: Consul requests/s**", func(r hostsResult) float64 { return r.burstLoad.rate() }, num)
	row("burst: Consul requests per attach", func(r hostsResult) float64 { return float64(r.burstLoad.total) / float64(r.hosts*r.perHost) }, num)
	row("burst: bytes Consul answered per attach", func(r hostsResult) float64 { return float64(r.burstLoad.bytes) / 1024 / float64(r.hosts*r.perHost) }, kib)
	row("burst: plugin CPU per host", func(r hostsResult) float64 { return r.pluginCPUBurst.Seconds() }, sf)
	row("burst: Consul CPU", func(r hostsResult) float64 { return r.consulCPUBurst.Seconds() }, sf)
	row("host records seen without their session (hosts-lost/ writes, whole run; 0: no host's liveness lapsed)", func(r hostsResult) float64 { return float64(r.lostWrites) }, num)
	row("sessions created, whole run (2 per plugin start: the permission probe's and the host record's)", func(r hostsResult) float64 { return float64(r.sessions) }, num)
	row("plugin RSS idle (mean)", func(r hostsResult) float64 { return r.rssIdle }, mib)
	row("**plugin RSS loaded (max over hosts)**", func(r hostsResult) float64 { return r.rssMax }, mib)
	row("plugin RSS loaded (mean)", func(r hostsResult) float64 { return r.rssMean }, mib)
	row("Consul RSS", func(r hostsResult) float64 { return r.consulRSS }, mib)
	row("**new host: CreateNetwork until every peer programmed**", func(r hostsResult) float64 { return ms(r.join) }, msf)
	row("new host: peers programmed", func(r hostsResult) float64 { return float64(r.joinPeers) }, num)
	row("new host: its plugin's CPU", func(r hostsResult) float64 { return ms(r.joinCPU) }, msf)
	row("new host: Consul requests until then", func(r hostsResult) float64 { return float64(r.joinLoad.total) }, num)
	row("plugins started one after the other", func(r hostsResult) float64 { return r.startPlugins.Seconds() }, sf)
	row(fmt.Sprintf("create %d networks on every host, hosts in parallel", r0.networks+1), func(r hostsResult) float64 { return r.createNets.Seconds() }, sf)
	fmt.Fprintln(sec)
	for _, r := range rs {
		fmt.Fprintf(sec, "- %d hosts: steady state (%.0f s) requests: %s. Per change: %s. Burst: %s.",
			r.hosts, r.steadyLoad.secs, r.steadyLoad.top(6), r.convLoad.top(4), r.burstLoad.top(6))
		if r.floor.err != "" {
			fmt.Fprintf(sec, " Floor not measured: %s.", r.floor.err)
		}
		for _, sh := range floorShapes[1:] {
			if e := r.shapes[sh].err; e != "" {
				fmt.Fprintf(sec, " Shape %s not measured: %s.", sh, e)
			}
		}
		if r.lostEvts > 0 {
			fmt.Fprintf(sec, " Peers seen by dump, their event lost: %d.", r.lostEvts)
		}
		fmt.Fprintln(sec)
	}

	tag := fmt.Sprintf(" (%d hosts)", rl.hosts)
	cp99 := summarize(rl.conv).p99
	rep.check("convergence p99, new endpoint on all other hosts"+tag, f(cp99)+" ms", "≤ 100 ms", cp99 <= 100)
	// The agent API's requests never reach the servers on a real host
	// (each host's own agent answers them); here every host shares one
	// agent, so they are counted apart.
	share := rl.steadyLoad.serverShare()
	rep.check("steady-state Consul requests to the servers that are blocking queries"+tag,
		fmt.Sprintf("%.0f %% of %.1f/s (%.1f/s more to the agent API)", 100*share,
			float64(rl.steadyLoad.total-rl.steadyLoad.agent)/rl.steadyLoad.secs, float64(rl.steadyLoad.agent)/rl.steadyLoad.secs),
		"≈ all (≥ 95 %)", share >= 0.95)
	rep.check("plugin RSS per host (max)"+tag, fmt.Sprintf("%.1f MiB", rl.rssMax), "≤ 30 MiB", rl.rssMax <= 30)
	rep.info("convergence floor p50 / p99 (one key, one blocking GET a host, the same kernel writes)"+tag, fmt.Sprintf("%s / %s ms", f(rl.floor.p50()), f(rl.floor.p99())))
	rep.info("new host: CreateNetwork until all peers programmed"+tag, fmt.Sprintf("%.0f ms (%d peers)", ms(rl.join), rl.joinPeers))
}

func prefixAll(xs []string, pre, post string) []string {
	out := make([]string, len(xs))
	for i, x := range xs {
		out[i] = pre + x + post
	}
	return out
}

func mapR(rs []hostsResult, fn func(hostsResult) string) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = fn(r)
	}
	return out
}

// hostsAntiEntropy is the registrar's pass interval the hosts bench gives
// its plugins (see the section's description).
const hostsAntiEntropy = "10m"

// hostsPluginEnv is env with ANTI_ENTROPY_INTERVAL=hostsAntiEntropy
// unless env sets it.
func hostsPluginEnv(env []string) []string {
	for _, kv := range env {
		if strings.HasPrefix(kv, "ANTI_ENTROPY_INTERVAL=") {
			return env
		}
	}
	return append(slices.Clone(env), "ANTI_ENTROPY_INTERVAL="+hostsAntiEntropy)
}
