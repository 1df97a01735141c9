package cluster

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"consul-overlay/kvstore"
)

// openFunc opens a new, independent client of one backing store (one
// Consul agent, one bbolt file), all with the same key prefix, as the
// hosts of one cluster would. Stores are closed when the test ends.
type openFunc func(t *testing.T) kvstore.Store

// newBackend returns an openFunc on a backing store private to test t.
type newBackend func(t *testing.T) openFunc

// runContract is the behaviour the cluster state must have on every store.
func runContract(t *testing.T, backend newBackend) {
	tests := []struct {
		name string
		fn   func(t *testing.T, open openFunc)
	}{
		{"CreateJoinLeave", testCreateJoinLeave},
		{"RaceCreateDifferentSubnets", testRaceCreateDifferentSubnets},
		{"RaceCreateSameSubnets", testRaceCreateSameSubnets},
		{"SameNodeNameDifferentHostIDs", testSameNodeName},
		{"LastLeaverVsJoinerAfterRemove", testLastLeaverVsJoinerAfterRemove},
		{"JoinerCASAfterLastLeaver", testJoinerCASAfterLastLeaver},
		{"IncarnationFencing", testIncarnationFencing},
		{"EndpointOwnership", testEndpointOwnership},
		{"DesiredPeers", testDesiredPeersWatch},
		{"WatchSkipsUnchangedPeers", testWatchSkipsUnchanged},
		{"JoinRecords", testJoinRecords},
		{"CreateEndpointCachedConfig", testCreateEndpointCachedConfig},
		{"SetVTEP", testSetVTEP},
		{"SetVTEPDuringCreate", testSetVTEPDuringCreate},
		{"SeveralNetworkIDs", testSeveralNetworkIDs},
		{"View", testView},
		{"SubnetOverlap", testSubnetOverlap},
		{"PeerRecords", testPeerRecords},
		{"PeerRecordsOlderHost", testPeerRecordsOlderHost},
		{"PeerWatchUnstampedWrite", testPeerWatchUnstampedWrite},
		{"EvictPeerRecord", testEvictPeerRecord},
		{"LargeNetworkPeers", testLargeNetworkPeers},
		{"DeleteWithStaleCache", testDeleteWithStaleCache},
		{"UnreadableConfig", testUnreadableConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.fn(t, backend(t)) })
	}
}

