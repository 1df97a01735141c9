package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"consul-overlay/internal/testenv"
)

// metricsPort is where the test plugins serve metrics, each in its own
// host namespace (so one fixed port never collides).
const metricsPort = "9464"

// scrape fetches the plugin's /metrics from inside its host namespace.
func (p *pluginProc) scrape(t *testing.T) string {
	t.Helper()
	nsPath := p.host.NS.Path
	c := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return testenv.DialIn(ctx, nsPath, network, addr)
		}},
	}
	// The plugin answers on its socket before its metrics server is up:
	// a refused connection is retried for a while.
	var resp *http.Response
	var err error
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		resp, err = c.Get("http://" + net.JoinHostPort(p.host.Addr.String(), metricsPort) + "/metrics")
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("scrape %s: %v", p.name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s %v", p.name, resp.Status, err)
	}
	return string(b)
}

// sample sums the samples of metric name whose labels include every
// `key="value"` of labels (a histogram's _count or _sum is its own name).
// found is false if no sample matched.
func sample(text, name string, labels ...string) (sum float64, found bool) {
	for _, line := range strings.Split(text, "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		series, value, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		n, ls, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		match := true
		for _, l := range labels {
			if !strings.Contains(ls, l) {
				match = false
			}
		}
		if !match {
			continue
		}
		v, err := strconv.ParseFloat(strings.Fields(value)[0], 64)
		if err != nil {
			continue
		}
		sum += v
		found = true
	}
	return sum, found
}

func TestMetricsScrape(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 2, testenv.UnderlayOptions{})
	consul := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()))
	prefix := "co-test-" + randomID()[:8] + "/"
	var ps []*pluginProc
	for i, h := range hosts {
		ps = append(ps, startPluginEnv(t, fmt.Sprintf("host%d", i), h, consul.Addr, prefix,
			"METRICS_ADDR="+net.JoinHostPort(h.Addr.String(), metricsPort)))
	}
	a, b := ps[0], ps[1]

	before := a.scrape(t)
	if v, _ := sample(before, "consul_overlay_requests_total", `method="NetworkDriver.CreateNetwork"`); v != 0 {
		t.Fatalf("CreateNetwork counted %v times before any call", v)
	}
	storeBefore, _ := sample(before, "consul_overlay_store_operations_total")

	spec := netSpec{subnet4: "10.31.0.0/24", subnet6: "fd00:31::/64", opts: map[string]string{"name": "metrics"}}
	na, err := a.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := b.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	na.run(t)
	nb.run(t)
	// A call that fails: a malformed body.
	if err := a.call("/NetworkDriver.CreateNetwork", "not an object", nil); err == nil {
		t.Fatal("a malformed CreateNetwork succeeded")
	}

	var after string
	// The IPAM count is cached for poolCountEvery after the first scrape.
	eventually(t, poolCountEvery+10*time.Second, func() error {
		after = a.scrape(t)
		// Host1's container: its IPv4 and IPv6 addresses are host0's peers.
		if v, _ := sample(after, "consul_overlay_network_peers"); v != 2 {
			return fmt.Errorf("network_peers %v, want 2", v)
		}
		if v, _ := sample(after, "consul_overlay_ipam_addresses_allocated"); v < 2 {
			return fmt.Errorf("ipam_addresses_allocated %v, want at least 2", v)
		}
		return nil
	})
	checks := []struct {
		what   string
		name   string
		labels []string
		min    float64
	}{
		{"CreateNetwork ok", "consul_overlay_requests_total", []string{`method="NetworkDriver.CreateNetwork"`, `result="ok"`}, 1},
		{"CreateNetwork error", "consul_overlay_requests_total", []string{`method="NetworkDriver.CreateNetwork"`, `result="error"`}, 1},
		{"Join", "consul_overlay_requests_total", []string{`method="NetworkDriver.Join"`, `result="ok"`}, 1},
		{"RequestAddress", "consul_overlay_requests_total", []string{`method="IpamDriver.RequestAddress"`, `result="ok"`}, 2},
		{"CreateEndpoint latency", "consul_overlay_request_duration_seconds_count", []string{`method="NetworkDriver.CreateEndpoint"`}, 1},
		{"store ops", "consul_overlay_store_operations_total", nil, storeBefore + 1},
		{"store txn", "consul_overlay_store_operations_total", []string{`op="txn"`, `result="ok"`}, 1},
		{"store latency", "consul_overlay_store_operation_duration_seconds_count", nil, 1},
		{"watch updates", "consul_overlay_store_watch_updates_total", nil, 1},
		{"peer syncs", "consul_overlay_reconcile_runs_total", []string{`kind="peers"`, `result="ok"`}, 1},
		{"peer writes", "consul_overlay_reconcile_changes_total", []string{`kind="peers"`}, 1},
		{"local endpoints", "consul_overlay_network_local_endpoints", nil, 1},
		{"remote vteps", "consul_overlay_network_remote_vteps", nil, 1},
		{"allocated addresses", "consul_overlay_ipam_addresses_allocated", nil, 2},
		{"watch lag", "consul_overlay_watch_lag_seconds_count", nil, 1},
		{"registration backlog", "consul_overlay_registration_backlog", nil, 0},
	}
	for _, c := range checks {
		v, found := sample(after, c.name, c.labels...)
		if !found || v < c.min {
			t.Errorf("%s: %s%v = %v (found %v), want at least %v", c.what, c.name, c.labels, v, found, c.min)
		}
	}
	if t.Failed() || testing.Verbose() {
		t.Logf("scrape:\n%s", after)
	}
	problems, err := promlint.New(bytes.NewReader([]byte(after))).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}
