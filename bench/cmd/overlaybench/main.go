package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"consul-overlay/internal/testenv"
)

// config holds the run's sizes: full or quick.
type config struct {
	quick bool
	bin   string

	rounds    int     // data plane rounds over all paths
	iperfSecs float64 // per iperf3 run
	pings     int     // per path per round

	attaches    int
	convSamples int

	ipamBenchtime string
	ipamBaseSecs  float64

	scaleHosts, scaleEndpoints, scaleNetworks int

	dockerRuns int

	// hosts: simulated host counts, endpoints per host in one network,
	// more networks, convergence samples, steady-state window. The more
	// networks are 5, not the 20 (BENCH_HOSTS_NETWORKS=20): with
	// one iptables process per rule each costs every host about 0.4 s of
	// a shared CPU, 7 minutes for 50 hosts alone.
	hostsSizes                                []int
	hostsPerHost, hostsNetworks, hostsSamples int
	hostsSteady                               time.Duration

	// pluginEnv is extra settings for the plugins of the scale test
	// (BENCH_PLUGIN_ENV, space-separated KEY=VALUE), for experiments.
	pluginEnv []string
}

func newConfig(quick bool) *config {
	if quick {
		return &config{quick: true, rounds: 2, iperfSecs: 1, pings: 100,
			attaches: 200, convSamples: 30, ipamBenchtime: "1s", ipamBaseSecs: 1,
			scaleHosts: 4, scaleEndpoints: 200, scaleNetworks: 20, dockerRuns: 4,
			hostsSizes: []int{3, 6}, hostsPerHost: 20, hostsNetworks: 5, hostsSamples: 12, hostsSteady: 5 * time.Second}
	}
	return &config{rounds: 5, iperfSecs: 2, pings: 300,
		attaches: 300, convSamples: 100, ipamBenchtime: "3s", ipamBaseSecs: 3,
		scaleHosts: 4, scaleEndpoints: 1000, scaleNetworks: 100, dockerRuns: 15,
		hostsSizes: []int{10, 25, 50}, hostsPerHost: 20, hostsNetworks: 5, hostsSamples: 30, hostsSteady: 15 * time.Second}
}

type bench struct {
	name string
	run  func(t *runner, cfg *config, rep *report)
}

var benches = []bench{
	{"dataplane", func(t *runner, cfg *config, rep *report) { benchDataplane(t, cfg, rep, 1500) }},
	{"jumbo", func(t *runner, cfg *config, rep *report) { benchDataplane(t, cfg, rep, 9000) }},
	{"attach", benchAttach},
	{"network", benchNetwork}, // fw_network.go
	{"forward", benchForward},
	{"docker", benchDocker},
	{"swarm", benchSwarm},
	{"ipam", benchIPAM},
	{"scale", benchScale},
	{"hosts", benchHosts},
	{"encrypted", benchEncrypted},
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == floorWatchArg {
		os.Exit(floorWatch(os.Args[2:])) // hostsfloor.go
	}
	quickEnv := os.Getenv("BENCH_QUICK")
	quick := flag.Bool("quick", quickEnv != "" && quickEnv != "0", "fewer iterations, smaller scale (default from BENCH_QUICK)")
	bin := flag.String("plugin", "bin/consul-overlay", "plugin binary, relative to the module root; built if missing")
	out := flag.String("out", "BENCHMARKS.md", "file to record the run in, relative to the module root (\"\" prints only)")
	only := flag.String("only", os.Getenv("BENCH_ONLY"), "comma-separated benchmarks to run (default all): "+benchNames())
	verbose := flag.Bool("v", false, "log progress and the tools' chatter to stderr")
	flag.Parse()
	os.Exit(run(*quick, *bin, *out, *only, *verbose))
}

func benchNames() string {
	var n []string
	for _, b := range benches {
		n = append(n, b.name)
	}
	return strings.Join(n, ",")
}

