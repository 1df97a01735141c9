package vxlan

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

// restoreManager is h.manager with iptables-restore beside the wrapped
// commands, so rule changes go through one transaction as in production.
func (h *testHost) restoreManager(t *testing.T, owner string) *Manager {
	t.Helper()
	dir := t.TempDir()
	for _, cmd := range []string{"iptables", "ip6tables", "iptables-restore", "ip6tables-restore"} {
		bin, err := exec.LookPath(cmd)
		if err != nil {
			testenv.Missing(t, cmd, "apt-get install -y iptables")
		}
		script := fmt.Sprintf("#!/bin/sh\nexec nsenter --net=%s %s \"$@\"\n", h.NS.Path, bin)
		if err := os.WriteFile(filepath.Join(dir, cmd), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cfg := Config{
		VTEP:           h.Addr,
		IPTables:       filepath.Join(dir, "iptables"),
		IP6Tables:      filepath.Join(dir, "ip6tables"),
		Sysctl:         "-",
		NoTrackBridged: true, // the NOTRACK rule is exercised and counted too
		Owner:          owner,
		Logger:         testLogger(t).With("host", h.Addr, "owner", owner),
	}
	if h.dp != nil {
		cfg.DataplaneNS = h.dp.Path
	}
	m, err := NewAt(cfg, h.NS.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if m.fw.restore[cfg.IPTables] == "" || m.fw.restore[cfg.IP6Tables] == "" {
		t.Fatalf("iptables-restore not found beside the commands: %v", m.fw.restore)
	}
	return m
}

// vxlanFrame is a VXLAN packet's UDP payload: the VXLAN header with vni,
// an Ethernet frame from srcMAC to dstMAC carrying an IPv4 UDP datagram
// from src to dst:dport with payload.
func vxlanFrame(vni uint32, dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, dport uint16, payload []byte) []byte {
	b := []byte{0x08, 0, 0, 0, byte(vni >> 16), byte(vni >> 8), byte(vni), 0}
	b = append(b, dstMAC...)
	b = append(b, srcMAC...)
	b = append(b, 0x08, 0x00)
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(payload)))
	ip[8], ip[9] = 64, 17 // TTL, UDP
	s4, d4 := src.As4(), dst.As4()
	copy(ip[12:16], s4[:])
	copy(ip[16:20], d4[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	udp := make([]byte, 8)
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload))) // checksum 0: none (IPv4)
	b = append(b, ip...)
	b = append(b, udp...)
	return append(b, payload...)
}

// sendUDP sends msg n times from src:<any> to dst:port inside ns.
func sendUDP(t *testing.T, ns *testenv.NetNS, src, dst netip.Addr, port, n int, msg []byte) {
	t.Helper()
	err := ns.Do(func() error {
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: src.AsSlice()})
		if err != nil {
			return err
		}
		defer c.Close()
		for range n {
			if _, err := c.WriteToUDP(msg, &net.UDPAddr{IP: dst.AsSlice(), Port: port}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("send from %s to %s:%d: %v", src, dst, port, err)
	}
}

// udpListener is a UDP socket inside a container's namespace.
type udpListener struct{ c *net.UDPConn }

func listenUDP(t *testing.T, ns *testenv.NetNS, port int) *udpListener {
	t.Helper()
	var l udpListener
	err := ns.Do(func() (err error) {
		l.c, err = net.ListenUDP("udp4", &net.UDPAddr{Port: port})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.c.Close() })
	return &l
}

// received counts the datagrams that start with prefix arriving within
// wait (the socket keeps its namespace outside Do).
func (l *udpListener) received(t *testing.T, prefix string, wait time.Duration) int {
	t.Helper()
	n := 0
	buf := make([]byte, 2048)
	deadline := time.Now().Add(wait)
	for {
		if err := l.c.SetReadDeadline(deadline); err != nil {
			t.Fatal(err)
		}
		k, _, err := l.c.ReadFromUDP(buf)
		if err != nil {
			return n
		}
		if strings.HasPrefix(string(buf[:k]), prefix) {
			n++
		}
	}
}

func drops(t *testing.T, m *Manager) uint64 {
	t.Helper()
	n, err := m.VXLANDrops()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// inputRules lists InputChain in h's namespace for cmd.
func inputRules(t *testing.T, h *testHost, cmd string) []string {
	t.Helper()
	out, err := h.NS.Run(t, cmd, "-w", "-S", InputChain)
	if err != nil {
		return nil
	}
	var rules []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A ") {
			rules = append(rules, l)
		}
	}
	return rules
}

