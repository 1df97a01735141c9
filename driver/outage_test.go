package driver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
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

// releases records a driver's address reclaims, as "space subnet address".
type releases struct {
	mu  sync.Mutex
	got []string
}

// list returns the reclaims so far, sorted.
func (r *releases) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Sorted(slices.Values(r.got))
}

// startOutageDriver starts a driver of host "a" on store, ready, whose
// address reclaims fail while down is set (the store unreachable) and are
// recorded otherwise; catchUp runs every 50 ms during the test. dp is its
// data plane (nil: a new fake) and pendingDir its Config.PendingDir.
func startOutageDriver(t *testing.T, store kvstore.Store, down *atomic.Bool, dp *fakeDataplane, pendingDir string) (*Driver, *fakeDataplane, *releases) {
	t.Helper()
	old := catchUpInterval
	catchUpInterval = 50 * time.Millisecond
	t.Cleanup(func() { catchUpInterval = old })
	if dp == nil {
		dp = newFake()
	}
	rel := &releases{}
	d, err := New(Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), Shared: true, PendingDir: pendingDir,
		OwnsAddressSpace: func(s string) bool { return s == "ours" },
		ReclaimAddress: func(_ context.Context, space string, subnet netip.Prefix, a netip.Addr, _ string, _ time.Time) error {
			if down.Load() {
				return fmt.Errorf("release %s: %w", a, kvstore.ErrUnavailable)
			}
			rel.mu.Lock()
			defer rel.mu.Unlock()
			rel.got = append(rel.got, fmt.Sprintf("%s %s %s", space, subnet, a))
			return nil
		}}, store, dp)
	if err != nil {
		t.Fatal(err)
	}
	d.Start()
	t.Cleanup(func() { d.Close() })
	<-d.Ready()
	return d, dp, rel
}

