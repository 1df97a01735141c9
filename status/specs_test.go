package status

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"consul-overlay/cluster"
)

// A conflict recorded in a cluster-wide network's spec shows in the report
// and its text.
func TestCollectClusterNetworkConflict(t *testing.T) {
	s := fixture(t)
	put(t, s, cluster.SpecsPrefix+"web", cluster.Spec{
		Name: "web", Key: "subnet-10.9.0.0_24", IPAMSelf: true, IPAM: []cluster.IPAMConfig{{Subnet: "10.9.0.0/24"}}, OriginNode: "one",
		Conflicts: []cluster.SpecConflict{{HostID: other, Node: "two", Settings: "subnet=10.8.0.0/24", Outcome: "removed the network created here", At: time.Now()}},
	})
	r := collect(t, s, matching())
	if len(r.ClusterNetworks) != 1 || len(r.ClusterNetworks[0].Conflicts) != 1 {
		t.Fatalf("cluster networks %+v", r.ClusterNetworks)
	}
	var b bytes.Buffer
	if err := WriteText(&b, r); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Cluster-wide networks (1):", "web  subnet-10.9.0.0_24", "CONFLICT: host two created it with subnet=10.8.0.0/24"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, b.String())
		}
	}
}