func bg(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// host is one test host: its Cluster and its own store client.
type host struct {
	*Cluster
	store kvstore.Store
}

func newHost(t *testing.T, open openFunc, hostID, node, vtep string) *host {
	t.Helper()
	s := open(t)
	c, err := New(Config{HostID: hostID, Node: node, VTEP: netip.MustParseAddr(vtep)}, s)
	if err != nil {
		t.Fatal(err)
	}
	return &host{Cluster: c, store: s}
}

func spec(subnet string) NetworkSpec {
	p := netip.MustParsePrefix(subnet)
	gw := netip.PrefixFrom(p.Addr().Next(), p.Bits())
	return NetworkSpec{Name: "app", Subnets: []netip.Prefix{p}, Gateways: []netip.Prefix{gw}, Spaces: []string{"ours"}}
}

func mustJoin(t *testing.T, h *host, key, id string, s NetworkSpec) Network {
	t.Helper()
	n, err := h.Join(bg(t), key, id, s)
	if err != nil {
		t.Fatalf("%s: Join(%s, %s): %v", h.HostID(), key, id, err)
	}
	return n
}

func mustLeave(t *testing.T, h *host, key, id string) {
	t.Helper()
	if err := h.Leave(bg(t), key, id); err != nil {
		t.Fatalf("%s: Leave(%s, %s): %v", h.HostID(), key, id, err)
	}
}

func mustEndpoint(t *testing.T, h *host, key, netID, id, v4, v6, mac string) Endpoint {
	t.Helper()
	ep, err := h.CreateEndpoint(bg(t), Endpoint{ID: id, NetworkKey: key, NetworkID: netID, IPv4: v4, IPv6: v6, MAC: mac})
	if err != nil {
		t.Fatalf("%s: CreateEndpoint(%s): %v", h.HostID(), id, err)
	}
	return ep
}

// keys lists the store's keys but the host records.
func keys(t *testing.T, s kvstore.Store, prefix string) []string {
	t.Helper()
	ps, err := s.List(bg(t), prefix)
	if err != nil {
		t.Fatal(err)
	}
	checkStamps(t, ps)
	var out []string
	for _, p := range ps {
		if IsStamp(p.Key) {
			continue
		}
		if !strings.HasPrefix(p.Key, "hosts/") && !strings.HasPrefix(p.Key, "members/") {
			out = append(out, p.Key)
		}
	}
	return out
}

// checkStamps fails on what StampErrors finds in ps (a List).
func checkStamps(t *testing.T, ps []*kvstore.Pair) {
	t.Helper()
	for _, e := range StampErrors(ps) {
		t.Error(e)
	}
}

func network(t *testing.T, h *host, key string) Network {
	t.Helper()
	n, err := h.Network(bg(t), key)
	if err != nil {
		t.Fatalf("read network %s: %v", key, err)
	}
	return n
}

func hasKey(t *testing.T, s kvstore.Store, key string) bool {
	t.Helper()
	_, err := s.Get(bg(t), key)
	if err != nil && !errors.Is(err, kvstore.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

func testCreateJoinLeave(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	na := mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	if na.VNI < 4096 || na.Incarnation == "" || len(na.Hosts) != 1 {
		t.Fatalf("created %+v: want a VNI from 4096, an incarnation and one member", na)
	}
	// Replay: same record, nothing new.
	if again := mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24")); again.Incarnation != na.Incarnation || len(again.Hosts) != 1 {
		t.Fatalf("replayed Join gave %+v", again)
	}
	nb := mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	if nb.VNI != na.VNI || nb.Incarnation != na.Incarnation || len(nb.Hosts) != 2 {
		t.Fatalf("joined %+v, want vni %d, incarnation %s and two members", nb, na.VNI, na.Incarnation)
	}
	if m, ok := nb.Member("id-b"); !ok || m.Node != "b" || m.VTEP != "192.0.2.2" || !slices.Equal(m.NetworkIDs, []string{"net-b"}) {
		t.Fatalf("b's membership %+v", m)
	}
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	mustEndpoint(t, b, "name-app", "net-b", "ep-b", "10.1.0.3/24", "", "02:42:0a:01:00:03")

	mustLeave(t, b, "name-app", "net-b")
	if n := network(t, a, "name-app"); len(n.Hosts) != 1 {
		t.Fatalf("after b left: %+v", n.Hosts)
	}
	if hasKey(t, a.store, endpointKey("name-app", "ep-b")) {
		t.Fatal("b's endpoint record outlived b's membership")
	}
	if !hasKey(t, a.store, endpointKey("name-app", "ep-a")) {
		t.Fatal("b's leave removed a's endpoint record")
	}
	mustLeave(t, b, "name-app", "net-b") // idempotent
	mustLeave(t, a, "name-app", "net-a")
	if k := keys(t, a.store, ""); len(k) != 0 {
		t.Fatalf("keys left after the last host left: %v", k)
	}
	mustLeave(t, a, "name-app", "net-a")
}

func testRaceCreateDifferentSubnets(t *testing.T, open openFunc) {
	for round := 0; round < 5; round++ {
		a := newHost(t, open, "id-a", "a", "192.0.2.1")
		b := newHost(t, open, "id-b", "b", "192.0.2.2")
		var wg sync.WaitGroup
		start := make(chan struct{})
		errs := make([]error, 2)
		for i, h := range []*host{a, b} {
			subnet := []string{"10.1.0.0/24", "10.2.0.0/24"}[i]
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				_, errs[i] = h.Join(bg(t), "name-app", "net", spec(subnet))
			}()
		}
		close(start)
		wg.Wait()
		ok := 0
		for _, err := range errs {
			switch {
			case err == nil:
				ok++
			case errors.Is(err, ErrIncompatible) && strings.Contains(err.Error(), "already exists with subnet"):
			default:
				t.Fatalf("round %d: error %v, want success or a clear ErrIncompatible", round, err)
			}
		}
		if ok != 1 {
			t.Fatalf("round %d: %d hosts succeeded (%v), want exactly one", round, ok, errs)
		}
		n := network(t, a, "name-app")
		if len(n.Hosts) != 1 {
			t.Fatalf("round %d: members %v", round, n.Hosts)
		}
		if k := keys(t, a.store, "subnets/"); len(k) != 1 {
			t.Fatalf("round %d: subnet reservations %v, want the winner's only", round, k)
		}
		for id := range n.Hosts {
			h := map[string]*host{"id-a": a, "id-b": b}[id]
			mustLeave(t, h, "name-app", "net")
		}
		if k := keys(t, a.store, ""); len(k) != 0 {
			t.Fatalf("round %d: keys left %v", round, k)
		}
	}
}

func testRaceCreateSameSubnets(t *testing.T, open openFunc) {
	hosts := []*host{
		newHost(t, open, "id-a", "a", "192.0.2.1"),
		newHost(t, open, "id-b", "b", "192.0.2.2"),
		newHost(t, open, "id-c", "c", "192.0.2.3"),
	}
	var wg sync.WaitGroup
	start := make(chan struct{})
	got := make([]Network, len(hosts))
	errs := make([]error, len(hosts))
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			got[i], errs[i] = h.Join(bg(t), "name-app", "net", spec("10.1.0.0/24"))
		}()
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("host %d: %v", i, err)
		}
		if got[i].Incarnation != got[0].Incarnation || got[i].VNI != got[0].VNI {
			t.Fatalf("hosts disagree: %+v vs %+v", got[i], got[0])
		}
	}
	if n := network(t, hosts[0], "name-app"); len(n.Hosts) != 3 {
		t.Fatalf("members %v, want 3", n.Hosts)
	}
	if k := keys(t, hosts[0].store, "vnis/"); len(k) != 1 {
		t.Fatalf("vni reservations %v, want one", k)
	}
}

