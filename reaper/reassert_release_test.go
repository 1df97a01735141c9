package reaper_test

import (
	"context"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"consul-overlay/cluster"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
	"consul-overlay/reaper"
)

// nopRejoiner records nothing: these tests are about IPAM holds.
type nopRejoiner struct{}

func (nopRejoiner) Join(_ context.Context, key, _ string, _ cluster.NetworkSpec) (cluster.Network, error) {
	return cluster.Network{Key: key}, nil
}

func (nopRejoiner) CreateEndpoint(_ context.Context, ep cluster.Endpoint) (cluster.Endpoint, error) {
	return ep, nil
}

// boundNets models the driver (reaper.Holder, and ipam.Config.MinHolds
// through count): the Docker networks in bound are bound, every endpoint
// is joined.
type boundNets struct {
	mu    sync.Mutex
	bound []string
}

func (h *boundNets) set(ids ...string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.bound = ids
}

func (h *boundNets) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.bound)
}

func (h *boundNets) WhileBound(id string, fn func() error) (bool, error) {
	h.mu.Lock()
	ok := slices.Contains(h.bound, id)
	h.mu.Unlock()
	if !ok {
		return false, nil
	}
	return true, fn()
}

func (h *boundNets) WhileBoundAll(ids []string, fn func([]string) error) error {
	h.mu.Lock()
	var b []string
	for _, id := range ids {
		if slices.Contains(h.bound, id) {
			b = append(b, id)
		}
	}
	h.mu.Unlock()
	return fn(b)
}

func (h *boundNets) WhileJoined(_ string, fn func() error) (bool, error) { return true, fn() }

// evictedWithNetwork: host B runs Docker network net-a (pool 10.50.0.0/24,
// its gateway, one container) and is evicted by host A. B's IPAM counts
// its bound networks (nets) as MinHolds, as the plugin does.
func evictedWithNetwork(t *testing.T, nets *boundNets) (a, b *ipam.Driver, poolID string, addr netip.Addr, local []reaper.LocalNetwork) {
	t.Helper()
	ctx := t.Context()
	st, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: filepath.Join(t.TempDir(), "state.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if a, err = ipam.New(ipam.Config{Node: "host-a"}, st); err != nil {
		t.Fatal(err)
	}
	b, err = ipam.New(ipam.Config{Node: "host-b", MinHolds: func(string, netip.Addr) int { return nets.count() }}, st)
	if err != nil {
		t.Fatal(err)
	}
	p, err := b.AllocatePool(ctx, ipam.PoolRequest{Pool: netip.MustParsePrefix("10.50.0.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.AllocateAddress(ctx, ipam.AddressRequest{PoolID: p.ID, Gateway: true}); err != nil {
		t.Fatal(err)
	}
	pfx, err := b.AllocateAddress(ctx, ipam.AddressRequest{PoolID: p.ID, Endpoint: "ep-a", MAC: "02:00:00:00:00:0a"})
	if err != nil {
		t.Fatal(err)
	}
	n := cluster.Network{Key: "name-n", Name: "n", VNI: 4242, Subnets: []string{"10.50.0.0/24"}, Gateways: []string{"10.50.0.1/24"}}
	local = []reaper.LocalNetwork{{Network: n, NetworkIDs: []string{"net-a"},
		Endpoints: []cluster.Endpoint{{ID: "ep-a", NetworkKey: "name-n", NetworkID: "net-a", IPv4: pfx.String(), MAC: "02:00:00:00:00:0a", HostID: "host-b"}}}}
	if _, err := a.EvictNode(ctx, "host-b"); err != nil {
		t.Fatal(err)
	}
	return a, b, p.ID, pfx.Addr(), local
}

// release is Docker's release of a removed network's IPAM: its gateway,
// then its pool.
func release(t *testing.T, b *ipam.Driver, poolID string) {
	t.Helper()
	if err := b.FreeAddress(t.Context(), poolID, netip.MustParseAddr("10.50.0.1")); err != nil {
		t.Fatal(err)
	}
	if err := b.FreePool(t.Context(), poolID); err != nil {
		t.Fatal(err)
	}
}

// TestReleaseAfterReassertKeepsRunningNetwork: an evicted host's
// re-assertion counts its bound networks, but Docker's IPAM calls come
// outside the driver: a network being created holds the pool before it is
// bound, and a network being removed releases it after it is unbound. So
// the hold count can fall short of the networks, and the last release of
// one network removed the pool and the running network's addresses
// (handed out again later). The release now stops at the number of
// networks still bound (ipam.Config.MinHolds).
func TestReleaseAfterReassertKeepsRunningNetwork(t *testing.T) {
	t.Run("network created during the check", func(t *testing.T) {
		nets := &boundNets{}
		a, b, poolID, addr, local := evictedWithNetwork(t, nets)
		ctx := t.Context()
		// docker network create net-c: its IPAM first (one pool and one
		// gateway hold), then it is bound; the check's local state does
		// not have it.
		if _, err := b.AllocatePool(ctx, ipam.PoolRequest{Pool: netip.MustParsePrefix("10.50.0.0/24")}); err != nil {
			t.Fatal(err)
		}
		if _, err := b.AllocateAddress(ctx, ipam.AddressRequest{PoolID: poolID, Gateway: true}); err != nil {
			t.Fatal(err)
		}
		nets.set("net-a", "net-c")
		if _, err := reaper.Reassert(ctx, "host-b", "node-b", nopRejoiner{}, b, nets, local, nil); err != nil {
			t.Fatal(err)
		}
		// docker network rm net-c.
		nets.set("net-a")
		release(t, b, poolID)
		if _, holder, _, err := a.AddressHolder(ctx, addr); err != nil || holder != "host-b" {
			t.Errorf("after net-c's rm, net-a's running container's address %s is held by %q (%v); want host-b", addr, holder, err)
		}
	})
	t.Run("network removed during the check", func(t *testing.T) {
		nets := &boundNets{}
		a, b, poolID, addr, local := evictedWithNetwork(t, nets)
		ctx := t.Context()
		// net-b was in the check's local state; its DeleteNetwork ran
		// before the re-assertion, its IPAM release comes after.
		local[0].NetworkIDs = []string{"net-a", "net-b"}
		nets.set("net-a")
		if _, err := reaper.Reassert(ctx, "host-b", "node-b", nopRejoiner{}, b, nets, local, nil); err != nil {
			t.Fatal(err)
		}
		release(t, b, poolID)
		if _, holder, _, err := a.AddressHolder(ctx, addr); err != nil || holder != "host-b" {
			t.Errorf("after net-b's release, net-a's running container's address %s is held by %q (%v); want host-b", addr, holder, err)
		}
		if _, holders, _, err := a.AddressHolder(ctx, netip.MustParseAddr("10.50.0.1")); err != nil || holders == "" {
			t.Errorf("after net-b's release, net-a's gateway holders %q (%v); want host-b", holders, err)
		}
	})
}
