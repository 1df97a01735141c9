package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/hostid"
	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

// Issue 11's acceptance at the protocol level: cluster state that survives
// shared agents and a foreign view of the store.

// TestProtocolSharedAgent points two hosts at one Consul agent with no
// NODE_NAME, so both take the agent's node name. They must still be two
// hosts: peers are programmed between them, and removing the network on
// one leaves the other's containers and records alone.
func TestProtocolSharedAgent(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 2, testenv.UnderlayOptions{})
	agent := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()))
	prefix := "co-test-" + randomID()[:8] + "/"
	a := startPlugin(t, "hostA", hosts[0], agent.Addr, prefix, withoutEnv("NODE_NAME"))
	b := startPlugin(t, "hostB", hosts[1], agent.Addr, prefix, withoutEnv("NODE_NAME"))

	spec := netSpec{subnet4: "10.41.0.0/24", opts: map[string]string{"name": "shared"}}
	na, err := a.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := b.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	ca1, ca2 := na.run(t), na.run(t)
	cb := nb.run(t)
	if ca1.addr4 == cb.addr4 || ca2.addr4 == cb.addr4 || ca1.addr4 == ca2.addr4 {
		t.Fatalf("addresses handed out twice: %s %s %s", ca1.addr4, ca2.addr4, cb.addr4)
	}
	eventually(t, 10*time.Second, func() error { return ca1.ping(t, cb.addr4.Addr(), 1) })
	eventually(t, 10*time.Second, func() error { return cb.ping(t, ca2.addr4.Addr(), 1) })

	before := kvKeys(t, agent, prefix+"networks/")
	// docker rm and docker network rm on B.
	cb.remove(t)
	if err := nb.remove(); err != nil {
		t.Fatalf("network rm on B: %v", err)
	}
	after := kvKeys(t, agent, prefix+"networks/")
	for _, c := range []*container{ca1, ca2} {
		if !slices.ContainsFunc(after, func(k string) bool { return strings.HasSuffix(k, "/endpoints/"+c.eid) }) {
			t.Errorf("B's network rm removed A's endpoint record %s\nbefore: %v\nafter: %v", c.eid[:12], before, after)
		}
	}
	if !slices.ContainsFunc(kvKeys(t, agent, prefix), func(k string) bool { return strings.HasPrefix(k, prefix+"vnis/") }) {
		t.Errorf("the VNI reservation went while A still uses the network: %v", kvKeys(t, agent, prefix))
	}
	// A's containers keep running, and a new one joins them.
	if err := ca1.ping(t, ca2.addr4.Addr(), 3); err != nil {
		t.Fatalf("A's containers lost each other after B's network rm: %v", err)
	}
	ca3 := na.run(t)
	if err := ca3.ping(t, ca1.addr4.Addr(), 2); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*container{ca1, ca2, ca3} {
		c.remove(t)
	}
	if err := na.remove(); err != nil {
		t.Fatal(err)
	}
	if keys := kvKeys(t, agent, prefix+"networks/"); len(keys) != 0 {
		t.Errorf("keys left after the last host removed the network: %v", keys)
	}
}

// TestProtocolForeignView restarts a host's plugin on a view of the store
// that shows none of its networks (a changed KV_PREFIX; a token that
// cannot read the prefix or a lost state.db look the same). Its running
// containers must keep their traffic, and the log must say what is wrong;
// back on the right prefix, it carries on.
func TestProtocolForeignView(t *testing.T) {
	c := newCluster(t, 2)
	a, b := c.plugins[0], c.plugins[1]
	spec := netSpec{subnet4: "10.42.0.0/24", opts: map[string]string{"name": "fv"}}
	na, err := a.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := b.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	ca1, ca2, cb := na.run(t), na.run(t), nb.run(t)
	eventually(t, 10*time.Second, func() error { return ca1.ping(t, cb.addr4.Addr(), 1) })
	linksBefore := ourLinks(t, a.host)

	a.stop(syscall.SIGKILL)
	a.setEnv("KV_PREFIX", "co-other-"+randomID()[:8]+"/")
	a.start()
	// Give the plugin time to restore (and, if it were wrong, to wipe).
	time.Sleep(3 * time.Second)
	if got := ourLinks(t, a.host); !slices.Equal(got, linksBefore) {
		t.Fatalf("a plugin on an empty view changed the kernel\nbefore: %v\nafter:  %v", linksBefore, got)
	}
	if err := ca1.ping(t, ca2.addr4.Addr(), 3); err != nil {
		t.Fatalf("local traffic lost on an empty view: %v", err)
	}
	if err := ca1.ping(t, cb.addr4.Addr(), 3); err != nil {
		t.Fatalf("cross-host traffic lost on an empty view: %v", err)
	}
	log, _ := os.ReadFile(a.logf)
	if !strings.Contains(strings.ToLower(string(log)), "kv_prefix") {
		t.Errorf("the log does not say what to check (KV_PREFIX):\n%s", tail(string(log), 20))
	}

	// Back on the right prefix: everything is as before and usable.
	a.stop(syscall.SIGTERM)
	a.setEnv("KV_PREFIX", c.prefix)
	a.start()
	ca3 := na.run(t)
	eventually(t, 10*time.Second, func() error { return ca3.ping(t, cb.addr4.Addr(), 1) })
	for _, x := range []*container{ca1, ca2, ca3} {
		x.remove(t)
	}
	cb.remove(t)
	for _, n := range []*dockerNet{na, nb} {
		if err := n.remove(); err != nil {
			t.Fatal(fmt.Errorf("network rm: %w", err))
		}
	}
}

