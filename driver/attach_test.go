package driver

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"
	"github.com/vishvananda/netlink"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// The attach path of issue 16: CreateEndpoint makes the veth pair while it
// writes the record, Join only hands the names back. These tests prove it
// against the fake data plane (what the driver asks for and undoes) and
// against the kernel (what the links look like).

// CreateEndpoint: the fake has no fast path.
func (f *fakeDataplane) CreateEndpoint(ctx context.Context, ep vxlan.Endpoint) (vxlan.EndpointInfo, error) {
	return f.EnsureEndpoint(ctx, ep)
}

func (f *fakeDataplane) dropNetwork(vni uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.networks, vni)
}

func endpointKeys(t *testing.T, s kvstore.Store) []string {
	t.Helper()
	var out []string
	for _, k := range allKeys(t, s) {
		if strings.Contains(k, "/endpoints/") {
			out = append(out, k)
		}
	}
	return out
}

func TestAttachVethAtCreate(t *testing.T) {
	join := func(d *Driver, id string) (*network.JoinResponse, error) {
		return d.Join(&network.JoinRequest{NetworkID: "n1", EndpointID: id, SandboxKey: "/var/run/docker/netns/0123456789ab"})
	}
	t.Run("veth exists after CreateEndpoint, before Join", func(t *testing.T) {
		store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
		dp, d := newAttachDriver(t, store)
		if _, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24")); err != nil {
			t.Fatal(err)
		}
		if !dp.hasEndpoint("ep1") {
			t.Fatal("no veth pair after CreateEndpoint")
		}
		resp, err := join(d, "ep1")
		if err != nil {
			t.Fatal(err)
		}
		if resp.InterfaceName.SrcName != vxlan.ContainerIfName("ep1") {
			t.Fatalf("join handed back %q", resp.InterfaceName.SrcName)
		}
	})
	t.Run("failed transaction leaves no veth", func(t *testing.T) {
		store := &outageStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
		dp, d := newAttachDriver(t, store)
		store.down.Store(true)
		_, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24"))
		store.down.Store(false)
		if err == nil || !strings.Contains(err.Error(), "create endpoint ep1") {
			t.Fatalf("CreateEndpoint with the store down: %v", err)
		}
		if dp.hasEndpoint("ep1") {
			t.Fatal("veth pair left by a failed CreateEndpoint")
		}
		if keys := endpointKeys(t, store); len(keys) != 0 {
			t.Fatalf("records left: %v", keys)
		}
		// Docker's retry succeeds.
		if _, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24")); err != nil {
			t.Fatal(err)
		}
		if !dp.hasEndpoint("ep1") {
			t.Fatal("no veth pair after the retry")
		}
	})
	t.Run("failed veth leaves no record", func(t *testing.T) {
		store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
		dp, d := newAttachDriver(t, store)
		dp.dropNetwork(d.network("n1").rec.VNI) // EnsureEndpoint fails: no bridge
		_, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24"))
		if err == nil || !strings.Contains(err.Error(), "create endpoint ep1: veth pair") {
			t.Fatalf("CreateEndpoint without a bridge: %v", err)
		}
		if keys := endpointKeys(t, store); len(keys) != 0 {
			t.Fatalf("records left: %v", keys)
		}
		d.mu.Lock()
		_, known := d.endpoints["ep1"]
		d.mu.Unlock()
		if known {
			t.Fatal("endpoint left in the driver's table")
		}
	})
	t.Run("Join after CreateEndpoint asks the kernel nothing; a later Join makes a missing veth", func(t *testing.T) {
		store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
		dp, d := newAttachDriver(t, store)
		if _, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24")); err != nil {
			t.Fatal(err)
		}
		// Gone behind the driver's back: the Join that follows
		// CreateEndpoint trusts the pair CreateEndpoint made, as Docker's
		// bridge driver does (Docker names the interface it cannot move).
		if err := dp.DeleteEndpoint(t.Context(), "ep1"); err != nil {
			t.Fatal(err)
		}
		resp, err := join(d, "ep1")
		if err != nil {
			t.Fatal(err)
		}
		if resp.InterfaceName.SrcName != vxlan.ContainerIfName("ep1") {
			t.Fatalf("Join handed back %q", resp.InterfaceName.SrcName)
		}
		if dp.hasEndpoint("ep1") {
			t.Fatal("Join after CreateEndpoint went to the kernel")
		}
		// Any other Join (a replay after Leave; a restarted plugin, see
		// TestAttachVethAtCreateKernel) checks the pair and makes it.
		if err := d.Leave(&network.LeaveRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
			t.Fatal(err)
		}
		if _, err := join(d, "ep1"); err != nil {
			t.Fatal(err)
		}
		if !dp.hasEndpoint("ep1") {
			t.Fatal("Join did not make the missing veth pair")
		}
	})
	t.Run("DeleteEndpoint without Join removes the veth", func(t *testing.T) {
		store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
		dp, d := newAttachDriver(t, store)
		if _, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24")); err != nil {
			t.Fatal(err)
		}
		if err := d.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, func() bool { return !dp.hasEndpoint("ep1") })
		if keys := endpointKeys(t, store); len(keys) != 0 {
			t.Fatalf("records left: %v", keys)
		}
	})
	t.Run("replayed CreateEndpoint keeps the veth, also when its transaction fails", func(t *testing.T) {
		store := &outageStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
		dp, d := newAttachDriver(t, store)
		for range 2 {
			if _, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24")); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := join(d, "ep1"); err != nil {
			t.Fatal(err)
		}
		store.down.Store(true)
		_, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24"))
		store.down.Store(false)
		if err == nil {
			t.Fatal("replay with the store down succeeded")
		}
		if !dp.hasEndpoint("ep1") {
			t.Fatal("a failed replay removed the veth pair of a joined endpoint")
		}
		if keys := endpointKeys(t, store); len(keys) != 1 {
			t.Fatalf("records: %v", keys)
		}
	})
	t.Run("crash between CreateEndpoint and Join", func(t *testing.T) {
		store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
		dp, d := newAttachDriver(t, store)
		if _, err := d.CreateEndpoint(epReq("n1", "ep1", "10.1.0.2/24")); err != nil {
			t.Fatal(err)
		}
		d.cancel() // kill -9: no flush, no undo
		d = newTestDriver(t, store, "a", "192.0.2.1", dp)
		if _, err := join(d, "ep1"); err != nil {
			t.Fatal(err)
		}
		if !dp.hasEndpoint("ep1") {
			t.Fatal("no veth pair after the join")
		}
	})
}

