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
