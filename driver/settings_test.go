package driver

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"consul-overlay/cluster"
)

// TestJoinWithOtherSettingsRefused: every host of a logical network
// programs its bridge and registers its containers from the one record,
// so a host that creates the network with other settings than the record
// (--internal, consul_api, egress, register, service_prefix, encrypted)
// is refused, naming the setting, instead of silently getting the first
// host's: a network created without consul_api must not let its
// containers reach the Consul API because another host asked for it.
func TestJoinWithOtherSettingsRefused(t *testing.T) {
	cases := []struct {
		setting string
		a, b    map[string]interface{}
		bInt    bool
	}{
		{"consul_api", map[string]interface{}{"consul_api": "true"}, nil, false},
		{"egress", map[string]interface{}{"egress": "host"}, map[string]interface{}{"egress": "docker"}, false},
		{"egress", nil, map[string]interface{}{"egress": "host"}, false},
		{"internal", nil, nil, true},
		{"register", nil, map[string]interface{}{"register": "false"}, false},
		{"service_prefix", map[string]interface{}{"service_prefix": "x-"}, nil, false},
		{"encrypted", map[string]interface{}{"encrypted": ""}, nil, false},
	}
	for _, c := range cases {
		t.Run(c.setting, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "s.db")
			opts := func(extra map[string]interface{}) map[string]interface{} {
				m := map[string]interface{}{"name": "app"}
				for k, v := range extra {
					m[k] = v
				}
				return m
			}
			a := newHostDriver(t, openStore(t, path), "a", "a", "192.0.2.1", newFake())
			if err := a.CreateNetwork(createReq("na", opts(c.a), "10.1.0.0/24")); err != nil {
				t.Fatal(err)
			}
			dpB := newFake()
			b := newHostDriver(t, openStore(t, path), "b", "b", "192.0.2.2", dpB)
			req := createReq("nb", opts(c.b), "10.1.0.0/24")
			if c.bInt {
				req.Options[optInternal] = true
			}
			err := b.CreateNetwork(req)
			if !errors.Is(err, cluster.ErrIncompatible) || !strings.Contains(err.Error(), c.setting+"=") {
				t.Fatalf("a host asking for another %s: %v, want ErrIncompatible naming it", c.setting, err)
			}
			if n, _ := dpB.counts(); n != 0 || b.network("nb") != nil {
				t.Fatalf("the refused create left %d overlays, bound %v", n, b.network("nb") != nil)
			}
			// The same settings join.
			req = createReq("nb2", opts(c.a), "10.1.0.0/24")
			if err := b.CreateNetwork(req); err != nil {
				t.Fatal(fmt.Errorf("the same settings: %w", err))
			}
		})
	}
}
