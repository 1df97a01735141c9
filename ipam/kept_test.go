package ipam

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"consul-overlay/kvstore"

	"github.com/docker/go-plugins-helpers/ipam"
)

// TestReleaseKeepsHoldsInUse: a ReleasePool, or a release of the gateway,
// that would leave this host fewer holds than Config.Kept reports (its
// networks with endpoints on the pool) is ignored; one that leaves enough
// is honoured, and with Kept at 0 the last releases remove the pool.
func TestReleaseKeepsHoldsInUse(t *testing.T) {
	s := newMemStore()
	kept := 1
	a, err := New(Config{Node: "a", Logger: testLogger(), Kept: func(string, netip.Addr) int { return kept }}, s)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, inspect: s}
	p := mustPool(t, a, "10.17.0.0/24", "", false).PoolID
	g := mustAddr(t, a, p, "", gw)
	mustPool(t, a, "10.17.0.0/24", "", false) // a second network on the pool
	mustAddr(t, a, p, hostOf(g), gw)
	holds := func() (pool, gateway int) {
		t.Helper()
		n, err := a.NodeHolds(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return n[netip.MustParsePrefix("10.17.0.0/24")], c.addrRecord(p, hostOf(g)).Holders["a"]
	}
	if pl, gh := holds(); pl != 2 || gh != 2 {
		t.Fatalf("two networks: pool held %d times, gateway %d; want 2 and 2", pl, gh)
	}
	// The second network's releases, then the same again (a retried
	// removal): the first pair leaves 1, the second is ignored.
	for range 2 {
		mustRelease(t, a, p, g)
		mustReleasePool(t, a, p)
	}
	if pl, gh := holds(); pl != 1 || gh != 1 {
		t.Errorf("after the releases: pool held %d times, gateway %d; want 1 and 1 (the network with endpoints)", pl, gh)
	}
	kept = 0 // its endpoints are gone
	mustRelease(t, a, p, g)
	mustReleasePool(t, a, p)
	c.empty()
}

// TestReleaseDeferredUntilRestored: while Config.Kept cannot tell
// (KeptUnknown), a ReleasePool and a release of the gateway change
// nothing; once Config.Restored is closed they are applied, Kept asked
// again.
func TestReleaseDeferredUntilRestored(t *testing.T) {
	s := newMemStore()
	var mu sync.Mutex
	kept := KeptUnknown
	restored := make(chan struct{})
	a, err := New(Config{Node: "a", Logger: testLogger(),
		Kept: func(string, netip.Addr) int {
			mu.Lock()
			defer mu.Unlock()
			return kept
		},
		Restored: func() <-chan struct{} { return restored },
	}, s)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, inspect: s}
	p := mustPool(t, a, "10.17.0.0/24", "", false).PoolID
	g := mustAddr(t, a, p, "", gw)
	before := c.snapshot()
	mustRelease(t, a, p, g)
	mustReleasePool(t, a, p)
	c.unchanged(before, "releases while Kept cannot tell")
	mu.Lock()
	kept = 0
	mu.Unlock()
	close(restored)
	deadline := time.Now().Add(5 * time.Second)
	for len(c.snapshot()) != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	c.empty()
}

// slowStore is a memStore whose reads and transactions take delay, or
// fail when the context ends first.
type slowStore struct {
	*memStore
	delay time.Duration
}

func (s slowStore) wait(ctx context.Context) error {
	select {
	case <-time.After(s.delay):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s slowStore) Get(ctx context.Context, key string) (*kvstore.Pair, error) {
	if err := s.wait(ctx); err != nil {
		return nil, err
	}
	return s.memStore.Get(ctx, key)
}

func (s slowStore) Txn(ctx context.Context, ops []kvstore.Op) error {
	if err := s.wait(ctx); err != nil {
		return err
	}
	return s.memStore.Txn(ctx, ops)
}

// A release that arrives while the network driver restores waits for the
// restore before its store time starts: a restore that ends late in the
// wait of InUse (as plugin/main.go's hook waits) no longer leaves the
// store too little of the call's timeout. Before, the release failed with
// the deadline and its hold stayed until the sweep.
func TestReleaseStoreTimeAfterRestore(t *testing.T) {
	s := newMemStore()
	restored := make(chan struct{})
	inUse := func(string, netip.Addr) bool {
		select { // the driver's AddressUsedOnceReady: wait, then answer
		case <-restored:
		case <-time.After(5 * time.Second):
			return true
		}
		return false
	}
	a, err := New(Config{Node: "a", Logger: testLogger(), Timeout: time.Second, InUse: inUse,
		Restored: func() <-chan struct{} { return restored }}, slowStore{s, 0})
	if err != nil {
		t.Fatal(err)
	}
	p := mustPool(t, a, "10.18.0.0/24", "", false).PoolID
	addr := mustAddr(t, a, p, "", ep("web"))
	slow, err := New(Config{Node: "a", Logger: testLogger(), Timeout: time.Second, InUse: inUse,
		Restored: func() <-chan struct{} { return restored }}, slowStore{s, 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(800 * time.Millisecond)
		close(restored)
	}()
	if err := slow.ReleaseAddress(&ipam.ReleaseAddressRequest{PoolID: p, Address: addr}); err != nil {
		t.Fatalf("release of %s while restoring: %v", addr, err)
	}
	ref, err := parsePoolID(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(t.Context(), addrKey(ref.space, ref.subnet, netip.MustParseAddr(hostOf(addr)))); !errors.Is(err, kvstore.ErrNotFound) {
		t.Fatalf("%s after its release: %v, want no record", addr, err)
	}
}
