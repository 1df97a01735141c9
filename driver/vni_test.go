package driver

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/kvstore"
)

// TestStrayOverlayVNIKept: the store lost network app (VNI v) while
// host a was away, and a container still holds endpoint ep1 on its
// overlay: the restart keeps that overlay in the kernel. While ep1 is
// held, no network of a is given v: a network a creates gets another VNI,
// and joining one another host created with v (free in the store, the
// lowest) fails with v and ep1 named, leaving no membership. Once ep1 is
// gone, the join succeeds and takes the overlay over. On the old code a
// shared the overlay: ep1's container and web's on one link, with web's
// IPAM free to hand out ep1's address.
func TestStrayOverlayVNIKept(t *testing.T) {
	ctx := context.Background()
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	a := newTestDriver(t, store, "a", "192.0.2.1", dp)
	mustCreate(t, a, "n1", "10.1.0.0/24")
	joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
	app, err := a.cl.Network(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	v := app.VNI
	a.Close()
	dp.mu.Lock()
	dp.inUse = map[string]bool{"ep1": true}
	dp.mu.Unlock()
	// The store loses app: its last member leaves it behind a's back.
	cl, err := cluster.New(cluster.Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1")}, store)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Leave(ctx, "name-app", "n1"); err != nil {
		t.Fatal(err)
	}

	a = newTestDriver(t, store, "a", "192.0.2.1", dp)
	if !dp.hasEndpoint("ep1") {
		t.Fatal("ep1's veth removed while its container holds it")
	}
	if err := a.CreateNetwork(createReq("n3", map[string]interface{}{"name": "fresh"}, "10.3.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if rec, err := a.cl.Network(ctx, "name-fresh"); err != nil || rec.VNI == v {
		t.Errorf("network fresh of a has vni %d (%v): the overlay a keeps for ep1's container", rec.VNI, err)
	}
	err = a.CreateNetwork(createReq("n4", map[string]interface{}{"name": "pinned", optVNI: fmt.Sprint(v)}, "10.4.0.0/24"))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("vni %d", v)) || !strings.Contains(err.Error(), "ep1") {
		t.Errorf("create with -o vni=%d: %v, want a refusal naming the vni and ep1", v, err)
	}

	b := newHostDriver(t, store, "b", "b", "192.0.2.2", newFake())
	if err := b.CreateNetwork(createReq("nb", map[string]interface{}{"name": "web"}, "10.5.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if rec, err := b.cl.Network(ctx, "name-web"); err != nil || rec.VNI != v {
		t.Fatalf("web has vni %d (%v), want %d, the lowest free: the test proves nothing", rec.VNI, err, v)
	}
	web := createReq("n5", map[string]interface{}{"name": "web"}, "10.5.0.0/24")
	err = a.CreateNetwork(web)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("vni %d", v)) || !strings.Contains(err.Error(), "ep1") {
		t.Errorf("joining web: %v, want a refusal naming vni %d and ep1", err, v)
	}
	if rec, err := a.cl.Network(ctx, "name-web"); err != nil || len(rec.Hosts) != 1 {
		t.Errorf("web after the refused join: hosts %v (%v), want b alone", rec.Hosts, err)
	}

	// The container goes: Docker deletes its endpoint, which a does not
	// know; the join goes through.
	if err := a.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}
	if err := a.CreateNetwork(web); err != nil {
		t.Fatalf("joining web once ep1 is gone: %v", err)
	}
	dp.mu.Lock()
	_, built := dp.networks[v]
	dp.mu.Unlock()
	if !built {
		t.Errorf("a joined web without its overlay (vni %d)", v)
	}
}

