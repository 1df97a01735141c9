package vxlan

import (
	"net"
	"strings"
	"testing"
	"time"
)

// TestPeerMACChangeAnnounced: a remote container comes back with its old
// address and a new MAC. The VXLAN ARP proxy never forwards its own
// gratuitous ARP, so the Manager announces the new MAC into the local
// bridge, and a local container that had the old MAC cached switches at
// once instead of when its entry expires.
func TestPeerMACChangeAnnounced(t *testing.T) {
	inLayouts(t, false, testPeerMACChangeAnnounced)
}

func testPeerMACChangeAnnounced(t *testing.T, dp bool) {
	hosts, _, c1, c2 := twoContainersIn(t, dp)
	before, err := c1.ns.Run(t, "ip", "neigh", "show", "10.40.0.3")
	if err != nil || !strings.Contains(before, c2.mac.String()) {
		t.Fatalf("c1's neighbour entry for c2 before: %q %v", before, err)
	}

	// A Manager made by New inside host0's namespace owns a packet socket
	// there, and one in its data-plane namespace (a Manager on a foreign
	// handle sends nothing).
	cfg := Config{VTEP: hosts[0].Addr, IPTables: "-", IP6Tables: "-", Sysctl: "-", Logger: testLogger(t)}
	if dp {
		cfg.DataplaneNS = hosts[0].dp.Path
	}
	var m *Manager
	if err := hosts[0].NS.Do(func() error {
		var err error
		m, err = New(cfg)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.host.announce == nil || dp && m.dp.announce == nil {
		t.Fatal("New made no announcer")
	}
	newMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
	p := Peer{VNI: c2.vni, IP: addr("10.40.0.3"), MAC: newMAC, VTEP: hosts[1].Addr}
	if err := m.AddPeer(t.Context(), p); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		out, err := c1.ns.Run(t, "ip", "neigh", "show", "10.40.0.3")
		if err == nil && strings.Contains(out, newMAC.String()) {
			t.Logf("c1's entry after the announcement: %s", strings.TrimSpace(out))
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("c1 still has %q for 10.40.0.3, want %s", strings.TrimSpace(out), newMAC)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
