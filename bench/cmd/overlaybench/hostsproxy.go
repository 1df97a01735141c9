package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"consul-overlay/internal/testenv"
)

// consulMeter is a reverse proxy in front of the Consul agent that counts
// every request the plugins make, exactly: by kind (a blocking query is a
// GET with a non-zero ?index=), the bytes it answered, and the blocking
// queries open per client address (each simulated host has its own).
type consulMeter struct {
	Addr string // host:port the plugins use as CONSUL_HTTP_ADDR

	srv *http.Server

	mu       sync.Mutex
	trace    io.Writer        // BENCH_METER_TRACE's file, or nil
	counts   map[string]int64 // by label, see label
	bytes    int64
	agentB   int64          // of bytes, the agent API's (see meterDiff)
	inflight map[string]int // open blocking queries by client IP
}

// meterSnap is the meter's counters at one moment.
type meterSnap struct {
	at     time.Time
	counts map[string]int64
	bytes  int64
	agentB int64
}

// startConsulMeter listens on host's underlay address (a free port) inside
// its namespace and forwards to the agent. It stops with the runner.
func startConsulMeter(t *runner, host *testenv.Host, agent *testenv.ConsulAgent) *consulMeter {
	var ln net.Listener
	if err := host.NS.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", net.JoinHostPort(host.Addr.String(), "0"))
		return err
	}); err != nil {
		t.Fatalf("consul meter: listen in %s: %v", host.NS.Name, err)
	}
	target := &url.URL{Scheme: "http", Host: agent.Addr}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = &http.Transport{
		DialContext: agent.DialContext,
		// Every blocking query holds a connection: keep them all.
		MaxIdleConnsPerHost: 8192,
		// Pass the client's Accept-Encoding through as it is.
		DisableCompression: true,
	}
	rp.ErrorLog = log.New(io.Discard, "", 0)
	m := &consulMeter{Addr: ln.Addr().String(), counts: map[string]int64{}, inflight: map[string]int{}}
	if path := os.Getenv("BENCH_METER_TRACE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			t.Fatalf("consul meter: %v", err)
		}
		w := bufio.NewWriter(f)
		t.Cleanup(func() { w.Flush(); f.Close() })
		m.trace = w
	}
	m.srv = &http.Server{Handler: m.handler(rp), ErrorLog: log.New(io.Discard, "", 0)}
	go func() { _ = m.srv.Serve(ln) }()
	t.Cleanup(func() { _ = m.srv.Close() })
	return m
}

// label names a request's kind: method, API path without the key (so one
// network's watch and another's count together) and "blocking".
func label(r *http.Request) (string, bool) {
	p := r.URL.Path
	if k, ok := strings.CutPrefix(p, "/v1/kv/"); ok {
		// <cluster prefix>/<kind>/...; networks/<key>/<part>/...
		parts := strings.Split(k, "/")
		switch {
		case len(parts) > 3 && parts[1] == "networks":
			p = "/v1/kv/…/networks/…/" + parts[3]
		case len(parts) > 1:
			p = "/v1/kv/…/" + parts[1]
		}
	}
	for _, api := range []string{"/v1/session/info/", "/v1/session/renew/", "/v1/session/destroy/", "/v1/catalog/service/", "/v1/health/service/", "/v1/agent/service/", "/v1/agent/check/update/"} {
		if strings.HasPrefix(p, api) {
			p = api + "…"
			break
		}
	}
	q := r.URL.Query()
	if q.Has("recurse") {
		p += "?recurse"
	}
	blocking := r.Method == http.MethodGet && q.Get("index") != "" && q.Get("index") != "0"
	l := r.Method + " " + p
	if blocking {
		l += " (blocking)"
	}
	return l, blocking
}

