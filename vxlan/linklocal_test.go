package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"consul-overlay/internal/testenv"
)

var testLinkLocal = netip.MustParseAddr("169.254.1.1")

// linkLocalManager is h's manager with the well-known address ll.
func (h *testHost) linkLocalManager(t *testing.T, ll netip.Addr) *Manager {
	t.Helper()
	return h.managerWith(t, func(cfg *Config) { cfg.LinkLocal = ll })
}

// linkLocalRules are the rules of InputChain in iptables with a -d match.
func linkLocalRules(t *testing.T, h *testHost) []string {
	t.Helper()
	out, err := h.NS.Run(t, "iptables", "-w", "-S", InputChain)
	if err != nil {
		return nil
	}
	var rules []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A ") && strings.Contains(l, " -d ") {
			rules = append(rules, strings.TrimSpace(l))
		}
	}
	return rules
}

// bridgeAddrs are the IPv4 addresses of a bridge with their labels.
func bridgeAddrs(t *testing.T, h *testHost, vni uint32) []string {
	t.Helper()
	l := link(t, h, BridgeName(vni))
	if l == nil {
		return nil
	}
	addrs, err := h.NS.Handle().AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range addrs {
		out = append(out, a.IPNet.String()+" "+a.Label)
	}
	slices.Sort(out)
	return out
}

// serveIn listens in ns on addr (TCP: accepts and closes; UDP: echoes).
func serveIn(t *testing.T, ns *testenv.NetNS, network, addr string) {
	t.Helper()
	var l net.Listener
	var pc net.PacketConn
	err := ns.Do(func() error {
		var err error
		if network == "udp" {
			pc, err = net.ListenPacket("udp", addr)
		} else {
			l, err = net.Listen("tcp", addr)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if pc != nil {
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 512)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], from)
			}
		}()
		return
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

// reach tells how a connection from ns to addr fares: "ok", "refused" or
// "timeout" (UDP: an echo within the timeout is "ok").
func reach(t *testing.T, ns *testenv.NetNS, network, addr string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	c, err := testenv.DialIn(ctx, ns.Path, network, addr)
	if err == nil && network == "udp" {
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		if _, err = c.Write([]byte("hello")); err == nil {
			buf := make([]byte, 16)
			_, err = c.Read(buf)
		}
	} else if err == nil {
		c.Close()
	}
	var ne net.Error
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return err.Error()
}

