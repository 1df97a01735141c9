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
