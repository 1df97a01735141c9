package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clusterstate "consul-overlay/cluster"
	"consul-overlay/internal/testenv"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
	"consul-overlay/reaper"
)

func TestHostsGraceSetting(t *testing.T) {
	for _, tt := range []struct {
		v    string
		want time.Duration
		ok   bool
	}{
		{"", reaper.DefaultGrace, true},
		{"10m", 10 * time.Minute, true},
		{"30s", 30 * time.Second, true},
		{"29s", 0, false},
		{"soon", 0, false},
	} {
		got, err := hostGrace(func(k string) string {
			if k == envHostGrace {
				return tt.v
			}
			return ""
		})
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("HOST_GRACE=%q: %v, %v; want %v ok=%v", tt.v, got, err, tt.want, tt.ok)
		}
	}
}

func TestHostsEvictCommands(t *testing.T) {
	agent := testenv.StartConsul(t)
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	prefix := "cmd-" + hex.EncodeToString(b) + "/"
	env := map[string]string{"CONSUL_HTTP_ADDR": agent.Addr, "KV_PREFIX": prefix}
	getenv := func(k string) string { return env[k] }
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	store, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: agent.Addr, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	claim := func(id, node string) *kvstore.Claim {
		val, err := kvstore.Encode(hostRecord{ID: id, Node: node, VTEP: netip.MustParseAddr("192.0.2.9"), Started: time.Now().UTC()})
		if err != nil {
			t.Fatal(err)
		}
		c, err := store.Claim(ctx, hostsPrefix+id, val, kvstore.ClaimConfig{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Release(context.Background()) })
		return c
	}
	claim("host-a", "node-a")
	cb := claim("host-b", "node-b")
	if err := cb.Release(ctx); err != nil {
		t.Fatal(err)
	}
	// B has a membership and an address.
	cl, err := clusterstate.New(clusterstate.Config{HostID: "host-b", Node: "node-b", VTEP: netip.MustParseAddr("192.0.2.2")}, store)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Join(ctx, "name-x", "net-x", clusterstate.NetworkSpec{Name: "x", Subnets: []netip.Prefix{netip.MustParsePrefix("10.70.0.0/24")}}); err != nil {
		t.Fatal(err)
	}
	ip, err := ipam.New(ipam.Config{Node: "host-b"}, store)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := ip.AllocatePool(ctx, ipam.PoolRequest{Pool: netip.MustParsePrefix("10.70.0.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool.ID, Endpoint: "e"}); err != nil {
		t.Fatal(err)
	}

	run := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := runCommand(ctx, args, getenv, &out, &errb)
		return code, out.String(), errb.String()
	}
	code, out, stderr := run("hosts")
	t.Logf("consul-overlay hosts:\n%s", out)
	if code != 0 || !strings.Contains(out, "host-a") || !strings.Contains(out, "alive") || !strings.Contains(out, "host-b") || !strings.Contains(out, "no session") {
		t.Fatalf("hosts: %d\n%s\n%s", code, out, stderr)
	}
	code, out, stderr = run("hosts", "--json")
	var hosts []reaper.Host
	if code != 0 || json.Unmarshal([]byte(out), &hosts) != nil || len(hosts) != 2 || !hosts[0].Alive || hosts[1].Alive {
		t.Fatalf("hosts --json: %d %v\n%s\n%s", code, hosts, out, stderr)
	}
	if code, _, stderr = run("evict", "host-a"); code != 1 || !strings.Contains(stderr, "alive") {
		t.Fatalf("evict of a live host: %d %s", code, stderr)
	}
	if code, _, _ = run("evict"); code != 2 {
		t.Fatalf("evict without a host: %d", code)
	}
	code, out, stderr = run("evict", "host-b")
	if code != 0 || !strings.Contains(out, "released 1 addresses") {
		t.Fatalf("evict host-b: %d\n%s\n%s", code, out, stderr)
	}
	for _, k := range []string{hostsPrefix + "host-b", "members/host-b", "networks/name-x/config", "ipam/ConsulOverlayLocal/index/v4"} {
		if _, err := store.Get(ctx, k); err == nil {
			t.Errorf("%s left after evict", k)
		}
	}
	if code, out, stderr = run("evict", "--force", "host-a"); code != 0 {
		t.Fatalf("evict --force of a live host: %d\n%s\n%s", code, out, stderr)
	}
	if code, _, stderr = run("hosts"); code != 0 {
		t.Fatalf("hosts: %s", stderr)
	}
	if code, _, stderr = run("hosts"); code != 0 {
		t.Fatal(stderr)
	}
	if _, ok := subcommand([]string{"consul-overlay"}); ok {
		t.Error("the plugin with no arguments took a subcommand")
	}
	if _, ok := subcommand([]string{"consul-overlay", "hosts"}); !ok {
		t.Error("hosts is no subcommand")
	}
	env = map[string]string{}
	if code, _, stderr = run("hosts"); code != 1 || !strings.Contains(stderr, "CONSUL_HTTP_ADDR") {
		t.Errorf("hosts without Consul: %d %s", code, stderr)
	}
}

// The self-check runs once the driver is ready and again when the host
// record is held by a new session.
func TestReapLivenessChecks(t *testing.T) {
	s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: filepath.Join(t.TempDir(), "s.db"), Prefix: "t/"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cl, err := clusterstate.New(clusterstate.Config{HostID: "h", VTEP: netip.MustParseAddr("192.0.2.1")}, s)
	if err != nil {
		t.Fatal(err)
	}
	ip, err := ipam.New(ipam.Config{Node: "h"}, s)
	if err != nil {
		t.Fatal(err)
	}
	r, err := reaper.New(reaper.Config{HostID: "h", Interval: 5 * time.Millisecond}, s, cl, ip, nil)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	session := "s1"
	var checks atomic.Int32
	ready := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		runLiveness(ctx, r, ready,
			func() string { mu.Lock(); defer mu.Unlock(); return session },
			func(context.Context) { checks.Add(1) })
	}()
	time.Sleep(30 * time.Millisecond)
	if n := checks.Load(); n != 0 {
		t.Fatalf("%d checks before the driver is ready", n)
	}
	close(ready)
	waitFor(t, func() bool { return checks.Load() == 1 })
	mu.Lock()
	session = ""
	mu.Unlock()
	time.Sleep(30 * time.Millisecond)
	mu.Lock()
	session = "s2"
	mu.Unlock()
	waitFor(t, func() bool { return checks.Load() >= 2 })
	cancel()
	<-done
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReapLocalNetworks(t *testing.T) {
	nets := map[string]clusterstate.Network{
		"d1": {Key: "name-a"}, "d2": {Key: "name-a"}, "d3": {Key: "name-b"},
	}
	eps := []clusterstate.Endpoint{{ID: "e1", NetworkID: "d2"}, {ID: "e2", NetworkID: "d3"}, {ID: "e3", NetworkID: "gone"}}
	got := localNetworks(nets, eps)
	if len(got) != 2 || got[0].Network.Key != "name-a" || len(got[0].NetworkIDs) != 2 || len(got[0].Endpoints) != 1 ||
		got[1].Network.Key != "name-b" || len(got[1].Endpoints) != 1 || got[1].Endpoints[0].ID != "e2" {
		t.Errorf("localNetworks: %+v", got)
	}
}
