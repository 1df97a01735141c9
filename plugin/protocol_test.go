package main

import (
	"fmt"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

// cluster is a set of test hosts sharing one Consul, each running the
// plugin in its own network namespace.
type cluster struct {
	hosts   []*testenv.Host
	plugins []*pluginProc
	consul  *testenv.ConsulAgent
	prefix  string
}

func newCluster(t *testing.T, n int) *cluster {
	t.Helper()
	requireNsenter(t)
	c := &cluster{prefix: "co-test-" + randomID()[:8] + "/"}
	c.hosts = testenv.NewUnderlay(t, n, testenv.UnderlayOptions{})
	// One Consul for the cluster, reachable over the underlay.
	c.consul = testenv.StartConsul(t, testenv.WithNetNS(c.hosts[0].NS.Path), testenv.WithBindAddr(c.hosts[0].Addr.String()))
	for i, h := range c.hosts {
		c.plugins = append(c.plugins, startPlugin(t, fmt.Sprintf("host%d", i), h, c.consul.Addr, c.prefix))
	}
	return c
}

// snapshot is what "changes nothing" compares: KV keys and our links.
func (c *cluster) snapshot(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	keys := kvKeys(t, c.consul, c.prefix)
	slices.Sort(keys)
	fmt.Fprintf(&b, "kv: %v\n", keys)
	for i, h := range c.hosts {
		fmt.Fprintf(&b, "host%d links: %v\n", i, ourLinks(t, h))
	}
	return b.String()
}

// connected creates network spec on hosts 0 and 1, runs a container on
// each, and waits until the second reaches the first.
func (c *cluster) connected(t *testing.T, spec netSpec) (na, nb *dockerNet, ca, cb *container) {
	t.Helper()
	na, err := c.plugins[0].createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	nb, err = c.plugins[1].createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	ca, cb = na.run(t), nb.run(t)
	eventually(t, 10*time.Second, func() error { return cb.ping(t, ca.addr4.Addr(), 1) })
	return na, nb, ca, cb
}

func TestProtocolMultiHost(t *testing.T) {
	c := newCluster(t, 3)
	a, b, x := c.plugins[0], c.plugins[1], c.plugins[2]

	spec := netSpec{subnet4: "10.10.0.0/24", subnet6: "fd00:10::/64", opts: map[string]string{"name": "app"}}
	nets := make([]*dockerNet, 3)
	for i, p := range c.plugins {
		n, err := p.createNetwork(spec)
		if err != nil {
			t.Fatalf("host%d: create network app: %v", i, err)
		}
		nets[i] = n
	}

	// Two containers per host, all on one segment.
	var ctrs []*container
	for _, n := range nets {
		ctrs = append(ctrs, n.run(t), n.run(t))
	}

	t.Run("unique addresses", func(t *testing.T) {
		seen := map[string]bool{}
		for _, ct := range ctrs {
			for _, a := range []string{ct.addr4.Addr().String(), ct.addr6.Addr().String()} {
				if seen[a] {
					t.Fatalf("address %s handed out twice", a)
				}
				seen[a] = true
			}
			if ct.addr4.Addr().String() == strings.Split(nets[0].gw4, "/")[0] {
				t.Fatalf("container got the gateway address %s", ct.addr4)
			}
		}
		for i := 1; i < len(nets); i++ {
			if nets[i].gw4 != nets[0].gw4 || nets[i].pool4 != nets[0].pool4 {
				t.Fatalf("host%d got pool %s gateway %s; host0 got %s %s", i, nets[i].pool4, nets[i].gw4, nets[0].pool4, nets[0].gw4)
			}
		}
	})

	t.Run("cross-host ping IPv4 and IPv6", func(t *testing.T) {
		src := ctrs[0]
		for _, dst := range ctrs[1:] {
			eventually(t, 10*time.Second, func() error { return src.ping(t, dst.addr4.Addr(), 1) })
			eventually(t, 10*time.Second, func() error { return src.ping(t, dst.addr6.Addr(), 1) })
		}
		// And back from the third host.
		if err := ctrs[5].ping(t, ctrs[0].addr4.Addr(), 3); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("host reaches its endpoints through the gateway", func(t *testing.T) {
		out, err := c.hosts[1].NS.Run(t, "ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "2", ctrs[2].addr4.Addr().String())
		if err != nil {
			t.Fatalf("host1 ping its container: %v\n%s", err, out)
		}
	})

	t.Run("isolation between networks", func(t *testing.T) {
		other, err := a.createNetwork(netSpec{subnet4: "10.11.0.0/24", opts: map[string]string{"name": "other"}})
		if err != nil {
			t.Fatal(err)
		}
		otherB, err := b.createNetwork(netSpec{subnet4: "10.11.0.0/24", opts: map[string]string{"name": "other"}})
		if err != nil {
			t.Fatal(err)
		}
		intruder := other.run(t)
		peer := otherB.run(t)
		eventually(t, 10*time.Second, func() error { return intruder.ping(t, peer.addr4.Addr(), 1) })
		// Give the intruder an address in app's subnet: still no path.
		if out, err := intruder.ns.Run(t, "ip", "addr", "add", "10.10.0.250/24", "dev", "eth0"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		for _, dst := range []*container{ctrs[0], ctrs[2]} {
			if err := intruder.ping(t, dst.addr4.Addr(), 2); err == nil {
				t.Fatalf("container on network other reached %s on network app", dst.addr4)
			}
		}
		intruder.remove(t)
		peer.remove(t)
		if err := other.remove(); err != nil {
			t.Fatal(err)
		}
		if err := otherB.remove(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("misuse is refused and changes nothing", func(t *testing.T) {
		solo, err := a.createNetwork(netSpec{subnet4: "10.50.0.0/24", opts: map[string]string{"name": "solo"}})
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := solo.remove(); err != nil {
				t.Error(err)
			}
		}()
		before := c.snapshot(t)
		cases := []struct {
			name string
			p    *pluginProc
			spec netSpec
			want string
		}{
			{"same name, other subnet", b, netSpec{subnet4: "10.20.0.0/24", opts: map[string]string{"name": "solo"}}, "already exists with subnet 10.50.0.0/24"},
			{"subnet of another network", x, netSpec{subnet4: "10.10.0.0/24", opts: map[string]string{"name": "clash"}}, "10.10.0.0/24"},
			{"overlapping subnet", x, netSpec{subnet4: "10.10.0.0/16", opts: map[string]string{"name": "wide"}}, "10.10.0.0/24"},
			{"vni out of range", x, netSpec{subnet4: "10.30.0.0/24", opts: map[string]string{"name": "v", "vni": "16777216"}}, "vni"},
			{"vni taken", x, netSpec{subnet4: "10.31.0.0/24", opts: map[string]string{"name": "v2", "vni": fmt.Sprint(c.appVNI(t))}}, "taken"},
			{"mtu out of range", x, netSpec{subnet4: "10.32.0.0/24", opts: map[string]string{"name": "m", "mtu": "100"}}, "mtu"},
			{"mtu above the underlay", x, netSpec{subnet4: "10.33.0.0/24", opts: map[string]string{"name": "m2", "mtu": "9000"}}, "mtu"},
			{"unknown option", x, netSpec{subnet4: "10.34.0.0/24", opts: map[string]string{"name": "u", "colour": "blue"}}, "unknown option colour"},
			{"foreign IPAM", x, netSpec{subnet4: "10.35.0.0/24", opts: map[string]string{"name": "f"}, space: "LocalDefault", foreign: true}, "--ipam-driver consul-overlay"},
		}
		for _, tc := range cases {
			_, err := tc.p.createNetwork(tc.spec)
			if err == nil {
				t.Errorf("%s: network created, want an error containing %q", tc.name, tc.want)
				continue
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: error %q does not mention %q", tc.name, err, tc.want)
			}
			t.Logf("%s: %v", tc.name, err)
		}
		if after := c.snapshot(t); after != before {
			t.Fatalf("refused requests changed state:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})

	// Changed by issue 11 (package cluster): a second Docker network of one
	// logical network on a host (Docker's retry under a new ID after a
	// crash) is accepted and shares the overlay; removing it keeps the
	// overlay for the first.
	t.Run("a second Docker network of one logical network shares its overlay", func(t *testing.T) {
		before := ourLinks(t, c.hosts[2])
		// As Docker does it: pool and gateway from IPAM, CreateNetwork;
		// then DeleteNetwork, gateway and pool released.
		second, err := x.createNetwork(spec)
		if err != nil {
			t.Fatalf("host2: second Docker network of app: %v", err)
		}
		if err := second.remove(); err != nil {
			t.Fatalf("host2: remove the second Docker network of app: %v", err)
		}
		if after := ourLinks(t, c.hosts[2]); !slices.Equal(before, after) {
			t.Fatalf("links of host2 changed: %v, then %v", before, after)
		}
		if err := ctrs[0].ping(t, ctrs[4].addr4.Addr(), 2); err != nil {
			t.Fatalf("host2's container unreachable after the second network went: %v", err)
		}
	})

	t.Run("replayed and unknown calls are idempotent", func(t *testing.T) {
		ct := ctrs[1]
		// A second CreateEndpoint for the same endpoint is success.
		a.must("/NetworkDriver.CreateEndpoint", map[string]any{"NetworkID": ct.n.id, "EndpointID": ct.eid, "Interface": map[string]string{"Address": ct.addr4.String(), "AddressIPv6": ct.addr6.String(), "MacAddress": ct.mac}}, nil)
		for _, m := range []string{"/NetworkDriver.Leave", "/NetworkDriver.DeleteEndpoint"} {
			a.must(m, map[string]any{"NetworkID": ct.n.id, "EndpointID": randomID()}, nil)
		}
		a.must("/NetworkDriver.DeleteNetwork", map[string]any{"NetworkID": randomID()}, nil)
	})

	t.Run("teardown leaves nothing", func(t *testing.T) {
		for _, ct := range ctrs {
			ct.remove(t)
		}
		for i, n := range nets {
			if err := n.remove(); err != nil {
				t.Fatalf("host%d: %v", i, err)
			}
		}
		// The veth pairs and the join records go in the background
		// (driver/background.go): wait for them, as for any eventual
		// removal, and fail if anything stays.
		eventually(t, 10*time.Second, func() error {
			for i, h := range c.hosts {
				if l := ourLinks(t, h); len(l) > 0 {
					return fmt.Errorf("host%d: links left: %v", i, l)
				}
			}
			if keys := stateKeys(t, c.consul, c.prefix); len(keys) > 0 {
				return fmt.Errorf("keys left in Consul: %v", keys)
			}
			return nil
		})
	})
}

// appVNI reads the VNI the cluster allocated to network "app".
func (c *cluster) appVNI(t *testing.T) uint32 {
	t.Helper()
	var info struct{ Value map[string]string }
	for _, k := range kvKeys(t, c.consul, c.prefix+"vnis/") {
		var v uint32
		if _, err := fmt.Sscanf(strings.TrimPrefix(k, c.prefix+"vnis/"), "%d", &v); err == nil {
			return v
		}
	}
	_ = info
	t.Fatal("no vni reserved")
	return 0
}

func TestProtocolRestart(t *testing.T) {
	c := newCluster(t, 2)
	b := c.plugins[1]
	na, nb, ca, cb := c.connected(t, netSpec{subnet4: "10.40.0.0/24", opts: map[string]string{"name": "restart"}})

	// A continuous ping across hosts while host b's plugin is killed and
	// restarted: the kernel state must carry every packet.
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := ca.ns.Run(t, "ping", "-n", "-q", "-c", "150", "-i", "0.02", "-W", "1", cb.addr4.Addr().String())
		done <- result{out, err}
	}()
	time.Sleep(500 * time.Millisecond)
	b.stop(syscall.SIGKILL)
	// While it is down, leave devices of a network that no longer exists.
	for _, args := range [][]string{
		{"ip", "link", "add", "vxbr-00abcd", "type", "bridge"},
		{"ip", "link", "set", "vxbr-00abcd", "alias", ownerMarkOf(t, c.prefix, c.consul.Addr)},
	} {
		if out, err := c.hosts[1].NS.Run(t, args...); err != nil {
			t.Fatalf("%v: %v %s", args, err, out)
		}
	}
	time.Sleep(300 * time.Millisecond)
	b.start()
	r := <-done
	if r.err != nil || !strings.Contains(r.out, " 0% packet loss") {
		t.Fatalf("ping across the plugin restart lost packets: %v\n%s", r.err, r.out)
	}
	t.Logf("ping during kill -9 and restart: %s", strings.TrimSpace(tail(r.out, 2)))

	eventually(t, 10*time.Second, func() error {
		if l := ourLinks(t, c.hosts[1]); slices.Contains(l, "vxbr-00abcd") {
			return fmt.Errorf("leftover bridge of a removed network still there after restart: %v", l)
		}
		return nil
	})

	// The restarted plugin knows its old endpoint and network...
	c2 := nb.run(t)
	eventually(t, 10*time.Second, func() error { return c2.ping(t, ca.addr4.Addr(), 1) })
	eventually(t, 10*time.Second, func() error { return c2.ping(t, cb.addr4.Addr(), 1) })

	// Consul down: running containers keep their connectivity, and calls
	// that need Consul fail with a clear error within seconds, never hang.
	c.consul.Stop()
	if err := ca.ping(t, cb.addr4.Addr(), 5); err != nil {
		t.Fatalf("connectivity lost while Consul is down: %v", err)
	}
	start := time.Now()
	_, err := b.createNetwork(netSpec{subnet4: "10.41.0.0/24", opts: map[string]string{"name": "down"}})
	if err == nil || !strings.Contains(err.Error(), "unavailable") {
		t.Fatalf("create network with Consul down: %v, want a store-unavailable error", err)
	}
	t.Logf("with Consul down, network create failed after %s: %v", time.Since(start).Round(time.Millisecond), err)
	var caps map[string]any
	b.must("/NetworkDriver.GetCapabilities", nil, &caps)
	c.consul.Start()
	// The dev agent came back empty: each plugin claims its host record
	// again with a new session.
	start = time.Now()
	eventually(t, 15*time.Second, func() error {
		if keys := kvKeys(t, c.consul, c.prefix+hostsPrefix); len(keys) != len(c.plugins) {
			return fmt.Errorf("host records after Consul lost its state: %v, want %d", keys, len(c.plugins))
		}
		return nil
	})
	t.Logf("host records claimed again %s after Consul came back", time.Since(start).Round(time.Millisecond))

	// ...and accepts Leave/DeleteEndpoint for endpoints created before the crash.
	cb.remove(t)
	c2.remove(t)
	ca.remove(t)
	if err := nb.remove(); err != nil {
		t.Fatal(err)
	}
	if err := na.remove(); err != nil {
		t.Fatal(err)
	}
	for i, h := range c.hosts {
		if l := ourLinks(t, h); len(l) > 0 {
			t.Errorf("host%d: links left: %v", i, l)
		}
	}
	if keys := stateKeys(t, c.consul, c.prefix); len(keys) > 0 {
		t.Errorf("keys left in Consul: %v", keys)
	}
}