func testSameNodeName(t *testing.T, open openFunc) {
	// Two hosts behind one shared Consul agent: same node name.
	a1 := newHost(t, open, "id-1", "shared-agent", "192.0.2.1")
	a2 := newHost(t, open, "id-2", "shared-agent", "192.0.2.2")
	n := mustJoin(t, a1, "name-app", "net-1", spec("10.1.0.0/24"))
	mustJoin(t, a2, "name-app", "net-2", spec("10.1.0.0/24"))
	if n2 := network(t, a1, "name-app"); len(n2.Hosts) != 2 {
		t.Fatalf("members %v: two hosts with one node name must be two members", n2.Hosts)
	}
	mustEndpoint(t, a1, "name-app", "net-1", "ep-1", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	mustEndpoint(t, a2, "name-app", "net-2", "ep-2", "10.1.0.3/24", "", "02:42:0a:01:00:03")

	v1, err := a1.View(bg(t))
	if err != nil {
		t.Fatal(err)
	}
	if p := v1.Peers["name-app"]; len(p) != 1 || p[0].EndpointID != "ep-2" || p[0].VTEP != netip.MustParseAddr("192.0.2.2") {
		t.Fatalf("host 1's peers %+v, want host 2's endpoint", p)
	}
	if len(v1.Endpoints) != 1 || v1.Endpoints[0].ID != "ep-1" {
		t.Fatalf("host 1's endpoints %+v", v1.Endpoints)
	}
	// Host 2's network rm keeps host 1's records and the VNI.
	mustLeave(t, a2, "name-app", "net-2")
	if !hasKey(t, a1.store, endpointKey("name-app", "ep-1")) {
		t.Fatal("host 2's leave removed host 1's endpoint record")
	}
	if hasKey(t, a1.store, endpointKey("name-app", "ep-2")) {
		t.Fatal("host 2's endpoint record outlived its membership")
	}
	if !hasKey(t, a1.store, vniKey(n.VNI)) {
		t.Fatal("vni released while host 1 is still a member")
	}
	// The VNI is not handed to another network.
	other := newHost(t, open, "id-3", "other", "192.0.2.3")
	o := mustJoin(t, other, "name-db", "net-3", NetworkSpec{Name: "db", Subnets: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/24")}})
	if o.VNI == n.VNI {
		t.Fatalf("vni %d handed to a second network", n.VNI)
	}
	// Host 2 cannot delete host 1's endpoint record.
	if err := a2.DeleteEndpoint(bg(t), "name-app", "ep-1"); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("DeleteEndpoint of another host's record: %v, want ErrNotOwner", err)
	}
}

// testLastLeaverVsJoinerAfterRemove: the last host removes the network; a
// host re-creates it and records an endpoint before the leaver sweeps the
// old incarnation's records. The joiner's record stays.
func testLastLeaverVsJoinerAfterRemove(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	old := mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	var fresh Network
	a.hook = func(point string) {
		if point != "leave/after-remove" {
			return
		}
		fresh = mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
		mustEndpoint(t, b, "name-app", "net-b", "ep-b", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	}
	mustLeave(t, a, "name-app", "net-a")
	a.hook = nil
	if fresh.Incarnation == "" || fresh.Incarnation == old.Incarnation {
		t.Fatalf("re-created network has incarnation %q, old %q: want a new one", fresh.Incarnation, old.Incarnation)
	}
	ep, _, err := b.getEndpoint(bg(t), "name-app", "ep-b")
	if err != nil {
		t.Fatalf("joiner's endpoint record: %v (the last leaver deleted it)", err)
	}
	if ep.Incarnation != fresh.Incarnation {
		t.Fatalf("joiner's record of incarnation %q, want %q", ep.Incarnation, fresh.Incarnation)
	}
	n := network(t, b, "name-app")
	if _, ok := n.Member("id-b"); !ok || len(n.Hosts) != 1 {
		t.Fatalf("members %v, want b only", n.Hosts)
	}
	if !hasKey(t, b.store, vniKey(n.VNI)) {
		t.Fatal("the re-created network's vni is not reserved")
	}
}

// testJoinerCASAfterLastLeaver: a host reads the config, the last member
// removes the network, and the joiner's CAS fails: it re-creates the
// network with a new incarnation and keeps its records.
func testJoinerCASAfterLastLeaver(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	old := mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	once := false
	b.hook = func(point string) {
		if point != "join/before-cas" || once {
			return
		}
		once = true
		mustLeave(t, a, "name-app", "net-a")
	}
	n := mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	b.hook = nil
	if !once {
		t.Fatal("hook did not run")
	}
	if n.Incarnation == old.Incarnation || len(n.Hosts) != 1 {
		t.Fatalf("joined %+v: want a new incarnation with b alone", n)
	}
	mustEndpoint(t, b, "name-app", "net-b", "ep-b", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	if hasKey(t, b.store, endpointKey("name-app", "ep-a")) {
		t.Fatal("a's record of the removed incarnation is left")
	}
	mustLeave(t, b, "name-app", "net-b")
	if k := keys(t, b.store, ""); len(k) != 0 {
		t.Fatalf("keys left: %v", k)
	}
}

func testIncarnationFencing(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	n := mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	// A record of an earlier incarnation, as a crash between the last
	// leaver's two steps leaves it, by a member host.
	stale := Endpoint{ID: "ep-stale", NetworkKey: "name-app", Incarnation: "earlier", NetworkID: "net-a", HostID: "id-a", Node: "a", VTEP: "192.0.2.1", IPv4: "10.1.0.9/24", MAC: "02:42:0a:01:00:09"}
	val, err := kvstore.Encode(stale)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.store.Create(bg(t), endpointKey("name-app", "ep-stale"), val); err != nil {
		t.Fatal(err)
	}
	eps, err := b.Endpoints(bg(t), "name-app")
	if err != nil {
		t.Fatal(err)
	}
	peers := DesiredPeers("id-b", network(t, b, "name-app"), eps)
	if len(peers) != 1 || peers[0].EndpointID != "ep-a" {
		t.Fatalf("b's desired peers %+v, want ep-a only (not the stale record)", peers)
	}
	// A host that is not a member records no endpoint.
	c := newHost(t, open, "id-c", "c", "192.0.2.3")
	if _, err := c.CreateEndpoint(bg(t), Endpoint{ID: "ep-c", NetworkKey: "name-app", NetworkID: "net-c", IPv4: "10.1.0.4/24", MAC: "02:42:0a:01:00:04"}); !errors.Is(err, ErrNotMember) {
		t.Fatalf("CreateEndpoint by a non-member: %v, want ErrNotMember", err)
	}
	// Nor under a Docker network it has not bound.
	if _, err := a.CreateEndpoint(bg(t), Endpoint{ID: "ep-x", NetworkKey: "name-app", NetworkID: "net-other", IPv4: "10.1.0.5/24", MAC: "02:42:0a:01:00:05"}); !errors.Is(err, ErrNotMember) {
		t.Fatalf("CreateEndpoint under an unbound NetworkID: %v, want ErrNotMember", err)
	}
	// The last leaver removes the records of its incarnation and the
	// stale ones it can prove stale; nothing is left.
	mustLeave(t, b, "name-app", "net-b")
	mustLeave(t, a, "name-app", "net-a")
	if k := keys(t, a.store, ""); len(k) != 0 {
		t.Fatalf("keys left: %v", k)
	}
	_ = n
}

func testEndpointOwnership(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	ep := mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "fd00::2/64", "02:42:0a:01:00:02")
	if ep.HostID != "id-a" || ep.Node != "a" || ep.VTEP != "192.0.2.1" || ep.Incarnation == "" {
		t.Fatalf("recorded %+v", ep)
	}
	// Replay (Docker's retry after a crash once the record was written).
	again := mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "fd00::2/64", "02:42:0a:01:00:02")
	if !again.Created.Equal(ep.Created) {
		t.Fatalf("replay rewrote the record: %+v", again)
	}
	// Same ID, other addresses or another host: refused.
	if _, err := a.CreateEndpoint(bg(t), Endpoint{ID: "ep-a", NetworkKey: "name-app", NetworkID: "net-a", IPv4: "10.1.0.7/24", MAC: "02:42:0a:01:00:07"}); !errors.Is(err, ErrExists) {
		t.Fatalf("CreateEndpoint with other addresses: %v, want ErrExists", err)
	}
	if _, err := b.CreateEndpoint(bg(t), Endpoint{ID: "ep-a", NetworkKey: "name-app", NetworkID: "net-b", IPv4: "10.1.0.2/24", IPv6: "fd00::2/64", MAC: "02:42:0a:01:00:02"}); !errors.Is(err, ErrExists) {
		t.Fatalf("CreateEndpoint of a's ID by b: %v, want ErrExists", err)
	}
	if err := b.DeleteEndpoint(bg(t), "name-app", "ep-a"); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("b deleting a's record: %v, want ErrNotOwner", err)
	}
	if _, err := b.UpdateEndpoint(bg(t), "name-app", "ep-a", func(e *Endpoint) { e.Sandbox = "x" }); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("b updating a's record: %v, want ErrNotOwner", err)
	}
	up, err := a.UpdateEndpoint(bg(t), "name-app", "ep-a", func(e *Endpoint) { e.Sandbox = "ctr" })
	if err != nil || up.Sandbox != "ctr" {
		t.Fatalf("UpdateEndpoint: %+v, %v", up, err)
	}
	for i := 0; i < 2; i++ { // idempotent
		if err := a.DeleteEndpoint(bg(t), "name-app", "ep-a"); err != nil {
			t.Fatalf("DeleteEndpoint %d: %v", i, err)
		}
	}
	if hasKey(t, a.store, endpointKey("name-app", "ep-a")) {
		t.Fatal("record left")
	}
}

