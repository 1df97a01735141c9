package status

import (
	"context"
	"fmt"
	"io"

	"consul-overlay/cluster"
	"consul-overlay/kvstore"
)

// ClusterNetwork is a cluster-wide network (a network created once, on
// every host): its definition's state and the hosts that created its name
// with other settings and were made to take these ones.
type ClusterNetwork struct {
	Name      string   `json:"name"`
	Key       string   `json:"key"`
	Settings  string   `json:"settings"`
	Origin    string   `json:"origin"`
	Retired   bool     `json:"retired,omitempty"`
	RetiredBy string   `json:"retired_by,omitempty"`
	Conflicts []string `json:"conflicts,omitempty"`
}

// clusterNetworks reads the cluster-wide network definitions.
func clusterNetworks(ctx context.Context, store kvstore.Store) ([]ClusterNetwork, error) {
	sps, err := cluster.ListSpecs(ctx, store)
	out := make([]ClusterNetwork, 0, len(sps))
	for _, sp := range sps {
		s := sp.Spec
		c := ClusterNetwork{Name: s.Name, Key: s.Key, Settings: s.Settings(), Origin: s.OriginNode, Retired: s.Retired, RetiredBy: s.RetiredBy}
		for _, x := range s.Conflicts {
			c.Conflicts = append(c.Conflicts, fmt.Sprintf("host %s created it with %s at %s: %s", x.Node, x.Settings, x.At.UTC().Format("2006-01-02T15:04:05Z"), x.Outcome))
		}
		out = append(out, c)
	}
	return out, err
}

// writeClusterNetworks is the text report's section of them.
func writeClusterNetworks(w io.Writer, ns []ClusterNetwork) {
	if len(ns) == 0 {
		return
	}
	fmt.Fprintf(w, "\nCluster-wide networks (%d):\n", len(ns))
	for _, n := range ns {
		state := "live"
		if n.Retired {
			state = "retired by " + orNone(n.RetiredBy) + ", removed where no container uses it"
		}
		fmt.Fprintf(w, "  %s  %s  from %s  %s  (%s)\n", n.Name, n.Key, orNone(n.Origin), n.Settings, state)
		for _, c := range n.Conflicts {
			fmt.Fprintf(w, "    CONFLICT: %s\n", c)
		}
	}
}