// TestEvictedNetworkVNINotShared: host a runs app (vni v) with a
// container (ep1) and is evicted while it is away: the reap removes app
// and frees v in the store, while a keeps app bound and its overlay up
// until its liveness check re-asserts it. Before that, v is the lowest
// free VNI:
//   - "own create": a network a creates itself is given v, and a builds
//     it on app's overlay (two logical networks on one bridge);
//   - "join other": host b creates web and gets v; a joins web and
//     EnsureNetwork hands it app's overlay.
//
// Either way one overlay serves two networks on a, and the re-assertion
// of app then fails for good (v is reserved by the other network).
func TestEvictedNetworkVNINotShared(t *testing.T) {
	ctx := context.Background()
	setup := func(t *testing.T) (*Driver, kvstore.Store, *fakeDataplane, func() cluster.Network) {
		store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
		dp := newFake()
		a := newTestDriver(t, store, "a", "192.0.2.1", dp)
		mustCreate(t, a, "n1", "10.1.0.0/24")
		joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
		app := a.network("n1").rec
		evict(t, store)
		if hasKey(t, store, "networks/name-app/config") {
			t.Fatal("the eviction left app: the test proves nothing")
		}
		return a, store, dp, func() cluster.Network { return app }
	}
	check := func(t *testing.T, a *Driver, app cluster.Network) {
		t.Helper()
		a.mu.Lock()
		defer a.mu.Unlock()
		for key, l := range a.logicals {
			if key != app.Key && l.rec.VNI == app.VNI {
				t.Errorf("a serves logical network %s on vni %d, the overlay of its running network %s (container ep1 on it)", key, app.VNI, app.Key)
			}
		}
	}
	t.Run("own create", func(t *testing.T) {
		a, _, _, app := setup(t)
		if err := a.CreateNetwork(createReq("n2", map[string]interface{}{"name": "fresh"}, "10.2.0.0/24")); err != nil {
			t.Fatalf("create fresh (another vni is free): %v", err)
		}
		check(t, a, app())
		if rec, err := a.cl.Network(ctx, "name-fresh"); err == nil && rec.VNI == app().VNI {
			t.Errorf("fresh got vni %d from the store, app's", rec.VNI)
		}
	})
	t.Run("join other", func(t *testing.T) {
		a, store, dp, app := setup(t)
		b := newHostDriver(t, store, "b", "b", "192.0.2.2", newFake())
		if err := b.CreateNetwork(createReq("nb", map[string]interface{}{"name": "web"}, "10.5.0.0/24")); err != nil {
			t.Fatal(err)
		}
		if rec, err := b.cl.Network(ctx, "name-web"); err != nil || rec.VNI != app().VNI {
			t.Fatalf("web has vni %d (%v), want %d: the test proves nothing", rec.VNI, err, app().VNI)
		}
		err := a.CreateNetwork(createReq("n5", map[string]interface{}{"name": "web"}, "10.5.0.0/24"))
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("vni %d", app().VNI)) || !strings.Contains(err.Error(), `logical network "app"`) {
			t.Errorf("a joins web: %v, want a refusal naming vni %d and app", err, app().VNI)
		}
		check(t, a, app())
		if err == nil {
			// And web's removal on a takes app's overlay, ep1's
			// container's network, with it.
			if err := a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n5"}); err != nil {
				t.Fatal(err)
			}
			dp.mu.Lock()
			_, ok := dp.networks[app().VNI]
			dp.mu.Unlock()
			if !ok || !dp.hasEndpoint("ep1") {
				t.Errorf("removing web on a removed app's overlay (vni %d, built %t) while n1 is bound and ep1's container runs (veth kept %t)", app().VNI, ok, dp.hasEndpoint("ep1"))
			}
		}
	})
}

// TestEvictedRestoredNetworkVNINotShared: as
// TestEvictedNetworkVNINotShared, after a restart that took app from the
// state copy (TestRestartAfterEvictionUsesSnapshot): before the liveness
// check re-asserts app, a network a creates is given app's VNI, freed by
// the reap, and shares app's overlay with ep1's container.
func TestEvictedRestoredNetworkVNINotShared(t *testing.T) {
	ctx := context.Background()
	store, dp, path, a := copySetup(t)
	mustCreate(t, a, "n1", "10.1.0.0/24")
	joinedEndpoint(t, a, "n1", "ep1", "10.1.0.2/24")
	waitCopy(t, path, `"id":"ep1"`)
	v := a.network("n1").rec.VNI
	evictedWith(t, a, store, dp, "ep1")
	b := copyHost(t, store, dp, path, "192.0.2.1")
	restored(t, b, 1, 1)
	if err := b.CreateNetwork(createReq("n2", map[string]interface{}{"name": "fresh"}, "10.2.0.0/24")); err != nil {
		t.Fatalf("create fresh (another vni is free): %v", err)
	}
	if rec, err := b.cl.Network(ctx, "name-fresh"); err == nil && rec.VNI == v {
		t.Errorf("fresh got vni %d, the overlay of app that a restored from its copy and ep1's container uses", v)
	}
}

// TestExplicitVNIOfRunningNetwork: `docker network create -o name=other
// -o vni=<app's>` on host a, which runs app (nothing reaped), is refused
// by the store, which names app as the VNI's holder, not with a reason
// about a store that gave the VNI up.
func TestExplicitVNIOfRunningNetwork(t *testing.T) {
	ctx := context.Background()
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	a := newHostDriver(t, store, "a", "a", "192.0.2.1", newFake())
	mustCreate(t, a, "n1", "10.1.0.0/24")
	app, err := a.cl.Network(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	err = a.CreateNetwork(createReq("n2", map[string]interface{}{"name": "other", optVNI: fmt.Sprint(app.VNI)}, "10.2.0.0/24"))
	if err == nil || !strings.Contains(err.Error(), "taken by logical network \"name-app\"") {
		t.Errorf("-o vni=%d of app: %v, want the store's refusal naming app", app.VNI, err)
	}
}