func waitPeers(t *testing.T, ch <-chan []Peer, cond func([]Peer) bool) []Peer {
	t.Helper()
	timeout := time.After(10 * time.Second)
	var last []Peer
	for {
		select {
		case ps, ok := <-ch:
			if !ok {
				t.Fatal("watch ended")
			}
			last = ps
			if cond(ps) {
				return ps
			}
		case <-timeout:
			t.Fatalf("peers never met the condition; last %+v", last)
		}
	}
}

func testDesiredPeersWatch(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	ctx, cancel := context.WithCancel(bg(t))
	defer cancel()
	wa, err := a.WatchPeers(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	wb, err := b.WatchPeers(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 0 })
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "fd00::2/64", "02:42:0a:01:00:02")
	ps := waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 2 })
	for _, p := range ps {
		if p.EndpointID != "ep-a" || p.HostID != "id-a" || p.VTEP != netip.MustParseAddr("192.0.2.1") || p.MAC.String() != "02:42:0a:01:00:02" {
			t.Fatalf("peer %+v", p)
		}
	}
	if ps[0].IP != netip.MustParseAddr("10.1.0.2") || ps[1].IP != netip.MustParseAddr("fd00::2") {
		t.Fatalf("peer addresses %v %v", ps[0].IP, ps[1].IP)
	}
	// a never sees its own endpoint.
	waitPeers(t, wa, func(ps []Peer) bool { return len(ps) == 0 })
	if v, err := a.View(bg(t)); err != nil || len(v.Peers["name-app"]) != 0 {
		t.Fatalf("a's own endpoint among its peers: %+v, %v", v.Peers, err)
	}
	if v, err := b.View(bg(t)); err != nil || len(v.Peers["name-app"]) != 2 {
		t.Fatalf("b's view peers %+v, %v; want a's two addresses", v.Peers, err)
	}
	if err := a.DeleteEndpoint(bg(t), "name-app", "ep-a"); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 0 })
	cancel()
	for range wb { // closes when ctx ends
	}
}

