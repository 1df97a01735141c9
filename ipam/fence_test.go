package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"
)

// clock is a settable clock shared by the simulated hosts of a test.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// on makes d use the clock; its start counts as now.
func (c *clock) on(d *Driver) *Driver {
	d.now = c.now
	d.started = c.now()
	return d
}

func mac(s string) map[string]string { return map[string]string{MACAddressOption: s} }

// inUse is a Config.InUse / Sweep bound backed by a set of addresses.
type inUse struct {
	mu sync.Mutex
	m  map[string]bool
}

func (u *inUse) set(a string, v bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.m == nil {
		u.m = map[string]bool{}
	}
	u.m[a] = v
}

func (u *inUse) has(_ string, a netip.Addr) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.m[a.String()]
}

// scenarioReclaimThenDockerRelease is the acceptance test. Container
// X holds the last free address of a tiny pool; the plugin reclaims it
// (Docker no longer has X); container Y asks for an address; then Docker
// sends X's release, and later repeats it. Y's address must stay Y's, and
// never be handed out twice.
func scenarioReclaimThenDockerRelease(t *testing.T, c *cluster) {
	clk := newClock()
	used := &inUse{}
	a := clk.on(c.host("a", func(cfg *Config) { cfg.InUse = used.has }))
	p := mustPool(t, a, "10.40.0.0/30", "", false).PoolID // usable: .1 (gateway), .2
	mustAddr(t, a, p, "", gw)
	const macX, macY = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
	x := hostOf(mustAddr(t, a, p, "", mac(macX)))
	if x != "10.40.0.2" {
		t.Fatalf("X got %s", x)
	}
	used.set(x, true)
	xa := netip.MustParseAddr(x)

	// The plugin reclaims X: a tombstone, not a free address.
	used.set(x, false)
	if err := a.ReclaimAddress(t.Context(), p, xa, Holder{MAC: macX}); err != nil {
		t.Fatalf("reclaim X: %v", err)
	}
	if r := c.addrRecord(p, x); !r.tombstone() || r.MAC != macX {
		t.Fatalf("after reclaim: %+v, want a tombstone of X", r)
	}
	// Y cannot get X's address while it awaits Docker's release.
	if _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Options: mac(macY)}); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("Y while X's tombstone stands: %v, want pool exhausted", err)
	}
	if _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Address: x, Options: mac(macY)}); !errors.Is(err, ErrAddressInUse) {
		t.Fatalf("Y pinned to X's address while X's tombstone stands: %v, want address in use", err)
	}
	// X asking again (same MAC) does not get its reclaimed address back.
	if _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Address: x, Options: mac(macX)}); !errors.Is(err, ErrAddressInUse) {
		t.Fatalf("X again on its tombstone: %v, want address in use", err)
	}

	// Docker releases X's address: that consumes the tombstone.
	mustRelease(t, a, p, x)
	if y := hostOf(mustAddr(t, a, p, "", mac(macY))); y != x {
		t.Fatalf("Y got %s, want the freed %s", y, x)
	}
	used.set(x, true) // Y's endpoint is created
	// Docker repeats the release of X's address (dockerd's clean-up at its
	// start): Y keeps it.
	mustRelease(t, a, p, x)
	if r := c.addrRecord(p, x); r.MAC != macY || r.tombstone() {
		t.Fatalf("after the repeated release: %+v, want Y's", r)
	}
	if _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Options: mac("02:00:00:00:00:0c")}); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("Z after the repeated release: %v, want pool exhausted (Y holds the address)", err)
	}
	// A reclaim naming X is a no-op now that Y holds the address.
	before := c.snapshot()
	if err := a.ReclaimAddress(t.Context(), p, xa, Holder{MAC: macX}); err != nil {
		t.Fatal(err)
	}
	c.unchanged(before, "reclaim naming X of Y's address")

	// Y is removed normally: DeleteEndpoint, then the release frees it.
	used.set(x, false)
	mustRelease(t, a, p, x)
	mustRelease(t, a, p, "10.40.0.1")
	mustReleasePool(t, a, p)
	c.empty()
}

