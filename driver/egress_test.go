package driver

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
)

// TestParseEgressOption: -o egress takes docker (the default), host or
// auto; anything else, and egress=host or auto on an --internal network or
// one without an IPv4 gateway, is refused naming the option.
func TestParseEgressOption(t *testing.T) {
	cases := []struct {
		name     string
		generic  map[string]interface{}
		internal bool
		v6Only   bool
		want     bool
		mode     string // egressDocker when ""
		wantErr  []string
	}{
		{name: "absent"},
		{name: "docker", generic: map[string]interface{}{"egress": "docker"}},
		{name: "host", generic: map[string]interface{}{"egress": "host"}, want: true, mode: egressHost},
		{name: "host with spaces", generic: map[string]interface{}{"egress": " host "}, want: true, mode: egressHost},
		{name: "auto", generic: map[string]interface{}{"egress": "auto"}, want: true, mode: egressAuto},
		{name: "auto on an internal network", generic: map[string]interface{}{"egress": "auto"}, internal: true, wantErr: []string{"egress=auto", "--internal", "no way out"}},
		{name: "auto without an IPv4 gateway", generic: map[string]interface{}{"egress": "auto"}, v6Only: true, wantErr: []string{"egress=auto", "no IPv4 gateway"}},
		{name: "docker on an internal network", generic: map[string]interface{}{"egress": "docker"}, internal: true},
		{name: "bad value", generic: map[string]interface{}{"egress": "nat"}, wantErr: []string{`egress="nat"`, "docker", "host", "auto"}},
		{name: "upper case", generic: map[string]interface{}{"egress": "HOST"}, wantErr: []string{`egress="HOST"`}},
		{name: "empty", generic: map[string]interface{}{"egress": ""}, wantErr: []string{`egress=""`}},
		{name: "host on an internal network", generic: map[string]interface{}{"egress": "host"}, internal: true, wantErr: []string{"egress=host", "--internal", "no way out"}},
		{name: "host without an IPv4 gateway", generic: map[string]interface{}{"egress": "host"}, v6Only: true, wantErr: []string{"egress=host", "no IPv4 gateway"}},
		{name: "unknown option lists egress", generic: map[string]interface{}{"egres": "host"}, wantErr: []string{"unknown option egres", "egress="}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseNetworkOptions(egressCreateReq(tc.generic, 1, tc.internal, tc.v6Only))
			if tc.wantErr != nil {
				if err == nil {
					t.Fatalf("accepted %v, want an error naming %q", tc.generic, tc.wantErr)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not name %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := hostEgress(o.egressMode); got != tc.want {
				t.Errorf("egress %v, want %v", got, tc.want)
			}
			mode := tc.mode
			if mode == "" {
				mode = egressDocker
			}
			if o.egressMode != mode {
				t.Errorf("egress mode %q, want %q", o.egressMode, mode)
			}
		})
	}
}

// egressCreateReq is createReq of network n1 on 10.<third>.0.0/24,
// --internal if internal, or IPv6-only on fd00:<third>::/64 if v6Only.
func egressCreateReq(generic map[string]interface{}, third int, internal, v6Only bool) *network.CreateNetworkRequest {
	req := createReq("n1", generic, fmt.Sprintf("10.%d.0.0/24", third))
	if internal {
		req.Options[optInternal] = true
	}
	if v6Only {
		req.IPv4Data = nil
		req.IPv6Data = []*network.IPAMData{{AddressSpace: "ours", Pool: fmt.Sprintf("fd00:%d::/64", third), Gateway: fmt.Sprintf("fd00:%d::1/64", third)}}
	}
	return req
}

// TestDifferingEgress: a host asking for another egress than the record's
// is told which; one that asks for none takes the record's, whatever it
// is, the default its first host chose included (egress_default); a value
// this release does not know (a later release's) reads as docker.
func TestDifferingEgress(t *testing.T) {
	rec := func(opts map[string]string) cluster.Network { return cluster.Network{Options: opts} }
	asked := func(generic map[string]string) *networkOptions {
		o := &networkOptions{generic: generic, egressMode: egressDocker}
		if v, ok := generic["egress"]; ok {
			m, err := parseEgress(v)
			if err != nil {
				t.Fatal(err)
			}
			o.egressMode, o.egressGiven = m, true
		}
		return o
	}
	dflt := map[string]string{cluster.OptionEgressDefault: "auto"}
	cases := []struct {
		name     string
		recorded map[string]string
		asked    map[string]string
		want     []string
	}{
		{"both host", map[string]string{"egress": "host"}, map[string]string{"egress": "host"}, nil},
		{"docker and absent", map[string]string{"egress": "docker"}, map[string]string{}, nil},
		{"absent and docker", nil, map[string]string{"egress": "docker"}, nil},
		{"host and absent", map[string]string{"egress": "host"}, map[string]string{}, nil},
		{"absent and host", nil, map[string]string{"egress": "host"}, []string{"egress=docker, this request host"}},
		{"both auto", map[string]string{"egress": "auto"}, map[string]string{"egress": "auto"}, nil},
		{"auto and host", map[string]string{"egress": "auto"}, map[string]string{"egress": "host"}, []string{"egress=auto, this request host"}},
		{"auto and absent", map[string]string{"egress": "auto"}, map[string]string{}, nil},
		{"auto and docker", map[string]string{"egress": "auto"}, map[string]string{"egress": "docker"}, []string{"egress=auto, this request docker"}},
		{"host and auto", map[string]string{"egress": "host"}, map[string]string{"egress": "auto"}, []string{"egress=host, this request auto"}},
		{"default auto and absent", dflt, map[string]string{}, nil},
		{"default auto and auto", dflt, map[string]string{"egress": "auto"}, nil},
		{"default auto and docker", dflt, map[string]string{"egress": "docker"}, []string{"egress=auto, this request docker"}},
		{"default auto and host", dflt, map[string]string{"egress": "host"}, []string{"egress=auto, this request host"}},
		{"a later release's value and absent", map[string]string{"egress": "later"}, map[string]string{}, nil},
		{"a later release's value and docker", map[string]string{"egress": "later"}, map[string]string{"egress": "docker"}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := differingSettings(rec(tc.recorded), asked(tc.asked))
			if !slices.Equal(got, tc.want) {
				t.Errorf("differingSettings %q, want %q", got, tc.want)
			}
		})
	}
}