// TestRestartAfterEviction: host A is evicted (`consul-overlay evict
// --force` from host B, as for a host cut off longer than HOST_GRACE) while
// its plugin is down, with a container running. The restarted plugin finds
// nothing of A in the store while that container holds its endpoint: it
// takes its state from DATA_DIR/driver-state.json, serves, and its
// liveness check writes the network and the endpoint back, so B reaches
// the container again. Before, it refused every call until the container
// was removed.
func TestRestartAfterEviction(t *testing.T) {
	c := newCluster(t, 2)
	a := c.plugins[0]
	na, nb, ca, cb := c.connected(t, netSpec{subnet4: "10.43.0.0/24", opts: map[string]string{"name": "ev"}})
	epKey := c.prefix + "networks/name-ev/endpoints/" + ca.eid
	if !slices.Contains(kvKeys(t, c.consul, c.prefix), epKey) {
		t.Fatalf("no record %s of A's container", epKey)
	}
	id := readHostID(t, a.data)
	eventually(t, 5*time.Second, func() error { // the state copy follows
		if b, err := os.ReadFile(filepath.Join(a.data, "driver-state.json")); err != nil || !strings.Contains(string(b), ca.eid) {
			return fmt.Errorf("no endpoint %s in the state copy: %v", ca.eid, err)
		}
		return nil
	})
	a.stop(syscall.SIGKILL)
	cmd := exec.Command("nsenter", "--net="+c.hosts[1].NS.Path, pluginBinary(t), "evict", "--force", id)
	cmd.Env = append(os.Environ(), "CONSUL_HTTP_ADDR="+c.consul.Addr, "KV_PREFIX="+c.prefix)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("evict A: %v\n%s", err, out)
	}
	if slices.Contains(kvKeys(t, c.consul, c.prefix), epKey) {
		t.Fatal("the eviction left A's endpoint record: the test proves nothing")
	}

	a.start()
	// It restores (a Leave of an unknown endpoint waits for that) and its
	// liveness check writes back what it runs: B reaches the container.
	eventually(t, 30*time.Second, func() error {
		return a.call("/NetworkDriver.Leave", map[string]any{"NetworkID": na.id, "EndpointID": randomID()}, nil)
	})
	eventually(t, 30*time.Second, func() error {
		if !slices.Contains(kvKeys(t, c.consul, c.prefix), epKey) {
			return fmt.Errorf("record %s not written back", epKey)
		}
		return cb.ping(t, ca.addr4.Addr(), 1)
	})
	// And it serves: a second container on A.
	ca2 := na.run(t)
	eventually(t, 10*time.Second, func() error { return cb.ping(t, ca2.addr4.Addr(), 1) })
	log, _ := os.ReadFile(a.logf)
	if !strings.Contains(string(log), "taken from the state copy") {
		t.Errorf("the log does not say the state came from the copy:\n%s", tail(string(log), 20))
	}
	for _, x := range []*container{ca, ca2, cb} {
		x.remove(t)
	}
	for _, n := range []*dockerNet{na, nb} {
		if err := n.remove(); err != nil {
			t.Fatal(fmt.Errorf("network rm: %w", err))
		}
	}
	eventually(t, 10*time.Second, func() error {
		if keys := stateKeys(t, c.consul, c.prefix); len(keys) > 0 {
			return fmt.Errorf("keys left after teardown: %v", keys)
		}
		return nil
	})
}

