package driver

import (
	"bytes"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"
)

// Join gives a container's first consul-overlay endpoint with an IPv4
// address a connected route to the well-known address, and no other
// endpoint of the same container; the network's consul_api option reaches
// the data plane.
func TestJoinLinkLocalRoute(t *testing.T) {
	dp := newFake()
	d, err := New(Config{HostID: "a", VTEP: netip.MustParseAddr("192.0.2.1"), LinkLocal: netip.MustParseAddr("169.254.1.1")},
		openStore(t, filepath.Join(t.TempDir(), "s.db")), dp)
	if err != nil {
		t.Fatal(err)
	}
	d.Start()
	t.Cleanup(func() { d.Close() })
	select {
	case <-d.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("driver did not restore")
	}
	for _, n := range []struct {
		id, subnet string
		opts       map[string]interface{}
	}{
		{"net-api", "10.1.0.0/24", map[string]interface{}{"name": "api", "consul_api": "true"}},
		{"net-plain", "10.2.0.0/24", map[string]interface{}{"name": "plain"}},
	} {
		if err := d.CreateNetwork(createReq(n.id, n.opts, n.subnet)); err != nil {
			t.Fatal(err)
		}
	}
	if n := dp.networks[d.network("net-api").rec.VNI]; !n.ConsulAPI {
		t.Errorf("consul_api=true network programmed with ConsulAPI false")
	}
	if n := dp.networks[d.network("net-plain").rec.VNI]; n.ConsulAPI {
		t.Errorf("network without consul_api programmed with ConsulAPI true")
	}

	create := func(netID, epID, v4, v6 string) {
		t.Helper()
		if _, err := d.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: netID, EndpointID: epID,
			Interface: &network.EndpointInterface{Address: v4, AddressIPv6: v6}}); err != nil {
			t.Fatal(err)
		}
	}
	join := func(netID, epID, sandbox string) []*network.StaticRoute {
		t.Helper()
		jr, err := d.Join(&network.JoinRequest{NetworkID: netID, EndpointID: epID, SandboxKey: "/var/run/docker/netns/" + sandbox})
		if err != nil {
			t.Fatal(err)
		}
		return jr.StaticRoutes
	}
	create("net-api", "ep1", "10.1.0.2/24", "")
	create("net-plain", "ep2", "10.2.0.2/24", "")
	create("net-plain", "ep3", "10.2.0.3/24", "")
	want := network.StaticRoute{Destination: "169.254.1.1/32", RouteType: 1}
	if r := join("net-api", "ep1", "c1c1c1c1c1c1"); len(r) != 1 || *r[0] != want {
		t.Errorf("first endpoint of container c1: routes %v, want %+v", r, want)
	}
	if r := join("net-plain", "ep2", "c1c1c1c1c1c1"); len(r) != 0 {
		t.Errorf("second endpoint of container c1: routes %+v, want none (libnetwork would fail on a duplicate)", r[0])
	}
	if r := join("net-plain", "ep3", "c2c2c2c2c2c2"); len(r) != 1 {
		t.Errorf("first endpoint of container c2: routes %v, want the route", r)
	}
	// Once c1's first endpoint has left, a new endpoint of c1 gets it.
	if err := d.Leave(&network.LeaveRequest{NetworkID: "net-api", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}
	if err := d.Leave(&network.LeaveRequest{NetworkID: "net-plain", EndpointID: "ep2"}); err != nil {
		t.Fatal(err)
	}
	create("net-plain", "ep4", "10.2.0.4/24", "")
	if r := join("net-plain", "ep4", "c1c1c1c1c1c1"); len(r) != 1 {
		t.Errorf("endpoint of c1 after the others left: routes %v, want the route", r)
	}
}

func TestParseConsulAPIOption(t *testing.T) {
	for _, tc := range []struct {
		v  string
		ok bool
	}{{"true", true}, {"false", true}, {"1", true}, {"yes", false}} {
		_, err := parseNetworkOptions(createReq("n", map[string]interface{}{"consul_api": tc.v}, "10.1.0.0/24"))
		if (err == nil) != tc.ok {
			t.Errorf("consul_api=%q: error %v, want ok %v", tc.v, err, tc.ok)
		}
	}
}

// TestLeaveOfLinkLocalEndpointWarns: a container on two consul-overlay
// networks has its route to the link-local address on the first one only
// (libnetwork takes one route to a /32). Disconnecting that network takes
// the route with it, and the container no longer reaches Consul's DNS and
// API there: the plugin says so, naming the container's other endpoint.
// Leaving the other network says nothing.
func TestLeaveOfLinkLocalEndpointWarns(t *testing.T) {
	var logs syncBuffer
	d, err := New(Config{HostID: "a", VTEP: netip.MustParseAddr("192.0.2.1"), LinkLocal: netip.MustParseAddr("169.254.1.1"),
		Logger: slog.New(slog.NewTextHandler(&logs, nil))},
		openStore(t, filepath.Join(t.TempDir(), "s.db")), newFake())
	if err != nil {
		t.Fatal(err)
	}
	d.Start()
	t.Cleanup(func() { d.Close() })
	<-d.Ready()
	mustCreate(t, d, "n1", "10.1.0.0/24")
	if err := d.CreateNetwork(createReq("n2", map[string]interface{}{"name": "other"}, "10.2.0.0/24")); err != nil {
		t.Fatal(err)
	}
	for _, ep := range []struct{ net, id, addr string }{{"n1", "ep1", "10.1.0.2/24"}, {"n2", "ep2", "10.2.0.2/24"}} {
		if _, err := d.CreateEndpoint(epReq(ep.net, ep.id, ep.addr)); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Join(&network.JoinRequest{NetworkID: ep.net, EndpointID: ep.id, SandboxKey: "/var/run/docker/netns/c1c1c1c1c1c1"}); err != nil {
			t.Fatal(err)
		}
	}
	const warning = "no longer reaches it"
	if err := d.Leave(&network.LeaveRequest{NetworkID: "n2", EndpointID: "ep2"}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), warning) {
		t.Fatalf("leaving the network without the route warned:\n%s", logs.String())
	}
	if _, err := d.Join(&network.JoinRequest{NetworkID: "n2", EndpointID: "ep2", SandboxKey: "/var/run/docker/netns/c1c1c1c1c1c1"}); err != nil {
		t.Fatal(err)
	}
	if err := d.Leave(&network.LeaveRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}
	if out := logs.String(); !strings.Contains(out, warning) || !strings.Contains(out, "ep2") {
		t.Errorf("leaving the network that carried the route logged no warning naming ep2:\n%s", out)
	}
}

// syncBuffer is a log sink safe for the driver's goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
