package ipam

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"consul-overlay/kvstore"

	"github.com/docker/go-plugins-helpers/ipam"
)

func TestNewConfig(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"defaults", Config{Node: "a"}, true},
		{"no node", Config{}, false},
		{"v4 range wrong family", Config{Node: "a", DefaultPoolV4: netip.MustParsePrefix("fd00::/48")}, false},
		{"v6 range wrong family", Config{Node: "a", DefaultPoolV6: netip.MustParsePrefix("10.0.0.0/8")}, false},
		{"size larger than range", Config{Node: "a", DefaultPoolV4: netip.MustParsePrefix("10.0.0.0/24"), DefaultPoolV4Size: 16}, false},
		{"size too small", Config{Node: "a", DefaultPoolV4Size: 31}, false},
		{"v6 size too large", Config{Node: "a", DefaultPoolV6Size: 16}, false},
		{"negative timeout", Config{Node: "a", Timeout: -1}, false},
		{"negative grace", Config{Node: "a", Grace: -time.Second}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.cfg, newMemStore())
			if (err == nil) != tt.ok {
				t.Fatalf("New: err=%v, want ok=%v", err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalidRequest) {
				t.Errorf("error %v is not ErrInvalidRequest", err)
			}
		})
	}
	if _, err := New(Config{Node: "a"}, nil); err == nil {
		t.Error("New with a nil store succeeded")
	}
	if d, _ := New(Config{Node: "a"}, newMemStore()); d.Grace() != DefaultGrace {
		t.Errorf("default grace %s, want %s", d.Grace(), DefaultGrace)
	}
}

func TestSpacesAndCapabilities(t *testing.T) {
	d, err := New(Config{Node: "a"}, newMemStore())
	if err != nil {
		t.Fatal(err)
	}
	r, err := d.GetDefaultAddressSpaces()
	if err != nil {
		t.Fatal(err)
	}
	if r.LocalDefaultAddressSpace != LocalAddressSpace || r.GlobalDefaultAddressSpace != GlobalAddressSpace || LocalAddressSpace == GlobalAddressSpace {
		t.Errorf("address spaces %+v", r)
	}
	l, g := d.AddressSpaces()
	if l != LocalAddressSpace || g != GlobalAddressSpace {
		t.Errorf("AddressSpaces() = %q, %q", l, g)
	}
	for s, want := range map[string]bool{LocalAddressSpace: true, GlobalAddressSpace: true, "LocalDefault": false, "": false} {
		if d.Owns(s) != want {
			t.Errorf("Owns(%q) = %v", s, !want)
		}
	}
	c, _ := d.GetCapabilities()
	if !c.RequiresMACAddress {
		t.Error("RequiresMACAddress is false by default")
	}
	d2, _ := New(Config{Node: "a", NoMACAddress: true}, newMemStore())
	if c, _ := d2.GetCapabilities(); c.RequiresMACAddress {
		t.Error("RequiresMACAddress with NoMACAddress set")
	}
}

