package discovery

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/testenv"
)

// TestRegisterDeregister registers endpoints whose "overlay" address is a
// loopback address served by the test, so the agent's checks reach it.
func TestRegisterDeregister(t *testing.T) {
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()

	var hits atomic.Int32
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" {
			hits.Add(1)
		}
	}))
	defer web.Close()
	webAddr := netip.MustParseAddrPort(web.Listener.Addr().String())
	tcpL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcpL.Close()
	go func() {
		for {
			c, err := tcpL.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	tcpAddr := netip.MustParseAddrPort(tcpL.Addr().String())

	r := startRegistrar(t, Config{Node: "host-a", Agent: client, Interval: time.Hour, RetryMax: time.Second})
	httpEP := Endpoint{
		ID: endpointID(1), Network: "front", NetworkID: "nid1", IPv4: webAddr.Addr(), IPv6: netip.MustParseAddr("fd00::1"),
		Ports:       []Port{{"tcp", int(webAddr.Port())}},
		ContainerID: "aaaaaaaaaaaa", Register: true,
		Options: map[string]string{"SERVICE_NAME": "web", "SERVICE_TAGS": "a,b", "SERVICE_CHECK_HTTP": "/health",
			"SERVICE_CHECK_INTERVAL": "1s", "SERVICE_CHECK_INITIAL_STATUS": "critical", "SERVICE_REGION": "eu"},
	}
	tcpEP := Endpoint{
		ID: endpointID(2), Network: "front", NetworkID: "nid1", IPv4: tcpAddr.Addr(),
		Ports:    []Port{{"tcp", int(tcpAddr.Port())}, {"udp", 53}},
		Register: true,
		Options:  map[string]string{"SERVICE_NAME": "db", "SERVICE_CHECK_TCP": "true", "SERVICE_CHECK_INTERVAL": "1s"},
	}
	offEP := Endpoint{ID: endpointID(3), Network: "quiet", IPv4: loopback(30), Register: false}
	r.Register(httpEP)
	r.Register(tcpEP)
	r.Register(offEP)

	wantIDs := []string{
		httpEP.ID + ":" + strconv.Itoa(int(webAddr.Port())),
		tcpEP.ID + ":" + strconv.Itoa(int(tcpAddr.Port())),
		tcpEP.ID + ":53:udp",
	}
	slices.Sort(wantIDs)
	var services map[string]*api.AgentService
	testenv.Eventually(t, 10*time.Second, func() error {
		services, err = ourServices(ctx, client)
		if err != nil {
			return err
		}
		if got := sortedKeys(services); !slices.Equal(got, wantIDs) {
			return fmt.Errorf("services %v, want %v", got, wantIDs)
		}
		return nil
	})

	webID := httpEP.ID + ":" + strconv.Itoa(int(webAddr.Port()))
	s := services[webID]
	wantMeta := map[string]string{
		MetaManagedBy: ManagedByValue, MetaNode: "host-a", MetaNetwork: "front", MetaNetworkID: "nid1",
		MetaEndpointID: httpEP.ID, MetaContainerID: "aaaaaaaaaaaa", "region": "eu",
	}
	if s.Service != "web" || s.Address != webAddr.Addr().String() || s.Port != int(webAddr.Port()) ||
		!slices.Equal(s.Tags, []string{"a", "b"}) || !reflect.DeepEqual(s.Meta, wantMeta) ||
		s.TaggedAddresses[TaggedLANIPv6].Address != "fd00::1" {
		t.Errorf("web service = %+v", s)
	}
	udp := services[tcpEP.ID+":53:udp"]
	if udp.Service != "db-53" || !slices.Equal(udp.Tags, []string{"udp"}) || udp.Address != tcpAddr.Addr().String() {
		t.Errorf("udp service = %+v", udp)
	}
	// What the agent hands back compares equal to what we registered, or
	// anti-entropy would rewrite every service on every pass.
	r.mu.Lock()
	for _, id := range []string{httpEP.ID, tcpEP.ID} {
		for _, reg := range buildServices(owner{node: "host-a"}, r.eps[id].ep, r.eps[id].info) {
			if !sameService(services[reg.ID], reg) {
				t.Errorf("sameService(agent's %+v, ours %+v) = false", services[reg.ID], reg)
			}
		}
	}
	r.mu.Unlock()

	// Both checks turn passing against the test's listeners.
	testenv.Eventually(t, 15*time.Second, func() error {
		checks, err := client.Agent().Checks()
		if err != nil {
			return err
		}
		passing := map[string]string{}
		for _, c := range checks {
			passing[c.ServiceName] = c.Status
		}
		if passing["web"] != api.HealthPassing || passing["db-"+strconv.Itoa(int(tcpAddr.Port()))] != api.HealthPassing {
			return fmt.Errorf("check states %v", passing)
		}
		return nil
	})
	if hits.Load() == 0 {
		t.Error("the HTTP check never reached the endpoint's address")
	}

	// Deregister removes the endpoint's services and nothing else.
	r.Deregister(tcpEP.ID)
	r.Deregister("unknown-endpoint")
	testenv.Eventually(t, 10*time.Second, func() error {
		services, err = ourServices(ctx, client)
		if err != nil {
			return err
		}
		if got := sortedKeys(services); !slices.Equal(got, []string{webID}) {
			return fmt.Errorf("services %v after deregister", got)
		}
		return nil
	})
	// A sync pass with Held == nil keeps the table as it is and finds
	// nothing to change.
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if services, _ := ourServices(ctx, client); len(services) != 1 {
		t.Errorf("after Sync: %v", sortedKeys(services))
	}
}

// TestDNSTwoNodes registers one instance of a service on each of two
// agents of one cluster and asks Consul's DNS interface for it.
func TestDNSTwoNodes(t *testing.T) {
	server := testenv.StartConsul(t)
	clientAgent := testenv.StartConsul(t, testenv.WithRetryJoin(server.SerfLANAddr),
		testenv.WithArgs("-server=false", "-data-dir", filepath.Join(t.TempDir(), "data")))
	ctx := context.Background()

	ra := startRegistrar(t, Config{Node: server.NodeName, Agent: agentClient(t, server), Interval: time.Hour})
	rb := startRegistrar(t, Config{Node: clientAgent.NodeName, Agent: agentClient(t, clientAgent), Interval: time.Hour})
	// The addresses are never contacted: they only travel in DNS answers.
	ra.Register(Endpoint{ID: endpointID(10), Network: "n", IPv4: loopback(11),
		Ports: []Port{{"tcp", 5432}}, Register: true, Options: map[string]string{"SERVICE_NAME": "pg"}})
	rb.Register(Endpoint{ID: endpointID(11), Network: "n", IPv4: loopback(12),
		Ports: []Port{{"tcp", 5432}}, Register: true, Options: map[string]string{"SERVICE_NAME": "pg"}})
	// A dual-stack endpoint, on the client agent's node.
	rb.Register(Endpoint{ID: endpointID(12), Network: "n", IPv4: loopback(13), IPv6: netip.MustParseAddr("fd00::13"),
		Ports: []Port{{"tcp", 80}}, Register: true, Options: map[string]string{"SERVICE_NAME": "dual"}})

	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, server.DNSAddr)
	}}
	var ips []string
	testenv.Eventually(t, 20*time.Second, func() error {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		addrs, err := resolver.LookupIP(cctx, "ip4", "pg.service.consul")
		if err != nil {
			return err
		}
		ips = nil
		for _, a := range addrs {
			ips = append(ips, a.String())
		}
		slices.Sort(ips)
		if !slices.Equal(ips, []string{"127.0.0.11", "127.0.0.12"}) {
			return fmt.Errorf("A pg.service.consul = %v", ips)
		}
		return nil
	})
	t.Logf("A pg.service.consul = %v", ips)

	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, srvs, err := resolver.LookupSRV(cctx, "", "", "pg.service.consul")
	if err != nil {
		t.Fatalf("SRV pg.service.consul: %v", err)
	}
	var targets []string
	for _, s := range srvs {
		if s.Port != 5432 {
			t.Errorf("SRV %+v: port %d, want 5432", s, s.Port)
		}
		addrs, err := resolver.LookupIP(cctx, "ip", s.Target)
		if err != nil || len(addrs) != 1 {
			t.Fatalf("A %s (SRV target) = %v, %v", s.Target, addrs, err)
		}
		targets = append(targets, addrs[0].String())
	}
	slices.Sort(targets)
	if !slices.Equal(targets, []string{"127.0.0.11", "127.0.0.12"}) {
		t.Errorf("SRV targets resolve to %v, want both overlay addresses", targets)
	}
	t.Logf("SRV pg.service.consul = %d records -> %v", len(srvs), targets)

	// Both instances sit on their own agents' nodes.
	nodes := map[string]string{}
	entries, _, err := agentClient(t, server).Catalog().Service("pg", "", (&api.QueryOptions{}).WithContext(cctx))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		nodes[e.Node] = e.ServiceAddress
	}
	if nodes[server.NodeName] != "127.0.0.11" || nodes[clientAgent.NodeName] != "127.0.0.12" {
		t.Errorf("catalog instances by node = %v", nodes)
	}

	// Dual stack: A gives the IPv4 address, AAAA the lan_ipv6 one. (Consul
	// 1.21 then also points SRV targets at the IPv6 address.)
	testenv.Eventually(t, 20*time.Second, func() error {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		v4, err4 := resolver.LookupIP(cctx, "ip4", "dual.service.consul")
		v6, err6 := resolver.LookupIP(cctx, "ip6", "dual.service.consul")
		if err := errors.Join(err4, err6); err != nil {
			return err
		}
		if len(v4) != 1 || v4[0].String() != "127.0.0.13" || len(v6) != 1 || v6[0].String() != "fd00::13" {
			return fmt.Errorf("dual.service.consul: A %v AAAA %v", v4, v6)
		}
		return nil
	})
}