// scenarioTombstoneExpires: Docker never releases a reclaimed address; the
// sweep frees it after the grace period, not before; a late release from
// Docker then does not free the address of its new holder.
func scenarioTombstoneExpires(t *testing.T, c *cluster) {
	clk := newClock()
	used := &inUse{}
	a := clk.on(c.host("a", func(cfg *Config) { cfg.InUse = used.has; cfg.Grace = time.Hour }))
	p := mustPool(t, a, "10.41.0.0/30", "", false).PoolID
	mustAddr(t, a, p, "", gw)
	const macX, macY = "02:00:00:00:01:0a", "02:00:00:00:01:0b"
	x := hostOf(mustAddr(t, a, p, "", mac(macX)))
	if err := a.ReclaimAddress(t.Context(), p, netip.MustParseAddr(x), Holder{MAC: macX}); err != nil {
		t.Fatal(err)
	}
	clk.advance(59 * time.Minute)
	if n, err := a.Sweep(t.Context(), used.has); err != nil || n != 0 {
		t.Fatalf("sweep within the grace period: freed %d, %v", n, err)
	}
	if !c.addrRecord(p, x).tombstone() {
		t.Fatal("tombstone freed within the grace period")
	}
	clk.advance(2 * time.Minute)
	if n, err := a.Sweep(t.Context(), used.has); err != nil || n != 1 {
		t.Fatalf("sweep after the grace period: freed %d, %v; want 1", n, err)
	}
	y := hostOf(mustAddr(t, a, p, "", mac(macY)))
	if y != x {
		t.Fatalf("Y got %s, want %s", y, x)
	}
	used.set(y, true)
	mustRelease(t, a, p, x) // Docker's late release for X
	if r := c.addrRecord(p, x); r.MAC != macY {
		t.Fatalf("Y's address after a late release for X: %+v", r)
	}
	used.set(y, false)
	mustRelease(t, a, p, y)
	mustRelease(t, a, p, "10.41.0.1")
	mustReleasePool(t, a, p)
	c.empty()
}

// scenarioReclaimFenced: a reclaim that does not name the holder changes
// nothing.
func scenarioReclaimFenced(t *testing.T, c *cluster) {
	clk := newClock()
	a, b := clk.on(c.host("a")), clk.on(c.host("b"))
	p := mustPool(t, a, "10.42.0.0/24", "", false).PoolID
	mustPool(t, b, "10.42.0.0/24", "", false)
	g := netip.MustParseAddr(hostOf(mustAddr(t, a, p, "", gw)))
	mustAddr(t, b, p, "", gw)
	aux := netip.MustParseAddr(hostOf(mustAddr(t, a, p, "10.42.0.200", nil)))
	const macA, macB = "02:00:00:00:02:0a", "02:00:00:00:02:0b"
	xa := netip.MustParseAddr(hostOf(mustAddr(t, a, p, "", mac(macA))))
	clk.advance(time.Second)
	xb := netip.MustParseAddr(hostOf(mustAddr(t, b, p, "", mac(macB))))
	named := netip.MustParseAddr(hostOf(mustAddr(t, a, p, "", ep("web"))))
	before := c.snapshot()
	cases := []struct {
		name string
		a    netip.Addr
		h    Holder
	}{
		{"wrong MAC", xa, Holder{MAC: macB}},
		{"another host's address", xb, Holder{MAC: macB}},
		{"the gateway", g, Holder{MAC: macA}},
		{"an aux address", aux, Holder{MAC: macA}},
		{"a free address", netip.MustParseAddr("10.42.0.99"), Holder{MAC: macA}},
		{"a record without MAC", named, Holder{MAC: macA}},
		{"allocated after the endpoint was created", xa, Holder{MAC: macA, Created: clk.now().Add(-time.Hour)}},
	}
	for _, tt := range cases {
		if err := a.ReclaimAddress(t.Context(), p, tt.a, tt.h); err != nil {
			t.Errorf("%s: %v", tt.name, err)
		}
	}
	c.unchanged(before, "reclaims that do not name the holder")
	bad := []struct {
		name string
		err  error
		want error
	}{
		{"no MAC", a.ReclaimAddress(t.Context(), p, xa, Holder{}), ErrInvalidRequest},
		{"bad pool", a.ReclaimAddress(t.Context(), "x/y", xa, Holder{MAC: macA}), ErrInvalidRequest},
		{"outside", a.ReclaimAddress(t.Context(), p, netip.MustParseAddr("10.9.0.1"), Holder{MAC: macA}), ErrAddressOutOfRange},
	}
	for _, tt := range bad {
		if !errors.Is(tt.err, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, tt.err, tt.want)
		}
	}
	c.unchanged(before, "bad reclaims")
	// The right holder (MAC in another spelling) reclaims; again is a no-op.
	if err := a.ReclaimAddress(t.Context(), p, xa, Holder{MAC: "02:00:00:00:02:0A", Created: clk.now()}); err != nil {
		t.Fatal(err)
	}
	if !c.addrRecord(p, xa.String()).tombstone() {
		t.Fatal("the holder's reclaim made no tombstone")
	}
	before = c.snapshot()
	if err := a.ReclaimAddress(t.Context(), p, xa, Holder{MAC: macA}); err != nil {
		t.Fatal(err)
	}
	c.unchanged(before, "second reclaim")
	// Host b's release of a's tombstone changes nothing either.
	mustRelease(t, b, p, xa.String())
	c.unchanged(before, "another host's release of a tombstone")
	for _, x := range []netip.Addr{xa, named, aux, g} {
		mustRelease(t, a, p, x.String())
	}
	for _, x := range []netip.Addr{xb, g} {
		mustRelease(t, b, p, x.String())
	}
	mustReleasePool(t, a, p)
	mustReleasePool(t, b, p)
	c.empty()
}

