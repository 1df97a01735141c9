package main

import (
	"bufio"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"consul-overlay/internal/testenv"
)

// TestLogsJSON runs a plugin with LOG_FORMAT=json through a network's and
// a container's life and checks that every line is JSON and that each
// state change is logged once at info under the documented keys (README,
// "Logs"), naming the network by its name.
func TestLogsJSON(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 1, testenv.UnderlayOptions{})
	consul := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()))
	prefix := "co-test-" + randomID()[:8] + "/"
	p := startPluginEnv(t, "host0", hosts[0], consul.Addr, prefix, "LOG_FORMAT=json")

	const name = "logs-net"
	n, err := p.createNetwork(netSpec{subnet4: "10.32.0.0/24", opts: map[string]string{"name": name}})
	if err != nil {
		t.Fatal(err)
	}
	c := n.run(t)
	c.remove(t)
	if err := n.remove(); err != nil {
		t.Fatal(err)
	}

	f, err := os.Open(p.logf)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var lines []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Errorf("log line is not JSON: %v: %s", err, line)
			continue
		}
		for _, k := range []string{"time", "level", "msg"} {
			if _, ok := m[k]; !ok {
				t.Errorf("log line without %q: %s", k, line)
			}
		}
		lines = append(lines, m)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}

	netID, epID := n.id[:12], c.eid[:12]
	checks := []struct {
		msg  string
		keys []string
	}{
		{"network created", []string{"vni", "host"}},
		{"endpoint created", []string{"vni", "endpoint", "address", "host"}},
		{"endpoint joined", []string{"vni", "endpoint"}},
		{"endpoint left", []string{"vni", "endpoint"}},
		{"endpoint removed", []string{"endpoint", "address", "host"}},
		{"network removed", []string{"vni", "host"}},
	}
	for _, ch := range checks {
		var got []map[string]any
		for _, m := range lines {
			if m["msg"] == ch.msg && m["network_id"] == netID {
				got = append(got, m)
			}
		}
		if len(got) != 1 {
			t.Errorf("%q for network %s logged %d times, want once", ch.msg, netID, len(got))
			continue
		}
		m := got[0]
		if m["level"] != "INFO" {
			t.Errorf("%q at level %v, want INFO", ch.msg, m["level"])
		}
		if m["network"] != name {
			t.Errorf("%q: network=%v, want the network's name %q", ch.msg, m["network"], name)
		}
		for _, k := range ch.keys {
			if _, ok := m[k]; !ok {
				t.Errorf("%q without key %q: %v", ch.msg, k, m)
			}
		}
		if _, ok := m["endpoint"]; ok && m["endpoint"] != epID {
			t.Errorf("%q: endpoint=%v, want %s", ch.msg, m["endpoint"], epID)
		}
	}
	// IPAM: the pool's life is logged at info too.
	for _, msg := range []string{"created pool", "released pool"} {
		found := false
		for _, m := range lines {
			if m["msg"] == msg && m["level"] == "INFO" {
				if _, ok := m["pool"]; ok {
					found = true
				}
			}
		}
		if !found {
			t.Errorf("no info line %q with key pool", msg)
		}
	}
	if t.Failed() {
		b, _ := os.ReadFile(p.logf)
		t.Logf("plugin log:\n%s", tail(string(b), 80))
	}
}