// TestAgentRestart stops the agent while endpoints come and go; after it
// is back, everything held is registered exactly once. A dev agent
// forgets all services on restart, so this also covers re-assertion.
func TestAgentRestart(t *testing.T) {
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()
	r := startRegistrar(t, Config{Node: "host-r", Agent: client, Interval: time.Hour, RetryMax: 300 * time.Millisecond})

	ep := func(n int) Endpoint {
		return Endpoint{ID: endpointID(100 + n), Network: "n", IPv4: loopback(100 + n), Register: true,
			Options: map[string]string{"SERVICE_NAME": "svc" + strconv.Itoa(n)}}
	}
	expect := func(within time.Duration, ns ...int) {
		t.Helper()
		var want []string
		for _, n := range ns {
			want = append(want, ep(n).ID)
		}
		slices.Sort(want)
		testenv.Eventually(t, within, func() error {
			services, err := ourServices(ctx, client)
			if err != nil {
				return err
			}
			if got := sortedKeys(services); !slices.Equal(got, want) {
				return fmt.Errorf("services %v, want %v", got, want)
			}
			// Exactly once in the catalog too.
			for _, n := range ns {
				name := "svc" + strconv.Itoa(n)
				entries, _, err := client.Catalog().Service(name, "", nil)
				if err != nil {
					return err
				}
				if len(entries) != 1 {
					return fmt.Errorf("catalog has %d instances of %s", len(entries), name)
				}
			}
			return nil
		})
	}

	r.Register(ep(1))
	r.Register(ep(2))
	expect(10*time.Second, 1, 2)

	agent.Stop()
	start := time.Now()
	for n := 3; n <= 6; n++ {
		r.Register(ep(n))
	}
	r.Deregister(ep(2).ID)
	r.Register(ep(3)) // again: still one instance
	if d := time.Since(start); d > time.Second {
		t.Errorf("Register/Deregister took %s with the agent down", d)
	}
	time.Sleep(time.Second) // let the writer fail and back off
	agent.Start()
	restarted := time.Now()
	expect(15*time.Second, 1, 3, 4, 5, 6)
	t.Logf("all services back %s after the agent restarted", time.Since(restarted).Round(time.Millisecond))

	// A restart the writer does not notice (nothing to write meanwhile)
	// is repaired by anti-entropy.
	agent.Stop()
	agent.Start()
	if services, err := ourServices(ctx, client); err != nil || len(services) != 0 {
		t.Fatalf("dev agent kept services across restart: %v, %v", sortedKeys(services), err)
	}
	if err := r.Sync(ctx); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	expect(5*time.Second, 1, 3, 4, 5, 6)
}

// TestRegisterNeverBlocks uses an "agent" that accepts connections and
// never answers: Register and Deregister still return at once, and Run
// still stops when asked.
func TestRegisterNeverBlocks(t *testing.T) {
	stop := make(chan struct{})
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Read the body so the server notices the client giving up.
		_, _ = io.Copy(io.Discard, r.Body)
		select {
		case <-r.Context().Done():
		case <-stop:
		}
	}))
	defer hang.Close()
	defer close(stop)
	client, err := api.NewClient(&api.Config{Address: hang.Listener.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	r := startRegistrar(t, Config{Node: "n", Agent: client, Timeout: 300 * time.Millisecond, RetryMax: 300 * time.Millisecond})
	start := time.Now()
	for i := range 200 {
		r.Register(Endpoint{ID: endpointID(i), IPv4: loopback(1), Register: true})
		if i%2 == 0 {
			r.Deregister(endpointID(i))
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("200 Register calls took %s against a hanging agent", d)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := r.Sync(ctx); err == nil {
		t.Error("Sync against a hanging agent succeeded")
	} else if !errors.Is(err, context.DeadlineExceeded) {
		t.Logf("Sync: %v", err)
	}
}

func TestNewRequiresAgent(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("New without an agent client succeeded")
	}
}
