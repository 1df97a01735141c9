package discovery

import (
	"context"
	"testing"

	"consul-overlay/internal/testenv"
)

// TestDuplicateServiceIDAfterLeave: two endpoints of this host ask for the
// same SERVICE_ID (one container on two consul-overlay networks, or two
// replicas with the same environment). The second one's registration
// overwrites the first's; when the second endpoint goes, the service must
// announce the first one's address again. Its orphaned service ID was
// "claimed" by the first entry and skipped, so the agent kept the address
// of the endpoint that was gone (and anti-entropy flipped between the two
// at random, as compare's want map kept whichever entry it met last).
func TestDuplicateServiceIDAfterLeave(t *testing.T) {
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()

	r, err := New(Config{Node: "dup", HostID: "hd", Agent: client, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	a := Endpoint{ID: endpointID(900), Network: "n1", IPv4: loopback(90), Register: true, Options: map[string]string{"SERVICE_ID": "web"}}
	b := Endpoint{ID: endpointID(901), Network: "n2", IPv4: loopback(91), Register: true, Options: map[string]string{"SERVICE_ID": "web"}}
	sid := CustomIDPrefix + "web"

	r.Register(a)
	if err := r.apply(ctx); err != nil {
		t.Fatal(err)
	}
	r.Register(b)
	if err := r.apply(ctx); err != nil {
		t.Fatal(err)
	}
	if s := allServices(t, client)[sid]; s == nil || s.Address != b.IPv4.String() {
		t.Fatalf("setup: %s is %+v, want b's address %s", sid, s, b.IPv4)
	}

	// b's container leaves.
	r.Deregister(b.ID)
	if err := r.apply(ctx); err != nil {
		t.Fatal(err)
	}
	s := allServices(t, client)[sid]
	if s != nil && (s.Address == b.IPv4.String() || s.Meta[MetaEndpointID] == b.ID) {
		t.Errorf("after endpoint %s left, service %s still announces its address %s (endpoint-id meta %s): stale registration of a gone endpoint",
			b.ID, sid, s.Address, s.Meta[MetaEndpointID])
	}
}

// TestSharedAgentAfterAgentLoss: two hosts share one agent and their
// containers ask for the same SERVICE_ID; h1 holds it, h2 is refused. The
// agent then loses the service (restarted without its state, or the
// reaper removed it while h1 was cut off) and h2 registers it first. h1
// must then leave h2's service alone: it skipped the ownership lookup for
// an ID it had written before in this run and registered over it, and
// from then on every anti-entropy pass of either host overwrote the
// other's.
func TestSharedAgentAfterAgentLoss(t *testing.T) {
	client, r1, r2, d1, d2 := sharedAgent(t)
	ctx := context.Background()
	s1 := Endpoint{ID: endpointID(920), Network: "n", IPv4: loopback(92), Register: true, Options: map[string]string{"SERVICE_ID": "same"}}
	s2 := Endpoint{ID: endpointID(921), Network: "n", IPv4: loopback(93), Register: true, Options: map[string]string{"SERVICE_ID": "same"}}
	sid := CustomIDPrefix + "same"
	sync := func(rs ...*Registrar) {
		t.Helper()
		for _, r := range rs {
			if err := r.Sync(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	d1.set(s1)
	sync(r1)
	d2.set(s2)
	sync(r2, r1, r2)
	if s := allServices(t, client)[sid]; s == nil || s.Meta[MetaHostID] != "h1" {
		t.Fatalf("setup: %s is %+v, want h1's", sid, s)
	}

	// The agent loses the service (restart without state, or removed).
	if err := client.Agent().ServiceDeregister(sid); err != nil {
		t.Fatal(err)
	}
	sync(r2) // h2 finds the ID free and takes it
	if s := allServices(t, client)[sid]; s == nil || s.Meta[MetaHostID] != "h2" {
		t.Fatalf("h2 did not take the free ID: %+v", s)
	}
	sync(r1)
	if s := allServices(t, client)[sid]; s == nil || s.Meta[MetaHostID] != "h2" {
		var meta map[string]string
		if s != nil {
			meta = s.Meta
		}
		t.Errorf("h1 registered over h2's service %s (now %v): it skipped the ownership lookup for an ID it had written before", sid, meta)
	}
}

// TestRefusedForgottenWhenEndpointGoes: the memory that a service ID was
// refused (held by another host's service on a shared agent) goes with the
// endpoint that asked for it; it grew with every such endpoint before.
func TestRefusedForgottenWhenEndpointGoes(t *testing.T) {
	client, r1, r2, d1, d2 := sharedAgent(t)
	ctx := context.Background()
	s1 := Endpoint{ID: endpointID(930), Network: "n", IPv4: loopback(94), Register: true, Options: map[string]string{"SERVICE_ID": "taken"}}
	s2 := Endpoint{ID: endpointID(931), Network: "n", IPv4: loopback(95), Register: true, Options: map[string]string{"SERVICE_ID": "taken"}}
	d1.set(s1)
	if err := r1.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	d2.set(s2)
	if err := r2.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if s := allServices(t, client)[CustomIDPrefix+"taken"]; s == nil || s.Meta[MetaHostID] != "h1" {
		t.Fatalf("setup: the ID is %+v, want h1's", s)
	}
	r2.mu.Lock()
	n := len(r2.refused)
	r2.mu.Unlock()
	if n != 1 {
		t.Fatalf("setup: h2 remembers %d refused IDs, want 1", n)
	}
	r2.Deregister(s2.ID)
	r2.mu.Lock()
	n = len(r2.refused)
	r2.mu.Unlock()
	if n != 0 {
		t.Errorf("h2 still remembers %d refused IDs after the endpoint that asked went", n)
	}
}