func (m *consulMeter) handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		l, blocking := label(r)
		ip, _, _ := net.SplitHostPort(r.RemoteAddr)
		m.mu.Lock()
		m.counts[l]++
		if blocking {
			m.inflight[ip]++
		}
		m.mu.Unlock()
		cw := &countingWriter{ResponseWriter: w}
		start := time.Now()
		next.ServeHTTP(cw, r)
		m.mu.Lock()
		if m.trace != nil {
			// BENCH_METER_TRACE: one line a request, for finding out which
			// queries answer a change.
			fmt.Fprintf(m.trace, "%s %s %s %s %d %s %s\n", start.Format("15:04:05.000000"), ip, r.Method, r.URL.RequestURI(), cw.n,
				cw.Header().Get("X-Consul-Index"), time.Since(start).Round(time.Microsecond))
		}
		m.bytes += cw.n
		if strings.HasPrefix(r.URL.Path, "/v1/agent/") {
			m.agentB += cw.n
		}
		if blocking {
			m.inflight[ip]--
		}
		m.mu.Unlock()
	})
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

func (m *consulMeter) snap() meterSnap {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := meterSnap{at: time.Now(), counts: make(map[string]int64, len(m.counts)), bytes: m.bytes, agentB: m.agentB}
	for k, v := range m.counts {
		s.counts[k] = v
	}
	return s
}

// openBlocking returns the blocking queries open now, by client IP.
func (m *consulMeter) openBlocking() map[string]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]int, len(m.inflight))
	for k, v := range m.inflight {
		if v > 0 {
			out[k] = v
		}
	}
	return out
}

// meterDiff is what happened between two snapshots. agent counts the
// requests to the agent API (/v1/agent/), which a host's own Consul agent
// answers from its local state without asking the servers: a liveness
// check's pass, the registrar's list of the agent's services. All hosts
// share one agent here; on real hosts each has its own.
type meterDiff struct {
	secs                   float64
	total, blocking, agent int64
	bytes, agentBytes      int64
	counts                 map[string]int64
}

func diffSnaps(a, b meterSnap) meterDiff {
	d := meterDiff{secs: b.at.Sub(a.at).Seconds(), bytes: b.bytes - a.bytes, agentBytes: b.agentB - a.agentB, counts: map[string]int64{}}
	for k, v := range b.counts {
		if n := v - a.counts[k]; n > 0 {
			d.counts[k] = n
			d.total += n
			if strings.HasSuffix(k, "(blocking)") {
				d.blocking += n
			}
			if _, path, _ := strings.Cut(k, " "); strings.HasPrefix(path, "/v1/agent/") {
				d.agent += n
			}
		}
	}
	return d
}

func (d meterDiff) rate() float64 { return float64(d.total) / d.secs }

// serverShare is the share of the requests that reach the servers (all
// but the agent API's) that are blocking queries.
func (d meterDiff) serverShare() float64 {
	return float64(d.blocking) / float64(max(1, d.total-d.agent))
}

// top lists the n most frequent kinds, "label ×count".
func (d meterDiff) top(n int) string {
	type kv struct {
		k string
		v int64
	}
	var all []kv
	for k, v := range d.counts {
		all = append(all, kv{k, v})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].v > all[j].v || all[i].v == all[j].v && all[i].k < all[j].k })
	var parts []string
	for i, x := range all {
		if i == n {
			parts = append(parts, "…")
			break
		}
		parts = append(parts, fmt.Sprintf("`%s` ×%d", x.k, x.v))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// cpuTicks is a process's user+system CPU time from /proc/<pid>/stat.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command field", pid)
	}
	f := strings.Fields(s[i+1:])
	// After the command: state is field 3, utime 14 and stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: unreadable times", pid)
	}
	const clkTck = 100 // USER_HZ on Linux
	return time.Duration(u+st) * time.Second / clkTck, nil
}

// pidOfConsul finds the agent's process by its unique node name.
func pidOfConsul(node string) int {
	ents, _ := os.ReadDir("/proc")
	want := "-node\x00" + node + "\x00"
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		if strings.Contains(string(b), want) && strings.Contains(string(b), "agent\x00") && !strings.Contains(string(b), "nsenter") {
			return pid
		}
	}
	return 0
}

// vmRSS reads VmRSS (MiB) from /proc/<pid>/status.
func vmRSS(pid int) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024
		}
	}
	return 0
}

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
