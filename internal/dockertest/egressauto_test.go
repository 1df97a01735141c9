package dockertest

import (
	"fmt"
	"strings"
	"testing"
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
	egressAuto(t, newEgressNet(t, "consul-overlay-dockertest:ea", "codt-ea-", "auto"))
}

// TestDockerEgressDefault: a network created without -o egress is
// egress=auto (this host can route and masquerade): everything
// TestDockerEgressAuto proves holds for it.
func TestDockerEgressDefault(t *testing.T) {
	egressAuto(t, newEgressNet(t, "consul-overlay-dockertest:ed", "codt-ed-", ""))
}

// egressAuto is TestDockerEgressAuto on e's network.
func egressAuto(t *testing.T, e *egressNet) {
	ctx := t.Context()
	netName, c1, c2, gateway := e.name, e.c1, e.c2, e.gateway
	if _, err := Docker(ctx, "run", "-d", "--name", c1, "--network", netName,
		BusyboxImage, "sleep", "3600"); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	if _, err := Docker(ctx, "run", "-d", "--name", c2, "--network", netName,
		"-p", fmt.Sprintf("127.0.0.1:%d:80", port),
		BusyboxImage, "httpd", "-f", "-p", "80", "-h", "/www"); err != nil {
		t.Fatalf("docker run -p on an egress=%s network: %v", e.mode, err)
	}
	ip1, ip2 := containerIP(t, c1, netName), containerIP(t, c2, netName)

	t.Run("no port: the host's way out", func(t *testing.T) {
		e.hostWayOut(t, c1, ip1)
	})
	t.Run("published port: docker_gwbridge", func(t *testing.T) {
		if l := containerLinks(t, c2); len(l) != 3 {
			t.Errorf("%s's links %v, want lo, eth0 and docker_gwbridge's", c2, l)
		}
		if !onGWBridge(t, c2) {
			t.Errorf("docker_gwbridge has no endpoint of %s, which publishes a port", c2)
		}
		if d := defaultRoutes(t, c2); len(d) != 1 || strings.Contains(d[0], "via "+gateway.String()+" ") {
			t.Errorf("%s's default routes %q, want one, not via the overlay's gateway %s", c2, d, gateway)
		}
		if err := portAnswers(ctx, port); err != nil {
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

	e.removeAll(t)
}