// The well-known address is on every bridge; containers of a network
// reach its DNS port, those of a ConsulAPI network its API port (others
// are refused there at once), an internal network's containers too; the
// host reaches it; a host on the underlay reaches none of its ports; no
// other port is open through it. Everything goes with the networks, and
// with the setting.
func TestLinkLocal(t *testing.T) {
	t.Parallel()
	hosts := newHosts(t, 2, testenv.UnderlayOptions{})
	h0, h1 := hosts[0], hosts[1]
	m := h0.linkLocalManager(t, testLinkLocal)
	const vniAPI, vniInt = 0x41, 0x42
	netAPI := Network{VNI: vniAPI, ConsulAPI: true, Gateways: []netip.Prefix{pfx("10.41.0.1/24")}}
	netInt := Network{VNI: vniInt, Internal: true, Gateways: []netip.Prefix{pfx("10.42.0.1/24")}}
	for _, n := range []Network{netAPI, netInt} {
		if _, err := m.EnsureNetwork(t.Context(), n); err != nil {
			t.Fatal(err)
		}
	}
	for _, vni := range []uint32{vniAPI, vniInt} {
		want := []string{"169.254.1.1/32 " + BridgeName(vni) + ":ll"}
		if vni == vniAPI {
			want = append(want, "10.41.0.1/24 vxbr-000041")
		} else {
			want = append(want, "10.42.0.1/24 vxbr-000042")
		}
		slices.Sort(want)
		if got := bridgeAddrs(t, h0, vni); !slices.Equal(got, want) {
			t.Errorf("bridge %s addresses %q, want %q", BridgeName(vni), got, want)
		}
	}
	// One rule of its own for the network with the API; the rest is the
	// same for any number of networks.
	wantRules := []string{
		"-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-000041 -p tcp -m tcp --dport 8500 -m comment --comment consul-overlay -j RETURN",
		"-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i lo -m comment --comment consul-overlay -j RETURN",
		"-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-+ -p tcp -m tcp --dport 8500 -m comment --comment consul-overlay -j REJECT --reject-with tcp-reset",
		"-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-+ -p tcp -m tcp --dport 53 -m comment --comment consul-overlay -j RETURN",
		"-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-+ -p udp -m udp --dport 53 -m comment --comment consul-overlay -j RETURN",
		"-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -m comment --comment consul-overlay -j DROP",
	}
	if got := linkLocalRules(t, h0); !slices.Equal(got, wantRules) {
		t.Errorf("rules:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantRules, "\n"))
	}
	// A second ensure changes nothing.
	for _, n := range []Network{netAPI, netInt} {
		var ch Changes
		m.mu.Lock()
		_, err := m.ensureNetwork(t.Context(), n, false, &ch)
		m.mu.Unlock()
		if err != nil || ch.Total() != 0 {
			t.Errorf("second ensure of vni %d: %+v, %v; want no change", n.VNI, ch, err)
		}
	}

	// What the plugin serves, and a port it does not.
	ll := testLinkLocal.String()
	serveIn(t, h0.NS, "udp", ll+":53")
	serveIn(t, h0.NS, "tcp", ll+":53")
	serveIn(t, h0.NS, "tcp", ll+":8500")
	serveIn(t, h0.NS, "tcp", "0.0.0.0:2222")

	cAPI := h0.runWith(t, m, vniAPI, []netip.Prefix{pfx("10.41.0.2/24")})
	cInt := h0.runWith(t, m, vniInt, []netip.Prefix{pfx("10.42.0.2/24")})
	for _, c := range []*container{cAPI, cInt} {
		// Docker adds the connected route the driver gives at Join.
		c.ns.MustRun(t, "ip", "route", "add", ll+"/32", "dev", "eth0", "scope", "link")
	}
	// The underlay host routes the address to h0.
	h1.NS.MustRun(t, "ip", "route", "add", ll+"/32", "via", h0.Addr.String())
	mustPing(t, h1.NS, h0.Addr)

	checkReach(t, ll, []reachCase{
		{"consul_api network", cAPI.ns, "udp", "53", "ok"},
		{"consul_api network", cAPI.ns, "tcp", "53", "ok"},
		{"consul_api network", cAPI.ns, "tcp", "8500", "ok"},
		{"consul_api network", cAPI.ns, "tcp", "2222", "timeout"},
		{"internal network", cInt.ns, "udp", "53", "ok"},
		{"internal network", cInt.ns, "tcp", "53", "ok"},
		{"internal network", cInt.ns, "tcp", "8500", "refused"},
		{"internal network", cInt.ns, "tcp", "2222", "timeout"},
		{"host", h0.NS, "udp", "53", "ok"},
		{"host", h0.NS, "tcp", "8500", "ok"},
		{"underlay", h1.NS, "udp", "53", "timeout"},
		{"underlay", h1.NS, "tcp", "53", "timeout"},
		{"underlay", h1.NS, "tcp", "8500", "timeout"},
		{"underlay", h1.NS, "tcp", "2222", "timeout"},
	})
	// The underlay host does reach the host's own address.
	if got := reach(t, h1.NS, "tcp", h0.Addr.String()+":2222"); got != "ok" {
		t.Errorf("underlay → %s:2222: %s, want ok (the test's control)", h0.Addr, got)
	}

	// The shared rules stay while a bridge is left, and go with the last.
	if err := m.DeleteNetwork(t.Context(), vniInt); err != nil {
		t.Fatal(err)
	}
	if got := linkLocalRules(t, h0); !slices.Equal(got, wantRules) {
		t.Errorf("rules after deleting the internal network:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantRules, "\n"))
	}

	// A new address: the old one and its rules go at the next ensure.
	m2 := h0.linkLocalManager(t, netip.MustParseAddr("169.254.1.2"))
	if _, err := m2.Reconcile(t.Context(), State{Networks: []Network{netAPI}, Endpoints: []Endpoint{{ID: cAPI.id, VNI: vniAPI, MAC: cAPI.mac}}}); err != nil {
		t.Fatal(err)
	}
	if got, want := bridgeAddrs(t, h0, vniAPI), []string{"10.41.0.1/24 vxbr-000041", "169.254.1.2/32 vxbr-000041:ll"}; !slices.Equal(got, want) {
		t.Errorf("after the change: addresses %q, want %q", got, want)
	}
	for _, r := range linkLocalRules(t, h0) {
		if !strings.Contains(r, "169.254.1.2/32") {
			t.Errorf("after the change: rule of the old address left: %s", r)
		}
	}
	// Turned off: nothing of it is left.
	m3 := h0.linkLocalManager(t, netip.Addr{})
	if _, err := m3.Reconcile(t.Context(), State{Networks: []Network{netAPI}, Endpoints: []Endpoint{{ID: cAPI.id, VNI: vniAPI, MAC: cAPI.mac}}}); err != nil {
		t.Fatal(err)
	}
	if got, want := bridgeAddrs(t, h0, vniAPI), []string{"10.41.0.1/24 vxbr-000041"}; !slices.Equal(got, want) {
		t.Errorf("turned off: addresses %q, want %q", got, want)
	}
	if got := linkLocalRules(t, h0); len(got) != 0 {
		t.Errorf("turned off: rules left:\n%s", strings.Join(got, "\n"))
	}

	// On again, then the last network goes: so do the host-wide rules.
	if _, err := m.EnsureNetwork(t.Context(), netAPI); err != nil {
		t.Fatal(err)
	}
	if n := len(linkLocalRules(t, h0)); n != 6 {
		t.Errorf("on again: %d rules, want 6", n)
	}
	if err := m.DeleteNetwork(t.Context(), vniAPI); err != nil {
		t.Fatal(err)
	}
	if got := linkLocalRules(t, h0); len(got) != 0 {
		t.Errorf("after the last network: rules left:\n%s", strings.Join(got, "\n"))
	}
}

// reachCase is one probe of checkReach: from who (in ns), a connection
// over network (udp, tcp) to the well-known address's port gives want
// ("ok", "refused" or "timeout", as reach says).
type reachCase struct {
	who           string
	ns            *testenv.NetNS
	network, port string
	want          string
}

// checkReach probes the well-known address ll as each case says.
func checkReach(t *testing.T, ll string, cases []reachCase) {
	t.Helper()
	for _, tc := range cases {
		if got := reach(t, tc.ns, tc.network, ll+":"+tc.port); got != tc.want {
			t.Errorf("%s → %s:%s/%s: %s, want %s", tc.who, ll, tc.port, tc.network, got, tc.want)
		}
	}
}

// A failure while programming the address undoes the new network whole,
// the host-wide rules included.
func TestLinkLocalRollback(t *testing.T) {
	inLayouts(t, true, testLinkLocalRollback)
}

func testLinkLocalRollback(t *testing.T, dp bool) {
	hosts := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)
	h := hosts[0]
	for _, step := range []string{"bridge-linklocal", "firewall-linklocal"} {
		t.Run(step, func(t *testing.T) {
			m := h.linkLocalManager(t, testLinkLocal)
			m.failAt = func(s string) error {
				if s == step {
					return fmt.Errorf("injected")
				}
				return nil
			}
			if _, err := m.EnsureNetwork(t.Context(), Network{VNI: 0x43, Gateways: []netip.Prefix{pfx("10.43.0.1/24")}}); err == nil {
				t.Fatal("EnsureNetwork succeeded with a failing step")
			}
			if names := linkNames(t, h); len(names) != 0 {
				t.Errorf("links left: %v", names)
			}
			if got := linkLocalRules(t, h); len(got) != 0 {
				t.Errorf("rules left:\n%s", strings.Join(got, "\n"))
			}
		})
	}
}