// TestAttachVethAtCreateKernel runs the attach path against the kernel in
// a fresh namespace: the pair CreateEndpoint makes is up on the bridge
// with the network's MTU and the endpoint's MAC before Join; a failed
// transaction leaves no link; Join rebuilds a lost pair, also after a
// restart between CreateEndpoint and Join; DeleteEndpoint without Join
// removes the pair.
func TestAttachVethAtCreateKernel(t *testing.T) {
	testenv.RequireRoot(t)
	h := testenv.NewUnderlay(t, 1, testenv.UnderlayOptions{})[0]
	m, err := vxlan.NewAt(vxlan.Config{VTEP: h.Addr, IPTables: "-", IP6Tables: "-", Sysctl: "-"}, h.NS.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	nlh := h.NS.Handle()
	store := &outageStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
	d := newTestDriver(t, store, "a", h.Addr.String(), m)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	vni := d.network("n1").rec.VNI
	br, err := nlh.LinkByName(vxlan.BridgeName(vni))
	if err != nil {
		t.Fatal(err)
	}
	const (
		ep1 = "e1e1e1e1e1e1e1e1e1e1e1e1"
		ep2 = "e2e2e2e2e2e2e2e2e2e2e2e2"
		ep3 = "e3e3e3e3e3e3e3e3e3e3e3e3"
	)
	links := func(id string) (host, cont netlink.Link) {
		t.Helper()
		host, _ = nlh.LinkByName(vxlan.HostIfName(id))
		cont, _ = nlh.LinkByName(vxlan.ContainerIfName(id))
		return host, cont
	}
	// checkPair: up, on the bridge, the bridge's MTU, the endpoint's MAC.
	checkPair := func(id, mac string) {
		t.Helper()
		host, cont := links(id)
		if host == nil || cont == nil {
			t.Fatalf("endpoint %s: veth pair missing (host end %v, container end %v)", id, host != nil, cont != nil)
		}
		if host.Attrs().MasterIndex != br.Attrs().Index || host.Attrs().Flags&1 == 0 {
			t.Fatalf("host end %s: master %d (bridge %d), flags %v", host.Attrs().Name, host.Attrs().MasterIndex, br.Attrs().Index, host.Attrs().Flags)
		}
		if host.Attrs().MTU != br.Attrs().MTU || cont.Attrs().MTU != br.Attrs().MTU {
			t.Fatalf("MTU host %d container %d, bridge %d", host.Attrs().MTU, cont.Attrs().MTU, br.Attrs().MTU)
		}
		if cont.Attrs().HardwareAddr.String() != mac {
			t.Fatalf("container end MAC %s, want %s", cont.Attrs().HardwareAddr, mac)
		}
	}
	join := func(d *Driver, id string) {
		t.Helper()
		resp, err := d.Join(&network.JoinRequest{NetworkID: "n1", EndpointID: id, SandboxKey: "/var/run/docker/netns/0123456789ab"})
		if err != nil {
			t.Fatal(err)
		}
		if resp.InterfaceName.SrcName != vxlan.ContainerIfName(id) {
			t.Fatalf("join handed back %q", resp.InterfaceName.SrcName)
		}
	}

	// Made at CreateEndpoint, before Join.
	resp, err := d.CreateEndpoint(epReq("n1", ep1, "10.1.0.2/24"))
	if err != nil {
		t.Fatal(err)
	}
	checkPair(ep1, resp.Interface.MacAddress)
	join(d, ep1)
	checkPair(ep1, resp.Interface.MacAddress)

	// A failed transaction leaves no link.
	store.down.Store(true)
	_, err = d.CreateEndpoint(epReq("n1", ep2, "10.1.0.3/24"))
	store.down.Store(false)
	if err == nil || !strings.Contains(err.Error(), "create endpoint "+ep2[:12]) {
		t.Fatalf("CreateEndpoint with the store down: %v", err)
	}
	if host, cont := links(ep2); host != nil || cont != nil {
		t.Fatal("a failed CreateEndpoint left its veth pair")
	}

	// DeleteEndpoint without Join.
	if _, err := d.CreateEndpoint(epReq("n1", ep2, "10.1.0.3/24")); err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "n1", EndpointID: ep2}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 5*time.Second, func() error {
		if host, cont := links(ep2); host != nil || cont != nil {
			return errors.New("veth pair of a deleted, never joined endpoint still there")
		}
		return nil
	})

	// A crash between CreateEndpoint and Join; the restarted plugin joins,
	// also when the pair was lost while it was down.
	resp, err = d.CreateEndpoint(epReq("n1", ep3, "10.1.0.4/24"))
	if err != nil {
		t.Fatal(err)
	}
	d.cancel() // kill -9: no flush, no undo
	host, _ := links(ep3)
	if err := nlh.LinkDel(host); err != nil {
		t.Fatal(err)
	}
	d = newTestDriver(t, store, "a", h.Addr.String(), m)
	join(d, ep3)
	checkPair(ep3, resp.Interface.MacAddress)
	// The same once more, with Join finding the pair gone after restore.
	host, _ = links(ep3)
	if err := nlh.LinkDel(host); err != nil {
		t.Fatal(err)
	}
	join(d, ep3)
	checkPair(ep3, resp.Interface.MacAddress)
	if keys := endpointKeys(t, store); !slices.Equal(keys, []string{"networks/name-app/endpoints/" + ep1, "networks/name-app/endpoints/" + ep3}) {
		t.Fatalf("records: %v", keys)
	}
}

// newAttachDriver is a driver on a fake data plane and store, with network
// n1 (10.1.0.0/24) created.
func newAttachDriver(t *testing.T, store kvstore.Store) (*fakeDataplane, *Driver) {
	t.Helper()
	dp := newFake()
	d := newTestDriver(t, store, "a", "192.0.2.1", dp)
	mustCreate(t, d, "n1", "10.1.0.0/24")
	return dp, d
}