// A host that is not a member sends crafted VXLAN packets (the right VNI,
// a member container's MACs and addresses) to a member: the container
// sees none of them and the drop counter rises, while a member's crafted
// packets pass. Once the sender is allowed its packets pass; once it is
// removed they are dropped again. Members' real traffic flows throughout.
func TestUnderlayAllowlist(t *testing.T) {
	for _, tt := range []struct {
		name string
		v6   bool
		cmd  string
	}{
		{"ipv4 underlay", false, "iptables"},
		{"ipv6 underlay", true, "ip6tables"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			testUnderlayAllowlist(t, tt.v6, tt.cmd)
		})
	}
}

func testUnderlayAllowlist(t *testing.T, v6 bool, cmd string) {
	ctx := t.Context()
	hosts := newHosts(t, 3, testenv.UnderlayOptions{IPv6: v6})
	h0, h1, h2 := hosts[0], hosts[1], hosts[2] // h2 is not a member
	h0.m, h1.m = h0.restoreManager(t, ""), h1.restoreManager(t, "")
	const vni = 0x4321
	nw := Network{VNI: vni, Gateways: []netip.Prefix{pfx("10.43.0.1/24")}}
	for _, h := range []*testHost{h0, h1} {
		if _, err := h.m.EnsureNetwork(ctx, nw); err != nil {
			t.Fatal(err)
		}
	}
	bits := 32
	if v6 {
		bits = 128
	}
	// The filter is there before any peer: the empty allowlist drops all.
	wantEmpty := []string{fmt.Sprintf("-A %s -p udp -m udp --dport %d -m comment --comment consul-overlay -j DROP", InputChain, DefaultPort)}
	if got := inputRules(t, h0, cmd); !slices.Equal(got, wantEmpty) {
		t.Errorf("%s %s before any peer:\n%s\nwant\n%s", cmd, InputChain, strings.Join(got, "\n"), strings.Join(wantEmpty, "\n"))
	}
	if first := strings.Split(iptables(t, h0, cmd, "-S", "INPUT"), "\n")[1]; first != "-A INPUT -j "+InputChain {
		t.Errorf("%s: first INPUT rule %q, want our jump", cmd, first)
	}

	c0 := h0.run(t, vni, []netip.Prefix{pfx("10.43.0.2/24")})
	c1 := h1.run(t, vni, []netip.Prefix{pfx("10.43.0.3/24")})
	c0.announce(t, h1)
	c1.announce(t, h0)
	mustPing(t, c0.ns, addr("10.43.0.3")) // peers' VTEPs are allowed with them
	want := []string{
		fmt.Sprintf("-A %s -s %s/%d -p udp -m udp --dport %d -m comment --comment consul-overlay -j RETURN", InputChain, h1.Addr, bits, DefaultPort),
		wantEmpty[0],
	}
	if got := inputRules(t, h0, cmd); !slices.Equal(got, want) {
		t.Errorf("%s %s with a peer:\n%s\nwant\n%s", cmd, InputChain, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	const port = 7777
	l := listenUDP(t, c0.ns, port)
	forged := func(tag string) []byte {
		return vxlanFrame(vni, c0.mac, c1.mac, addr("10.43.0.3"), addr("10.43.0.2"), port, []byte(tag))
	}
	attack := func(tag string) (got int, dropped uint64) {
		t.Helper()
		before := drops(t, h0.m)
		sendUDP(t, h2.NS, h2.Addr, h0.Addr, DefaultPort, 5, forged(tag))
		got = l.received(t, tag, 500*time.Millisecond)
		return got, drops(t, h0.m) - before
	}
	fromMember := func(tag string) int {
		t.Helper()
		sendUDP(t, h1.NS, h1.Addr, h0.Addr, DefaultPort, 5, forged(tag))
		return l.received(t, tag, 500*time.Millisecond)
	}

	// The test's own crafted packets work: from a member they arrive.
	if got := fromMember("member-1"); got != 5 {
		t.Fatalf("container received %d of 5 crafted packets from a member, want 5 (the test's packets are wrong)", got)
	}
	if got, dropped := attack("attack-1"); got != 0 || dropped < 5 {
		t.Errorf("non-member: container received %d crafted packets (want 0), %d drops counted (want >= 5)", got, dropped)
	}

	// The sender joins: its packets pass; the member's still do.
	if err := h0.m.SetAllowedVTEPs(ctx, []netip.Addr{h2.Addr, h0.Addr}); err != nil {
		t.Fatal(err)
	}
	if got, dropped := attack("joined"); got != 5 || dropped != 0 {
		t.Errorf("allowed sender: container received %d of 5, %d dropped", got, dropped)
	}
	if got := fromMember("member-2"); got != 5 {
		t.Errorf("peer's VTEP outside the set: container received %d of 5, want it still allowed", got)
	}

	// It leaves: dropped again. A second identical call writes nothing.
	for range 2 {
		if err := h0.m.SetAllowedVTEPs(ctx, nil); err != nil {
			t.Fatal(err)
		}
	}
	if got, dropped := attack("left"); got != 0 || dropped < 5 {
		t.Errorf("after leaving: container received %d (want 0), %d drops (want >= 5)", got, dropped)
	}
	if got := inputRules(t, h0, cmd); !slices.Equal(got, want) {
		t.Errorf("%s %s after leaving:\n%s\nwant\n%s", cmd, InputChain, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	mustPing(t, c0.ns, addr("10.43.0.3"))

	// The member's peers go too: its VTEP is no longer allowed once the
	// set is applied again.
	for _, p := range c1.peers() {
		if err := h0.m.DeletePeer(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := h0.m.SetAllowedVTEPs(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if got := fromMember("member-gone"); got != 0 {
		t.Errorf("former member: container received %d, want 0", got)
	}
	if got := inputRules(t, h0, cmd); !slices.Equal(got, wantEmpty) {
		t.Errorf("%s %s after the member left:\n%s\nwant\n%s", cmd, InputChain, strings.Join(got, "\n"), strings.Join(wantEmpty, "\n"))
	}
	// The other family's command holds the chain and the jump, no VXLAN rule.
	other := "ip6tables"
	if v6 {
		other = "iptables"
	}
	if got := inputRules(t, h0, other); len(got) != 0 {
		t.Errorf("%s %s: %v, want empty", other, InputChain, got)
	}
	if err := h0.m.SetAllowedVTEPs(ctx, []netip.Addr{addr("198.51.100.1"), addr("2001:db8::99")}); err == nil {
		t.Error("SetAllowedVTEPs with both families accepted")
	}
}

// Two owners in one namespace on one port: each owner's allowlist lets the
// other's VTEPs through (RETURN, not a per-owner DROP), and one owner's
// SetAllowedVTEPs removes only its own rules.
func TestUnderlayAllowlistOwners(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	h0 := newHosts(t, 1, testenv.UnderlayOptions{})[0]
	a, b := h0.restoreManager(t, "a"), h0.restoreManager(t, "b")
	for i, m := range []*Manager{a, b} {
		if _, err := m.EnsureNetwork(ctx, Network{VNI: uint32(0x61 + i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.SetAllowedVTEPs(ctx, []netip.Addr{addr("192.0.2.7"), addr("192.0.2.8")}); err != nil {
		t.Fatal(err)
	}
	if err := b.SetAllowedVTEPs(ctx, []netip.Addr{addr("192.0.2.9")}); err != nil {
		t.Fatal(err)
	}
	if err := a.SetAllowedVTEPs(ctx, []netip.Addr{addr("192.0.2.8")}); err != nil {
		t.Fatal(err)
	}
	rule := func(src, owner, target string) string {
		s := ""
		if src != "" {
			s = "-s " + src + "/32 "
		}
		return fmt.Sprintf("-A %s %s-p udp -m udp --dport 4789 -m comment --comment consul-overlay-%s -j %s", InputChain, s, owner, target)
	}
	want := []string{
		rule("192.0.2.9", "b", "RETURN"),
		rule("192.0.2.8", "a", "RETURN"),
		rule("", "a", "DROP"),
		rule("", "b", "DROP"),
	}
	if got := inputRules(t, h0, "iptables"); !slices.Equal(got, want) {
		t.Errorf("rules:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if n := len(slices.DeleteFunc(strings.Split(iptables(t, h0, "iptables", "-S", "INPUT"), "\n"), func(l string) bool { return l != "-A INPUT -j "+InputChain })); n != 1 {
		t.Errorf("%d INPUT jumps, want 1", n)
	}
}

// A container on an internal network reaches no address of its host and
// no other overlay; one on a normal network reaches the host as on
// Docker's bridges. An administrator's DOCKER-USER rule sees overlay
// traffic before our ACCEPT.
func TestHostIsolation(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	hosts := newHosts(t, 2, testenv.UnderlayOptions{})
	h0, h1 := hosts[0], hosts[1]
	h0.m = h0.restoreManager(t, "")
	if out := h0.NS.MustRun(t, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables"); strings.TrimSpace(out) != "1" {
		h0.NS.MustRun(t, "sysctl", "-w", "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
	}
	h0.NS.MustRun(t, "sysctl", "-w", "net.ipv4.ip_forward=1")
	// dockerd's FORWARD: policy DROP, DOCKER-USER first.
	for _, cmd := range []string{"iptables", "ip6tables"} {
		iptables(t, h0, cmd, "-P", "FORWARD", "DROP")
		iptables(t, h0, cmd, "-N", "DOCKER-USER")
		iptables(t, h0, cmd, "-A", "DOCKER-USER", "-j", "RETURN")
		iptables(t, h0, cmd, "-A", "FORWARD", "-j", "DOCKER-USER")
		iptables(t, h0, cmd, "-A", "FORWARD", "-i", "eth9", "-j", "ACCEPT")
	}

	const vniI, vniN = 0x71, 0x72
	netI := Network{VNI: vniI, Internal: true, Gateways: []netip.Prefix{pfx("10.71.0.1/24"), pfx("fd00:71::1/64")}}
	netN := Network{VNI: vniN, Gateways: []netip.Prefix{pfx("10.72.0.1/24")}}
	for _, h := range hosts {
		if _, err := h.m.EnsureNetwork(ctx, netI); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h0.m.EnsureNetwork(ctx, netN); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if fwd := strings.Split(iptables(t, h0, cmd, "-S", "FORWARD"), "\n"); fwd[1] != "-A FORWARD -j DOCKER-USER" {
			t.Errorf("%s FORWARD %q: want DOCKER-USER's jump first", cmd, fwd[1:])
		}
		checkForwardJumps(t, h0, cmd, 1, "after EnsureNetwork")
		want := []string{
			fmt.Sprintf("-A %s -i vxbr-000071 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment consul-overlay -j RETURN", InputChain),
			fmt.Sprintf("-A %s -p udp -m udp --dport 4789 -m comment --comment consul-overlay -j DROP", InputChain),
			fmt.Sprintf("-A %s -i vxbr-000071 -m comment --comment consul-overlay -j DROP", InputChain),
		}
		if cmd == "ip6tables" {
			want = slices.Delete(want, 1, 2) // an IPv4 underlay
		}
		if got := inputRules(t, h0, cmd); !slices.Equal(got, want) {
			t.Errorf("%s %s:\n%s\nwant\n%s", cmd, InputChain, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if slices.ContainsFunc(inputRules(t, h0, cmd), func(r string) bool { return strings.Contains(r, "vxbr-000072") }) {
			t.Errorf("%s: INPUT rule for the normal network", cmd)
		}
	}

	ci := h0.run(t, vniI, []netip.Prefix{pfx("10.71.0.2/24"), pfx("fd00:71::2/64")}, addr("10.71.0.1"))
	ci2 := h1.run(t, vniI, []netip.Prefix{pfx("10.71.0.3/24")})
	ci.announce(t, h1)
	ci2.announce(t, h0)
	cn := h0.run(t, vniN, []netip.Prefix{pfx("10.72.0.2/24")}, addr("10.72.0.1"))
	cn2 := h0.run(t, vniN, []netip.Prefix{pfx("10.72.0.3/24")}, addr("10.72.0.1"))

	// A TCP service on every address of the host.
	var ln net.Listener
	if err := h0.NS.Do(func() (err error) { ln, err = net.Listen("tcp", ":0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	dial := func(c *container, dst netip.Addr) error {
		return c.ns.Do(func() error {
			conn, err := net.DialTimeout("tcp", netip.AddrPortFrom(dst, uint16(port)).String(), time.Second)
			if err == nil {
				conn.Close()
			}
			return err
		})
	}

	mustPing(t, ci.ns, addr("10.71.0.3")) // the internal overlay itself works
	for _, dst := range []netip.Addr{addr("10.72.0.1"), h0.Addr} {
		if err := dial(cn, dst); err != nil {
			t.Errorf("normal network to the host's %s:%d: %v", dst, port, err)
		}
	}
	internalDrops := func() int {
		return ruleCounterIn(t, h0, "iptables", fmt.Sprintf("-A %s -i vxbr-000071 -m comment --comment consul-overlay -j DROP", InputChain))
	}
	before := internalDrops()
	for _, dst := range []netip.Addr{addr("10.71.0.1"), addr("10.72.0.1"), h0.Addr} {
		if err := dial(ci, dst); err == nil {
			t.Errorf("internal network reached the host's %s:%d", dst, port)
		}
	}
	if internalDrops() <= before {
		t.Error("the internal network's INPUT drop saw none of the attempts")
	}
	// The host still reaches the internal network's containers.
	var cl net.Listener
	if err := ci.ns.Do(func() (err error) { cl, err = net.Listen("tcp", ":0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	go func() {
		for {
			c, err := cl.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	err := h0.NS.Do(func() error {
		conn, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr("10.71.0.2"), uint16(cl.Addr().(*net.TCPAddr).Port)).String(), time.Second)
		if err == nil {
			conn.Close()
		}
		return err
	})
	if err != nil {
		t.Errorf("host to the internal network's container: %v", err)
	}
	mustPing(t, h0.NS, addr("10.71.0.2"))
	mustNotPing(t, ci.ns, addr("10.71.0.1"))
	mustNotPing(t, ci.ns, addr("fd00:71::1"))
	mustNotPing(t, ci.ns, addr("10.72.0.2")) // another overlay's container
	mustNotPing(t, cn.ns, addr("10.71.0.2"))

	// The administrator's DOCKER-USER rule applies to overlay traffic.
	mustPing(t, cn.ns, addr("10.72.0.3"))
	iptables(t, h0, "iptables", "-I", "DOCKER-USER", "1", "-s", "10.72.0.2", "-d", "10.72.0.3", "-j", "DROP")
	mustNotPing(t, cn.ns, addr("10.72.0.3"))
	mustPing(t, ci.ns, addr("10.71.0.3"))
	_ = cn2

	// dockerd restarting puts its jumps back at the top: ours after them
	// stays where it is.
	for _, cmd := range []string{"iptables", "ip6tables"} {
		iptables(t, h0, cmd, "-N", "DOCKER-ISOLATION-STAGE-1")
		iptables(t, h0, cmd, "-I", "FORWARD", "1", "-j", "DOCKER-ISOLATION-STAGE-1")
		iptables(t, h0, cmd, "-D", "FORWARD", "-j", "DOCKER-USER")
		iptables(t, h0, cmd, "-I", "FORWARD", "1", "-j", "DOCKER-USER")
	}
	h0.m.mu.Lock()
	var k int
	spec := h0.m.fwSpec(nil, sharedWant)
	spec.underlay = true
	k, err = h0.m.fw.sync(ctx, spec)
	h0.m.mu.Unlock()
	if err != nil || k != 0 {
		t.Errorf("firewall sync after a dockerd restart: %d changes, %v; want none", k, err)
	}

	// Not internal any more: the INPUT drop goes.
	netI.Internal = false
	if _, err := h0.m.EnsureNetwork(ctx, netI); err != nil {
		t.Fatal(err)
	}
	if err := dial(ci, addr("10.71.0.1")); err != nil {
		t.Errorf("after turning internal off, to the gateway: %v", err)
	}
	// Deleting the network removes its rules from both chains.
	if err := h0.m.DeleteNetwork(ctx, vniI); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		for _, r := range append(inputRules(t, h0, cmd), fwRules(t, h0, cmd)...) {
			if strings.Contains(r, "vxbr-000071") {
				t.Errorf("%s rule left after DeleteNetwork: %s", cmd, r)
			}
		}
	}
}

// ruleCounterIn is ruleCounter for InputChain.
func ruleCounterIn(t *testing.T, h *testHost, cmd, rule string) int {
	t.Helper()
	out := iptables(t, h, cmd, "-S", InputChain, "-v")
	for _, l := range strings.Split(out, "\n") {
		m := countersRE.FindStringSubmatch(l)
		if m == nil || countersRE.ReplaceAllString(l, "") != rule {
			continue
		}
		var n int
		fmt.Sscan(m[1], &n)
		return n
	}
	t.Fatalf("no rule %q in\n%s", rule, out)
	return 0
}

// planJumps is placeJumps' plan for FORWARD's jumps to our chain under
// conds, given FORWARD's lines, one write a string.
func planJumps(lines []string, conds [][]string) []string {
	var b batch
	placeJumps(&b, lines, "FORWARD", FirewallChain, conds)
	var got []string
	for _, w := range b {
		got = append(got, strings.Join(w.args, " "))
	}
	return got
}

func TestPlaceJump(t *testing.T) {
	const ours = "-A FORWARD -j CONSUL-OVERLAY"
	for _, tt := range []struct {
		name  string
		lines []string
		want  []string
	}{
		{"empty", nil, []string{"-I FORWARD 1 -j CONSUL-OVERLAY"}},
		{"first without dockerd", []string{ours, "-A FORWARD -i eth9 -j ACCEPT"}, nil},
		{"behind another rule", []string{"-A FORWARD -i eth9 -j ACCEPT", ours},
			[]string{"-D FORWARD -j CONSUL-OVERLAY", "-I FORWARD 1 -j CONSUL-OVERLAY"}},
		{"after DOCKER-USER", []string{"-A FORWARD -j DOCKER-USER", ours}, nil},
		{"after dockerd's jumps", []string{"-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1", ours}, nil},
		{"ahead of DOCKER-USER", []string{ours, "-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1"},
			[]string{"-D FORWARD -j CONSUL-OVERLAY", "-I FORWARD 2 -j CONSUL-OVERLAY"}},
		{"missing with dockerd", []string{"-A FORWARD -j DOCKER-USER", "-A FORWARD -o docker0 -j DOCKER"},
			[]string{"-I FORWARD 2 -j CONSUL-OVERLAY"}},
		{"behind a bridge rule", []string{"-A FORWARD -j DOCKER-USER", "-A FORWARD -o docker0 -j DOCKER", ours},
			[]string{"-D FORWARD -j CONSUL-OVERLAY", "-I FORWARD 2 -j CONSUL-OVERLAY"}},
		{"twice", []string{"-A FORWARD -j DOCKER-USER", ours, ours},
			[]string{"-D FORWARD -j CONSUL-OVERLAY", "-D FORWARD -j CONSUL-OVERLAY", "-I FORWARD 2 -j CONSUL-OVERLAY"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := planJumps(tt.lines, [][]string{nil}); !slices.Equal(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

// TestPlaceForwardJumps checks FORWARD's four jumps (forwardJumps): put
// in place of an earlier release's unconditional jump, which goes only
// after they are in (written one command each, no packet misses the
// chain), kept where they are in order after dockerd's jumps, and written
// again, together, when one is missing, out of order or apart.
func TestPlaceForwardJumps(t *testing.T) {
	const (
		user  = "-A FORWARD -j DOCKER-USER"
		iso   = "-A FORWARD -j DOCKER-ISOLATION-STAGE-1"
		plain = "-A FORWARD -j CONSUL-OVERLAY"
		inBr  = "-A FORWARD -i vxbr-+ -j CONSUL-OVERLAY"
		outBr = "-A FORWARD -o vxbr-+ -j CONSUL-OVERLAY"
		inGw  = "-A FORWARD -i vxg-+ -j CONSUL-OVERLAY"
		outGw = "-A FORWARD -o vxg-+ -j CONSUL-OVERLAY"
	)
	insertAt := func(at int) []string {
		return []string{
			fmt.Sprintf("-I FORWARD %d -i vxbr-+ -j CONSUL-OVERLAY", at),
			fmt.Sprintf("-I FORWARD %d -o vxbr-+ -j CONSUL-OVERLAY", at+1),
			fmt.Sprintf("-I FORWARD %d -i vxg-+ -j CONSUL-OVERLAY", at+2),
			fmt.Sprintf("-I FORWARD %d -o vxg-+ -j CONSUL-OVERLAY", at+3),
		}
	}
	deleteAll := []string{"-D FORWARD -i vxbr-+ -j CONSUL-OVERLAY", "-D FORWARD -o vxbr-+ -j CONSUL-OVERLAY",
		"-D FORWARD -i vxg-+ -j CONSUL-OVERLAY", "-D FORWARD -o vxg-+ -j CONSUL-OVERLAY"}
	for _, tt := range []struct {
		name  string
		lines []string
		want  []string
	}{
		{"empty", nil, insertAt(1)},
		{"in place without dockerd", []string{inBr, outBr, inGw, outGw, "-A FORWARD -i eth9 -j ACCEPT"}, nil},
		{"in place after dockerd's jumps", []string{user, iso, inBr, outBr, inGw, outGw, "-A FORWARD -o docker0 -j DOCKER"}, nil},
		{"an earlier release's jump", []string{user, plain, "-A FORWARD -o docker0 -j DOCKER"},
			append(insertAt(2), "-D FORWARD -j CONSUL-OVERLAY")},
		{"an earlier release's jump beside ours", []string{user, inBr, outBr, inGw, outGw, plain},
			slices.Concat(deleteAll, insertAt(2), []string{"-D FORWARD -j CONSUL-OVERLAY"})},
		{"one missing", []string{user, inBr, outBr, outGw},
			slices.Concat([]string{deleteAll[0], deleteAll[1], deleteAll[3]}, insertAt(2))},
		{"out of order", []string{user, outBr, inBr, inGw, outGw}, slices.Concat([]string{deleteAll[1], deleteAll[0], deleteAll[2], deleteAll[3]}, insertAt(2))},
		{"apart", []string{user, inBr, outBr, "-A FORWARD -o docker0 -j DOCKER", inGw, outGw}, slices.Concat(deleteAll, insertAt(2))},
		{"ahead of DOCKER-USER", []string{inBr, outBr, inGw, outGw, user}, slices.Concat(deleteAll, insertAt(2))},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := planJumps(tt.lines, forwardJumps()); !slices.Equal(got, tt.want) {
				t.Errorf("got %q,\nwant %q", got, tt.want)
			}
		})
	}
}

func TestSumDrops(t *testing.T) {
	out := `-N CONSUL-OVERLAY-INPUT
-A CONSUL-OVERLAY-INPUT -s 192.0.2.2/32 -p udp -m udp --dport 4789 -m comment --comment consul-overlay -c 90 9000 -j RETURN
-A CONSUL-OVERLAY-INPUT -p udp -m udp --dport 4789 -m comment --comment consul-overlay -c 7 700 -j DROP
-A CONSUL-OVERLAY-INPUT -p udp -m udp --dport 4789 -m comment --comment consul-overlay-b -c 2 200 -j DROP
-A CONSUL-OVERLAY-INPUT -p udp -m udp --dport 8472 -m comment --comment consul-overlay-c -c 50 5000 -j DROP
-A CONSUL-OVERLAY-INPUT -i vxbr-000071 -m comment --comment consul-overlay -c 11 1100 -j DROP
`
	if got := sumDrops(out, 4789); got != 9 {
		t.Errorf("sumDrops(4789) = %d, want 9", got)
	}
	if got := sumDrops(out, 8472); got != 50 {
		t.Errorf("sumDrops(8472) = %d, want 50", got)
	}
	if got := strings.Join(allowRule(addr("2001:db8::2"), 4789, "m"), " "); got != "-s 2001:db8::2/128 -p udp -m udp --dport 4789 -m comment --comment m -j RETURN" {
		t.Errorf("allowRule %q", got)
	}
}

// A transaction that fails because the chains changed after the listing
// (two instances created a chain at once) is planned again once.
func TestFirewallRetry(t *testing.T) {
	t.Parallel()
	h := newHosts(t, 1, testenv.UnderlayOptions{})[0]
	m := h.restoreManager(t, "")
	iptables(t, h, "iptables", "-N", "TAKEN")
	iptables(t, h, "ip6tables", "-N", "TAKEN")
	plans := 0
	k, err := m.fw.each(t.Context(), func(bin string) (batch, error) {
		plans++
		var b batch
		if plans%2 == 1 {
			b.add("-N", "TAKEN") // created meanwhile by someone else
		} else {
			b.add("-A", "TAKEN", "-j", "RETURN")
		}
		return b, nil
	})
	if err != nil || plans != 4 || k != 2 {
		t.Errorf("each: %d changes, %d plans, error %v; want 2 changes after 4 plans", k, plans, err)
	}
	plans = 0
	if _, err := m.fw.each(t.Context(), func(string) (batch, error) {
		plans++
		return batch{{"filter", []string{"-N", "TAKEN"}}}, nil
	}); err == nil || plans != 2 {
		t.Errorf("each with a write that always fails: %d plans, error %v; want 2 and an error", plans, err)
	}
}
