package main

import (
	"strings"
	"testing"
)

func TestNetSyncFromEnv(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	st, err := netSyncFromEnv(env(nil))
	if err != nil || !st.on || st.fixed != "" {
		t.Fatalf("defaults = %+v, %v; want on, no driver name", st, err)
	}
	st, err = netSyncFromEnv(env(map[string]string{envClusterNetworks: "false", envDriverName: " co:latest "}))
	if err != nil || st.on || st.fixed != "co:latest" {
		t.Fatalf("CLUSTER_NETWORKS=false DRIVER_NAME=co:latest = %+v, %v", st, err)
	}
	if _, err := netSyncFromEnv(env(map[string]string{envClusterNetworks: "maybe"})); err == nil || !strings.Contains(err.Error(), envClusterNetworks) {
		t.Fatalf("CLUSTER_NETWORKS=maybe: %v, want an error naming the setting", err)
	}
}
