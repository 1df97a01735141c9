//go:build e2e

package e2e

// Networks created once, used everywhere (issue 13): a network created
// without -o name on one host exists on every host.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/internal/dockertest"
	"consul-overlay/kvstore"
)

// onceFacts is what `docker network inspect` must show alike on every host.
const onceFacts = `{{.Driver}} {{.IPAM.Driver}} internal={{.Internal}} attachable={{.Attachable}} ipv6={{.EnableIPv6}} ` +
	`opts={{json .Options}} labels={{json .Labels}} ipam={{json .IPAM.Config}}`

// onceSpec reads the cluster-wide network name from KV; found is false when
// there is none.
func (l *Lab) onceSpec(ctx context.Context, name string) (sp cluster.Spec, found bool, err error) {
	var entries []kvEntry
	err = l.consulGet(ctx, "/v1/kv/"+kvPrefix+cluster.SpecsPrefix+name, &entries)
	if errors.Is(err, errNotFound) {
		return sp, false, nil
	}
	if err != nil || len(entries) == 0 {
		return sp, false, err
	}
	return sp, true, kvstore.Decode(entries[0].Value, &sp)
}

// onceGone checks that no host has network name and that KV holds nothing
// of it: no spec, no logical network, no subnet reservation.
func (s *suite) onceGone(ctx context.Context, name, subnet string) error {
	l := s.lab
	for _, h := range l.Hosts() {
		if out, err := h.Docker(ctx, "network", "ls", "-q", "-f", "name=^"+name+"$"); err != nil || out != "" {
			return fmt.Errorf("%s still has network %s (%q, %v)", h, name, out, err)
		}
	}
	keys, err := l.KVKeys(ctx)
	if err != nil {
		return err
	}
	sub := strings.NewReplacer("/", "_").Replace(subnet)
	var left []string
	for _, k := range keys {
		if k == cluster.SpecsPrefix+name || strings.Contains(k, sub) {
			left = append(left, k)
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("KV keys of network %s left: %v", name, left)
	}
	return nil
}

// waitNetwork waits until h has network name and returns how long that took.
func waitNetwork(ctx context.Context, h *Host, name string, within time.Duration) (time.Duration, error) {
	start := time.Now()
	for {
		out, err := h.Docker(ctx, "network", "ls", "-q", "-f", "name=^"+name+"$")
		if err == nil && out != "" {
			return time.Since(start), nil
		}
		if time.Since(start) > within {
			return time.Since(start), fmt.Errorf("%s: network %s not there after %s (%v)", h, name, within, err)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// sameFacts checks that both hosts show network name alike.
func (s *suite) sameFacts(ctx context.Context, name string) error {
	facts := map[*Host]string{}
	for _, h := range s.lab.Hosts() {
		f, err := h.Docker(ctx, "network", "inspect", "-f", onceFacts, name)
		if err != nil {
			return err
		}
		facts[h] = f
	}
	if facts[s.lab.A] != facts[s.lab.B] {
		return fmt.Errorf("network %s differs:\n  %s: %s\n  %s: %s", name, s.lab.A, facts[s.lab.A], s.lab.B, facts[s.lab.B])
	}
	return nil
}

// onceCleanup removes what a once scenario may leave.
func (s *suite) onceCleanup(t *testing.T, containers map[*Host][]string, nets ...string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		for _, h := range s.lab.Hosts() {
			if cs := containers[h]; len(cs) > 0 {
				h.Docker(ctx, append([]string{"rm", "-f"}, cs...)...)
			}
			for _, n := range nets {
				h.Docker(ctx, "network", "rm", n)
			}
		}
	})
}

// onceCreateRm: a network created on A is on B within moments, with the
// same settings, usable at once; containers on both reach each other. rm on
// B while A's containers use it: gone from B (for good), A's containers keep
// reaching each other; once A's last container leaves, nothing is left.
func (s *suite) onceCreateRm(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	name := dockertest.UniqueName("colab-once-")
	const subnet = "10.214.0.0/24"
	s.onceCleanup(t, map[*Host][]string{l.A: {name + "-a1", name + "-a2"}, l.B: {name + "-b"}}, name)

	if _, err := l.A.Docker(ctx, "network", "create", "-d", l.Plugin, "--ipam-driver", l.Plugin,
		"--subnet", subnet, "--ip-range", "10.214.0.128/25", "--attachable", "-o", "register=false",
		"--label", l.Label, "--label", "once=create", name); err != nil {
		t.Fatal(err)
	}
	// The outcome is asserted, not the speed (a loaded CI machine took
	// 2.07 s once; typical is 0.5-1 s): the time goes to the summary.
	took, err := waitNetwork(ctx, l.B, name, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	s.notes["once-create-rm"] = fmt.Sprintf("on B %s after create on A", took.Round(time.Millisecond))
	t.Logf("network %s created on A is on B after %s", name, took.Round(time.Millisecond))
	// Usable at once on B.
	if _, err := l.B.Docker(ctx, "run", "-d", "--name", name+"-b", "--label", l.Label, "--network", name, l.Image, "sleep", "3600"); err != nil {
		t.Fatal(err)
	}
	if err := s.sameFacts(ctx, name); err != nil {
		t.Error(err)
	}
	for _, c := range []string{name + "-a1", name + "-a2"} {
		if _, err := l.A.Docker(ctx, "run", "-d", "--name", c, "--label", l.Label, "--network", name, l.Image, "sleep", "3600"); err != nil {
			t.Fatal(err)
		}
	}
	a1, _, err := l.A.ContainerAddr(ctx, name+"-a1", name)
	if err != nil {
		t.Fatal(err)
	}
	a2, _, err := l.A.ContainerAddr(ctx, name+"-a2", name)
	if err != nil {
		t.Fatal(err)
	}
	b, _, err := l.B.ContainerAddr(ctx, name+"-b", name)
	if err != nil {
		t.Fatal(err)
	}
	if err := ping(t, l.A, name+"-a1", b); err != nil {
		t.Errorf("A → B %s: %v", b, err)
	}
	if err := ping(t, l.B, name+"-b", a1); err != nil {
		t.Errorf("B → A %s: %v", a1, err)
	}

	// A third engine, started now, gets it too.
	c, err := s.startHostC(t)
	if err != nil {
		t.Fatal(err)
	}
	tookC, err := waitNetwork(ctx, c, name, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	s.notes["once-create-rm"] += fmt.Sprintf(", on a new host C %s after its plugin was enabled", tookC.Round(time.Millisecond))
	t.Logf("network %s on host C %s after its plugin was enabled", name, tookC.Round(time.Millisecond))
	if fc, err := c.Docker(ctx, "network", "inspect", "-f", onceFacts, name); err != nil {
		t.Error(err)
	} else if fa, _ := l.A.Docker(ctx, "network", "inspect", "-f", onceFacts, name); fc != fa {
		t.Errorf("network %s on host C: %s, on A: %s", name, fc, fa)
	}

	// rm on B (its container gone first).
	if _, err := l.B.Docker(ctx, "rm", "-f", name+"-b"); err != nil {
		t.Fatal(err)
	}
	if _, err := l.B.Docker(ctx, "network", "rm", name); err != nil {
		t.Fatalf("network rm on B: %v", err)
	}
	err = eventually(t, 10*time.Second, func(ctx context.Context) error {
		sp, found, err := l.onceSpec(ctx, name)
		if err != nil {
			return err
		}
		if !found || !sp.Retired {
			return fmt.Errorf("spec of %s not retired (found %v)", name, found)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
	// A keeps it while its containers use it; they keep reaching each
	// other; B does not get it back.
	time.Sleep(2 * time.Second)
	if out, _ := l.B.Docker(ctx, "network", "ls", "-q", "-f", "name=^"+name+"$"); out != "" {
		t.Errorf("%s: network %s came back after rm", l.B, name)
	}
	for i := 0; i < 3; i++ {
		if _, err := l.A.InContainer(ctx, name+"-a1", "ping", "-c", "1", "-W", "2", a2.String()); err != nil {
			t.Errorf("A's containers lost each other after rm on B: %v", err)
			break
		}
	}
	// A's last container leaves: nothing left anywhere.
	if _, err := l.A.Docker(ctx, "rm", "-f", name+"-a1", name+"-a2"); err != nil {
		t.Fatal(err)
	}
	if err := eventually(t, 20*time.Second, func(ctx context.Context) error {
		if out, err := c.Docker(ctx, "network", "ls", "-q", "-f", "name=^"+name+"$"); err != nil || out != "" {
			return fmt.Errorf("%s still has network %s (%q, %v)", c, name, out, err)
		}
		return s.onceGone(ctx, name, subnet)
	}); err != nil {
		t.Error(err)
	}
}

// startHostC starts the lab's third engine with the plugin
// (lab/engine-c.sh); it is stopped, and its records evicted, when the test
// ends.
func (s *suite) startHostC(t *testing.T) (*Host, error) {
	l := s.lab
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := l.Script(ctx, "engine-c.sh", "stop"); err != nil {
			t.Error(err)
		}
	})
	if err := l.Script(t.Context(), "engine-c.sh", "start"); err != nil {
		return nil, err
	}
	ns := strings.TrimSuffix(l.NSSwitch, "-sw") + "-h3"
	return &Host{Name: "C", Node: "lab-h3", NetNS: ns, Socket: "unix://" + filepath.Join(l.State, "h3", "docker.sock")}, nil
}

// onceConflict: A and B create one name with other subnets at the same
// time: one network on both hosts, the loser's half removed, one conflict
// recorded (and logged at error by the loser's plugin).
func (s *suite) onceConflict(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	name := dockertest.UniqueName("colab-once-")
	subnets := map[*Host]string{l.A: "10.217.0.0/24", l.B: "10.218.0.0/24"}
	s.onceCleanup(t, nil, name)
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, h := range l.Hosts() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = h.Docker(ctx, "network", "create", "-d", l.Plugin, "--ipam-driver", l.Plugin,
				"--subnet", subnets[h], "--label", l.Label, name)
		}()
	}
	wg.Wait()
	t.Logf("create on A: %v; on B: %v", errs[0], errs[1])
	// When one host's network reached the other before its own create,
	// Docker refuses that create by name ("already exists"): the race is
	// decided before the plugin sees it, and no conflict is recorded.
	refused := -1
	for i, err := range errs {
		switch {
		case err == nil:
		case strings.Contains(err.Error(), "already exists") && refused < 0:
			refused = i
		default:
			t.Fatalf("create on %s: %v", l.Hosts()[i], err)
		}
	}
	wantConflicts := 1
	if refused >= 0 {
		wantConflicts = 0
	}
	var sp cluster.Spec
	err := eventually(t, 15*time.Second, func(ctx context.Context) error {
		var found bool
		var err error
		if sp, found, err = l.onceSpec(ctx, name); err != nil || !found {
			return fmt.Errorf("no spec of %s (%v)", name, err)
		}
		if len(sp.IPAM) != 1 {
			return fmt.Errorf("spec IPAM %v", sp.IPAM)
		}
		for _, h := range l.Hosts() {
			got, err := h.Docker(ctx, "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}}{{end}}", name)
			if err != nil || got != sp.IPAM[0].Subnet {
				return fmt.Errorf("%s: network %s subnet %q (%v), want the winner's %s", h, name, got, err, sp.IPAM[0].Subnet)
			}
		}
		if refused >= 0 {
			if winner := subnets[l.Hosts()[1-refused]]; sp.IPAM[0].Subnet != winner {
				return fmt.Errorf("spec subnet %s, want %s (the create Docker did not refuse)", sp.IPAM[0].Subnet, winner)
			}
		}
		if len(sp.Conflicts) != wantConflicts {
			return fmt.Errorf("conflicts recorded %+v, want %d", sp.Conflicts, wantConflicts)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if refused >= 0 {
		t.Logf("%s's create was refused by Docker (the network had reached it first): one network, %s, on both hosts, no conflict",
			l.Hosts()[refused], sp.IPAM[0].Subnet)
		return
	}
	c := sp.Conflicts[0]
	t.Logf("winner %s (%s); conflict: %+v", sp.OriginNode, sp.Settings(), c)
	if c.Node == sp.OriginNode {
		t.Errorf("the winner %s recorded the conflict", c.Node)
	}
	loser := l.A
	if c.Node == l.B.Node {
		loser = l.B
	}
	if !strings.Contains(c.Settings, subnets[loser]) {
		t.Errorf("conflict settings %q do not name the loser's subnet %s", c.Settings, subnets[loser])
	}
	// The loser's plugin logged it at error, naming the network.
	logf := pluginLogFile(l, loser)
	if out, err := run(ctx, nil, "grep", "-c", "conflicts with the cluster's network.*network="+name, logf); err != nil {
		t.Errorf("%s: no error line about the conflict in %s: %v", loser, logf, err)
	} else {
		t.Logf("%s logged the conflict (%s lines)", loser, out)
	}
	// `consul-overlay status` on the loser shows it (run on the host with
	// the settings that say where the plugin's data plane is).
	out, err := loser.Run(ctx, "env", slices.Concat([]string{fmt.Sprintf("CONSUL_HTTP_ADDR=127.0.0.1:%d", l.HTTPPort),
		"DATA_DIR=" + filepath.Join(l.Data, strings.ToLower(loser.Name), "plugin-data")}, loser.PluginEnv,
		[]string{filepath.Join(l.Root, "bin", "consul-overlay"), "status"})...)
	if want := "CONFLICT: host " + loser.Node; err != nil || !strings.Contains(out, want) {
		t.Errorf("%s: consul-overlay status does not say %q (%v):\n%s", loser, want, err, out)
	}
	// Nothing of the losing subnet is left.
	lost := subnets[loser]
	if err := eventually(t, 10*time.Second, func(ctx context.Context) error {
		keys, err := l.KVKeys(ctx)
		if err != nil {
			return err
		}
		for _, k := range keys {
			if strings.Contains(k, strings.ReplaceAll(lost, "/", "_")) {
				return fmt.Errorf("KV key %s of the losing subnet left", k)
			}
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if _, err := l.A.Docker(ctx, "network", "rm", name); err != nil {
		t.Fatal(err)
	}
	if err := eventually(t, 15*time.Second, func(ctx context.Context) error {
		return s.onceGone(ctx, name, sp.IPAM[0].Subnet)
	}); err != nil {
		t.Error(err)
	}
}

// onceCompose: one Compose project up on A and on B shares one network;
// down on A leaves B running; down on B removes it everywhere. Then
// external: true on both hosts for a network created on A.
func (s *suite) onceCompose(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	file, err := filepath.Abs("testdata/once-compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	const net, subnet = "colab-once_app", "10.216.0.0/24"
	const ctr = "colab-once-app-1"
	s.onceCleanup(t, map[*Host][]string{l.A: {ctr}, l.B: {ctr}}, net)
	start := time.Now()
	if out, err := l.A.Compose(ctx, file, nil, "up", "-d"); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("%s: compose up:\n%s", l.A, out)
	}
	took, err := waitNetwork(ctx, l.B, net, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("compose network on B %s after up on A", took.Round(time.Millisecond))
	out, err := l.B.Compose(ctx, file, nil, "up", "-d")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: compose up:\n%s", l.B, out)
	for _, bad := range []string{"recreate", "incorrect label", "not created by compose", "Network " + net + "  Creat"} {
		if strings.Contains(out, bad) {
			t.Errorf("%s: compose up says %q", l.B, bad)
		}
	}
	if err := s.sameFacts(ctx, net); err != nil {
		t.Error(err)
	}
	ipA, _, err := l.A.ContainerAddr(ctx, ctr, net)
	if err != nil {
		t.Fatal(err)
	}
	ipB, _, err := l.B.ContainerAddr(ctx, ctr, net)
	if err != nil {
		t.Fatal(err)
	}
	if err := ping(t, l.B, ctr, ipA); err != nil {
		t.Errorf("B → A %s: %v", ipA, err)
	}
	t.Logf("up on both hosts, pinged, after %s", time.Since(start).Round(time.Millisecond))
	if out, err := l.A.Compose(ctx, file, nil, "down"); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("%s: compose down:\n%s", l.A, out)
	}
	time.Sleep(2 * time.Second)
	if st, err := l.B.Docker(ctx, "inspect", "-f", "{{.State.Status}}", ctr); err != nil || st != "running" {
		t.Errorf("%s: %s after down on A: %q %v", l.B, ctr, st, err)
	}
	if _, err := l.B.Docker(ctx, "network", "inspect", net); err != nil {
		t.Errorf("%s: network gone after down on A: %v", l.B, err)
	}
	if out, err := l.B.Compose(ctx, file, nil, "down"); err != nil {
		t.Error(err)
	} else {
		t.Logf("%s: compose down:\n%s", l.B, out)
	}
	if err := eventually(t, 15*time.Second, func(ctx context.Context) error { return s.onceGone(ctx, net, subnet) }); err != nil {
		t.Error(err)
	}
	_ = ipB
	t.Logf("down on both hosts, all gone, after %s", time.Since(start).Round(time.Millisecond))

	// external: true, on both hosts, for a network created once on A.
	ext, err := filepath.Abs("testdata/once-external.yaml")
	if err != nil {
		t.Fatal(err)
	}
	name := dockertest.UniqueName("colab-once-")
	const extSubnet = "10.219.0.0/24"
	const extCtr = "colab-once-ext-app-1"
	s.onceCleanup(t, map[*Host][]string{l.A: {extCtr}, l.B: {extCtr}}, name)
	if _, err := l.A.Docker(ctx, "network", "create", "-d", l.Plugin, "--ipam-driver", l.Plugin,
		"--subnet", extSubnet, "--label", l.Label, name); err != nil {
		t.Fatal(err)
	}
	if _, err := waitNetwork(ctx, l.B, name, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	env := []string{"ONCE_NET=" + name}
	for _, h := range l.Hosts() {
		if out, err := h.Compose(ctx, ext, env, "up", "-d"); err != nil {
			t.Fatalf("%s: external: %v\n%s", h, err, out)
		}
	}
	for _, h := range l.Hosts() {
		if st, err := h.Docker(ctx, "inspect", "-f", "{{.State.Status}}", extCtr); err != nil || st != "running" {
			t.Errorf("%s: external: %s %q %v", h, extCtr, st, err)
		}
	}
	t.Logf("external: up on both hosts after %s", time.Since(start).Round(time.Millisecond))
	for _, h := range l.Hosts() {
		if out, err := h.Compose(ctx, ext, env, "down"); err != nil {
			t.Errorf("%s: %v\n%s", h, err, out)
		}
	}
	if _, err := l.B.Docker(ctx, "network", "rm", name); err != nil {
		t.Fatal(err)
	}
	if err := eventually(t, 15*time.Second, func(ctx context.Context) error { return s.onceGone(ctx, name, extSubnet) }); err != nil {
		t.Error(err)
	}
}

// onceEngineRestart: networks created on A while B's engine is down are
// on B once it is back; removed on A they go from B too.
func (s *suite) onceEngineRestart(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	names := []string{dockertest.UniqueName("colab-once-"), dockertest.UniqueName("colab-once-")}
	subnets := []string{"10.215.1.0/24", "10.215.2.0/24"}
	s.onceCleanup(t, nil, names...)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		l.Script(ctx, "engine-b.sh", "start")
	})
	if err := l.Script(ctx, "engine-b.sh", "stop"); err != nil {
		t.Fatal(err)
	}
	for i, n := range names {
		if _, err := l.A.Docker(ctx, "network", "create", "-d", l.Plugin, "--ipam-driver", l.Plugin,
			"--subnet", subnets[i], "--label", l.Label, n); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Script(ctx, "engine-b.sh", "start"); err != nil {
		t.Fatal(err)
	}
	err := eventually(t, 60*time.Second, func(ctx context.Context) error {
		en, err := l.B.Docker(ctx, "plugin", "inspect", "-f", "{{.Enabled}}", l.Plugin)
		if err != nil || en != "true" {
			return fmt.Errorf("%s: plugin enabled %q (%v)", l.B, en, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for _, n := range names {
		if _, err := waitNetwork(ctx, l.B, n, 20*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	s.notes["once-engine-restart"] = fmt.Sprintf("on B %s after its engine answered", took.Round(time.Millisecond))
	t.Logf("both networks on B %s after its engine and plugin answered", took.Round(time.Millisecond))
	for _, n := range names {
		if err := s.sameFacts(ctx, n); err != nil {
			t.Error(err)
		}
		if _, err := l.A.Docker(ctx, "network", "rm", n); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range names {
		if err := eventually(t, 15*time.Second, func(ctx context.Context) error { return s.onceGone(ctx, n, subnets[i]) }); err != nil {
			t.Error(err)
		}
	}
}

// pluginLogFile is the dockerd log that holds h's managed plugin's output:
// the lab's own log for an engine the lab started; for host A on engine
// 20.10 (the machine's engine), DOCKERD_LOG or the first of the logs that
// .ci/run and lab/prereqs.sh start it with.
func pluginLogFile(l *Lab, h *Host) string {
	if h.NetNS != "" {
		return filepath.Join(l.State, "dockerd-"+strings.ToLower(h.Name)+".log")
	}
	cands := []string{"/tmp/ci-dockerd.log", "/tmp/dockerd.log"}
	if p := os.Getenv("DOCKERD_LOG"); p != "" {
		cands = append([]string{p}, cands...)
	}
	for _, p := range cands {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return cands[0]
}
