package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"consul-overlay/bench/harness"
	"consul-overlay/internal/testenv"
)

const (
	benchImage  = "consul-overlay-test/busybox:latest"
	benchPlugin = "consul-overlay-bench:latest"
	labStateDir = "/run/consul-overlay-lab"
)

func docker(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "docker", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(lastLines(string(out), 3)))
	}
	return strings.TrimSpace(string(out)), nil
}

// labEnv reads the env file of the lab whose state is in dir (lab/up.sh
// writes it) if that lab is up.
func labEnv(dir string) map[string]string {
	b, err := os.ReadFile(filepath.Join(dir, "env"))
	if err != nil {
		return nil
	}
	env := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			env[k] = v
		}
	}
	return env
}

// ownedLinks lists links in the machine's namespace that carry
// consul-overlay's alias: another instance of the plugin runs there.
func ownedLinks() []string {
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		return nil
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "alias consul-overlay") {
			f := strings.Fields(l)
			if len(f) > 1 {
				names = append(names, strings.TrimSuffix(f[1], ":"))
			}
		}
	}
	return names
}

// benchDocker times `docker run --rm` of a trivial container on a
// consul-overlay network against the same on a user-defined bridge
// network, on the machine's own engine. With the lab up it uses the lab's
// plugin on host A (the machine's engine, Consul through the lab's agent);
// otherwise it installs the plugin as consul-overlay-bench:latest on its
// embedded store and removes it afterwards. It refuses to run a second
// plugin instance next to another one in the machine's namespace: at
// start a plugin reconciles away devices and firewall rules of ours it
// does not know.
func benchDocker(t *runner, cfg *config, rep *report) {
	ctx := t.Context()
	if _, err := exec.LookPath("docker"); err != nil {
		testenv.Missing(t, "docker CLI", "apt-get install docker.io")
	}
	if _, err := docker(ctx, "info", "--format", "{{.ServerVersion}}"); err != nil {
		testenv.Missing(t, "a Docker engine", err.Error())
	}
	if _, err := docker(ctx, "image", "inspect", benchImage); err != nil {
		if out, err := exec.CommandContext(ctx, "make", "busybox-image").CombinedOutput(); err != nil {
			testenv.Missing(t, benchImage, fmt.Sprintf("make busybox-image: %v: %s", err, lastLines(string(out), 3)))
		}
	}
	driver, how := "", ""
	suffix := harness.RandomID()[:6]
	var labels []string
	if env := labEnv(labStateDir); env != nil && env["LAB_PLUGIN"] != "" {
		if en, _ := docker(ctx, "plugin", "inspect", "-f", "{{.Enabled}}", env["LAB_PLUGIN"]); en == "true" {
			driver = env["LAB_PLUGIN"]
			how = "the lab's plugin on host A (lab/up.sh: Consul through the local client agent)"
			labels = []string{"--label", env["LAB_LABEL"]}
		}
	}
	if driver == "" {
		if l := ownedLinks(); len(l) > 0 {
			t.Skipf("another consul-overlay instance owns devices in the machine's namespace (%s) and the lab is not up: "+
				"a second instance would reconcile them away", strings.Join(l, " "))
		}
		if out, err := docker(ctx, "plugin", "ls", "--format", "{{.Name}} {{.Enabled}}"); err == nil && strings.Contains(out, "consul-overlay") && strings.Contains(out, "true") {
			t.Skipf("a consul-overlay plugin is enabled on the engine (%s): not running a second instance next to it", out)
		}
		// The plugin leaves its (then empty) chain and FORWARD jumps behind;
		// remove them if this run made them.
		for _, bin := range []string{"iptables", "ip6tables"} {
			if exec.Command(bin, "-w", "-S", "CONSUL-OVERLAY").Run() == nil {
				continue
			}
			t.Cleanup(func() {
				out, err := exec.Command(bin, "-w", "-S", "CONSUL-OVERLAY").Output()
				if err != nil || strings.Count(string(out), "\n") > 1 {
					return
				}
				fwd, _ := exec.Command(bin, "-w", "-S", "FORWARD").Output()
				for _, l := range strings.Split(string(fwd), "\n") {
					if f := strings.Fields(l); len(f) > 2 && f[0] == "-A" && strings.HasSuffix(l, " -j CONSUL-OVERLAY") {
						_ = exec.Command(bin, append([]string{"-w", "-D"}, f[1:]...)...).Run()
					}
				}
				_ = exec.Command(bin, "-w", "-X", "CONSUL-OVERLAY").Run()
			})
		}
		driver = benchPlugin
		how = "the managed plugin built from bin/consul-overlay as " + benchPlugin + " (embedded store, VXLAN port 4799), removed afterwards"
		buildDir := t.TempDir()
		cmd := exec.CommandContext(ctx, "scripts/plugin.sh", cfg.binOrDefault(), benchPlugin)
		cmd.Env = append(os.Environ(), "BUILD_DIR="+buildDir)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("scripts/plugin.sh: %v\n%s", err, out)
		}
		t.Cleanup(func() {
			_, _ = docker(context.Background(), "plugin", "disable", "-f", benchPlugin)
			_, _ = docker(context.Background(), "plugin", "rm", "-f", benchPlugin)
		})
		data := "/var/lib/consul-overlay-bench"
		if err := os.MkdirAll(data, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(data) })
		if _, err := docker(ctx, "plugin", "set", benchPlugin, "data.source="+data, "VXLAN_PORT=4799", "LOG_LEVEL=info", "NODE_NAME=bench"); err != nil {
			t.Fatal(err)
		}
		if _, err := docker(ctx, "plugin", "enable", "--timeout", "60", benchPlugin); err != nil {
			t.Fatal(err)
		}
	}

	ovName, brName := "cobench-ov-"+suffix, "cobench-br-"+suffix
	create := func(name string, fourth int, args ...string) {
		var lastErr error
		for _, third := range []int{236, 237, 238, 239, 240, 241, 242, 243} {
			a := append([]string{"network", "create", "--subnet", fmt.Sprintf("10.%d.%d.0/24", third, fourth)}, labels...)
			a = append(append(a, args...), name)
			if _, lastErr = docker(ctx, a...); lastErr == nil {
				t.Cleanup(func() { _, _ = docker(context.Background(), "network", "rm", name) })
				return
			}
		}
		t.Fatalf("create network %s: %v", name, lastErr)
	}
	create(ovName, 0, "-d", driver, "--ipam-driver", driver, "-o", "name="+ovName)
	create(brName, 1)
	// The same two with --internal: no container of theirs gets a second
	// endpoint on docker_gwbridge, so the pair shows the plugin's own cost.
	ovIntName, brIntName := ovName+"-int", brName+"-int"
	create(ovIntName, 2, "--internal", "-d", driver, "--ipam-driver", driver, "-o", "name="+ovIntName)
	create(brIntName, 3, "--internal")
	// With -o egress=host the host is the way out: the container gets the
	// network's gateway and no docker_gwbridge endpoint, as on a bridge.
	ovEgName := ovName + "-eg"
	create(ovEgName, 4, "-d", driver, "--ipam-driver", driver, "-o", "name="+ovEgName, "-o", "egress=host")
	// The default network is egress=auto (this container publishes no
	// port); with -o egress=docker Docker gives every container a
	// docker_gwbridge endpoint, as its own overlay does.
	ovDockerName := ovName + "-dk"
	create(ovDockerName, 5, "-d", driver, "--ipam-driver", driver, "-o", "name="+ovDockerName, "-o", "egress=docker")

	nets := []string{ovName, brName, ovIntName, brIntName, ovEgName, ovDockerName}
	took := timeDockerRuns(t, "", benchImage, nets, cfg.dockerRuns)
	od, bd, oid, bid, oed, odd := took[ovName], took[brName], took[ovIntName], took[brIntName], took[ovEgName], took[ovDockerName]
	sec := rep.section("docker run --rm (machine's engine)")
	fmt.Fprintf(sec, "`docker run --rm --network N %s true`, %d runs per network after 2 warm-ups, networks alternating. "+
		"consul-overlay: %s. Baseline: a user-defined bridge network on the same engine.\n\n", benchImage, cfg.dockerRuns, how)
	runsTable(sec, []namedDist{{"consul-overlay (" + driver + "; the default egress, auto, a container without published ports)", od}, {"bridge", bd},
		{"consul-overlay, --internal", oid}, {"bridge, --internal", bid}, {"consul-overlay, -o egress=host", oed},
		{"consul-overlay, -o egress=docker", odd}})
	fmt.Fprintf(sec, "\nRatio consul-overlay ÷ bridge: p50 %s, mean %s (the default egress, auto: a container that publishes no port "+
		"goes out through its host, as on a bridge network, with no docker_gwbridge endpoint). Both networks --internal: p50 %s, mean %s. "+
		"With -o egress=host ÷ bridge: p50 %s, mean %s. With -o egress=docker Docker also connects the container to docker_gwbridge, "+
		"a second endpoint per run, as for its own overlay: ÷ bridge p50 %s, mean %s; the docker_gwbridge endpoint costs %s ms at p50 "+
		"(consul-overlay -o egress=docker less the default).\n",
		fr(ratio(od.p50, bd.p50)), fr(ratio(od.mean, bd.mean)), fr(ratio(oid.p50, bid.p50)), fr(ratio(oid.mean, bid.mean)),
		fr(ratio(oed.p50, bd.p50)), fr(ratio(oed.mean, bd.mean)), fr(ratio(odd.p50, bd.p50)), fr(ratio(odd.mean, bd.mean)), f(odd.p50-od.p50))
	rep.check("docker run --rm, consul-overlay ÷ bridge (p50)", fr(ratio(od.p50, bd.p50)), "≤ 1.05", ratio(od.p50, bd.p50) <= 1.05)
	rep.info("docker run --rm, consul-overlay -o egress=host ÷ bridge (p50)", fr(ratio(oed.p50, bd.p50)))
	rep.info("docker run --rm, consul-overlay -o egress=docker ÷ bridge (p50)", fr(ratio(odd.p50, bd.p50)))
}

