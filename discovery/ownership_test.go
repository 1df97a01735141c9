package discovery

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/testenv"
)

// allServices lists every service of the agent.
func allServices(t *testing.T, c *api.Client) map[string]*api.AgentService {
	t.Helper()
	all, err := c.Agent().Services()
	if err != nil {
		t.Fatal(err)
	}
	return all
}

// TestForeignServiceID: a container's SERVICE_ID lands in the plugin's
// namespace, so it cannot name a service of somebody else; and a service
// that does sit at the namespaced ID without being this host's is neither
// overwritten nor, when the container stops, deregistered.
func TestForeignServiceID(t *testing.T) {
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()

	foreign := []*api.AgentServiceRegistration{
		{ID: "web", Name: "billing", Port: 1},                   // an operator's service
		{ID: CustomIDPrefix + "web", Name: "squatter", Port: 2}, // at our namespaced ID, no marker
		{ID: CustomIDPrefix + "api", Name: "other-host", Port: 3, // another host's, sharing the agent
			Meta: map[string]string{MetaManagedBy: ManagedByValue, MetaNode: "host-f", MetaHostID: "someone-else"}},
	}
	for _, reg := range foreign {
		if err := client.Agent().ServiceRegister(reg); err != nil {
			t.Fatal(err)
		}
	}
	intact := func(phase string) {
		t.Helper()
		all := allServices(t, client)
		for _, reg := range foreign {
			s := all[reg.ID]
			if s == nil || s.Service != reg.Name || s.Port != reg.Port {
				t.Fatalf("%s: foreign service %s is now %+v, want %s port %d", phase, reg.ID, s, reg.Name, reg.Port)
			}
		}
	}

	drv := &fakeDriver{}
	r := startRegistrar(t, Config{Node: "host-f", HostID: "hf", Agent: client, Endpoints: drv, Interval: time.Hour, RetryMax: time.Second})
	eps := []Endpoint{
		{ID: endpointID(600), Network: "n", IPv4: loopback(60), Register: true, Options: map[string]string{"SERVICE_ID": "web", "SERVICE_NAME": "mine"}},
		{ID: endpointID(601), Network: "n", IPv4: loopback(61), Register: true, Options: map[string]string{"SERVICE_ID": "api", "SERVICE_NAME": "mine2"}},
		{ID: endpointID(602), Network: "n", IPv4: loopback(62), Register: true, Options: map[string]string{"SERVICE_ID": "free", "SERVICE_NAME": "mine3"}},
	}
	drv.set(eps...)
	for _, ep := range eps {
		r.Register(ep)
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		if s := allServices(t, client)[CustomIDPrefix+"free"]; s == nil || s.Meta[MetaHostID] != "hf" {
			return fmt.Errorf("free ID not registered as this host's: %+v", s)
		}
		return nil
	})
	for range 2 {
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	intact("after registration and anti-entropy")

	// The containers stop.
	drv.set()
	for _, ep := range eps {
		r.Deregister(ep.ID)
	}
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		if s := allServices(t, client)[CustomIDPrefix+"free"]; s != nil {
			return fmt.Errorf("this host's service still registered: %+v", s)
		}
		return nil
	})
	intact("after the containers stopped")
	if got, want := sortedKeys(allServices(t, client)), []string{CustomIDPrefix + "api", CustomIDPrefix + "web", "web"}; !slices.Equal(got, want) {
		t.Errorf("agent services %v, want %v", got, want)
	}
}

// TestSharedAgentHostID: two hosts share one agent and so one node name;
// their host identities keep them apart. Neither host's anti-entropy
// removes the other's services, a service ID one holds is not taken over
// by the other, and one host leaving removes only its own.
func TestSharedAgentHostID(t *testing.T) {
	client, r1, r2, d1, d2 := sharedAgent(t)
	ctx := context.Background()
	a1 := Endpoint{ID: endpointID(700), Network: "n", IPv4: loopback(70), Register: true}
	s1 := Endpoint{ID: endpointID(701), Network: "n", IPv4: loopback(71), Register: true, Options: map[string]string{"SERVICE_ID": "same"}}
	a2 := Endpoint{ID: endpointID(710), Network: "n", IPv4: loopback(72), Register: true}
	s2 := Endpoint{ID: endpointID(711), Network: "n", IPv4: loopback(73), Register: true, Options: map[string]string{"SERVICE_ID": "same"}}
	d1.set(a1, s1)
	sync := func(rs ...*Registrar) {
		t.Helper()
		for _, r := range rs {
			if err := r.Sync(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	sync(r1) // h1 takes "same" first
	d2.set(a2, s2)
	sync(r2, r1, r2, r1)
	all := allServices(t, client)
	if got, want := sortedKeys(all), []string{a1.ID, a2.ID, CustomIDPrefix + "same"}; !slices.Equal(got, want) {
		t.Fatalf("agent services %v, want %v", got, want)
	}
	if s := all[CustomIDPrefix+"same"]; s.Meta[MetaHostID] != "h1" || s.Meta[MetaEndpointID] != s1.ID {
		t.Errorf("%s is %v, want h1's (endpoint %s): h2 took it over", CustomIDPrefix+"same", s.Meta, s1.ID)
	}
	if all[a1.ID].Meta[MetaHostID] != "h1" || all[a2.ID].Meta[MetaHostID] != "h2" {
		t.Errorf("host-id meta: %s has %q, %s has %q", a1.ID, all[a1.ID].Meta[MetaHostID], a2.ID, all[a2.ID].Meta[MetaHostID])
	}

	// h2's container with the contested ID stops: h1's service stays.
	d2.set(a2)
	r2.Deregister(s2.ID)
	sync(r2, r1, r2)
	if s := allServices(t, client)[CustomIDPrefix+"same"]; s == nil || s.Meta[MetaHostID] != "h1" {
		t.Fatalf("h2's stop removed or changed h1's service: %+v", s)
	}

	// h1 loses all its endpoints: only h2's service is left.
	d1.set()
	sync(r1, r2, r1)
	if got, want := sortedKeys(allServices(t, client)), []string{a2.ID}; !slices.Equal(got, want) {
		t.Errorf("after h1 left: agent services %v, want %v", got, want)
	}
}

// sharedAgent starts an agent and the registrars of two hosts, h1 and h2,
// that share it (and its node name), each following its own fake driver.
func sharedAgent(t *testing.T) (*api.Client, *Registrar, *Registrar, *fakeDriver, *fakeDriver) {
	t.Helper()
	client := agentClient(t, testenv.StartConsul(t))
	d1, d2 := &fakeDriver{}, &fakeDriver{}
	r1, err := New(Config{Node: "shared", HostID: "h1", Agent: client, Endpoints: d1, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	r2, err := New(Config{Node: "shared", HostID: "h2", Agent: client, Endpoints: d2, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return client, r1, r2, d1, d2
}