// scenarioSweep: the sweep frees expired tombstones and turns old orphans
// into tombstones; it never touches a bound address, a young one, a shared
// one or another host's.
func scenarioSweep(t *testing.T, c *cluster) {
	clk := newClock()
	used := &inUse{}
	a, b := clk.on(c.host("a")), clk.on(c.host("b"))
	p := mustPool(t, a, "10.43.0.0/24", "", false).PoolID
	mustPool(t, b, "10.43.0.0/24", "", false)
	g := hostOf(mustAddr(t, a, p, "", gw))
	aux := hostOf(mustAddr(t, a, p, "10.43.0.200", nil))
	bound := hostOf(mustAddr(t, a, p, "", mac("02:00:00:00:03:01")))
	orphan := hostOf(mustAddr(t, a, p, "", mac("02:00:00:00:03:02")))
	dead := hostOf(mustAddr(t, a, p, "", mac("02:00:00:00:03:03")))
	other := hostOf(mustAddr(t, b, p, "", mac("02:00:00:00:03:04")))
	used.set(bound, true)
	if err := a.ReclaimAddress(t.Context(), p, netip.MustParseAddr(dead), Holder{MAC: "02:00:00:00:03:03"}); err != nil {
		t.Fatal(err)
	}
	clk.advance(30 * time.Minute)
	young := hostOf(mustAddr(t, a, p, "", mac("02:00:00:00:03:05")))
	before := c.snapshot()
	if n, err := a.Sweep(t.Context(), used.has); err != nil || n != 0 {
		t.Fatalf("early sweep: %d, %v", n, err)
	}
	c.unchanged(before, "a sweep before anything is older than the grace period")

	clk.advance(31 * time.Minute)
	if n, err := a.Sweep(t.Context(), used.has); err != nil || n != 1 {
		t.Fatalf("sweep: freed %d, %v; want 1 (the expired tombstone)", n, err)
	}
	if _, err := c.inspect.Get(t.Context(), addrKeyOf(t, p, dead)); err == nil {
		t.Errorf("expired tombstone %s not freed", dead)
	}
	if !c.addrRecord(p, orphan).tombstone() {
		t.Errorf("orphan %s not reclaimed", orphan)
	}
	for _, x := range []string{g, aux, bound, young, other} {
		if r := c.addrRecord(p, x); r.tombstone() {
			t.Errorf("%s swept: %+v", x, r)
		}
	}
	// A nil bound never takes an address for an orphan.
	clk.advance(2 * time.Hour)
	if n, err := a.Sweep(t.Context(), nil); err != nil || n != 1 {
		t.Fatalf("sweep with nil bound: freed %d, %v; want 1 (the orphan's tombstone)", n, err)
	}
	if r := c.addrRecord(p, young); r.tombstone() {
		t.Errorf("nil bound swept %s", young)
	}
	// Docker's release of the orphan, late, is harmless.
	mustRelease(t, a, p, orphan)
	// Host b's sweep does not touch a's records, nor the shared ones.
	before = c.snapshot()
	clk.advance(2 * time.Hour)
	if n, err := b.Sweep(t.Context(), func(string, netip.Addr) bool { return false }); err != nil || n != 0 {
		t.Fatalf("b's sweep: %d, %v", n, err)
	}
	if !c.addrRecord(p, other).tombstone() {
		t.Errorf("b's own orphan %s not reclaimed", other)
	}
	for _, x := range []string{g, aux, bound, young} {
		if r := c.addrRecord(p, x); r.tombstone() {
			t.Errorf("b's sweep touched %s: %+v", x, r)
		}
	}
	for _, x := range []string{bound, young, aux, g} {
		mustRelease(t, a, p, x)
	}
	mustRelease(t, b, p, other)
	mustRelease(t, b, p, g)
	mustReleasePool(t, a, p)
	mustReleasePool(t, b, p)
	c.empty()
}