func scenarioRequestPoolBadInput(t *testing.T, c *cluster) {
	a := c.host("a")
	held := mustPool(t, a, "10.9.0.0/24", "", false) // something to leave unchanged
	tests := []struct {
		name string
		req  ipam.RequestPoolRequest
		want error
	}{
		{"malformed cidr", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.1.0.0/33"}, ErrInvalidRequest},
		{"not a cidr", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "banana"}, ErrInvalidRequest},
		{"plain ip", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.1.0.0"}, ErrInvalidRequest},
		{"too large v4", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.0.0.0/7"}, ErrInvalidRequest},
		{"too small v4", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.1.0.0/31"}, ErrInvalidRequest},
		{"too large v6", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "fd00::/16", V6: true}, ErrInvalidRequest},
		{"v6 subnet without V6", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "fd00:1::/64"}, ErrInvalidRequest},
		{"v4 subnet with V6", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.1.0.0/24", V6: true}, ErrInvalidRequest},
		{"v4-mapped", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "::ffff:10.1.0.0/120", V6: true}, ErrInvalidRequest},
		{"subpool without pool", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, SubPool: "10.1.0.0/25"}, ErrInvalidRequest},
		{"subpool outside pool", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.1.0.0/24", SubPool: "10.1.1.0/25"}, ErrInvalidRequest},
		{"subpool larger than pool", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.1.0.0/24", SubPool: "10.1.0.0/23"}, ErrInvalidRequest},
		{"subpool other family", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.1.0.0/24", SubPool: "fd00::/120"}, ErrInvalidRequest},
		{"subpool malformed", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.1.0.0/24", SubPool: "10.1.0.0/"}, ErrInvalidRequest},
		{"subpool only network address", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.1.0.0/24", SubPool: "10.1.0.0/32"}, ErrInvalidRequest},
		{"unknown address space", ipam.RequestPoolRequest{AddressSpace: "LocalDefault", Pool: "10.1.0.0/24"}, ErrInvalidRequest},
		{"overlaps held pool", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.9.0.0/16"}, ErrPoolOverlap},
		{"inside held pool", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.9.0.128/25"}, ErrPoolOverlap},
		{"same subnet other ip-range", ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.9.0.0/24", SubPool: "10.9.0.0/25"}, ErrPoolOverlap},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := c.snapshot()
			_, err := a.RequestPool(&tt.req)
			if !errors.Is(err, tt.want) {
				t.Fatalf("RequestPool(%+v) = %v, want %v", tt.req, err, tt.want)
			}
			if msg := err.Error(); msg != strings.ToLower(msg[:1])+msg[1:] {
				t.Errorf("message not lower-case: %q", msg)
			}
			if tt.want == ErrPoolOverlap && !strings.Contains(err.Error(), held.PoolID) {
				t.Errorf("overlap error %q does not name pool %s", err, held.PoolID)
			}
			c.unchanged(before, "failed RequestPool")
		})
	}
	if _, err := a.RequestPool(nil); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("RequestPool(nil) = %v", err)
	}
	mustReleasePool(t, a, held.PoolID)
	c.empty()
}

func scenarioExplicitPoolSharedByHosts(t *testing.T, c *cluster) {
	a, b := c.host("a"), c.host("b")
	ra := mustPool(t, a, "10.1.0.0/24", "", false)
	rb := mustPool(t, b, "10.1.0.0/24", "", false)
	if ra.PoolID != rb.PoolID || ra.Pool != "10.1.0.0/24" || rb.Pool != ra.Pool {
		t.Fatalf("hosts got %+v and %+v", ra, rb)
	}
	if ra.PoolID != LocalAddressSpace+"/10.1.0.0/24" {
		t.Errorf("pool ID %q", ra.PoolID)
	}
	ga := mustAddr(t, a, ra.PoolID, "", gw)
	gb := mustAddr(t, b, rb.PoolID, "", gw)
	if ga != "10.1.0.1/24" || gb != ga {
		t.Fatalf("gateways %s, %s; want 10.1.0.1/24 on both", ga, gb)
	}
	if r := c.addrRecord(ra.PoolID, "10.1.0.1"); r.Kind != kindGateway || r.Holders["a"] != 1 || r.Holders["b"] != 1 {
		t.Errorf("gateway record %+v", r)
	}
	p, err := a.PoolInfo(t.Context(), ra.PoolID)
	if err != nil || p.Holders["a"] != 1 || p.Holders["b"] != 1 || p.Gateway != netip.MustParseAddr("10.1.0.1") || p.Auto {
		t.Fatalf("PoolInfo = %+v, %v", p, err)
	}
	// Host a leaves: the pool and gateway stay for b.
	mustRelease(t, a, ra.PoolID, "10.1.0.1")
	mustReleasePool(t, a, ra.PoolID)
	if p, err := b.PoolInfo(t.Context(), ra.PoolID); err != nil || len(p.Holders) != 1 || p.Holders["b"] != 1 || p.Gateway != netip.MustParseAddr("10.1.0.1") {
		t.Fatalf("after a left: PoolInfo = %+v, %v", p, err)
	}
	if got := mustAddr(t, b, rb.PoolID, "", nil); got != "10.1.0.2/24" {
		t.Errorf("b's first address %s, want 10.1.0.2/24", got)
	}
	// A third host joining gets the same gateway.
	cc := c.host("c")
	mustPool(t, cc, "10.1.0.0/24", "", false)
	if g := mustAddr(t, cc, ra.PoolID, "", gw); g != "10.1.0.1/24" {
		t.Errorf("c's gateway %s", g)
	}
	mustRelease(t, cc, ra.PoolID, "10.1.0.1")
	mustReleasePool(t, cc, ra.PoolID)
	// The last host leaves: everything goes.
	mustRelease(t, b, rb.PoolID, "10.1.0.2")
	mustRelease(t, b, rb.PoolID, "10.1.0.1")
	mustReleasePool(t, b, rb.PoolID)
	c.empty()
	if _, err := b.PoolInfo(t.Context(), rb.PoolID); !errors.Is(err, ErrUnknownPool) {
		t.Errorf("PoolInfo after release = %v", err)
	}
}

func scenarioSameHostTwoNetworks(t *testing.T, c *cluster) {
	a := c.host("a")
	r1 := mustPool(t, a, "10.2.0.0/24", "", false)
	r2 := mustPool(t, a, "10.2.0.0/24", "", false)
	if r1.PoolID != r2.PoolID {
		t.Fatalf("IDs %s, %s", r1.PoolID, r2.PoolID)
	}
	mustAddr(t, a, r1.PoolID, "", gw)
	mustAddr(t, a, r2.PoolID, "", gw)
	mustRelease(t, a, r1.PoolID, "10.2.0.1")
	mustReleasePool(t, a, r1.PoolID)
	if p, err := a.PoolInfo(t.Context(), r1.PoolID); err != nil || p.Holders["a"] != 1 {
		t.Fatalf("after one release: %+v, %v", p, err)
	}
	if r := c.addrRecord(r1.PoolID, "10.2.0.1"); r.Holders["a"] != 1 {
		t.Errorf("gateway holders %+v", r.Holders)
	}
	mustRelease(t, a, r2.PoolID, "10.2.0.1")
	mustReleasePool(t, a, r2.PoolID)
	c.empty()
}

func scenarioAutoPools(t *testing.T, c *cluster) {
	a, b := c.host("a"), c.host("b")
	auto := func(d *Driver, v6 bool) *ipam.RequestPoolResponse {
		t.Helper()
		r, err := d.RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, V6: v6})
		if err != nil {
			t.Fatalf("auto pool: %v", err)
		}
		return r
	}
	p1 := auto(a, false)
	p2 := auto(a, false) // Docker asks again while holding p1
	p3 := auto(b, false)
	got := []string{p1.Pool, p2.Pool, p3.Pool}
	want := []string{"10.200.0.0/24", "10.200.1.0/24", "10.200.2.0/24"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("auto pools %v, want %v", got, want)
	}
	// An explicit pool in the default range is skipped over.
	ex := mustPool(t, b, "10.200.16.0/20", "", false)
	mustReleasePool(t, a, p2.PoolID) // Docker releases the ones it rejected
	if p := auto(a, false); p.Pool != "10.200.1.0/24" {
		t.Errorf("after release got %s, want the freed 10.200.1.0/24", p.Pool)
	} else {
		mustReleasePool(t, a, p.PoolID)
	}
	var more []string
	for range 14 { // 10.200.1.0, 10.200.3.0 .. 10.200.15.0
		more = append(more, auto(a, false).PoolID)
	}
	if p := auto(a, false); p.Pool != "10.200.32.0/24" {
		t.Errorf("next auto pool %s, want 10.200.32.0/24 (past 10.200.16.0/20)", p.Pool)
	} else {
		more = append(more, p.PoolID)
	}
	v6a := auto(a, true)
	v6b := auto(b, true)
	if v6a.Pool != "fd69:6f76:6572::/64" || v6b.Pool != "fd69:6f76:6572:1::/64" {
		t.Errorf("v6 auto pools %s, %s", v6a.Pool, v6b.Pool)
	}
	for _, id := range append(more, p1.PoolID, p3.PoolID, ex.PoolID, v6a.PoolID, v6b.PoolID) {
		mustReleasePool(t, a, id)
		mustReleasePool(t, b, id)
	}
	c.empty()
}

func scenarioAutoPoolExhausted(t *testing.T, c *cluster) {
	a := c.host("a", func(cfg *Config) { cfg.DefaultPoolV4 = netip.MustParsePrefix("10.250.0.0/23") })
	var ids []string
	for range 2 {
		r, err := a.RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.PoolID)
	}
	before := c.snapshot()
	_, err := a.RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace})
	if !errors.Is(err, ErrPoolExhausted) || !strings.Contains(err.Error(), "10.250.0.0/23") {
		t.Fatalf("third auto pool: %v, want ErrPoolExhausted naming the range", err)
	}
	c.unchanged(before, "exhausted auto pool request")
	for _, id := range ids {
		mustReleasePool(t, a, id)
	}
	c.empty()
}

