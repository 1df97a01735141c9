//go:build e2e && chaos

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"consul-overlay/internal/dockertest"
	"consul-overlay/vxlan"
)

// The chaos suite (issue 12, `make chaos`): failures of hosts, Consul and
// engines on the two-host lab, each scenario bounded in time, and after
// each: no address held twice in Consul or in any container, nothing left
// once everything is removed, and the traffic of running containers intact
// where the behaviour promises it. Build tags e2e and chaos: `make e2e`
// does not run it. make chaos sets LAB_HOST_GRACE (the lab's HOST_GRACE).
//
// Every scenario leaves a note for the summary: how long it took, the
// packets its pings lost, and what was left after everything was removed.

// chaosRuns is how many `docker run` each host starts at once in the kill
// -9 scenario (CHAOS_RUNS; the issue asks for 50, which two shared cores
// do not carry within the scenario's bound).
func chaosRuns() int {
	if n, err := strconv.Atoi(os.Getenv("CHAOS_RUNS")); err == nil && n > 0 {
		return n
	}
	return 20
}

type chaos struct {
	*suite
	grace time.Duration
}

func TestChaos(t *testing.T) {
	if theLab == nil {
		t.Fatal("the lab is not up")
	}
	grace, err := time.ParseDuration(os.Getenv("LAB_HOST_GRACE"))
	if err != nil {
		t.Fatalf("LAB_HOST_GRACE=%q (make chaos sets it; the lab's HOST_GRACE): %v", os.Getenv("LAB_HOST_GRACE"), err)
	}
	c := &chaos{
		suite: &suite{
			lab:    theLab,
			passed: map[string]bool{},
			notes:  map[string]string{},
			seen:   map[*Host]map[string]bool{theLab.A: {}, theLab.B: {}},
		},
		grace: grace,
	}
	c.run(t, "chaos-kill9-during-runs", nil, c.kill9DuringRuns)
	c.run(t, "chaos-agent-b-stopped", nil, c.agentBStopped)
	c.run(t, "chaos-server-restart", nil, c.serverRestart)
	c.run(t, "chaos-partition-b", nil, c.partitionB)
	c.run(t, "chaos-engine-restart", nil, c.engineRestartAlways)
	c.run(t, "chaos-fuzz-socket", nil, c.fuzzSocket)
	c.run(t, "chaos-host-b-lost", nil, c.hostBLost)
}

// note appends to the scenario's summary line.
func (c *chaos) note(name, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if c.notes[name] != "" {
		msg = c.notes[name] + "; " + msg
	}
	c.notes[name] = msg
}

// --- networks and containers ---

type chaosNet struct {
	name, key, subnet, gateway string
	vni                        uint32
}

// createNet creates the logical network name on both hosts; the test's
// cleanup removes its containers and the network.
func (c *chaos) createNet(t *testing.T, name, subnet string) chaosNet {
	ctx := t.Context()
	l := c.lab
	name = dockertest.UniqueName(name + "-")
	p := netip.MustParsePrefix(subnet)
	n := chaosNet{name: name, key: "name-" + name, subnet: subnet, gateway: p.Addr().Next().String()}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c.removeAll(ctx, n)
	})
	for _, h := range l.Hosts() {
		if _, err := h.Docker(ctx, "network", "create", "-d", l.Plugin, "--ipam-driver", l.Plugin,
			"--subnet", subnet, "-o", "name="+name, "--label", l.Label, name); err != nil {
			t.Fatal(err)
		}
	}
	vni, err := l.NetworkVNI(ctx, n.key)
	if err != nil {
		t.Fatal(err)
	}
	n.vni = vni
	for _, h := range l.Hosts() {
		c.seen[h][vxlan.BridgeName(vni)] = true
		c.seen[h][vxlan.VXLANName(vni)] = true
		if h.DataNS != "" {
			c.seen[h][vxlan.GatewayName(vni)] = true // the host's end of the bridge
		}
	}
	return n
}

// runArgs are the arguments of `docker run -d` of a container of n.
func (c *chaos) runArgs(n chaosNet, name string, extra ...string) []string {
	args := []string{"run", "-d", "--name", name, "--label", c.lab.Label, "--label", "chaos-net=" + n.name,
		"--network", n.name, "--stop-timeout", "1"}
	args = append(args, extra...)
	return append(args, c.lab.Image, "sleep", "3600")
}

// start runs a container of n on h.
func (c *chaos) start(t *testing.T, h *Host, n chaosNet, name string, extra ...string) netip.Addr {
	t.Helper()
	if _, err := h.Docker(t.Context(), c.runArgs(n, name, extra...)...); err != nil {
		t.Fatalf("%s: %v", h, err)
	}
	ip, _, err := h.ContainerAddr(t.Context(), name, n.name)
	if err != nil {
		t.Fatal(err)
	}
	return ip
}

