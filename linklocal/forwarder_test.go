package linklocal

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// fakeDNS is a real DNS server on 127.0.0.1 (UDP and TCP on one port)
// answering from a function, counting the questions per transport.
type fakeDNS struct {
	addr     string
	udpCount atomic.Int64
	tcpCount atomic.Int64
}

func startFakeDNS(t *testing.T, answer func(q dns.Question, tcp bool) *dns.Msg) *fakeDNS {
	t.Helper()
	f := &fakeDNS{}
	// The UDP port the kernel picks may be held for TCP by another
	// process's connection (other test packages run at the same time),
	// so try a few until one is free for both.
	var pc net.PacketConn
	var l net.Listener
	var err error
	for range 20 {
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		l, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
	}
	if err != nil {
		t.Fatalf("no port free for both UDP and TCP: %v", err)
	}
	f.addr = pc.LocalAddr().String()
	handler := func(tcp bool) dns.HandlerFunc {
		return func(w dns.ResponseWriter, req *dns.Msg) {
			if tcp {
				f.tcpCount.Add(1)
			} else {
				f.udpCount.Add(1)
			}
			m := answer(req.Question[0], tcp)
			if m == nil {
				return // no answer at all
			}
			rcode := m.Rcode
			m.SetReply(req)
			m.Rcode = rcode
			w.WriteMsg(m)
		}
	}
	u := &dns.Server{PacketConn: pc, Handler: handler(false)}
	tc := &dns.Server{Listener: l, Handler: handler(true)}
	var wg sync.WaitGroup
	for _, s := range []*dns.Server{u, tc} {
		wg.Add(1)
		started := make(chan struct{})
		s.NotifyStartedFunc = func() { close(started) }
		go func() { defer wg.Done(); s.ActivateAndServe() }()
		<-started
	}
	t.Cleanup(func() {
		u.Shutdown()
		tc.Shutdown()
		wg.Wait()
	})
	return f
}

func a(name string, ttl uint32, ip string) dns.RR {
	rr, err := dns.NewRR(fmt.Sprintf("%s %d IN A %s", name, ttl, ip))
	if err != nil {
		panic(err)
	}
	return rr
}

func query(name string, qtype uint16) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	return m
}

// clock is a settable time source.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func TestForwarderRoutesByDomain(t *testing.T) {
	agent := startFakeDNS(t, func(q dns.Question, _ bool) *dns.Msg {
		m := new(dns.Msg)
		m.Answer = []dns.RR{a(q.Name, 0, "10.0.0.1")}
		return m
	})
	up := startFakeDNS(t, func(q dns.Question, _ bool) *dns.Msg {
		m := new(dns.Msg)
		m.Answer = []dns.RR{a(q.Name, 0, "192.0.2.1")}
		return m
	})
	f, err := NewForwarder(ForwarderConfig{ConsulDNS: agent.addr, Upstreams: []string{up.addr}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, want string
	}{
		{"web.service.consul", "10.0.0.1"},
		{"WEB.Service.CONSUL.", "10.0.0.1"},
		{"consul", "10.0.0.1"},
		{"example.org", "192.0.2.1"},
		{"notconsul", "192.0.2.1"},
		{"consul.example.org", "192.0.2.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := f.Resolve(t.Context(), query(tc.name, dns.TypeA))
			if resp.Rcode != dns.RcodeSuccess || len(resp.Answer) != 1 {
				t.Fatalf("answer %v", resp)
			}
			if got := resp.Answer[0].(*dns.A).A.String(); got != tc.want {
				t.Errorf("answer %s, want %s", got, tc.want)
			}
		})
	}
}

