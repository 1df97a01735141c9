package driver

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/ipam"
	"consul-overlay/kvstore"
	"consul-overlay/reaper"
)

// TestCreateAfterReassertHoldsPoolPerNetwork: host a runs network n1
// (container ep1) and is evicted while it is away. When it comes back,
// Docker creates n2, a second network on n1's subnet: its RequestPool and
// gateway RequestAddress take a hold each, then the re-assertion runs
// before n2's CreateNetwork. The re-assertion counts bound networks (n1)
// and finds the one hold it wants, n2's. n2's CreateNetwork must take the
// hold n1 lost, or `docker network rm n2` (its ReleaseAddress of the
// gateway and its ReleasePool, before its DeleteNetwork as engine 29
// sends them) removes the pool and ep1's address while n1 still runs: the
// address could then be handed out a second time.
func TestCreateAfterReassertHoldsPoolPerNetwork(t *testing.T) {
	h := newPoolHost(t, poolOpts{noKept: true, driver: []func(*Config){func(c *Config) { c.Reapable = true }}})
	poolID := h.requestPool()
	h.create("n1")
	if p, g := h.holds(); p != 1 || g != 1 {
		t.Fatalf("after an ordinary create a holds the pool %d times and the gateway %d times, want 1 and 1", p, g)
	}
	ep := h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02").Addr()

	h.evicted()
	h.requestPool() // n2's
	local, _ := localOf(t, h.a)
	if _, err := reaper.Reassert(h.ctx, "a", "a", h.a.cl, h.ip, h.a, local, nil); err != nil {
		t.Fatal(err)
	}
	if p, _ := h.holds(); p != 1 {
		t.Fatalf("after the re-assertion a holds the pool %d times, want 1 (n2's; n1 counted and found held)", p)
	}
	h.create("n2")
	if p, g := h.holds(); p != 2 || g != 2 {
		t.Errorf("with n1 and n2 bound, a holds the pool %d times and the gateway %d times, want 2 and 2", p, g)
	}

	// docker network rm n2, as engine 29 sends it.
	h.release(poolID)
	if err := h.a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	if holder := h.heldBy(ep); holder != "a" {
		t.Errorf("after docker network rm n2, ep1's address %s (n1 still runs) is held by %q; want a", ep, holder)
	}
	if p, g := h.holds(); p != 1 || g != 1 {
		t.Errorf("after docker network rm n2, a holds the pool %d times and the gateway %d times, want 1 and 1 (n1's)", p, g)
	}
}

// poolHost is host a with consul-overlay's IPAM on one store, and
// Docker's IPAM calls around the driver's for networks of logical network
// app on subnet 10.1.0.0/24 (gateway 10.1.0.1).
type poolHost struct {
	t      *testing.T
	ctx    context.Context
	store  kvstore.Store // the IPAM's, and the driver's unless poolOpts.store
	ip     *ipam.Driver
	a      *Driver
	dp     *fakeDataplane
	opts   poolOpts
	subnet netip.Prefix
	gw     netip.Addr
}

// poolOpts changes what newPoolHost starts.
type poolOpts struct {
	noKept bool                              // the IPAM without Config.Kept: what the driver's own part does
	grace  time.Duration                     // the IPAM's Config.Grace (0: its default)
	store  func(kvstore.Store) kvstore.Store // the driver's store, around the IPAM's
	dp     func(*fakeDataplane) Dataplane    // the driver's data plane, around the fake
	driver []func(*Config)
}

// keptWait is how long the tests' IPAM hooks wait for a restore.
const keptWait = 200 * time.Millisecond

