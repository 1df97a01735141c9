package cluster

import (
	"encoding/json"
	"net/netip"
	"testing"
)

func TestDesiredPeers(t *testing.T) {
	n := Network{Incarnation: "i1", Hosts: map[string]Member{"a": {}, "b": {}, "c": {}}}
	ep := func(id, host, inc, v4, v6, mac, vtep string) Endpoint {
		return Endpoint{ID: id, HostID: host, Incarnation: inc, IPv4: v4, IPv6: v6, MAC: mac, VTEP: vtep}
	}
	eps := []Endpoint{
		ep("own", "a", "i1", "10.0.0.2/24", "", "02:00:00:00:00:02", "192.0.2.1"),
		ep("b1", "b", "i1", "10.0.0.3/24", "fd00::3/64", "02:00:00:00:00:03", "192.0.2.2"),
		ep("stale", "b", "i0", "10.0.0.4/24", "", "02:00:00:00:00:04", "192.0.2.2"),
		ep("gone", "d", "i1", "10.0.0.5/24", "", "02:00:00:00:00:05", "192.0.2.4"),
		ep("badmac", "c", "i1", "10.0.0.6/24", "", "zz", "192.0.2.3"),
		ep("badvtep", "c", "i1", "10.0.0.7/24", "", "02:00:00:00:00:07", "nope"),
		ep("c1", "c", "i1", "10.0.0.1/24", "", "02:00:00:00:00:01", "192.0.2.3"),
	}
	got := DesiredPeers("a", n, eps)
	want := []string{"10.0.0.1 c1", "10.0.0.3 b1", "fd00::3 b1"}
	if len(got) != len(want) {
		t.Fatalf("got %+v, want %v", got, want)
	}
	for i, p := range got {
		if s := p.IP.String() + " " + p.EndpointID; s != want[i] {
			t.Fatalf("peer %d = %s, want %s", i, s, want[i])
		}
	}
	if got[1].VTEP != netip.MustParseAddr("192.0.2.2") || got[1].MAC.String() != "02:00:00:00:00:03" {
		t.Fatalf("peer %+v", got[1])
	}
}

func TestKey(t *testing.T) {
	cases := []struct {
		name, subnet, want string
		ok                 bool
	}{
		{"app", "10.0.0.0/24", "name-app", true},
		{"", "10.0.0.0/24", "subnet-10.0.0.0_24", true},
		{"", "fd00::/64", "subnet-fd00--_64", true},
		{"bad/name", "10.0.0.0/24", "", false},
		{"-x", "10.0.0.0/24", "", false},
	}
	for _, tc := range cases {
		got, err := Key(tc.name, []netip.Prefix{netip.MustParsePrefix(tc.subnet)})
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("Key(%q, %s) = %q, %v; want %q ok=%v", tc.name, tc.subnet, got, err, tc.want, tc.ok)
		}
	}
	if _, err := Key("", nil); err == nil {
		t.Error("Key without name or subnet accepted")
	}
}

// Records written before host IDs and incarnations still read: the node
// name stands for the host ID, the single NetworkID for the list.
func TestLegacyRecords(t *testing.T) {
	var n Network
	if err := json.Unmarshal([]byte(`{"key":"name-app","vni":4096,"subnets":["10.0.0.0/24"],"hosts":{"a":{"network_id":"n1","vtep":"192.0.2.1"}}}`), &n); err != nil {
		t.Fatal(err)
	}
	if m, ok := n.Member("a"); !ok || len(m.NetworkIDs) != 1 || m.NetworkIDs[0] != "n1" {
		t.Fatalf("legacy membership %+v", n.Hosts)
	}
	var ep Endpoint
	if err := json.Unmarshal([]byte(`{"id":"e1","node":"a","vtep":"192.0.2.1","ipv4":"10.0.0.2/24","mac":"02:42:0a:00:00:02"}`), &ep); err != nil {
		t.Fatal(err)
	}
	if ep.HostID != "a" {
		t.Fatalf("legacy endpoint host %q", ep.HostID)
	}
	if p := DesiredPeers("b", n, []Endpoint{ep}); len(p) != 1 {
		t.Fatalf("legacy endpoint not a peer: %+v", p)
	}
	// Round trip of a current record keeps the list.
	b, _ := json.Marshal(Member{NetworkIDs: []string{"x", "y"}})
	var m Member
	if err := json.Unmarshal(b, &m); err != nil || len(m.NetworkIDs) != 2 {
		t.Fatalf("round trip %+v, %v", m, err)
	}
}
