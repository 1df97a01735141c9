package driver

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"
)

// TestNetworksOn counts this host's bound networks on a pool of a space; a
// network removed no longer counts.
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
	for space, want := range map[string]int{"ours": 2, "another": 0} {
		if n, known := d.NetworksOn(space, subnet, time.Second); n != want || !known {
			t.Errorf("NetworksOn(%s, %s) = %d, %v; want %d, true", space, subnet, n, known, want)
		}
	}
	if err := d.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	if n, _ := d.NetworksOn("ours", subnet, time.Second); n != 1 {
		t.Errorf("after n2's DeleteNetwork: %d networks on %s, want 1", n, subnet)
	}
}
