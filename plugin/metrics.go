package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"consul-overlay/discovery"
	"consul-overlay/driver"
	"consul-overlay/internal/metrics"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// metricsAddrEnv is the setting that turns the Prometheus endpoint on:
// a TCP address to serve /metrics on ("": off, the default).
const metricsAddrEnv = "METRICS_ADDR"

// activeMetrics is the running plugin's metrics, nil while they are off
// (or not set up yet): the HTTP server reads it on every call.
var activeMetrics atomic.Pointer[metrics.Metrics]

// observeRequest counts one plugin API call (nil-safe: off is a no-op).
func observeRequest(method string, err error, d time.Duration) {
	activeMetrics.Load().ObserveRequest(method, err, d)
}

// observeWatchLag records one peer snapshot's time from delivery to
// kernel (driver.Config.ObserveWatchLag; nil-safe: off is a no-op).
func observeWatchLag(d time.Duration) {
	activeMetrics.Load().ObserveWatchLag(d)
}

// meterRegistrar adds the registrar's backlog gauge to the running
// metrics; it does nothing while metrics are off. Call it once, after
// startMetrics.
func meterRegistrar(log *slog.Logger, reg *discovery.Registrar) {
	m := activeMetrics.Load()
	if m == nil || reg == nil {
		return
	}
	if err := m.RegisterBacklog(reg.Backlog); err != nil {
		log.Warn("registration backlog gauge not served", "error", err)
	}
}

// startMetrics serves the metrics on METRICS_ADDR, if set, until ctx ends,
// and returns the store and data plane the drivers should use: metered
// ones when metrics are on, store and dp themselves when off. store stays
// the one for everything that needs the concrete store (the host claim,
// the registrar). stop waits for the server to end.
func startMetrics(ctx context.Context, log *slog.Logger, store kvstore.Store, dp *vxlan.Manager, inspect func() ([]vxlan.KernelNetwork, error)) (kvstore.Store, driver.Dataplane, func(), error) {
	addr := strings.TrimSpace(os.Getenv(metricsAddrEnv))
	if addr == "" {
		return store, dp, func() {}, nil
	}
	m := metrics.New()
	err := m.RegisterState(metrics.State{
		Networks:     func(context.Context) ([]metrics.NetworkStats, error) { return kernelStats(inspect) },
		Pools:        (&poolCounter{store: store, every: poolCountEvery}).count,
		UnderlayDrop: dp.VXLANDrops,
	})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("metrics: %w", err)
	}
	mctx, cancel := context.WithCancel(ctx)
	at, done, err := metrics.Serve(mctx, addr, m.Handler())
	if err != nil {
		cancel()
		return nil, nil, nil, fmt.Errorf("%s=%q: %w", metricsAddrEnv, addr, err)
	}
	activeMetrics.Store(m)
	log.Info("serving metrics", "address", at.String(), "path", "/metrics")
	stop := func() {
		activeMetrics.Store(nil)
		cancel()
		if err := <-done; err != nil {
			log.Warn("metrics server", "error", err)
		}
	}
	return kvstore.Metered(store, m), meteredDataplane{Dataplane: dp, m: m}, stop, nil
}

// meteredDataplane counts the data plane's syncs and the kernel writes
// they make; everything else is delegated.
type meteredDataplane struct {
	driver.Dataplane
	m *metrics.Metrics
}

func (d meteredDataplane) SetPeers(ctx context.Context, vni uint32, peers []vxlan.Peer) (vxlan.Changes, error) {
	ch, err := d.Dataplane.SetPeers(ctx, vni, peers)
	d.m.ObserveReconcile("peers", ch.Total(), err)
	return ch, err
}

func (d meteredDataplane) UpdatePeers(ctx context.Context, vni uint32, peers []vxlan.Peer) (vxlan.Changes, error) {
	ch, err := d.Dataplane.UpdatePeers(ctx, vni, peers)
	d.m.ObserveReconcile("peers", ch.Total(), err)
	return ch, err
}

func (d meteredDataplane) ChangePeers(ctx context.Context, vni uint32, removed, added []vxlan.Peer) (vxlan.Changes, bool, error) {
	ch, applied, err := d.Dataplane.ChangePeers(ctx, vni, removed, added)
	if applied {
		d.m.ObserveReconcile("peers", ch.Total(), err)
	}
	return ch, applied, err
}

func (d meteredDataplane) Reconcile(ctx context.Context, desired vxlan.State) (vxlan.Changes, error) {
	ch, err := d.Dataplane.Reconcile(ctx, desired)
	d.m.ObserveReconcile("full", ch.Total(), err)
	return ch, err
}

func (d meteredDataplane) SetVTEP(ctx context.Context, vtep netip.Addr, nets []vxlan.Network) (vxlan.Changes, error) {
	ch, err := d.Dataplane.SetVTEP(ctx, vtep, nets)
	d.m.ObserveReconcile("vtep", ch.Total(), err)
	return ch, err
}

// kernelStats counts, per overlay of this owner, the local endpoints
// (bridge ports), the programmed peers (neighbour entries) and the remote
// VTEPs (flood entries), from the kernel: what is, not what should be.
func kernelStats(inspect func() ([]vxlan.KernelNetwork, error)) ([]metrics.NetworkStats, error) {
	nets, err := inspect()
	if err != nil {
		return nil, err
	}
	out := make([]metrics.NetworkStats, 0, len(nets))
	for _, n := range nets {
		s := metrics.NetworkStats{VNI: n.VNI, LocalEndpoints: len(n.Ports), Peers: len(n.Neighbours)}
		for _, e := range n.FDB {
			if e.MAC == vxlan.FloodMAC {
				s.RemoteVTEPs++
			}
		}
		out = append(out, s)
	}
	return out, nil
}

// poolCountEvery bounds how often a scrape lists the IPAM addresses:
// below Prometheus's default scrape interval (15s), so it only spares the
// store from several scrapers or a fast one.
const poolCountEvery = 10 * time.Second

// poolCounter counts the address records per IPAM pool (keys
// ipam/<space>/addr/<net>_<bits>/<ip>), cluster-wide, at most once per
// every: a list of every address is not what each scrape should cost.
type poolCounter struct {
	store kvstore.Store
	every time.Duration

	mu   sync.Mutex
	at   time.Time
	last []metrics.PoolStats
}

func (c *poolCounter) count(ctx context.Context) ([]metrics.PoolStats, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.last != nil && time.Since(c.at) < c.every {
		return c.last, nil
	}
	pairs, err := c.store.List(ctx, "ipam/")
	if err != nil {
		return nil, err
	}
	type pool struct{ space, subnet string }
	counts := map[pool]int{}
	var order []pool
	for _, p := range pairs {
		parts := strings.Split(p.Key, "/")
		if len(parts) != 5 || parts[2] != "addr" {
			continue
		}
		i := strings.LastIndex(parts[3], "_")
		if i < 0 {
			continue
		}
		k := pool{parts[1], parts[3][:i] + "/" + parts[3][i+1:]}
		if _, ok := counts[k]; !ok {
			order = append(order, k)
		}
		counts[k]++
	}
	out := make([]metrics.PoolStats, 0, len(order))
	for _, k := range order {
		out = append(out, metrics.PoolStats{Space: k.space, Subnet: k.subnet, Allocated: counts[k]})
	}
	c.at, c.last = time.Now(), out
	return out, nil
}
