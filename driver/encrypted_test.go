package driver

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"consul-overlay/vxlan"
)

// -o encrypted: Docker's valueless form and booleans are taken, anything
// else is refused.
func TestParseEncrypted(t *testing.T) {
	for _, tc := range []struct {
		v    string
		want bool
		bad  bool
	}{{"", true, false}, {"true", true, false}, {"1", true, false}, {"false", false, false}, {"yes", false, true}} {
		o, err := parseNetworkOptions(createReq("n1", map[string]interface{}{"encrypted": tc.v}, "10.1.0.0/24"))
		switch {
		case tc.bad && (err == nil || !strings.Contains(err.Error(), "encrypted")):
			t.Errorf("encrypted=%q: err %v, want one naming the option", tc.v, err)
		case !tc.bad && (err != nil || o.encrypted != tc.want):
			t.Errorf("encrypted=%q: %v %v, want %v", tc.v, o, err, tc.want)
		}
	}
}

// An encrypted network reaches the data plane as such, its explicit MTU
// must leave room for ESP, and a second host cannot join it unencrypted.
func TestCreateEncryptedNetwork(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	dpA, dpB := newFake(), newFake()
	a := newTestDriver(t, openStore(t, path), "a", "192.0.2.1", dpA)
	max := dpA.maxMTU - vxlan.ESPOverhead
	err := a.CreateNetwork(createReq("n1", map[string]interface{}{"name": "sec", "encrypted": "true", "mtu": strconv.Itoa(max + 1)}, "10.1.0.0/24"))
	if err == nil || !strings.Contains(err.Error(), "encrypted network carries at most "+strconv.Itoa(max)) {
		t.Fatalf("too big an MTU: %v, want a refusal naming %d", err, max)
	}
	if err := a.CreateNetwork(createReq("n1", map[string]interface{}{"name": "sec", "encrypted": "true"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	dpA.mu.Lock()
	var enc bool
	for _, n := range dpA.networks {
		enc = n.Encrypted
	}
	dpA.mu.Unlock()
	if !enc {
		t.Error("the data plane got the network unencrypted")
	}
	b := newTestDriver(t, openStore(t, path), "b", "192.0.2.2", dpB)
	err = b.CreateNetwork(createReq("n2", map[string]interface{}{"name": "sec"}, "10.1.0.0/24"))
	if err == nil || !strings.Contains(err.Error(), "encrypted=true") {
		t.Fatalf("unencrypted join of an encrypted network: %v", err)
	}
	if err := b.CreateNetwork(createReq("n2", map[string]interface{}{"name": "sec", "encrypted": ""}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
}