// egressDriver creates an egress=host network "ne" (name app, 10.1.0.0/24,
// gateway 10.1.0.1) and an egress=docker one "nd" (10.2.0.0/24) on one
// driver.
func egressDriver(t *testing.T) (*Driver, *fakeDataplane) {
	t.Helper()
	dp := newFake()
	d := newTestDriver(t, openStore(t, filepath.Join(t.TempDir(), "s.db")), "a", "192.0.2.1", dp)
	if err := d.CreateNetwork(createReq("ne", map[string]interface{}{"name": "app", "egress": "host"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if err := d.CreateNetwork(createReq("nd", map[string]interface{}{"egress": "docker"}, "10.2.0.0/24")); err != nil {
		t.Fatal(err)
	}
	return d, dp
}

// TestEgressHostJoin: the data plane is told the network's egress, and
// Join of an egress=host network's endpoint gives the container the IPv4
// gateway, no IPv6 one, and keeps docker_gwbridge away; an egress=docker
// network's Join gives none of that.
func TestEgressHostJoin(t *testing.T) {
	d, dp := egressDriver(t)
	dp.mu.Lock()
	var egressNets, defaultNets int
	for _, n := range dp.networks {
		if n.Egress {
			egressNets++
		} else {
			defaultNets++
		}
	}
	dp.mu.Unlock()
	if egressNets != 1 || defaultNets != 1 {
		t.Fatalf("data plane got %d networks with Egress and %d without, want 1 and 1", egressNets, defaultNets)
	}

	for _, tc := range []struct {
		net, ep, addr string
		gateway       string
		disable       bool
	}{
		{"ne", "ep-e", "10.1.0.2/24", "10.1.0.1", true},
		{"nd", "ep-d", "10.2.0.2/24", "", false},
	} {
		if _, err := d.CreateEndpoint(epReq(tc.net, tc.ep, tc.addr)); err != nil {
			t.Fatal(err)
		}
		jr, err := d.Join(&network.JoinRequest{NetworkID: tc.net, EndpointID: tc.ep, SandboxKey: "/var/run/docker/netns/abc"})
		if err != nil {
			t.Fatal(err)
		}
		if jr.Gateway != tc.gateway || jr.GatewayIPv6 != "" || jr.DisableGatewayService != tc.disable {
			t.Errorf("Join on %s: Gateway %q, GatewayIPv6 %q, DisableGatewayService %v; want %q, \"\", %v",
				tc.net, jr.Gateway, jr.GatewayIPv6, jr.DisableGatewayService, tc.gateway, tc.disable)
		}
	}
}

// TestEgressHostJoinDualStack: egress is IPv4 only: a dual-stack
// egress=host network's Join gives the IPv4 gateway and no IPv6 one.
func TestEgressHostJoinDualStack(t *testing.T) {
	d := newTestDriver(t, openStore(t, filepath.Join(t.TempDir(), "s.db")), "a", "192.0.2.1", newFake())
	req := createReq("n6", map[string]interface{}{"egress": "host"}, "10.3.0.0/24")
	req.Options[optEnableIPv6] = true
	req.IPv6Data = []*network.IPAMData{{AddressSpace: "ours", Pool: "fd00:3::/64", Gateway: "fd00:3::1/64"}}
	if err := d.CreateNetwork(req); err != nil {
		t.Fatal(err)
	}
	ep := epReq("n6", "ep6", "10.3.0.2/24")
	ep.Interface.AddressIPv6 = "fd00:3::2/64"
	if _, err := d.CreateEndpoint(ep); err != nil {
		t.Fatal(err)
	}
	jr, err := d.Join(&network.JoinRequest{NetworkID: "n6", EndpointID: "ep6"})
	if err != nil {
		t.Fatal(err)
	}
	if jr.Gateway != "10.3.0.1" || jr.GatewayIPv6 != "" || !jr.DisableGatewayService {
		t.Errorf("Join: Gateway %q, GatewayIPv6 %q, DisableGatewayService %v; want 10.3.0.1, none, true", jr.Gateway, jr.GatewayIPv6, jr.DisableGatewayService)
	}
}

// TestEgressHostJoinWithoutGateway: a record of an egress=host network
// that lost its gateways (CreateNetwork refuses one without) fails Join
// naming the endpoint and the network, before the endpoint counts as
// joined.
func TestEgressHostJoinWithoutGateway(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	store := openStore(t, path)
	a := newHostDriver(t, store, "a", "a", "192.0.2.1", newFake())
	if err := a.CreateNetwork(createReq("na", map[string]interface{}{"name": "app", "egress": "host"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	p, err := store.Get(ctx, "networks/name-app/config")
	if err != nil {
		t.Fatal(err)
	}
	var stored struct {
		Schema int            `json:"schema"`
		Data   map[string]any `json:"data"`
	}
	if err := json.Unmarshal(p.Value, &stored); err != nil {
		t.Fatal(err)
	}
	if _, ok := stored.Data["gateways"]; !ok {
		t.Fatalf("record %s has no gateways to remove", p.Value)
	}
	delete(stored.Data, "gateways")
	b, _ := json.Marshal(stored)
	if err := store.Put(ctx, p.Key, b); err != nil {
		t.Fatal(err)
	}

	h := newHostDriver(t, openStore(t, path), "b", "b", "192.0.2.2", newFake())
	if err := h.CreateNetwork(createReq("nb", map[string]interface{}{"name": "app", "egress": "host"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := h.CreateEndpoint(epReq("nb", "ep-b1", "10.1.0.9/24")); err != nil {
		t.Fatal(err)
	}
	_, err = h.Join(&network.JoinRequest{NetworkID: "nb", EndpointID: "ep-b1"})
	if err == nil {
		t.Fatal("Join on an egress=host network without an IPv4 gateway succeeded")
	}
	for _, w := range []string{"ep-b1", `"app"`, "nb", "no IPv4 gateway"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("Join error %q does not name %q", err, w)
		}
	}
	h.mu.Lock()
	joined := h.endpoints["ep-b1"].joinedHere
	h.mu.Unlock()
	if joined {
		t.Error("the failed Join marked the endpoint joined")
	}
}

// portmapOption is the portmap sandbox option as the plugin decodes it
// from Docker's JSON.
func portmapOption(t *testing.T, js string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(js), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestEgressHostPublishedPortsRefused: ProgramExternalConnectivity of an
// egress=host network's endpoint with published ports fails, naming the
// endpoint, the network, the ports and the way out; without published
// ports, or on an egress=docker network, it succeeds.
func TestEgressHostPublishedPortsRefused(t *testing.T) {
	d, _ := egressDriver(t)
	const p = `[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":18080,"HostPortEnd":18080}]`
	const all = `[{"Proto":17,"IP":"","Port":53,"HostIP":"","HostPort":0,"HostPortEnd":0}]`
	exposed := portmapOption(t, `[{"Proto":6,"Port":80}]`)
	cases := []struct {
		name    string
		net     string
		options map[string]interface{}
		wantErr []string
	}{
		{"-p on egress=host", "ne", map[string]interface{}{optPortMap: portmapOption(t, p), "com.docker.network.endpoint.exposedports": exposed},
			[]string{"ep-1", `"app"`, "ne", "-p 18080:80/tcp", "not supported", "egress=host", "bridge network", "-o egress=auto", "-o egress=docker"}},
		{"-P on egress=host", "ne", map[string]interface{}{optPortMap: portmapOption(t, all)}, []string{"-p 53/udp", "egress=host"}},
		{"no portmap", "ne", map[string]interface{}{"com.docker.network.endpoint.exposedports": exposed}, nil},
		{"null portmap", "ne", map[string]interface{}{optPortMap: nil}, nil},
		{"empty portmap", "ne", map[string]interface{}{optPortMap: portmapOption(t, `[]`)}, nil},
		{"no options", "ne", nil, nil},
		{"-p on an egress=docker network", "nd", map[string]interface{}{optPortMap: portmapOption(t, p)}, nil},
		{"-p on an unknown network", "nx", map[string]interface{}{optPortMap: portmapOption(t, p)}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := d.ProgramExternalConnectivity(&network.ProgramExternalConnectivityRequest{NetworkID: tc.net, EndpointID: "ep-1", Options: tc.options})
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
	if err := d.RevokeExternalConnectivity(&network.RevokeExternalConnectivityRequest{NetworkID: "ne", EndpointID: "ep-1"}); err != nil {
		t.Errorf("RevokeExternalConnectivity: %v", err)
	}
}

// TestPublishedPorts: the portmap's bindings read as the -p arguments that
// made them; an unreadable one still counts.
func TestPublishedPorts(t *testing.T) {
	cases := []struct {
		js   string
		want []string
	}{
		{`null`, nil},
		{`[]`, nil},
		{`[{"Proto":6,"Port":80,"HostPort":8080,"HostPortEnd":8080}]`, []string{"8080:80/tcp"}},
		{`[{"Proto":6,"Port":80,"HostIP":"127.0.0.1","HostPort":8080}]`, []string{"127.0.0.1:8080:80/tcp"}},
		{`[{"Proto":6,"Port":80,"HostIP":"::1","HostPort":8080}]`, []string{"[::1]:8080:80/tcp"}},
		{`[{"Proto":132,"Port":80,"HostPort":8080,"HostPortEnd":8090}]`, []string{"8080-8090:80/sctp"}},
		{`[{"Proto":17,"Port":53}]`, []string{"53/udp"}},
		{`[{"Proto":6,"Port":80,"HostIP":"0.0.0.0","HostPort":8080},{"Proto":6,"Port":80,"HostIP":"::","HostPort":8080}]`, []string{"8080:80/tcp"}},
		{`[{"Proto":"tcp"}]`, []string{"?"}},
		{`"80"`, []string{"?"}},
	}
	for _, tc := range cases {
		got := publishedPorts(portmapOption(t, tc.js))
		if !slices.Equal(got, tc.want) {
			t.Errorf("publishedPorts(%s) = %q, want %q", tc.js, got, tc.want)
		}
	}
}

// TestEgressAutoJoin: on an egress=auto network the data plane is told the
// network's egress, as for egress=host, and Join gives a container that
// publishes no port the IPv4 gateway and keeps docker_gwbridge away, while
// one that publishes a port (-p, -P, or a binding it cannot read) gets no
// gateway, so that Docker connects it to docker_gwbridge, which publishes
// its ports. ProgramExternalConnectivity, which Docker calls only on the
// gateway's endpoint, refuses published ports there as on egress=host.
func TestEgressAutoJoin(t *testing.T) {
	dp := newFake()
	d := newTestDriver(t, openStore(t, filepath.Join(t.TempDir(), "s.db")), "a", "192.0.2.1", dp)
	if err := d.CreateNetwork(createReq("na", map[string]interface{}{"name": "auto", "egress": "auto"}, "10.4.0.0/24")); err != nil {
		t.Fatal(err)
	}
	dp.mu.Lock()
	var egressNets int
	for _, n := range dp.networks {
		if n.Egress {
			egressNets++
		}
	}
	dp.mu.Unlock()
	if egressNets != 1 {
		t.Fatalf("data plane got %d networks with Egress, want the egress=auto one", egressNets)
	}
	const p = `[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":18080,"HostPortEnd":18080}]`
	const all = `[{"Proto":17,"IP":"","Port":53,"HostIP":"","HostPort":0,"HostPortEnd":0}]`
	exposed := portmapOption(t, `[{"Proto":6,"Port":80}]`)
	cases := []struct {
		name    string
		options map[string]interface{}
		gateway string
	}{
		{"no options", nil, "10.4.0.1"},
		{"exposed ports only", map[string]interface{}{"com.docker.network.endpoint.exposedports": exposed}, "10.4.0.1"},
		{"empty portmap", map[string]interface{}{optPortMap: portmapOption(t, `[]`)}, "10.4.0.1"},
		{"-p", map[string]interface{}{optPortMap: portmapOption(t, p), "com.docker.network.endpoint.exposedports": exposed}, ""},
		{"-P", map[string]interface{}{optPortMap: portmapOption(t, all)}, ""},
		{"unreadable binding", map[string]interface{}{optPortMap: portmapOption(t, `"80"`)}, ""},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ep := fmt.Sprintf("ep-%d", i)
			if _, err := d.CreateEndpoint(epReq("na", ep, fmt.Sprintf("10.4.0.%d/24", 10+i))); err != nil {
				t.Fatal(err)
			}
			jr, err := d.Join(&network.JoinRequest{NetworkID: "na", EndpointID: ep, SandboxKey: "/var/run/docker/netns/abc", Options: tc.options})
			if err != nil {
				t.Fatal(err)
			}
			if jr.Gateway != tc.gateway || jr.GatewayIPv6 != "" || jr.DisableGatewayService != (tc.gateway != "") {
				t.Errorf("Join: Gateway %q, GatewayIPv6 %q, DisableGatewayService %v; want %q, \"\", %v",
					jr.Gateway, jr.GatewayIPv6, jr.DisableGatewayService, tc.gateway, tc.gateway != "")
			}
		})
	}
	err := d.ProgramExternalConnectivity(&network.ProgramExternalConnectivityRequest{NetworkID: "na", EndpointID: "ep-0", Options: map[string]interface{}{optPortMap: portmapOption(t, p)}})
	if err == nil {
		t.Error("ProgramExternalConnectivity with published ports on the gateway's endpoint of an egress=auto network accepted")
	} else {
		for _, w := range []string{"ep-0", `"auto"`, "-p 18080:80/tcp", "egress=auto"} {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not name %q", err, w)
			}
		}
	}
	if err := d.ProgramExternalConnectivity(&network.ProgramExternalConnectivityRequest{NetworkID: "na", EndpointID: "ep-0"}); err != nil {
		t.Errorf("ProgramExternalConnectivity without published ports: %v", err)
	}
}