func testSetVTEP(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	ctx, cancel := context.WithCancel(bg(t))
	defer cancel()
	wb, err := b.WatchPeers(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 1 && ps[0].VTEP == netip.MustParseAddr("192.0.2.1") })
	newAddr := netip.MustParseAddr("192.0.2.11")
	if err := a.SetVTEP(bg(t), newAddr); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 1 && ps[0].VTEP == newAddr })
	if m, _ := network(t, a, "name-app").Member("id-a"); m.VTEP != newAddr.String() {
		t.Fatalf("membership vtep %s, want %s", m.VTEP, newAddr)
	}
	if m, _ := network(t, a, "name-app").Member("id-b"); m.VTEP != "192.0.2.2" {
		t.Fatalf("b's membership changed: %+v", m)
	}
	// New records carry the new address.
	if ep := mustEndpoint(t, a, "name-app", "net-a", "ep-a2", "10.1.0.4/24", "", "02:42:0a:01:00:04"); ep.VTEP != newAddr.String() {
		t.Fatalf("new record vtep %s", ep.VTEP)
	}
	p, err := a.store.Get(bg(t), hostKey("id-a"))
	if err != nil {
		t.Fatal(err)
	}
	var h Host
	if err := kvstore.Decode(p.Value, &h); err != nil || h.VTEP != newAddr.String() {
		t.Fatalf("host record %+v, %v", h, err)
	}
	// Again: nothing to do.
	if err := a.SetVTEP(bg(t), newAddr); err != nil {
		t.Fatal(err)
	}
}

