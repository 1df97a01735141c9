package cluster

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"consul-overlay/kvstore"
)

// watchRecorder records the prefixes a Cluster watches.
type watchRecorder struct {
	kvstore.Store
	mu       sync.Mutex
	prefixes []string
}

func (s *watchRecorder) Watch(ctx context.Context, prefix string) (<-chan []*kvstore.Pair, error) {
	s.mu.Lock()
	s.prefixes = append(s.prefixes, prefix)
	s.mu.Unlock()
	return s.Store.Watch(ctx, prefix)
}

// WatchLean records as Watch does and watches as the store's WatchLean.
func (s *watchRecorder) WatchLean(ctx context.Context, prefix string) (<-chan []*kvstore.Pair, error) {
	s.mu.Lock()
	s.prefixes = append(s.prefixes, prefix)
	s.mu.Unlock()
	return kvstore.WatchLean(ctx, s.Store, prefix)
}

func (s *watchRecorder) TxnIndex(ctx context.Context, ops []kvstore.Op) (uint64, error) {
	return kvstore.TxnIndex(ctx, s.Store, ops)
}

// watching is the prefix of the newest watch.
func (s *watchRecorder) watching() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.prefixes) == 0 {
		return ""
	}
	return s.prefixes[len(s.prefixes)-1]
}

// newWatchedHost is newHost with the watches recorded and a short peer
// record audit.
func newWatchedHost(t *testing.T, open openFunc, hostID, vtep string) (*host, *watchRecorder) {
	t.Helper()
	ws := &watchRecorder{Store: open(t)}
	c, err := New(Config{HostID: hostID, Node: hostID, VTEP: netip.MustParseAddr(vtep), PeerAudit: 200 * time.Millisecond}, ws)
	if err != nil {
		t.Fatal(err)
	}
	return &host{Cluster: c, store: ws}, ws
}

func peerRecord(t *testing.T, s kvstore.Store, key, hostID string) (PeerRecord, bool) {
	t.Helper()
	p, err := s.Get(bg(t), peerRecordKey(key, hostID))
	if err != nil {
		return PeerRecord{}, false
	}
	r, err := decodePeerRecord(p.Value)
	if err != nil {
		t.Fatalf("peer record %s: %v", p.Key, err)
	}
	return r, true
}

func waitWatching(t *testing.T, ws *watchRecorder, prefix string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for ws.watching() != prefix {
		if time.Now().After(deadline) {
			t.Fatalf("watching %q, want %q", ws.watching(), prefix)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testPeerRecords: each member's peer record follows its endpoint
// records in the same writes; the peer watch reads the peer records (the
// config prefix, not the endpoint records) and delivers what
// DesiredPeers gives; a leaving member takes its record along.
func testPeerRecords(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b, wsb := newWatchedHost(t, open, "id-b", "192.0.2.2")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	n := network(t, a, "name-app")
	for _, h := range []string{"id-a", "id-b"} {
		if r, ok := peerRecord(t, a.store, "name-app", h); !ok || r.Incarnation != n.Incarnation || len(r.Endpoints) != 0 {
			t.Fatalf("peer record of new member %s: %+v, %v", h, r, ok)
		}
	}
	ctx, cancel := context.WithCancel(bg(t))
	defer cancel()
	wb, err := b.WatchPeers(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 0 })
	waitWatching(t, wsb, configKey("name-app"))
	e1 := mustEndpoint(t, a, "name-app", "net-a", "ep-1", "10.1.0.2/24", "fd00::2/64", "02:42:0a:01:00:02")
	e2 := mustEndpoint(t, a, "name-app", "net-a", "ep-2", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	want := DesiredPeers("id-b", network(t, a, "name-app"), []Endpoint{e1, e2})
	ps := waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 3 })
	if !slices.EqualFunc(ps, want, samePeer) {
		t.Fatalf("peers from the peer records %+v, want %+v", ps, want)
	}
	if r, _ := peerRecord(t, a.store, "name-app", "id-a"); !slices.Equal(r.Endpoints, []string{"ep-1 02:42:0a:01:00:02 10.1.0.2 fd00::2", "ep-2 02:42:0a:01:00:03 10.1.0.3"}) || r.VTEP != "192.0.2.1" {
		t.Fatalf("a's peer record %+v", r)
	}
	if err := a.DeleteEndpoint(bg(t), "name-app", "ep-1"); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 1 && ps[0].EndpointID == "ep-2" })
	// A new VTEP reaches the peers through the peer record.
	if err := a.SetVTEP(bg(t), netip.MustParseAddr("192.0.2.11")); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 1 && ps[0].VTEP == netip.MustParseAddr("192.0.2.11") })
	if ws := wsb.watching(); ws != configKey("name-app") {
		t.Fatalf("b's watch went back to %q", ws)
	}
	mustLeave(t, a, "name-app", "net-a")
	if _, ok := peerRecord(t, a.store, "name-app", "id-a"); ok {
		t.Fatal("a's peer record outlived its membership")
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 0 })
	mustLeave(t, b, "name-app", "net-b")
	if k := keys(t, a.store, "networks/"); len(k) != 0 {
		t.Fatalf("keys left after the last member: %v", k)
	}
}

