package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"consul-overlay/kvstore"
)

const namespace = "consul_overlay"

// Metrics is the plugin's registry and metrics. A nil *Metrics is valid:
// every Observe method then does nothing, so call sites need no check.
type Metrics struct {
	reg *prometheus.Registry

	requests         *prometheus.CounterVec
	requestDuration  *prometheus.HistogramVec
	storeOps         *prometheus.CounterVec
	storeDuration    *prometheus.HistogramVec
	storeConflicts   *prometheus.CounterVec
	watchUpdates     prometheus.Counter
	reconcileRuns    *prometheus.CounterVec
	reconcileChanges *prometheus.CounterVec
	watchLag         prometheus.Histogram
}

// New builds the registry with every metric defined and the Go runtime
// and process collectors.
func New() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "requests_total",
		Help: "Docker plugin API calls served, by method and result (ok or error).",
	}, []string{"method", "result"})
	m.requestDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Name: "request_duration_seconds",
		Help:    "Latency of Docker plugin API calls, by method.",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	}, []string{"method"})
	m.storeOps = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: "store", Name: "operations_total",
		Help: "State store operations, by operation and result (ok, not_found, conflict, unavailable, permission_denied, error).",
	}, []string{"op", "result"})
	m.storeDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Subsystem: "store", Name: "operation_duration_seconds",
		Help:    "Latency of state store operations, by operation (watches excluded).",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	}, []string{"op"})
	m.storeConflicts = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: "store", Name: "cas_conflicts_total",
		Help: "Compare-and-set, create-only and transaction writes that found the key changed, by operation.",
	}, []string{"op"})
	m.watchUpdates = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: "store", Name: "watch_updates_total",
		Help: "Snapshots delivered by state store watches.",
	})
	m.reconcileRuns = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "reconcile_runs_total",
		Help: "Data-plane syncs with the desired state, by kind (peers, full, vtep) and result (ok or error).",
	}, []string{"kind", "result"})
	m.reconcileChanges = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "reconcile_changes_total",
		Help: "Kernel writes made by data-plane syncs, by kind (peers, full, vtep).",
	}, []string{"kind"})
	m.watchLag = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: namespace, Name: "watch_lag_seconds",
		Help:    "Time from a peer snapshot's delivery by the store watch to its programming in the kernel (measured from delivery: the store's change time is not known).",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	})
	m.reg.MustRegister(m.watchLag)
	m.reg.MustRegister(m.requests, m.requestDuration, m.storeOps, m.storeDuration, m.storeConflicts,
		m.watchUpdates, m.reconcileRuns, m.reconcileChanges,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry is the registry, for tests and extra collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus exposition formats.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// ObserveRequest counts one plugin API call: method as routed
// ("/NetworkDriver.CreateNetwork" or without the slash), its error and
// its duration.
func (m *Metrics) ObserveRequest(method string, err error, d time.Duration) {
	if m == nil {
		return
	}
	method = strings.TrimPrefix(method, "/")
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.requests.WithLabelValues(method, result).Inc()
	m.requestDuration.WithLabelValues(method).Observe(d.Seconds())
}

// ObserveStoreOp counts one store operation (kvstore.Observer).
func (m *Metrics) ObserveStoreOp(op string, err error, d time.Duration) {
	if m == nil {
		return
	}
	result := storeResult(err)
	m.storeOps.WithLabelValues(op, result).Inc()
	if op != "watch" {
		m.storeDuration.WithLabelValues(op).Observe(d.Seconds())
	}
	if result == "conflict" {
		m.storeConflicts.WithLabelValues(op).Inc()
	}
}

// ObserveWatchUpdate counts one snapshot delivered by a watch
// (kvstore.Observer).
func (m *Metrics) ObserveWatchUpdate() {
	if m == nil {
		return
	}
	m.watchUpdates.Inc()
}

func storeResult(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, kvstore.ErrNotFound):
		return "not_found"
	case errors.Is(err, kvstore.ErrConflict):
		return "conflict"
	case errors.Is(err, kvstore.ErrUnavailable):
		return "unavailable"
	case errors.Is(err, kvstore.ErrPermissionDenied):
		return "permission_denied"
	}
	return "error"
}

// ObserveReconcile counts one data-plane sync of kind (peers, full,
// vtep) and the kernel writes it made.
func (m *Metrics) ObserveReconcile(kind string, changes int, err error) {
	if m == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.reconcileRuns.WithLabelValues(kind, result).Inc()
	if changes > 0 {
		m.reconcileChanges.WithLabelValues(kind).Add(float64(changes))
	}
}

