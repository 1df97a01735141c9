package cluster

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

func TestEvictHostEmbedded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	runEvict(t, func(t *testing.T) kvstore.Store {
		s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: path, Prefix: "evict/"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	})
}

func TestEvictHostConsul(t *testing.T) {
	agent := testenv.StartConsul(t)
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	prefix := "evict-" + hex.EncodeToString(b) + "/"
	runEvict(t, func(t *testing.T) kvstore.Store {
		s, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: agent.Addr, Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	})
}

func runEvict(t *testing.T, open openFunc) {
	a := newHost(t, open, "id-a", "a", "192.0.2.1")
	b := newHost(t, open, "id-b", "b", "192.0.2.2")
	c := newHost(t, open, "id-c", "c", "192.0.2.3")
	mustJoin(t, a, "name-app", "net-a", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b", spec("10.1.0.0/24"))
	mustJoin(t, b, "name-app", "net-b2", spec("10.1.0.0/24")) // a Docker retry's second ID
	nb := mustJoin(t, b, "name-solo", "net-s", NetworkSpec{Name: "solo", Subnets: prefixes("10.2.0.0/24")})
	mustEndpoint(t, a, "name-app", "net-a", "ep-a", "10.1.0.2/24", "", "02:00:00:00:00:01")
	mustEndpoint(t, b, "name-app", "net-b", "ep-b", "10.1.0.3/24", "", "02:00:00:00:00:02")
	mustEndpoint(t, b, "name-app", "net-b2", "ep-b2", "10.1.0.4/24", "", "02:00:00:00:00:03")
	mustEndpoint(t, b, "name-solo", "net-s", "ep-s", "10.2.0.2/24", "", "02:00:00:00:00:04")
	for _, h := range []*host{a, b} {
		if err := h.PutJoined(bg(t), "ep-"+h.cfg.Node, Joined{NetworkKey: "name-app", Sandbox: "c-" + h.cfg.Node}); err != nil {
			t.Fatal(err)
		}
	}

	if _, err := a.EvictHost(bg(t), "id-a"); err == nil {
		t.Error("a host evicted itself")
	}
	// Two hosts evict B at once.
	var wg sync.WaitGroup
	evs := make([]Evicted, 2)
	errs := make([]error, 2)
	for i, h := range []*host{a, c} {
		wg.Add(1)
		go func() { defer wg.Done(); evs[i], errs[i] = h.EvictHost(bg(t), "id-b") }()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("evictor %d: %v", i, err)
		}
	}
	if evs[0].Node != "b" && evs[1].Node != "b" {
		t.Errorf("evicted %+v", evs)
	}
	n := network(t, a, "name-app")
	if _, ok := n.Hosts["id-b"]; ok || len(n.Hosts) != 1 {
		t.Errorf("app members after evict: %v", n.Hosts)
	}
	got := keys(t, a.store, "")
	want := []string{"networks/name-app/config", "networks/name-app/config/peers/id-a", "networks/name-app/endpoints/ep-a", "vnis/" + fmt.Sprint(n.VNI), "subnets/10.1.0.0_24", "joins/id-a/ep-a"}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("keys after evict:\n got %v\nwant %v", got, want)
	}
	if hasKey(t, a.store, "members/id-b") || hasKey(t, a.store, fmt.Sprintf("vnis/%d", nb.VNI)) {
		t.Error("B's host record or its solo network's VNI is left")
	}
	if !hasKey(t, a.store, "members/id-a") {
		t.Error("A's host record is gone")
	}
	if ok, err := a.HostRecorded(bg(t), "id-b"); ok || err != nil {
		t.Errorf("HostRecorded(id-b) = %v, %v", ok, err)
	}
	// Idempotent.
	ev, err := a.EvictHost(bg(t), "id-b")
	if err != nil || len(ev.Left) != 0 {
		t.Errorf("second evict: %+v, %v", ev, err)
	}
	// The solo network can be created again by anyone, with its subnet.
	mustJoin(t, c, "name-solo", "net-cs", NetworkSpec{Name: "solo", Subnets: prefixes("10.2.0.0/24")})
}

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}
