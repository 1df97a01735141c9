package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/testenv"
)

// TestProtocolRegistration: a Consul agent on each of two test hosts (a
// server and a client, as Consul recommends), one plugin per host talking
// to its own agent. Join registers the endpoint with its overlay address,
// Leave deregisters it, and Consul's DNS answers with overlay addresses.
func TestProtocolRegistration(t *testing.T) {
	hosts, server, client := agentPerHost(t)
	prefix := "co-reg-" + randomID()[:8] + "/"
	pa := startPlugin(t, "host0", hosts[0], server.Addr, prefix)
	pb := startPlugin(t, "host1", hosts[1], client.Addr, prefix)

	spec := netSpec{subnet4: "10.60.0.0/24", subnet6: "fd00:60::/64", opts: map[string]string{"name": "svc"}}
	na, err := pa.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := pb.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	web := map[string]any{
		"SERVICE_NAME": "web", "SERVICE_TAGS": "blue,v1",
		"com.docker.network.endpoint.exposedports": []map[string]int{{"Proto": 6, "Port": 80}},
	}
	ca, cb := na.runWith(t, web), nb.runWith(t, web)

	agentA, agentB := consulClient(t, server), consulClient(t, client)
	// Each instance is on its own host's agent, with the overlay address.
	for _, x := range []struct {
		agent *api.Client
		c     *container
		node  string
	}{{agentA, ca, "host0"}, {agentB, cb, "host1"}} {
		var svc *api.AgentService
		eventually(t, 10*time.Second, func() error {
			svcs, err := x.agent.Agent().ServicesWithFilter(fmt.Sprintf("Meta[\"endpoint-id\"] == %q", x.c.eid))
			if err != nil {
				return err
			}
			for _, s := range svcs {
				svc = s
				return nil
			}
			return fmt.Errorf("no service for endpoint %s on %s's agent", x.c.eid[:12], x.node)
		})
		if svc.Service != "web" || svc.Address != x.c.addr4.Addr().String() || svc.Port != 80 {
			t.Errorf("%s: service %s at %s:%d, want web at %s:80", x.node, svc.Service, svc.Address, svc.Port, x.c.addr4.Addr())
		}
		if !slices.Equal(svc.Tags, []string{"blue", "v1"}) {
			t.Errorf("%s: tags %v, want [blue v1]", x.node, svc.Tags)
		}
		if svc.Meta["managed-by"] != "consul-overlay" || svc.Meta["network"] != "svc" || svc.Meta["node"] != x.node {
			t.Errorf("%s: meta %v", x.node, svc.Meta)
		}
		if v6 := svc.TaggedAddresses["lan_ipv6"].Address; v6 != x.c.addr6.Addr().String() {
			t.Errorf("%s: lan_ipv6 %q, want the overlay IPv6 %s", x.node, v6, x.c.addr6.Addr())
		}
	}

	// Consul DNS: A and SRV answer with the overlay addresses of both hosts.
	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return server.DialContext(ctx, network, server.DNSAddr)
	}}
	want := []string{ca.addr4.Addr().String(), cb.addr4.Addr().String()}
	slices.Sort(want)
	eventually(t, 15*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		ips, err := resolver.LookupIP(ctx, "ip4", "web.service.consul")
		if err != nil {
			return err
		}
		var got []string
		for _, ip := range ips {
			got = append(got, ip.String())
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			return fmt.Errorf("A web.service.consul = %v, want %v", got, want)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, srvs, err := resolver.LookupSRV(ctx, "", "", "web.service.consul")
	if err != nil || len(srvs) != 2 {
		t.Fatalf("SRV web.service.consul = %v, %v; want 2 records", srvs, err)
	}
	for _, s := range srvs {
		if s.Port != 80 {
			t.Errorf("SRV %s port %d, want 80", s.Target, s.Port)
		}
	}
	t.Logf("A web.service.consul = %v; SRV: %d records on port 80", want, len(srvs))

	// Leave deregisters at once; the other host's instance stays.
	ca.remove(t)
	eventually(t, 5*time.Second, func() error {
		svcs, err := agentA.Agent().ServicesWithFilter(`Service == "web"`)
		if err != nil {
			return err
		}
		if len(svcs) != 0 {
			return fmt.Errorf("host0 still has %d web services after Leave", len(svcs))
		}
		return nil
	})
	if svcs, err := agentB.Agent().ServicesWithFilter(`Service == "web"`); err != nil || len(svcs) != 1 {
		t.Fatalf("host1's instance after host0's Leave: %v %v", svcs, err)
	}
	cb.remove(t)
	if err := nb.remove(); err != nil {
		t.Fatal(err)
	}
	if err := na.remove(); err != nil {
		t.Fatal(err)
	}
	for _, a := range []*api.Client{agentA, agentB} {
		eventually(t, 5*time.Second, func() error {
			svcs, err := a.Agent().ServicesWithFilter(`Meta["managed-by"] == "consul-overlay"`)
			if err != nil {
				return err
			}
			if len(svcs) != 0 {
				return fmt.Errorf("services left: %d", len(svcs))
			}
			return nil
		})
	}
	if keys := stateKeys(t, server, prefix); len(keys) > 0 {
		t.Errorf("keys left in Consul: %v", keys)
	}
}

// agentPerHost builds two test hosts with a Consul agent each: a server on
// host0 and a client on host1 joined to it, as Consul recommends.
func agentPerHost(t *testing.T) (hosts []*testenv.Host, server, client *testenv.ConsulAgent) {
	t.Helper()
	testenv.RequireRoot(t)
	hosts = testenv.NewUnderlay(t, 2, testenv.UnderlayOptions{})
	server = testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()))
	client = testenv.StartConsul(t, testenv.WithNetNS(hosts[1].NS.Path), testenv.WithBindAddr(hosts[1].Addr.String()),
		testenv.WithRetryJoin(server.SerfLANAddr),
		testenv.WithArgs("-server=false", "-data-dir", filepath.Join(t.TempDir(), "consul")))
	return hosts, server, client
}

