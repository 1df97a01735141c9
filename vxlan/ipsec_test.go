package vxlan

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"consul-overlay/internal/testenv"
)

func testKey(id uint32) IPsecKey {
	return IPsecKey{ID: id, Secret: bytes.Repeat([]byte{byte(id)}, 32)}
}

// Each direction of each pair gets its own SPI and AES-GCM key, every host
// derives the same ones, and another key ID gives others.
func TestDeriveSA(t *testing.T) {
	a, b := addr("192.0.2.1"), addr("192.0.2.2")
	k1, k2 := testKey(1), testKey(2)
	spiAB, keyAB := deriveSA(k1, a, b)
	spiBA, keyBA := deriveSA(k1, b, a)
	spiAB2, keyAB2 := deriveSA(k1, a, b)
	spiK2, keyK2 := deriveSA(k2, a, b)
	if spiAB != spiAB2 || !bytes.Equal(keyAB, keyAB2) {
		t.Error("derivation is not deterministic")
	}
	if spiAB == spiBA || bytes.Equal(keyAB, keyBA) {
		t.Error("both directions share an SPI or a key")
	}
	if spiAB == spiK2 || bytes.Equal(keyAB, keyK2) {
		t.Error("two keys give the same SPI or key")
	}
	if len(keyAB) != ipsecKeyLen || spiAB < 256 {
		t.Errorf("key length %d, spi 0x%x", len(keyAB), spiAB)
	}
	if ipsecReqid(OwnerMark("")) == ipsecReqid(OwnerMark("other")) {
		t.Error("two owners share a reqid")
	}
	if r := ipsecReqid(OwnerMark("x")); r&0xffff0000 != ipsecBase {
		t.Errorf("reqid 0x%x outside 0x%x/16", r, ipsecBase)
	}
}

