package harness

import (
	"testing"
	"time"
)

// TestClusterCarriesTraffic drives two plugins through the harness: one
// network on both hosts, a container on each, a ping across, then a clean
// teardown through the protocol.
func TestClusterCarriesTraffic(t *testing.T) {
	c := NewCluster(t, 2, ClusterOptions{})
	spec := NetSpec{Subnet4: "10.99.0.0/24", Options: map[string]string{"name": "harness"}}
	var nets [2]*Network
	var ctrs [2]*Endpoint
	for i, p := range c.Plugins {
		n, err := p.CreateNetwork(spec)
		if err != nil {
			t.Fatalf("host%d: %v", i, err)
		}
		nets[i] = n
		if ctrs[i], err = n.Run(t); err != nil {
			t.Fatalf("host%d: %v", i, err)
		}
		if ctrs[i].NS == nil || ctrs[i].SrcName == "" || ctrs[i].MAC == "" {
			t.Fatalf("host%d: endpoint not filled in: %+v", i, ctrs[i])
		}
	}
	dst := ctrs[1].Addr4.Addr().String()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := ctrs[0].NS.Run(t, "ping", "-n", "-c", "1", "-W", "1", dst)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ping across the overlay: %v\n%s", err, out)
		}
	}
	for i := range 2 {
		if err := ctrs[i].Remove(); err != nil {
			t.Fatalf("host%d: remove container: %v", i, err)
		}
		if err := nets[i].Remove(); err != nil {
			t.Fatalf("host%d: remove network: %v", i, err)
		}
	}
}