// appNetwork creates network net-a ("app", 10.1.0.0/24) on d and, in it,
// endpoints ids at 10.1.0.2, 10.1.0.3 and so on.
func appNetwork(t *testing.T, d *Driver, ids ...string) {
	t.Helper()
	if err := d.CreateNetwork(createReq("net-a", map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	for i, id := range ids {
		if _, err := d.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "net-a", EndpointID: id,
			Interface: &network.EndpointInterface{Address: fmt.Sprintf("10.1.0.%d/24", i+2)}}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestStoreOutage: while the store is unreachable, Join of an endpoint
// whose record exists, Leave and DeleteEndpoint go on (the veth goes at
// once); the removed endpoint keeps its address meanwhile; once the store
// answers again the driver deletes its record and releases its address
// without a restart, and nothing else changed.
func TestStoreOutage(t *testing.T) {
	store := &outageStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
	d, dp, rel := startOutageDriver(t, store, &store.down, nil, "")
	appNetwork(t, d, "ep1", "ep2")
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
	_, err := d.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "net-a", EndpointID: "ep3",
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
	// ep1's address, and ep3's: its create's outcome was unknown (a
	// transaction the store applied without answering looks the same).
	waitFor(t, func() bool { return len(rel.list()) == 2 })
	if released, want := rel.list(), []string{"ours 10.1.0.0/24 10.1.0.2", "ours 10.1.0.0/24 10.1.0.9"}; !slices.Equal(released, want) {
		t.Fatalf("released %v, want %v", released, want)
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

// TestDeletedEndpointStaysDeleted: an endpoint Docker deleted is not
// brought back by a restart that comes before its record is gone: not
// after a delete during a store outage, nor after a kill -9 in the middle
// of a delete that Docker does not send again. The restarted driver
// programs no veth and registers nothing for it, deletes its record and
// join record, and releases its address, while the other endpoint stays.
func TestDeletedEndpointStaysDeleted(t *testing.T) {
	for _, how := range []string{"outage", "deleteendpoint/after-deregister", "deleteendpoint/after-veth"} {
		t.Run(strings.ReplaceAll(how, "/", "_"), func(t *testing.T) {
			store := &outageStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
			dir := filepath.Join(t.TempDir(), PendingDirName)
			d, dp, _ := startOutageDriver(t, store, &store.down, nil, dir)
			appNetwork(t, d, "ep1", "ep2")
			for _, id := range []string{"ep1", "ep2"} {
				if _, err := d.Join(&network.JoinRequest{NetworkID: "net-a", EndpointID: id, SandboxKey: "/var/run/docker/netns/" + id}); err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, func() bool { return slices.Contains(allKeys(t, store.Store), "joins/a/ep1") })
			if err := d.Leave(&network.LeaveRequest{NetworkID: "net-a", EndpointID: "ep1"}); err != nil {
				t.Fatal(err)
			}
			del := func() error {
				return d.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "net-a", EndpointID: "ep1"})
			}
			if how == "outage" {
				store.down.Store(true)
				if err := del(); err != nil {
					t.Fatalf("DeleteEndpoint during the outage: %v", err)
				}
			} else if !crashAt(d, how, func() { _ = del() }) {
				t.Fatalf("DeleteEndpoint never reached %s", how)
			}
			// The plugin stops (a kill -9: nothing more reaches the
			// store), and starts again once the store answers.
			d.Close()
			store.down.Store(false)
			d2, dp2, rel := startOutageDriver(t, store, &store.down, dp, dir)
			ep1 := func() bool {
				return slices.ContainsFunc(allKeys(t, store.Store), func(k string) bool { return strings.Contains(k, "ep1") })
			}
			waitFor(t, func() bool { return !ep1() && len(rel.list()) == 1 })
			if got, want := rel.list(), []string{"ours 10.1.0.0/24 10.1.0.2"}; !slices.Equal(got, want) {
				t.Fatalf("released %v, want %v", got, want)
			}
			veth1, veth2 := dp2.hasEndpoint("ep1"), dp2.hasEndpoint("ep2")
			if veth1 || !veth2 {
				t.Fatalf("after the restart: ep1's veth %v (want gone), ep2's %v (want kept)", veth1, veth2)
			}
			if d2.AddressUsed(netip.MustParsePrefix("10.1.0.0/24"), netip.MustParseAddr("10.1.0.2")) {
				t.Fatal("the deleted endpoint's address still counted as used")
			}
			if !slices.Contains(allKeys(t, store.Store), "networks/name-app/endpoints/ep2") {
				t.Fatal("ep2's record went with ep1's")
			}
			noMarks(t, dir)
		})
	}
}

// appliedStore commits the next transaction that creates an endpoint
// record and then answers as if the store had not: ErrUnavailable, as a
// Consul request that timed out after the servers committed it. With
// thenDown the store is unreachable from that moment on.
type appliedStore struct {
	*outageStore
	armed    atomic.Bool
	thenDown bool
}

func (s *appliedStore) Txn(ctx context.Context, ops []kvstore.Op) error {
	creates := slices.ContainsFunc(ops, func(o kvstore.Op) bool {
		return o.Verb == kvstore.OpCreate && strings.Contains(o.Key, "/endpoints/")
	})
	if !creates || !s.armed.CompareAndSwap(true, false) {
		return s.outageStore.Txn(ctx, ops)
	}
	if err := s.outageStore.Txn(ctx, ops); err != nil {
		return err
	}
	if s.thenDown {
		s.down.Store(true)
	}
	return fmt.Errorf("consul kv txn: %w: context deadline exceeded", kvstore.ErrUnavailable)
}

// TestCreateEndpointAppliedButUnanswered: a CreateEndpoint whose record the
// store committed without the answer reaching the driver fails, and leaves
// no record behind (no other host programs the endpoint, and Docker's
// release of its address is not refused by a ghost): at once if the store
// answers the undo, or, if the store is down by then, once it answers
// again, the address held by the driver until then.
func TestCreateEndpointAppliedButUnanswered(t *testing.T) {
	for _, thenDown := range []bool{false, true} {
		t.Run(fmt.Sprintf("thenDown=%v", thenDown), func(t *testing.T) {
			inner := &outageStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
			store := &appliedStore{outageStore: inner, thenDown: thenDown}
			d, dp, rel := startOutageDriver(t, store, &inner.down, nil, "")
			if err := d.CreateNetwork(createReq("net-a", map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
				t.Fatal(err)
			}
			store.armed.Store(true)
			_, err := d.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "net-a", EndpointID: "ghost",
				Interface: &network.EndpointInterface{Address: "10.1.0.5/24"}})
			if err == nil || !strings.Contains(err.Error(), kvstore.ErrUnavailable.Error()) {
				t.Fatalf("CreateEndpoint whose answer was lost: %v, want the store unavailable", err)
			}
			if store.armed.Load() {
				t.Fatal("the endpoint's transaction never reached the store")
			}
			if _, n := dp.counts(); n != 0 {
				t.Fatalf("%d veths after the failed CreateEndpoint, want 0", n)
			}
			ghost := func() bool {
				return slices.ContainsFunc(allKeys(t, inner.Store), func(k string) bool { return strings.Contains(k, "ghost") })
			}
			addr, subnet := netip.MustParseAddr("10.1.0.5"), netip.MustParsePrefix("10.1.0.0/24")
			if thenDown {
				if !ghost() {
					t.Fatal("the committed record is not in the store: the test commits nothing")
				}
				if !d.AddressUsed(subnet, addr) {
					t.Fatal("the address of a record that could not be removed yet is free for IPAM")
				}
				inner.down.Store(false)
				waitFor(t, func() bool { return len(rel.list()) == 1 })
			}
			waitFor(t, func() bool { return !ghost() })
			if d.AddressUsed(subnet, addr) {
				t.Fatal("the failed endpoint's address still counted as used")
			}
		})
	}
}

// restoringDriver records network app (10.1.0.0/24) with endpoint ep1 at
// 10.1.0.2 on a store, then starts a driver of the same host on dp while
// the store does not answer: it is still restoring when it returns. Set
// store.down to false to let it finish.
func restoringDriver(t *testing.T, dp *fakeDataplane) (*Driver, *outageStore) {
	t.Helper()
	store := &outageStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
	d1 := newHostDriver(t, store, "a", "a", "192.0.2.1", newFake())
	if err := d1.CreateNetwork(createReq("net-a", map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := d1.CreateEndpoint(epReq("net-a", "ep1", "10.1.0.2/24")); err != nil {
		t.Fatal(err)
	}
	d1.Close()
	store.down.Store(true)
	d2, err := New(Config{HostID: "a", Node: "a", VTEP: netip.MustParseAddr("192.0.2.1"), Shared: true}, store, dp)
	if err != nil {
		t.Fatal(err)
	}
	d2.Start()
	t.Cleanup(func() { d2.Close() })
	return d2, store
}

// TestAddressUsedOnceReady: until the driver has restored its state it
// cannot tell which addresses its endpoints hold, so IPAM's question
// (may Docker's release free this address?) is answered "held" after the
// wait; once restored, the endpoints' addresses are held and others not.
func TestAddressUsedOnceReady(t *testing.T) {
	d2, store := restoringDriver(t, newFake())
	subnet := netip.MustParsePrefix("10.1.0.0/24")
	held, free := netip.MustParseAddr("10.1.0.2"), netip.MustParseAddr("10.1.0.7")
	if !d2.AddressUsedOnceReady(subnet, free, 50*time.Millisecond) {
		t.Fatal("a driver still restoring let a release through")
	}
	store.down.Store(false)
	<-d2.Ready()
	if !d2.AddressUsedOnceReady(subnet, held, time.Second) {
		t.Error("the restored endpoint's address is not held")
	}
	if d2.AddressUsedOnceReady(subnet, free, time.Second) {
		t.Error("an address no endpoint holds is held")
	}
}

// TestAddressInContainer: IPAM grants an address again to a request that
// names its record's endpoint only if no running container holds it. The
// driver says so from its endpoints and the kernel: an endpoint's address
// is in a container while the kernel says its interface is; still
// restoring, it cannot tell and answers yes.
func TestAddressInContainer(t *testing.T) {
	dp := newFake()
	d2, store := restoringDriver(t, dp)
	subnet := netip.MustParsePrefix("10.1.0.0/24")
	held, free := netip.MustParseAddr("10.1.0.2"), netip.MustParseAddr("10.1.0.7")
	if !d2.AddressInContainer(subnet, free, 50*time.Millisecond) {
		t.Fatal("a driver still restoring said no container holds an address")
	}
	store.down.Store(false)
	<-d2.Ready()
	if d2.AddressInContainer(subnet, held, time.Second) {
		t.Error("an endpoint whose interface no container holds (its container gone) counts as in a container")
	}
	dp.mu.Lock()
	dp.inUse = map[string]bool{"ep1": true}
	dp.mu.Unlock()
	if !d2.AddressInContainer(subnet, held, time.Second) {
		t.Error("the address of an endpoint whose interface a container holds is not in a container")
	}
	if d2.AddressInContainer(subnet, free, time.Second) {
		t.Error("an address no endpoint holds is in a container")
	}
}

// TestMarkedButInUseKept: a mark to delete an endpoint whose interface a
// container holds (the kernel has the last word) does not take it away at
// the next start: the endpoint is restored live, its record and veth
// stay, and the mark goes.
func TestMarkedButInUseKept(t *testing.T) {
	store := &outageStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
	dir := filepath.Join(t.TempDir(), PendingDirName)
	d, dp, _ := startOutageDriver(t, store, &store.down, nil, dir)
	appNetwork(t, d, "ep1")
	if _, err := d.Join(&network.JoinRequest{NetworkID: "net-a", EndpointID: "ep1", SandboxKey: "/var/run/docker/netns/x"}); err != nil {
		t.Fatal(err)
	}
	if err := (pending{dir: dir}).mark("ep1"); err != nil {
		t.Fatal(err)
	}
	dp.mu.Lock()
	if dp.inUse == nil {
		dp.inUse = map[string]bool{}
	}
	dp.inUse["ep1"] = true
	dp.mu.Unlock()
	d.Close()
	d2, dp2, rel := startOutageDriver(t, store, &store.down, dp, dir)
	time.Sleep(5 * catchUpInterval)
	if !slices.Contains(allKeys(t, store.Store), "networks/name-app/endpoints/ep1") || len(rel.list()) != 0 {
		t.Fatalf("the endpoint a container holds was deleted: keys %v, released %v", allKeys(t, store.Store), rel.list())
	}
	veth := dp2.hasEndpoint("ep1")
	if !veth || !d2.AddressUsed(netip.MustParsePrefix("10.1.0.0/24"), netip.MustParseAddr("10.1.0.2")) {
		t.Fatalf("the endpoint a container holds is not restored live: veth %v", veth)
	}
	noMarks(t, dir)
}

// noMarks fails the test if the pending directory dir holds anything.
func noMarks(t *testing.T, dir string) {
	t.Helper()
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Fatalf("marks left in %s: %v, %v", dir, ents, err)
	}
}

// denyStore refuses, while deny is set, every write to endpoint records,
// as Consul does for a token whose KV rule was narrowed.
type denyStore struct {
	kvstore.Store
	deny atomic.Bool
}

func (s *denyStore) Txn(ctx context.Context, ops []kvstore.Op) error {
	if s.deny.Load() {
		for _, op := range ops {
			if strings.Contains(op.Key, "/endpoints/") {
				return fmt.Errorf("consul kv txn: %w: 403 (Permission denied: token lacks key:write on %q)", kvstore.ErrPermissionDenied, op.Key)
			}
		}
	}
	return s.Store.Txn(ctx, ops)
}

func (s *denyStore) DeleteCAS(ctx context.Context, key string, index uint64) error {
	if s.deny.Load() && strings.Contains(key, "/endpoints/") {
		return fmt.Errorf("consul kv delete %q: %w: 403", key, kvstore.ErrPermissionDenied)
	}
	return s.Store.DeleteCAS(ctx, key, index)
}

// TestDeleteEndpointRefusedFinishesLater: the store refuses to delete an
// endpoint's record (the token's KV rule narrowed). Its service and veth
// are gone by then, so the call fails naming the refusal, and the endpoint
// is removed on this host with its addresses still held; once the store
// takes the deletion, the record goes and the address is released,
// without a restart. Before, the endpoint stayed live in memory with its
// mark cleared: its record and address stayed until a restart, and every
// other host kept it as a peer.
func TestDeleteEndpointRefusedFinishesLater(t *testing.T) {
	store := &denyStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
	var down atomic.Bool
	dir := filepath.Join(t.TempDir(), PendingDirName)
	d, dp, rel := startOutageDriver(t, store, &down, nil, dir)
	appNetwork(t, d, "ep1", "ep2")
	if _, err := d.Join(&network.JoinRequest{NetworkID: "net-a", EndpointID: "ep1", SandboxKey: "/var/run/docker/netns/ep1"}); err != nil {
		t.Fatal(err)
	}
	if err := d.Leave(&network.LeaveRequest{NetworkID: "net-a", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}
	store.deny.Store(true)
	err := d.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "net-a", EndpointID: "ep1"})
	if err == nil || !errors.Is(err, kvstore.ErrPermissionDenied) || !strings.Contains(err.Error(), "ep1") {
		t.Fatalf("DeleteEndpoint refused by the store: %v; want an error naming ep1 and the refusal", err)
	}
	waitFor(t, func() bool { return !dp.hasEndpoint("ep1") })
	if !d.AddressUsed(netip.MustParsePrefix("10.1.0.0/24"), netip.MustParseAddr("10.1.0.2")) {
		t.Fatal("the address of the endpoint whose record is left is free to hand out")
	}
	store.deny.Store(false)
	waitFor(t, func() bool {
		return !slices.Contains(allKeys(t, store.Store), "networks/name-app/endpoints/ep1") && len(rel.list()) == 1
	})
	if d.AddressUsed(netip.MustParsePrefix("10.1.0.0/24"), netip.MustParseAddr("10.1.0.2")) {
		t.Fatal("the deleted endpoint's address still counted as used")
	}
	if !dp.hasEndpoint("ep2") || !slices.Contains(allKeys(t, store.Store), "networks/name-app/endpoints/ep2") {
		t.Fatal("ep2 went with ep1")
	}
	noMarks(t, dir)
}
