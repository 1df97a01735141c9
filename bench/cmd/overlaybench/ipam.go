package main

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/bench/harness"
	"consul-overlay/internal/testenv"
)

var ipamHostCounts = []int{1, 4, 16}

// benchIPAM runs ipam's own BenchmarkAllocate (simulated hosts, each with
// its own Consul client, racing for addresses of one pool) and, as its
// baseline, the raw rate of Consul compare-and-set writes by the same
// number of clients on keys of their own (no contention): the ceiling an
// allocation, one CAS transaction, can reach on this machine.
func benchIPAM(t *runner, cfg *config, rep *report) {
	sec := rep.section("IPAM allocations")
	pattern := "BenchmarkAllocate/hosts=("
	for i, n := range ipamHostCounts {
		if i > 0 {
			pattern += "|"
		}
		pattern += strconv.Itoa(n)
	}
	pattern += ")$"
	cmd := exec.CommandContext(t.Context(), "go", "test", "-run", "^$", "-bench", pattern, "-benchtime", cfg.ipamBenchtime, "-count", "1", "./ipam/")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go test -bench ./ipam/: %v\n%s", err, out)
	}
	allocs := parseAllocBench(string(out))
	if len(allocs) == 0 {
		t.Fatalf("no BenchmarkAllocate results in:\n%s", out)
	}

	agent := testenv.StartConsul(t)
	raw := map[int]float64{}
	for _, n := range ipamHostCounts {
		r, err := casRate(agent, n, time.Duration(cfg.ipamBaseSecs*float64(time.Second)))
		if err != nil {
			t.Fatal(err)
		}
		raw[n] = r
	}
	fmt.Fprintf(sec, "`go test -run '^$' -bench '%s' -benchtime %s ./ipam/` (Consul dev agent on loopback, each simulated host "+
		"its own client). Baseline: Consul CAS writes/s by the same number of clients, each on its own keys, %g s each, "+
		"against a dev agent started the same way.\n\n", pattern, cfg.ipamBenchtime, cfg.ipamBaseSecs)
	fmt.Fprintln(sec, "| Hosts | allocations/s | txn/alloc | lost races/alloc | baseline CAS writes/s | ratio |")
	fmt.Fprintln(sec, "|---:|---:|---:|---:|---:|---:|")
	for _, n := range ipamHostCounts {
		a, ok := allocs[n]
		if !ok {
			fmt.Fprintf(sec, "| %d | missing | | | %s | |\n", n, f(raw[n]))
			continue
		}
		fmt.Fprintf(sec, "| %d | %s | %s | %s | %s | %s |\n", n, f(a["allocs/s"]), f(a["txn/op"]), f(a["lost/op"]), f(raw[n]), fr(ratio(a["allocs/s"], raw[n])))
	}
	if a, ok := allocs[16]; ok {
		rep.check("IPAM allocations/s, 16 hosts racing on one pool", f(a["allocs/s"]), "≥ 500", a["allocs/s"] >= 500)
	}
}

var benchLine = regexp.MustCompile(`^BenchmarkAllocate/hosts=(\d+)(?:-\d+)?\s+\d+\s+(.*)$`)

// parseAllocBench reads the metrics of each hosts=N line.
func parseAllocBench(out string) map[int]map[string]float64 {
	res := map[int]map[string]float64{}
	for _, line := range strings.Split(out, "\n") {
		m := benchLine.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		n, _ := strconv.Atoi(m[1])
		metrics := map[string]float64{}
		fs := strings.Fields(m[2])
		for i := 0; i+1 < len(fs); i += 2 {
			if v, err := strconv.ParseFloat(fs[i], 64); err == nil {
				metrics[fs[i+1]] = v
			}
		}
		res[n] = metrics
	}
	return res
}

// casRate runs n clients, each with its own connection, doing CAS creates
// of fresh keys for d, and returns writes per second.
func casRate(agent *testenv.ConsulAgent, n int, d time.Duration) (float64, error) {
	prefix := "cas-bench/" + harness.RandomID()[:8] + "/"
	var count atomic.Int64
	errs := make([]error, n)
	var wg sync.WaitGroup
	stop := time.Now().Add(d)
	start := time.Now()
	for i := range n {
		cl, err := api.NewClient(&api.Config{Address: agent.Addr})
		if err != nil {
			return 0, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			val := []byte(strings.Repeat("a", 120))
			for k := 0; time.Now().Before(stop); k++ {
				ok, _, err := cl.KV().CAS(&api.KVPair{Key: fmt.Sprintf("%s%d/%d", prefix, i, k), Value: val}, nil)
				if err != nil {
					errs[i] = err
					return
				}
				if ok {
					count.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	for _, err := range errs {
		if err != nil {
			return 0, fmt.Errorf("consul cas: %w", err)
		}
	}
	return float64(count.Load()) / el.Seconds(), nil
}