// removeAll removes n's containers and n on both hosts (errors only
// logged: the check that follows says what is left).
func (c *chaos) removeAll(ctx context.Context, n chaosNet) {
	for _, h := range c.lab.Hosts() {
		ids, err := h.Docker(ctx, "ps", "-aq", "--filter", "label=chaos-net="+n.name)
		if err == nil && ids != "" {
			h.Docker(ctx, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
		}
		h.Docker(ctx, "network", "rm", n.name)
	}
}

// attached is, on h, endpoint ID → address of every container on n, as
// Docker reports it.
func attached(ctx context.Context, h *Host, n chaosNet) (map[string]netip.Addr, error) {
	out, err := h.Docker(ctx, "network", "inspect", "-f",
		`{{range $id, $c := .Containers}}{{$c.EndpointID}} {{$c.IPv4Address}}{{"\n"}}{{end}}`, n.name)
	if err != nil {
		return nil, err
	}
	m := map[string]netip.Addr{}
	for _, line := range strings.Split(out, "\n") {
		id, cidr, ok := strings.Cut(strings.TrimSpace(line), " ")
		if !ok {
			continue
		}
		p, err := netip.ParsePrefix(cidr)
		if err != nil {
			return nil, fmt.Errorf("%s: network %s: endpoint %s address %q: %w", h, n.name, id, cidr, err)
		}
		m[id] = p.Addr()
	}
	return m, nil
}

// converged checks n across both hosts: no address twice among the
// containers, the endpoint records equal to Docker's endpoints (node and
// address), the IPAM holding exactly their addresses and the gateway, the
// bridges' ports, and no address registered twice in the catalog.
func (c *chaos) converged(ctx context.Context, n chaosNet) error {
	eps := map[*Host]map[string]netip.Addr{}
	byIP := map[netip.Addr]string{}
	var errs []error
	want := []string{n.gateway}
	for _, h := range c.lab.Hosts() {
		m, err := attached(ctx, h, n)
		if err != nil {
			return err
		}
		eps[h] = m
		for id, ip := range m {
			if other, dup := byIP[ip]; dup {
				errs = append(errs, fmt.Errorf("address %s held by two containers: %s and %s %.12s", ip, other, h, id))
			}
			byIP[ip] = fmt.Sprintf("%s %.12s", h, id)
			want = append(want, ip.String())
		}
		errs = append(errs, c.bridgePorts(ctx, h, n.vni, ids(m)))
	}
	errs = append(errs, c.endpointsOf(ctx, n.key, eps))
	got, err := c.ipamAddrs(ctx, n.subnet)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	slices.SortFunc(want, compareAddrs)
	if !slices.Equal(got, want) {
		errs = append(errs, fmt.Errorf("IPAM holds %v in %s, want %v (gateway and endpoints)", got, n.subnet, want))
	}
	errs = append(errs, c.noDuplicateInstances(ctx))
	return errors.Join(errs...)
}

// waitConverged waits up to within for converged and returns how long
// that took.
func (c *chaos) waitConverged(t *testing.T, n chaosNet, within time.Duration) (time.Duration, error) {
	start := time.Now()
	err := eventually(t, within, func(ctx context.Context) error { return c.converged(ctx, n) })
	return time.Since(start), err
}

// leftovers removes n and everything on it and lists what is left of any
// network once that settled (30 s): KV state of networks, addresses and
// pools, lost-host records, service instances, links of ours on either
// host (both are the lab's own namespaces on engine 29, and their
// data-plane namespaces with LAB_DATAPLANE=1) and firewall rules
// naming a link the suite saw.
func (c *chaos) leftovers(t *testing.T, n chaosNet) []string {
	ctx := t.Context()
	c.removeAll(ctx, n)
	var left []string
	eventually(t, 30*time.Second, func(ctx context.Context) error {
		left = nil
		keys, err := c.lab.KVKeys(ctx)
		if err != nil {
			return err
		}
		for _, k := range keys {
			if strings.HasPrefix(k, "networks/") || strings.HasPrefix(k, "vnis/") || strings.HasPrefix(k, "subnets/") ||
				strings.HasPrefix(k, "hosts-lost/") || strings.Contains(k, "/addr/") || strings.Contains(k, "/pool/") {
				left = append(left, "key "+k)
			}
		}
		inst, err := c.lab.Instances(ctx)
		if err != nil {
			return err
		}
		for _, i := range inst {
			left = append(left, "service "+i.String())
		}
		for _, h := range c.lab.Hosts() {
			links, err := h.AllLinks(ctx)
			if err != nil {
				return err
			}
			for name := range links {
				if h.NetNS != "" || c.seen[h][name] {
					left = append(left, h.Name+": link "+name)
				}
			}
		}
		if len(left) > 0 {
			return fmt.Errorf("left: %v", left)
		}
		return nil
	})
	for _, h := range c.lab.Hosts() {
		var names []string
		for name := range c.seen[h] {
			names = append(names, name)
		}
		rules, err := h.RulesMentioning(ctx, names)
		if err != nil {
			t.Error(err)
		}
		for _, r := range rules {
			left = append(left, h.Name+": rule "+r)
		}
	}
	slices.Sort(left)
	return left
}

// finish removes everything of n, fails the test for anything left, and
// notes what was left and how long the scenario took.
func (c *chaos) finish(t *testing.T, scenario string, n chaosNet, start time.Time) {
	left := c.leftovers(t, n)
	if len(left) > 0 {
		t.Errorf("left after removing everything: %s", strings.Join(left, "; "))
		c.note(scenario, "left: %d objects", len(left))
	} else {
		c.note(scenario, "left: nothing")
	}
	t.Logf("%s: took %s", scenario, time.Since(start).Round(100*time.Millisecond))
}

// --- traffic ---

// pingRun is a ping from a container that runs in the background.
type pingRun struct {
	what string
	done chan struct{}
	out  string
	err  error
}

var linkTimers = regexp.MustCompile(`\S+_timer\s+\S+`)

var pingStats = regexp.MustCompile(`(\d+) packets transmitted, (\d+) packets received`)

// startPing pings to from container on h, five times a second, for d.
func startPing(ctx context.Context, h *Host, container string, to netip.Addr, d time.Duration) *pingRun {
	p := &pingRun{what: fmt.Sprintf("%s %s → %s", h.Name, container, to), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
		defer cancel()
		// A count, not a deadline: -w alone would count the replies still
		// in flight when it ends as lost.
		count := int(d.Seconds()) * 5
		p.out, p.err = h.InContainer(ctx, container, "ping", "-q", "-i", "0.2", "-c", strconv.Itoa(count),
			"-w", strconv.Itoa(int(d.Seconds())+20), to.String())
	}()
	return p
}

// wait returns the packets sent and lost.
func (p *pingRun) wait() (sent, lost int, err error) {
	<-p.done
	m := pingStats.FindStringSubmatch(p.out)
	if m == nil {
		return 0, 0, fmt.Errorf("ping %s: no statistics: %q: %v", p.what, p.out, p.err)
	}
	sent, _ = strconv.Atoi(m[1])
	recv, _ := strconv.Atoi(m[2])
	return sent, sent - recv, nil
}

// pingsLost waits for the pings, fails the test for any loss when
// mustHold, and notes the loss.
func (c *chaos) pingsLost(t *testing.T, scenario string, mustHold bool, pings ...*pingRun) {
	var parts []string
	for _, p := range pings {
		sent, lost, err := p.wait()
		if err != nil {
			t.Error(err)
			parts = append(parts, p.what+" no result")
			continue
		}
		parts = append(parts, fmt.Sprintf("%s lost %d/%d", p.what, lost, sent))
		if sent == 0 || (mustHold && lost > 0) {
			t.Errorf("ping %s: %d of %d packets lost", p.what, lost, sent)
		}
	}
	c.note(scenario, "packets: %s", strings.Join(parts, ", "))
}

// reaches pings addr once from container on h, retrying for within.
func reaches(t *testing.T, h *Host, container string, addr netip.Addr, within time.Duration) error {
	return eventually(t, within, func(ctx context.Context) error {
		_, err := h.InContainer(ctx, container, "ping", "-c", "1", "-W", "2", addr.String())
		return err
	})
}

// --- processes ---

// nsInode is the inode of the network namespace of h (its name under
// /run/netns).
func nsInode(ns string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat("/run/netns/"+ns, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// pidsIn lists the processes in network namespace ns whose command name
// is comm ("" for all).
func pidsIn(ns, comm string) ([]int, error) {
	ino, err := nsInode(ns)
	if err != nil {
		return nil, err
	}
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) != nil || st.Ino != ino {
			continue
		}
		if comm != "" {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			if err != nil || strings.TrimSpace(string(b)) != comm {
				continue
			}
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// pluginPID is the pid of h's plugin process (0 when none runs).
func pluginPID(h *Host) int {
	pids, _ := pidsIn(h.NetNS, "consul-overlay")
	if len(pids) == 0 {
		return 0
	}
	return pids[0]
}

// killPlugin sends SIGKILL to h's plugin and returns its pid.
func killPlugin(h *Host) (int, error) {
	pid := pluginPID(h)
	if pid == 0 {
		return 0, fmt.Errorf("%s: no plugin process", h)
	}
	return pid, syscall.Kill(pid, syscall.SIGKILL)
}

// pluginBack waits until h's engine runs its plugin again in a process
// other than old.
func pluginBack(t *testing.T, h *Host, old int, within time.Duration) error {
	return eventually(t, within, func(ctx context.Context) error {
		pid := pluginPID(h)
		if pid == 0 || pid == old {
			return fmt.Errorf("%s: the plugin (pid %d before) does not run again", h, old)
		}
		en, err := h.Docker(ctx, "plugin", "inspect", "-f", "{{.Enabled}}", theLab.Plugin)
		if err != nil || en != "true" {
			return fmt.Errorf("%s: plugin enabled %q: %v", h, en, err)
		}
		return nil
	})
}

// chaosScript runs lab/chaos.sh.
func (c *chaos) chaosScript(ctx context.Context, args ...string) error {
	return c.lab.Script(ctx, "chaos.sh", args...)
}

// --- host records ---

// hostRecord is hosts/<id> of node: its ID and the session holding it
// ("" when none does; ok false when there is no record).
func (c *chaos) hostRecord(ctx context.Context, node string) (id, session string, ok bool, err error) {
	var entries []struct {
		Key     string
		Value   []byte
		Session string
	}
	err = c.lab.consulGet(ctx, "/v1/kv/"+kvPrefix+"hosts/?recurse", &entries)
	if errors.Is(err, errNotFound) {
		return "", "", false, nil
	}
	if err != nil {
		return "", "", false, err
	}
	for _, e := range entries {
		if bytes.Contains(e.Value, []byte(`"`+node+`"`)) {
			return strings.TrimPrefix(e.Key, kvPrefix+"hosts/"), e.Session, true, nil
		}
	}
	return "", "", false, nil
}

// --- scenarios ---

// kill9DuringRuns (1): CHAOS_RUNS concurrent `docker run` on each host,
// the plugin of both hosts killed with SIGKILL while they run; the engine
// restarts it. Every container then either runs with an address no other
// holds, reachable from the other host, or its run failed with an error
// and left nothing (the endpoint records, IPAM and bridges equal exactly
// the running containers).
func (c *chaos) kill9DuringRuns(t *testing.T) {
	const scenario = "chaos-kill9-during-runs"
	ctx := t.Context()
	l := c.lab
	start := time.Now()
	n := c.createNet(t, "chaos-k9", "10.220.1.0/24")
	probe := map[*Host]string{}
	for _, h := range l.Hosts() {
		probe[h] = n.name + "-probe-" + strings.ToLower(h.Name)
		c.start(t, h, n, probe[h])
	}
	runs := chaosRuns()
	type outcome struct {
		h    *Host
		name string
		err  error
	}
	var mu sync.Mutex
	var outcomes []outcome
	var wg sync.WaitGroup
	rctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	for _, h := range l.Hosts() {
		for i := range runs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				name := fmt.Sprintf("%s-%s%d", n.name, strings.ToLower(h.Name), i)
				_, err := h.Docker(rctx, c.runArgs(n, name)...)
				mu.Lock()
				outcomes = append(outcomes, outcome{h, name, err})
				mu.Unlock()
			}()
		}
	}
	// Kill while the runs are in flight: after the first few finished.
	killed := map[*Host]int{}
	eventually(t, 30*time.Second, func(context.Context) error {
		mu.Lock()
		defer mu.Unlock()
		if len(outcomes) < runs/4 {
			return fmt.Errorf("%d runs done", len(outcomes))
		}
		return nil
	})
	mu.Lock()
	doneAtKill := len(outcomes)
	mu.Unlock()
	for _, h := range l.Hosts() {
		pid, err := killPlugin(h)
		if err != nil {
			t.Fatal(err)
		}
		killed[h] = pid
	}
	t.Logf("killed the plugins (A pid %d, B pid %d) after %d of %d runs", killed[l.A], killed[l.B], doneAtKill, 2*runs)
	wg.Wait()
	for _, h := range l.Hosts() {
		if err := pluginBack(t, h, killed[h], 60*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	failed := 0
	var samples []string
	running := map[*Host]map[string]netip.Addr{l.A: {}, l.B: {}}
	for _, o := range outcomes {
		if o.err != nil {
			failed++
			if !strings.Contains(o.err.Error(), "Error") && !strings.Contains(o.err.Error(), "error") {
				t.Errorf("%s: run of %s failed without an error message: %v", o.h, o.name, o.err)
			}
			if len(samples) < 3 {
				samples = append(samples, o.err.Error())
			}
			// A container whose start failed stays created: remove it;
			// what it held must go with it (checked below).
			o.h.Docker(ctx, "rm", "-f", o.name)
			continue
		}
		st, err := o.h.Docker(ctx, "inspect", "-f", "{{.State.Status}}", o.name)
		if err != nil || st != "running" {
			t.Errorf("%s: %s started but is %q: %v", o.h, o.name, st, err)
			continue
		}
		ip, _, err := o.h.ContainerAddr(ctx, o.name, n.name)
		if err != nil {
			t.Error(err)
			continue
		}
		running[o.h][o.name] = ip
	}
	t.Logf("%d runs succeeded, %d failed; failures: %q", 2*runs-failed, failed, samples)
	c.note(scenario, "%d×2 runs: %d ran, %d failed cleanly", runs, 2*runs-failed, failed)
	took, err := c.waitConverged(t, n, 90*time.Second)
	if err != nil {
		t.Errorf("not converged within 90s after the kill: %v", err)
	} else {
		t.Logf("converged %s after the runs ended", took.Round(100*time.Millisecond))
	}
	// Reachability of every running container from the other host.
	var rwg sync.WaitGroup
	sem := make(chan struct{}, 4)
	var unreachable []string
	for _, h := range l.Hosts() {
		other := l.Other(h)
		for name, ip := range running[h] {
			rwg.Add(1)
			go func() {
				defer rwg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				if err := reaches(t, other, probe[other], ip, 20*time.Second); err != nil {
					mu.Lock()
					unreachable = append(unreachable, fmt.Sprintf("%s %s %s", h.Name, name, ip))
					mu.Unlock()
				}
			}()
		}
	}
	rwg.Wait()
	if len(unreachable) > 0 {
		t.Errorf("unreachable from the other host: %v", unreachable)
	}
	c.finish(t, scenario, n, start)
}

// outage runs a Consul outage of the scenario: down stops a part of
// Consul, up starts it again; during it (at least hold) a container
// starts and another stops on both hosts, calls on the hosts in needFail
// must fail at once with an error that says the store is unreachable,
// running traffic between the hosts must not lose a packet, and after it
// every host must serve new containers again without a restart and the
// state converge.
func (c *chaos) outage(t *testing.T, scenario string, n chaosNet, hold time.Duration, down, up func(ctx context.Context) error, needFail []*Host, mayFail bool) {
	ctx := t.Context()
	l := c.lab
	start := time.Now()
	ip := map[*Host]netip.Addr{}
	for _, h := range l.Hosts() {
		ip[h] = c.start(t, h, n, n.name+"-run-"+strings.ToLower(h.Name))
		c.start(t, h, n, n.name+"-stop-"+strings.ToLower(h.Name))
	}
	if _, err := c.waitConverged(t, n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, h := range l.Hosts() {
		if err := reaches(t, h, n.name+"-run-"+strings.ToLower(h.Name), ip[l.Other(h)], 20*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	window := hold + 20*time.Second
	var pings []*pingRun
	for _, h := range l.Hosts() {
		pings = append(pings, startPing(ctx, h, n.name+"-run-"+strings.ToLower(h.Name), ip[l.Other(h)], window))
	}
	time.Sleep(2 * time.Second)
	downAt := time.Now()
	if err := down(ctx); err != nil {
		t.Fatal(err)
	}
	for _, h := range l.Hosts() {
		name := n.name + "-new-" + strings.ToLower(h.Name)
		t0 := time.Now()
		_, err := h.Docker(ctx, c.runArgs(n, name)...)
		took := time.Since(t0)
		if slices.Contains(needFail, h) {
			switch {
			case err == nil:
				t.Errorf("%s: docker run during the outage succeeded", h)
			case !strings.Contains(err.Error(), "unreachable") && !strings.Contains(err.Error(), "unavailable"):
				t.Errorf("%s: docker run during the outage failed after %s without saying the store is unreachable: %v", h, took.Round(time.Millisecond), err)
			case took > 15*time.Second:
				t.Errorf("%s: docker run during the outage failed only after %s: %v", h, took.Round(time.Millisecond), err)
			default:
				t.Logf("%s: docker run during the outage failed after %s: %v", h, took.Round(time.Millisecond), err)
			}
			c.note(scenario, "%s's run failed in %s", h.Name, took.Round(100*time.Millisecond))
			h.Docker(ctx, "rm", "-f", name)
		} else if err != nil && (!mayFail || !strings.Contains(err.Error(), "unavailable")) {
			t.Errorf("%s: docker run during the outage: %v", h, err)
		} else {
			t.Logf("%s: docker run during the outage after %s: %v", h, took.Round(time.Millisecond), err)
			if err != nil {
				h.Docker(ctx, "rm", "-f", name)
			}
		}
		t0 = time.Now()
		if _, err := h.Docker(ctx, "stop", n.name+"-stop-"+strings.ToLower(h.Name)); err != nil {
			t.Errorf("%s: docker stop during the outage: %v", h, err)
		}
		t.Logf("%s: docker stop during the outage took %s", h, time.Since(t0).Round(time.Millisecond))
	}
	if d := hold - time.Since(downAt); d > 0 {
		time.Sleep(d)
	}
	if err := up(ctx); err != nil {
		t.Fatal(err)
	}
	upAt := time.Now()
	t.Logf("outage lasted %s", upAt.Sub(downAt).Round(100*time.Millisecond))
	if lasted := upAt.Sub(downAt); lasted > c.grace-5*time.Second {
		// A host without its session this long may be reaped by design;
		// the outage then measured a lost host, not an outage.
		t.Errorf("the outage lasted %s, within 5s of HOST_GRACE %s: the scenario's calls during it took too long", lasted.Round(100*time.Millisecond), c.grace)
	}
	// Catching up without a restart: a new container on every host.
	pids := map[*Host]int{}
	for _, h := range l.Hosts() {
		pids[h] = pluginPID(h)
	}
	for _, h := range l.Hosts() {
		name := n.name + "-after-" + strings.ToLower(h.Name)
		err := eventually(t, 60*time.Second, func(ctx context.Context) error {
			_, err := h.Docker(ctx, c.runArgs(n, name)...)
			if err != nil {
				h.Docker(ctx, "rm", "-f", name)
			}
			return err
		})
		if err != nil {
			t.Errorf("%s: no new container within 60s after the outage: %v", h, err)
			continue
		}
		t.Logf("%s: a new container runs %s after the outage", h, time.Since(upAt).Round(100*time.Millisecond))
	}
	took, err := c.waitConverged(t, n, 60*time.Second)
	if err != nil {
		t.Errorf("not converged within 60s after the outage: %v", err)
	} else {
		c.note(scenario, "converged %s after", (time.Since(upAt) - took + took).Round(time.Second))
	}
	for _, h := range l.Hosts() {
		if p := pluginPID(h); p != pids[h] {
			t.Errorf("%s: the plugin restarted (pid %d, was %d)", h, p, pids[h])
		}
	}
	c.pingsLost(t, scenario, true, pings...)
	c.finish(t, scenario, n, start)
}

// agentBStopped (2): host B's Consul agent stopped for 30 s, or for
// less when HOST_GRACE is short (the chaos suite's 30 s): a stopped agent
// leaves the cluster and B's session ends at once, so an outage that
// reaches the grace is a lost host, and host A rightly reaps B (the
// scenario host-b-lost tests that). The agent is down for HOST_GRACE
// less 12 s at most: B's session is claimed again a second or two after
// its agent starts, well before the grace ends.
func (c *chaos) agentBStopped(t *testing.T) {
	n := c.createNet(t, "chaos-agent", "10.220.2.0/24")
	b := c.lab.B
	hold := min(30*time.Second, c.grace-12*time.Second)
	if hold < 5*time.Second {
		t.Fatalf("HOST_GRACE %s leaves no room for an agent outage shorter than it", c.grace)
	}
	c.outage(t, "chaos-agent-b-stopped", n, hold,
		func(ctx context.Context) error { return c.chaosScript(ctx, "consul", "stop", b.Node) },
		func(ctx context.Context) error { return c.chaosScript(ctx, "consul", "start", b.Node) },
		[]*Host{b}, false)
}

// serverRestart (3): the Consul server killed and started again after
// 15 s. With the lab's one server (LAB_CONSUL_SERVERS=1), every host's
// calls that need Consul fail meanwhile; with three, the leader is the one
// killed, and calls fail clearly, or succeed once the other two elected a
// new leader.
func (c *chaos) serverRestart(t *testing.T) {
	n := c.createNet(t, "chaos-server", "10.220.3.0/24")
	server := "lab-consul"
	three := os.Getenv("LAB_CONSUL_SERVERS") == "3"
	if three {
		var leader string
		if err := c.lab.consulGet(t.Context(), "/v1/status/leader", &leader); err != nil {
			t.Fatal(err)
		}
		names := map[string]string{"198.51.100.3": "lab-consul", "198.51.100.4": "lab-consul2", "198.51.100.5": "lab-consul3"}
		host, _, _ := strings.Cut(leader, ":")
		if server = names[host]; server == "" {
			t.Fatalf("leader %q is none of the lab's servers", leader)
		}
		c.note("chaos-server-restart", "leader %s of 3 killed", server)
	}
	needFail := c.lab.Hosts()
	if three {
		needFail = nil
	}
	c.outage(t, "chaos-server-restart", n, 15*time.Second,
		func(ctx context.Context) error { return c.chaosScript(ctx, "consul", "kill", server) },
		func(ctx context.Context) error { return c.chaosScript(ctx, "consul", "start", server) },
		needFail, three)
}

// partitionB (5): host B cut off from the Consul server (its packets to
// and from the server dropped; the underlay to host A stays) for less than
// HOST_GRACE, long enough for its session to end (when the servers take
// B's agent for failed; one that still reaches A's agent by gossip keeps
// it, and the session with it): nothing of B is
// reclaimed until well past the moment the grace would have ended, its
// containers keep running with their endpoints, and traffic between the
// hosts loses nothing.
func (c *chaos) partitionB(t *testing.T) {
	const scenario = "chaos-partition-b"
	ctx := t.Context()
	l := c.lab
	b := l.B
	start := time.Now()
	n := c.createNet(t, "chaos-part", "10.220.5.0/24")
	ipA := c.start(t, l.A, n, n.name+"-a")
	ipB := c.start(t, b, n, n.name+"-b")
	if _, err := c.waitConverged(t, n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := reaches(t, l.A, n.name+"-a", ipB, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	before, err := l.Endpoints(ctx, n.key)
	if err != nil {
		t.Fatal(err)
	}
	stBefore, err := b.Docker(ctx, "inspect", "-f", "{{.Id}} {{.State.StartedAt}}", n.name+"-b")
	if err != nil {
		t.Fatal(err)
	}
	cut := c.grace - 5*time.Second
	watch := c.grace + 30*time.Second // past when B would have been reaped
	pings := []*pingRun{
		startPing(ctx, l.A, n.name+"-a", ipB, watch),
		startPing(ctx, b, n.name+"-b", ipA, watch),
	}
	var rules [][]string
	for _, srv := range consulServers(l) {
		rules = append(rules, []string{"INPUT", "-s", srv, "-j", "DROP"}, []string{"OUTPUT", "-d", srv, "-j", "DROP"})
	}
	heal := func(ctx context.Context) {
		for _, r := range rules {
			b.Run(ctx, "iptables", append([]string{"-D"}, r...)...)
		}
	}
	t.Cleanup(func() { heal(context.Background()) })
	cutAt := time.Now()
	for _, r := range rules {
		if _, err := b.Run(ctx, "iptables", append([]string{"-I"}, r...)...); err != nil {
			t.Fatal(err)
		}
	}
	lostSession := false
	for time.Since(cutAt) < cut {
		if _, sess, ok, err := c.hostRecord(ctx, b.Node); err == nil && ok && sess == "" && !lostSession {
			lostSession = true
			t.Logf("%s's host record lost its session %s into the partition", b, time.Since(cutAt).Round(time.Second))
		}
		time.Sleep(time.Second)
	}
	heal(ctx)
	t.Logf("partition healed after %s (HOST_GRACE %s)", time.Since(cutAt).Round(100*time.Millisecond), c.grace)
	if !lostSession {
		t.Logf("%s's host record kept its session through the partition", b)
	}
	c.note(scenario, "cut %s, session lost: %t", cut, lostSession)
	// Until well past the grace: B's endpoint records stay all along.
	for time.Since(cutAt) < watch {
		after, err := l.Endpoints(ctx, n.key)
		if err == nil && !slices.Equal(after, before) {
			t.Errorf("endpoint records changed %s after the partition began: %v, were %v", time.Since(cutAt).Round(time.Second), after, before)
			break
		}
		time.Sleep(2 * time.Second)
	}
	if _, sess, ok, err := c.hostRecord(ctx, b.Node); err != nil || !ok || sess == "" {
		t.Errorf("%s's host record after the partition: present %t, session %q: %v", b, ok, sess, err)
	}
	stAfter, err := b.Docker(ctx, "inspect", "-f", "{{.Id}} {{.State.StartedAt}}", n.name+"-b")
	if err != nil || stAfter != stBefore {
		t.Errorf("%s: container changed across the partition: %q, was %q: %v", b, stAfter, stBefore, err)
	}
	if _, err := c.waitConverged(t, n, 30*time.Second); err != nil {
		t.Error(err)
	}
	c.pingsLost(t, scenario, true, pings...)
	c.finish(t, scenario, n, start)
}

// consulServers are the addresses of the lab's Consul servers.
func consulServers(l *Lab) []string {
	if os.Getenv("LAB_CONSUL_SERVERS") == "3" {
		return []string{l.ConsulServer.String(), "198.51.100.4", "198.51.100.5"}
	}
	return []string{l.ConsulServer.String()}
}

// hostBLost (4): host B dies: its containers, engine (with containerd and
// the plugin) and Consul agent killed, its underlay link down. After
// HOST_GRACE, the store, the catalog and host A's peers hold nothing of
// B, and B's addresses are free; host A's containers never lose a packet.
// B then comes back empty and serves again. It runs last: it restarts
// host B from nothing.
func (c *chaos) hostBLost(t *testing.T) {
	const scenario = "chaos-host-b-lost"
	ctx := t.Context()
	l := c.lab
	a, b := l.A, l.B
	start := time.Now()
	n := c.createNet(t, "chaos-lost", "10.220.4.0/24")
	c.start(t, a, n, n.name+"-a1")
	ipA2 := c.start(t, a, n, n.name+"-a2")
	ipB1 := c.start(t, b, n, n.name+"-b1", "-l", "SERVICE_NAME=chaos-lost-b")
	c.start(t, b, n, n.name+"-b2")
	if _, err := c.waitConverged(t, n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := reaches(t, a, n.name+"-a1", ipB1, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	bID, _, ok, err := c.hostRecord(ctx, b.Node)
	if err != nil || !ok {
		t.Fatalf("%s's host record: %t %v", b, ok, err)
	}
	window := c.grace + 40*time.Second
	pings := []*pingRun{startPing(ctx, a, n.name+"-a1", ipA2, window)}

	// The crash: containers first (their processes are in namespaces of
	// their own), then every process of B's namespace.
	var victims []int
	for _, name := range []string{n.name + "-b1", n.name + "-b2"} {
		if out, err := b.Docker(ctx, "inspect", "-f", "{{.State.Pid}}", name); err == nil {
			if pid, err := strconv.Atoi(out); err == nil && pid > 0 {
				victims = append(victims, pid)
			}
		}
	}
	inNS, err := pidsIn(b.NetNS, "")
	if err != nil {
		t.Fatal(err)
	}
	victims = append(victims, inNS...)
	killedAt := time.Now()
	for _, pid := range victims {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if _, err := b.Run(ctx, "ip", "link", "set", "ul0", "down"); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s lost: %d processes killed, underlay down", b, len(victims))
	healed := false
	heal := func(ctx context.Context) error {
		if healed {
			return nil
		}
		healed = true
		if _, err := b.Run(ctx, "ip", "link", "set", "ul0", "up"); err != nil {
			return err
		}
		if err := c.chaosScript(ctx, "consul", "start", b.Node); err != nil {
			return err
		}
		return c.chaosScript(ctx, "engine", "start", "b")
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if err := heal(ctx); err != nil {
			t.Errorf("bringing host B back: %v", err)
		}
	})

	// Reaped: no endpoint, membership or host record of B, no service of
	// B's node, B's addresses free, no FDB entry towards B on A.
	reaped := func(ctx context.Context) error {
		var errs []error
		eps, err := l.Endpoints(ctx, "")
		if err != nil {
			return err
		}
		for _, ep := range eps {
			if ep.Node == b.Node {
				errs = append(errs, fmt.Errorf("endpoint record %s of %s left", ep.Key, b.Node))
			}
		}
		keys, err := l.KVKeys(ctx)
		if err != nil {
			return err
		}
		for _, k := range keys {
			if strings.Contains(k, bID) {
				errs = append(errs, fmt.Errorf("key %s left", k))
			}
		}
		inst, err := l.Instances(ctx)
		if err != nil {
			return err
		}
		for _, i := range inst {
			if i.Node == b.Node {
				errs = append(errs, fmt.Errorf("service %s left", i))
			}
		}
		addrs, err := c.ipamAddrs(ctx, n.subnet)
		if err != nil {
			return err
		}
		if slices.Contains(addrs, ipB1.String()) {
			errs = append(errs, fmt.Errorf("address %s of B still held", ipB1))
		}
		fdb, err := a.RunData(ctx, "bridge", "fdb", "show", "dev", vxlan.VXLANName(n.vni))
		if err != nil {
			return err
		}
		if strings.Contains(fdb, "dst "+b.Addr.String()) {
			errs = append(errs, fmt.Errorf("A's FDB still points at B: %s", fdb))
		}
		return errors.Join(errs...)
	}
	if err := eventually(t, c.grace+90*time.Second, reaped); err != nil {
		t.Errorf("%s not reaped within HOST_GRACE + 90s: %v", b, err)
	} else {
		took := time.Since(killedAt)
		t.Logf("%s reaped %s after it was lost (HOST_GRACE %s)", b, took.Round(100*time.Millisecond), c.grace)
		c.note(scenario, "reaped after %s", took.Round(time.Second))
	}
	if reaped(ctx) == nil {
		// Had it been reaped too early, this would be the time to see it:
		// not before the grace.
		if time.Since(killedAt) < c.grace {
			t.Errorf("%s reaped after only %s, before HOST_GRACE %s", b, time.Since(killedAt), c.grace)
		}
	}
	c.pingsLost(t, scenario, true, pings...)

	// B comes back with nothing running and serves again.
	backAt := time.Now()
	if err := heal(ctx); err != nil {
		t.Fatal(err)
	}
	if err := pluginBack(t, b, 0, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	// Its memberships were reaped: its Docker network is bound to nothing
	// any more, and is made again (what README tells the operator).
	b.Docker(ctx, "rm", "-f", n.name+"-b1", n.name+"-b2")
	err = eventually(t, 60*time.Second, func(ctx context.Context) error {
		b.Docker(ctx, "network", "rm", n.name)
		_, err := b.Docker(ctx, "network", "create", "-d", l.Plugin, "--ipam-driver", l.Plugin,
			"--subnet", n.subnet, "-o", "name="+n.name, "--label", l.Label, n.name)
		return err
	})
	if err != nil {
		t.Fatalf("%s: network %s made again after it came back: %v", b, n.name, err)
	}
	var ipB3 netip.Addr
	err = eventually(t, 60*time.Second, func(ctx context.Context) error {
		name := n.name + "-b3"
		if _, err := b.Docker(ctx, c.runArgs(n, name)...); err != nil {
			b.Docker(ctx, "rm", "-f", name)
			return err
		}
		ipB3, _, err = b.ContainerAddr(ctx, name, n.name)
		return err
	})
	if err != nil {
		t.Fatalf("%s serves no new container after it came back: %v", b, err)
	}
	if err := reaches(t, a, n.name+"-a1", ipB3, 30*time.Second); err != nil {
		t.Errorf("A → B's new container %s: %v", ipB3, err)
	}
	t.Logf("%s back and serving in %s", b, time.Since(backAt).Round(100*time.Millisecond))
	if _, err := c.waitConverged(t, n, 60*time.Second); err != nil {
		t.Error(err)
	}
	c.finish(t, scenario, n, start)
}

// engineRestartAlways (6): both engines restarted with containers set to
// --restart always (one with a fixed address and a service on each
// host): they come back on the overlay with their addresses and services,
// and reach each other.
func (c *chaos) engineRestartAlways(t *testing.T) {
	const scenario = "chaos-engine-restart"
	ctx := t.Context()
	l := c.lab
	start := time.Now()
	n := c.createNet(t, "chaos-rs", "10.220.6.0/24")
	fixed := map[*Host]netip.Addr{}
	for i, h := range l.Hosts() {
		fixed[h] = netip.MustParseAddr(fmt.Sprintf("10.220.6.%d", 10+i))
		hn := strings.ToLower(h.Name)
		c.start(t, h, n, n.name+"-fixed-"+hn, "--restart", "always", "--ip", fixed[h].String(), "-l", "SERVICE_NAME=chaos-rs-"+hn)
		c.start(t, h, n, n.name+"-dyn-"+hn, "--restart", "always")
	}
	if _, err := c.waitConverged(t, n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	restartAt := time.Now()
	for _, h := range l.Hosts() {
		hn := strings.ToLower(h.Name)
		if err := c.chaosScript(ctx, "engine", "stop", hn); err != nil {
			t.Fatal(err)
		}
		if err := c.chaosScript(ctx, "engine", "start", hn); err != nil {
			t.Fatal(err)
		}
		err := eventually(t, 90*time.Second, func(ctx context.Context) error {
			for _, name := range []string{n.name + "-fixed-" + hn, n.name + "-dyn-" + hn} {
				st, err := h.Docker(ctx, "inspect", "-f", "{{.State.Status}}", name)
				if err != nil || st != "running" {
					return fmt.Errorf("%s: %s is %q: %v", h, name, st, err)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		ip, _, err := h.ContainerAddr(ctx, n.name+"-fixed-"+hn, n.name)
		if err != nil || ip != fixed[h] {
			t.Errorf("%s: fixed container came back with %s, want %s: %v", h, ip, fixed[h], err)
		}
	}
	t.Logf("both engines restarted, containers running in %s", time.Since(restartAt).Round(100*time.Millisecond))
	if took, err := c.waitConverged(t, n, 60*time.Second); err != nil {
		t.Error(err)
	} else {
		c.note(scenario, "converged %s after the restarts", took.Round(time.Second))
	}
	err := eventually(t, 60*time.Second, func(ctx context.Context) error {
		inst, err := l.Instances(ctx)
		if err != nil {
			return err
		}
		var errs []error
		for _, h := range l.Hosts() {
			svc := "chaos-rs-" + strings.ToLower(h.Name)
			var got []string
			for _, i := range inst {
				if i.ServiceName == svc {
					got = append(got, i.Node+"@"+i.ServiceAddress)
				}
			}
			if want := []string{h.Node + "@" + fixed[h].String()}; !slices.Equal(got, want) {
				errs = append(errs, fmt.Errorf("service %s: %v, want %v", svc, got, want))
			}
		}
		return errors.Join(errs...)
	})
	if err != nil {
		t.Error(err)
	}
	for _, h := range l.Hosts() {
		other := l.Other(h)
		src := n.name + "-dyn-" + strings.ToLower(h.Name)
		if err := reaches(t, h, src, fixed[other], 75*time.Second); err != nil {
			t.Errorf("%s → %s %s after the restarts: %v", h, other, fixed[other], err)
		}
	}
	c.note(scenario, "packets: n/a (containers restart with their engine)")
	c.finish(t, scenario, n, start)
}

// fuzzSocket (7): malformed and out-of-order calls on host B's plugin
// socket for a bounded time. Every reply is JSON: a success, or an error
// with a non-empty Err; the plugin never panics (recovered panics show as
// "internal error") nor restarts; and as no call is one that may succeed
// with an effect, the store and B's kernel show no change at all.
func (c *chaos) fuzzSocket(t *testing.T) {
	const scenario = "chaos-fuzz-socket"
	ctx := t.Context()
	l := c.lab
	b := l.B
	start := time.Now()
	n := c.createNet(t, "chaos-fuzz", "10.220.7.0/24")
	// A container on A too: A's VTEP is then a peer of B for the whole
	// scenario. Without one, B's allowlist drops A's VTEP
	// PEER_RESYNC_INTERVAL after the previous scenario's last container on
	// A left, which a CI run saw land inside the fuzzing window.
	c.start(t, l.A, n, n.name+"-a")
	c.start(t, b, n, n.name+"-b")
	if _, err := c.waitConverged(t, n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	netID, err := b.Docker(ctx, "network", "inspect", "-f", "{{.Id}}", n.name)
	if err != nil {
		t.Fatal(err)
	}
	plugID, err := b.Docker(ctx, "plugin", "inspect", "-f", "{{.Id}}", l.Plugin)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join("/run/docker/plugins", plugID, "consul-overlay.sock")
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	snapshot := func(ctx context.Context) (map[string]string, error) {
		var entries []kvEntry
		if err := l.consulGet(ctx, "/v1/kv/"+kvPrefix+"?recurse", &entries); err != nil {
			return nil, err
		}
		m := map[string]string{}
		for _, e := range entries {
			k := strings.TrimPrefix(e.Key, kvPrefix)
			if strings.HasPrefix(k, "hosts/") || strings.HasPrefix(k, "hosts-lost/") {
				continue // liveness, not state calls change
			}
			m["kv "+k] = string(e.Value)
		}
		// The host's namespace, and the data-plane namespace's bridges,
		// VXLAN devices and ports when the plugin has one.
		type where struct {
			tag string
			run func(ctx context.Context, name string, args ...string) (string, error)
		}
		places := []where{{"", b.Run}}
		if b.DataNS != "" {
			places = append(places, where{"data ", b.RunData})
		}
		for _, w := range places {
			links, err := w.run(ctx, "ip", "-d", "-o", "link", "show")
			if err != nil {
				return nil, err
			}
			for _, line := range strings.Split(links, "\n") {
				f := strings.Fields(line)
				if len(f) > 1 {
					name := strings.TrimSuffix(f[1], ":")
					// Bridge and port timers tick; the rest is the link.
					m[w.tag+"link "+name] = linkTimers.ReplaceAllString(strings.Join(f[2:], " "), "")
				}
			}
			for _, argv := range [][]string{{"bridge", "fdb", "show"}, {"ip", "neigh", "show", "nud", "permanent"}, {"iptables-save"}} {
				out, err := w.run(ctx, argv[0], argv[1:]...)
				if err != nil {
					return nil, err
				}
				for _, line := range strings.Split(out, "\n") {
					if strings.HasPrefix(line, "#") || strings.HasPrefix(line, ":") {
						continue // iptables-save's comments and counters
					}
					if argv[0] == "bridge" && strings.Contains(line, " master ") &&
						!strings.Contains(line, " permanent") && !strings.Contains(line, " static") {
						continue // learned by a bridge from traffic, and aged out
					}
					m[w.tag+argv[0]+" "+line] = ""
				}
			}
		}
		return m, nil
	}
	before, err := snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pid := pluginPID(b)

	rnd := rand.New(&lockedSource{src: rand.NewPCG(uint64(time.Now().UnixNano()), 12)})
	randID := func() string {
		const hex = "0123456789abcdef"
		var sb strings.Builder
		for range 64 {
			sb.WriteByte(hex[rnd.IntN(16)])
		}
		return sb.String()
	}
	junk := func() any {
		switch rnd.IntN(8) {
		case 0:
			return nil
		case 1:
			return rnd.IntN(1 << 20)
		case 2:
			return strings.Repeat("x", rnd.IntN(5000))
		case 3:
			return []any{1, "a", nil}
		case 4:
			return map[string]any{"a": map[string]any{"b": []any{}}}
		case 5:
			return "10.220.7.300/24"
		case 6:
			return "::1/129"
		default:
			return "\x00\xff"
		}
	}
	badPool := func() any {
		bad := []any{"10.220.7.300/24", "::1/129", "10.0.0.0/33", "pool", "\x00\xff", 12, []any{"10.9.0.0/16"}, map[string]any{"a": 1}}
		return bad[rnd.IntN(len(bad))]
	}
	// Every body below fails, or succeeds without an effect (an unknown
	// ID deleted, released or left): none names a real object in a call
	// that could change it.
	type call struct {
		path string
		body func() any
	}
	calls := []call{
		{"/Plugin.Activate", func() any { return junk() }},
		{"/NetworkDriver.GetCapabilities", func() any { return junk() }},
		{"/NetworkDriver.CreateNetwork", func() any {
			return map[string]any{"NetworkID": randID(), "Options": junk(), "IPv4Data": []any{map[string]any{"Pool": junk(), "Gateway": junk()}}}
		}},
		{"/NetworkDriver.CreateNetwork", func() any { return map[string]any{"NetworkID": junk(), "IPv4Data": junk()} }},
		{"/NetworkDriver.DeleteNetwork", func() any { return map[string]any{"NetworkID": randID()} }},
		{"/NetworkDriver.CreateEndpoint", func() any {
			return map[string]any{"NetworkID": randID(), "EndpointID": randID(), "Interface": map[string]any{"Address": "10.220.7.77/24"}}
		}},
		{"/NetworkDriver.CreateEndpoint", func() any {
			return map[string]any{"NetworkID": netID, "EndpointID": randID(), "Interface": map[string]any{"Address": junk(), "MacAddress": junk()}}
		}},
		{"/NetworkDriver.DeleteEndpoint", func() any { return map[string]any{"NetworkID": netID, "EndpointID": randID()} }},
		{"/NetworkDriver.EndpointOperInfo", func() any { return map[string]any{"NetworkID": netID, "EndpointID": randID()} }},
		{"/NetworkDriver.Join", func() any {
			return map[string]any{"NetworkID": netID, "EndpointID": randID(), "SandboxKey": "/var/run/docker/netns/" + randID()[:12]}
		}},
		{"/NetworkDriver.Join", func() any { return map[string]any{"NetworkID": randID(), "EndpointID": junk()} }},
		{"/NetworkDriver.Leave", func() any { return map[string]any{"NetworkID": netID, "EndpointID": randID()} }},
		{"/NetworkDriver.DiscoverNew", func() any { return map[string]any{"DiscoveryType": junk(), "DiscoveryData": junk()} }},
		{"/NetworkDriver.ProgramExternalConnectivity", func() any {
			return map[string]any{"NetworkID": randID(), "EndpointID": randID(), "Options": junk()}
		}},
		{"/NetworkDriver.RevokeExternalConnectivity", func() any { return map[string]any{"NetworkID": randID(), "EndpointID": randID()} }},
		{"/NetworkDriver.AllocateNetwork", func() any { return map[string]any{"NetworkID": randID(), "Options": junk()} }},
		{"/NetworkDriver.FreeNetwork", func() any { return map[string]any{"NetworkID": randID()} }},
		{"/IpamDriver.GetCapabilities", func() any { return junk() }},
		{"/IpamDriver.GetDefaultAddressSpaces", func() any { return junk() }},
		// A request without a pool is a valid request for a default one:
		// the pool is always there and never valid.
		{"/IpamDriver.RequestPool", func() any {
			return map[string]any{"AddressSpace": junk(), "Pool": badPool(), "SubPool": junk(), "Options": junk(), "V6": rnd.IntN(2) == 0}
		}},
		{"/IpamDriver.ReleasePool", func() any { return map[string]any{"PoolID": randID()} }},
		{"/IpamDriver.ReleasePool", func() any { return map[string]any{"PoolID": junk()} }},
		{"/IpamDriver.RequestAddress", func() any { return map[string]any{"PoolID": randID(), "Address": junk(), "Options": junk()} }},
		{"/IpamDriver.ReleaseAddress", func() any { return map[string]any{"PoolID": randID(), "Address": "10.220.7.2"} }},
	}
	malformed := func() []byte {
		switch rnd.IntN(5) {
		case 0:
			b := make([]byte, rnd.IntN(300))
			for i := range b {
				b[i] = byte(rnd.IntN(256))
			}
			return b
		case 1:
			return []byte(`{"NetworkID": "`)
		case 2:
			return []byte(`[]`)
		case 3:
			return []byte(`{"NetworkID": 12, "EndpointID": {"x": 1}, "Interface": "eth0"}`)
		default:
			return nil
		}
	}
	type tally struct{ ok, failed int }
	var mu sync.Mutex
	counts := map[string]*tally{}
	var bad []string
	deadline := time.Now().Add(20 * time.Second)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) && ctx.Err() == nil {
				cl := calls[rnd.IntN(len(calls))]
				var body []byte
				if rnd.IntN(3) == 0 {
					body = malformed()
					if cl.path == "/IpamDriver.RequestPool" {
						// A body without a valid Pool field (empty, or
						// only unknown fields) asks for a default pool.
						body = [][]byte{[]byte(`{"Pool": 7}`), []byte(`[]`), []byte(`{"Pool": "`)}[rnd.IntN(3)]
					}
				} else {
					body, _ = json.Marshal(cl.body())
				}
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://plugin"+cl.path, bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/vnd.docker.plugins.v1.2+json")
				resp, err := client.Do(req)
				var problem string
				okCall := false
				if err != nil {
					problem = fmt.Sprintf("%s: no answer: %v", cl.path, err)
				} else {
					raw, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					var reply map[string]any
					jerr := json.Unmarshal(raw, &reply)
					errText, _ := reply["Err"].(string)
					switch {
					case jerr != nil:
						problem = fmt.Sprintf("%s: %s, not JSON: %q", cl.path, resp.Status, raw)
					case strings.Contains(errText, "internal error") || strings.Contains(errText, "panic"):
						problem = fmt.Sprintf("%s: panic: %s (body %.200q)", cl.path, errText, body)
					case resp.StatusCode == http.StatusOK && errText == "":
						okCall = true
					case resp.StatusCode != http.StatusOK && errText != "":
					default:
						problem = fmt.Sprintf("%s: %s with Err %q", cl.path, resp.Status, errText)
					}
				}
				mu.Lock()
				tl := counts[cl.path]
				if tl == nil {
					tl = &tally{}
					counts[cl.path] = tl
				}
				if okCall {
					tl.ok++
				} else {
					tl.failed++
				}
				if problem != "" && len(bad) < 20 {
					bad = append(bad, problem)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	total, oks := 0, 0
	var per []string
	for p, tl := range counts {
		total += tl.ok + tl.failed
		oks += tl.ok
		per = append(per, fmt.Sprintf("%s %d ok %d failed", strings.TrimPrefix(p, "/"), tl.ok, tl.failed))
	}
	slices.Sort(per)
	t.Logf("%d calls in 20s: %s", total, strings.Join(per, ", "))
	for _, p := range bad {
		t.Error(p)
	}
	if p := pluginPID(b); p != pid {
		t.Errorf("%s: the plugin restarted during the fuzzing (pid %d, was %d)", b, p, pid)
	}
	after, err := snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var changed []string
	for k, v := range after {
		if w, ok := before[k]; !ok {
			changed = append(changed, "new: "+k)
		} else if w != v {
			changed = append(changed, "changed: "+k)
		}
	}
	for k := range before {
		if _, ok := after[k]; !ok {
			changed = append(changed, "gone: "+k)
		}
	}
	slices.Sort(changed)
	if len(changed) > 0 {
		t.Errorf("the fuzzed calls changed the store or B's kernel:\n%s", strings.Join(changed, "\n"))
	}
	c.note(scenario, "%d calls, %d ok, %d refused, %d state changes", total, oks, total-oks, len(changed))
	if _, err := c.waitConverged(t, n, 10*time.Second); err != nil {
		t.Error(err)
	}
	c.finish(t, scenario, n, start)
}

// lockedSource lets the fuzzer's goroutines share one random source.
type lockedSource struct {
	mu  sync.Mutex
	src rand.Source
}

func (l *lockedSource) Uint64() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.src.Uint64()
}