// txnGate holds the first transaction that creates key until release is
// closed, after closing held.
type txnGate struct {
	kvstore.Store
	key     string
	once    sync.Once
	held    chan struct{}
	release chan struct{}
}

func (g *txnGate) TxnIndex(ctx context.Context, ops []kvstore.Op) (uint64, error) {
	for _, op := range ops {
		if op.Verb == kvstore.OpCreate && op.Key == g.key {
			g.once.Do(func() {
				close(g.held)
				<-g.release
			})
		}
	}
	return kvstore.TxnIndex(ctx, g.Store, ops)
}

// testSetVTEPDuringCreate: a CreateEndpoint that read the old VTEP is
// still writing when SetVTEP runs. Both records end with the new VTEP:
// before, SetVTEP rewrote the peer record under the create, whose retry
// then wrote the old VTEP back into it and into the new endpoint record,
// and the other hosts sent this host's traffic to an address it no longer
// has.
func testSetVTEPDuringCreate(t *testing.T, open openFunc) {
	g := &txnGate{Store: open(t), key: endpointKey("name-app", "ep-2"), held: make(chan struct{}), release: make(chan struct{})}
	c, err := New(Config{HostID: "id-a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1")}, g)
	if err != nil {
		t.Fatal(err)
	}
	a := &host{Cluster: c, store: g}
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustEndpoint(t, a, "name-app", "net-a", "ep-1", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	created := make(chan error, 1)
	go func() {
		_, err := a.CreateEndpoint(bg(t), Endpoint{ID: "ep-2", NetworkKey: "name-app", NetworkID: "net-a", IPv4: "10.1.0.3/24", MAC: "02:42:0a:01:00:03"})
		created <- err
	}()
	<-g.held
	newAddr := netip.MustParseAddr("192.0.2.11")
	set := make(chan error, 1)
	go func() { set <- a.SetVTEP(bg(t), newAddr) }()
	// SetVTEP finishes first (before) or waits for the create (now).
	select {
	case err := <-set:
		set <- err
	case <-time.After(300 * time.Millisecond):
	}
	close(g.release)
	if err := <-created; err != nil {
		t.Fatal(err)
	}
	if err := <-set; err != nil {
		t.Fatal(err)
	}
	if r, _ := peerRecord(t, g, "name-app", "id-a"); r.VTEP != newAddr.String() || !r.lists("ep-2") {
		t.Errorf("peer record after SetVTEP raced CreateEndpoint: vtep %s, endpoints %v; want %s and ep-2 listed", r.VTEP, r.Endpoints, newAddr)
	}
	for _, id := range []string{"ep-1", "ep-2"} {
		ep, _, err := a.getEndpoint(bg(t), "name-app", id)
		if err != nil || ep.VTEP != newAddr.String() {
			t.Errorf("endpoint record %s: vtep %s (%v), want %s", id, ep.VTEP, err, newAddr)
		}
	}
}

