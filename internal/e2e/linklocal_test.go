//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"consul-overlay/internal/testenv"
	"consul-overlay/vxlan"
)

// The link-local scenario's application (testdata/linklocal.yaml) and what
// the lab's resolver (lab/dnsd) serves.
const (
	llProject     = "colab-ll"
	llAddr        = "169.254.1.1"
	llClient      = llProject + "-client-1"
	llIsolated    = llProject + "-isolated-1"
	llWeb         = "ll-web.service.consul"
	llOutside     = "outside.lab.test"
	llOutsideAddr = "203.0.113.80"
)

var llKeys = []string{"name-colab-ll", "name-colab-ll-internal"}

// linkLocal (issue 14): one Compose file without variables, up on both
// hosts; every container's DNS is 169.254.1.1 on its own host:
//   - clients on each host fetch ll-web.service.consul and get the pages
//     of both hosts' web containers (each page names its node, which the
//     web container asked its host's agent through 169.254.1.1:8500);
//   - an outside name (the lab's resolver) resolves, also on an internal
//     network;
//   - GET /v1/catalog/services through 169.254.1.1:8500 is the host's own
//     agent's answer on the consul_api network, a refused connection on
//     the other;
//   - a host on the underlay reaches none of the address's ports;
//   - host A's agent stopped: .consul names fail within 1 s, other names
//     resolve; the agent is started again;
//   - compose down leaves no address, rule or link of the networks.
func (s *suite) linkLocal(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	file, err := filepath.Abs("testdata/linklocal.yaml")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw), "${") {
		t.Fatalf("%s uses variables; it must be deployable unmodified on every host", file)
	}
	// compose runs docker compose on both hosts at once.
	compose := func(ctx context.Context, args ...string) error {
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, h := range l.Hosts() {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if out, err := h.Compose(ctx, file, nil, args...); err != nil {
					errs[i] = fmt.Errorf("%w\n%s", err, out)
				}
			}()
		}
		wg.Wait()
		return errors.Join(errs...)
	}
	down := func(ctx context.Context) {
		if err := compose(ctx, "down", "--timeout", "1"); err != nil {
			t.Error(err)
		}
	}
	downDone := false
	t.Cleanup(func() {
		if !downDone {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			down(ctx)
		}
	})
	start := time.Now()
	if err := compose(ctx, "up", "-d"); err != nil {
		t.Fatal(err)
	}
	t.Logf("compose up on both hosts: %s", time.Since(start).Round(100*time.Millisecond))
	var vnis []uint32
	for _, k := range llKeys {
		vni, err := l.NetworkVNI(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		vnis = append(vnis, vni)
	}
	for _, h := range l.Hosts() {
		for _, vni := range vnis {
			gw := h.GatewayLink(vni)
			out, err := h.Run(ctx, "ip", "-4", "-o", "addr", "show", "dev", gw)
			if err != nil || !strings.Contains(out, llAddr+"/32") {
				t.Errorf("%s: %s does not carry %s/32: %v\n%s", h, gw, llAddr, err, out)
			}
		}
	}

	// Consul DNS through the address, and both hosts' web pages by name.
	start = time.Now()
	for _, h := range l.Hosts() {
		seen := map[string]bool{}
		err := eventually(t, 45*time.Second, func(ctx context.Context) error {
			body, err := h.ContainerGet(ctx, llClient, "http://"+llWeb+"/")
			if err != nil {
				return err
			}
			seen[strings.TrimSpace(body)] = true
			for _, o := range l.Hosts() {
				if !seen["web on "+o.Node] {
					return fmt.Errorf("pages seen from %s: %v; none yet from %s's web", llWeb, keys(seen), o)
				}
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s: GET http://%s/ from %s: %v", h, llWeb, llClient, err)
		}
	}
	t.Logf("both hosts' clients got both hosts' pages by name %s after %s", llWeb, time.Since(start).Round(100*time.Millisecond))

	for _, h := range l.Hosts() {
		// An outside name, from both networks.
		for _, c := range []string{llClient, llIsolated} {
			out, err := h.InContainer(ctx, c, "nslookup", llOutside)
			if err != nil || !slices.Contains(nslookupAddrs(out), llOutsideAddr) {
				t.Errorf("%s: nslookup %s in %s: %v, want %s:\n%s", h, llOutside, c, err, llOutsideAddr, out)
			}
		}
		// The host's own agent's API on the consul_api network.
		body, err := h.ContainerGet(ctx, llClient, "http://"+llAddr+":8500/v1/catalog/services")
		if err != nil || !strings.Contains(body, `"ll-web"`) || !strings.Contains(body, `"consul"`) {
			t.Errorf("%s: GET /v1/catalog/services through %s:8500 from %s: %v, %q; want the catalog", h, llAddr, llClient, err, body)
		}
		body, err = h.ContainerGet(ctx, llClient, "http://"+llAddr+":8500/v1/agent/self")
		if err != nil || !strings.Contains(body, `"NodeName":"`+h.Node+`"`) {
			t.Errorf("%s: GET /v1/agent/self through %s:8500: %v; want the agent of node %s", h, llAddr, err, h.Node)
		}
		// Refused on the network without consul_api.
		_, err = h.ContainerGet(ctx, llIsolated, "http://"+llAddr+":8500/v1/catalog/services")
		if err == nil || !strings.Contains(err.Error(), "refused") {
			t.Errorf("%s: GET through %s:8500 from %s (no consul_api): %v; want connection refused", h, llAddr, llIsolated, err)
		}
	}

	start = time.Now()
	s.linkLocalUnderlay(t)
	t.Logf("underlay: no port of %s reachable from a test host on the underlay (checked in %s)", llAddr, time.Since(start).Round(100*time.Millisecond))
	s.linkLocalAgentDown(t)

	// Tidy: the networks' bridges (and gateway links) and every rule
	// naming them go with them.
	var bridges []string
	for _, vni := range vnis {
		bridges = append(bridges, vxlan.BridgeName(vni), vxlan.GatewayName(vni), vxlan.PortName(vni))
	}
	start = time.Now()
	down(ctx)
	downDone = true
	t.Logf("compose down on both hosts: %s", time.Since(start).Round(100*time.Millisecond))
	for _, h := range l.Hosts() {
		err := eventually(t, 20*time.Second, func(ctx context.Context) error {
			links, err := h.AllLinks(ctx)
			if err != nil {
				return err
			}
			for _, b := range bridges {
				if _, ok := links[b]; ok {
					return fmt.Errorf("link %s left", b)
				}
			}
			rules, err := h.RulesMentioning(ctx, bridges)
			if err != nil {
				return err
			}
			if len(rules) > 0 {
				return fmt.Errorf("rules left:\n%s", strings.Join(rules, "\n"))
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s after compose down: %v", h, err)
		}
	}
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// linkLocalUnderlay: a test host plugged into the lab's underlay switch,
// routing the address to each lab host in turn, reaches none of its ports
// (DNS over UDP and TCP, the API), while the same host's Consul DNS on its
// underlay address answers it (the control).
func (s *suite) linkLocalUnderlay(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	ns := testenv.NewNetNS(t)
	port := "llu" + strconv.FormatInt(time.Now().UnixNano()%1e6, 36)
	if _, err := run(ctx, nil, "ip", "-n", ns.Name, "link", "add", "ul0", "type", "veth", "peer", "name", port, "netns", l.NSSwitch); err != nil {
		t.Fatal(err)
	}
	for _, argv := range [][]string{
		{"ip", "-n", l.NSSwitch, "link", "set", port, "master", "sw0", "up"},
		{"ip", "-n", ns.Name, "addr", "add", "198.51.100.99/24", "dev", "ul0"},
		{"ip", "-n", ns.Name, "link", "set", "ul0", "up"},
	} {
		if _, err := run(ctx, nil, argv[0], argv[1:]...); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range l.Hosts() {
		if _, err := run(ctx, nil, "ip", "-n", ns.Name, "route", "replace", llAddr+"/32", "via", h.Addr.String()); err != nil {
			t.Fatal(err)
		}
		// The control: the host's agent answers DNS on its underlay address.
		err := eventually(t, 10*time.Second, func(ctx context.Context) error {
			_, err := dnsFrom(ctx, ns, "udp", netip.AddrPortFrom(h.Addr, 53).String(), h.Node+".node.consul")
			return err
		})
		if err != nil {
			t.Fatalf("%s: the test host on the underlay gets no DNS answer from %s:53 (the control): %v", h, h.Addr, err)
		}
		// The probes wait for an answer that must not come: all at once.
		var wg sync.WaitGroup
		for _, tc := range []struct{ proto, port string }{{"udp", "53"}, {"tcp", "53"}, {"tcp", "8500"}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				addr := llAddr + ":" + tc.port
				var err error
				if tc.port == "53" {
					_, err = dnsFrom(ctx, ns, tc.proto, addr, h.Node+".node.consul")
				} else {
					var c net.Conn
					dctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
					c, err = testenv.DialIn(dctx, ns.Path, "tcp", addr)
					cancel()
					if err == nil {
						c.Close()
					}
				}
				if err == nil {
					t.Errorf("%s: a host on the underlay reached %s/%s", h, addr, tc.proto)
				} else if errors.Is(err, syscall.ECONNREFUSED) {
					t.Errorf("%s: a host on the underlay got a refusal from %s/%s, want no answer at all", h, addr, tc.proto)
				}
			}()
		}
		wg.Wait()
	}
}

// dnsFrom asks server one A question from namespace ns within 1.5 s.
func dnsFrom(ctx context.Context, ns *testenv.NetNS, proto, server, name string) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	defer cancel()
	c, err := testenv.DialIn(ctx, ns.Path, proto, server)
	if err != nil {
		return nil, err
	}
	conn := &dns.Conn{Conn: c}
	defer conn.Close()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	if err := conn.WriteMsg(q); err != nil {
		return nil, err
	}
	r, err := conn.ReadMsg()
	if err == nil && r.Rcode != dns.RcodeSuccess {
		err = fmt.Errorf("rcode %s", dns.RcodeToString[r.Rcode])
	}
	return r, err
}

// realRE is the elapsed time busybox's time prints.
var realRE = regexp.MustCompile(`real\s+(\d+)m\s*([\d.]+)s`)

// timedInContainer runs cmd in container under busybox time and returns
// its output and how long it took inside the container.
func timedInContainer(ctx context.Context, h *Host, container string, cmd ...string) (string, time.Duration, error) {
	out, err := h.InContainer(ctx, container, "sh", "-c", "time "+strings.Join(cmd, " ")+" 2>&1; true")
	if err != nil {
		return out, 0, err
	}
	m := realRE.FindStringSubmatch(out)
	if m == nil {
		return out, 0, fmt.Errorf("no time in %q", out)
	}
	mins, _ := strconv.Atoi(m[1])
	secs, _ := strconv.ParseFloat(m[2], 64)
	return out, time.Duration(mins)*time.Minute + time.Duration(secs*float64(time.Second)), nil
}

// linkLocalAgentDown: with host A's Consul agent stopped, .consul names
// asked through 169.254.1.1 fail within 1 s (directly and through Docker's
// embedded DNS) while outside names resolve; then the agent is started
// again and Consul names resolve again.
func (s *suite) linkLocalAgentDown(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	h := l.A
	if err := l.Script(ctx, "agent.sh", "stop", "a"); err != nil {
		t.Fatal(err)
	}
	restarted := false
	restart := func(ctx context.Context) {
		if restarted {
			return
		}
		restarted = true
		if err := l.Script(ctx, "agent.sh", "start", "a"); err != nil {
			t.Errorf("starting host A's agent again: %v", err)
		}
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		restart(ctx)
	})
	var worst time.Duration
	for _, argv := range [][]string{{"nslookup", llWeb}, {"nslookup", llWeb, llAddr}} {
		for range 3 {
			out, took, err := timedInContainer(ctx, h, llClient, argv...)
			if err != nil {
				t.Fatal(err)
			}
			worst = max(worst, took)
			if a := nslookupAddrs(out); len(a) > 0 || !strings.Contains(out, "can't find") {
				t.Errorf("agent stopped: %s answered %v, want a failure:\n%s", strings.Join(argv, " "), a, out)
			}
			if took >= time.Second {
				t.Errorf("agent stopped: %s took %s, want under 1s:\n%s", strings.Join(argv, " "), took, out)
			}
		}
	}
	t.Logf("agent stopped: .consul failed after at most %s (3 tries each, through the embedded DNS and directly)", worst)
	s.notes["linklocal"] = fmt.Sprintf(".consul fails in %s with the agent down", worst.Round(time.Millisecond))
	out, took, err := timedInContainer(ctx, h, llClient, "nslookup", llOutside)
	if err != nil || !slices.Contains(nslookupAddrs(out), llOutsideAddr) {
		t.Errorf("agent stopped: nslookup %s: %v, want %s:\n%s", llOutside, err, llOutsideAddr, out)
	}
	t.Logf("agent stopped: %s resolved in %s", llOutside, took)

	restart(ctx)
	start := time.Now()
	err = eventually(t, 45*time.Second, func(ctx context.Context) error {
		out, err := h.InContainer(ctx, llClient, "nslookup", llWeb)
		if err == nil && len(nslookupAddrs(out)) == 0 {
			err = fmt.Errorf("no address:\n%s", out)
		}
		return err
	})
	if err != nil {
		t.Errorf("agent started again: nslookup %s: %v", llWeb, err)
	}
	t.Logf("agent started again: %s resolves after %s", llWeb, time.Since(start).Round(100*time.Millisecond))
}
