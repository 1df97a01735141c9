package netsync

import "testing"

func TestOurs(t *testing.T) {
	tests := []struct {
		plugin, network string
		want            bool
	}{
		{"consul-overlay:latest", "consul-overlay:latest", true},
		{"consul-overlay:latest", "consul-overlay", true},
		{"consul-overlay", "consul-overlay:latest", true},
		{"consul-overlay:v2", "consul-overlay", false},
		{"127.0.0.1:15000/consul-overlay:latest", "127.0.0.1:15000/consul-overlay", true},
		{"127.0.0.1:15000/consul-overlay", "127.0.0.1:15000/consul-overlay:latest", true},
		{"consul-overlay:latest", "overlay", false},
		{"consul-overlay:latest", "", false},
		{"", "consul-overlay", false},
	}
	for _, tt := range tests {
		s := &Syncer{driver: tt.plugin}
		if got := s.ours(tt.network); got != tt.want {
			t.Errorf("plugin %q, network driver %q: ours %v, want %v", tt.plugin, tt.network, got, tt.want)
		}
	}
}
