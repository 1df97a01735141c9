package status

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"consul-overlay/cluster"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

const (
	self  = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	other = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	third = "cccccccccccccccccccccccccccccccc"
)

func put(t *testing.T, s kvstore.Store, key string, v any) {
	t.Helper()
	b, err := kvstore.Encode(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put(context.Background(), key, b); err != nil {
		t.Fatal(err)
	}
}

// fixture: network "app" (vni 4096) with members self and other, one
// endpoint each, and network "solo" of the third host only.
func fixture(t *testing.T) kvstore.Store {
	t.Helper()
	s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: filepath.Join(t.TempDir(), "state.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	put(t, s, "networks/name-app/config", cluster.Network{
		Key: "name-app", Name: "app", Incarnation: "inc1", VNI: 4096, Subnets: []string{"10.1.0.0/24"},
		Options: map[string]string{"name": "app", "egress": "host", "consul_api": "true"},
		Hosts:   map[string]cluster.Member{self: {Node: "one", VTEP: "192.0.2.1"}, other: {Node: "two", VTEP: "192.0.2.2"}},
	})
	put(t, s, "networks/name-app/endpoints/e1", cluster.Endpoint{ID: "e1aaaaaaaaaa", NetworkKey: "name-app", Incarnation: "inc1", HostID: self, Node: "one", VTEP: "192.0.2.1", IPv4: "10.1.0.2/24", MAC: "02:42:0a:01:00:02", Sandbox: "x"})
	put(t, s, "networks/name-app/endpoints/e2", cluster.Endpoint{ID: "e2bbbbbbbbbb", NetworkKey: "name-app", Incarnation: "inc1", HostID: other, Node: "two", VTEP: "192.0.2.2", IPv4: "10.1.0.3/24", MAC: "02:42:0a:01:00:03"})
	// e2's join is in a join record (the record itself no longer says).
	put(t, s, "joins/"+other+"/e2bbbbbbbbbb", cluster.Joined{NetworkKey: "name-app", Sandbox: "y"})
	// A record of an old incarnation: neither counted nor a peer.
	put(t, s, "networks/name-app/endpoints/e9", cluster.Endpoint{ID: "e9cccccccccc", NetworkKey: "name-app", Incarnation: "old", HostID: other, Node: "two", VTEP: "192.0.2.2", IPv4: "10.1.0.9/24", MAC: "02:42:0a:01:00:09"})
	put(t, s, "networks/name-solo/config", cluster.Network{
		Key: "name-solo", Name: "solo", Incarnation: "inc2", VNI: 4097, Subnets: []string{"10.2.0.0/24"},
		Options: map[string]string{"name": "solo", cluster.OptionEgressDefault: "auto"},
		Hosts:   map[string]cluster.Member{third: {Node: "three", VTEP: "192.0.2.3"}},
	})
	put(t, s, "members/"+self, cluster.Host{HostID: self, Node: "one", VTEP: "192.0.2.1"})
	put(t, s, "hosts/"+other, hostRecord{ID: other, Node: "two", VTEP: "192.0.2.2", PID: 7})
	return s
}

// matching is the kernel state the fixture implies on host self.
func matching() []vxlan.KernelNetwork {
	return []vxlan.KernelNetwork{{
		VNI: 4096, VXLAN: "vx-001000", Bridge: "vxbr-001000", MTU: 1450, Up: true,
		Ports:      []string{"vxh-e1aaaaaaaa"},
		Neighbours: []vxlan.NeighEntry{{IP: netip.MustParseAddr("10.1.0.3"), MAC: "02:42:0a:01:00:03"}},
		FDB: []vxlan.FDBEntry{
			{MAC: vxlan.FloodMAC, VTEP: netip.MustParseAddr("192.0.2.2")},
			{MAC: "02:42:0a:01:00:03", VTEP: netip.MustParseAddr("192.0.2.2")},
		},
	}}
}