// ObserveWatchLag records the time from a peer snapshot's delivery to
// its programming in the kernel.
func (m *Metrics) ObserveWatchLag(d time.Duration) {
	if m == nil {
		return
	}
	m.watchLag.Observe(d.Seconds())
}

// RegisterBacklog adds the gauge of the service registrar's pending
// changes, read by backlog at scrape time.
func (m *Metrics) RegisterBacklog(backlog func() int) error {
	return m.reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "registration_backlog",
		Help: "Service registrations and deregistrations not yet written to the Consul agent.",
	}, func() float64 { return float64(backlog()) }))
}

// NetworkStats is one overlay as the kernel holds it.
type NetworkStats struct {
	VNI            uint32
	LocalEndpoints int
	Peers          int
	RemoteVTEPs    int
}

// PoolStats is one IPAM pool's allocations.
type PoolStats struct {
	Space, Subnet string
	Allocated     int
}

// State reads what the gauges show, at scrape time. A nil func leaves
// its metrics out; an error leaves them out of that scrape.
type State struct {
	Networks     func(ctx context.Context) ([]NetworkStats, error)
	Pools        func(ctx context.Context) ([]PoolStats, error)
	UnderlayDrop func() (uint64, error)
}

// RegisterState adds the collector of the lazily read state.
func (m *Metrics) RegisterState(s State) error {
	return m.reg.Register(&stateCollector{s: s})
}

var (
	descLocalEndpoints = prometheus.NewDesc(namespace+"_network_local_endpoints",
		"Local endpoints (bridge ports) of each overlay on this host.", []string{"vni"}, nil)
	descPeers = prometheus.NewDesc(namespace+"_network_peers",
		"Remote endpoint addresses programmed on each overlay (neighbour entries).", []string{"vni"}, nil)
	descRemoteVTEPs = prometheus.NewDesc(namespace+"_network_remote_vteps",
		"Remote hosts in each overlay's flood list.", []string{"vni"}, nil)
	descAllocated = prometheus.NewDesc(namespace+"_ipam_addresses_allocated",
		"Addresses allocated in each IPAM pool, cluster-wide.", []string{"space", "subnet"}, nil)
	descDrops = prometheus.NewDesc(namespace+"_vxlan_underlay_drops_total",
		"VXLAN packets from addresses outside the underlay allowlist, dropped.", nil, nil)
)

// scrapeTimeout bounds one scrape's reads.
const scrapeTimeout = 5 * time.Second

type stateCollector struct{ s State }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	if c.s.Networks != nil {
		ch <- descLocalEndpoints
		ch <- descPeers
		ch <- descRemoteVTEPs
	}
	if c.s.Pools != nil {
		ch <- descAllocated
	}
	if c.s.UnderlayDrop != nil {
		ch <- descDrops
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	if c.s.Networks != nil {
		if nets, err := c.s.Networks(ctx); err == nil {
			for _, n := range nets {
				vni := strconv.FormatUint(uint64(n.VNI), 10)
				ch <- prometheus.MustNewConstMetric(descLocalEndpoints, prometheus.GaugeValue, float64(n.LocalEndpoints), vni)
				ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, float64(n.Peers), vni)
				ch <- prometheus.MustNewConstMetric(descRemoteVTEPs, prometheus.GaugeValue, float64(n.RemoteVTEPs), vni)
			}
		} else {
			ch <- prometheus.NewInvalidMetric(descPeers, err)
		}
	}
	if c.s.Pools != nil {
		if pools, err := c.s.Pools(ctx); err == nil {
			for _, p := range pools {
				ch <- prometheus.MustNewConstMetric(descAllocated, prometheus.GaugeValue, float64(p.Allocated), p.Space, p.Subnet)
			}
		} else {
			ch <- prometheus.NewInvalidMetric(descAllocated, err)
		}
	}
	if c.s.UnderlayDrop != nil {
		// No underlay filter (no iptables) is no metric, not an error.
		if n, err := c.s.UnderlayDrop(); err == nil {
			ch <- prometheus.MustNewConstMetric(descDrops, prometheus.CounterValue, float64(n))
		}
	}
}

// Serve serves h at /metrics on addr until ctx ends. It returns once
// listening (or with the listen error); the server stops with ctx.
func Serve(ctx context.Context, addr string, h http.Handler) (net.Addr, <-chan error, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("metrics: listen on %q: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() {
		err := srv.Serve(l)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		done <- err
	}()
	context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	return l.Addr(), done, nil
}
