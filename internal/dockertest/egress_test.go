package dockertest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestDockerEgressHost: a container of a network created with -o
// egress=host has no docker_gwbridge endpoint (only lo and eth0) and its
// default route is the network's gateway; it reaches an address outside
// the overlay whose namespace has no route back to the overlay's subnet,
// so the replies come back only because the host masqueraded the
// container's traffic. A container with a published port (-p) is refused,
// naming egress=host, and leaves no endpoint on the network, no link on
// the host and no address taken. Removing the network leaves no link and no firewall rule
// naming its subnet.
func TestDockerEgressHost(t *testing.T) {
	e := newEgressNet(t, "consul-overlay-dockertest:eg", "codt-eg-", "host")
	ctx := t.Context()
	id, netName, c1, c2 := e.id, e.name, e.c1, e.c2
	gateway, withNetwork := e.gateway, e.withNetwork

	// -p: refused, and the endpoint Docker made for it is gone again.
	_, err := Docker(ctx, "run", "-d", "--name", c2, "--network", netName, "-p", "18080:80",
		BusyboxImage, "httpd", "-f", "-p", "80", "-h", "/www")
	if err == nil {
		t.Errorf("docker run -p 18080:80 on an egress=host network started the container")
	} else if !strings.Contains(err.Error(), "egress=host") || !strings.Contains(err.Error(), "published ports") {
		t.Errorf("docker run -p 18080:80 failed without naming published ports and egress=host: %v", err)
	} else {
		t.Logf("refused as it should be: %v", err)
	}
	if n, err := Docker(ctx, "network", "inspect", "-f", "{{len .Containers}}", netName); err != nil || n != "0" {
		t.Errorf("network %s lists %s containers after the refused run (%v), want 0", netName, n, err)
	}
	if err := Eventually(ctx, 15*time.Second, func(ctx context.Context) error {
		now, err := HostLinks(ctx)
		if err != nil {
			return err
		}
		var extra []string
		for l := range now {
			if !withNetwork[l] {
				extra = append(extra, l)
			}
		}
		if len(extra) > 0 {
			return fmt.Errorf("links of the refused container left on the host: %v", extra)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}

	// The refused container was given the pool's first address (the
	// allocation cursor starts there): Docker released it again.
	ip1 := gateway.Next()
	if _, err := Docker(ctx, "run", "-d", "--name", c1, "--network", netName, "--ip", ip1.String(),
		BusyboxImage, "sleep", "3600"); err != nil {
		t.Fatalf("a container on the address the refused one had: %v", err)
	}
	t.Run("the host's way out, through a kill -9", func(t *testing.T) {
		nsAddr := e.hostWayOut(t, c1, ip1)

		// The way out outlives a kill -9 of the plugin, and the
		// plugin's restore keeps it.
		pingThroughKill(ctx, t, id, c1, nsAddr)
		if _, err := Docker(ctx, "network", "inspect", netName); err != nil {
			t.Fatal(err)
		}
		if err := ping(ctx, c1, nsAddr); err != nil {
			t.Errorf("ping %s from %s after the plugin's restart: %v", nsAddr, c1, err)
		}
	})

	e.removeAll(t)
}

// egressNet is a test's plugin and its network of one -o egress, with
// the names of two containers on it, and the host's links before the
// network was made and after.
type egressNet struct {
	mode, ref, id, name, c1, c2 string
	subnet, outside             netip.Prefix // freeSubnets'
	gateway                     netip.Addr
	before, withNetwork         map[string]bool
}

// newEgressNet installs a plugin (ref prefix as testPlugin's) and creates
// a network named netPrefix<random> with -o egress=mode (none when mode
// is "": the default) on a subnet of freeSubnets; the network and its containers are removed when the test
// ends, and dumped if it failed.
func newEgressNet(t *testing.T, prefix, netPrefix, mode string) *egressNet {
	t.Helper()
	before, err := HostLinks(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	e := &egressNet{mode: mode, before: before}
	e.ref, e.id = testPlugin(t, prefix, nil)
	ctx := t.Context()
	e.name = UniqueName(netPrefix)
	e.c1, e.c2 = e.name+"-c1", e.name+"-c2"
	t.Cleanup(func() {
		if t.Failed() {
			dump(t, e.ref, e.id, e.name, e.c1, e.c2)
		}
	})
	e.subnet, e.outside = freeSubnets(t)
	e.gateway = e.subnet.Addr().Next()
	removeOnCleanup(t, e.name, e.c1, e.c2)
	args := []string{"network", "create", "-d", e.ref, "--ipam-driver", e.ref, "--subnet", e.subnet.String()}
	if mode != "" {
		args = append(args, "-o", "egress="+mode)
	} else {
		e.mode = "auto (the default)"
	}
	if _, err := Docker(ctx, append(args, e.name)...); err != nil {
		t.Fatal(err)
	}
	if e.withNetwork, err = HostLinks(ctx); err != nil {
		t.Fatal(err)
	}
	return e
}

// hostWayOut checks that container c, at ip on e's network, goes out
// through its host: it has lo and eth0 only, no docker_gwbridge endpoint
// and one default route, via the network's gateway, and it reaches an
// address outside the overlay (outsideNS) whose namespace has no route
// back to the overlay's subnet, so that the replies come back only
// because the host masqueraded its traffic. It returns that address.
func (e *egressNet) hostWayOut(t *testing.T, c string, ip netip.Addr) string {
	t.Helper()
	ctx := t.Context()
	if l := containerLinks(t, c); !slices.Equal(l, []string{"eth0", "lo"}) {
		t.Errorf("%s's links %v, want lo and eth0 only", c, l)
	}
	if onGWBridge(t, c) {
		t.Errorf("docker_gwbridge has an endpoint of %s", c)
	}
	want := fmt.Sprintf("default via %s dev eth0", e.gateway)
	if d := defaultRoutes(t, c); len(d) != 1 || !strings.HasPrefix(d[0], want) {
		t.Errorf("%s's default routes %q, want one %q", c, d, want)
	}
	name, nsAddr := outsideNS(t, e.outside)
	if out, err := run(ctx, "", nil, "ip", "netns", "exec", name, "ip", "route", "get", ip.String()); err == nil {
		t.Fatalf("the outside namespace has a route to the container's address %s, so the test proves nothing: %s", ip, out)
	}
	if err := ping(ctx, c, nsAddr.String()); err != nil {
		t.Errorf("ping %s (outside the overlay, no route back to %s) from %s within 15 s: %v", nsAddr, e.subnet, c, err)
	}
	return nsAddr.String()
}

// containerLinks are the names of container c's links, sorted.
func containerLinks(t *testing.T, c string) []string {
	t.Helper()
	out, err := Docker(t.Context(), "exec", c, "ip", "-o", "link", "show")
	if err != nil {
		t.Fatal(err)
	}
	l := linkNames(out)
	slices.Sort(l)
	return l
}

// defaultRoutes are container c's IPv4 default routes.
func defaultRoutes(t *testing.T, c string) []string {
	t.Helper()
	out, err := Docker(t.Context(), "exec", c, "ip", "-4", "route", "show")
	if err != nil {
		t.Fatal(err)
	}
	var d []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "default ") {
			d = append(d, strings.TrimSpace(line))
		}
	}
	return d
}

// onGWBridge tells whether docker_gwbridge has an endpoint of container c
// (false when docker_gwbridge does not exist).
func onGWBridge(t *testing.T, c string) bool {
	t.Helper()
	cid, err := Docker(t.Context(), "inspect", "-f", "{{.Id}}", c)
	if err != nil {
		t.Fatal(err)
	}
	gw, err := Docker(t.Context(), "network", "inspect", "-f", "{{json .Containers}}", "docker_gwbridge")
	return err == nil && strings.Contains(gw, cid)
}

// removeAll checks that a firewall rule names the network's subnet (the
// masquerade: seeing it shows that the check after the removal looks at
// the right thing), removes the two containers and the network, and
// checks that no link of the network and no rule naming its subnet is
// left.
func (e *egressNet) removeAll(t *testing.T) {
	t.Helper()
	ctx := t.Context()
	if rules, err := rulesNaming(ctx, e.subnet.String()); err != nil {
		t.Error(err)
	} else if len(rules) == 0 {
		t.Errorf("no firewall rule names the subnet %s while the egress=%s network is up", e.subnet, e.mode)
	}
	if _, err := Docker(ctx, "rm", "-f", e.c1, e.c2); err != nil {
		t.Error(err)
	}
	if _, err := Docker(ctx, "network", "rm", e.name); err != nil {
		t.Error(err)
	}
	var ours []string
	for l := range e.withNetwork {
		if !e.before[l] {
			ours = append(ours, l)
		}
	}
	assertGone(t, "after docker network rm", e.before, ours)
	if rules, err := rulesNaming(ctx, e.subnet.String()); err != nil {
		t.Error(err)
	} else if len(rules) > 0 {
		t.Errorf("firewall rules naming the removed network's subnet %s:\n%s", e.subnet, strings.Join(rules, "\n"))
	}
}

// freeSubnets picks the overlay subnet (a /24 in 10.126.0.0/16) and the
// outside subnet (a /30 in 198.19.0.0/16) of TestDockerEgressHost that
// overlap no route of the host (eth0 may be in 192.0.2.0/24, Docker's
// bridges in 172.16.0.0/12).
func freeSubnets(t *testing.T) (overlay, outside netip.Prefix) {
	t.Helper()
	out, err := run(t.Context(), "", nil, "ip", "-4", "route", "show", "table", "all")
	if err != nil {
		t.Fatal(err)
	}
	// Each line starts with its destination, after a route type for
	// some: "default via ...", "10.0.0.0/8 dev ...", "local 127.0.0.1
	// dev lo ...", "192.0.2.7 via ..." (a host route).
	var routes []netip.Prefix
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && slices.Contains([]string{"unicast", "local", "broadcast", "anycast", "multicast", "blackhole", "unreachable", "prohibit", "throw", "nat"}, f[0]) {
			f = f[1:]
		}
		if len(f) == 0 {
			continue
		}
		if p, err := netip.ParsePrefix(f[0]); err == nil {
			routes = append(routes, p.Masked())
		} else if a, err := netip.ParseAddr(f[0]); err == nil {
			routes = append(routes, netip.PrefixFrom(a, 32))
		}
	}
	free := func(p netip.Prefix) bool {
		return !slices.ContainsFunc(routes, func(r netip.Prefix) bool { return r.Overlaps(p) })
	}
	for range 50 {
		third := byte(1 + rand.IntN(254))
		overlay = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 126, third, 0}), 24)
		outside = netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, third, 0}), 30)
		if free(overlay) && free(outside) {
			return overlay, outside
		}
	}
	t.Fatalf("no free pair of subnets in 10.126.0.0/16 and 198.19.0.0/16 among the host's routes:\n%s", out)
	return
}

