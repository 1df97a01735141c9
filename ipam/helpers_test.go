package ipam

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"consul-overlay/kvstore"

	"github.com/docker/go-plugins-helpers/ipam"
)

// backend is a store the behaviour scenarios run against. start prepares
// it once (for Consul: starts an agent) and returns open, which gives each
// scenario an isolated store: newClient returns one client per simulated
// host (for Consul, a separate connection), all sharing the same data.
type backend struct {
	name  string
	start func(t *testing.T) (open func(t *testing.T) (newClient func() kvstore.Store))
}

// backends are the stores every scenario runs against. The in-memory fake
// is always there; integration_test.go adds the embedded store and Consul.
var backends = []backend{{
	name: "mem",
	start: func(*testing.T) func(*testing.T) func() kvstore.Store {
		return func(*testing.T) func() kvstore.Store {
			s := newMemStore()
			return func() kvstore.Store { return s }
		}
	},
}}

type scenario struct {
	name string
	f    func(t *testing.T, c *cluster)
}

// cluster is a set of simulated hosts on one store.
type cluster struct {
	t         *testing.T
	newClient func() kvstore.Store
	inspect   kvstore.Store
}

// TestBehaviour runs every scenario against every backend.
func TestBehaviour(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			open := b.start(t)
			for _, s := range scenarios {
				t.Run(s.name, func(t *testing.T) {
					nc := open(t)
					s.f(t, &cluster{t: t, newClient: nc, inspect: nc()})
				})
			}
		})
	}
}

func testLogger() *slog.Logger {
	if os.Getenv("IPAM_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func (c *cluster) host(node string, mods ...func(*Config)) *Driver {
	c.t.Helper()
	cfg := Config{Node: node, Logger: testLogger(), Timeout: 20 * time.Second}
	for _, m := range mods {
		m(&cfg)
	}
	d, err := New(cfg, c.newClient())
	if err != nil {
		c.t.Fatalf("new driver %s: %v", node, err)
	}
	return d
}

// snapshot returns every key under ipam/ with its value and version.
func (c *cluster) snapshot() map[string]string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pairs, err := c.inspect.List(ctx, keyRoot)
	if err != nil {
		c.t.Fatalf("list %s: %v", keyRoot, err)
	}
	m := map[string]string{}
	for _, p := range pairs {
		m[p.Key] = fmt.Sprintf("%s @%d", p.Value, p.ModifyIndex)
	}
	return m
}

// unchanged fails the test if the store differs from before.
func (c *cluster) unchanged(before map[string]string, what string) {
	c.t.Helper()
	after := c.snapshot()
	if !maps.Equal(before, after) {
		c.t.Errorf("%s changed the store:\nbefore %v\nafter  %v", what, before, after)
	}
}

// empty fails the test if any key is left under ipam/.
func (c *cluster) empty() {
	c.t.Helper()
	if s := c.snapshot(); len(s) != 0 {
		keys := slices.Sorted(maps.Keys(s))
		c.t.Errorf("store not empty after release: %d keys: %v", len(keys), keys)
	}
}

func (c *cluster) addrRecord(poolID string, a string) *addrRecord {
	c.t.Helper()
	ref, err := parsePoolID(poolID)
	if err != nil {
		c.t.Fatal(err)
	}
	key := addrKey(ref.space, ref.subnet, netip.MustParseAddr(a))
	p, err := c.inspect.Get(context.Background(), key)
	if err != nil {
		c.t.Fatalf("get %s: %v", key, err)
	}
	var r addrRecord
	if err := decode(key, p.Value, &r); err != nil {
		c.t.Fatal(err)
	}
	return &r
}

func mustPool(t *testing.T, d *Driver, pool, sub string, v6 bool) *ipam.RequestPoolResponse {
	t.Helper()
	r, err := d.RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: pool, SubPool: sub, V6: v6})
	if err != nil {
		t.Fatalf("request pool %q/%q: %v", pool, sub, err)
	}
	return r
}

func mustAddr(t *testing.T, d *Driver, poolID, addr string, opts map[string]string) string {
	t.Helper()
	r, err := d.RequestAddress(&ipam.RequestAddressRequest{PoolID: poolID, Address: addr, Options: opts})
	if err != nil {
		t.Fatalf("request address %q in %s: %v", addr, poolID, err)
	}
	return r.Address
}

func mustRelease(t *testing.T, d *Driver, poolID, addr string) {
	t.Helper()
	if err := d.ReleaseAddress(&ipam.ReleaseAddressRequest{PoolID: poolID, Address: addr}); err != nil {
		t.Fatalf("release address %s in %s: %v", addr, poolID, err)
	}
}

func mustReleasePool(t *testing.T, d *Driver, poolID string) {
	t.Helper()
	if err := d.ReleasePool(&ipam.ReleasePoolRequest{PoolID: poolID}); err != nil {
		t.Fatalf("release pool %s: %v", poolID, err)
	}
}

var gw = map[string]string{RequestAddressTypeOption: GatewayAddressType}

func ep(name string) map[string]string { return map[string]string{EndpointNameOption: name} }

func hostOf(cidr string) string {
	a, _, _ := strings.Cut(cidr, "/")
	return a
}