// testDeleteWithStaleCache: this host's cached peer record is older than
// the store's (the cache was forgotten after a conflict and a late
// snapshot of the peer watch refilled it from before ep-2 was listed).
// DeleteEndpoint of ep-2 must still take it out of the peer record: the
// other hosts program the peer records, and a listed endpoint that is
// gone keeps its address pointing at this host.
func testDeleteWithStaleCache(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustEndpoint(t, a, "name-app", "net-a", "ep-1", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	p, err := a.store.Get(bg(t), peerRecordKey("name-app", "id-a"))
	if err != nil {
		t.Fatal(err)
	}
	old, err := decodePeerRecord(p.Value)
	if err != nil {
		t.Fatal(err)
	}
	oldIndex := p.ModifyIndex
	mustEndpoint(t, a, "name-app", "net-a", "ep-2", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	a.forgetOwnPeers("name-app")
	a.setOwnPeers("name-app", old, oldIndex)
	if err := a.DeleteEndpoint(bg(t), "name-app", "ep-2"); err != nil {
		t.Fatal(err)
	}
	if r, _ := peerRecord(t, a.store, "name-app", "id-a"); r.lists("ep-2") || !r.lists("ep-1") {
		t.Fatalf("after DeleteEndpoint of ep-2 with a stale cache, a's peer record lists %v; want ep-1 only", r.Endpoints)
	}
	// An endpoint record already gone (an older version removed it)
	// while the peer record lists it and the cache says it does not.
	mustEndpoint(t, a, "name-app", "net-a", "ep-3", "10.1.0.4/24", "", "02:42:0a:01:00:04")
	if err := a.store.Delete(bg(t), endpointKey("name-app", "ep-3")); err != nil {
		t.Fatal(err)
	}
	a.forgetOwnPeers("name-app")
	a.setOwnPeers("name-app", old, oldIndex)
	if err := a.DeleteEndpoint(bg(t), "name-app", "ep-3"); err != nil {
		t.Fatal(err)
	}
	if r, _ := peerRecord(t, a.store, "name-app", "id-a"); r.lists("ep-3") {
		t.Fatalf("after DeleteEndpoint of ep-3 (record gone) with a stale cache, a's peer record lists %v", r.Endpoints)
	}
}

// testPeerRecordsOlderHost: a member that writes endpoint records only (a
// host running an older version) is read from its endpoint records, as
// long as it has no peer record, and again when its peer record and its
// records disagree (a host downgraded after it had one). Its first start
// on this version writes its peer record and the watch reads that.
func testPeerRecordsOlderHost(t *testing.T, open openFunc) {
	b, wsb := newWatchedHost(t, open, "id-b", "192.0.2.2")
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	ctx, cancel := context.WithCancel(bg(t))
	defer cancel()
	wb, err := b.WatchPeers(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 0 })
	waitWatching(t, wsb, configKey("name-app"))

	// Host c, an older version: a membership and a record, no peer record.
	raw := open(t)
	p, err := raw.Get(bg(t), configKey("name-app"))
	if err != nil {
		t.Fatal(err)
	}
	var rec Network
	if err := kvstore.Decode(p.Value, &rec); err != nil {
		t.Fatal(err)
	}
	rec.Hosts["id-c"] = Member{Node: "c", NetworkIDs: []string{"net-c"}, VTEP: "192.0.2.3"}
	val, _ := kvstore.Encode(rec)
	if err := raw.CAS(bg(t), configKey("name-app"), val, p.ModifyIndex); err != nil {
		t.Fatal(err)
	}
	putOld := func(id, addr string) {
		ep := Endpoint{ID: id, NetworkKey: "name-app", Incarnation: rec.Incarnation, NetworkID: "net-c", HostID: "id-c", Node: "c", VTEP: "192.0.2.3", IPv4: addr, MAC: "02:42:0a:01:00:09"}
		v, _ := kvstore.Encode(ep)
		if err := raw.Put(bg(t), endpointKey("name-app", id), v); err != nil {
			t.Fatal(err)
		}
	}
	putOld("ep-c1", "10.1.0.9/24")
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 1 && ps[0].EndpointID == "ep-c1" })
	if ws := wsb.watching(); ws != networkPrefix("name-app") {
		t.Fatalf("with an older member, b watches %q", ws)
	}

	// c starts on this version: its view writes its peer record, and b
	// reads the peer records again without losing c's endpoint.
	c := newHost(t, open, "id-c", "c", "192.0.2.3")
	if _, err := c.View(bg(t)); err != nil {
		t.Fatal(err)
	}
	if r, ok := peerRecord(t, raw, "name-app", "id-c"); !ok || len(r.Endpoints) != 1 {
		t.Fatalf("c's peer record after its start: %+v, %v", r, ok)
	}
	waitWatching(t, wsb, configKey("name-app"))
	mustEndpoint(t, c, "name-app", "net-c", "ep-c2", "10.1.0.10/24", "", "02:42:0a:01:00:0a")
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 2 })

	// c goes back to the older version: a record its peer record does not
	// list. The audit finds it and b reads the endpoint records.
	putOld("ep-c3", "10.1.0.11/24")
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 3 })
	if ws := wsb.watching(); ws != networkPrefix("name-app") {
		t.Fatalf("with a downgraded member, b watches %q", ws)
	}
}