func scenarioRequestAddress(t *testing.T, c *cluster) {
	a, b := c.host("a"), c.host("b")
	p := mustPool(t, a, "10.3.0.0/24", "", false).PoolID
	mustPool(t, b, "10.3.0.0/24", "", false)
	if g := mustAddr(t, a, p, "", gw); g != "10.3.0.1/24" {
		t.Fatalf("gateway %s", g)
	}
	if got := mustAddr(t, a, p, "", ep("web")); got != "10.3.0.2/24" {
		t.Fatalf("first address %s", got)
	}
	if r := c.addrRecord(p, "10.3.0.2"); r.Kind != kindEndpoint || r.Node != "a" || r.Endpoint != "web" {
		t.Errorf("record %+v", r)
	}
	if got := mustAddr(t, b, p, "10.3.0.10", map[string]string{MACAddressOption: "02:42:0A:03:00:0A"}); got != "10.3.0.10/24" {
		t.Fatalf("explicit address %s", got)
	}
	if r := c.addrRecord(p, "10.3.0.10"); r.Kind != kindEndpoint || r.Node != "b" || r.MAC != "02:42:0a:03:00:0a" {
		t.Errorf("record %+v", r)
	}
	// The same endpoint asking again (a retry) gets it; the record stays
	// its own (its time is the retry's).
	if got := mustAddr(t, b, p, "10.3.0.10", map[string]string{MACAddressOption: "02:42:0a:03:00:0a"}); got != "10.3.0.10/24" {
		t.Fatalf("repeat %s", got)
	}
	if r := c.addrRecord(p, "10.3.0.10"); r.Kind != kindEndpoint || r.Node != "b" || r.MAC != "02:42:0a:03:00:0a" || r.tombstone() {
		t.Errorf("record after the repeat %+v", r)
	}

	bad := []struct {
		name string
		d    *Driver
		req  ipam.RequestAddressRequest
		want error
	}{
		{"in use by another endpoint", a, ipam.RequestAddressRequest{PoolID: p, Address: "10.3.0.10", Options: ep("db")}, ErrAddressInUse},
		{"in use, same name other host", b, ipam.RequestAddressRequest{PoolID: p, Address: "10.3.0.2", Options: map[string]string{EndpointNameOption: "web", MACAddressOption: "02:00:00:00:00:01"}}, ErrAddressInUse},
		{"gateway as endpoint address", b, ipam.RequestAddressRequest{PoolID: p, Address: "10.3.0.1", Options: ep("x")}, ErrAddressInUse},
		{"endpoint address as aux", b, ipam.RequestAddressRequest{PoolID: p, Address: "10.3.0.2"}, ErrAddressInUse},
		{"endpoint address as gateway", b, ipam.RequestAddressRequest{PoolID: p, Address: "10.3.0.10", Options: gw}, ErrInvalidRequest},
		{"network address", a, ipam.RequestAddressRequest{PoolID: p, Address: "10.3.0.0"}, ErrAddressOutOfRange},
		{"broadcast address", a, ipam.RequestAddressRequest{PoolID: p, Address: "10.3.0.255"}, ErrAddressOutOfRange},
		{"outside pool", a, ipam.RequestAddressRequest{PoolID: p, Address: "10.4.0.5"}, ErrAddressOutOfRange},
		{"other family", a, ipam.RequestAddressRequest{PoolID: p, Address: "fd00::5"}, ErrAddressOutOfRange},
		{"malformed address", a, ipam.RequestAddressRequest{PoolID: p, Address: "10.3.0.300"}, ErrInvalidRequest},
		{"malformed mac", a, ipam.RequestAddressRequest{PoolID: p, Options: map[string]string{MACAddressOption: "zz"}}, ErrInvalidRequest},
		{"unknown pool", a, ipam.RequestAddressRequest{PoolID: LocalAddressSpace + "/10.77.0.0/24"}, ErrUnknownPool},
		{"pool ID with other ip-range", a, ipam.RequestAddressRequest{PoolID: p + "/10.3.0.0/25"}, ErrUnknownPool},
		{"malformed pool ID", a, ipam.RequestAddressRequest{PoolID: "10.3.0.0/24"}, ErrInvalidRequest},
		{"pool ID not canonical", a, ipam.RequestAddressRequest{PoolID: LocalAddressSpace + "/10.3.0.1/24"}, ErrInvalidRequest},
		{"pool ID other space", a, ipam.RequestAddressRequest{PoolID: "LocalDefault/10.3.0.0/24"}, ErrInvalidRequest},
		{"empty pool ID", a, ipam.RequestAddressRequest{}, ErrInvalidRequest},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			want := tt.want
			before := c.snapshot()
			_, err := tt.d.RequestAddress(&tt.req)
			if !errors.Is(err, want) {
				t.Fatalf("RequestAddress(%+v) = %v, want %v", tt.req, err, want)
			}
			c.unchanged(before, "failed RequestAddress")
		})
	}
	if _, err := a.RequestAddress(nil); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("RequestAddress(nil) = %v", err)
	}
	// Round robin: a released address is not handed out again at once.
	got := mustAddr(t, a, p, "", nil)
	if got != "10.3.0.3/24" {
		t.Fatalf("next %s, want 10.3.0.3/24", got)
	}
	mustRelease(t, a, p, "10.3.0.3")
	if got := mustAddr(t, b, p, "", nil); got != "10.3.0.4/24" {
		t.Fatalf("after release of .3 got %s, want 10.3.0.4/24", got)
	}
	for _, x := range []struct {
		d *Driver
		a string
	}{{a, "10.3.0.1"}, {b, "10.3.0.1"}, {a, "10.3.0.2"}, {b, "10.3.0.10"}, {b, "10.3.0.4"}} {
		mustRelease(t, x.d, p, x.a)
	}
	mustReleasePool(t, a, p)
	mustReleasePool(t, b, p)
	c.empty()
}

