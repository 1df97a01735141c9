package driver

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
)

// egressOf is the kernel description a fake data plane was last given for
// the overlay of Docker network id on d.
func egressOf(t *testing.T, d *Driver, dp *fakeDataplane, id string) bool {
	t.Helper()
	l := d.network(id)
	if l == nil {
		t.Fatalf("network %s not bound", id)
	}
	dp.mu.Lock()
	defer dp.mu.Unlock()
	n, ok := dp.networks[l.rec.VNI]
	if !ok {
		t.Fatalf("network %s (vni %d) has no overlay", id, l.rec.VNI)
	}
	return n.Egress
}

// joinGateway creates endpoint ep at addr on Docker network id and joins
// it without published ports, returning Join's IPv4 gateway.
func joinGateway(t *testing.T, d *Driver, id, ep, addr string) string {
	t.Helper()
	if _, err := d.CreateEndpoint(epReq(id, ep, addr)); err != nil {
		t.Fatal(err)
	}
	jr, err := d.Join(&network.JoinRequest{NetworkID: id, EndpointID: ep, SandboxKey: "/var/run/docker/netns/abc"})
	if err != nil {
		t.Fatal(err)
	}
	if (jr.Gateway != "") != jr.DisableGatewayService {
		t.Errorf("Join on %s: Gateway %q with DisableGatewayService %v", id, jr.Gateway, jr.DisableGatewayService)
	}
	return jr.Gateway
}

// TestDefaultEgress: a network created without -o egress gets egress=auto
// when it can have it on the creating host, and its record says that the
// value is the default (egress_default, not egress); Docker's
// docker_gwbridge (egress=docker) otherwise: --internal, no IPv4 gateway,
// or a host that cannot be the way out. An -o egress, any value, is
// recorded as given and no default is chosen.
func TestDefaultEgress(t *testing.T) {
	cases := []struct {
		name        string
		generic     map[string]interface{}
		internal    bool
		v6Only      bool
		blocked     error
		wantGiven   string // the record's "egress"
		wantDefault string // the record's egress_default
		wantEgress  bool   // the kernel network's Egress
		wantGateway string // Join's gateway, without published ports
	}{
		{name: "absent", wantDefault: egressAuto, wantEgress: true, wantGateway: "10.5.0.1"},
		{name: "absent on a host that cannot route", blocked: errors.New("egress with IPv4 forwarding off")},
		{name: "absent on an internal network", internal: true},
		{name: "absent on an IPv6-only network", v6Only: true},
		{name: "docker", generic: map[string]interface{}{"egress": "docker"}, wantGiven: egressDocker},
		{name: "auto", generic: map[string]interface{}{"egress": "auto"}, wantGiven: egressAuto, wantEgress: true, wantGateway: "10.5.0.1"},
		{name: "host", generic: map[string]interface{}{"egress": "host"}, wantGiven: egressHost, wantEgress: true, wantGateway: "10.5.0.1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dp := newFake()
			dp.egressBlocked = tc.blocked
			d := newTestDriver(t, openStore(t, filepath.Join(t.TempDir(), "s.db")), "a", "192.0.2.1", dp)
			if err := d.CreateNetwork(egressCreateReq(tc.generic, 5, tc.internal, tc.v6Only)); err != nil {
				t.Fatal(err)
			}
			rec := d.network("n1").rec
			given, hasGiven := rec.Options[cluster.OptionEgress]
			if given != tc.wantGiven || hasGiven != (tc.wantGiven != "") {
				t.Errorf("record's egress %q (present %v), want %q", given, hasGiven, tc.wantGiven)
			}
			if got := rec.Options[cluster.OptionEgressDefault]; got != tc.wantDefault {
				t.Errorf("record's %s %q, want %q", cluster.OptionEgressDefault, got, tc.wantDefault)
			}
			if got := egressOf(t, d, dp, "n1"); got != tc.wantEgress {
				t.Errorf("kernel network Egress %v, want %v", got, tc.wantEgress)
			}
			if tc.v6Only {
				return
			}
			if got := joinGateway(t, d, "n1", "ep1", "10.5.0.2/24"); got != tc.wantGateway {
				t.Errorf("Join's gateway %q, want %q", got, tc.wantGateway)
			}
		})
	}
}

