package cluster

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"consul-overlay/discovery"
	"consul-overlay/kvstore"
)

// testWatchSkipsUnchanged: a rewrite of an endpoint record that changes no
// peer field (what Join did before join records) delivers nothing; the
// next delivery is the next real change.
func testWatchSkipsUnchanged(t *testing.T, open openFunc) {
	a, b, wb := twoHostsWatching(t, open)
	// b's own endpoint and a's rewritten record change none of b's peers.
	mustEndpoint(t, b, "name-app", "net-b", "ep-b", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	if _, err := a.UpdateEndpoint(bg(t), "name-app", "ep-a", func(e *Endpoint) { e.Sandbox = "ctr" }); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // let the watch see those writes on their own
	mustEndpoint(t, a, "name-app", "net-a", "ep-a2", "10.1.0.4/24", "", "02:42:0a:01:00:04")
	select {
	case ps := <-wb:
		if len(ps) != 2 {
			t.Fatalf("delivery after writes that changed no peer: %+v; want the two peers of the next change", ps)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no delivery after a new endpoint")
	}
	// A peer field that changes is delivered.
	if _, err := a.UpdateEndpoint(bg(t), "name-app", "ep-a2", func(e *Endpoint) { e.MAC = "02:42:0a:01:00:05" }); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 2 && ps[1].MAC.String() == "02:42:0a:01:00:05" })
}

// testJoinRecords: a host's join records live outside the watched keys,
// read back by that host only, and go one by one.
func testJoinRecords(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	ports := []discovery.Port{{Proto: "tcp", Port: 80}}
	if err := a.PutJoined(bg(t), "ep-1", Joined{NetworkKey: "name-app", Sandbox: "c1", Ports: ports}); err != nil {
		t.Fatal(err)
	}
	if err := a.PutJoined(bg(t), "ep-2", Joined{NetworkKey: "name-app", Sandbox: "c2"}); err != nil {
		t.Fatal(err)
	}
	if err := b.PutJoined(bg(t), "ep-3", Joined{NetworkKey: "name-app", Sandbox: "c3"}); err != nil {
		t.Fatal(err)
	}
	if err := a.PutJoined(bg(t), "bad/id", Joined{}); err == nil {
		t.Error("join record with a slash in its ID accepted")
	}
	js, err := a.Joins(bg(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(js) != 2 || js["ep-1"].Sandbox != "c1" || len(js["ep-1"].Ports) != 1 || js["ep-1"].Ports[0] != ports[0] || js["ep-2"].Sandbox != "c2" {
		t.Fatalf("a's join records %+v", js)
	}
	for _, k := range keys(t, a.store, "networks/") {
		t.Errorf("join records wrote %s", k)
	}
	if err := a.DeleteJoined(bg(t), "ep-1"); err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteJoined(bg(t), "ep-1"); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if js, err := a.Joins(bg(t)); err != nil || len(js) != 1 {
		t.Fatalf("after delete: %+v, %v", js, err)
	}
}

// countingStore counts reads of one key.
type countingStore struct {
	kvstore.Store
	key   string // counted, and every key under prefix
	reads atomic.Int32
}

func (s *countingStore) Get(ctx context.Context, key string) (*kvstore.Pair, error) {
	if key == s.key || strings.HasPrefix(key, endpointsPrefix("name-app")) || strings.HasPrefix(key, peersPrefix("name-app")) {
		s.reads.Add(1)
	}
	return s.Store.Get(ctx, key)
}

func (s *countingStore) TxnIndex(ctx context.Context, ops []kvstore.Op) (uint64, error) {
	return kvstore.TxnIndex(ctx, s.Store, ops)
}

// testCreateEndpointCachedConfig: with the network's peer watch running,
// CreateEndpoint writes on the config the watch saw without reading it;
// a stale one (this host left meanwhile) is caught by the transaction's
// index check, never written on.
func testCreateEndpointCachedConfig(t *testing.T, open openFunc) {
	cs := &countingStore{Store: open(t), key: configKey("name-app")}
	c, err := New(Config{HostID: "id-a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1")}, cs)
	if err != nil {
		t.Fatal(err)
	}
	a := &host{Cluster: c, store: cs}
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	ctx, cancel := context.WithCancel(bg(t))
	defer cancel()
	wa, err := a.WatchPeers(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	// The watch has seen b's membership once it delivers; b's endpoint
	// comes after it.
	mustEndpoint(t, b, "name-app", "net-b", "ep-b", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	waitPeers(t, wa, func(ps []Peer) bool { return len(ps) == 1 })
	before := cs.reads.Load()
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	if n := cs.reads.Load() - before; n != 0 {
		t.Errorf("CreateEndpoint read the config or its peer record %d times with the watch's copy at hand", n)
	}
	// A record a wrote (or its watch saw) is deleted on the index known,
	// without reading it or a's peer record; a record rewritten since is
	// read again and deleted all the same.
	mustEndpoint(t, a, "name-app", "net-a", "ep-a3", "10.1.0.5/24", "", "02:42:0a:01:00:05")
	deadline := time.Now().Add(10 * time.Second)
	for {
		a.mu.Lock()
		_, seen := a.owned[endpointKey("name-app", "ep-a")]
		_, seen3 := a.owned[endpointKey("name-app", "ep-a3")]
		a.mu.Unlock()
		if seen && seen3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a does not know the index of its own records")
		}
		time.Sleep(10 * time.Millisecond)
	}
	before = cs.reads.Load()
	if err := a.DeleteEndpoint(bg(t), "name-app", "ep-a"); err != nil {
		t.Fatal(err)
	}
	if n := cs.reads.Load() - before; n != 0 {
		t.Errorf("DeleteEndpoint read %d times with the watch's index at hand", n)
	}
	if _, err := a.UpdateEndpoint(bg(t), "name-app", "ep-a3", func(e *Endpoint) { e.Sandbox = "x" }); err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteEndpoint(bg(t), "name-app", "ep-a3"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"ep-a", "ep-a3"} {
		if hasKey(t, cs, endpointKey("name-app", id)) {
			t.Fatalf("%s not deleted", id)
		}
	}
	// Another host's record is never deleted on a's word.
	if err := a.DeleteEndpoint(bg(t), "name-app", "ep-b"); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("delete of b's record: %v, want ErrNotOwner", err)
	}
	// a leaves; its watch may not have seen it yet.
	if err := a.Leave(bg(t), "name-app", "net-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.CreateEndpoint(bg(t), Endpoint{ID: "ep-a2", NetworkKey: "name-app", NetworkID: "net-a", IPv4: "10.1.0.4/24", MAC: "02:42:0a:01:00:04"}); !errors.Is(err, ErrNotMember) {
		t.Fatalf("CreateEndpoint after leaving: %v, want ErrNotMember", err)
	}
	if hasKey(t, cs, endpointKey("name-app", "ep-a2")) {
		t.Fatal("endpoint record written after leaving")
	}
}