// scenarioSweepOldRecords: records written before allocation times existed
// are aged from the driver's start; a released pool whose removal did not
// finish is removed by the sweep.
func scenarioSweepOldRecords(t *testing.T, c *cluster) {
	clk := newClock()
	a := clk.on(c.host("a"))
	p := mustPool(t, a, "10.44.0.0/24", "", false).PoolID
	ref, _ := parsePoolID(p)
	old := netip.MustParseAddr("10.44.0.7")
	rec := addrRecord{Kind: kindEndpoint, Node: "a", MAC: "02:00:00:00:04:01"} // no At
	if err := c.inspect.Create(t.Context(), addrKey(ref.space, ref.subnet, old), encode(rec)); err != nil {
		t.Fatal(err)
	}
	unbound := func(string, netip.Addr) bool { return false }
	clk.advance(30 * time.Minute)
	before := c.snapshot()
	if _, err := a.Sweep(t.Context(), unbound); err != nil {
		t.Fatal(err)
	}
	c.unchanged(before, "sweep of an old record younger than the driver's grace")
	clk.advance(31 * time.Minute)
	if _, err := a.Sweep(t.Context(), unbound); err != nil {
		t.Fatal(err)
	}
	if !c.addrRecord(p, old.String()).tombstone() {
		t.Fatal("old record not reclaimed")
	}
	// A pool released while its removal was cut short.
	crashRelease(t, c, p)
	if _, err := a.Sweep(t.Context(), unbound); err != nil {
		t.Fatal(err)
	}
	c.empty()
}

// scenarioSweepPools: surplus holds of this host (a RequestPool answered
// into a crash, a ReleasePool lost) are dropped once older than the grace
// period and seen by two sweeps; holds in use, young holds and other
// hosts' holds stay.
func scenarioSweepPools(t *testing.T, c *cluster) {
	clk := newClock()
	a, b := clk.on(c.host("a")), clk.on(c.host("b"))
	p := mustPool(t, a, "10.45.0.0/24", "", false).PoolID
	mustPool(t, a, "10.45.0.0/24", "", false) // a's retry after a crash: two holds, one network
	mustPool(t, b, "10.45.0.0/24", "", false)
	q := mustPool(t, a, "10.46.0.0/24", "", false).PoolID // a's ReleasePool for it is lost
	mustAddr(t, a, q, "", gw)
	uses := func(id string) (int, bool) {
		switch id {
		case p:
			return 1, true
		case q:
			return 0, true
		}
		return 0, false
	}
	before := c.snapshot()
	clk.advance(59 * time.Minute)
	if n, err := a.SweepPools(t.Context(), uses); err != nil || n != 0 {
		t.Fatalf("early pool sweep: %d, %v", n, err)
	}
	c.unchanged(before, "a pool sweep within the grace period")
	clk.advance(2 * time.Minute)
	// The first sweep past the grace period only notes the surplus (it
	// may be a network on its way out, whose ReleasePool follows); the
	// next one, finding the pools unchanged, drops it.
	before = c.snapshot()
	if n, err := a.SweepPools(t.Context(), uses); err != nil || n != 0 {
		t.Fatalf("first pool sweep past the grace period: dropped %d, %v; want 0", n, err)
	}
	c.unchanged(before, "the first pool sweep that finds a surplus")
	if n, err := a.SweepPools(t.Context(), uses); err != nil || n != 2 {
		t.Fatalf("pool sweep: dropped %d, %v; want 2", n, err)
	}
	info, err := a.PoolInfo(t.Context(), p)
	if err != nil || info.Holders["a"] != 1 || info.Holders["b"] != 1 {
		t.Fatalf("pool p after the sweep: %+v, %v", info, err)
	}
	if _, err := a.PoolInfo(t.Context(), q); !errors.Is(err, ErrUnknownPool) {
		t.Fatalf("pool q after the sweep: %v, want removed", err)
	}
	// Unknown use: nothing dropped.
	before = c.snapshot()
	clk.advance(2 * time.Hour)
	if n, err := b.SweepPools(t.Context(), func(string) (int, bool) { return 0, false }); err != nil || n != 0 {
		t.Fatalf("sweep with unknown use: %d, %v", n, err)
	}
	c.unchanged(before, "a pool sweep that cannot tell use")
	mustReleasePool(t, a, p)
	mustReleasePool(t, b, p)
	c.empty()
}

