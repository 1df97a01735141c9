package driver

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/discovery"
	"consul-overlay/kvstore"
)

func (f *fakeDataplane) hasEndpoint(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.endpoints[id]
	return ok
}

func hasKey(t *testing.T, s kvstore.Store, key string) bool {
	t.Helper()
	return slices.Contains(allKeys(t, s), key)
}

// TestJoinRecordsRestart: Join writes nothing under the watched
// networks/<key>/ (the endpoint record keeps its modify index) and records
// the container and Join's ports in this host's join record instead; a
// restarted driver reads them back, so the registrar's anti-entropy still
// gets its joined endpoints. An endpoint whose join record a crash lost is
// joined all the same while a container holds its interface; a join
// record of a removed endpoint goes at the restart.
func TestJoinRecordsRestart(t *testing.T) {
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	d := newTestDriver(t, store, "a", "192.0.2.1", dp)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	for _, ep := range []struct{ id, addr string }{{"ep1", "10.1.0.2/24"}, {"ep2", "10.1.0.3/24"}, {"ep3", "10.1.0.4/24"}} {
		if _, err := d.CreateEndpoint(epReq("n1", ep.id, ep.addr)); err != nil {
			t.Fatal(err)
		}
	}
	before, err := store.Get(context.Background(), "networks/name-app/endpoints/ep1")
	if err != nil {
		t.Fatal(err)
	}
	ports := []interface{}{map[string]interface{}{"Proto": float64(6), "Port": float64(8080)}}
	for _, id := range []string{"ep1", "ep2"} {
		if _, err := d.Join(&network.JoinRequest{NetworkID: "n1", EndpointID: id, SandboxKey: "/var/run/docker/netns/0123456789ab",
			Options: map[string]interface{}{discovery.ExposedPortsOption: ports}}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return hasKey(t, store, "joins/a/ep1") && hasKey(t, store, "joins/a/ep2") })
	after, err := store.Get(context.Background(), "networks/name-app/endpoints/ep1")
	if err != nil {
		t.Fatal(err)
	}
	if after.ModifyIndex != before.ModifyIndex {
		t.Fatalf("Join rewrote the watched endpoint record (index %d, was %d)", after.ModifyIndex, before.ModifyIndex)
	}
	held := func(d *Driver) map[string]discovery.Endpoint {
		t.Helper()
		eps, err := d.HeldEndpoints(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]discovery.Endpoint{}
		for _, e := range eps {
			out[e.ID] = e
		}
		return out
	}
	if h := held(d); len(h) != 2 || len(h["ep1"].Ports) != 1 || h["ep1"].Ports[0].Port != 8080 {
		t.Fatalf("held endpoints before the restart: %+v", h)
	}

	// A crash lost ep2's join record; a container holds its interface.
	// A join record of an endpoint that is gone is left behind.
	if err := store.Delete(context.Background(), "joins/a/ep2"); err != nil {
		t.Fatal(err)
	}
	if err := d.cl.PutJoined(context.Background(), "gone", cluster.Joined{NetworkKey: "name-app", Sandbox: "x"}); err != nil {
		t.Fatal(err)
	}
	dp.mu.Lock()
	dp.inUse = map[string]bool{"ep2": true}
	dp.mu.Unlock()
	d.Close()
	d = newTestDriver(t, store, "a", "192.0.2.1", dp)
	h := held(d)
	if len(h) != 2 || len(h["ep1"].Ports) != 1 || h["ep1"].Ports[0].Port != 8080 || h["ep2"].ID != "ep2" {
		t.Fatalf("held endpoints after the restart: %+v; want ep1 with its port and ep2", h)
	}
	if hasKey(t, store, "joins/a/gone") {
		t.Fatal("join record of a removed endpoint kept")
	}
	// ep3 never joined: the unjoined sweep takes it, not the others.
	if n := d.ReclaimUnjoined(context.Background(), 0); n != 1 {
		t.Fatalf("reclaimed %d endpoints, want ep3 alone", n)
	}
	// Deleting a joined endpoint removes its join record too.
	if err := d.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return !hasKey(t, store, "joins/a/ep1") })
}

