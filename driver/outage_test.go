package driver

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/kvstore"
)

// outageStore is a store that can be switched unreachable: every call
// then fails with kvstore.ErrUnavailable, as the Consul store's do.
type outageStore struct {
	kvstore.Store
	down atomic.Bool
}

func (s *outageStore) fail(op, key string) error {
	if s.down.Load() {
		return fmt.Errorf("consul kv %s %q: %w: connection refused", op, key, kvstore.ErrUnavailable)
	}
	return nil
}

func (s *outageStore) Get(ctx context.Context, key string) (*kvstore.Pair, error) {
	if err := s.fail("get", key); err != nil {
		return nil, err
	}
	return s.Store.Get(ctx, key)
}

func (s *outageStore) List(ctx context.Context, prefix string) ([]*kvstore.Pair, error) {
	if err := s.fail("list", prefix); err != nil {
		return nil, err
	}
	return s.Store.List(ctx, prefix)
}

func (s *outageStore) Put(ctx context.Context, key string, v []byte) error {
	if err := s.fail("put", key); err != nil {
		return err
	}
	return s.Store.Put(ctx, key, v)
}

func (s *outageStore) Create(ctx context.Context, key string, v []byte) error {
	if err := s.fail("create", key); err != nil {
		return err
	}
	return s.Store.Create(ctx, key, v)
}

func (s *outageStore) CAS(ctx context.Context, key string, v []byte, index uint64) error {
	if err := s.fail("cas", key); err != nil {
		return err
	}
	return s.Store.CAS(ctx, key, v, index)
}

func (s *outageStore) Delete(ctx context.Context, key string) error {
	if err := s.fail("delete", key); err != nil {
		return err
	}
	return s.Store.Delete(ctx, key)
}

func (s *outageStore) DeleteCAS(ctx context.Context, key string, index uint64) error {
	if err := s.fail("delete-cas", key); err != nil {
		return err
	}
	return s.Store.DeleteCAS(ctx, key, index)
}

func (s *outageStore) Txn(ctx context.Context, ops []kvstore.Op) error {
	if err := s.fail("txn", "txn"); err != nil {
		return err
	}
	return s.Store.Txn(ctx, ops)
}

// TestStoreOutage: while the store is unreachable, Join of an endpoint
// whose record exists, Leave and DeleteEndpoint go on (the veth goes at
// once); the removed endpoint keeps its address meanwhile; once the store
// answers again the driver deletes its record and releases its address
// without a restart, and nothing else changed.
func TestStoreOutage(t *testing.T) {
	old := catchUpInterval
	catchUpInterval = 50 * time.Millisecond
	t.Cleanup(func() { catchUpInterval = old })

	path := filepath.Join(t.TempDir(), "s.db")
	store := &outageStore{Store: openStore(t, path)}
	dp := newFake()
	var mu sync.Mutex
	var released []string
	d, err := New(Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), Shared: true,
		OwnsAddressSpace: func(s string) bool { return s == "ours" },
		ReclaimAddress: func(_ context.Context, space string, subnet netip.Prefix, a netip.Addr, mac string, _ time.Time) error {
			if store.down.Load() {
				return fmt.Errorf("release %s: %w", a, kvstore.ErrUnavailable)
			}
			mu.Lock()
			defer mu.Unlock()
			released = append(released, fmt.Sprintf("%s %s %s", space, subnet, a))
			return nil
		}}, store, dp)
	if err != nil {
		t.Fatal(err)
	}
	d.Start()
	t.Cleanup(func() { d.Close() })
	<-d.Ready()
	if err := d.CreateNetwork(createReq("net-a", map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	for i, id := range []string{"ep1", "ep2"} {
		if _, err := d.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "net-a", EndpointID: id,
			Interface: &network.EndpointInterface{Address: fmt.Sprintf("10.1.0.%d/24", i+2)}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.Join(&network.JoinRequest{NetworkID: "net-a", EndpointID: "ep1", SandboxKey: "/var/run/docker/netns/x"}); err != nil {
		t.Fatal(err)
	}
	// Join's record of the container goes to the store in the background.
	waitFor(t, func() bool { return slices.Contains(allKeys(t, store.Store), "joins/a/ep1") })
	keysBefore := allKeys(t, store.Store)

	store.down.Store(true)
	// Join of an endpoint whose record exists needs no store.
	if _, err := d.Join(&network.JoinRequest{NetworkID: "net-a", EndpointID: "ep2", SandboxKey: "/var/run/docker/netns/y"}); err != nil {
		t.Fatalf("Join during the outage: %v", err)
	}
	if err := d.Leave(&network.LeaveRequest{NetworkID: "net-a", EndpointID: "ep1"}); err != nil {
		t.Fatalf("Leave during the outage: %v", err)
	}
	if err := d.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "net-a", EndpointID: "ep1"}); err != nil {
		t.Fatalf("DeleteEndpoint during the outage: %v", err)
	}
	if _, n := dp.counts(); n != 1 {
		t.Fatalf("%d veths after removing ep1 during the outage, want 1 (ep2)", n)
	}
	if !d.AddressUsed(netip.MustParsePrefix("10.1.0.0/24"), netip.MustParseAddr("10.1.0.2")) {
		t.Fatal("the address of an endpoint whose record could not go yet is free for IPAM")
	}
	// Calls that need the store fail at once and name it.
	_, err = d.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "net-a", EndpointID: "ep3",
		Interface: &network.EndpointInterface{Address: "10.1.0.9/24"}})
	if err == nil || !strings.Contains(err.Error(), kvstore.ErrUnavailable.Error()) {
		t.Fatalf("CreateEndpoint during the outage: %v, want the store unavailable", err)
	}
	time.Sleep(5 * catchUpInterval)
	if keys := allKeys(t, store.Store); !slices.Equal(keys, keysBefore) {
		t.Fatalf("store changed during the outage: %v, was %v", keys, keysBefore)
	}

	store.down.Store(false)
	waitFor(t, func() bool {
		for _, k := range allKeys(t, store.Store) {
			if strings.Contains(k, "ep1") {
				return false
			}
		}
		return true
	})
	waitFor(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(released) == 1
	})
	if want := "ours 10.1.0.0/24 10.1.0.2"; released[0] != want {
		t.Fatalf("released %v, want [%s]", released, want)
	}
	var ep2 bool
	for _, k := range allKeys(t, store.Store) {
		ep2 = ep2 || strings.Contains(k, "ep2")
	}
	if !ep2 {
		t.Fatal("ep2's record went with ep1's")
	}
	if d.AddressUsed(netip.MustParsePrefix("10.1.0.0/24"), netip.MustParseAddr("10.1.0.2")) {
		t.Fatal("ep1's address still counted as used after the catch-up")
	}
}