func scenarioRoundRobinWraps(t *testing.T, c *cluster) {
	a := c.host("a")
	p := mustPool(t, a, "10.5.0.0/29", "", false).PoolID // usable .1-.6
	mustAddr(t, a, p, "", gw)
	var got []string
	for range 5 {
		got = append(got, hostOf(mustAddr(t, a, p, "", nil)))
	}
	if strings.Join(got, " ") != "10.5.0.2 10.5.0.3 10.5.0.4 10.5.0.5 10.5.0.6" {
		t.Fatalf("allocation order %v", got)
	}
	before := c.snapshot()
	_, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p})
	if !errors.Is(err, ErrPoolExhausted) || !strings.Contains(err.Error(), p) {
		t.Fatalf("full pool: %v, want ErrPoolExhausted naming %s", err, p)
	}
	c.unchanged(before, "request from an exhausted pool")
	mustRelease(t, a, p, "10.5.0.4")
	mustRelease(t, a, p, "10.5.0.3")
	// The cursor is at .6: the next address wraps to the first free one
	// after it, .3, not the most recently freed .3/.4 by recency.
	if g := hostOf(mustAddr(t, a, p, "", nil)); g != "10.5.0.3" {
		t.Errorf("after wrap got %s, want 10.5.0.3", g)
	}
	if g := hostOf(mustAddr(t, a, p, "", nil)); g != "10.5.0.4" {
		t.Errorf("then %s, want 10.5.0.4", g)
	}
	for _, x := range []string{"10.5.0.1", "10.5.0.2", "10.5.0.3", "10.5.0.4", "10.5.0.5", "10.5.0.6"} {
		mustRelease(t, a, p, x)
	}
	mustReleasePool(t, a, p)
	c.empty()
}

func scenarioSubPoolAndAux(t *testing.T, c *cluster) {
	a, b := c.host("a"), c.host("b")
	r := mustPool(t, a, "10.6.0.0/24", "10.6.0.128/25", false)
	if r.PoolID != LocalAddressSpace+"/10.6.0.0/24/10.6.0.128/25" || r.Pool != "10.6.0.0/24" {
		t.Fatalf("pool %+v", r)
	}
	if rb := mustPool(t, b, "10.6.0.0/24", "10.6.0.128/25", false); rb.PoolID != r.PoolID {
		t.Fatalf("b got %s", rb.PoolID)
	}
	if g := mustAddr(t, a, r.PoolID, "", gw); g != "10.6.0.1/24" {
		t.Errorf("gateway %s, want the subnet's first address", g)
	}
	if g := mustAddr(t, a, r.PoolID, "", nil); g != "10.6.0.128/24" {
		t.Errorf("first dynamic %s, want 10.6.0.128/24 (start of the ip-range)", g)
	}
	// Aux addresses: anywhere in the subnet, shared by the hosts.
	for _, d := range []*Driver{a, b} {
		if g := mustAddr(t, d, r.PoolID, "10.6.0.5", nil); g != "10.6.0.5/24" {
			t.Fatalf("aux %s", g)
		}
	}
	if rec := c.addrRecord(r.PoolID, "10.6.0.5"); rec.Kind != kindReserved || rec.Holders["a"] != 1 || rec.Holders["b"] != 1 {
		t.Errorf("aux record %+v", rec)
	}
	// An endpoint can't take an aux address.
	if _, err := b.RequestAddress(&ipam.RequestAddressRequest{PoolID: r.PoolID, Address: "10.6.0.5", Options: ep("x")}); !errors.Is(err, ErrAddressInUse) {
		t.Errorf("endpoint on aux address: %v", err)
	}
	mustRelease(t, a, r.PoolID, "10.6.0.5")
	if rec := c.addrRecord(r.PoolID, "10.6.0.5"); rec.Holders["a"] != 0 || rec.Holders["b"] != 1 {
		t.Errorf("aux record after a's release %+v", rec)
	}
	mustRelease(t, b, r.PoolID, "10.6.0.5")
	mustRelease(t, a, r.PoolID, "10.6.0.128")
	mustRelease(t, a, r.PoolID, "10.6.0.1")
	mustReleasePool(t, a, r.PoolID)
	mustReleasePool(t, b, r.PoolID)
	c.empty()
}