// TestAdoptHeldAfterRestart: the plugin stopped after Join answered and
// before the join record was written, and the restart read the kernel
// before Docker moved the interface into the container: the endpoint is
// restored unjoined. Once a container holds its interface it is joined (a
// held endpoint with its join record), and the unjoined sweep keeps it;
// an endpoint no container takes is still reclaimed.
func TestAdoptHeldAfterRestart(t *testing.T) {
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	d := newTestDriver(t, store, "a", "192.0.2.1", dp)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	for _, ep := range []struct{ id, addr string }{{"ep1", "10.1.0.2/24"}, {"orphan", "10.1.0.3/24"}} {
		if _, err := d.CreateEndpoint(epReq("n1", ep.id, ep.addr)); err != nil {
			t.Fatal(err)
		}
	}
	d.Close()
	d = newTestDriver(t, store, "a", "192.0.2.1", dp)
	heldIDs := func() []string {
		t.Helper()
		eps, err := d.HeldEndpoints(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, e := range eps {
			ids = append(ids, e.ID)
		}
		return ids
	}
	if ids := heldIDs(); len(ids) != 0 {
		t.Fatalf("held endpoints before a container holds one: %v", ids)
	}
	// Docker moves ep1's interface into its container.
	dp.mu.Lock()
	dp.inUse = map[string]bool{"ep1": true}
	dp.mu.Unlock()
	waitFor(t, func() bool { return slices.Equal(heldIDs(), []string{"ep1"}) })
	waitFor(t, func() bool { return hasKey(t, store, "joins/a/ep1") })
	if n := d.ReclaimUnjoined(context.Background(), 0); n != 1 {
		t.Fatalf("reclaimed %d endpoints, want the orphan alone", n)
	}
	if !hasKey(t, store, "networks/name-app/endpoints/ep1") || hasKey(t, store, "networks/name-app/endpoints/orphan") {
		t.Fatalf("endpoint records after the sweep: %v, want ep1's alone", allKeys(t, store))
	}
}

// TestDeleteEndpointVethInBackground: DeleteEndpoint answers before the
// veth pair is removed; a removal that fails is retried until it sticks.
func TestDeleteEndpointVethInBackground(t *testing.T) {
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	d := newTestDriver(t, store, "a", "192.0.2.1", dp)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	if _, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Join(&network.JoinRequest{NetworkID: "n1", EndpointID: "ep1", SandboxKey: "/var/run/docker/netns/abc"}); err != nil {
		t.Fatal(err)
	}
	dp.mu.Lock()
	dp.failDeletes = 3
	dp.mu.Unlock()
	if err := d.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}
	if hasKey(t, store, "networks/name-app/endpoints/ep1") {
		t.Fatal("endpoint record kept")
	}
	waitFor(t, func() bool { return !dp.hasEndpoint("ep1") })
	dp.mu.Lock()
	left := dp.failDeletes
	dp.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d failures not retried", left)
	}
}

// TestCloseFlushesBackground: what is queued when the driver stops is
// done before Close returns.
func TestCloseFlushesBackground(t *testing.T) {
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	d := newTestDriver(t, store, "a", "192.0.2.1", dp)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	if _, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Join(&network.JoinRequest{NetworkID: "n1", EndpointID: "ep1", SandboxKey: "/var/run/docker/netns/abc"}); err != nil {
		t.Fatal(err)
	}
	d.cancel() // the background goroutine stops: nothing more is done but at Close
	d.wg.Wait()
	d.bg.deleteVeth("ep1")
	d.Close()
	if dp.hasEndpoint("ep1") {
		t.Fatal("queued veth removal not done at Close")
	}
	if !hasKey(t, store, "joins/a/ep1") {
		t.Fatal("queued join record not written at Close")
	}
}

// TestResyncDelay: a host's networks resync together (the same delay
// whenever each network's watch started), within (0, every], again every
// `every`, and hosts at phases of their own.
func TestResyncDelay(t *testing.T) {
	every := 30 * time.Second
	now := time.Date(2026, 12, 7, 0, 0, 0, 123, time.UTC)
	d := resyncDelay(now, every, "host-a")
	if d <= 0 || d > every {
		t.Fatalf("delay %v, want within (0, %v]", d, every)
	}
	// Another network's watch, started 7 s later, resyncs at the same time.
	if d2 := resyncDelay(now.Add(7*time.Second), every, "host-a"); now.Add(d) != now.Add(7*time.Second+d2) && now.Add(d+every) != now.Add(7*time.Second+d2) {
		t.Fatalf("two networks of a host resync at %v and %v", now.Add(d), now.Add(7*time.Second+d2))
	}
	// At the resync itself, the next is a whole interval later.
	if d3 := resyncDelay(now.Add(d), every, "host-a"); d3 != every {
		t.Fatalf("at the resync, the next in %v, want %v", d3, every)
	}
	phases := map[time.Duration]bool{}
	for _, h := range []string{"host-a", "host-b", "host-c", "host-d", "host-e"} {
		phases[resyncDelay(now, every, h)] = true
	}
	if len(phases) < 4 {
		t.Fatalf("five hosts resync at %d distinct times, want them spread", len(phases))
	}
}
