package ipam

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"strings"
	"testing"

	"consul-overlay/kvstore"

	"github.com/docker/go-plugins-helpers/ipam"
)

// values returns every key under ipam/ with its value (versions ignored).
func values(t *testing.T, s kvstore.Store, skip ...string) map[string]string {
	t.Helper()
	pairs, err := s.List(context.Background(), keyRoot)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
outer:
	for _, p := range pairs {
		for _, k := range skip {
			if strings.HasSuffix(p.Key, k) {
				continue outer
			}
		}
		m[p.Key] = string(p.Value)
	}
	return m
}

func isOurError(err error) bool {
	for _, e := range []error{ErrPoolExhausted, ErrPoolOverlap, ErrAddressInUse, ErrAddressOutOfRange, ErrUnknownPool, ErrInvalidRequest} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// checkIndex fails if two pools of one index overlap.
func checkIndex(t *testing.T, s kvstore.Store) {
	t.Helper()
	for _, v6 := range []bool{false, true} {
		for _, space := range []string{LocalAddressSpace, GlobalAddressSpace} {
			d := &Driver{store: s}
			idx, _, err := d.readIndex(context.Background(), indexKey(space, v6))
			if err != nil {
				t.Fatal(err)
			}
			for i, a := range idx.Pools {
				for _, b := range idx.Pools[i+1:] {
					if a.Subnet.Overlaps(b.Subnet) {
						t.Fatalf("index holds overlapping pools %s and %s", a.Subnet, b.Subnet)
					}
				}
			}
		}
	}
}

func FuzzRequestPool(f *testing.F) {
	f.Add(LocalAddressSpace, "10.1.0.0/24", "", false)
	f.Add(LocalAddressSpace, "10.9.0.0/24", "", false)
	f.Add(LocalAddressSpace, "10.9.0.0/16", "", false)
	f.Add(GlobalAddressSpace, "10.1.0.0/24", "10.1.0.128/25", false)
	f.Add("", "", "", false)
	f.Add("", "", "", true)
	f.Add(LocalAddressSpace, "fd00::/64", "fd00::/120", true)
	f.Add(LocalAddressSpace, "10.1.0.0/33", "", false)
	f.Add(LocalAddressSpace, " 10.1.0.7/24 ", "10.1.0.0/32", false)
	f.Add(LocalAddressSpace, "::ffff:10.0.0.0/104", "", true)
	f.Add("x", "10.1.0.0/24", "10.2.0.0/24", false)
	f.Fuzz(func(t *testing.T, space, pool, sub string, v6 bool) {
		s := newMemStore()
		other, _ := New(Config{Node: "b", Logger: testLogger()}, s)
		mustPool(t, other, "10.9.0.0/24", "", false)
		a, _ := New(Config{Node: "a", Logger: testLogger()}, s)
		c := &cluster{t: t, inspect: s}
		before := c.snapshot()
		beforeValues := values(t, s)
		r, err := a.RequestPool(&ipam.RequestPoolRequest{AddressSpace: space, Pool: pool, SubPool: sub, V6: v6})
		if err != nil {
			if !isOurError(err) {
				t.Fatalf("error %v is none of the sentinels", err)
			}
			c.unchanged(before, "failed RequestPool")
			return
		}
		ref, perr := parsePoolID(r.PoolID)
		if perr != nil {
			t.Fatalf("returned pool ID %q does not parse: %v", r.PoolID, perr)
		}
		if ref.subnet.String() != r.Pool || ref.subnet != ref.subnet.Masked() {
			t.Fatalf("pool %q, ID %q", r.Pool, r.PoolID)
		}
		if ref.v6() != v6 {
			t.Fatalf("asked v6=%v, got %s", v6, r.Pool)
		}
		lo, hi := prefixLimits(v6)
		if b := ref.subnet.Bits(); b < lo || b > hi {
			t.Fatalf("pool %s outside the size limits", r.Pool)
		}
		if ref.subPool.IsValid() && (!ref.subnet.Contains(ref.subPool.Addr()) || ref.subPool.Bits() <= ref.subnet.Bits()) {
			t.Fatalf("sub-range %s not inside %s", ref.subPool, ref.subnet)
		}
		if strings.TrimSpace(pool) == "" && (ref.subnet.Bits() != map[bool]int{false: DefaultPoolV4Size, true: DefaultPoolV6Size}[v6]) {
			t.Fatalf("automatic pool %s has the wrong size", r.Pool)
		}
		want := ref.subnet == netip.MustParsePrefix("10.9.0.0/24") && ref.space == LocalAddressSpace
		info, err := a.PoolInfo(context.Background(), r.PoolID)
		if err != nil || info.Holders["a"] != 1 || (want != (info.Holders["b"] == 1)) {
			t.Fatalf("pool info %+v, %v", info, err)
		}
		checkIndex(t, s)
		mustReleasePool(t, a, r.PoolID)
		if after := values(t, s); !maps.Equal(after, beforeValues) {
			t.Fatalf("release did not restore the store:\nbefore %v\nafter  %v", beforeValues, after)
		}
	})
}

func FuzzRequestAddress(f *testing.F) {
	f.Add("", false, "", "", false)
	f.Add("", true, "", "", false)
	f.Add("10.40.0.1", true, "", "", false)
	f.Add("10.40.0.3", false, "", "", false)
	f.Add("10.40.0.9", false, "web", "", false)
	f.Add("10.40.0.9", false, "", "02:42:0a:28:00:09", false)
	f.Add("10.40.0.15", false, "", "", false)
	f.Add("10.40.0.4/24", false, "x", "", false)
	f.Add("fd00:40::5", false, "", "", true)
	f.Add("fd00:40::", true, "", "", true)
	f.Add("fe80::1%eth0", false, "", "zz", true)
	f.Fuzz(func(t *testing.T, addr string, gateway bool, endpoint, mac string, v6 bool) {
		s := newMemStore()
		b, _ := New(Config{Node: "b", Logger: testLogger()}, s)
		a, _ := New(Config{Node: "a", Logger: testLogger()}, s)
		p4 := mustPool(t, b, "10.40.0.0/28", "10.40.0.8/29", false).PoolID
		p6 := mustPool(t, b, "fd00:40::/124", "", true).PoolID
		for _, d := range []*Driver{a} {
			mustPool(t, d, "10.40.0.0/28", "10.40.0.8/29", false)
			mustPool(t, d, "fd00:40::/124", "", true)
		}
		mustAddr(t, b, p4, "", gw)
		mustAddr(t, b, p6, "", gw)
		mustAddr(t, b, p4, "10.40.0.9", ep("web"))
		mustAddr(t, b, p4, "10.40.0.3", nil)
		p := p4
		if v6 {
			p = p6
		}
		ref, _ := parsePoolID(p)
		opts := map[string]string{}
		if gateway {
			opts[RequestAddressTypeOption] = GatewayAddressType
		}
		if endpoint != "" {
			opts[EndpointNameOption] = endpoint
		}
		if mac != "" {
			opts[MACAddressOption] = mac
		}
		c := &cluster{t: t, inspect: s}
		before := c.snapshot()
		beforeValues := values(t, s, "/next")
		r, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Address: addr, Options: opts})
		if err != nil {
			if !isOurError(err) {
				t.Fatalf("error %v is none of the sentinels", err)
			}
			c.unchanged(before, "failed RequestAddress")
			return
		}
		got, perr := netip.ParsePrefix(r.Address)
		if perr != nil || got.Bits() != ref.subnet.Bits() || !usable(ref.subnet, got.Addr()) {
			t.Fatalf("address %q from %s", r.Address, p)
		}
		if strings.TrimSpace(addr) != "" {
			want, _ := parseAddr(addr)
			if got.Addr() != want {
				t.Fatalf("asked for %s, got %s", addr, got)
			}
		}
		if !gateway && strings.TrimSpace(addr) == "" {
			sp, _ := allocSpan(ref.subnet, ref.subPool)
			if !sp.contains(got.Addr()) {
				t.Fatalf("dynamic address %s outside %s", got, spanName(ref))
			}
		}
		rec := c.addrRecord(p, got.Addr().String())
		if rec.Holders["a"] == 0 && rec.Node != "a" {
			t.Fatalf("record of %s does not name host a: %+v", got, rec)
		}
		mustRelease(t, a, p, got.Addr().String())
		if after := values(t, s, "/next"); !maps.Equal(after, beforeValues) {
			t.Fatalf("release did not restore the store:\nbefore %v\nafter  %v", beforeValues, after)
		}
	})
}

func FuzzParsePoolID(f *testing.F) {
	f.Add(LocalAddressSpace + "/10.0.0.0/24")
	f.Add(GlobalAddressSpace + "/fd00::/64/fd00::/80")
	f.Add("a/b/c/d/e")
	f.Fuzz(func(t *testing.T, id string) {
		ref, err := parsePoolID(id)
		if err != nil {
			if !errors.Is(err, ErrInvalidRequest) {
				t.Fatalf("error %v is not ErrInvalidRequest", err)
			}
			return
		}
		if ref.id() != id {
			t.Fatalf("round trip %q -> %q", id, ref.id())
		}
	})
}
