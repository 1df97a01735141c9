//go:build e2e

package e2e

// Scenarios of what the engines differ in (issue 15): IPv6-only networks
// (engine 28 and newer), --internal networks, ports published through the
// engine's firewall (its iptables or nftables backend) and plugin upgrades
// under an alias.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"consul-overlay/internal/dockertest"
)

// engineVersion is the version of the host's engine and its major number.
func (h *Host) engineVersion(ctx context.Context) (int, string, error) {
	v, err := h.Docker(ctx, "version", "-f", "{{.Server.Version}}")
	if err != nil {
		return 0, "", err
	}
	major, _, _ := strings.Cut(v, ".")
	n, err := strconv.Atoi(major)
	if err != nil {
		return 0, v, fmt.Errorf("%s: engine version %q: %w", h, v, err)
	}
	return n, v, nil
}

// runSince runs a scenario that needs engine minMajor or newer on both
// hosts. On an older engine it is not run and the summary says N/A and why:
// not a PASS (nothing was proven) and not a silent SKIP.
func (s *suite) runSince(t *testing.T, name string, minMajor int, needs []string, f func(t *testing.T)) {
	for _, h := range s.lab.Hosts() {
		major, v, err := h.engineVersion(t.Context())
		if err != nil {
			s.run(t, name, nil, func(t *testing.T) { t.Fatal(err) })
			return
		}
		if major < minMajor {
			note := fmt.Sprintf("%s runs engine %s, which lacks the feature: needs engine %d or newer", h, v, minMajor)
			t.Run(name, func(t *testing.T) {
				record(result{name: name, status: "N/A", note: note})
				t.Skip(note)
			})
			return
		}
	}
	s.run(t, name, needs, f)
}