func collect(t *testing.T, s kvstore.Store, k []vxlan.KernelNetwork) *Report {
	t.Helper()
	r, err := Collect(context.Background(), Config{
		Store: s, StoreKind: "embedded", HostID: self, VTEP: netip.MustParseAddr("192.0.2.1"),
		Kernel: func() ([]vxlan.KernelNetwork, error) { return k, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestCollectMatching(t *testing.T) {
	r := collect(t, fixture(t), matching())
	if len(r.Drift) != 0 || len(r.Errors) != 0 || !r.Store.Reachable {
		t.Fatalf("drift %v, errors %v, store %+v", r.Drift, r.Errors, r.Store)
	}
	if r.Host.Node != "one" {
		t.Errorf("node %q, want the one of this host's member record", r.Host.Node)
	}
	if len(r.Networks) != 2 {
		t.Fatalf("networks %+v", r.Networks)
	}
	app, solo := r.Networks[0], r.Networks[1]
	if app.Key != "name-app" || !app.Member || app.LocalEndpoints != 1 || app.RemoteEndpoints != 1 || len(app.Endpoints) != 2 ||
		!slices.Equal(app.Hosts, []string{"one", "two"}) || app.KernelMTU != 1450 || app.Egress != "host" {
		t.Errorf("app: %+v", app)
	}
	for _, ep := range app.Endpoints {
		if !ep.Joined {
			t.Errorf("endpoint %s not shown joined (its record or its join record says it is)", ep.ID)
		}
	}
	if solo.Member || solo.LocalEndpoints != 0 || !slices.Equal(solo.Hosts, []string{"three"}) || solo.Egress != "auto" {
		t.Errorf("solo: %+v", solo)
	}
	var nodes []string
	for _, h := range r.Hosts {
		nodes = append(nodes, h.Node)
	}
	if !slices.Equal(nodes, []string{"one", "three", "two"}) || !r.Hosts[0].Self || r.Hosts[2].PID != 7 || r.Hosts[2].Alive {
		t.Errorf("hosts %+v", r.Hosts)
	}
	var b bytes.Buffer
	if err := WriteText(&b, r); err != nil || !strings.Contains(b.String(), "Drift: none") ||
		!strings.Contains(b.String(), "    settings: consul_api=true, egress=host\n") ||
		!strings.Contains(b.String(), "    settings: egress=auto (default)\n") {
		t.Errorf("text output (%v):\n%s", err, b.String())
	}
	t.Logf("text output:\n%s", b.String())
	b.Reset()
	if err := WriteJSON(&b, r); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b.Bytes(), &back); err != nil || len(back.Networks) != 2 {
		t.Errorf("JSON round trip: %v\n%s", err, b.String())
	}
}

func TestCollectDrift(t *testing.T) {
	s := fixture(t)
	mod := func(f func(k *vxlan.KernelNetwork)) []vxlan.KernelNetwork {
		k := matching()
		f(&k[0])
		return k
	}
	for _, c := range []struct {
		name   string
		kernel []vxlan.KernelNetwork
		want   []Drift
	}{
		{"neighbour missing", mod(func(k *vxlan.KernelNetwork) { k.Neighbours = nil }),
			[]Drift{{Network: "name-app", VNI: 4096, Device: "vx-001000", Kind: "neighbour", Entry: "10.1.0.3", Problem: "missing", Want: "02:42:0a:01:00:03"}}},
		{"neighbour wrong", mod(func(k *vxlan.KernelNetwork) { k.Neighbours[0].MAC = "02:00:00:00:00:01" }),
			[]Drift{{Network: "name-app", VNI: 4096, Device: "vx-001000", Kind: "neighbour", Entry: "10.1.0.3", Problem: "wrong", Want: "02:42:0a:01:00:03", Have: "02:00:00:00:00:01"}}},
		{"neighbour unexpected", mod(func(k *vxlan.KernelNetwork) {
			k.Neighbours = append(k.Neighbours, vxlan.NeighEntry{IP: netip.MustParseAddr("10.1.0.9"), MAC: "02:42:0a:01:00:09"})
		}),
			[]Drift{{Network: "name-app", VNI: 4096, Device: "vx-001000", Kind: "neighbour", Entry: "10.1.0.9", Problem: "unexpected", Have: "02:42:0a:01:00:09"}}},
		{"fdb wrong vtep", mod(func(k *vxlan.KernelNetwork) { k.FDB[1].VTEP = netip.MustParseAddr("192.0.2.9") }),
			[]Drift{{Network: "name-app", VNI: 4096, Device: "vx-001000", Kind: "fdb", Entry: "02:42:0a:01:00:03", Problem: "wrong", Want: "192.0.2.2", Have: "192.0.2.9"}}},
		{"flood missing", mod(func(k *vxlan.KernelNetwork) { k.FDB = k.FDB[1:] }),
			[]Drift{{Network: "name-app", VNI: 4096, Device: "vx-001000", Kind: "flood", Entry: "192.0.2.2", Problem: "missing", Want: "192.0.2.2"}}},
		{"device down", mod(func(k *vxlan.KernelNetwork) { k.Up = false }),
			[]Drift{{Network: "name-app", VNI: 4096, Device: "vx-001000", Kind: "state", Entry: "vx-001000", Problem: "wrong", Want: "up", Have: "down"}}},
		{"port missing", mod(func(k *vxlan.KernelNetwork) { k.Ports = nil }),
			[]Drift{{Network: "name-app", VNI: 4096, Device: "vxbr-001000", Kind: "port", Entry: "e1aaaaaaaaaa", Problem: "missing", Want: "vxh-e1aaaaaaaa"}}},
		{"device missing", nil,
			[]Drift{
				{Network: "name-app", VNI: 4096, Device: "vxbr-001000", Kind: "device", Entry: "vxbr-001000", Problem: "missing"},
				{Network: "name-app", VNI: 4096, Device: "vx-001000", Kind: "device", Entry: "vx-001000", Problem: "missing"},
			}},
		{"stray overlay", append(matching(), vxlan.KernelNetwork{VNI: 4097, VXLAN: "vx-001001"}),
			[]Drift{{VNI: 4097, Device: "vx-001001", Kind: "device", Entry: "vx-001001", Problem: "unexpected"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := collect(t, s, c.kernel)
			if !slices.Equal(r.Drift, c.want) {
				t.Errorf("drift\n%v\nwant\n%v", r.Drift, c.want)
			}
			var b bytes.Buffer
			_ = WriteText(&b, r)
			if !strings.Contains(b.String(), c.want[0].String()) {
				t.Errorf("text output lacks %q:\n%s", c.want[0], b.String())
			}
		})
	}
}

func TestCollectStoreDown(t *testing.T) {
	r, err := Collect(context.Background(), Config{
		StoreError: errors.New("connection refused"), HostID: self,
		Kernel: func() ([]vxlan.KernelNetwork, error) { return matching(), nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	if r.Store.Reachable || r.Store.Error != "connection refused" || len(r.Drift) != 0 {
		t.Errorf("store %+v, drift %v", r.Store, r.Drift)
	}
}