// scenarioReclaimRace: the plugin's reclaim of X, Docker's release of X
// and a new container Y pinned to X's address run at once, on separate
// clients, many times. Whatever the order, Y ends up holding the address
// (live, with its MAC), and nothing else holds it.
func scenarioReclaimRace(t *testing.T, c *cluster) {
	a := c.host("a")
	docker, y := c.host("a"), c.host("a") // the same host, other clients
	p := mustPool(t, a, "10.47.0.0/24", "", false).PoolID
	rounds := 40
	if testing.Short() {
		rounds = 10
	}
	for i := range rounds {
		addr := netip.AddrFrom4([4]byte{10, 47, 0, byte(10 + i)})
		macX := fmt.Sprintf("02:00:00:00:47:%02x", i)
		macY := fmt.Sprintf("02:00:00:01:47:%02x", i)
		mustAddr(t, a, p, addr.String(), mac(macX))
		var yErr error
		together(3, func(g int) {
			switch g {
			case 0:
				if err := a.ReclaimAddress(t.Context(), p, addr, Holder{MAC: macX}); err != nil {
					t.Errorf("reclaim: %v", err)
				}
			case 1:
				if err := docker.FreeAddress(t.Context(), p, addr); err != nil {
					t.Errorf("release: %v", err)
				}
			case 2:
				for range 200 {
					_, yErr = y.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Address: addr.String(), Options: mac(macY)})
					if !errors.Is(yErr, ErrAddressInUse) {
						return
					}
					time.Sleep(time.Millisecond)
				}
			}
		})
		if yErr != nil {
			t.Fatalf("round %d: Y never got %s: %v (record %+v)", i, addr, yErr, c.addrRecord(p, addr.String()))
		}
		if r := c.addrRecord(p, addr.String()); r.MAC != macY || r.tombstone() {
			t.Fatalf("round %d: %s held as %+v, want Y's", i, addr, r)
		}
		mustRelease(t, y, p, addr.String())
	}
	mustReleasePool(t, a, p)
	c.empty()
}

func addrKeyOf(t *testing.T, poolID, a string) string {
	t.Helper()
	ref, err := parsePoolID(poolID)
	if err != nil {
		t.Fatal(err)
	}
	return addrKey(ref.space, ref.subnet, netip.MustParseAddr(a))
}

func init() {
	scenarios = append(scenarios,
		scenario{"ReclaimThenDockerRelease", scenarioReclaimThenDockerRelease},
		scenario{"TombstoneExpires", scenarioTombstoneExpires},
		scenario{"ReclaimFenced", scenarioReclaimFenced},
		scenario{"Sweep", scenarioSweep},
		scenario{"SweepOldRecords", scenarioSweepOldRecords},
		scenario{"SweepPools", scenarioSweepPools},
		scenario{"ReclaimRace", scenarioReclaimRace},
	)
}