func TestForwarderCacheHonoursTTL(t *testing.T) {
	up := startFakeDNS(t, func(q dns.Question, _ bool) *dns.Msg {
		m := new(dns.Msg)
		switch {
		case strings.HasPrefix(q.Name, "ttl60."):
			m.Answer = []dns.RR{a(q.Name, 60, "192.0.2.60"), a(q.Name, 90, "192.0.2.90")}
		case strings.HasPrefix(q.Name, "ttl0."):
			m.Answer = []dns.RR{a(q.Name, 0, "192.0.2.0")}
		case strings.HasPrefix(q.Name, "missing."):
			m.Rcode = dns.RcodeNameError
			soa, _ := dns.NewRR(". 300 IN SOA ns. host. 1 2 3 4 30")
			m.Ns = []dns.RR{soa}
		case strings.HasPrefix(q.Name, "fail."):
			m.Rcode = dns.RcodeServerFailure
		}
		return m
	})
	clk := &clock{t: time.Unix(1_000_000, 0)}
	f, err := NewForwarder(ForwarderConfig{ConsulDNS: "127.0.0.1:1", Upstreams: []string{up.addr}, Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	ask := func(name string) *dns.Msg {
		t.Helper()
		return f.Resolve(t.Context(), query(name, dns.TypeA))
	}
	asked := func() int64 { return up.udpCount.Load() + up.tcpCount.Load() }

	ask("ttl60.example.")
	clk.add(10 * time.Second)
	r := ask("ttl60.example.")
	if asked() != 1 {
		t.Fatalf("upstream asked %d times, want 1 (second answer from the cache)", asked())
	}
	if ttl := r.Answer[0].Header().Ttl; ttl != 50 {
		t.Errorf("cached answer's TTL %d after 10 s, want 50", ttl)
	}
	if ttl := r.Answer[1].Header().Ttl; ttl != 80 {
		t.Errorf("cached answer's second TTL %d after 10 s, want 80", ttl)
	}
	clk.add(50 * time.Second) // 60 s: the smallest TTL is over
	ask("ttl60.example.")
	if asked() != 2 {
		t.Errorf("upstream asked %d times after the TTL ran out, want 2", asked())
	}

	before := asked()
	ask("ttl0.example.")
	ask("ttl0.example.")
	if n := asked() - before; n != 2 {
		t.Errorf("TTL 0 answer: upstream asked %d times for 2 questions, want 2 (no caching)", n)
	}

	before = asked()
	if r := ask("missing.example."); r.Rcode != dns.RcodeNameError {
		t.Fatalf("rcode %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
	}
	clk.add(29 * time.Second)
	ask("missing.example.")
	if n := asked() - before; n != 1 {
		t.Errorf("NXDOMAIN with SOA minimum 30: upstream asked %d times within 29 s, want 1", n)
	}
	clk.add(2 * time.Second)
	ask("missing.example.")
	if n := asked() - before; n != 2 {
		t.Errorf("NXDOMAIN after its 30 s: upstream asked %d times, want 2", n)
	}

	before = asked()
	ask("fail.example.")
	ask("fail.example.")
	if n := asked() - before; n != 2 {
		t.Errorf("SERVFAIL: upstream asked %d times for 2 questions, want 2 (never cached)", n)
	}
}

// startServer serves a forwarder on 127.0.0.1 with free ports.
func startServer(t *testing.T, cfg ForwarderConfig, api http.Handler) *Server {
	t.Helper()
	cfg.Logger = nil
	s, err := Listen(t.Context(), Config{Addr: netip.MustParseAddr("127.0.0.1"), DNSPort: freePort(t), APIPort: freePort(t), DNS: cfg, API: api})
	if err != nil {
		t.Fatal(err)
	}
	s.Serve()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Error(err)
		}
	})
	return s
}

// freePort is a port free for both UDP and TCP on 127.0.0.1, as far as
// one can tell.
func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if pc, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", p)); err == nil {
			pc.Close()
			return p
		}
	}
	t.Fatal("no free port")
	return 0
}