// ourXfrm lists h's xfrm states and policies of owner's reqid and mark, as
// "state <dst> 0x<spi>" and "policy <dst> <action> 0x<tmpl spi>".
func ourXfrm(t *testing.T, h *testHost, owner string) (states, policies []string) {
	t.Helper()
	reqid := int(ipsecReqid(OwnerMark(owner)))
	sts, err := h.NS.Handle().XfrmStateList(netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sts {
		if s.Reqid == reqid {
			states = append(states, fmt.Sprintf("state %s 0x%x", s.Dst, s.Spi))
		}
	}
	pols, err := h.NS.Handle().XfrmPolicyList(netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pols {
		if p.Mark == nil || p.Mark.Value != ipsecMark(OwnerMark(owner)) {
			continue
		}
		spi := 0
		if len(p.Tmpls) == 1 {
			spi = p.Tmpls[0].Spi
		}
		policies = append(policies, fmt.Sprintf("policy %s %s 0x%x", p.Dst, p.Action, spi))
	}
	slices.Sort(states)
	slices.Sort(policies)
	return states, policies
}

// mangleRules lists chain in h's mangle table.
func mangleRules(t *testing.T, h *testHost, chain string) []string {
	t.Helper()
	out, err := h.NS.Run(t, "iptables", "-w", "-t", "mangle", "-S", chain)
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

// mangleCounter is the packet counter of rule (as -S prints it) in chain.
func mangleCounter(t *testing.T, h *testHost, chain, rule string) int {
	t.Helper()
	out := h.NS.MustRun(t, "iptables", "-w", "-t", "mangle", "-S", chain, "-v")
	counters := regexp.MustCompile(` -c (\d+) \d+`)
	for _, l := range strings.Split(out, "\n") {
		m := counters.FindStringSubmatch(l)
		if m == nil || counters.ReplaceAllString(l, "") != rule {
			continue
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	t.Fatalf("no rule %q in %s:\n%s", rule, chain, out)
	return 0
}

// The control plane of encryption on any kernel: the mangle rules that
// mark and filter the encrypted VNIs read back exactly as written (a second
// sync changes nothing), the out policies name the primary key's SPI and
// follow a rotation, another owner's entries are left alone, and
// everything goes with the last encrypted network. (Policies need no ESP
// support in the kernel; states do, and are tested in
// TestEncryptedOverlay.)
func TestIPsecRulesAndPolicies(t *testing.T) {
	ctx := t.Context()
	hosts := newHosts(t, 3, testenv.UnderlayOptions{})
	h0 := hosts[0]
	const vni = 0x5e1
	other := h0.manager(t, "other")
	for _, m := range []*Manager{h0.m, other} {
		for _, h := range hosts[1:] {
			if err := m.AddPeer(ctx, Peer{VNI: vni, IP: addr("10.94.0.9"), MAC: MACFromIP(addr("10.94.0.9")), VTEP: h.Addr}); err != nil {
				t.Fatal(err)
			}
		}
		m.mu.Lock()
		m.sec.encrypted = map[uint32]bool{vni: true}
		var ch Changes
		err := m.syncESPRules(ctx, &ch)
		m.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct{ chain, from string }{{ESPOutChain, "OUTPUT"}, {ESPInChain, "PREROUTING"}} {
		var want []string
		for _, m := range []*Manager{h0.m, other} {
			want = append(want, strings.ReplaceAll("-A "+c.chain+" "+strings.Join(m.espRule(c.chain, vni), " "), "--u32 "+vniU32(vni, false), `--u32 "`+vniU32(vni, false)+`"`))
		}
		if got := mangleRules(t, h0, c.chain); !slices.Equal(got, want) {
			t.Errorf("%s:\n%s\nwant\n%s", c.chain, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if n := mangleCounter(t, h0, c.chain, want[0]); n != 0 {
			t.Errorf("%s: counter %d before any packet", c.chain, n)
		}
		if first := mangleRules(t, h0, c.from); len(first) == 0 || first[0] != "-A "+c.from+" -j "+c.chain {
			t.Errorf("mangle %s: %v, want our jump first", c.from, first)
		}
	}
	h0.m.mu.Lock()
	var ch Changes
	err := h0.m.syncESPRules(ctx, &ch)
	h0.m.mu.Unlock()
	if err != nil || ch.Total() != 0 {
		t.Errorf("second sync: %+v, %v; want no change", ch, err)
	}

	// Policies: the block catch-all and one per peer on the primary key.
	espOK := h0.m.IPsecSupported() == nil
	keys := IPsecKeys{Keys: []IPsecKey{testKey(1)}, Primary: 1}
	if _, err := h0.m.SetIPsecKeys(ctx, keys); err != nil && espOK {
		t.Fatal(err)
	}
	policies := func(k uint32) []string {
		var p []string
		for _, h := range hosts[1:] {
			spi, _ := deriveSA(testKey(k), h0.Addr, h.Addr)
			p = append(p, fmt.Sprintf("policy %s/32 allow 0x%x", h.Addr, spi))
		}
		p = append(p, "policy 0.0.0.0/0 block 0x0")
		slices.Sort(p)
		return p
	}
	if _, got := ourXfrm(t, h0, ""); !slices.Equal(got, policies(1)) {
		t.Errorf("policies on key 1:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(policies(1), "\n"))
	}
	keys = IPsecKeys{Keys: []IPsecKey{testKey(1), testKey(2)}, Primary: 2}
	if _, err := h0.m.SetIPsecKeys(ctx, keys); err != nil && espOK {
		t.Fatal(err)
	}
	if _, got := ourXfrm(t, h0, ""); !slices.Equal(got, policies(2)) {
		t.Errorf("policies after the switch to key 2:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(policies(2), "\n"))
	}
	if _, err := other.SetIPsecKeys(ctx, keys); err != nil && espOK {
		t.Fatal(err)
	}

	// The last encrypted network goes: nothing of ours is left, the other
	// owner's entries stay.
	if err := h0.m.DeleteNetwork(ctx, vni); err != nil {
		t.Fatal(err)
	}
	if st, pol := ourXfrm(t, h0, ""); len(st)+len(pol) != 0 {
		t.Errorf("left after the network's removal: %v %v", st, pol)
	}
	if _, pol := ourXfrm(t, h0, "other"); len(pol) != 3 {
		t.Errorf("other owner's policies: %v, want 3", pol)
	}
	for _, chain := range []string{ESPOutChain, ESPInChain} {
		for _, r := range mangleRules(t, h0, chain) {
			if strings.Contains(r, "--comment "+OwnerAlias+" ") {
				t.Errorf("%s: our rule left: %s", chain, r)
			}
		}
		if got := len(mangleRules(t, h0, chain)); got != 1 {
			t.Errorf("%s holds %d rules, want the other owner's 1", chain, got)
		}
	}
	if _, err := other.RemoveIPsec(ctx); err != nil {
		t.Fatal(err)
	}
	if st, pol := ourXfrm(t, h0, "other"); len(st)+len(pol) != 0 {
		t.Errorf("left after RemoveIPsec: %v %v", st, pol)
	}
	for _, chain := range []string{ESPOutChain, ESPInChain} {
		if got := mangleRules(t, h0, chain); len(got) != 0 {
			t.Errorf("%s after RemoveIPsec: %v", chain, got)
		}
	}
}

// On a kernel without ESP an encrypted network is refused with a clear
// error and leaves nothing behind; with ESP it is built (TestEncryptedOverlay).
func TestEncryptedNetworkUnsupported(t *testing.T) {
	hosts := newHosts(t, 1, testenv.UnderlayOptions{})
	h := hosts[0]
	if h.m.IPsecSupported() == nil {
		t.Skip("this kernel has ESP: TestEncryptedOverlay covers it")
	}
	_, err := h.m.EnsureNetwork(t.Context(), Network{VNI: 0x5e3, Encrypted: true})
	if !errors.Is(err, ErrNoIPsec) || !strings.Contains(err.Error(), "vni 1507") {
		t.Fatalf("EnsureNetwork: %v, want ErrNoIPsec naming the vni", err)
	}
	if names := linkNames(t, h); slices.ContainsFunc(names, func(n string) bool { return strings.HasPrefix(n, "vx") }) {
		t.Errorf("links left: %v", names)
	}
	for _, chain := range []string{ESPOutChain, ESPInChain} {
		if got := mangleRules(t, h, chain); len(got) != 0 {
			t.Errorf("%s left: %v", chain, got)
		}
	}
}

// requireESP stops the test unless the kernel can hold ESP states.
func requireESP(t *testing.T, m *Manager) {
	t.Helper()
	if err := m.IPsecSupported(); err != nil {
		testenv.KernelLacks(t, "IPsec ESP with rfc4106(gcm(aes))", "a kernel with CONFIG_INET_ESP, CONFIG_INET6_ESP, CONFIG_CRYPTO_GCM (modprobe esp4 esp6): "+err.Error())
	}
}

// capture counts, on h's underlay link, ESP packets and VXLAN packets per
// VNI (IPv4) until stop is closed.
type capture struct {
	esp   atomic.Int64
	vxlan map[uint32]*atomic.Int64
}

func startCapture(t *testing.T, h *testHost, vnis ...uint32) (c *capture, stop func()) {
	t.Helper()
	c = &capture{vxlan: map[uint32]*atomic.Int64{}}
	for _, v := range vnis {
		c.vxlan[v] = &atomic.Int64{}
	}
	var fd int
	err := h.NS.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM, int(htons(unix.ETH_P_IP)))
		if err != nil {
			return err
		}
		l, err := net.InterfaceByName(h.Link)
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: l.Index})
	})
	if err != nil {
		t.Fatalf("capture on %s: %v", h.Link, err)
	}
	tv := unix.Timeval{Usec: 100_000}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var stopped atomic.Bool
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for !stopped.Load() {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil || n < 20 {
				continue
			}
			p := buf[:n]
			ihl := int(p[0]&0x0f) * 4
			switch p[9] {
			case unix.IPPROTO_ESP:
				c.esp.Add(1)
			case unix.IPPROTO_UDP:
				if n >= ihl+16 && binary.BigEndian.Uint16(p[ihl+2:]) == DefaultPort {
					vni := binary.BigEndian.Uint32(p[ihl+12:]) >> 8
					if cnt := c.vxlan[vni]; cnt != nil {
						cnt.Add(1)
					}
				}
			}
		}
	}()
	return c, func() { stopped.Store(true); <-done; unix.Close(fd) }
}

// The data plane of an encrypted overlay, between namespaces on the real
// kernel: ping and TCP work, the underlay carries ESP and no VXLAN of the
// encrypted VNI while a plain network between the same hosts stays plain
// VXLAN, a host without the keys cannot inject (crafted VXLAN of the
// encrypted VNI is dropped even from an allowed VTEP), a key rotation
// during a 20 ms ping loses nothing, a restarted Manager keeps the states,
// and removing the network removes every state, policy and rule.
// In both layouts.
func TestEncryptedOverlay(t *testing.T) {
	inLayouts(t, false, testEncryptedOverlay)
}

func testEncryptedOverlay(t *testing.T, dp bool) {
	ctx := t.Context()
	hosts := newHostsIn(t, 3, testenv.UnderlayOptions{}, dp)
	h0, h1, h2 := hosts[0], hosts[1], hosts[2] // h2: plain network only
	requireESP(t, h0.m)
	h0.m = h0.restoreManager(t, "")
	const enc, plain = 0x5e1, 0x5e2
	encNet := Network{VNI: enc, Encrypted: true}
	plainNet := Network{VNI: plain}
	k1 := IPsecKeys{Keys: []IPsecKey{testKey(1)}, Primary: 1}
	for _, h := range []*testHost{h0, h1} {
		if _, err := h.m.SetIPsecKeys(ctx, k1); err != nil {
			t.Fatal(err)
		}
		info, err := h.m.EnsureNetwork(ctx, encNet)
		if err != nil {
			t.Fatal(err)
		}
		if want := h.m.MaxMTU() - ESPOverhead; info.MTU != want {
			t.Errorf("encrypted network MTU %d, want %d", info.MTU, want)
		}
	}
	for _, h := range hosts {
		if _, err := h.m.EnsureNetwork(ctx, plainNet); err != nil {
			t.Fatal(err)
		}
	}
	e0 := h0.run(t, enc, []netip.Prefix{pfx("10.94.1.2/24")})
	e1 := h1.run(t, enc, []netip.Prefix{pfx("10.94.1.3/24")})
	p0 := h0.run(t, plain, []netip.Prefix{pfx("10.94.2.2/24")})
	p1 := h1.run(t, plain, []netip.Prefix{pfx("10.94.2.3/24")})
	p2 := h2.run(t, plain, []netip.Prefix{pfx("10.94.2.4/24")})
	e0.announce(t, h1)
	e1.announce(t, h0)
	p0.announce(t, h1, h2)
	p1.announce(t, h0, h2)
	p2.announce(t, h0, h1)

	capt, stopCapture := startCapture(t, h1, enc, plain)
	mustPing(t, e0.ns, addr("10.94.1.3"))
	mustPing(t, e1.ns, addr("10.94.1.2"))
	mustPing(t, p0.ns, addr("10.94.2.3"))
	mustPing(t, p2.ns, addr("10.94.2.2"))
	// TCP across the encrypted network.
	var ln net.Listener
	if err := e1.ns.Do(func() (err error) { ln, err = net.Listen("tcp4", "10.94.1.3:7070"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_, _ = io.Copy(c, c)
			c.Close()
		}
	}()
	payload := bytes.Repeat([]byte("encrypted overlay "), 20000) // 360 kB: full-size segments
	err := e0.ns.Do(func() error {
		c, err := net.DialTimeout("tcp4", "10.94.1.3:7070", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		go func() { _, _ = c.Write(payload); c.(*net.TCPConn).CloseWrite() }()
		got, err := io.ReadAll(c)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, payload) {
			return fmt.Errorf("echo: %d bytes back of %d", len(got), len(payload))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("tcp over the encrypted network: %v", err)
	}
	stopCapture()
	if capt.esp.Load() == 0 || capt.vxlan[enc].Load() != 0 {
		t.Errorf("underlay at %s: %d ESP packets, %d plain VXLAN packets of the encrypted vni; want ESP only", h1.Addr, capt.esp.Load(), capt.vxlan[enc].Load())
	}
	if capt.vxlan[plain].Load() == 0 {
		t.Errorf("underlay at %s: no plain VXLAN of the unencrypted vni: it should stay plain", h1.Addr)
	}
	t.Logf("underlay capture: %d ESP, %d VXLAN of the plain vni", capt.esp.Load(), capt.vxlan[plain].Load())

	// Injection: h2 is an allowed VTEP (a member of the plain network)
	// without the keys. Its crafted VXLAN of the plain vni reaches p0; of
	// the encrypted vni, nothing reaches e0: the allowlist lets h2 through,
	// the ESP-IN rule does not. (h1's kernel would encrypt such a packet:
	// it has the keys.)
	const port = 7777
	le, lp := listenUDP(t, e0.ns, port), listenUDP(t, p0.ns, port)
	sendUDP(t, h2.NS, h2.Addr, h0.Addr, DefaultPort, 5, vxlanFrame(plain, p0.mac, p1.mac, addr("10.94.2.3"), addr("10.94.2.2"), port, []byte("plain")))
	if got := lp.received(t, "plain", 500*time.Millisecond); got != 5 {
		t.Fatalf("crafted plain-network packets from an allowed host: %d of 5 arrived (the test's packets are wrong)", got)
	}
	dropRule := "-A " + ESPInChain + " " + strings.Join(h0.m.espRule(ESPInChain, enc), " ")
	dropRule = strings.ReplaceAll(dropRule, "--u32 "+vniU32(enc, false), `--u32 "`+vniU32(enc, false)+`"`)
	dropsBefore := mangleCounter(t, h0, ESPInChain, dropRule)
	sendUDP(t, h2.NS, h2.Addr, h0.Addr, DefaultPort, 5, vxlanFrame(enc, e0.mac, e1.mac, addr("10.94.1.3"), addr("10.94.1.2"), port, []byte("inject")))
	if got := le.received(t, "inject", 500*time.Millisecond); got != 0 {
		t.Errorf("crafted plain VXLAN of the encrypted vni from %s: %d reached the container, want 0", h2.Addr, got)
	}
	if dropped := mangleCounter(t, h0, ESPInChain, dropRule) - dropsBefore; dropped < 5 {
		t.Errorf("the plain-VXLAN drop rule counted %d of 5 crafted packets", dropped)
	}

	// Rotation during a 20 ms ping: install, switch, remove; nothing lost.
	k12 := IPsecKeys{Keys: []IPsecKey{testKey(1), testKey(2)}, Primary: 1}
	k12b := IPsecKeys{Keys: k12.Keys, Primary: 2}
	k2 := IPsecKeys{Keys: []IPsecKey{testKey(2)}, Primary: 2}
	pingOut := make(chan string, 1)
	go func() {
		out, _ := e0.ns.Run(t, "ping", "-n", "-q", "-c", "150", "-i", "0.02", "-W", "1", "10.94.1.3")
		pingOut <- out
	}()
	for _, step := range []IPsecKeys{k12, k12b, k2} {
		time.Sleep(700 * time.Millisecond)
		for _, h := range []*testHost{h0, h1} {
			if _, err := h.m.SetIPsecKeys(ctx, step); err != nil {
				t.Fatal(err)
			}
		}
	}
	out := <-pingOut
	m := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`).FindStringSubmatch(out)
	if m == nil || m[1] != "150" || m[2] != "150" {
		t.Errorf("ping during the rotation lost packets:\n%s", out)
	}
	t.Logf("rotation: %s", strings.TrimSpace(out))
	spi2, _ := deriveSA(testKey(2), h0.Addr, h1.Addr)
	if _, pol := ourXfrm(t, h0, ""); !slices.Contains(pol, fmt.Sprintf("policy %s/32 allow 0x%x", h1.Addr, spi2)) {
		t.Errorf("policies after the rotation: %v, want key 2's spi 0x%x", pol, spi2)
	}

	// A restarted Manager keeps the states until it has the keys.
	before, _ := ourXfrm(t, h0, "")
	m0 := h0.restoreManager(t, "")
	state := State{Networks: []Network{encNet, plainNet}, Endpoints: []Endpoint{{ID: e0.id, VNI: enc, MAC: e0.mac}, {ID: p0.id, VNI: plain, MAC: p0.mac}},
		Peers: slices.Concat(e1.peers(), p1.peers(), p2.peers())}
	if _, err := m0.Reconcile(ctx, state); err != nil {
		t.Fatal(err)
	}
	if after, _ := ourXfrm(t, h0, ""); !slices.Equal(before, after) {
		t.Errorf("restart without keys changed the states:\n%v\n%v", before, after)
	}
	mustPing(t, e0.ns, addr("10.94.1.3"))
	if ch, err := m0.SetIPsecKeys(ctx, k2); err != nil || ch.IPsec != 0 {
		t.Errorf("keys after restart: %+v %v, want no change", ch, err)
	}

	// Removal: nothing of ours is left; the plain network still works.
	if err := m0.DeleteNetwork(ctx, enc); err != nil {
		t.Fatal(err)
	}
	if st, pol := ourXfrm(t, h0, ""); len(st)+len(pol) != 0 {
		t.Errorf("left after the network's removal: %v %v", st, pol)
	}
	for _, chain := range []string{ESPOutChain, ESPInChain} {
		if got := mangleRules(t, h0, chain); len(got) != 0 {
			t.Errorf("%s left: %v", chain, got)
		}
	}
	mustPing(t, p0.ns, addr("10.94.2.3"))
}

// The mechanism that picks the encrypted VNIs out of UDP 4789, on any
// kernel (no ESP needed): with the rules in place and no key yet, VXLAN of
// the encrypted VNI is marked on output (the MARK rule counts it) and held
// by the block policy, and dropped on input when it comes in plain (the
// DROP rule counts it), while another VNI between the same hosts passes
// untouched; with the rules and policies removed, both pass again. In
// both layouts: the VXLAN socket is the host's in either.
func TestEncryptedVNIMarking(t *testing.T) {
	inLayouts(t, false, testEncryptedVNIMarking)
}

func testEncryptedVNIMarking(t *testing.T, dp bool) {
	ctx := t.Context()
	hosts := newHostsIn(t, 2, testenv.UnderlayOptions{}, dp)
	h0, h1 := hosts[0], hosts[1]
	const enc, plain = 0x5e4, 0x5e5
	for _, h := range hosts {
		for _, vni := range []uint32{enc, plain} {
			if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
				t.Fatal(err)
			}
		}
	}
	e0 := h0.run(t, enc, []netip.Prefix{pfx("10.94.4.2/24")})
	e1 := h1.run(t, enc, []netip.Prefix{pfx("10.94.4.3/24")})
	p0 := h0.run(t, plain, []netip.Prefix{pfx("10.94.5.2/24")})
	p1 := h1.run(t, plain, []netip.Prefix{pfx("10.94.5.3/24")})
	e0.announce(t, h1)
	e1.announce(t, h0)
	p0.announce(t, h1)
	p1.announce(t, h0)
	mustPing(t, e0.ns, addr("10.94.4.3"))
	mustPing(t, p0.ns, addr("10.94.5.3"))

	// h0 treats enc as encrypted, with an empty key ring.
	h0.m.mu.Lock()
	h0.m.sec.encrypted = map[uint32]bool{enc: true}
	var ch Changes
	err := h0.m.syncESPRules(ctx, &ch)
	h0.m.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h0.m.SetIPsecKeys(ctx, IPsecKeys{}); err != nil {
		t.Fatal(err)
	}
	rule := func(chain string) string {
		r := "-A " + chain + " " + strings.Join(h0.m.espRule(chain, enc), " ")
		return strings.ReplaceAll(r, "--u32 "+vniU32(enc, false), `--u32 "`+vniU32(enc, false)+`"`)
	}
	mustNotPing(t, e0.ns, addr("10.94.4.3")) // held by the block policy
	if n := mangleCounter(t, h0, ESPOutChain, rule(ESPOutChain)); n == 0 {
		t.Error("the MARK rule matched no VXLAN packet of the encrypted vni")
	}
	mustPing(t, p0.ns, addr("10.94.5.3")) // another vni passes
	// Plain VXLAN of the encrypted vni from h1 is dropped on arrival.
	_, _ = ping(t, e1.ns, addr("10.94.4.2"), 2)
	if n := mangleCounter(t, h0, ESPInChain, rule(ESPInChain)); n == 0 {
		t.Error("the DROP rule dropped no plain VXLAN of the encrypted vni")
	}
	if n := mangleCounter(t, h0, ESPOutChain, rule(ESPOutChain)); n > 0 {
		t.Logf("marked %d packets of the encrypted vni", n)
	}

	if _, err := h0.m.RemoveIPsec(ctx); err != nil {
		t.Fatal(err)
	}
	mustPing(t, e0.ns, addr("10.94.4.3"))
	mustPing(t, p0.ns, addr("10.94.5.3"))
}
