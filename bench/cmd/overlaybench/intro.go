package main

// intro is BENCHMARKS.md's introduction, written when the file is created;
// later runs keep whatever stands above the runs marker.
const intro = "# Benchmarks\n" +
	"\n" +
	"`make bench` (as root) measures consul-overlay side by side with its baselines and records every run here, " +
	"the newest first. Each figure comes with a baseline measured in the same run, on the same machine, and their " +
	"ratio, because absolute numbers on a shared machine say little. The program is `bench/cmd/overlaybench`; the " +
	"protocol harness it drives the plugin with is `bench/harness`.\n" +
	"\n" +
	"## What is measured\n" +
	"\n" +
	"Test hosts are network namespaces joined by veths to a bridge in a switch namespace (the underlay), each " +
	"running the plugin binary (`bin/consul-overlay`, as `make build` makes it) with a Consul dev agent in host0's " +
	"namespace, as in `plugin/protocol_test.go`. The benchmark speaks the plugin protocol over each socket and " +
	"does libnetwork's part (moving the interface into a container namespace), as dockerd would.\n" +
	"\n" +
	"1. **Data plane** (`dataplane`, `jumbo`): TCP throughput (iperf3, 4 streams and 1 stream) and round trip " +
	"(ping -i 0.01: average, p50, p99) between containers on two hosts over a consul-overlay network, against the " +
	"underlay itself (the two hosts talking directly) and a hand-built kernel VXLAN between the same hosts " +
	"(bridge, VXLAN device and veth made with iproute2, static FDB and neighbour entries, same MTU). Paths are " +
	"interleaved, the order reversed every other round, and throughput is the median of the rounds. A DF ping at " +
	"the advertised MTU must pass and one byte more must fail. Run with a 1500-byte underlay and a 9000-byte " +
	"(jumbo) one, from which the overlay must derive 8950.\n" +
	"2. **Attach latency** (`attach`): CreateEndpoint + Join at the protocol level, p50 and p99, against the least " +
	"an attach must do (one Consul CAS write and one veth pair on a bridge). `docker`: `docker run --rm` of a " +
	"trivial container on a consul-overlay network against a bridge network on the machine's engine.\n" +
	"3. **Convergence** (`attach`): from CreateEndpoint on host A until host B has the neighbour and FDB entries " +
	"(netlink, polled every millisecond) and until a container on B gets an echo reply from the new one.\n" +
	"4. **IPAM** (`ipam`): ipam's own `BenchmarkAllocate` (1, 4 and 16 simulated hosts racing on one pool) against " +
	"raw Consul CAS writes by as many clients without contention.\n" +
	"5. **Scale** (`scale`): 1,000 endpoints over 4 hosts in one /22 network plus 99 more networks on every host: " +
	"plugin memory (RSS and PSS), a plugin killed and restarted with a ping running through it (time to restore, " +
	"packets lost), a fifth host joining the network (time until it has programmed all 1,000 peers), against the " +
	"kernel writes alone. Endpoints other than the two ping containers keep their interface in the host namespace: " +
	"a namespace each would cost the machine, not the plugin, and changes nothing the plugin does.\n" +
	"6. **Docker's overlay** (`swarm`): consul-overlay against Docker's own overlay driver on the two-engine lab " +
	"(`lab/up.sh`), made a two-node Swarm for the run: the data plane (consul-overlay also with its bridged frames " +
	"untracked, a raw-table NOTRACK on `vxbr+` on both hosts during those rounds only; and, to tell where a gap " +
	"comes from, one hand-built VXLAN three ways between the same hosts: its bridge in the host's namespace, in a " +
	"namespace of its own as Docker's overlay keeps it, and in the host's namespace with Docker's embedded-DNS NAT " +
	"rules in both containers' namespaces), and `docker run --rm` on " +
	"host A on consul-overlay, Docker's overlay and a bridge network, each also `--internal`. It runs on the " +
	"engine-20.10 lab (host A the machine's engine), or with `LAB_ENGINE=29` in the environment on the engine-29 " +
	"lab (`make engine`; both hosts an engine 29.8.1 in a namespace). It uses the lab when it is up and not owned " +
	"by someone else (owner `bench` or `manual`); when the lab is down a full run brings it up and down again.\n" +
	"7. **Network create and delete** (`network`): CreateNetwork and DeleteNetwork at the protocol level, p50 and " +
	"p99, on a host that already has 20 networks, against the kernel's part (a bridge with its address and a VXLAN " +
	"device, created and deleted by netlink).\n" +
	"8. **Scale with hosts** (`hosts`): 10, 25 and 50 simulated hosts (a namespace and a plugin process each; 3 " +
	"and 6 with `BENCH_QUICK=1`; `BENCH_HOSTS_SIZES` and `BENCH_HOSTS_NETWORKS` override) on one Consul server " +
	"behind a counting proxy, one network with 20 endpoints per host plus 5 more networks: convergence of a new " +
	"endpoint on all other hosts (netlink events), Consul requests (steady state, per change, in a burst of " +
	"attaches) and open blocking queries per host, plugin RSS and CPU, a new host's time to program every peer, " +
	"and each figure's growth exponent from the smallest to the largest size.\n" +
	"\n" +
	"## Running it\n" +
	"\n" +
	"    sudo make bench                      # everything, about 25 minutes on 2 cores\n" +
	"    sudo BENCH_QUICK=1 make bench        # fewer rounds, smaller scale, under 3 minutes\n" +
	"    sudo make bench BENCH_ONLY=attach,scale\n" +
	"    sudo LAB_ENGINE=29 make bench BENCH_ONLY=swarm   # Docker's overlay on engine 29 (after make engine)\n" +
	"\n" +
	"It needs iperf3, iproute2, iputils-ping, nsenter, iptables, the Go toolchain and `bin/consul` (`make " +
	"consul`); Docker for `docker` and `swarm`. A missing prerequisite skips the run (or the section), and fails " +
	"it under CI=true. The run fails if the overlay carries no traffic or a section cannot finish, never because a " +
	"figure is slow: the targets are reported, not asserted. `-v` (`go run ./bench/cmd/overlaybench -v`) shows " +
	"progress and the tools' output. For experiments, BENCH_PLUGIN_ENV='KEY=VALUE ...' passes extra settings to " +
	"the scale test's plugins and BENCH_NET_OPTS='k=v,...' extra options to its network; in the `hosts` section, " +
	"BENCH_HOSTS_SAMPLES sets the number of new endpoints of the convergence phase (30; more to profile it, with " +
	"BENCH_PLUGIN_ENV=DEBUG_PPROF=1) and BENCH_METER_TRACE=FILE writes every request the Consul meter forwarded " +
	"(time, client, request, bytes answered, X-Consul-Index, duration).\n"