func consulClient(t *testing.T, agent *testenv.ConsulAgent) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: agent.Addr, Transport: &http.Transport{DialContext: agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestProtocolRegistrationAgentRestart: the host's agent goes down between
// CreateEndpoint and Join (containers starting while Consul restarts).
// Join still succeeds, and once the agent is back every endpoint is
// registered exactly once.
func TestProtocolRegistrationAgentRestart(t *testing.T) {
	hosts, _, client := agentPerHost(t)
	prefix := "co-regr-" + randomID()[:8] + "/"
	pb := startPlugin(t, "host1", hosts[1], client.Addr, prefix)
	nb, err := pb.createNetwork(netSpec{subnet4: "10.61.0.0/24", opts: map[string]string{"name": "svc2"}})
	if err != nil {
		t.Fatal(err)
	}
	opts := map[string]any{"SERVICE_NAME": "api", "com.docker.network.endpoint.exposedports": []map[string]int{{"Proto": 6, "Port": 8080}}}

	// Each endpoint is created while the agent is up; the agent stops
	// before the container joins. Join must still succeed. The agent comes
	// back after the last one.
	var ctrs []*container
	for i := 0; i < 4; i++ {
		client.Start()
		nb.beforeJoin = client.Stop
		c, err := nb.tryRunWith(t, opts)
		nb.beforeJoin = nil
		if err != nil {
			t.Fatalf("container %d, agent down at Join: %v", i, err)
		}
		ctrs = append(ctrs, c)
	}
	client.Start()

	agent := consulClient(t, client)
	eventually(t, 20*time.Second, func() error {
		svcs, err := agent.Agent().ServicesWithFilter(`Service == "api"`)
		if err != nil {
			return err
		}
		byEndpoint := map[string]int{}
		for _, s := range svcs {
			byEndpoint[s.Meta["endpoint-id"]]++
		}
		for _, c := range ctrs {
			if byEndpoint[c.eid] != 1 {
				return fmt.Errorf("endpoint %s has %d services, want exactly 1 (all: %d)", c.eid[:12], byEndpoint[c.eid], len(svcs))
			}
		}
		if len(svcs) != len(ctrs) {
			return fmt.Errorf("%d services for %d endpoints", len(svcs), len(ctrs))
		}
		return nil
	})
	for _, c := range ctrs {
		c.remove(t)
	}
	if err := nb.remove(); err != nil {
		t.Fatal(err)
	}
}
