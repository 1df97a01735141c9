package driver

import (
	"context"
	"encoding/json"
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
	h := newPoolHost(t, false, func(c *Config) { c.Reapable = true })
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
	store  kvstore.Store
	ip     *ipam.Driver
	a      *Driver
	dp     *fakeDataplane
	subnet netip.Prefix
	gw     netip.Addr
}

// keptWait is how long the tests' KeptHolds waits for a restore.
const keptWait = 200 * time.Millisecond

// newPoolHost starts it. With kept, the IPAM asks the driver how many
// holds a release must leave (Config.Kept), as plugin/main.go wires it;
// without, the test sees what the driver's own part does.
func newPoolHost(t *testing.T, kept bool, opts ...func(*Config)) *poolHost {
	t.Helper()
	h := &poolHost{t: t, ctx: context.Background(), store: openStore(t, filepath.Join(t.TempDir(), "s.db")),
		subnet: netip.MustParsePrefix("10.1.0.0/24"), gw: netip.MustParseAddr("10.1.0.1")}
	cfg := ipam.Config{Node: "a"}
	if kept {
		cfg.Kept = func(poolID string, gw netip.Addr) int { return h.a.KeptHolds(poolID, gw, keptWait) }
	}
	var err error
	if h.ip, err = ipam.New(cfg, h.store); err != nil {
		t.Fatal(err)
	}
	h.dp = newFake()
	h.a = newHostDriver(t, h.store, "a", "a", "192.0.2.1", h.dp, append([]func(*Config){func(c *Config) {
		c.OwnsAddressSpace = h.ip.Owns
		c.HoldPool = h.ip.HoldPool
	}}, opts...)...)
	return h
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
	if h.dp.inUse == nil {
		h.dp.inUse = map[string]bool{}
	}
	h.dp.inUse[id] = true
	h.dp.mu.Unlock()
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
