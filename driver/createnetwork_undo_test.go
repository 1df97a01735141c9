package driver

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"consul-overlay/kvstore"
)

// appliedNetStore commits the next transaction that creates a logical
// network's config (cluster.create) and then answers as if the store had
// not: ErrUnavailable, as a Consul request that timed out after the
// servers committed it. With downAfter set, the store then stops
// answering (down).
type appliedNetStore struct {
	*outageStore
	armed, downAfter atomic.Bool
}

func (s *appliedNetStore) Txn(ctx context.Context, ops []kvstore.Op) error {
	creates := slices.ContainsFunc(ops, func(o kvstore.Op) bool {
		return o.Verb == kvstore.OpCreate && strings.HasPrefix(o.Key, "networks/") && strings.HasSuffix(o.Key, "/config")
	})
	if !creates || !s.armed.CompareAndSwap(true, false) {
		return s.outageStore.Txn(ctx, ops)
	}
	if err := s.outageStore.Txn(ctx, ops); err != nil {
		return err
	}
	if s.downAfter.Load() {
		s.down.Store(true)
	}
	return fmt.Errorf("consul kv txn: %w: context deadline exceeded", kvstore.ErrUnavailable)
}

// TestCreateNetworkAppliedButUnanswered: a CreateNetwork whose membership
// transaction the store committed without the answer reaching the driver
// fails, and Docker stores no network, so it never deletes it: the
// logical network, its VNI and subnet reservations and this host's
// membership must not stay in the store. Undone at once when the store
// answers again, or by catchUp once it does.
func TestCreateNetworkAppliedButUnanswered(t *testing.T) {
	for _, downAfter := range []bool{false, true} {
		t.Run(fmt.Sprintf("store down after the commit %v", downAfter), func(t *testing.T) {
			inner := &outageStore{Store: openStore(t, filepath.Join(t.TempDir(), "s.db"))}
			store := &appliedNetStore{outageStore: inner}
			d, _, _ := startOutageDriver(t, store, &inner.down, nil, t.TempDir())
			store.armed.Store(true)
			store.downAfter.Store(downAfter)
			err := d.CreateNetwork(createReq("n1", map[string]interface{}{"name": "app"}, "10.1.0.0/24"))
			if err == nil {
				t.Fatal("CreateNetwork whose answer was lost succeeded")
			}
			if store.armed.Load() {
				t.Fatal("the network's transaction never reached the store: the test commits nothing")
			}
			if downAfter {
				if !strings.Contains(err.Error(), "retried when the store answers") {
					t.Errorf("the error does not say the undo is retried: %v", err)
				}
				inner.down.Store(false)
			}
			deadline := time.Now().Add(10 * time.Second)
			for len(allKeys(t, inner.Store)) != 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if keys := allKeys(t, inner.Store); len(keys) != 0 {
				t.Fatalf("a failed CreateNetwork left the logical network and this host's membership in the store: %v", keys)
			}
			// The network can be created again, under a new ID as Docker does.
			if err := d.CreateNetwork(createReq("n2", map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
				t.Fatal(err)
			}
		})
	}
}