func scenarioGatewayRules(t *testing.T, c *cluster) {
	a, b := c.host("a"), c.host("b")
	p := mustPool(t, a, "10.7.0.0/24", "", false).PoolID
	mustPool(t, b, "10.7.0.0/24", "", false)
	if g := mustAddr(t, a, p, "10.7.0.254", gw); g != "10.7.0.254/24" {
		t.Fatalf("explicit gateway %s", g)
	}
	if g := mustAddr(t, b, p, "", gw); g != "10.7.0.254/24" {
		t.Fatalf("b's gateway %s, want a's 10.7.0.254/24", g)
	}
	before := c.snapshot()
	if _, err := b.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Address: "10.7.0.1", Options: gw}); !errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), "10.7.0.254") {
		t.Errorf("conflicting gateway: %v", err)
	}
	c.unchanged(before, "conflicting gateway request")
	// The first dynamic address is the first usable one; the gateway at
	// .254 is skipped when the cursor gets there.
	if g := mustAddr(t, a, p, "", nil); g != "10.7.0.1/24" {
		t.Errorf("first dynamic %s", g)
	}
	mustRelease(t, a, p, "10.7.0.254")
	mustRelease(t, b, p, "10.7.0.254")
	if info, _ := a.PoolInfo(t.Context(), p); info.Gateway.IsValid() {
		t.Errorf("gateway %s still recorded after the last release", info.Gateway)
	}
	// With no gateway recorded and .1 taken, the lowest free address is
	// the gateway.
	if g := mustAddr(t, b, p, "", gw); g != "10.7.0.2/24" {
		t.Errorf("gateway with .1 taken: %s", g)
	}
	mustRelease(t, b, p, "10.7.0.2")
	mustRelease(t, a, p, "10.7.0.1")
	mustReleasePool(t, a, p)
	mustReleasePool(t, b, p)
	c.empty()
}

func scenarioIPv6(t *testing.T, c *cluster) {
	a, b := c.host("a"), c.host("b")
	r := mustPool(t, a, "fd00:1::/64", "", true)
	if r.PoolID != LocalAddressSpace+"/fd00:1::/64" || r.Pool != "fd00:1::/64" {
		t.Fatalf("pool %+v", r)
	}
	mustPool(t, b, "fd00:1::/64", "", true)
	if g := mustAddr(t, b, r.PoolID, "", gw); g != "fd00:1::1/64" {
		t.Errorf("gateway %s", g)
	}
	if g := mustAddr(t, a, r.PoolID, "", gw); g != "fd00:1::1/64" {
		t.Errorf("gateway on a %s", g)
	}
	if g := mustAddr(t, a, r.PoolID, "", nil); g != "fd00:1::2/64" {
		t.Errorf("first %s", g)
	}
	if g := mustAddr(t, b, r.PoolID, "fd00:1::ffff:ffff:ffff:ffff", ep("x")); g != "fd00:1::ffff:ffff:ffff:ffff/64" {
		t.Errorf("last address of a v6 pool: %s", g)
	}
	before := c.snapshot()
	for _, bad := range []string{"fd00:1::", "fd00:2::1", "10.0.0.1", "fe80::1%eth0"} {
		if _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: r.PoolID, Address: bad}); !errors.Is(err, ErrAddressOutOfRange) && !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("address %s: %v", bad, err)
		}
	}
	if _, err := a.RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "fd00:1::/48", V6: true}); !errors.Is(err, ErrPoolOverlap) || !strings.Contains(err.Error(), r.PoolID) {
		t.Errorf("overlapping v6 pool: %v", err)
	}
	// The v4 and v6 indexes are separate; a v4 pool does not collide.
	c.unchanged(before, "failed v6 requests")
	mustRelease(t, a, r.PoolID, "fd00:1::1")
	mustRelease(t, b, r.PoolID, "fd00:1::1")
	mustRelease(t, a, r.PoolID, "fd00:1::2")
	mustRelease(t, b, r.PoolID, "fd00:1::ffff:ffff:ffff:ffff")
	mustReleasePool(t, a, r.PoolID)
	mustReleasePool(t, b, r.PoolID)
	c.empty()
}

func scenarioReleaseIdempotent(t *testing.T, c *cluster) {
	a, b := c.host("a"), c.host("b")
	p := mustPool(t, a, "10.8.0.0/24", "", false).PoolID
	x := hostOf(mustAddr(t, a, p, "", nil))
	mustRelease(t, a, p, x)
	before := c.snapshot()
	mustRelease(t, a, p, x) // double release
	mustRelease(t, a, p, "10.8.0.99")
	mustRelease(t, a, LocalAddressSpace+"/10.99.0.0/24", "10.99.0.5") // unknown pool
	mustReleasePool(t, b, p)                                          // b never held it
	mustReleasePool(t, a, LocalAddressSpace+"/10.99.0.0/24")
	c.unchanged(before, "idempotent releases")
	// b's address is not released by a.
	y := hostOf(mustAddr(t, b, p, "", nil))
	before = c.snapshot()
	mustRelease(t, a, p, y)
	c.unchanged(before, "release of another host's address")
	bad := []struct {
		name string
		f    func() error
		want error
	}{
		{"address outside pool", func() error { return a.ReleaseAddress(&ipam.ReleaseAddressRequest{PoolID: p, Address: "10.9.0.1"}) }, ErrAddressOutOfRange},
		{"malformed address", func() error { return a.ReleaseAddress(&ipam.ReleaseAddressRequest{PoolID: p, Address: "nope"}) }, ErrInvalidRequest},
		{"malformed pool ID", func() error { return a.ReleaseAddress(&ipam.ReleaseAddressRequest{PoolID: "x/y", Address: "10.8.0.1"}) }, ErrInvalidRequest},
		{"malformed pool ID (pool)", func() error { return a.ReleasePool(&ipam.ReleasePoolRequest{PoolID: "garbage"}) }, ErrInvalidRequest},
		{"nil pool release", func() error { return a.ReleasePool(nil) }, ErrInvalidRequest},
		{"nil address release", func() error { return a.ReleaseAddress(nil) }, ErrInvalidRequest},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			before := c.snapshot()
			if err := tt.f(); !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			c.unchanged(before, tt.name)
		})
	}
	mustRelease(t, b, p, y)
	mustReleasePool(t, a, p)
	before = c.snapshot()
	mustReleasePool(t, a, p) // double release of the pool
	c.unchanged(before, "double pool release")
	c.empty()
}

