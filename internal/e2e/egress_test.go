//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"consul-overlay/internal/dockertest"
)

// egressHost: a network created with -o egress=host on both hosts. Each
// host is its own containers' way out: a container has one interface
// (no docker_gwbridge endpoint) and its default route via the network's
// gateway, reaches the Consul server's HTTP API and the other host's
// underlay address (neither has a route to the overlay's subnet: only
// masqueraded traffic is answered), and the containers still reach each
// other across the hosts. network rm leaves no masquerade rule.
func (s *suite) egressHost(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	name := dockertest.UniqueName("colab-egress-")
	const subnet, gateway = "10.212.0.0/24", "10.212.0.1"
	c := name + "-c"
	l.removeOnCleanup(t, name, c)
	addr := map[*Host]netip.Addr{}
	for _, h := range l.Hosts() {
		if _, err := h.Docker(ctx, "network", "create", "-d", l.Plugin, "--ipam-driver", l.Plugin,
			"--subnet", subnet, "-o", "name="+name, "-o", "egress=host", "--label", l.Label, name); err != nil {
			t.Fatal(err)
		}
		if _, err := h.Docker(ctx, "run", "-d", "--name", c, "--label", l.Label, "--network", name, l.Image, "sleep", "3600"); err != nil {
			t.Fatal(err)
		}
		ip, _, err := h.ContainerAddr(ctx, c, name)
		if err != nil {
			t.Fatal(err)
		}
		addr[h] = ip
	}
	for _, h := range l.Hosts() {
		links, err := h.InContainer(ctx, c, "ip", "-o", "link", "show")
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(strings.TrimSpace(links), "\n") + 1; n != 2 || !strings.Contains(links, " eth0@") {
			t.Errorf("%s: the container's links, want lo and eth0 only:\n%s", h, links)
		}
		routes, err := h.InContainer(ctx, c, "ip", "route", "show", "default")
		if err != nil {
			t.Fatal(err)
		}
		if want := "default via " + gateway + " dev eth0"; !strings.HasPrefix(strings.TrimSpace(routes), want) || strings.Count(routes, "default") != 1 {
			t.Errorf("%s: the container's default routes %q, want %q", h, routes, want)
		}
		s.getLeader(t, h, c)
		if err := ping(t, h, c, l.Other(h).Addr); err != nil {
			t.Errorf("%s: ping %s (underlay of %s) from %s: %v", h, l.Other(h).Addr, l.Other(h), c, err)
		}
		if err := ping(t, h, c, addr[l.Other(h)]); err != nil {
			t.Errorf("%s: ping %s (the container on %s) from %s: %v", h, addr[l.Other(h)], l.Other(h), c, err)
		}
	}
	for _, h := range l.Hosts() {
		if _, err := h.Docker(ctx, "rm", "-f", c); err != nil {
			t.Fatal(err)
		}
		if _, err := h.Docker(ctx, "network", "rm", name); err != nil {
			t.Fatal(err)
		}
		rules, err := h.RulesMentioning(ctx, []string{subnet})
		if err != nil {
			t.Fatal(err)
		}
		if len(rules) > 0 {
			t.Errorf("%s: rules naming %s after network rm:\n%s", h, subnet, strings.Join(rules, "\n"))
		}
	}
}

// removeOnCleanup removes the container c and the network name from
// every host when the test ends.
func (l *Lab) removeOnCleanup(t *testing.T, name, c string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		for _, h := range l.Hosts() {
			h.Docker(ctx, "rm", "-f", c)
			h.Docker(ctx, "network", "rm", name)
		}
	})
}

// getLeader: the container c on h reaches the Consul server's HTTP API
// (its /v1/status/leader names the server) within 20 s.
func (s *suite) getLeader(t *testing.T, h *Host, c string) {
	t.Helper()
	l := s.lab
	url := fmt.Sprintf("http://%s:%d/v1/status/leader", l.ConsulServer, l.HTTPPort)
	err := eventually(t, 20*time.Second, func(ctx context.Context) error {
		body, err := h.ContainerGet(ctx, c, url)
		if err == nil && !strings.Contains(body, l.ConsulServer.String()) {
			err = fmt.Errorf("body %q", body)
		}
		return err
	})
	if err != nil {
		t.Errorf("%s: GET %s from %s: %v", h, url, c, err)
	}
}