func TestForwarderTruncationGoesToTCP(t *testing.T) {
	many := func(name string, n int) []dns.RR {
		var rrs []dns.RR
		for i := range n {
			rrs = append(rrs, a(name, 60, fmt.Sprintf("192.0.2.%d", i+1)))
		}
		return rrs
	}
	// The upstream truncates every UDP answer (TC, no records) and
	// answers in full over TCP.
	up := startFakeDNS(t, func(q dns.Question, tcp bool) *dns.Msg {
		m := new(dns.Msg)
		if !tcp {
			m.Truncated = true
			return m
		}
		n := 2
		if strings.HasPrefix(q.Name, "big.") {
			n = 60
		}
		m.Answer = many(q.Name, n)
		return m
	})
	s := startServer(t, ForwarderConfig{ConsulDNS: "127.0.0.1:1", Upstreams: []string{up.addr}}, nil)
	addr, _ := s.Addrs()

	udp := &dns.Client{Net: "udp", Timeout: 2 * time.Second}
	tcp := &dns.Client{Net: "tcp", Timeout: 2 * time.Second}

	// Small enough for UDP: the forwarder fetched it over TCP and answers
	// it whole, without TC.
	r, _, err := udp.Exchange(query("small.example", dns.TypeA), addr.String())
	if err != nil {
		t.Fatal(err)
	}
	if r.Truncated || len(r.Answer) != 2 {
		t.Errorf("small answer over UDP: TC %v, %d records, want the 2 records untruncated", r.Truncated, len(r.Answer))
	}
	if up.tcpCount.Load() != 1 {
		t.Errorf("upstream asked %d times over TCP, want 1 (its UDP answer was truncated)", up.tcpCount.Load())
	}

	// 60 records do not fit 512 bytes: TC over UDP, the whole answer over
	// TCP (from the cache).
	r, _, err = udp.Exchange(query("big.example", dns.TypeA), addr.String())
	if err != nil {
		t.Fatal(err)
	}
	if !r.Truncated || len(r.Answer) >= 60 {
		t.Errorf("big answer over UDP: TC %v, %d records, want TC and fewer than 60", r.Truncated, len(r.Answer))
	}
	r, _, err = tcp.Exchange(query("big.example", dns.TypeA), addr.String())
	if err != nil {
		t.Fatal(err)
	}
	if r.Truncated || len(r.Answer) != 60 {
		t.Errorf("big answer over TCP: TC %v, %d records, want all 60", r.Truncated, len(r.Answer))
	}
	// With EDNS and a 4096-byte buffer the whole answer fits UDP.
	q := query("big.example", dns.TypeA)
	q.SetEdns0(4096, false)
	r, _, err = udp.Exchange(q, addr.String())
	if err != nil {
		t.Fatal(err)
	}
	if r.Truncated || len(r.Answer) != 60 {
		t.Errorf("big answer over UDP with EDNS 4096: TC %v, %d records, want all 60", r.Truncated, len(r.Answer))
	}
}

func TestForwarderAgentDownIsServfailFast(t *testing.T) {
	up := startFakeDNS(t, func(q dns.Question, _ bool) *dns.Msg {
		m := new(dns.Msg)
		m.Answer = []dns.RR{a(q.Name, 0, "192.0.2.1")}
		return m
	})
	// A stopped agent: nothing listens on the port (ICMP port
	// unreachable). A hung agent: a socket that never answers.
	stopped := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	hung, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hung.Close()
	for _, tc := range []struct{ name, agent string }{{"stopped", stopped}, {"hung", hung.LocalAddr().String()}} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, ForwarderConfig{ConsulDNS: tc.agent, Upstreams: []string{up.addr}}, nil)
			addr, _ := s.Addrs()
			c := &dns.Client{Net: "udp", Timeout: 3 * time.Second}
			start := time.Now()
			r, _, err := c.Exchange(query("web.service.consul", dns.TypeA), addr.String())
			took := time.Since(start)
			if err != nil {
				t.Fatal(err)
			}
			if r.Rcode != dns.RcodeServerFailure {
				t.Errorf(".consul with the agent %s: rcode %s, want SERVFAIL", tc.name, dns.RcodeToString[r.Rcode])
			}
			if took >= time.Second {
				t.Errorf(".consul with the agent %s: answered after %s, want under 1s", tc.name, took)
			}
			t.Logf("agent %s: SERVFAIL after %s", tc.name, took.Round(time.Millisecond))
			r, _, err = c.Exchange(query("example.org", dns.TypeA), addr.String())
			if err != nil || r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Errorf("outside name with the agent %s: %v, %v; want an answer", tc.name, r, err)
			}
		})
	}
}

