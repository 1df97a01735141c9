package driver

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"
)

// TestNetworksOn counts this host's bound networks on a pool of a space,
// and on a gateway of it; a network removed no longer counts.
func TestNetworksOn(t *testing.T) {
	store := openStore(t, filepath.Join(t.TempDir(), "state.db"))
	d := newTestDriver(t, store, "a", "192.0.2.1", newFake())
	for _, id := range []string{"n1", "n2"} {
		if err := d.CreateNetwork(createReq(id, map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.CreateNetwork(createReq("n3", map[string]interface{}{"name": "other"}, "10.2.0.0/24")); err != nil {
		t.Fatal(err)
	}
	subnet := netip.MustParsePrefix("10.1.0.0/24")
	for _, c := range []struct {
		space string
		gw    string
		want  int
	}{
		{"ours", "", 2},
		{"ours", "10.1.0.1", 2},
		{"ours", "10.1.0.9", 0},
		{"another", "", 0},
	} {
		var gw netip.Addr
		if c.gw != "" {
			gw = netip.MustParseAddr(c.gw)
		}
		if n, known := d.NetworksOn(c.space, subnet, gw, time.Second); n != c.want || !known {
			t.Errorf("NetworksOn(%s, %s, gateway %q) = %d, %v; want %d, true", c.space, subnet, c.gw, n, known, c.want)
		}
	}
	if err := d.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	if n, _ := d.NetworksOn("ours", subnet, netip.Addr{}, time.Second); n != 1 {
		t.Errorf("after n2's DeleteNetwork: %d networks on %s, want 1", n, subnet)
	}
}