// TestVTEPChangePeersFollow moves host A to a new underlay address (the
// source of its default route, as when DHCP hands out another lease): B's
// peers of A's containers switch to the new address, and traffic resumes.
func TestVTEPChangePeersFollow(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 2, testenv.UnderlayOptions{})
	a, b := hosts[0], hosts[1]
	a.NS.MustRun(t, "ip", "addr", "add", "192.0.2.101/24", "dev", a.Link)
	a.NS.MustRun(t, "ip", "route", "add", "default", "via", "192.0.2.254", "dev", a.Link, "src", a.Addr.String())
	agent := testenv.StartConsul(t, testenv.WithNetNS(a.NS.Path), testenv.WithBindAddr(a.Addr.String()))
	prefix := "co-vtep2-" + randomID()[:8] + "/"
	pa := startPluginEnv(t, "hostA", a, agent.Addr, prefix, "VTEP_ADDR=")
	pb := startPlugin(t, "hostB", b, agent.Addr, prefix)
	spec := netSpec{subnet4: "10.43.0.0/24", opts: map[string]string{"name": "mv"}}
	na, err := pa.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := pb.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	ca, cb := na.run(t), nb.run(t)
	eventually(t, 10*time.Second, func() error { return cb.ping(t, ca.addr4.Addr(), 1) })

	start := time.Now()
	a.NS.MustRun(t, "ip", "route", "replace", "default", "via", "192.0.2.254", "dev", a.Link, "src", "192.0.2.101")
	eventually(t, 10*time.Second, func() error {
		out, err := b.NS.Run(t, "bridge", "fdb", "show", "dev", "vx-001000")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, ca.mac+" ") && strings.Contains(line, "dst 192.0.2.101") {
				return nil
			}
		}
		return fmt.Errorf("B's FDB does not send %s to A's new address yet:\n%s", ca.mac, out)
	})
	t.Logf("B's peers follow A's new underlay address %s after the change", time.Since(start).Round(time.Millisecond))
	if err := cb.ping(t, ca.addr4.Addr(), 3); err != nil {
		t.Fatalf("traffic after the move: %v", err)
	}
	cb.remove(t)
	ca.remove(t)
	for _, n := range []*dockerNet{na, nb} {
		if err := n.remove(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestUpgradeAdoptsLegacyIdentity: a host whose records an earlier version
// keyed by its node name (before host identities) keeps them after the
// upgrade: DATA_DIR has no host-id, the store has its membership and
// endpoint under the node name, and the upgraded plugin adopts the name as
// its identity, restores the network and serves it.
func TestUpgradeAdoptsLegacyIdentity(t *testing.T) {
	c := newCluster(t, 2)
	a := c.plugins[0]
	na, nb, ca, cb := c.connected(t, netSpec{subnet4: "10.44.0.0/24", opts: map[string]string{"name": "up"}})

	// Turn A's records into what the earlier version wrote: membership and
	// endpoints keyed by node name ("host0"), no host-id, no members/ or
	// hosts/ record of A.
	a.stop(syscall.SIGKILL)
	id := readHostID(t, a.data)
	kv := consulClient(t, c.consul).KV()
	pairs, _, err := kv.List(c.prefix, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pairs {
		rel := strings.TrimPrefix(p.Key, c.prefix)
		switch {
		case rel == "hosts/"+id || rel == "members/"+id:
			if _, err := kv.Delete(p.Key, nil); err != nil {
				t.Fatal(err)
			}
		case strings.HasPrefix(rel, "networks/") && strings.Contains(rel, "/config/peers/"):
			// The older layout has no peer records.
			if _, err := kv.Delete(p.Key, nil); err != nil {
				t.Fatal(err)
			}
		case strings.HasPrefix(rel, "networks/") && strings.HasSuffix(rel, "/config"):
			var n map[string]any
			if err := kvstore.Decode(p.Value, &n); err != nil {
				t.Fatal(err)
			}
			hosts := n["hosts"].(map[string]any)
			m := hosts[id].(map[string]any)
			m["network_id"] = m["network_ids"].([]any)[0]
			delete(m, "network_ids")
			delete(hosts, id)
			hosts["host0"] = m
			putEncoded(t, kv, p.Key, n)
		case strings.HasPrefix(rel, "networks/") && strings.Contains(rel, "/endpoints/"):
			var e map[string]any
			if err := kvstore.Decode(p.Value, &e); err != nil {
				t.Fatal(err)
			}
			if e["host_id"] != id {
				continue
			}
			delete(e, "host_id")
			putEncoded(t, kv, p.Key, e)
		}
	}
	if err := os.Remove(filepath.Join(a.data, hostid.IDFile)); err != nil {
		t.Fatal(err)
	}

	a.start()
	eventually(t, 10*time.Second, func() error {
		b, err := os.ReadFile(filepath.Join(a.data, hostid.IDFile))
		if err != nil {
			return err
		}
		if got := strings.TrimSpace(string(b)); got != "node-name:host0" {
			t.Fatalf("upgraded host's identity file holds %q, want its node name host0 adopted (node-name:host0)", got)
		}
		if id, err := hostid.Read(a.data); err != nil || id != "host0" {
			t.Fatalf("hostid.Read = %q, %v; want host0", id, err)
		}
		return nil
	})
	// The network is served: a new container joins it and reaches B.
	ca2 := na.run(t)
	eventually(t, 10*time.Second, func() error { return cb.ping(t, ca2.addr4.Addr(), 1) })
	if err := cb.ping(t, ca.addr4.Addr(), 2); err != nil {
		t.Fatalf("the old container lost traffic across the upgrade: %v", err)
	}
	for _, x := range []*container{ca, ca2, cb} {
		x.remove(t)
	}
	for _, n := range []*dockerNet{na, nb} {
		if err := n.remove(); err != nil {
			t.Fatal(err)
		}
	}
	if keys := kvKeys(t, c.consul, c.prefix+"networks/"); len(keys) != 0 {
		t.Errorf("keys left after the upgraded host and B removed the network: %v", keys)
	}
}

func putEncoded(t *testing.T, kv *api.KV, key string, v any) {
	t.Helper()
	b, err := kvstore.Encode(v)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(&api.KVPair{Key: key, Value: b}, nil); err != nil {
		t.Fatal(err)
	}
}
