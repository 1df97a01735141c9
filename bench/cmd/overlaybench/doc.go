// Command overlaybench measures consul-overlay side by side with its
// baselines and records the figures in BENCHMARKS.md: data plane
// (throughput, round trip, MTU) against the underlay and a hand-built
// kernel VXLAN, attach latency, convergence, IPAM allocation rate, and
// behaviour at scale (memory, restart, a host joining). Every figure is
// printed with its baseline from the same run and their ratio.
//
// It runs as root on one machine: test hosts are network namespaces on a
// veth underlay, each running the plugin binary, with a Consul dev agent,
// as in the plugin's protocol tests. `make bench` runs it; BENCH_QUICK=1
// runs fewer iterations at a smaller scale. It fails if the overlay does
// not work at all, never on a slow figure. Under CI=true a missing
// prerequisite is a failure; elsewhere the run is skipped with a message.
package main