// newPoolHost starts it, the IPAM asking the driver as plugin/main.go
// wires them (Config.Kept, InUse, HeldReady and Held).
func newPoolHost(t *testing.T, o poolOpts) *poolHost {
	t.Helper()
	h := &poolHost{t: t, ctx: context.Background(), store: openStore(t, filepath.Join(t.TempDir(), "s.db")), opts: o,
		subnet: netip.MustParsePrefix("10.1.0.0/24"), gw: netip.MustParseAddr("10.1.0.1")}
	cfg := ipam.Config{Node: "a", Grace: o.grace,
		InUse: func(poolID string, a netip.Addr) bool {
			_, subnet, _, err := ipam.ParsePoolID(poolID)
			return err == nil && h.a.AddressUsedOnceReady(subnet, a, keptWait)
		},
		HeldReady: func() error { return h.a.WaitRestored(keptWait) },
		Held: func(poolID string, a netip.Addr) bool {
			_, subnet, _, err := ipam.ParsePoolID(poolID)
			return err == nil && h.a.AddressUsed(subnet, a)
		},
	}
	if !o.noKept {
		cfg.Kept = func(poolID string, gw netip.Addr) int { return h.a.KeptHolds(poolID, gw, keptWait) }
		cfg.Restored = func() <-chan struct{} { return h.a.Ready() }
	}
	var err error
	if h.ip, err = ipam.New(cfg, h.store); err != nil {
		t.Fatal(err)
	}
	h.dp = newFake()
	h.a = h.start()
	return h
}

// start starts host a's driver on the host's store and data plane, as a
// restart does, and waits for its restore.
func (h *poolHost) start() *Driver {
	h.t.Helper()
	d := h.newDriver()
	d.Start()
	h.t.Cleanup(func() { d.Close() })
	select {
	case <-d.Ready():
	case <-time.After(5 * time.Second):
		h.t.Fatal("driver did not restore")
	}
	return d
}

// newDriver is host a's driver, not started.
func (h *poolHost) newDriver() *Driver {
	h.t.Helper()
	store, dp := h.store, Dataplane(h.dp)
	if h.opts.store != nil {
		store = h.opts.store(store)
	}
	if h.opts.dp != nil {
		dp = h.opts.dp(h.dp)
	}
	cfg := Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), Shared: true,
		OwnsAddressSpace: h.ip.Owns, HoldPool: h.ip.HoldPool}
	for _, o := range h.opts.driver {
		o(&cfg)
	}
	d, err := New(cfg, store, dp)
	if err != nil {
		h.t.Fatal(err)
	}
	return d
}

// restarted stops host a's driver (a kill -9: nothing is cleaned up) and
// starts another; the containers whose keys are given still run.
func (h *poolHost) restarted(running ...string) {
	h.t.Helper()
	h.a.Close()
	h.running(running...)
	h.a = h.start()
}

// running makes the fake kernel show exactly the given endpoints' interfaces
// in containers.
func (h *poolHost) running(ids ...string) {
	h.dp.mu.Lock()
	defer h.dp.mu.Unlock()
	h.dp.inUse = map[string]bool{}
	for _, id := range ids {
		h.dp.inUse[id] = true
	}
}

// network is Docker's creation of network id: RequestPool, the gateway's
// RequestAddress, CreateNetwork. It returns the pool's ID.
func (h *poolHost) network(id string) string {
	h.t.Helper()
	p := h.requestPool()
	h.create(id)
	return p
}

// sweep is one pass of IPAM's orphan sweep, asking the driver as the
// plugin's housekeeping does.
func (h *poolHost) sweep() {
	h.t.Helper()
	bound := func(poolID string, a netip.Addr) bool {
		_, s, _, err := ipam.ParsePoolID(poolID)
		return err != nil || h.a.AddressMayBeUsed(s, a)
	}
	if _, err := h.ip.Sweep(h.ctx, bound); err != nil {
		h.t.Fatal(err)
	}
}

// notHandedOut checks that address a is handed out to no other
// container.
func (h *poolHost) notHandedOut(a netip.Addr, what string) {
	h.t.Helper()
	p, err := h.ip.AllocatePool(h.ctx, ipam.PoolRequest{Pool: h.subnet})
	if err != nil {
		return
	}
	if got, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: p.ID, Address: a, MAC: "02:42:0a:01:00:99"}); err == nil {
		h.t.Errorf("%s's address %s handed out again (%s) while %s's container runs", what, a, got, what)
	}
}

