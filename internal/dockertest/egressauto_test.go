package dockertest

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestDockerEgressAuto: on a network created with -o egress=auto, a
// container that publishes no port gets the host's way out, as with
// egress=host (no docker_gwbridge endpoint, its default route the
// network's gateway, masqueraded out to an address with no route back),
// and one that publishes a port (-p) starts, gets Docker's docker_gwbridge
// endpoint for its way out and its port, which answers; the two reach each
// other over the overlay. Removing the network leaves no link and no
// firewall rule naming its subnet.
func TestDockerEgressAuto(t *testing.T) {
	before, err := HostLinks(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ref, id := testPlugin(t, "consul-overlay-dockertest:ea", nil)
	ctx := t.Context()
	netName := UniqueName("codt-ea-")
	c1, c2 := netName+"-c1", netName+"-c2"
	t.Cleanup(func() {
		if t.Failed() {
			dump(t, ref, id, netName, c1, c2)
		}
	})
	subnet, outside := freeSubnets(t)
	gateway := subnet.Addr().Next()
	removeOnCleanup(t, netName, c1, c2)
	if _, err := Docker(ctx, "network", "create", "-d", ref, "--ipam-driver", ref,
		"--subnet", subnet.String(), "-o", "egress=auto", netName); err != nil {
		t.Fatal(err)
	}
	withNetwork, err := HostLinks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Docker(ctx, "run", "-d", "--name", c1, "--network", netName,
		BusyboxImage, "sleep", "3600"); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	if _, err := Docker(ctx, "run", "-d", "--name", c2, "--network", netName,
		"-p", fmt.Sprintf("127.0.0.1:%d:80", port),
		BusyboxImage, "httpd", "-f", "-p", "80", "-h", "/www"); err != nil {
		t.Fatalf("docker run -p on an egress=auto network: %v", err)
	}
	ip1, ip2 := containerIP(t, c1, netName), containerIP(t, c2, netName)

	links := func(t *testing.T, c string) []string {
		t.Helper()
		out, err := Docker(ctx, "exec", c, "ip", "-o", "link", "show")
		if err != nil {
			t.Fatal(err)
		}
		l := linkNames(out)
		slices.Sort(l)
		return l
	}
	defaults := func(t *testing.T, c string) []string {
		t.Helper()
		out, err := Docker(ctx, "exec", c, "ip", "-4", "route", "show")
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
	onGWBridge := func(t *testing.T, c string) bool {
		t.Helper()
		cid, err := Docker(ctx, "inspect", "-f", "{{.Id}}", c)
		if err != nil {
			t.Fatal(err)
		}
		gw, err := Docker(ctx, "network", "inspect", "-f", "{{json .Containers}}", "docker_gwbridge")
		return err == nil && strings.Contains(gw, cid)
	}

	t.Run("no port: the host's way out", func(t *testing.T) {
		if l := links(t, c1); !slices.Equal(l, []string{"eth0", "lo"}) {
			t.Errorf("%s's links %v, want lo and eth0 only", c1, l)
		}
		if onGWBridge(t, c1) {
			t.Errorf("docker_gwbridge has an endpoint of %s, which publishes no port", c1)
		}
		want := fmt.Sprintf("default via %s dev eth0", gateway)
		if d := defaults(t, c1); len(d) != 1 || !strings.HasPrefix(d[0], want) {
			t.Errorf("%s's default routes %q, want one %q", c1, d, want)
		}
		name, nsAddr := outsideNS(t, outside)
		if out, err := run(ctx, "", nil, "ip", "netns", "exec", name, "ip", "route", "get", ip1.String()); err == nil {
			t.Fatalf("the outside namespace has a route to the container's address %s, so the test proves nothing: %s", ip1, out)
		}
		if err := ping(ctx, c1, nsAddr.String()); err != nil {
			t.Errorf("ping %s (outside the overlay, no route back to %s) from %s within 15 s: %v", nsAddr, subnet, c1, err)
		}
	})
	t.Run("published port: docker_gwbridge", func(t *testing.T) {
		if l := links(t, c2); len(l) != 3 {
			t.Errorf("%s's links %v, want lo, eth0 and docker_gwbridge's", c2, l)
		}
		if !onGWBridge(t, c2) {
			t.Errorf("docker_gwbridge has no endpoint of %s, which publishes a port", c2)
		}
		if d := defaults(t, c2); len(d) != 1 || strings.Contains(d[0], "via "+gateway.String()+" ") {
			t.Errorf("%s's default routes %q, want one, not via the overlay's gateway %s", c2, d, gateway)
		}
		url := fmt.Sprintf("http://127.0.0.1:%d/", port)
		err := Eventually(ctx, 15*time.Second, func(ctx context.Context) error {
			body, err := get(ctx, url)
			if err != nil {
				return err
			}
			if got, want := strings.TrimSpace(body), "consul-overlay-test"; got != want {
				return fmt.Errorf("GET %s: body %q, want %q", url, got, want)
			}
			return nil
		})
		if err != nil {
			t.Errorf("-p 127.0.0.1:%d:80 to %s within 15 s: %v", port, c2, err)
		}
	})
	t.Run("the two reach each other", func(t *testing.T) {
		if err := ping(ctx, c1, ip2.String()); err != nil {
			t.Errorf("ping %s from %s: %v", ip2, c1, err)
		}
		if err := ping(ctx, c2, ip1.String()); err != nil {
			t.Errorf("ping %s from %s: %v", ip1, c2, err)
		}
	})

	if rules, err := rulesNaming(ctx, subnet.String()); err != nil {
		t.Error(err)
	} else if len(rules) == 0 {
		t.Errorf("no firewall rule names the subnet %s while the egress=auto network is up", subnet)
	}
	if _, err := Docker(ctx, "rm", "-f", c1, c2); err != nil {
		t.Error(err)
	}
	if _, err := Docker(ctx, "network", "rm", netName); err != nil {
		t.Error(err)
	}
	var ours []string
	for l := range withNetwork {
		if !before[l] {
			ours = append(ours, l)
		}
	}
	assertGone(t, "after docker network rm", before, ours)
	if rules, err := rulesNaming(ctx, subnet.String()); err != nil {
		t.Error(err)
	} else if len(rules) > 0 {
		t.Errorf("firewall rules naming the removed network's subnet %s:\n%s", subnet, strings.Join(rules, "\n"))
	}
}
