package ipam

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"

	"github.com/docker/go-plugins-helpers/ipam"
)

// BenchmarkAllocate measures address allocations per second from one shared
// pool by 1, 4, 8 and 16 simulated hosts, each with its own Consul client,
// against a local Consul dev agent. Besides allocs/s it reports, per
// allocation, the transactions sent (txn/op), the claims lost to another
// host (lost/op) and the reads (reads/op). Run with
//
//	go test -bench Allocate -run '^$' ./ipam/
func BenchmarkAllocate(b *testing.B) {
	agent := testenv.StartConsul(b)
	for _, hosts := range []int{1, 4, 8, 16} {
		b.Run(fmt.Sprintf("hosts=%d", hosts), func(b *testing.B) {
			prefix := "ipam-bench/" + randomID()
			var n storeCounts
			ds := make([]*Driver, hosts)
			for i := range ds {
				d, err := New(Config{Node: fmt.Sprintf("host-%d", i), Logger: testLogger(), Timeout: 30 * time.Second},
					&countingStore{Store: consulClient(b, agent.Addr, prefix), n: &n})
				if err != nil {
					b.Fatal(err)
				}
				ds[i] = d
			}
			// A /12 holds a million addresses: no benchmark run exhausts it.
			var pool string
			for _, d := range ds {
				r, err := d.RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: "10.96.0.0/12"})
				if err != nil {
					b.Fatal(err)
				}
				pool = r.PoolID
			}
			txn0, lost0, reads0 := n.txn.Load(), n.lost.Load(), n.reads.Load()
			var left atomic.Int64
			left.Store(int64(b.N))
			var wg sync.WaitGroup
			errs := make([]error, hosts)
			b.ResetTimer()
			for i, d := range ds {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for k := 0; left.Add(-1) >= 0; k++ {
						if _, err := d.RequestAddress(&ipam.RequestAddressRequest{PoolID: pool, Options: ep(fmt.Sprintf("e%d-%d", i, k))}); err != nil {
							errs[i] = err
							return
						}
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			for _, err := range errs {
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "allocs/s")
			b.ReportMetric(float64(n.txn.Load()-txn0)/float64(b.N), "txn/op")
			b.ReportMetric(float64(n.lost.Load()-lost0)/float64(b.N), "lost/op")
			b.ReportMetric(float64(n.reads.Load()-reads0)/float64(b.N), "reads/op")
		})
	}
}

type storeCounts struct{ txn, lost, reads atomic.Int64 }

// countingStore counts a store's transactions, failed transactions and
// reads.
type countingStore struct {
	kvstore.Store
	n *storeCounts
}

func (c *countingStore) Txn(ctx context.Context, ops []kvstore.Op) error {
	c.n.txn.Add(1)
	err := c.Store.Txn(ctx, ops)
	if errors.Is(err, kvstore.ErrConflict) {
		c.n.lost.Add(1)
	}
	return err
}

func (c *countingStore) List(ctx context.Context, prefix string) ([]*kvstore.Pair, error) {
	c.n.reads.Add(1)
	return c.Store.List(ctx, prefix)
}

func (c *countingStore) Get(ctx context.Context, key string) (*kvstore.Pair, error) {
	c.n.reads.Add(1)
	return c.Store.Get(ctx, key)
}
