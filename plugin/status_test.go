package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"consul-overlay/status"
)

// status runs `consul-overlay status --json` in the plugin's host
// namespace with the plugin's settings, as an operator would on that host.
func (p *pluginProc) status(t *testing.T) (status.Report, int) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+p.host.NS.Path, pluginBinary(t), "status", "--json")
	cmd.Env = append(os.Environ(), p.env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	code := 0
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("status on %s: %v\n%s", p.name, err, stderr.String())
		}
		code = ee.ExitCode()
	}
	var r status.Report
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("status --json on %s (exit %d): %v\nstdout:\n%s\nstderr:\n%s", p.name, code, err, stdout.String(), stderr.String())
	}
	return r, code
}

// findNetwork returns the network of key in a report.
func findNetwork(t *testing.T, r status.Report, key string) status.Network {
	t.Helper()
	for _, n := range r.Networks {
		if n.Key == key {
			return n
		}
	}
	t.Fatalf("status lists no network %q: %+v", key, r.Networks)
	return status.Network{}
}

func TestStatusTwoHosts(t *testing.T) {
	c := newCluster(t, 2)
	a, b := c.plugins[0], c.plugins[1]
	spec := netSpec{subnet4: "10.30.0.0/24", subnet6: "fd00:30::/64", opts: map[string]string{"name": "ops"}}
	na, err := a.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := b.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	ca, cb := na.run(t), nb.run(t)

	// The peers are programmed asynchronously after the records are
	// written: wait until both hosts show no drift.
	var ra, rb status.Report
	eventually(t, 15*time.Second, func() error {
		var code int
		if ra, code = a.status(t); code != 0 || len(ra.Drift) > 0 {
			return fmt.Errorf("host0: exit %d, drift %v, errors %v", code, ra.Drift, ra.Errors)
		}
		if rb, code = b.status(t); code != 0 || len(rb.Drift) > 0 {
			return fmt.Errorf("host1: exit %d, drift %v, errors %v", code, rb.Drift, rb.Errors)
		}
		return nil
	})

	t.Run("hosts and networks", func(t *testing.T) {
		for i, r := range []status.Report{ra, rb} {
			if !r.Store.Reachable || r.Store.Kind != "consul" {
				t.Errorf("host%d: store %+v", i, r.Store)
			}
			if r.Host.ID == "" || r.Host.Node != fmt.Sprintf("host%d", i) || r.Host.VTEP != c.hosts[i].Addr.String() {
				t.Errorf("host%d: identity %+v", i, r.Host)
			}
			if len(r.Hosts) != 2 {
				t.Fatalf("host%d: %d hosts listed, want 2: %+v", i, len(r.Hosts), r.Hosts)
			}
			for j, h := range r.Hosts {
				if h.Node != fmt.Sprintf("host%d", j) || !h.Alive || h.VTEP != c.hosts[j].Addr.String() || h.Networks != 1 || h.Started.IsZero() || h.Self != (i == j) {
					t.Errorf("host%d: host %d listed as %+v", i, j, h)
				}
			}
			n := findNetwork(t, r, "name-ops")
			if n.Name != "ops" || n.VNI == 0 || !n.Member || n.LocalEndpoints != 1 || n.RemoteEndpoints != 1 ||
				!slices.Equal(n.Hosts, []string{"host0", "host1"}) || !slices.Equal(n.Subnets, []string{"10.30.0.0/24", "fd00:30::/64"}) || n.KernelMTU == 0 {
				t.Errorf("host%d: network %+v", i, n)
			}
			var ids []string
			for _, e := range n.Endpoints {
				ids = append(ids, e.ID)
				if e.Local != (e.Node == fmt.Sprintf("host%d", i)) || !e.Joined {
					t.Errorf("host%d: endpoint %+v", i, e)
				}
			}
			if !slices.Equal(ids, []string{ca.eid, cb.eid}) {
				t.Errorf("host%d: endpoints %v, want %v", i, ids, []string{ca.eid, cb.eid})
			}
		}
	})

	// An operator (or something else) deletes one neighbour entry.
	n := findNetwork(t, ra, "name-ops")
	dev := fmt.Sprintf("vx-%06x", n.VNI)
	ip := cb.addr4.Addr().String()
	if out, err := c.hosts[0].NS.Run(t, "ip", "neigh", "del", ip, "dev", dev); err != nil {
		t.Fatalf("ip neigh del %s dev %s: %v\n%s", ip, dev, err, out)
	}
	r, code := a.status(t)
	want := []status.Drift{{Network: "name-ops", VNI: n.VNI, Device: dev, Kind: "neighbour", Entry: ip, Problem: "missing", Want: cb.mac}}
	if code != statusDrift || !slices.Equal(r.Drift, want) {
		t.Fatalf("after ip neigh del: exit %d, drift\n%v\nwant\n%v", code, r.Drift, want)
	}
	if r, _ := b.status(t); len(r.Drift) > 0 {
		t.Errorf("host1 reports drift it does not have: %v", r.Drift)
	}

	// The driver re-applies every network's whole peer set at least every
	// 30 s, with no change in the store: the deleted entry comes back and
	// the drift is gone.
	eventually(t, 45*time.Second, func() error {
		if r, code := a.status(t); code != 0 || len(r.Drift) > 0 {
			return fmt.Errorf("exit %d, drift %v", code, r.Drift)
		}
		return nil
	})
}