func run(quick bool, bin, out, only string, verbose bool) int {
	root, err := testenv.ModuleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "overlaybench:", err)
		return 1
	}
	if err := os.Chdir(root); err != nil {
		fmt.Fprintln(os.Stderr, "overlaybench:", err)
		return 1
	}
	if missing := prerequisites(); len(missing) > 0 {
		msg := "overlaybench: prerequisites missing:\n  " + strings.Join(missing, "\n  ")
		if testenv.InCI() {
			fmt.Fprintln(os.Stderr, msg+"\nCI=true forbids skipping")
			return 1
		}
		fmt.Fprintln(os.Stderr, msg+"\nskipped")
		return 0
	}
	cfg := newConfig(quick)
	cfg.pluginEnv = strings.Fields(os.Getenv("BENCH_PLUGIN_ENV"))
	if n, err := strconv.Atoi(os.Getenv("BENCH_HOSTS_NETWORKS")); err == nil && n >= 0 {
		cfg.hostsNetworks = n
	}
	if n, err := strconv.Atoi(os.Getenv("BENCH_HOSTS_SAMPLES")); err == nil && n > 0 {
		cfg.hostsSamples = n // longer convergence phases, to profile them
	}
	if v := os.Getenv("BENCH_HOSTS_SIZES"); v != "" { // e.g. 10,25
		var sizes []int
		for _, f := range strings.Split(v, ",") {
			if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n >= 2 {
				sizes = append(sizes, n)
			}
		}
		if len(sizes) > 0 {
			cfg.hostsSizes = sizes
		}
	}
	if _, err := os.Stat(bin); err == nil {
		cfg.bin, _ = filepath.Abs(bin)
	}
	selected := map[string]bool{}
	for _, s := range strings.Split(only, ",") {
		if s = strings.TrimSpace(s); s != "" {
			selected[s] = true
		}
	}
	for s := range selected {
		if !strings.Contains(","+benchNames()+",", ","+s+",") {
			fmt.Fprintf(os.Stderr, "overlaybench: unknown benchmark %q (have %s)\n", s, benchNames())
			return 2
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() { <-ctx.Done(); stop() }() // a second signal kills

	logw := os.Stderr
	var progress *os.File = os.Stderr
	if !verbose {
		logw, _ = os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	}
	mode := "full"
	if quick {
		mode = "quick (BENCH_QUICK=1)"
	}
	started := time.Now()
	loadStart := loadavg()
	rep := &report{}
	failed := false
	for _, b := range benches {
		if len(selected) > 0 && !selected[b.name] {
			continue
		}
		fmt.Fprintf(progress, "overlaybench: %s ...\n", b.name)
		t0 := time.Now()
		skipped, err := runSection(ctx, b.name, logw, func(t *runner) { b.run(t, cfg, rep) })
		if err != nil {
			if !skipped || testenv.InCI() {
				failed = true
			}
			rep.failed(b.name, err, skipped)
			fmt.Fprintf(progress, "overlaybench: %s: %v\n", b.name, firstLines(err.Error(), 12))
		}
		fmt.Fprintf(progress, "overlaybench: %s done in %s\n", b.name, time.Since(t0).Round(time.Second))
		if ctx.Err() != nil {
			failed = true
			break
		}
	}
	elapsed := time.Since(started).Round(time.Second)
	header := runHeader(mode, started, elapsed, loadStart, loadavg(), only)
	md := rep.markdown(header)
	fmt.Println(md)
	if out != "" && ctx.Err() == nil {
		if err := updateFile(out, intro, md); err != nil {
			fmt.Fprintln(os.Stderr, "overlaybench: record the run:", err)
			return 1
		}
		fmt.Fprintf(progress, "overlaybench: recorded in %s\n", out)
	}
	if failed {
		return 1
	}
	return 0
}

// prerequisites lists what is missing to run at all.
func prerequisites() []string {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root (run: sudo make bench)")
	}
	for _, c := range []struct{ cmd, pkg string }{
		{"nsenter", "util-linux"}, {"ip", "iproute2"}, {"bridge", "iproute2"}, {"iperf3", "iperf3"},
		{"ping", "iputils-ping"}, {"iptables", "iptables"}, {"go", "Go toolchain"},
	} {
		if _, err := exec.LookPath(c.cmd); err != nil {
			missing = append(missing, fmt.Sprintf("%s (apt-get install %s)", c.cmd, c.pkg))
		}
	}
	if consulPath() == "" {
		missing = append(missing, "consul (make consul, or CONSUL_BIN)")
	}
	return missing
}

// consulPath finds the agent as internal/testenv does.
func consulPath() string {
	if p := os.Getenv("CONSUL_BIN"); p != "" {
		return p
	}
	if root, err := testenv.ModuleRoot(); err == nil {
		p := filepath.Join(root, "bin", "consul")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	p, _ := exec.LookPath("consul")
	return p
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// runHeader describes the machine, the versions and the run.
func runHeader(mode string, started time.Time, elapsed time.Duration, loadStart, loadEnd, only string) string {
	cpu := "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := "?"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb float64
		fmt.Sscanf(strings.TrimPrefix(strings.SplitN(string(b), "\n", 2)[0], "MemTotal:"), "%f", &kb)
		mem = fmt.Sprintf("%.1f GiB", kb/1024/1024)
	}
	commit := strings.TrimSpace(toolVersion("git", "rev-parse", "--short", "HEAD"))
	if out, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(out) > 0 {
		commit += " + uncommitted changes"
	}
	consul := toolVersion(consulPath(), "version")
	docker := "not reachable"
	if out, err := exec.Command("docker", "version", "--format", "{{.Server.Version}}").Output(); err == nil {
		docker = strings.TrimSpace(string(out))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## %s: %s run\n\n", started.UTC().Format("2006-01-02 15:04 UTC"), mode)
	fmt.Fprintf(&b, "- Machine: %s, %d CPUs, %s RAM, kernel %s. Shared with other work: load average %s at the start, %s at the end.\n",
		cpu, runtime.NumCPU(), mem, strings.TrimSpace(toolVersion("uname", "-r")), loadStart, loadEnd)
	fmt.Fprintf(&b, "- Versions: consul-overlay %s, %s, %s, %s, Docker %s, %s.\n",
		commit, runtime.Version(), consul, toolVersion("iperf3", "--version"), docker, toolVersion("ip", "-V"))
	cmd := "make bench"
	if strings.HasPrefix(mode, "quick") {
		cmd = "BENCH_QUICK=1 " + cmd
	}
	if e := os.Getenv("LAB_ENGINE"); e != "" && e != "20.10" { // the lab of the swarm section
		cmd = "LAB_ENGINE=" + e + " " + cmd
	}
	if only != "" {
		cmd += " BENCH_ONLY=" + only
	}
	fmt.Fprintf(&b, "- Command: `%s`, %s.\n", cmd, elapsed)
	return b.String()
}

// eventually retries fn every 100 ms until it succeeds or timeout passes.
func eventually(ctx context.Context, timeout time.Duration, fn func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return errors.Join(err, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