func TestForwarderNoUpstream(t *testing.T) {
	f, err := NewForwarder(ForwarderConfig{ConsulDNS: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	if r := f.Resolve(t.Context(), query("example.org", dns.TypeA)); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("no upstream: rcode %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
	}
	if r := f.Resolve(t.Context(), &dns.Msg{}); r.Rcode != dns.RcodeFormatError {
		t.Errorf("no question: rcode %s, want FORMERR", dns.RcodeToString[r.Rcode])
	}
}

func TestNewForwarderRejects(t *testing.T) {
	for _, cfg := range []ForwarderConfig{
		{Domain: "bad domain!"},
		{ConsulDNS: "127.0.0.1"},
		{Upstreams: []string{"192.0.2.1"}},
	} {
		if _, err := NewForwarder(cfg); err == nil {
			t.Errorf("NewForwarder(%+v): no error", cfg)
		}
	}
}

func TestForwarderSRVAndAAAA(t *testing.T) {
	agent := startFakeDNS(t, func(q dns.Question, _ bool) *dns.Msg {
		m := new(dns.Msg)
		var rr dns.RR
		var err error
		switch q.Qtype {
		case dns.TypeSRV:
			rr, err = dns.NewRR(q.Name + " 0 IN SRV 1 1 80 node.node.dc.consul.")
		case dns.TypeAAAA:
			rr, err = dns.NewRR(q.Name + " 0 IN AAAA fd00::1")
		}
		if err != nil {
			panic(err)
		}
		if rr != nil {
			m.Answer = []dns.RR{rr}
		}
		return m
	})
	f, err := NewForwarder(ForwarderConfig{ConsulDNS: agent.addr})
	if err != nil {
		t.Fatal(err)
	}
	for _, qt := range []uint16{dns.TypeSRV, dns.TypeAAAA} {
		r := f.Resolve(t.Context(), query("web.service.consul", qt))
		if len(r.Answer) != 1 || r.Answer[0].Header().Rrtype != qt {
			t.Errorf("%s: answer %v", dns.TypeToString[qt], r.Answer)
		}
	}
}

func TestListenPortTaken(t *testing.T) {
	taken, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := taken.LocalAddr().(*net.UDPAddr).Port
	_, err = Listen(t.Context(), Config{Addr: netip.MustParseAddr("127.0.0.1"), DNSPort: port})
	var be *BindError
	if !errors.As(err, &be) || !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("Listen on a taken port: %v, want a *BindError with EADDRINUSE", err)
	}
	want := fmt.Sprintf("127.0.0.1:%d/udp", port)
	if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "already serves") {
		t.Errorf("error %q does not name %s and the reason", err, want)
	}
	// Nothing was left bound: no TCP socket of this process holds the
	// port. (Another test's process may hold a TCP port of that number:
	// a CI run saw one, so binding it is no proof.)
	if inodes := tcpSocketsOnPort(t, port); len(inodes) > 0 {
		if ours := ownSockets(t); slices.ContainsFunc(inodes, func(i string) bool { return ours[i] }) {
			t.Errorf("tcp port %d is still bound by this process after the failed Listen", port)
		}
	}
}

// tcpSocketsOnPort returns the inodes of the TCP sockets (IPv4 and IPv6)
// whose local port is port, from /proc/net/tcp{,6}.
func tcpSocketsOnPort(t *testing.T, port int) []string {
	t.Helper()
	var inodes []string
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fields := strings.Fields(line)
			if len(fields) < 10 {
				continue
			}
			_, hexPort, ok := strings.Cut(fields[1], ":")
			if p, err := strconv.ParseUint(hexPort, 16, 16); ok && err == nil && int(p) == port {
				inodes = append(inodes, fields[9])
			}
		}
	}
	return inodes
}

// ownSockets returns the inodes of this process's open sockets.
func ownSockets(t *testing.T) map[string]bool {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink("/proc/self/fd/" + fd.Name())
		if inode, ok := strings.CutPrefix(target, "socket:["); err == nil && ok {
			out[strings.TrimSuffix(inode, "]")] = true
		}
	}
	return out
}

func TestAPIProxyPassesCallerToken(t *testing.T) {
	type seen struct{ token, auth, xff, path string }
	got := make(chan seen, 4)
	agent := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- seen{r.Header.Get("X-Consul-Token"), r.Header.Get("Authorization"), r.Header.Get("X-Forwarded-For"), r.URL.RequestURI()}
		fmt.Fprint(w, `{"consul":[]}`)
	}))
	defer agent.Close()
	target, _ := url.Parse(agent.URL)
	s := startServer(t, ForwarderConfig{ConsulDNS: "127.0.0.1:1"}, NewAPIProxy(target, nil, nil))
	_, api := s.Addrs()

	for _, tc := range []struct {
		name, token, auth string
	}{
		{"no token", "", ""},
		{"x-consul-token", "caller-secret", ""},
		{"bearer", "", "Bearer caller-bearer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://"+api.String()+"/v1/catalog/services?dc=lab", nil)
			if tc.token != "" {
				req.Header.Set("X-Consul-Token", tc.token)
			}
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %s", resp.Status)
			}
			s := <-got
			if s.token != tc.token || s.auth != tc.auth {
				t.Errorf("agent got token %q, authorization %q; want the caller's %q, %q", s.token, s.auth, tc.token, tc.auth)
			}
			if s.xff != "" || s.path != "/v1/catalog/services?dc=lab" {
				t.Errorf("agent got X-Forwarded-For %q, path %q; want none and the caller's path", s.xff, s.path)
			}
		})
	}

	agent.Close()
	resp, err := http.Get("http://" + api.String() + "/v1/catalog/services")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("agent down: status %s, want 502", resp.Status)
	}
}
