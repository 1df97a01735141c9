package reaper

import (
	"errors"
	"net/netip"
	"testing"

	"consul-overlay/internal/testenv"
	"consul-overlay/ipam"
)

// testHealDuringReap: host B was cut off past the grace period and is
// being reaped when it reaches the store again. Its own check (Heal: at
// start, when its claim is taken back, and every few minutes) runs before
// its claim has written its host record again, between the reap's
// cluster step and its IPAM step: it finds members/host-b gone and
// re-asserts its memberships, its endpoint records and its addresses,
// which it still holds (the IPAM step has not run yet), so nothing
// changes there. The reap goes on: its writes are fenced on the host
// record, which B has not written, so the IPAM step frees every address
// of B's running containers and drops its pool holds (the pool of the
// network B alone had goes). B's records now say its containers run with
// addresses the IPAM hands out to the next host that asks: B's check
// finds them free only at its next run, and by then another host may have
// taken them. A re-assertion has to write the host record first, so that
// a reap judged on the record it had stops before its next write.
func testHealDuringReap(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	ctx := bg(t)
	local := s.localOf(t, s.b)
	s.b.stop(t)
	healed := false
	hook := func() {
		h, err := Heal(ctx, "host-b", s.b.node, s.b.cl, s.b.ip, nil, s.b.claim.Touch, local, nil)
		if err != nil {
			t.Errorf("B's check during the reap: %v", err)
		}
		healed = h.Reasserted != nil
	}
	if _, err := s.reapB(t, hook); err != nil {
		t.Fatal(err)
	}
	if !healed {
		t.Fatal("setup: B's check did not re-assert anything during the reap")
	}
	for _, k := range []string{"members/host-b", "networks/name-app/endpoints/ep-b", "networks/name-bonly/endpoints/ep-b2"} {
		if !exists(t, s.a.store, k) {
			t.Errorf("%s re-asserted by B is gone", k)
		}
	}
	pools := map[netip.Addr]string{
		s.addrB:     ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix("10.50.0.0/24"), netip.Prefix{}),
		s.addrBOnly: ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix("10.60.0.0/24"), netip.Prefix{}),
	}
	for a, pool := range pools {
		_, holder, _, err := s.a.ip.AddressHolder(ctx, a)
		if err != nil {
			t.Fatal(err)
		}
		if holder == "host-b" {
			continue
		}
		t.Errorf("address %s of B's running endpoint, just re-asserted by B: holder %q after the reap", a, holder)
		if a != s.addrB {
			continue // its pool is gone with B's hold
		}
		if got, err := s.a.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool, Address: a, Endpoint: "ep-a-new", MAC: "02:00:00:00:0a:02"}); err == nil {
			t.Errorf("address %s handed out twice: to B's running endpoint ep-b, recorded, and to A's new endpoint (%s)", a, got)
		} else if !errors.Is(err, ipam.ErrAddressInUse) {
			t.Fatal(err)
		}
	}
}

// testAllocateDuringReap: host B was cut off past the grace period and is
// being reaped when it reaches the store again, between the reap's
// cluster step and its IPAM step. Before its claim has written its host
// record again (at its next round, up to 2 s, or later while its watch of
// the key still shows it the session it had), Docker asks B for an
// address for a new container, and B hands it out: the record is B's, in
// the store. The reap goes on, fenced on B's host record as it judged it,
// which nothing has changed: its IPAM step frees every address of B, the
// new one too, and the next host that asks is granted it while B's
// container starts with it. B's own writes are fenced on its record
// (kvstore.OwnFenced): a write finds its session holding the record, or
// writes the record anew in the same transaction, and the reap stops
// before its next write.
func testAllocateDuringReap(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	ctx := bg(t)
	s.b.stop(t)
	pool := ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix("10.50.0.0/24"), netip.Prefix{})
	var fresh netip.Addr
	hook := func() {
		if exists(t, s.a.store, "members/host-b") {
			t.Error("setup: the hook runs before the cluster step")
		}
		a, err := s.b.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool, Endpoint: "ep-b-new", MAC: "02:00:00:00:00:0b"})
		if err != nil {
			t.Errorf("B's allocation for docker run during the reap: %v", err)
			return
		}
		fresh = a.Addr()
	}
	if _, err := s.reapB(t, hook); err != nil {
		t.Fatal(err)
	}
	if !fresh.IsValid() {
		t.Fatal("setup: B allocated nothing during the reap")
	}
	for _, x := range []struct {
		what string
		a    netip.Addr
	}{{"new endpoint ep-b-new", fresh}, {"running endpoint ep-b", s.addrB}, {"running endpoint ep-b2", s.addrBOnly}} {
		_, holder, _, err := s.a.ip.AddressHolder(ctx, x.a)
		if err != nil {
			t.Fatal(err)
		}
		if holder == "host-b" {
			continue
		}
		t.Errorf("address %s of B's %s: holder %q after the reap", x.a, x.what, holder)
		if x.a == s.addrBOnly {
			continue // its pool is gone with B's hold
		}
		if got, err := s.a.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool, Address: x.a, Endpoint: "ep-a-new", MAC: "02:00:00:00:0a:03"}); err == nil {
			t.Errorf("address %s handed out twice: to B's %s and to A's new endpoint (%s)", x.a, x.what, got)
		} else if !errors.Is(err, ipam.ErrAddressInUse) {
			t.Fatal(err)
		}
	}
	if !exists(t, s.a.store, HostsPrefix+"host-b") {
		t.Error("B's host record was removed")
	}
}

// reapB has A evict B at once, with before run between the reap's
// cluster step and its IPAM step (evictHook), and returns the reap's
// report.
func (s *scenario) reapB(t *testing.T, before func()) (Reaped, error) {
	t.Helper()
	return s.reapBHooked(t, before, func() {})
}

// reapBHooked is reapB with a second hook, run after the IPAM step (the
// reap's last fenced write), before the reap turns to the services.
func (s *scenario) reapBHooked(t *testing.T, beforeIPAM, afterIPAM func()) (Reaped, error) {
	t.Helper()
	r, err := New(Config{HostID: s.a.id, Grace: grace, Now: s.e.clock.Now}, s.a.store, s.a.cl, evictHook{ip: s.a.ip, before: beforeIPAM, after: afterIPAM},
		ConsulCatalog{Client: s.a.store.Client(), LocalNode: s.agentNode})
	if err != nil {
		t.Fatal(err)
	}
	return r.Evict(bg(t), "host-b", false)
}