// requestPool is Docker's RequestPool and gateway RequestAddress for one
// network; it returns the pool's ID.
func (h *poolHost) requestPool() string {
	h.t.Helper()
	p, err := h.ip.AllocatePool(h.ctx, ipam.PoolRequest{Pool: h.subnet})
	if err != nil {
		h.t.Fatal(err)
	}
	if _, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: p.ID, Gateway: true}); err != nil {
		h.t.Fatal(err)
	}
	return p.ID
}

// create is Docker's CreateNetwork of network id.
func (h *poolHost) create(id string) {
	h.t.Helper()
	req := createReq(id, map[string]interface{}{"name": "app"}, h.subnet.String())
	req.IPv4Data[0].AddressSpace = ipam.LocalAddressSpace
	if err := h.a.CreateNetwork(req); err != nil {
		h.t.Fatal(err)
	}
}

// release is Docker's ReleaseAddress of the gateway and ReleasePool of
// one network.
func (h *poolHost) release(poolID string) {
	h.t.Helper()
	if err := h.ip.FreeAddress(h.ctx, poolID, h.gw); err != nil {
		h.t.Fatal(err)
	}
	if err := h.ip.FreePool(h.ctx, poolID); err != nil {
		h.t.Fatal(err)
	}
}

// endpoint is a running container's endpoint id on network netID: its
// address from the pool, CreateEndpoint and Join, and its interface moved
// into the container.
func (h *poolHost) endpoint(poolID, netID, id, mac string) netip.Prefix {
	h.t.Helper()
	a, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: poolID, MAC: mac})
	if err != nil {
		h.t.Fatal(err)
	}
	joinedEndpoint(h.t, h.a, netID, id, a.String())
	h.dp.mu.Lock()
	defer h.dp.mu.Unlock()
	if h.dp.inUse == nil {
		h.dp.inUse = map[string]bool{}
	}
	h.dp.inUse[id] = true
	return a
}

// evicted removes host a from the store as another host's reaper does,
// its IPAM holds and addresses with it.
func (h *poolHost) evicted() {
	h.t.Helper()
	evict(h.t, h.store)
	r, err := ipam.New(ipam.Config{Node: "r"}, h.store)
	if err != nil {
		h.t.Fatal(err)
	}
	if _, err := r.EvictNode(h.ctx, "a"); err != nil {
		h.t.Fatal(err)
	}
}

// heldBy is the host holding address a ("" if none).
func (h *poolHost) heldBy(a netip.Addr) string {
	h.t.Helper()
	_, holder, _, err := h.ip.AddressHolder(h.ctx, a)
	if err != nil {
		h.t.Fatal(err)
	}
	return holder
}

// poolKeysLeft tells whether the store has any key of the pool.
func (h *poolHost) poolKeysLeft() bool {
	h.t.Helper()
	pairs, err := h.store.List(h.ctx, "ipam/")
	if err != nil {
		h.t.Fatal(err)
	}
	dir := fmt.Sprintf("/pool/%s_%d/", h.subnet.Addr(), h.subnet.Bits())
	for _, kv := range pairs {
		if strings.Contains(kv.Key, dir) {
			return true
		}
	}
	return false
}

// holds counts a's holds of the pool and of its gateway (0 for a pool or
// gateway that is gone).
func (h *poolHost) holds() (pool, gateway int) {
	h.t.Helper()
	p, err := h.ip.PoolInfo(h.ctx, ipam.PoolID(ipam.LocalAddressSpace, h.subnet, netip.Prefix{}))
	if err != nil {
		return 0, 0
	}
	pairs, err := h.store.List(h.ctx, "")
	if err != nil {
		h.t.Fatal(err)
	}
	var rec struct {
		Holders map[string]int `json:"holders"`
	}
	for _, kv := range pairs {
		if strings.Contains(kv.Key, "/addr/") && strings.HasSuffix(kv.Key, "/"+h.gw.String()) {
			if err := json.Unmarshal(kv.Value, &rec); err != nil {
				h.t.Fatalf("%s: %v", kv.Key, err)
			}
		}
	}
	return p.Holders["a"], rec.Holders["a"]
}
