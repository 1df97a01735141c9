package dockertest

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

// TestDockerManagedPlugin packages consul-overlay with `make plugin`,
// enables it in the real engine (embedded store: no Consul), creates a
// network with it as network and IPAM driver, runs two busybox containers
// on it and checks that they reach each other, the network's gateway, the
// outside world and that -p works; then it removes everything and checks
// that no consul-overlay link or iptables rule is left on the host.
func TestDockerManagedPlugin(t *testing.T) {
	Require(t)
	ctx := t.Context()
	before, err := HostLinks(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// A plugin of our own, so an installed consul-overlay:latest is left
	// alone, with its own data directory (the embedded store is locked by
	// whichever plugin opened it).
	ref, id := testPlugin(t, "consul-overlay-dockertest:t", nil)
	netName := UniqueName("codt-")
	c1, c2 := netName+"-c1", netName+"-c2"
	// Runs before the plugin's removal (cleanups run last first), so the
	// plugin can still be inspected.
	t.Cleanup(func() {
		if t.Failed() {
			dump(t, ref, id, netName, c1, c2)
		}
	})

	// A managed plugin's driver names carry the tag: -d NAME:TAG.
	third := 1 + rand.IntN(254)
	subnet := netip.MustParsePrefix(fmt.Sprintf("10.123.%d.0/24", third))
	gateway := netip.AddrFrom4([4]byte{10, 123, byte(third), 1})
	removeOnCleanup(t, netName, c1, c2)
	if _, err := Docker(ctx, "network", "create", "-d", ref, "--ipam-driver", ref,
		"--subnet", subnet.String(), netName); err != nil {
		t.Fatal(err)
	}

	port := freePort(t)
	if _, err := Docker(ctx, "run", "-d", "--name", c1, "--network", netName,
		"-p", fmt.Sprintf("127.0.0.1:%d:80", port),
		BusyboxImage, "httpd", "-f", "-p", "80", "-h", "/www"); err != nil {
		t.Fatal(err)
	}
	if _, err := Docker(ctx, "run", "-d", "--name", c2, "--network", netName,
		BusyboxImage, "sleep", "3600"); err != nil {
		t.Fatal(err)
	}
	ip1, ip2 := containerIP(t, c1, netName), containerIP(t, c2, netName)
	for _, ip := range []netip.Addr{ip1, ip2} {
		if !subnet.Contains(ip) || ip == gateway {
			t.Fatalf("container address %s: want one from %s other than the gateway %s", ip, subnet, gateway)
		}
	}
	if ip1 == ip2 {
		t.Fatalf("both containers got %s", ip1)
	}

	up, err := HostLinks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ours []string
	for l := range up {
		if !before[l] {
			ours = append(ours, l)
		}
	}
	slices.Sort(ours)
	t.Logf("host links the plugin created: %v", ours)
	if len(ours) == 0 {
		t.Errorf("no new host link named %v while the network has two containers", LinkPrefixes)
	}
	// The plugin's FORWARD rules name its bridges (vxbr-+, all of them);
	// seeing them here shows that the rootfs's iptables works and that the
	// check after teardown looks at the right thing.
	if rules, err := RulesMentioning(ctx, append(slices.Clone(ours), "vxbr-+")); err != nil {
		t.Error(err)
	} else if len(rules) == 0 {
		t.Errorf("no iptables rule names one of %v while the network is up", ours)
	}

	pings := []struct {
		name, from, to string
	}{
		{"c1 to c2 by address", c1, ip2.String()},
		{"c2 to c1 by address", c2, ip1.String()},
		{"c2 to c1 by name", c2, c1},
		{"c1 to the gateway", c1, gateway.String()},
		{"c2 to the gateway", c2, gateway.String()},
	}
	for _, p := range pings {
		t.Run(p.name, func(t *testing.T) {
			if err := ping(ctx, p.from, p.to); err != nil {
				t.Errorf("ping %s from %s within 15 s: %v", p.to, p.from, err)
			}
		})
	}
	t.Run("outbound", func(t *testing.T) {
		// "Outside" is a namespace of our own, routed from the host: the
		// container reaches it through its host's masquerade (the default
		// egress, auto: it publishes no port), as it would reach the
		// world. No packet leaves this machine.
		outside := testenv.NewNetNS(t)
		hostIf, nsIf := "cooutv"+fmt.Sprint(third), "eth0"
		hostAddr, nsAddr := fmt.Sprintf("198.18.%d.1", third), fmt.Sprintf("198.18.%d.2", third)
		t.Cleanup(func() { run(context.Background(), "", nil, "ip", "link", "del", hostIf) })
		for _, args := range [][]string{
			{"ip", "link", "add", hostIf, "type", "veth", "peer", "name", "cooutp" + fmt.Sprint(third)},
			{"ip", "link", "set", "cooutp" + fmt.Sprint(third), "netns", outside.Path},
			{"ip", "addr", "add", hostAddr + "/30", "dev", hostIf},
			{"ip", "link", "set", hostIf, "up"},
		} {
			if out, err := run(ctx, "", nil, args[0], args[1:]...); err != nil {
				t.Fatalf("%v: %v %s", args, err, out)
			}
		}
		for _, args := range [][]string{
			{"ip", "link", "set", "cooutp" + fmt.Sprint(third), "name", nsIf},
			{"ip", "addr", "add", nsAddr + "/30", "dev", nsIf},
			{"ip", "link", "set", nsIf, "up"},
			{"ip", "route", "add", "default", "via", hostAddr},
		} {
			if out, err := outside.Run(t, args...); err != nil {
				t.Fatalf("%v: %v %s", args, err, out)
			}
		}
		if err := ping(ctx, c2, nsAddr); err != nil {
			t.Errorf("ping %s (outside the overlay, through the host) from %s within 15 s: %v", nsAddr, c2, err)
		}

		// An --internal network reaches nothing outside.
		inet, ic := netName+"-int", netName+"-ic"
		removeOnCleanup(t, inet, ic)
		if _, err := Docker(ctx, "network", "create", "--internal", "-d", ref, "--ipam-driver", ref,
			"--subnet", fmt.Sprintf("10.124.%d.0/24", third), inet); err != nil {
			t.Fatal(err)
		}
		if _, err := Docker(ctx, "run", "-d", "--name", ic, "--network", inet, BusyboxImage, "sleep", "3600"); err != nil {
			t.Fatal(err)
		}
		for _, dst := range []string{nsAddr, ip1.String()} {
			if out, err := Docker(ctx, "exec", ic, "ping", "-c", "2", "-W", "1", dst); err == nil {
				t.Errorf("container on --internal network reached %s:\n%s", dst, out)
			}
		}
		if _, err := Docker(ctx, "rm", "-f", ic); err != nil {
			t.Error(err)
		}
		if _, err := Docker(ctx, "network", "rm", inet); err != nil {
			t.Error(err)
		}
	})
	t.Run("published port", func(t *testing.T) {
		if err := portAnswers(ctx, port); err != nil {
			t.Errorf("-p 127.0.0.1:%d:80 to %s within 15 s: %v", port, c1, err)
		}
	})

	t.Run("renamed container keeps its address", func(t *testing.T) {
		// docker rename renames a running container's endpoint without
		// telling IPAM. A new container under the old name with the same
		// --ip is another endpoint: it must not get the address the
		// renamed one still runs with. (Engines 29 and later send the
		// container's name with the address request, which IPAM took for
		// the same endpoint asking again; earlier ones send no name.)
		c3, c3old, c4 := netName+"-c3", netName+"-c3-old", netName+"-c4"
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			Docker(ctx, "rm", "-f", c3, c3old, c4)
		})
		ip3 := netip.AddrFrom4([4]byte{10, 123, byte(third), 200})
		if _, err := Docker(ctx, "run", "-d", "--name", c3, "--network", netName, "--ip", ip3.String(),
			BusyboxImage, "sleep", "3600"); err != nil {
			t.Fatal(err)
		}
		if _, err := Docker(ctx, "rename", c3, c3old); err != nil {
			t.Fatal(err)
		}
		if out, err := Docker(ctx, "run", "-d", "--name", c3, "--network", netName, "--ip", ip3.String(),
			BusyboxImage, "sleep", "3600"); err == nil {
			t.Fatalf("a second container got %s, which the renamed %s still runs with: %s", ip3, c3old, out)
		} else if !strings.Contains(err.Error(), ip3.String()) {
			t.Errorf("the refusal does not name the address %s: %v", ip3, err)
		}
		if err := ping(ctx, c1, ip3.String()); err != nil {
			t.Errorf("the renamed container is not reachable at %s: %v", ip3, err)
		}
		// Once it is gone, the address is free again.
		if _, err := Docker(ctx, "rm", "-f", c3, c3old); err != nil {
			t.Fatal(err)
		}
		if _, err := Docker(ctx, "run", "-d", "--name", c4, "--network", netName, "--ip", ip3.String(),
			BusyboxImage, "sleep", "3600"); err != nil {
			t.Errorf("%s not handed out again once the container that had it is removed: %v", ip3, err)
		}
		if _, err := Docker(ctx, "rm", "-f", c4); err != nil {
			t.Error(err)
		}
	})

	// Teardown, checked: containers and network first, then the plugin.
	if _, err := Docker(ctx, "rm", "-f", c1, c2); err != nil {
		t.Error(err)
	}
	if _, err := Docker(ctx, "network", "rm", netName); err != nil {
		t.Error(err)
	}
	assertGone(t, "after docker network rm", before, ours)
	if _, err := Docker(ctx, "plugin", "disable", ref); err != nil {
		t.Error(err)
	}
	if _, err := Docker(ctx, "plugin", "rm", ref); err != nil {
		t.Error(err)
	}
	assertGone(t, "after docker plugin disable and rm", before, ours)
	if out, err := Docker(ctx, "plugin", "ls", "--format", "{{.Name}}"); err != nil || slices.Contains(strings.Fields(out), ref) {
		t.Errorf("plugin %s still listed after rm: %q %v", ref, out, err)
	}
}

