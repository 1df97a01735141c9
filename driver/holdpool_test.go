package driver

import (
	"context"
	"encoding/json"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/ipam"
	"consul-overlay/reaper"
)

// TestCreateAfterReassertHoldsPoolPerNetwork: host a runs network n1
// (container ep1) and is evicted while it is away. When it comes back,
// Docker creates n2, a second network on n1's subnet: its RequestPool and
// gateway RequestAddress take a hold each, then the re-assertion runs
// before n2's CreateNetwork. The re-assertion counts bound networks (n1)
// and finds the one hold it wants, n2's. n2's CreateNetwork must take the
// hold n1 lost, or `docker network rm n2` (its ReleaseAddress of the
// gateway and its ReleasePool, before its DeleteNetwork as engine 20.10
// sends them) removes the pool and ep1's address while n1 still runs: the
// address could then be handed out a second time.
func TestCreateAfterReassertHoldsPoolPerNetwork(t *testing.T) {
	ctx := context.Background()
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	ip, err := ipam.New(ipam.Config{Node: "a"}, store)
	if err != nil {
		t.Fatal(err)
	}
	a := newHostDriver(t, store, "a", "a", "192.0.2.1", newFake(), func(c *Config) {
		c.Reapable = true
		c.OwnsAddressSpace = ip.Owns
		c.HoldPool = ip.HoldPool
	})
	subnet := netip.MustParsePrefix("10.1.0.0/24")
	gw := netip.MustParseAddr("10.1.0.1")
	// requestPool is Docker's RequestPool and gateway RequestAddress for
	// one network.
	requestPool := func() string {
		t.Helper()
		p, err := ip.AllocatePool(ctx, ipam.PoolRequest{Pool: subnet})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: p.ID, Gateway: true}); err != nil {
			t.Fatal(err)
		}
		return p.ID
	}
	create := func(id string) {
		t.Helper()
		req := createReq(id, map[string]interface{}{"name": "app"}, subnet.String())
		req.IPv4Data[0].AddressSpace = ipam.LocalAddressSpace
		if err := a.CreateNetwork(req); err != nil {
			t.Fatal(err)
		}
	}
	holds := func() (pool, gateway int) {
		t.Helper()
		p, err := ip.PoolInfo(ctx, ipam.PoolID(ipam.LocalAddressSpace, subnet, netip.Prefix{}))
		if err != nil {
			t.Fatal(err)
		}
		pairs, err := store.List(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		var rec struct {
			Holders map[string]int `json:"holders"`
		}
		for _, kv := range pairs {
			if strings.Contains(kv.Key, "/addr/") && strings.HasSuffix(kv.Key, "/"+gw.String()) {
				if err := json.Unmarshal(kv.Value, &rec); err != nil {
					t.Fatalf("%s: %v", kv.Key, err)
				}
			}
		}
		return p.Holders["a"], rec.Holders["a"]
	}

	poolID := requestPool()
	create("n1")
	if p, g := holds(); p != 1 || g != 1 {
		t.Fatalf("after an ordinary create a holds the pool %d times and the gateway %d times, want 1 and 1", p, g)
	}
	epNet, err := ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: poolID, MAC: "02:42:0a:01:00:02"})
	if err != nil {
		t.Fatal(err)
	}
	ep := epNet.Addr()
	joinedEndpoint(t, a, "n1", "ep1", epNet.String())

	evict(t, store)
	r, err := ipam.New(ipam.Config{Node: "r"}, store)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.EvictNode(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	requestPool() // n2's
	local, _ := localOf(t, a)
	if _, err := reaper.Reassert(ctx, "a", "a", a.cl, ip, a, local, nil); err != nil {
		t.Fatal(err)
	}
	if p, _ := holds(); p != 1 {
		t.Fatalf("after the re-assertion a holds the pool %d times, want 1 (n2's; n1 counted and found held)", p)
	}
	create("n2")
	if p, g := holds(); p != 2 || g != 2 {
		t.Errorf("with n1 and n2 bound, a holds the pool %d times and the gateway %d times, want 2 and 2", p, g)
	}

	// docker network rm n2, as engine 20.10 sends it.
	if err := ip.FreeAddress(ctx, poolID, gw); err != nil {
		t.Fatal(err)
	}
	if err := ip.FreePool(ctx, poolID); err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	if _, holder, _, err := ip.AddressHolder(ctx, ep); err != nil || holder != "a" {
		t.Errorf("after docker network rm n2, ep1's address %s (n1 still runs) is held by %q, %v; want a", ep, holder, err)
	}
	if p, g := holds(); p != 1 || g != 1 {
		t.Errorf("after docker network rm n2, a holds the pool %d times and the gateway %d times, want 1 and 1 (n1's)", p, g)
	}
}
