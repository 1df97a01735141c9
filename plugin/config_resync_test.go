package main

import (
	"strings"
	"testing"
	"time"
)

// TestConfigPeerResync: PEER_RESYNC_INTERVAL is a duration of at least 1s,
// 30s when unset; a bad value is an error naming the setting.
func TestConfigPeerResync(t *testing.T) {
	for _, tc := range []struct {
		v    string
		want time.Duration
		bad  bool
	}{
		{v: "", want: 30 * time.Second},
		{v: "10s", want: 10 * time.Second},
		{v: " 2m ", want: 2 * time.Minute},
		{v: "1s", want: time.Second},
		{v: "500ms", bad: true},
		{v: "0", bad: true},
		{v: "soon", bad: true},
	} {
		env := map[string]string{"PEER_RESYNC_INTERVAL": tc.v, "DOCKER_HOST": "none"}
		c, err := loadConfig(func(k string) string { return env[k] })
		switch {
		case tc.bad && (err == nil || !strings.Contains(err.Error(), "PEER_RESYNC_INTERVAL")):
			t.Errorf("%q: err %v, want one naming PEER_RESYNC_INTERVAL", tc.v, err)
		case !tc.bad && err != nil:
			t.Errorf("%q: %v", tc.v, err)
		case !tc.bad && c.PeerResync != tc.want:
			t.Errorf("%q: %s, want %s", tc.v, c.PeerResync, tc.want)
		}
	}
}

// TestConfigBridgeConntrack: BRIDGE_CONNTRACK is a boolean, true (bridged
// frames tracked, no NOTRACK rule) when unset; a bad value is an error
// naming the setting.
func TestConfigBridgeConntrack(t *testing.T) {
	for _, tc := range []struct {
		v    string
		want bool
		bad  bool
	}{
		{v: "", want: true},
		{v: "true", want: true},
		{v: "false", want: false},
		{v: " 0 ", want: false},
		{v: "maybe", bad: true},
	} {
		env := map[string]string{"BRIDGE_CONNTRACK": tc.v, "DOCKER_HOST": "none"}
		c, err := loadConfig(func(k string) string { return env[k] })
		switch {
		case tc.bad && (err == nil || !strings.Contains(err.Error(), "BRIDGE_CONNTRACK")):
			t.Errorf("%q: err %v, want one naming BRIDGE_CONNTRACK", tc.v, err)
		case !tc.bad && err != nil:
			t.Errorf("%q: %v", tc.v, err)
		case !tc.bad && c.TrackBridged != tc.want:
			t.Errorf("%q: %v, want %v", tc.v, c.TrackBridged, tc.want)
		}
	}
}

// TestConfigDataplaneNamespace: DATAPLANE_NAMESPACE is off unless set;
// true names the owner's namespace, a name its own; HOST_PID is a pid.
func TestConfigDataplaneNamespace(t *testing.T) {
	for _, tc := range []struct {
		v, pid string
		want   string
		bad    string // the setting the error must name
	}{
		{v: "", want: ""},
		{v: "false", want: ""},
		{v: "0", want: ""},
		{v: "true", want: "true"},
		{v: "1", want: "true"},
		{v: "lab-a", want: "lab-a", pid: "4242"},
		{v: "a/b", bad: "DATAPLANE_NAMESPACE"},
		{v: "true", pid: "0", bad: "HOST_PID"},
		{v: "true", pid: "x", bad: "HOST_PID"},
	} {
		env := map[string]string{"DATAPLANE_NAMESPACE": tc.v, "HOST_PID": tc.pid, "DOCKER_HOST": "none"}
		c, err := loadConfig(func(k string) string { return env[k] })
		switch {
		case tc.bad != "" && (err == nil || !strings.Contains(err.Error(), tc.bad)):
			t.Errorf("%q %q: err %v, want one naming %s", tc.v, tc.pid, err, tc.bad)
		case tc.bad == "" && err != nil:
			t.Errorf("%q: %v", tc.v, err)
		case tc.bad == "" && c.DataplaneNS != tc.want:
			t.Errorf("%q: %q, want %q", tc.v, c.DataplaneNS, tc.want)
		}
	}
	if got := dataplanePath("true", ""); got != "/run/consul-overlay/consul-overlay" {
		t.Errorf("path of the default owner's namespace: %s", got)
	}
	if got := dataplanePath("lab-a", "x"); got != "/run/consul-overlay/lab-a" {
		t.Errorf("path of a named namespace: %s", got)
	}
}
