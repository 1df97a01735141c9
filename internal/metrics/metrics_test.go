package metrics

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"consul-overlay/kvstore"
)

func TestObserveAndLint(t *testing.T) {
	m := New()
	m.ObserveRequest("/NetworkDriver.CreateNetwork", nil, 3*time.Millisecond)
	m.ObserveRequest("/NetworkDriver.CreateNetwork", errors.New("boom"), time.Millisecond)
	m.ObserveStoreOp("cas", fmt.Errorf("write x: %w", kvstore.ErrConflict), time.Millisecond)
	m.ObserveStoreOp("get", kvstore.ErrNotFound, time.Millisecond)
	m.ObserveStoreOp("watch", nil, 0)
	m.ObserveWatchUpdate()
	m.ObserveReconcile("peers", 4, nil)
	m.ObserveReconcile("full", 0, errors.New("netlink"))
	if err := m.RegisterState(State{
		Networks: func(context.Context) ([]NetworkStats, error) {
			return []NetworkStats{{VNI: 4096, LocalEndpoints: 2, Peers: 3, RemoteVTEPs: 1}}, nil
		},
		Pools: func(context.Context) ([]PoolStats, error) {
			return []PoolStats{{Space: "CO-local", Subnet: "10.0.0.0/24", Allocated: 5}}, nil
		},
		UnderlayDrop: func() (uint64, error) { return 7, nil },
	}); err != nil {
		t.Fatal(err)
	}

	checks := []struct {
		name string
		got  float64
		want float64
	}{
		{"requests ok", testutil.ToFloat64(m.requests.WithLabelValues("NetworkDriver.CreateNetwork", "ok")), 1},
		{"requests error", testutil.ToFloat64(m.requests.WithLabelValues("NetworkDriver.CreateNetwork", "error")), 1},
		{"store conflict", testutil.ToFloat64(m.storeOps.WithLabelValues("cas", "conflict")), 1},
		{"cas conflicts", testutil.ToFloat64(m.storeConflicts.WithLabelValues("cas")), 1},
		{"not found", testutil.ToFloat64(m.storeOps.WithLabelValues("get", "not_found")), 1},
		{"watch updates", testutil.ToFloat64(m.watchUpdates), 1},
		{"reconcile runs", testutil.ToFloat64(m.reconcileRuns.WithLabelValues("peers", "ok")), 1},
		{"reconcile errors", testutil.ToFloat64(m.reconcileRuns.WithLabelValues("full", "error")), 1},
		{"reconcile changes", testutil.ToFloat64(m.reconcileChanges.WithLabelValues("peers")), 4},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: %v, want %v", c.name, c.got, c.want)
		}
	}
	if n := testutil.CollectAndCount(m.requestDuration); n != 1 {
		t.Errorf("request histograms: %d series, want 1", n)
	}
	problems, err := testutil.GatherAndLint(m.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}

	// The same through HTTP, as Prometheus scrapes it.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, done, err := Serve(ctx, "127.0.0.1:0", m.Handler())
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	problems, err = promlint.New(resp.Body).Lint()
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint (scraped): %s: %s", p.Metric, p.Text)
	}
	body, err := testutil.GatherAndCount(m.Registry(), "consul_overlay_network_peers", "consul_overlay_ipam_addresses_allocated", "consul_overlay_vxlan_underlay_drops_total")
	if err != nil || body != 3 {
		t.Errorf("state gauges: %d series, %v; want 3", body, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("serve: %v", err)
	}
}

func TestNilMetrics(t *testing.T) {
	var m *Metrics
	m.ObserveRequest("x", nil, 0)
	m.ObserveStoreOp("get", nil, 0)
	m.ObserveWatchUpdate()
	m.ObserveReconcile("peers", 1, nil)
}

func TestStoreResult(t *testing.T) {
	for _, c := range []struct {
		err  error
		want string
	}{
		{nil, "ok"},
		{kvstore.ErrNotFound, "not_found"},
		{fmt.Errorf("x: %w", kvstore.ErrConflict), "conflict"},
		{kvstore.ErrUnavailable, "unavailable"},
		{kvstore.ErrPermissionDenied, "permission_denied"},
		{errors.New("other"), "error"},
	} {
		if got := storeResult(c.err); got != c.want {
			t.Errorf("storeResult(%v) = %q, want %q", c.err, got, c.want)
		}
	}
}

func TestWatchLagAndBacklog(t *testing.T) {
	m := New()
	m.ObserveWatchLag(20 * time.Millisecond)
	m.ObserveWatchLag(time.Second)
	backlog := 3
	if err := m.RegisterBacklog(func() int { return backlog }); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(m.Registry(), "consul_overlay_watch_lag_seconds"); n != 1 {
		t.Fatalf("watch lag series: %d, want 1", n)
	}
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var lagCount uint64
	var gauge float64 = -1
	for _, mf := range mfs {
		switch mf.GetName() {
		case "consul_overlay_watch_lag_seconds":
			lagCount = mf.GetMetric()[0].GetHistogram().GetSampleCount()
		case "consul_overlay_registration_backlog":
			gauge = mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	if lagCount != 2 || gauge != 3 {
		t.Fatalf("watch lag observations %d (want 2), backlog %v (want 3)", lagCount, gauge)
	}
	probs, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range probs {
		if p.Metric == "consul_overlay_watch_lag_seconds" || p.Metric == "consul_overlay_registration_backlog" {
			t.Errorf("lint %s: %s", p.Metric, p.Text)
		}
	}
}