func scenarioPoolIDSurvivesRestart(t *testing.T, c *cluster) {
	a := c.host("a")
	p := mustPool(t, a, "10.10.0.0/24", "", false).PoolID
	mustAddr(t, a, p, "", gw)
	x := mustAddr(t, a, p, "", nil)
	// The plugin restarts: a new Driver, a new store client.
	a2 := c.host("a")
	if got := mustAddr(t, a2, p, "", nil); got == x {
		t.Errorf("restarted driver handed out %s again", got)
	}
	mustRelease(t, a2, p, hostOf(x))
	mustRelease(t, a2, p, "10.10.0.3")
	mustRelease(t, a2, p, "10.10.0.1")
	mustReleasePool(t, a2, p)
	c.empty()
}

// TestStoreOutage checks that an unreachable store is reported as a store
// error, never as a pool condition, and that nothing changes.
func TestStoreOutage(t *testing.T) {
	s := newMemStore()
	a, err := New(Config{Node: "a", Logger: testLogger()}, s)
	if err != nil {
		t.Fatal(err)
	}
	p := mustPool(t, a, "10.11.0.0/24", "", false).PoolID
	mustAddr(t, a, p, "", gw)
	c := &cluster{t: t, inspect: s}
	before := c.snapshot()
	s.setDown(true)
	calls := map[string]func() error{
		"request pool":      func() error { _, err := a.RequestPool(&ipam.RequestPoolRequest{Pool: "10.12.0.0/24"}); return err },
		"request auto pool": func() error { _, err := a.RequestPool(&ipam.RequestPoolRequest{}); return err },
		"request address":   func() error { _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p}); return err },
		"request gateway": func() error {
			_, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Options: gw})
			return err
		},
		"request static": func() error {
			_, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Address: "10.11.0.9"})
			return err
		},
		"release address": func() error { return a.ReleaseAddress(&ipam.ReleaseAddressRequest{PoolID: p, Address: "10.11.0.1"}) },
		"release pool":    func() error { return a.ReleasePool(&ipam.ReleasePoolRequest{PoolID: p}) },
		"pool info":       func() error { _, err := a.PoolInfo(t.Context(), p); return err },
		"reclaim address": func() error {
			return a.ReclaimAddress(t.Context(), p, netip.MustParseAddr("10.11.0.2"), Holder{MAC: "02:00:00:00:00:01"})
		},
		"sweep": func() error {
			_, err := a.Sweep(t.Context(), func(string, netip.Addr) bool { return false })
			return err
		},
		"sweep pools": func() error {
			_, err := a.SweepPools(t.Context(), func(string) (int, bool) { return 0, true })
			return err
		},
	}
	for name, f := range calls {
		err := f()
		if !errors.Is(err, kvstore.ErrUnavailable) || errors.Is(err, ErrPoolExhausted) || errors.Is(err, ErrUnknownPool) {
			t.Errorf("%s during outage: %v, want a store error", name, err)
		}
	}
	s.setDown(false)
	c.unchanged(before, "calls during the outage")
	// A store that fails part-way through an allocation (after reading the
	// pool) changes nothing either.
	s.fail = func(op, key string) error {
		if op == "txn" {
			return kvstore.ErrUnavailable
		}
		return nil
	}
	if _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p}); !errors.Is(err, kvstore.ErrUnavailable) {
		t.Errorf("failing txn: %v", err)
	}
	s.fail = nil
	c.unchanged(before, "failed transaction")
}

// TestNoFullReadPerRequest checks the layout's promise: a dynamic
// allocation in a pool with free addresses ahead of the cursor does not
// list the pool's address records.
func TestNoFullReadPerRequest(t *testing.T) {
	s := newMemStore()
	a, _ := New(Config{Node: "a", Logger: testLogger()}, s)
	p := mustPool(t, a, "10.13.0.0/16", "", false).PoolID
	for range 2000 {
		mustAddr(t, a, p, "", nil)
	}
	ref, _ := parsePoolID(p)
	if n := s.listCount(addrDir(ref.space, ref.subnet)); n != 0 {
		t.Errorf("%d listings of the address records for 2000 allocations", n)
	}
}

// scenarioReapAfterCrashedRelease simulates a last holder that crashed between
// recording its release and removing the pool's keys: the next request
// for an overlapping subnet removes the leftovers and succeeds; a request
// for the same subnet takes the pool up again.
func scenarioReapAfterCrashedRelease(t *testing.T, c *cluster) {
	a, b := c.host("a"), c.host("b")
	p := mustPool(t, a, "10.14.0.0/24", "", false).PoolID
	mustAddr(t, a, p, "", gw)
	mustAddr(t, a, p, "", nil)
	crashRelease(t, c, p)
	if _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p}); !errors.Is(err, ErrUnknownPool) {
		t.Errorf("address from a released pool: %v", err)
	}
	// Taking the same subnet up again.
	if r := mustPool(t, b, "10.14.0.0/24", "", false); r.PoolID != p {
		t.Fatalf("re-request got %s", r.PoolID)
	}
	if info, err := b.PoolInfo(t.Context(), p); err != nil || len(info.Holders) != 1 || info.Holders["b"] != 1 {
		t.Fatalf("taken up: %+v, %v", info, err)
	}
	mustReleasePool(t, b, p) // removes everything, leftovers included
	c.empty()

	// The same subnet with another ip-range removes the released pool.
	mustPool(t, a, "10.14.0.0/24", "", false)
	mustAddr(t, a, p, "", nil)
	crashRelease(t, c, p)
	r2 := mustPool(t, b, "10.14.0.0/24", "10.14.0.0/25", false)
	mustReleasePool(t, b, r2.PoolID)
	c.empty()

	// An overlapping subnet removes the released pool.
	mustPool(t, a, "10.14.0.0/24", "", false)
	mustAddr(t, a, p, "", nil)
	crashRelease(t, c, p)
	r := mustPool(t, b, "10.14.0.0/23", "", false)
	mustReleasePool(t, b, r.PoolID)
	c.empty()
}