// assertGone checks that none of the links is left, nor any other link with
// a consul-overlay prefix that was not there before the test, nor an
// iptables rule that names one of them.
func assertGone(t *testing.T, when string, before map[string]bool, ours []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	now, err := HostLinks(ctx)
	if err != nil {
		t.Error(err)
		return
	}
	var left []string
	for l := range now {
		if !before[l] || slices.Contains(ours, l) {
			left = append(left, l)
		}
	}
	slices.Sort(left)
	if len(left) > 0 {
		t.Errorf("%s: host links left: %v", when, left)
	}
	rules, err := RulesMentioning(ctx, slices.Concat(ours, left))
	if err != nil {
		t.Error(err)
		return
	}
	if len(rules) > 0 {
		t.Errorf("%s: iptables rules left that name removed links:\n%s", when, strings.Join(rules, "\n"))
	}
}

// ping pings to from inside container from, retrying for 15 s (the first
// packets may race the ARP exchange).
func ping(ctx context.Context, from, to string) error {
	return Eventually(ctx, 15*time.Second, func(ctx context.Context) error {
		_, err := Docker(ctx, "exec", from, "ping", "-c", "1", "-W", "2", to)
		return err
	})
}

// portAnswers waits up to 15 s for the test image's httpd behind the
// published port 127.0.0.1:port to answer with its page.
func portAnswers(ctx context.Context, port int) error {
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	return Eventually(ctx, 15*time.Second, func(ctx context.Context) error {
		body, err := get(ctx, url)
		if err != nil {
			return err
		}
		if got, want := strings.TrimSpace(body), "consul-overlay-test"; got != want {
			return fmt.Errorf("GET %s: body %q, want %q", url, got, want)
		}
		return nil
	})
}

