package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/docker/go-plugins-helpers/ipam"
)

// hosts returns n simulated hosts host-0..host-<n-1>, each with its own
// store client.
func (c *cluster) hosts(n int) []*Driver {
	ds := make([]*Driver, n)
	for i := range ds {
		ds[i] = c.host(fmt.Sprintf("host-%d", i))
	}
	return ds
}

// together runs f(i) for i in 0..n-1 on n goroutines released at once, and
// waits for them.
func together(n int, f func(i int)) {
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			f(i)
		}()
	}
	close(start)
	wg.Wait()
}

// scenarioEightHostsExhaustPool: 8 hosts create the same network and
// allocate concurrently until the /24 is exhausted: exactly 253 distinct
// addresses plus the shared gateway, each recorded with its holder; then
// every host releases everything and no key is left.
func scenarioEightHostsExhaustPool(t *testing.T, c *cluster) {
	const n = 8
	ds := c.hosts(n)
	poolIDs := make([]string, n)
	gws := make([]string, n)
	errs := make([]error, n)
	together(n, func(i int) {
		r, err := ds[i].RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.20.0.0/24"})
		if err != nil {
			errs[i] = err
			return
		}
		poolIDs[i] = r.PoolID
		g, err := ds[i].RequestAddress(&ipam.RequestAddressRequest{PoolID: r.PoolID, Options: gw})
		if err != nil {
			errs[i] = err
			return
		}
		gws[i] = g.Address
	})
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("host %d: %v", i, errs[i])
		}
		if poolIDs[i] != poolIDs[0] || gws[i] != "10.20.0.1/24" {
			t.Fatalf("host %d got pool %s gateway %s; host 0 got %s %s", i, poolIDs[i], gws[i], poolIDs[0], gws[0])
		}
	}
	p := poolIDs[0]
	got := make([][]string, n)
	together(n, func(i int) {
		for k := 0; ; k++ {
			r, err := ds[i].RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Options: ep(fmt.Sprintf("c%d-%d", i, k))})
			if errors.Is(err, ErrPoolExhausted) {
				if !strings.Contains(err.Error(), p) {
					errs[i] = fmt.Errorf("exhaustion error does not name the pool: %w", err)
				}
				return
			}
			if err != nil {
				errs[i] = err
				return
			}
			got[i] = append(got[i], r.Address)
		}
	})
	seen := map[string]int{}
	total := 0
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("host %d: %v", i, errs[i])
		}
		for _, a := range got[i] {
			if prev, dup := seen[a]; dup {
				t.Errorf("%s handed to host %d and host %d", a, prev, i)
			}
			seen[a] = i
			total++
			pa := netip.MustParsePrefix(a)
			if pa.Bits() != 24 || !usable(netip.MustParsePrefix("10.20.0.0/24"), pa.Addr()) || a == "10.20.0.1/24" {
				t.Errorf("host %d got %s", i, a)
			}
		}
	}
	if total != 253 || len(seen) != 253 {
		t.Fatalf("%d addresses (%d distinct) handed out, want 253", total, len(seen))
	}
	t.Logf("per host: %v", func() []int {
		var c []int
		for i := range n {
			c = append(c, len(got[i]))
		}
		return c
	}())
	// Every one recorded, with its holder and endpoint.
	ref, _ := parsePoolID(p)
	pairs, err := c.inspect.List(t.Context(), addrDir(ref.space, ref.subnet))
	if err != nil {
		t.Fatal(err)
	}
	if len(pairs) != 254 {
		t.Errorf("%d address records, want 254 (253 + gateway)", len(pairs))
	}
	for a, i := range seen {
		r := c.addrRecord(p, hostOf(a))
		if r.Kind != kindEndpoint || r.Node != fmt.Sprintf("host-%d", i) || !strings.HasPrefix(r.Endpoint, fmt.Sprintf("c%d-", i)) {
			t.Errorf("record of %s (host %d): %+v", a, i, r)
		}
	}
	if r := c.addrRecord(p, "10.20.0.1"); r.Kind != kindGateway || len(r.Holders) != n {
		t.Errorf("gateway record %+v", r)
	}
	together(n, func(i int) {
		for _, a := range got[i] {
			if err := ds[i].ReleaseAddress(&ipam.ReleaseAddressRequest{PoolID: p, Address: hostOf(a)}); err != nil {
				errs[i] = err
				return
			}
		}
		if err := ds[i].ReleaseAddress(&ipam.ReleaseAddressRequest{PoolID: p, Address: "10.20.0.1"}); err != nil {
			errs[i] = err
			return
		}
		errs[i] = ds[i].ReleasePool(&ipam.ReleasePoolRequest{PoolID: p})
	})
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("host %d release: %v", i, errs[i])
		}
	}
	c.empty()
}