func testSeveralNetworkIDs(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	// The first CreateNetwork's answer was lost in a crash; Docker retries
	// under a new ID.
	n1 := mustJoin(t, a, "name-app", "net-1", spec("10.1.0.0/24"))
	n2 := mustJoin(t, a, "name-app", "net-2", spec("10.1.0.0/24"))
	if n2.Incarnation != n1.Incarnation {
		t.Fatal("second ID re-created the network")
	}
	if m, _ := n2.Member("id-a"); !slices.Equal(m.NetworkIDs, []string{"net-1", "net-2"}) {
		t.Fatalf("membership %+v", m)
	}
	mustEndpoint(t, a, "name-app", "net-1", "ep-1", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	mustEndpoint(t, a, "name-app", "net-2", "ep-2", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	mustLeave(t, a, "name-app", "net-1")
	n := network(t, a, "name-app")
	if m, ok := n.Member("id-a"); !ok || !slices.Equal(m.NetworkIDs, []string{"net-2"}) {
		t.Fatalf("after leaving net-1: %+v", n.Hosts)
	}
	if hasKey(t, a.store, endpointKey("name-app", "ep-1")) || !hasKey(t, a.store, endpointKey("name-app", "ep-2")) {
		t.Fatalf("records after leaving net-1: %v", keys(t, a.store, "networks/"))
	}
	mustLeave(t, a, "name-app", "net-2")
	if k := keys(t, a.store, ""); len(k) != 0 {
		t.Fatalf("keys left: %v", k)
	}
}

func testView(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	v, err := a.View(bg(t))
	if err != nil {
		t.Fatal(err)
	}
	if v.Proven || len(v.Networks) != 0 {
		t.Fatalf("fresh host's view %+v: want unproven and empty", v)
	}
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	mustEndpoint(t, b, "name-app", "net-b", "ep-b", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	// An orphan record of a (in a network it is not a member of), as a
	// crash could leave it.
	orphan := Endpoint{ID: "ep-orphan", NetworkKey: "name-gone", Incarnation: "x", NetworkID: "net-gone", HostID: "id-a", IPv4: "10.8.0.2/24", MAC: "02:42:0a:08:00:02", VTEP: "192.0.2.1"}
	val, _ := kvstore.Encode(orphan)
	if err := a.store.Create(bg(t), endpointKey("name-gone", "ep-orphan"), val); err != nil {
		t.Fatal(err)
	}
	v, err = a.View(bg(t))
	if err != nil {
		t.Fatal(err)
	}
	if !v.Proven || len(v.Networks) != 1 || len(v.Endpoints) != 1 || v.Endpoints[0].ID != "ep-a" {
		t.Fatalf("view %+v", v)
	}
	if p := v.Peers["name-app"]; len(p) != 1 || p[0].EndpointID != "ep-b" {
		t.Fatalf("view peers %+v", p)
	}
	// Right peer records are left alone: a restart writes none.
	before, err := b.store.Get(bg(t), peerRecordKey("name-app", "id-b"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.View(bg(t)); err != nil {
		t.Fatal(err)
	}
	if after, err := b.store.Get(bg(t), peerRecordKey("name-app", "id-b")); err != nil || after.ModifyIndex != before.ModifyIndex {
		t.Fatalf("view rewrote a right peer record: %v, %v", after, err)
	}
	if hasKey(t, a.store, endpointKey("name-gone", "ep-orphan")) {
		t.Fatal("orphan record of this host kept")
	}
	// After leaving everything the host record still proves the view.
	mustLeave(t, a, "name-app", "net-a")
	if v, err = a.View(bg(t)); err != nil || !v.Proven || len(v.Networks) != 0 {
		t.Fatalf("view after leaving: %+v, %v", v, err)
	}
	// Another identity on the same store is not proven.
	c := newHost(t, open, "id-c", "a", "192.0.2.1")
	if v, err = c.View(bg(t)); err != nil || v.Proven {
		t.Fatalf("another identity's view %+v, %v: want unproven", v, err)
	}
}

func testSubnetOverlap(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/16"))
	s := spec("10.1.2.0/24")
	s.Name = "db"
	_, err := a.Join(bg(t), "name-db", "net-db", s)
	if !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "overlaps") {
		t.Fatalf("overlapping subnet: %v", err)
	}
	s = spec("10.2.0.0/24")
	s.Name, s.VNI = "db", network(t, a, "name-app").VNI
	if _, err := a.Join(bg(t), "name-db", "net-db", s); !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "vni") {
		t.Fatalf("taken vni: %v", err)
	}
	if k := keys(t, a.store, "networks/"); !slices.Equal(k, []string{configKey("name-app"), peerRecordKey("name-app", "id-a")}) {
		t.Fatalf("refused requests left keys: %v", k)
	}
}

// testUnreadableConfig: a network record this build cannot read (a newer
// release's schema, or damage) is not a removed network: a running watch
// keeps the peers the last readable record gave, delivering no empty
// list, and View refuses (the restart keeps its state and retries)
// instead of removing this host's records of it.
func testUnreadableConfig(t *testing.T, open openFunc) {
	a, b, wb := twoHostsWatching(t, open)
	mustEndpoint(t, b, "name-app", "net-b", "ep-b", "10.1.0.3/24", "", "02:42:0a:01:00:03")
	newer := []byte(`{"schema":2,"data":{}}`)
	if err := a.store.Put(bg(t), configKey("name-app"), newer); err != nil {
		t.Fatal(err)
	}
	// The watch sees the record change: nothing it delivers may be empty.
	select {
	case ps := <-wb:
		if len(ps) == 0 {
			t.Fatal("the watch withdrew every peer on an unreadable network record")
		}
	case <-time.After(2 * time.Second):
	}
	if _, err := b.View(bg(t)); err == nil || !errors.Is(err, kvstore.ErrSchema) {
		t.Fatalf("View with an unreadable network record: %v, want ErrSchema", err)
	}
	if !hasKey(t, b.store, endpointKey("name-app", "ep-b")) {
		t.Fatal("b's endpoint record was removed")
	}
	// The record removed after it was unreadable: the network is gone,
	// and its peers with it.
	if err := a.store.Delete(bg(t), configKey("name-app")); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 0 })
}

// twoHostsWatching: hosts a and b in network name-app, a with endpoint
// ep-a, and b's peer watch of it once it has delivered that one peer; the
// watch ends with the test.
func twoHostsWatching(t *testing.T, open openFunc) (a, b *host, wb <-chan []Peer) {
	t.Helper()
	a = newHost(t, open, "id-a", "a", "192.0.2.1")
	b = newHost(t, open, "id-b", "b", "192.0.2.2")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "", "02:42:0a:01:00:02")
	ctx, cancel := context.WithCancel(bg(t))
	t.Cleanup(cancel)
	wb, err := b.WatchPeers(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	waitPeers(t, wb, func(ps []Peer) bool { return len(ps) == 1 })
	return a, b, wb
}