// outsideNS makes "outside": a network namespace egt-<random> joined to
// the host's by a veth pair on prefix (the host end, egt-<random>h, gets
// the prefix's first address; the namespace's end its second) with no
// route but that connected one. It returns the namespace's name and
// address; both go when the test ends.
func outsideNS(t *testing.T, prefix netip.Prefix) (name string, addr netip.Addr) {
	t.Helper()
	ctx := t.Context()
	suffix := UniqueName("")
	name, hostIf, nsIf := "egt-"+suffix, "egt-"+suffix+"h", "egt-"+suffix+"p"
	hostAddr := prefix.Addr().Next()
	nsAddr := hostAddr.Next()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		run(ctx, "", nil, "ip", "link", "del", hostIf)
		if _, err := run(ctx, "", nil, "ip", "netns", "del", name); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	for _, args := range [][]string{
		{"ip", "netns", "add", name},
		{"ip", "link", "add", hostIf, "type", "veth", "peer", "name", nsIf, "netns", name},
		{"ip", "addr", "add", netip.PrefixFrom(hostAddr, prefix.Bits()).String(), "dev", hostIf},
		{"ip", "link", "set", hostIf, "up"},
		{"ip", "netns", "exec", name, "ip", "addr", "add", netip.PrefixFrom(nsAddr, prefix.Bits()).String(), "dev", nsIf},
		{"ip", "netns", "exec", name, "ip", "link", "set", nsIf, "up"},
		{"ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"},
	} {
		if out, err := run(ctx, "", nil, args[0], args[1:]...); err != nil {
			t.Fatalf("%v: %v %s", args, err, out)
		}
	}
	return name, nsAddr
}

// rulesNaming returns the lines of iptables-save (and, where the engine
// uses it, nft list ruleset) that contain s.
func rulesNaming(ctx context.Context, s string) ([]string, error) {
	var found []string
	out, err := run(ctx, "", nil, "iptables-save")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, s) {
			found = append(found, "iptables-save: "+line)
		}
	}
	if out, err := run(ctx, "", nil, "nft", "list", "ruleset"); err == nil {
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, s) {
				found = append(found, "nft: "+strings.TrimSpace(line))
			}
		}
	}
	return found, nil
}