// crashRelease marks a pool released by all holders without removing its
// keys, as a host crashing in the middle of ReleasePool would leave it.
func crashRelease(t *testing.T, c *cluster, poolID string) {
	t.Helper()
	ref, _ := parsePoolID(poolID)
	key := metaKey(ref.space, ref.subnet)
	pair, err := c.inspect.Get(t.Context(), key)
	if err != nil {
		t.Fatal(err)
	}
	var rec poolRecord
	if err := decode(key, pair.Value, &rec); err != nil {
		t.Fatal(err)
	}
	rec.Holders = nil
	if err := c.inspect.CAS(t.Context(), key, encode(rec), pair.ModifyIndex); err != nil {
		t.Fatal(err)
	}
}

func TestPoolIDFormat(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{LocalAddressSpace + "/10.0.0.0/24", true},
		{GlobalAddressSpace + "/10.0.0.0/24/10.0.0.128/25", true},
		{LocalAddressSpace + "/fd00::/64", true},
		{LocalAddressSpace + "/fd00::/64/fd00::/96", true},
		{LocalAddressSpace + "/10.0.0.0/24/10.0.0.0/24", false}, // sub-range equal to subnet is not canonical
		{LocalAddressSpace + "/10.0.0.0/24/10.0.1.0/25", false},
		{LocalAddressSpace + "/10.0.0.1/24", false},
		{LocalAddressSpace + "/10.0.0.0", false},
		{LocalAddressSpace + "/::ffff:10.0.0.0/120", false},
		{"Other/10.0.0.0/24", false},
		{"", false},
		{"a/b/c/d", false},
	}
	for _, tt := range tests {
		ref, err := parsePoolID(tt.id)
		if (err == nil) != tt.ok {
			t.Errorf("parsePoolID(%q) = %v, want ok=%v", tt.id, err, tt.ok)
			continue
		}
		if err == nil && ref.id() != tt.id {
			t.Errorf("round trip %q -> %q", tt.id, ref.id())
		}
	}
}

func TestAddressArithmetic(t *testing.T) {
	tests := []struct {
		pool, sub string
		lo, hi    string
		ok        bool
	}{
		{"10.0.0.0/24", "", "10.0.0.1", "10.0.0.254", true},
		{"10.0.0.0/30", "", "10.0.0.1", "10.0.0.2", true},
		{"10.0.0.0/24", "10.0.0.128/25", "10.0.0.128", "10.0.0.254", true},
		{"10.0.0.0/24", "10.0.0.0/25", "10.0.0.1", "10.0.0.127", true},
		{"10.0.0.0/24", "10.0.0.0/32", "", "", false},
		{"10.0.0.0/24", "10.0.0.255/32", "", "", false},
		{"fd00::/64", "", "fd00::1", "fd00::ffff:ffff:ffff:ffff", true},
		{"fd00::/127", "", "fd00::1", "fd00::1", true},
		{"10.0.0.0/8", "", "10.0.0.1", "10.255.255.254", true},
	}
	for _, tt := range tests {
		var sub netip.Prefix
		if tt.sub != "" {
			sub = netip.MustParsePrefix(tt.sub)
		}
		s, ok := allocSpan(netip.MustParsePrefix(tt.pool), sub)
		if ok != tt.ok || ok && (s.lo.String() != tt.lo || s.hi.String() != tt.hi) {
			t.Errorf("allocSpan(%s, %s) = %v..%v %v", tt.pool, tt.sub, s.lo, s.hi, ok)
		}
	}
	for _, tt := range []struct {
		pool string
		want uint64
	}{{"10.0.0.0/24", 254}, {"10.0.0.0/30", 2}, {"10.0.0.0/8", 1<<24 - 2}, {"fd00::/64", 1<<64 - 1}, {"fd00::/48", 1<<64 - 1}, {"fd00::/120", 255}} {
		s, _ := allocSpan(netip.MustParsePrefix(tt.pool), netip.Prefix{})
		if got := s.size(); got != tt.want {
			t.Errorf("size of %s = %d, want %d", tt.pool, got, tt.want)
		}
	}
	if got := lastAddr(netip.MustParsePrefix("10.1.2.0/23")); got.String() != "10.1.3.255" {
		t.Errorf("lastAddr = %s", got)
	}
	if got := lastAddr(netip.MustParsePrefix("fd00:1::/61")); got.String() != "fd00:1:0:7:ffff:ffff:ffff:ffff" {
		t.Errorf("lastAddr v6 = %s", got)
	}
}