// testPeerWatchUnstampedWrite: a peer record written without a stamp (a
// host downgraded to a release before stamps) in the same transaction as
// another host's stamped one, so that nothing in the key listing names
// it, reaches the compact watch at the audit at the latest, and the watch
// stays on the peer records.
func testPeerWatchUnstampedWrite(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	c := newHost(t, open, "id-c", "c", "192.0.2.3")
	b, wsb := newWatchedHost(t, open, "id-b", "192.0.2.2")
	for _, h := range []*host{a, b, c} {
		mustJoin(t, h, "name-app", "net-"+h.HostID(), spec("10.1.0.0/24"))
	}
	mustEndpoint(t, a, "name-app", "net-id-a", "ep-a1", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	mustEndpoint(t, c, "name-app", "net-id-c", "ep-c1", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	// Enough of a's endpoints for the peer records to pass the size from
	// which a lean watch lists key names (kvstore's leanListBelow, 8 KiB),
	// written as a's release would.
	raw := open(t)
	inc := network(t, a, "name-app").Incarnation
	const many = 450
	pa, err := raw.Get(bg(t), peerRecordKey("name-app", "id-a"))
	if err != nil {
		t.Fatal(err)
	}
	ra, err := decodePeerRecord(pa.Value)
	if err != nil {
		t.Fatal(err)
	}
	var batch []kvstore.Op
	for i := range many {
		ep := Endpoint{ID: fmt.Sprintf("ep-m%03d", i), NetworkKey: "name-app", Incarnation: inc, NetworkID: "net-id-a", HostID: "id-a", Node: "a", VTEP: "192.0.2.1",
			IPv4: fmt.Sprintf("10.1.%d.%d/16", 1+i/200, 1+i%200), MAC: fmt.Sprintf("02:42:0a:01:%02x:%02x", 1+i/200, 1+i%200)}
		v, _ := kvstore.Encode(ep)
		ra = ra.with(ep)
		if batch = append(batch, kvstore.Op{Verb: kvstore.OpSet, Key: endpointKey("name-app", ep.ID), Value: v}); len(batch) == 60 || i == many-1 {
			if err := raw.Txn(bg(t), batch); err != nil {
				t.Fatal(err)
			}
			batch = nil
		}
	}
	if err := a.store.CAS(bg(t), peerRecordKey("name-app", "id-a"), encodePeerRecord(ra), pa.ModifyIndex); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bg(t))
	defer cancel()
	wb, err := b.WatchPeers(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 2+many })
	waitWatching(t, wsb, configKey("name-app"))

	// One transaction: a's new endpoint as this release writes it (the
	// peer record stamped), c's as a downgraded c does (no stamp).
	var ops []kvstore.Op
	for _, e := range []struct {
		host, vtep, id, addr, mac string
		stamp                     bool
	}{
		{"id-a", "192.0.2.1", "ep-a2", "10.1.0.4/24", "02:42:0a:01:00:04", true},
		{"id-c", "192.0.2.3", "ep-c2", "10.1.0.5/24", "02:42:0a:01:00:05", false},
	} {
		ep := Endpoint{ID: e.id, NetworkKey: "name-app", Incarnation: inc, NetworkID: "net-" + e.host, HostID: e.host, Node: e.host, VTEP: e.vtep, IPv4: e.addr, MAC: e.mac}
		v, _ := kvstore.Encode(ep)
		p, err := raw.Get(bg(t), peerRecordKey("name-app", e.host))
		if err != nil {
			t.Fatal(err)
		}
		r, err := decodePeerRecord(p.Value)
		if err != nil {
			t.Fatal(err)
		}
		key := peerRecordKey("name-app", e.host)
		ops = append(ops,
			kvstore.Op{Verb: kvstore.OpSet, Key: endpointKey("name-app", e.id), Value: v},
			kvstore.Op{Verb: kvstore.OpCAS, Key: key, Value: encodePeerRecord(r.with(ep)), Index: p.ModifyIndex})
		if e.stamp {
			base := kvstore.StampBase(configKey("name-app"), key)
			ops = append(ops, kvstore.Op{Verb: kvstore.OpDeleteTree, Key: base}, kvstore.Op{Verb: kvstore.OpSet, Key: base + "0123456789abcdef", Value: []byte{}})
		}
	}
	if err := raw.Txn(bg(t), ops); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 4+many })
	if ws := wsb.watching(); ws != configKey("name-app") {
		t.Fatalf("after an unstamped write, b watches %q", ws)
	}
}