// labEnv is a variable of $LAB_STATE/env that Lab does not carry.
func (l *Lab) labEnv(key string) (string, error) {
	f, err := os.Open(filepath.Join(l.State, "env"))
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && k == key && v != "" {
			return v, nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", fmt.Errorf("%s: no %s (a lab brought up by an older lab/up.sh: lab/down.sh, then again)", f.Name(), key)
}

// kvLeft waits until no KV key of the plugins mentions any of names.
func kvLeft(t *testing.T, l *Lab, names ...string) error {
	return eventually(t, 20*time.Second, func(ctx context.Context) error {
		keys, err := l.KVKeys(ctx)
		if err != nil {
			return err
		}
		var left []string
		for _, k := range keys {
			if slices.ContainsFunc(names, func(n string) bool { return strings.Contains(k, n) }) {
				left = append(left, k)
			}
		}
		if len(left) > 0 {
			return fmt.Errorf("KV keys left after both hosts removed the network: %v", left)
		}
		return nil
	})
}

// --- ipv6-only ---

// v6Subnet is the IPv6-only scenario's subnet: a ULA /64 that exists only
// inside the lab's containers.
var v6Subnet = netip.MustParsePrefix("fd00:c0:6::/64")

// ipv6Only deploys testdata/ipv6only.yaml (enable_ipv4: false) on both
// hosts: the engines report an IPv6-only network, the containers get an
// IPv6 address and no IPv4 one from it, ping each other over IPv6 across the
// hosts, and are in the Consul catalog (and its DNS, AAAA) with their IPv6
// address. Then compose down leaves nothing behind.
func (s *suite) ipv6Only(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	file, err := filepath.Abs("testdata/ipv6only.yaml")
	if err != nil {
		t.Fatal(err)
	}
	const (
		project   = "colab-v6"
		network   = project + "_v6"
		container = project + "-v6-1"
		service   = "v6"
	)
	name := dockertest.UniqueName("colab-v6-")
	env := map[*Host][]string{}
	for _, h := range l.Hosts() {
		env[h] = []string{"E2E_DNS=" + h.Addr.String(), "E2E_V6NAME=" + name, "E2E_V6NET=" + v6Subnet.String()}
	}
	downed := false
	t.Cleanup(func() {
		if downed {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		for _, h := range l.Hosts() {
			h.Compose(ctx, file, env[h], "down")
		}
	})
	for _, h := range l.Hosts() {
		if out, err := h.Compose(ctx, file, env[h], "up", "-d"); err != nil {
			t.Fatal(err)
		} else {
			t.Logf("%s: docker compose up -d:\n%s", h, out)
		}
	}

	want := fmt.Sprintf("false true %s ", v6Subnet)
	addr := map[*Host]netip.Addr{}
	eps := map[*Host]map[string]netip.Addr{}
	for _, h := range l.Hosts() {
		got, err := h.Docker(ctx, "network", "inspect", "-f",
			"{{.EnableIPv4}} {{.EnableIPv6}} {{range .IPAM.Config}}{{.Subnet}} {{end}}", network)
		if err != nil {
			t.Fatal(err)
		}
		if got+" " != want && got != want {
			t.Errorf("%s: network %s: EnableIPv4, EnableIPv6, subnets %q, want %q", h, network, got, want)
		}
		out, err := h.Docker(ctx, "inspect", "-f",
			fmt.Sprintf(`{{with index .NetworkSettings.Networks %q}}{{.IPAddress}}|{{.GlobalIPv6Address}}|{{.EndpointID}}{{end}}`, network), container)
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Split(out, "|")
		if len(f) != 3 {
			t.Fatalf("%s: container %s on %s: %q", h, container, network, out)
		}
		if f[0] != "" {
			t.Errorf("%s: container %s has the IPv4 address %s on the IPv6-only network", h, container, f[0])
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil || !v6Subnet.Contains(a) {
			t.Fatalf("%s: container %s: IPv6 address %q, want one in %s (%v)", h, container, f[1], v6Subnet, err)
		}
		addr[h], eps[h] = a, map[string]netip.Addr{f[2]: a}
		t.Logf("%s: %s has %s", h, container, a)
	}
	if addr[l.A] == addr[l.B] {
		t.Fatalf("both containers got %s", addr[l.A])
	}

	// The plugin's records: no IPv4, the kernel's bridge ports.
	key := "name-" + name
	recs, err := l.Endpoints(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 2 {
		t.Errorf("endpoint records of %s: %v, want 2", key, recs)
	}
	for _, r := range recs {
		if r.IPv4 != "" {
			t.Errorf("endpoint record %s has the IPv4 address %s", r.Key, r.IPv4)
		}
	}
	vni, err := l.NetworkVNI(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range l.Hosts() {
		if err := s.bridgePorts(ctx, h, vni, ids(eps[h])); err != nil {
			t.Error(err)
		}
	}

	// Across the hosts over IPv6, both ways.
	for _, h := range l.Hosts() {
		if err := ping(t, h, container, addr[l.Other(h)]); err != nil {
			t.Errorf("%s → %s over IPv6 (%s): %v", h, l.Other(h), addr[l.Other(h)], err)
		}
	}

	// Consul: one instance per host, with the IPv6 address, and AAAA
	// answers of the agent's DNS.
	err = eventually(t, 30*time.Second, func(ctx context.Context) error {
		inst, err := l.Instances(ctx)
		if err != nil {
			return err
		}
		var errs []error
		for _, h := range l.Hosts() {
			i := slices.IndexFunc(inst, func(i Instance) bool { return i.ServiceAddress == addr[h].String() })
			switch {
			case i < 0:
				errs = append(errs, fmt.Errorf("no service instance with %s's address %s in %v", h, addr[h], inst))
			case inst[i].Node != h.Node || inst[i].ServiceName != service:
				errs = append(errs, fmt.Errorf("service instance %s: want node %s service %s", inst[i], h.Node, service))
			}
		}
		return errors.Join(errs...)
	})
	if err != nil {
		t.Error(err)
	}
	for _, h := range l.Hosts() {
		q := service + ".service.consul"
		err := eventually(t, 20*time.Second, func(ctx context.Context) error {
			out, err := h.InContainer(ctx, container, "nslookup", "-type=AAAA", q, h.Addr.String())
			if err != nil {
				return err
			}
			got := nslookupAddrs(out)
			for _, a := range addr {
				if !slices.Contains(got, a.String()) {
					return fmt.Errorf("AAAA %s from %s: %v, want %s and %s", q, h.Addr, got, addr[l.A], addr[l.B])
				}
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s: %v", h, err)
		}
	}

	downed = true
	for _, h := range l.Hosts() {
		if _, err := h.Compose(ctx, file, env[h], "down"); err != nil {
			t.Error(err)
		}
	}
	if err := kvLeft(t, l, name, strings.ReplaceAll(v6Subnet.String(), "/", "_"), fmt.Sprintf("vnis/%d", vni)); err != nil {
		t.Error(err)
	}
	err = eventually(t, 20*time.Second, func(ctx context.Context) error {
		inst, err := l.Instances(ctx)
		if err != nil {
			return err
		}
		for _, i := range inst {
			if i.ServiceName == service {
				return fmt.Errorf("service instance %s left after compose down", i)
			}
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// --- internal-network ---

// internalNetwork: an --internal network across both hosts carries traffic
// between its containers, and nothing else: its containers get no
// docker_gwbridge interface, so neither the Consul server nor the other
// host's underlay is reachable from them.
func (s *suite) internalNetwork(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	name := dockertest.UniqueName("colab-int-")
	subnet := netip.MustParsePrefix("10.213.0.0/24")
	c := name + "-c"
	l.removeOnCleanup(t, name, c)
	for _, h := range l.Hosts() {
		if _, err := h.Docker(ctx, "network", "create", "--internal", "-d", l.Plugin, "--ipam-driver", l.Plugin,
			"--subnet", subnet.String(), "-o", "name="+name, "--label", l.Label, name); err != nil {
			t.Fatal(err)
		}
		if got, err := h.Docker(ctx, "network", "inspect", "-f", "{{.Internal}}", name); err != nil || got != "true" {
			t.Errorf("%s: network %s Internal %q (%v), want true", h, name, got, err)
		}
	}
	addr := map[*Host]netip.Addr{}
	eps := map[*Host]map[string]netip.Addr{}
	for _, h := range l.Hosts() {
		if _, err := h.Docker(ctx, "run", "-d", "--name", c, "--label", l.Label,
			"--network", name, l.Image, "sleep", "3600"); err != nil {
			t.Fatal(err)
		}
		ip, id, err := h.ContainerAddr(ctx, c, name)
		if err != nil {
			t.Fatal(err)
		}
		addr[h], eps[h] = ip, map[string]netip.Addr{id: ip}
	}
	for _, h := range l.Hosts() {
		if err := ping(t, h, c, addr[l.Other(h)]); err != nil {
			t.Errorf("%s → %s on the internal network (%s): %v", h, l.Other(h), addr[l.Other(h)], err)
		}
	}
	vni, err := l.NetworkVNI(ctx, "name-"+name)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range l.Hosts() {
		if err := s.bridgePorts(ctx, h, vni, ids(eps[h])); err != nil {
			t.Error(err)
		}
		// The container's IPv4 addresses: loopback and the overlay's only.
		out, err := h.InContainer(ctx, c, "ip", "-o", "-4", "addr", "show")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(out, "\n") {
			f := strings.Fields(line)
			if len(f) < 4 {
				continue
			}
			p, err := netip.ParsePrefix(f[3])
			if err != nil || (!p.Addr().IsLoopback() && p.Addr() != addr[h]) {
				t.Errorf("%s: container %s on an internal network has another address: %s", h, c, line)
			}
		}
		url := fmt.Sprintf("http://%s:%d/v1/status/leader", l.ConsulServer, l.HTTPPort)
		if body, err := h.ContainerGet(ctx, c, url); err == nil {
			t.Errorf("%s: %s on an internal network reached %s: %q", h, c, url, body)
		}
		if _, err := h.InContainer(ctx, c, "ping", "-c", "1", "-W", "1", l.Other(h).Addr.String()); err == nil {
			t.Errorf("%s: %s on an internal network reached %s's underlay address %s", h, c, l.Other(h), l.Other(h).Addr)
		}
	}
	for _, h := range l.Hosts() {
		if _, err := h.Docker(ctx, "rm", "-f", c); err != nil {
			t.Error(err)
		}
		if _, err := h.Docker(ctx, "network", "rm", name); err != nil {
			t.Error(err)
		}
	}
	if err := kvLeft(t, l, name, "10.213.0.0_24", fmt.Sprintf("vnis/%d", vni)); err != nil {
		t.Error(err)
	}
}

// --- published-remote ---

// publishedRemote: a port published on the host's underlay address (-p
// ADDR:PORT:80) answers the other host, through the engine's firewall
// (iptables or nftables DNAT, and its FORWARD rules): the container sees
// the other host's address as the client, which the userland proxy would
// have replaced by the gateway's.
func (s *suite) publishedRemote(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	name := dockertest.UniqueName("colab-pub-")
	c := name + "-c"
	port := freePort(t)
	l.removeOnCleanup(t, name, c)
	for _, h := range l.Hosts() {
		if _, err := h.Docker(ctx, "network", "create", "-d", l.Plugin, "--ipam-driver", l.Plugin,
			"--subnet", "10.215.0.0/24", "-o", "name="+name, "--label", l.Label, name); err != nil {
			t.Fatal(err)
		}
		if _, err := h.Docker(ctx, "run", "-d", "--name", c, "--label", l.Label, "--network", name,
			"-p", fmt.Sprintf("%s:%d:80", h.Addr, port), l.Image,
			"sh", "-c", "echo published-"+h.Name+" >/tmp/index.html && exec httpd -f -vv -p 80 -h /tmp"); err != nil {
			t.Fatal(err)
		}
	}
	client := regexp.MustCompile(`\[(?:::ffff:)?([0-9a-f.:]+)\]:\d+: url:/`)
	for _, h := range l.Hosts() {
		other := l.Other(h)
		url := fmt.Sprintf("http://%s:%d/", h.Addr, port)
		err := eventually(t, 20*time.Second, func(ctx context.Context) error {
			body, err := other.Get(ctx, url)
			if err == nil && body != "published-"+h.Name {
				err = fmt.Errorf("body %q", body)
			}
			return err
		})
		if err != nil {
			t.Errorf("%s: GET %s (published by %s): %v", other, url, h, err)
			continue
		}
		// httpd logs to standard error.
		logs, err := run(ctx, h.dockerEnv(), "sh", "-c", "docker logs "+c+" 2>&1")
		if err != nil {
			t.Fatal(err)
		}
		var clients []string
		for _, m := range client.FindAllStringSubmatch(logs, -1) {
			clients = append(clients, m[1])
		}
		if !slices.Contains(clients, other.Addr.String()) {
			t.Errorf("%s: %s saw the clients %v, want %s (DNAT keeps the source; the userland proxy would not)", h, c, clients, other.Addr)
		}
	}
	for _, h := range l.Hosts() {
		if _, err := h.Docker(ctx, "rm", "-f", c); err != nil {
			t.Error(err)
		}
		if _, err := h.Docker(ctx, "network", "rm", name); err != nil {
			t.Error(err)
		}
	}
	if err := kvLeft(t, l, name, "10.215.0.0_24"); err != nil {
		t.Error(err)
	}
}

// --- plugin-upgrade ---

// upgradeTag is the tag of the plugin version plugin-upgrade upgrades to.
const upgradeTag = "e2e-upgrade"

// pushUpgrade pushes a second version of the lab's plugin, the same build
// with a marker file added to its rootfs (Docker refuses to create a plugin
// from a rootfs another plugin has), to the lab's registry, and returns its
// reference.
func (l *Lab) pushUpgrade(ctx context.Context, t *testing.T) (string, error) {
	remote, err := l.labEnv("LAB_REMOTE")
	if err != nil {
		return "", err
	}
	dir, err := l.labEnv("LAB_PLUGIN_DIR")
	if err != nil {
		return "", err
	}
	repo := remote
	if i := strings.LastIndexByte(remote, ':'); i > strings.LastIndexByte(remote, '/') {
		repo = remote[:i]
	}
	ref := repo + ":" + upgradeTag
	tmp := t.TempDir()
	if out, err := exec.CommandContext(ctx, "cp", "-a", dir, tmp+"/plugin").CombinedOutput(); err != nil {
		return "", fmt.Errorf("copy %s: %w: %s", dir, err, out)
	}
	marker := fmt.Sprintf("consul-overlay e2e upgrade %d\n", time.Now().UnixNano())
	if err := os.WriteFile(tmp+"/plugin/rootfs/e2e-upgrade", []byte(marker), 0o644); err != nil {
		return "", err
	}
	a := l.A
	a.Docker(ctx, "plugin", "rm", "-f", ref)
	if _, err := a.Docker(ctx, "plugin", "create", ref, tmp+"/plugin"); err != nil {
		return "", err
	}
	defer a.Docker(context.WithoutCancel(ctx), "plugin", "rm", "-f", ref)
	if _, err := a.Docker(ctx, "plugin", "push", ref); err != nil {
		return "", err
	}
	return ref, nil
}

// pingFile is where startBackgroundPing's ping writes, in the container.
const pingFile = "/tmp/e2e-ping"

// startBackgroundPing starts pinging addr from container every 0.2 s, in the
// background, until stopBackgroundPing.
func startBackgroundPing(ctx context.Context, h *Host, container string, addr netip.Addr) error {
	_, err := h.Docker(ctx, "exec", "-d", container, "sh", "-c", "exec ping -i 0.2 "+addr.String()+" >"+pingFile+" 2>&1")
	return err
}

// stopBackgroundPing interrupts startBackgroundPing's ping and returns how
// many echo requests went out and the sequence numbers of those never
// answered. The request sent last is left out when it alone is unanswered:
// the interrupt can land between it and its reply, and its echo is then
// in flight, not lost (a CI run counted one such request as lost).
func stopBackgroundPing(ctx context.Context, h *Host, container string) (sent int, lost []int, err error) {
	if _, err := h.InContainer(ctx, container, "busybox", "killall", "-INT", "ping"); err != nil {
		return 0, nil, err
	}
	stats := regexp.MustCompile(`(\d+) packets transmitted, (\d+) packets received`)
	var out string
	var m []string
	err = dockertest.Eventually(ctx, 10*time.Second, func(ctx context.Context) error {
		if out, err = h.InContainer(ctx, container, "cat", pingFile); err != nil {
			return err
		}
		if m = stats.FindStringSubmatch(out); m == nil {
			return fmt.Errorf("%s: ping from %s: no statistics in %q", h, container, out)
		}
		return nil
	})
	if err != nil {
		return 0, nil, err
	}
	sent, _ = strconv.Atoi(m[1])
	answered := map[int]bool{}
	for _, r := range regexp.MustCompile(`seq=(\d+) `).FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(r[1])
		answered[n] = true
	}
	for seq := range sent {
		if !answered[seq] {
			lost = append(lost, seq)
		}
	}
	if len(lost) == 1 && lost[0] == sent-1 {
		return sent - 1, nil, nil
	}
	return sent, lost, nil
}

// pluginUpgrade: `docker plugin upgrade` of the plugin installed under its
// alias, as the README says (disable -f, upgrade, enable), on each host in
// turn while the application's containers ping each other across the
// hosts both ways: the plugin then runs the new version under the same
// alias, no echo request is lost, the endpoints are the ones of before and
// a new container is served.
func (s *suite) pluginUpgrade(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	ref, err := l.pushUpgrade(ctx, t)
	if err != nil {
		t.Fatal(err)
	}
	before, err := s.appEndpoints(ctx)
	if err != nil {
		t.Fatal(err)
	}
	web := map[*Host]netip.Addr{}
	for _, h := range l.Hosts() {
		if web[h], _, err = h.ContainerAddr(ctx, appContainers[0], appNetwork); err != nil {
			t.Fatal(err)
		}
	}

	// The hosts' identities (DATA_DIR/host-id): an upgraded plugin that
	// came up with another DATA_DIR would claim a new one.
	hostKeys := func(ctx context.Context) ([]string, error) {
		keys, err := l.KVKeys(ctx)
		return slices.DeleteFunc(keys, func(k string) bool { return !strings.HasPrefix(k, "hosts/") }), err
	}
	hostsBefore, err := hostKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, h := range l.Hosts() {
			h.InContainer(ctx, appContainers[0], "busybox", "killall", "ping")
		}
	})
	for _, h := range l.Hosts() {
		if err := startBackgroundPing(ctx, h, appContainers[0], web[l.Other(h)]); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(time.Second) // the pings are under way
	start := time.Now()
	for _, h := range l.Hosts() {
		t0 := time.Now()
		if _, err := h.Docker(ctx, "plugin", "disable", "-f", l.Plugin); err != nil {
			t.Fatal(err)
		}
		layer, err := h.Docker(ctx, "plugin", "inspect", "-f", "{{.Config.Rootfs.DiffIds}}", l.Plugin)
		if err != nil {
			t.Fatal(err)
		}
		out, err := h.Docker(ctx, "plugin", "inspect", "-f", "{{range .Settings.Mounts}}{{.Name}}.source={{.Source}} {{end}}", l.Plugin)
		if err != nil {
			t.Fatal(err)
		}
		mounts := strings.Fields(out)
		// Without --skip-remote-check the CLI asks "Plugin images do not
		// match, are you sure?" for another tag, and without a terminal
		// takes no for the answer and exits 0, upgrading nothing.
		if _, err := h.Docker(ctx, "plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", l.Plugin, ref); err != nil {
			t.Fatal(err)
		}
		if now, err := h.Docker(ctx, "plugin", "inspect", "-f", "{{.Config.Rootfs.DiffIds}}", l.Plugin); err != nil {
			t.Fatal(err)
		} else if now == layer {
			t.Errorf("%s: the plugin's rootfs is still %s after the upgrade to %s", h, now, ref)
		}
		// Engine 29.8 starts an upgraded plugin with its config's default
		// mount sources (DATA_DIR and the Docker socket of the machine's
		// root namespace), although `plugin inspect` shows the sources
		// set before: set them again, as the README says.
		if _, err := h.Docker(ctx, append([]string{"plugin", "set", l.Plugin}, mounts...)...); err != nil {
			t.Fatal(err)
		}
		if _, err := h.Docker(ctx, "plugin", "enable", "--timeout", "60", l.Plugin); err != nil {
			t.Fatal(err)
		}
		got, err := h.Docker(ctx, "plugin", "inspect", "-f", "{{.Name}} {{.PluginReference}} {{.Enabled}}", l.Plugin)
		if err != nil {
			t.Fatal(err)
		}
		if want := l.Plugin + " " + ref + " true"; got != want {
			t.Errorf("%s: after the upgrade the plugin is %q, want %q", h, got, want)
		}
		t.Logf("%s: plugin upgraded to %s in %s", h, ref, time.Since(t0).Round(time.Millisecond))
	}
	t.Logf("both hosts upgraded in %s", time.Since(start).Round(time.Millisecond))
	time.Sleep(2 * time.Second) // and the pings go on a little after
	type loss struct {
		sent int
		lost []int
	}
	losses := map[*Host]loss{}
	for _, h := range l.Hosts() {
		sent, lost, err := stopBackgroundPing(ctx, h, appContainers[0])
		if err != nil {
			t.Fatal(err)
		}
		losses[h] = loss{sent, lost}
	}
	var notes []string
	for _, h := range l.Hosts() {
		lo := losses[h]
		notes = append(notes, fmt.Sprintf("%s→%s %d/%d lost", h.Name, l.Other(h).Name, len(lo.lost), lo.sent))
		if lo.sent == 0 || len(lo.lost) > 0 {
			// Requests go out every 0.2 s from a second before the first
			// upgrade: seq 5 is the first upgrade's start.
			t.Errorf("%s → %s during the upgrades: %d of %d echo requests unanswered (seq %v)", h, l.Other(h), len(lo.lost), lo.sent, lo.lost)
		}
	}
	s.notes["plugin-upgrade"] = strings.Join(notes, ", ")

	if hostsAfter, err := hostKeys(ctx); err != nil {
		t.Error(err)
	} else if !slices.Equal(hostsBefore, hostsAfter) {
		t.Errorf("host records changed across the upgrade (an upgraded plugin with another DATA_DIR): %v, were %v", hostsAfter, hostsBefore)
	}
	after, err := s.appEndpoints(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for h := range before {
		if !maps.Equal(before[h], after[h]) {
			t.Errorf("%s: endpoints changed across the plugin upgrade: %v, were %v", h, after[h], before[h])
		}
	}
	if err := s.consistent(t, "plugin-upgrade", "after the plugin upgrade", 30*time.Second); err != nil {
		t.Error(err)
	}
	// The upgraded plugin serves a new container, reached from the other host.
	probe := appProject + "-upgrade-probe"
	if _, err := l.B.Docker(ctx, "run", "-d", "--name", probe, "--label", l.Label,
		"--network", appNetwork, l.Image, "sleep", "600"); err != nil {
		t.Fatalf("%s: a new container after the plugin upgrade: %v", l.B, err)
	}
	pip, _, err := l.B.ContainerAddr(ctx, probe, appNetwork)
	if err != nil {
		t.Fatal(err)
	}
	if err := ping(t, l.A, appContainers[0], pip); err != nil {
		t.Errorf("%s → a new container on %s (%s) after the upgrade: %v", l.A, l.B, pip, err)
	}
	if _, err := l.B.Docker(ctx, "rm", "-f", probe); err != nil {
		t.Fatal(err)
	}
	if err := s.consistent(t, "plugin-upgrade", "after removing the new container", 15*time.Second); err != nil {
		t.Error(err)
	}
}

// pluginDockerAPI checks that h's plugin uses the Docker API: a new
// container's service is named by its SERVICE_NAME label, which only the
// API tells the plugin. After a live-restore engine restart, dockerd has
// made a new socket file: a plugin that had the old file bind-mounted
// would not see the label.
func (s *suite) pluginDockerAPI(t *testing.T, h *Host) {
	ctx := t.Context()
	l := s.lab
	probe := appProject + "-api-probe"
	const service = "api-probe"
	if _, err := h.Docker(ctx, "run", "-d", "--name", probe, "--label", l.Label, "--label", "SERVICE_NAME="+service,
		"--network", appNetwork, l.Image, "sleep", "600"); err != nil {
		t.Fatalf("%s: a new container: %v", h, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		h.Docker(ctx, "rm", "-f", probe)
	})
	ip, _, err := h.ContainerAddr(ctx, probe, appNetwork)
	if err != nil {
		t.Fatal(err)
	}
	err = eventually(t, 30*time.Second, func(ctx context.Context) error {
		inst, err := l.Instances(ctx)
		if err != nil {
			return err
		}
		for _, i := range inst {
			if i.ServiceAddress == ip.String() {
				if i.ServiceName != service || i.Node != h.Node {
					return fmt.Errorf("service instance %s, want service %s (its SERVICE_NAME label, from the Docker API) on %s", i, service, h.Node)
				}
				return nil
			}
		}
		return fmt.Errorf("no service instance for %s (%s)", probe, ip)
	})
	if err != nil {
		t.Errorf("%s: the plugin's Docker API: %v", h, err)
	}
	if _, err := h.Docker(ctx, "rm", "-f", probe); err != nil {
		t.Fatal(err)
	}
	err = eventually(t, 30*time.Second, func(ctx context.Context) error {
		inst, err := l.Instances(ctx)
		if err != nil {
			return err
		}
		for _, i := range inst {
			if i.ServiceAddress == ip.String() {
				return fmt.Errorf("service instance %s left after its container was removed", i)
			}
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}