// get fetches url with a 5 s limit and returns the body.
func get(ctx context.Context, url string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(b), nil
}

// containerIP is the container's IPv4 address on network.
func containerIP(t *testing.T, container, network string) netip.Addr {
	t.Helper()
	out, err := Docker(t.Context(), "inspect", "-f",
		fmt.Sprintf(`{{(index .NetworkSettings.Networks %q).IPAddress}}`, network), container)
	if err != nil {
		t.Fatal(err)
	}
	ip, err := netip.ParseAddr(out)
	if err != nil {
		t.Fatalf("address of %s on %s: %q: %v", container, network, out, err)
	}
	return ip
}

// freePort is a TCP port on 127.0.0.1 that nothing listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// requireBusybox stops the test unless Debian's busybox is installed
// (make busybox-image checks that it is the static one).
func requireBusybox(t *testing.T) {
	t.Helper()
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if _, err := exec.LookPath(p); err == nil {
			return
		}
	}
	testenv.Missing(t, "busybox (static)", "apt-get install busybox-static")
}

// dump logs what helps to understand a failure: the plugin's settings and
// output, the network, the containers and the host's links and rules.
func dump(t *testing.T, ref, id, netName string, containers ...string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	show := func(name string, args ...string) {
		out, err := run(ctx, "", nil, name, args...)
		if err != nil {
			out += "\n" + err.Error()
		}
		t.Logf("--- %s %s\n%s", name, strings.Join(args, " "), out)
	}
	show("docker", "plugin", "inspect", ref)
	t.Logf("--- plugin output\n%s", PluginLog(id))
	show("docker", "network", "inspect", netName)
	for _, c := range containers {
		show("docker", "inspect", "-f", "{{.State.Status}} {{.State.Error}} {{json .NetworkSettings.Networks}}", c)
		show("docker", "logs", "--tail", "20", c)
	}
	show("ip", "-o", "link", "show")
	show("ip", "-4", "-o", "addr", "show")
	show("iptables-save")
}