var scenarios = []scenario{
	{"RequestPoolBadInput", scenarioRequestPoolBadInput},
	{"ExplicitPoolSharedByHosts", scenarioExplicitPoolSharedByHosts},
	{"SameHostTwoNetworks", scenarioSameHostTwoNetworks},
	{"AutoPools", scenarioAutoPools},
	{"AutoPoolExhausted", scenarioAutoPoolExhausted},
	{"RequestAddress", scenarioRequestAddress},
	{"RoundRobinWraps", scenarioRoundRobinWraps},
	{"SubPoolAndAux", scenarioSubPoolAndAux},
	{"GatewayRules", scenarioGatewayRules},
	{"GatewayRecordRepair", scenarioGatewayRecordRepair},
	{"IPv6", scenarioIPv6},
	{"ReleaseIdempotent", scenarioReleaseIdempotent},
	{"PoolIDSurvivesRestart", scenarioPoolIDSurvivesRestart},
	{"ReapAfterCrashedRelease", scenarioReapAfterCrashedRelease},
	{"EightHostsExhaustPool", scenarioEightHostsExhaustPool},
	{"OverlapRace", scenarioOverlapRace},
	{"SameSubnetRace", scenarioSameSubnetRace},
	{"AutoPoolRace", scenarioAutoPoolRace},
}

// scenarioGatewayRecordRepair: a recorded gateway whose record is missing is
// re-created at the same address; one whose address is now held by an
// endpoint is stale, and the lowest free address becomes the gateway.
func scenarioGatewayRecordRepair(t *testing.T, c *cluster) {
	a, b := c.host("a"), c.host("b")
	p := mustPool(t, a, "10.15.0.0/24", "", false).PoolID
	mustPool(t, b, "10.15.0.0/24", "", false)
	mustAddr(t, a, p, "10.15.0.9", gw)
	ref, _ := parsePoolID(p)
	key := addrKey(ref.space, ref.subnet, netip.MustParseAddr("10.15.0.9"))
	if err := c.inspect.Delete(t.Context(), key); err != nil {
		t.Fatal(err)
	}
	if g := mustAddr(t, b, p, "", gw); g != "10.15.0.9/24" {
		t.Fatalf("gateway with its record missing: %s", g)
	}
	if r := c.addrRecord(p, "10.15.0.9"); r.Kind != kindGateway || r.Holders["b"] != 1 {
		t.Fatalf("re-created record %+v", r)
	}
	// Now an endpoint sits on the recorded gateway address.
	if err := c.inspect.Put(t.Context(), key, encode(addrRecord{Kind: kindEndpoint, Node: "z"})); err != nil {
		t.Fatal(err)
	}
	if g := mustAddr(t, b, p, "", gw); g != "10.15.0.1/24" {
		t.Fatalf("gateway after the recorded one went stale: %s", g)
	}
	if info, _ := b.PoolInfo(t.Context(), p); info.Gateway != netip.MustParseAddr("10.15.0.1") {
		t.Errorf("pool records gateway %s", info.Gateway)
	}
	mustRelease(t, b, p, "10.15.0.1")
	if err := c.inspect.Delete(t.Context(), key); err != nil {
		t.Fatal(err)
	}
	mustReleasePool(t, a, p)
	mustReleasePool(t, b, p)
	c.empty()
}

// TestReleasePoolCleanupFails: the last ReleasePool records the release,
// then the store fails while the pool's keys are removed. The call still
// succeeds (the release happened), the pool is unknown from then on, and
// the next ReleasePool finishes the removal.
func TestReleasePoolCleanupFails(t *testing.T) {
	s := newMemStore()
	a, _ := New(Config{Node: "a", Logger: testLogger()}, s)
	c := &cluster{t: t, inspect: s}
	p := mustPool(t, a, "10.16.0.0/24", "", false).PoolID
	for range 3 {
		mustAddr(t, a, p, "", nil) // leaked: never released
	}
	txns := 0
	s.fail = func(op, key string) error {
		if op == "txn" {
			if txns++; txns > 1 {
				return kvstore.ErrUnavailable
			}
		}
		return nil
	}
	mustReleasePool(t, a, p)
	s.fail = nil
	if len(c.snapshot()) == 0 {
		t.Fatal("cleanup did not fail as arranged")
	}
	if _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p}); !errors.Is(err, ErrUnknownPool) {
		t.Errorf("address from the released pool: %v", err)
	}
	mustReleasePool(t, a, p)
	c.empty()
}

// TestReleaseRacesTakeUp: while the last holder removes a pool's keys,
// another host requests the same subnet. The removal must stop and leave
// the pool, with its address records, to the new holder.
func TestReleaseRacesTakeUp(t *testing.T) {
	s := newMemStore()
	a, _ := New(Config{Node: "a", Logger: testLogger()}, s)
	b, _ := New(Config{Node: "b", Logger: testLogger()}, s)
	c := &cluster{t: t, inspect: s}
	p := mustPool(t, a, "10.17.0.0/24", "", false).PoolID
	ref, _ := parsePoolID(p)
	var kept []string
	for range 3 {
		kept = append(kept, hostOf(mustAddr(t, a, p, "", nil)))
	}
	var once sync.Once
	s.before = func(ops []kvstore.Op) {
		// The first removal step: a batch deleting address records.
		if slices.ContainsFunc(ops, func(o kvstore.Op) bool {
			return o.Verb == kvstore.OpDeleteCAS && strings.Contains(o.Key, "/addr/")
		}) {
			once.Do(func() { mustPool(t, b, "10.17.0.0/24", "", false) })
		}
	}
	mustReleasePool(t, a, p)
	s.before = nil
	info, err := b.PoolInfo(t.Context(), p)
	if err != nil || len(info.Holders) != 1 || info.Holders["b"] != 1 {
		t.Fatalf("pool after the race: %+v, %v", info, err)
	}
	pairs, err := s.List(t.Context(), addrDir(ref.space, ref.subnet))
	if err != nil || len(pairs) != len(kept) {
		t.Fatalf("address records after the race: %d, %v; want the %d kept", len(pairs), err, len(kept))
	}
	if got := hostOf(mustAddr(t, b, p, "", nil)); slices.Contains(kept, got) {
		t.Errorf("b got %s, which is still recorded", got)
	}
	mustReleasePool(t, b, p)
	c.empty()
}