// TestDefaultEgressAcrossHosts: the first host's choice is the network's
// on every host. A host that gives no -o egress takes the record's (the
// default auto, or egress=docker of a network created before the default
// or where it could not be auto); one that gives another value is refused
// naming both; a host that cannot be the way out of an auto network is
// refused naming why, and keeps nothing of the create.
func TestDefaultEgressAcrossHosts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	host := func(id, vtep string, blocked error) (*Driver, *fakeDataplane) {
		dp := newFake()
		dp.egressBlocked = blocked
		return newHostDriver(t, openStore(t, path), id, id, vtep, dp), dp
	}
	a, _ := host("a", "192.0.2.1", nil)
	b, dpB := host("b", "192.0.2.2", nil)
	app := map[string]interface{}{"name": "app"}
	if err := a.CreateNetwork(createReq("na", app, "10.6.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if err := b.CreateNetwork(createReq("nb", app, "10.6.0.0/24")); err != nil {
		t.Fatalf("a second host without -o egress: %v", err)
	}
	if !egressOf(t, b, dpB, "nb") {
		t.Error("the second host's overlay has no Egress, the record's default is auto")
	}
	if got := joinGateway(t, b, "nb", "ep-b", "10.6.0.9/24"); got != "10.6.0.1" {
		t.Errorf("Join on the second host: gateway %q, want 10.6.0.1", got)
	}

	c, dpC := host("c", "192.0.2.3", errors.New("egress with IPv4 forwarding off (net.ipv4.ip_forward=0)"))
	err := c.CreateNetwork(createReq("nc", app, "10.6.0.0/24"))
	if err == nil {
		t.Fatal("a host that cannot be the way out joined an egress=auto network")
	}
	for _, w := range []string{"nc", `"app"`, "ip_forward"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not name %q", err, w)
		}
	}
	if n, _ := dpC.counts(); n != 0 || c.network("nc") != nil {
		t.Errorf("the refused create left %d overlays, bound %v", n, c.network("nc") != nil)
	}

	for _, v := range []string{egressDocker, egressHost} {
		err := b.CreateNetwork(createReq("nb-"+v, map[string]interface{}{"name": "app", "egress": v}, "10.6.0.0/24"))
		if !errors.Is(err, cluster.ErrIncompatible) || !strings.Contains(err.Error(), fmt.Sprintf("egress=auto, this request %s", v)) {
			t.Errorf("egress=%s on the default auto network: %v, want ErrIncompatible naming both", v, err)
		}
	}

	// A network without a default in its record (made where auto was not
	// possible, or before the default) stays egress=docker on a host that
	// could have it.
	if err := c.CreateNetwork(createReq("nc-old", map[string]interface{}{"name": "old"}, "10.7.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if err := b.CreateNetwork(createReq("nb-old", map[string]interface{}{"name": "old"}, "10.7.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if egressOf(t, b, dpB, "nb-old") {
		t.Error("a network recorded without egress got Egress on a host that joined it")
	}
	if got := joinGateway(t, b, "nb-old", "ep-old", "10.7.0.9/24"); got != "" {
		t.Errorf("Join on the egress=docker network: gateway %q, want none", got)
	}
}

// TestEgressModeRecorded: the record's -o egress wins over a default, a
// default counts where no -o egress was given, and a value this release
// does not know reads as docker.
func TestEgressModeRecorded(t *testing.T) {
	for _, tc := range []struct {
		opts map[string]string
		want string
	}{
		{nil, egressDocker},
		{map[string]string{cluster.OptionEgressDefault: "auto"}, egressAuto},
		{map[string]string{"egress": "docker", cluster.OptionEgressDefault: "auto"}, egressDocker},
		{map[string]string{"egress": "host"}, egressHost},
		{map[string]string{cluster.OptionEgressDefault: "later"}, egressDocker},
	} {
		if got := egressMode(cluster.Network{Options: tc.opts}); got != tc.want {
			t.Errorf("egressMode(%v) = %q, want %q", tc.opts, got, tc.want)
		}
	}
}