// timeDockerRuns times `docker run --rm` of a trivial container on each
// network of the engine at host ("" for the machine's), the networks
// alternating, after two warm-up rounds; a failed run fails the section.
func timeDockerRuns(t *runner, host, image string, nets []string, runs int) map[string]dist {
	ctx := t.Context()
	runOnce := func(network string) (time.Duration, error) {
		start := time.Now()
		_, err := docker(ctx, hostArgs(host, "run", "--rm", "--network", network, image, "true")...)
		return time.Since(start), err
	}
	took := map[string][]time.Duration{}
	for round := range runs + 2 {
		for _, n := range nets {
			d, err := runOnce(n)
			if err != nil {
				t.Fatalf("docker run on %s: %v", n, err)
			}
			if round >= 2 { // the first two rounds warm up
				took[n] = append(took[n], d)
			}
		}
	}
	out := map[string]dist{}
	for n, ds := range took {
		out[n] = summarize(durationsMS(ds))
	}
	return out
}

// namedDist is one row of runsTable.
type namedDist struct {
	name string
	d    dist
}

// runsTable writes the `docker run` times of each network: p50, mean, max.
func runsTable(w io.Writer, rows []namedDist) {
	fmt.Fprintln(w, "| Network | p50 ms | mean ms | max ms |")
	fmt.Fprintln(w, "|---|---:|---:|---:|")
	for _, r := range rows {
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", r.name, f(r.d.p50), f(r.d.mean), f(r.d.mx))
	}
}

func (c *config) binOrDefault() string {
	if c.bin != "" {
		return c.bin
	}
	return "bin/consul-overlay"
}