// scenarioOverlapRace: two hosts race to create different but overlapping
// pools; exactly one wins and the other gets ErrPoolOverlap naming the
// winner. Repeated, alternating which subnet is the larger.
func scenarioOverlapRace(t *testing.T, c *cluster) {
	ds := c.hosts(2)
	for round := range 6 {
		subnets := [2]string{"10.30.0.0/16", fmt.Sprintf("10.30.%d.0/24", round)}
		if round%2 == 1 {
			subnets[0], subnets[1] = subnets[1], subnets[0]
		}
		var res [2]*ipam.RequestPoolResponse
		var errs [2]error
		together(2, func(i int) {
			res[i], errs[i] = ds[i].RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: subnets[i]})
		})
		if (errs[0] == nil) == (errs[1] == nil) {
			t.Fatalf("round %d: errors %v and %v: want exactly one winner", round, errs[0], errs[1])
		}
		w, l := 0, 1
		if errs[0] != nil {
			w, l = 1, 0
		}
		if !errors.Is(errs[l], ErrPoolOverlap) || !strings.Contains(errs[l].Error(), res[w].PoolID) {
			t.Fatalf("round %d: loser got %v, want ErrPoolOverlap naming %s", round, errs[l], res[w].PoolID)
		}
		mustReleasePool(t, ds[w], res[w].PoolID)
		c.empty()
	}
}

// scenarioSameSubnetRace: hosts racing for the same subnet all get the same
// pool, held once per host.
func scenarioSameSubnetRace(t *testing.T, c *cluster) {
	const n = 4
	ds := c.hosts(n)
	ids := make([]string, n)
	errs := make([]error, n)
	together(n, func(i int) {
		r, err := ds[i].RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.31.0.0/24"})
		if err == nil {
			ids[i] = r.PoolID
		}
		errs[i] = err
	})
	for i := range n {
		if errs[i] != nil || ids[i] != ids[0] {
			t.Fatalf("host %d: %s, %v (host 0: %s)", i, ids[i], errs[i], ids[0])
		}
	}
	info, err := ds[0].PoolInfo(t.Context(), ids[0])
	if err != nil || len(info.Holders) != n {
		t.Fatalf("pool info %+v, %v", info, err)
	}
	together(n, func(i int) { errs[i] = ds[i].ReleasePool(&ipam.ReleasePoolRequest{PoolID: ids[i]}) })
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
	}
	c.empty()
}

// scenarioAutoPoolRace: hosts asking for automatic pools at once all get
// distinct, non-overlapping pools.
func scenarioAutoPoolRace(t *testing.T, c *cluster) {
	const n = 8
	ds := c.hosts(n)
	res := make([]*ipam.RequestPoolResponse, n)
	errs := make([]error, n)
	together(n, func(i int) {
		res[i], errs[i] = ds[i].RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace})
	})
	seen := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("host %d: %v", i, errs[i])
		}
		if seen[res[i].Pool] {
			t.Errorf("pool %s handed out twice", res[i].Pool)
		}
		seen[res[i].Pool] = true
	}
	together(n, func(i int) { errs[i] = ds[i].ReleasePool(&ipam.ReleasePoolRequest{PoolID: res[i].PoolID}) })
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
	}
	c.empty()
}
