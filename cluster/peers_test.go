package cluster

import (
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
