package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseAllocBench(t *testing.T) {
	out := `goos: linux
BenchmarkAllocate/hosts=1-2         	    3000	    657000 ns/op	      1520 allocs/s	         1.000 lost/op	         0.5000 reads/op	         1.000 txn/op
BenchmarkAllocate/hosts=16-2        	    9000	    340000 ns/op	      2938 allocs/s	         0.2600 lost/op	         2.000 reads/op	         1.260 txn/op
PASS`
	got := parseAllocBench(out)
	tests := []struct {
		hosts  int
		metric string
		want   float64
	}{
		{1, "allocs/s", 1520},
		{1, "txn/op", 1},
		{16, "allocs/s", 2938},
		{16, "lost/op", 0.26},
	}
	for _, tc := range tests {
		if v := got[tc.hosts][tc.metric]; v != tc.want {
			t.Errorf("hosts=%d %s = %v, want %v", tc.hosts, tc.metric, v, tc.want)
		}
	}
	if _, ok := got[4]; ok {
		t.Errorf("hosts=4 parsed from output that has none")
	}
}

func TestRestoredLine(t *testing.T) {
	log := `time=2026-11-23T20:00:00.100Z level=INFO msg="state restored" networks=1 endpoints=0 kernel_changes="{Links:3}"
time=2026-11-23T20:00:05.250Z level=INFO msg=listening socket=/x
time=2026-11-23T20:00:05.750Z level=INFO msg="state restored" networks=1 endpoints=0 kernel_changes="{Links:0}"`
	tests := []struct {
		skip        int
		wantOK      bool
		wantAt      string
		wantChanges string
	}{
		{0, true, "2026-11-23T20:00:00.100Z", "{Links:3}"},
		{1, true, "2026-11-23T20:00:05.750Z", "{Links:0}"},
		{2, false, "", ""},
	}
	for _, tc := range tests {
		at, ch, ok := restoredLine(log, tc.skip)
		if ok != tc.wantOK {
			t.Fatalf("skip %d: ok %v, want %v", tc.skip, ok, tc.wantOK)
		}
		if !ok {
			continue
		}
		want, _ := time.Parse(time.RFC3339Nano, tc.wantAt)
		if !at.Equal(want) || ch != tc.wantChanges {
			t.Errorf("skip %d: got %v %q, want %v %q", tc.skip, at, ch, want, tc.wantChanges)
		}
	}
}

func TestPingLossOf(t *testing.T) {
	sent, recv, ok := pingLossOf("--- 10.0.0.2 ping statistics ---\n303 packets transmitted, 301 received, 0.66% packet loss, time 3050ms\n")
	if !ok || sent != 303 || recv != 301 {
		t.Fatalf("got %d %d %v, want 303 301 true", sent, recv, ok)
	}
	if _, _, ok := pingLossOf("ping: connect: Network is unreachable"); ok {
		t.Fatal("parsed a summary from an error")
	}
}

func TestSummarize(t *testing.T) {
	xs := make([]float64, 200)
	for i := range xs {
		xs[i] = float64(200 - i) // 200..1, unsorted
	}
	d := summarize(xs)
	if d.n != 200 || d.p50 != 100 || d.p99 != 198 || d.mx != 200 || d.mean != 100.5 {
		t.Fatalf("summarize = %+v", d)
	}
	if m := median([]float64{3, 1, 2, 10}); m != 2.5 {
		t.Fatalf("median = %v, want 2.5", m)
	}
}

func TestUpdateFileKeepsOlderRunsBelow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "BENCHMARKS.md")
	if err := updateFile(path, "# Intro\n", "## run 1\n"); err != nil {
		t.Fatal(err)
	}
	// Hand-written notes above the marker survive later runs.
	b, _ := os.ReadFile(path)
	if err := os.WriteFile(path, []byte(strings.Replace(string(b), "# Intro\n", "# Intro\n\nnotes\n", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := updateFile(path, "# Other intro\n", "## run 2\n"); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(path)
	s := string(b)
	i2, i1 := strings.Index(s, "## run 2"), strings.Index(s, "## run 1")
	if !strings.HasPrefix(s, "# Intro\n\nnotes\n") || strings.Contains(s, "Other intro") {
		t.Fatalf("introduction not kept:\n%s", s)
	}
	if i2 < 0 || i1 < 0 || i2 > i1 || strings.Index(s, runsMarker) > i2 {
		t.Fatalf("want marker, run 2, run 1 in that order:\n%s", s)
	}
}

func TestParseFloorPeer(t *testing.T) {
	ip, mac, vtep, err := parseFloorPeer("10.74.0.1 02:f1:00:00:00:01 192.168.90.3")
	if err != nil {
		t.Fatal(err)
	}
	if ip.String() != "10.74.0.1" || mac.String() != "02:f1:00:00:00:01" || vtep.String() != "192.168.90.3" {
		t.Errorf("parsed %s %s %s", ip, mac, vtep)
	}
	for _, bad := range []string{"", "10.74.0.1 02:f1:00:00:00:01", "x 02:f1:00:00:00:01 192.168.90.3", "10.74.0.1 nomac 192.168.90.3",
		"10.74.0.1 02:f1:00:00:00:01:00:00 192.168.90.3", "fd00::1 02:f1:00:00:00:01 192.168.90.3", "10.74.0.1 02:f1:00:00:00:01 192.168.90.3 extra"} {
		if _, _, _, err := parseFloorPeer(bad); err == nil {
			t.Errorf("parseFloorPeer(%q) accepted", bad)
		} else if !strings.Contains(err.Error(), "floor peer") {
			t.Errorf("parseFloorPeer(%q): %v does not name the value", bad, err)
		}
	}
}