// testEvictPeerRecord: evicting a host removes its peer records.
func testEvictPeerRecord(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, a, "name-app", "net-a2", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	if _, err := b.EvictHost(bg(t), "id-a"); err != nil {
		t.Fatal(err)
	}
	if _, ok := peerRecord(t, b.store, "name-app", "id-a"); ok {
		t.Fatal("evicted host's peer record kept")
	}
	if r, ok := peerRecord(t, b.store, "name-app", "id-b"); !ok || r.VTEP != "192.0.2.2" {
		t.Fatalf("b's peer record %+v, %v", r, ok)
	}
}

// TestPeerRecordLimit: a peer record Consul would refuse is an error that
// names the network and the count, before anything is written.
func TestPeerRecordLimit(t *testing.T) {
	c := &Cluster{cfg: Config{HostID: "id-a"}}
	r := PeerRecord{HostID: "id-a", Incarnation: "x", VTEP: "192.0.2.1"}
	for i := 0; len(r.Endpoints)*21 < MaxPeerRecord; i++ {
		r.Endpoints = append(r.Endpoints, peerEntry(Endpoint{ID: fmt.Sprintf("%016x", i) + strings.Repeat("e", 48), MAC: "02:42:0a:01:00:02", IPv4: "10.1.0.2/16"}))
	}
	_, err := c.peerOp("name-app", r, 7)
	if !errors.Is(err, ErrTooManyEndpoints) || !strings.Contains(err.Error(), "name-app") {
		t.Fatalf("oversized peer record: %v", err)
	}
	r.Endpoints = r.Endpoints[:10]
	if op, err := c.peerOp("name-app", r, 7); err != nil || op.Verb != kvstore.OpCAS || op.Index != 7 {
		t.Fatalf("peer record op %+v, %v", op, err)
	}
	if op, err := c.peerOp("name-app", r, 0); err != nil || op.Verb != kvstore.OpCreate {
		t.Fatalf("first peer record op %+v, %v", op, err)
	}
}

// testLargeNetworkPeers follows a network whose peer records are larger
// than a lean watch lists at each change (on Consul, the watch then reads
// only the records that changed): a host's peers follow every endpoint
// added and removed, a host joining with an endpoint and leaving.
func testLargeNetworkPeers(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	c := newHost(t, open, "id-c", "c", "192.0.2.3")
	s := spec("10.4.0.0/22")
	mustJoin(t, a, "name-app", "net-a", s)
	mustJoin(t, b, "name-app", "net-b", s)
	ctx, cancel := context.WithCancel(bg(t))
	defer cancel()
	wb, err := b.WatchPeers(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	const n = 420 // 21 bytes each: over 8 KiB of peer record
	id := func(i int) string { return fmt.Sprintf("%016x", i+1) + strings.Repeat("e", 48) }
	addr := func(i int) string { return fmt.Sprintf("10.4.%d.%d/22", (i+2)/256, (i+2)%256) }
	mac := func(i int) string { return fmt.Sprintf("02:42:0a:04:%02x:%02x", (i+2)/256, (i+2)%256) }
	for i := range n {
		mustEndpoint(t, a, "name-app", "net-a", id(i), addr(i), "", mac(i))
	}
	has := func(ps []Peer, host, ep string) bool {
		return slices.ContainsFunc(ps, func(p Peer) bool {
			return p.HostID == host && p.EndpointID != "" && strings.HasPrefix(ep, p.EndpointID)
		})
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == n })
	if err := a.DeleteEndpoint(bg(t), "name-app", id(7)); err != nil {
		t.Fatal(err)
	}
	mustEndpoint(t, a, "name-app", "net-a", id(900), addr(900), "", mac(900))
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == n && has(ps, "id-a", id(900)) && !has(ps, "id-a", id(7)) })
	mustJoin(t, c, "name-app", "net-c", s)
	mustEndpoint(t, c, "name-app", "net-c", id(901), addr(901), "", mac(901))
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == n+1 && has(ps, "id-c", id(901)) })
	if err := c.DeleteEndpoint(bg(t), "name-app", id(901)); err != nil {
		t.Fatal(err)
	}
	if err := c.Leave(bg(t), "name-app", "net-c"); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == n && !has(ps, "id-c", id(901)) })
	cancel()
	for range wb { // closes when ctx ends
	}
}