// scenarioRestartedUnderItsName: a container pinned to an address (--ip) is
// started again under its name while the driver still has its earlier
// endpoint (gone while the plugin was down). The new endpoint gets the
// address; the earlier endpoint's reclaim, later, must not take it from
// the new one, whether the MAC is new or the same (--mac-address), and a
// tombstone of an address an endpoint holds is never freed by the sweep.
// Another container with the same MAC but another name does not get it.
func scenarioRestartedUnderItsName(t *testing.T, c *cluster) {
	clk := newClock()
	used := &inUse{}
	a := clk.on(c.host("a", func(cfg *Config) { cfg.InUse = used.has }))
	b := clk.on(c.host("b"))
	p := mustPool(t, a, "10.44.0.0/24", "", false).PoolID
	mustPool(t, b, "10.44.0.0/24", "", false)
	const x, m1, m2 = "10.44.0.9", "02:00:00:00:04:01", "02:00:00:00:04:02"
	xa := netip.MustParseAddr(x)
	app := func(m string) map[string]string {
		return map[string]string{EndpointNameOption: "app", MACAddressOption: m}
	}

	mustAddr(t, a, p, x, app(m1))
	clk.advance(time.Second)
	created1 := clk.now() // the first endpoint, E1
	used.set(x, true)
	clk.advance(time.Minute)
	// Started again: new endpoint E2, new MAC, same name and --ip.
	if got := hostOf(mustAddr(t, a, p, x, app(m2))); got != x {
		t.Fatalf("restarted container got %s", got)
	}
	if r := c.addrRecord(p, x); r.MAC != m2 || r.Endpoint != "app" || !r.At.Equal(clk.now()) || r.tombstone() {
		t.Fatalf("record after the restart: %+v, want E2's MAC and time", r)
	}
	clk.advance(time.Second)
	created2 := clk.now()
	// The driver reclaims the stale E1: E2's address stays E2's.
	before := c.snapshot()
	if err := a.ReclaimAddress(t.Context(), p, xa, Holder{MAC: m1, Created: created1}); err != nil {
		t.Fatal(err)
	}
	c.unchanged(before, "E1's reclaim of the address E2 got again")

	// Started once more with the same MAC (--mac-address): E3.
	clk.advance(time.Minute)
	mustAddr(t, a, p, x, app(m2))
	before = c.snapshot()
	if err := a.ReclaimAddress(t.Context(), p, xa, Holder{MAC: m2, Created: created2}); err != nil {
		t.Fatal(err)
	}
	c.unchanged(before, "E2's reclaim (same MAC) of the address E3 got again")

	// The same MAC under another name is another container.
	if _, err := a.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Address: x,
		Options: map[string]string{EndpointNameOption: "other", MACAddressOption: m2}}); !errors.Is(err, ErrAddressInUse) {
		t.Fatalf("another container with the same MAC and --ip: %v, want address in use", err)
	}

	// Should a tombstone still land on an address an endpoint holds, the
	// sweep keeps it: nobody else gets the address.
	if err := a.ReclaimAddress(t.Context(), p, xa, Holder{MAC: m2, Created: clk.now()}); err != nil {
		t.Fatal(err)
	}
	if !c.addrRecord(p, x).tombstone() {
		t.Fatal("no tombstone to test the sweep with")
	}
	clk.advance(2 * time.Hour)
	if n, err := a.Sweep(t.Context(), used.has); err != nil || n != 0 {
		t.Fatalf("sweep of a tombstone an endpoint holds: freed %d, %v; want 0", n, err)
	}
	if _, err := b.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Address: x, Options: mac("02:00:00:00:04:03")}); !errors.Is(err, ErrAddressInUse) {
		t.Fatalf("host b asking for the kept address: %v, want address in use", err)
	}
	// Once no endpoint holds it, the sweep frees it.
	used.set(x, false)
	if n, err := a.Sweep(t.Context(), used.has); err != nil || n != 1 {
		t.Fatalf("sweep after the endpoint went: freed %d, %v; want 1", n, err)
	}
	mustReleasePool(t, a, p)
	mustReleasePool(t, b, p)
	c.empty()
}

func init() {
	scenarios = append(scenarios, scenario{"RestartedUnderItsName", scenarioRestartedUnderItsName})
}
