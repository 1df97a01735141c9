package vxlan

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestOverlayMTU(t *testing.T) {
	tests := []struct {
		name     string
		underlay int
		v6       bool
		override int
		want     int
	}{
		{"ipv4 underlay", 1500, false, 0, 1450},
		{"ipv6 underlay", 1500, true, 0, 1430},
		{"ipv4 jumbo", 9000, false, 0, 8950},
		{"ipv6 jumbo", 9000, true, 0, 8930},
		{"cloud 1460", 1460, false, 0, 1410},
		{"override honoured", 1500, false, 1400, 1400},
		{"override above derived", 9000, true, 1500, 1500},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := OverlayMTU(tt.underlay, tt.v6, tt.override); got != tt.want {
				t.Errorf("OverlayMTU(%d, v6=%v, %d) = %d, want %d", tt.underlay, tt.v6, tt.override, got, tt.want)
			}
		})
	}
}

func TestMACFromIP(t *testing.T) {
	tests := []struct {
		ip   string
		want string
	}{
		{"10.10.0.2", "02:42:0a:0a:00:02"},
		{"192.168.255.1", "02:42:c0:a8:ff:01"},
		{"::ffff:10.0.0.1", "02:42:0a:00:00:01"},
	}
	for _, tt := range tests {
		if got := MACFromIP(netip.MustParseAddr(tt.ip)).String(); got != tt.want {
			t.Errorf("MACFromIP(%s) = %s, want %s", tt.ip, got, tt.want)
		}
	}
	a := MACFromIP(netip.MustParseAddr("fd00::2"))
	b := MACFromIP(netip.MustParseAddr("fd00::2"))
	c := MACFromIP(netip.MustParseAddr("fd00::3"))
	if a.String() != b.String() {
		t.Errorf("IPv6 MAC not stable: %s, %s", a, b)
	}
	if a.String() == c.String() {
		t.Errorf("fd00::2 and fd00::3 share MAC %s", a)
	}
	if err := validUnicastMAC(a); err != nil {
		t.Errorf("IPv6 MAC %s: %v", a, err)
	}
	if a[0]&2 == 0 || strings.HasPrefix(a.String(), "02:42") {
		t.Errorf("IPv6 MAC %s: want locally administered and outside 02:42", a)
	}
	if MACFromIP(netip.Addr{}) != nil {
		t.Error("MACFromIP(invalid) != nil")
	}
}

func TestNames(t *testing.T) {
	id := "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	tests := []struct{ got, want string }{
		{VXLANName(0xabc), "vx-000abc"},
		{BridgeName(MaxVNI), "vxbr-ffffff"},
		{HostIfName(id), "vxh-0123456789"},
		{ContainerIfName(id), "vxc-0123456789"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("name %q, want %q", tt.got, tt.want)
		}
		if len(tt.got) > 15 {
			t.Errorf("name %q longer than 15", tt.got)
		}
	}
	// Our patterns never match Docker's links or near misses.
	for _, name := range []string{"br-0123456789ab", "veth1234567", "vx-000abc-12345", "vx-00ABC1", "vxbr-0001", "docker0", "vxh-012345678", "vxc-0123456789a"} {
		for _, re := range []interface{ MatchString(string) bool }{vxlanNameRE, bridgeNameRE, hostNameRE, contNameRE} {
			if re.MatchString(name) {
				t.Errorf("%q matches one of our patterns", name)
			}
		}
	}
	if v, ok := vniFromName(bridgeNameRE, "vxbr-00beef"); !ok || v != 0xbeef {
		t.Errorf("vniFromName = %d, %v", v, ok)
	}
	for _, bad := range []string{"", "short", "0123/56789ab", "01234 6789ab"} {
		if validEndpointID(bad) == nil {
			t.Errorf("endpoint id %q accepted", bad)
		}
	}
	for _, bad := range []uint32{0, MaxVNI + 1} {
		if validVNI(bad) == nil {
			t.Errorf("vni %d accepted", bad)
		}
	}
}

// unitManager is a Manager for checks that never reach the kernel.
func unitManager(t *testing.T, vtep string) *Manager {
	t.Helper()
	m, err := newManager(Config{VTEP: netip.MustParseAddr(vtep), UnderlayMTU: 1500, IPTables: "-", IP6Tables: "-", Sysctl: "-"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestPeerValidation(t *testing.T) {
	m := unitManager(t, "192.0.2.1")
	mac := net.HardwareAddr{2, 0x42, 10, 0, 0, 2}
	good := Peer{VNI: 7, IP: netip.MustParseAddr("10.0.0.2"), MAC: mac, VTEP: netip.MustParseAddr("192.0.2.2")}
	if _, err := m.checkPeer(good); err != nil {
		t.Fatalf("good peer: %v", err)
	}
	tests := []struct {
		name string
		mod  func(p *Peer)
	}{
		{"no vni", func(p *Peer) { p.VNI = 0 }},
		{"no ip", func(p *Peer) { p.IP = netip.Addr{} }},
		{"short mac", func(p *Peer) { p.MAC = mac[:4] }},
		{"multicast mac", func(p *Peer) { p.MAC = net.HardwareAddr{1, 0, 0x5e, 0, 0, 1} }},
		{"zero mac", func(p *Peer) { p.MAC = make(net.HardwareAddr, 6) }},
		{"no vtep", func(p *Peer) { p.VTEP = netip.Addr{} }},
		{"ipv6 vtep on ipv4 underlay", func(p *Peer) { p.VTEP = netip.MustParseAddr("2001:db8::2") }},
		{"own vtep", func(p *Peer) { p.VTEP = netip.MustParseAddr("192.0.2.1") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := good
			tt.mod(&p)
			if _, err := m.checkPeer(p); err == nil {
				t.Fatalf("peer %+v accepted", p)
			}
			if err := m.AddPeer(t.Context(), p); err == nil {
				t.Fatalf("AddPeer(%+v) succeeded", p)
			}
		})
	}
}

func TestPeerSet(t *testing.T) {
	ip := netip.MustParseAddr("10.0.0.4")
	v1, v2 := netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("192.0.2.3")
	m1, m2 := [6]byte{2, 0, 0, 0, 0, 1}, [6]byte{2, 0, 0, 0, 0, 2}
	s := newPeerSet()
	a := peerKey{ip: ip, mac: m1, vtep: v1}
	b := peerKey{ip: ip, mac: m2, vtep: v2}
	if !s.add(a) || s.add(a) {
		t.Fatal("add: first true, second false expected")
	}
	s.add(b)
	if mac, _ := s.neighFor(ip); mac != m2 {
		t.Errorf("duplicate IP: latest peer should win, got %x", mac)
	}
	s.remove(b)
	if mac, _ := s.neighFor(ip); mac != m1 {
		t.Errorf("after removing the latest, the earlier peer should take over, got %x", mac)
	}
	if !s.hasVTEP(v1) || s.hasVTEP(v2) {
		t.Error("vtep refcount wrong")
	}
	s.remove(a)
	if len(s.peers)+len(s.byIP)+len(s.byMAC)+len(s.vteps) != 0 {
		t.Errorf("set not empty after removing all: %+v", s)
	}
	if s.remove(a) {
		t.Error("second remove reported true")
	}
}

func TestRaiseGCThresh(t *testing.T) {
	root := t.TempDir()
	write := func(key, val string) {
		p := filepath.Join(root, key)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(val+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("net/ipv4/neigh/default/gc_thresh1", "128")
	write("net/ipv4/neigh/default/gc_thresh2", "512")
	write("net/ipv4/neigh/default/gc_thresh3", "100000") // higher than ours: kept
	// ipv6 files absent: skipped.
	raiseGCThresh(root, slog.New(slog.DiscardHandler))
	want := map[string]string{
		"net/ipv4/neigh/default/gc_thresh1": "8192",
		"net/ipv4/neigh/default/gc_thresh2": "49152",
		"net/ipv4/neigh/default/gc_thresh3": "100000",
	}
	for k, v := range want {
		b, err := os.ReadFile(filepath.Join(root, k))
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(string(b)); got != v {
			t.Errorf("%s = %s, want %s", k, got, v)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "net/ipv6/neigh/default/gc_thresh3")); err == nil {
		t.Error("created a sysctl that did not exist")
	}
}

func TestFirewallCommands(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	script := func(name, body string) string {
		p := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	works, broken := script("iptables", "exit 0"), script("ip6tables", "echo cannot initialize >&2; exit 3")
	tests := []struct {
		name      string
		ipt, ip6t string
		want      []string
	}{
		{"both disabled", "-", "-", nil},
		{"missing command", "/nonexistent/iptables", "-", nil},
		{"configured path", works, "-", []string{works}},
		{"unusable command skipped", works, broken, []string{works}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFirewall(log, tt.ipt, tt.ip6t)
			if !slices.Equal(f.bins, tt.want) {
				t.Errorf("commands %v, want %v", f.bins, tt.want)
			}
			if f.enabled() != (len(tt.want) > 0) {
				t.Errorf("enabled %v", f.enabled())
			}
		})
	}
}

func TestOwnerMarks(t *testing.T) {
	for _, tt := range []struct {
		owner, mark string
	}{
		{"", "consul-overlay"},
		{"a", "consul-overlay-a"},
		{"3f9a0c12", "consul-overlay-3f9a0c12"},
		{"x-y_z", "consul-overlay-x-y_z"},
	} {
		if got := OwnerMark(tt.owner); got != tt.mark {
			t.Errorf("OwnerMark(%q) = %q, want %q", tt.owner, got, tt.mark)
		}
		if got, ok := ownerOfMark(tt.mark); !ok || got != tt.owner {
			t.Errorf("ownerOfMark(%q) = %q, %v; want %q", tt.mark, got, ok, tt.owner)
		}
		if err := validOwner(tt.owner); err != nil {
			t.Errorf("validOwner(%q): %v", tt.owner, err)
		}
	}
	for _, mark := range []string{"", "consul", "consul-overlay-", "consul-overlayx", "docker"} {
		if owner, ok := ownerOfMark(mark); ok {
			t.Errorf("ownerOfMark(%q) = %q, true; want no owner", mark, owner)
		}
	}
	for _, owner := range []string{"a b", "a/b", `a"b`, "a:b", strings.Repeat("a", 65)} {
		if err := validOwner(owner); err == nil {
			t.Errorf("validOwner(%q) accepted", owner)
		}
		if _, err := newManager(Config{VTEP: netip.MustParseAddr("192.0.2.1"), Owner: owner}, nil); err == nil {
			t.Errorf("newManager with owner %q accepted", owner)
		}
	}
}

func TestForeignLinkError(t *testing.T) {
	var err error = fmt.Errorf("ensure vxlan (vni 4096): %w", &ForeignLinkError{Link: "vx-001000", Owner: "3f9a"})
	if !errors.Is(err, ErrForeign) {
		t.Error("errors.Is(ErrForeign) false")
	}
	if want := "ensure vxlan (vni 4096): vx-001000 belongs to consul-overlay instance 3f9a"; err.Error() != want {
		t.Errorf("message %q, want %q", err, want)
	}
	def := &ForeignLinkError{Link: "vxbr-001000"}
	if !strings.Contains(def.Error(), "vxbr-001000 belongs to the default consul-overlay instance") {
		t.Errorf("default owner's message %q", def)
	}
}

func TestParseRule(t *testing.T) {
	for _, tt := range []struct {
		line, comment, bare string
		marked              bool
		ifaces              []string
	}{
		{"-A CONSUL-OVERLAY -i vxbr-000010 -o vxbr-000010 -m comment --comment consul-overlay-a -j ACCEPT",
			"consul-overlay-a", "-i vxbr-000010 -o vxbr-000010 -j ACCEPT", true, []string{"vxbr-000010", "vxbr-000010"}},
		{"-A CONSUL-OVERLAY -o vxbr-000010 -j DROP", "", "-o vxbr-000010 -j DROP", false, []string{"vxbr-000010"}},
		{`-A CONSUL-OVERLAY -i br0 -m comment --comment "quoted" -j DROP`, "quoted", "-i br0 -j DROP", true, []string{"br0"}},
	} {
		r := parseRule(tt.line)
		if r.comment != tt.comment || r.marked != tt.marked || !slices.Equal(r.ifaces, tt.ifaces) {
			t.Errorf("parseRule(%q) = %+v", tt.line, r)
		}
		if got := r.withoutComment(); got != tt.bare {
			t.Errorf("withoutComment(%q) = %q, want %q", tt.line, got, tt.bare)
		}
	}
	// Our rules are written as -S prints them, so the listed fields and
	// forwardRules compare equal.
	accept, drops := forwardRules("consul-overlay-a")
	if got := strings.Join(accept, " "); got != "-i vxbr-+ -m physdev --physdev-is-bridged -m comment --comment consul-overlay-a -j ACCEPT" {
		t.Errorf("accept rule %q", got)
	}
	if len(drops) != 2 || strings.Join(drops[0], " ") != "-o vxbr-+ -m comment --comment consul-overlay-a -j DROP" {
		t.Errorf("drop rules %q", drops)
	}
}

// A sync plans, from one listing, the wildcard rules in place of an older
// version's per-bridge ones, keeps other owners' rules, and plans nothing
// on a listing that already matches.
func TestPlanSync(t *testing.T) {
	f := &firewall{log: slog.New(slog.DiscardHandler), mark: OwnerAlias, v6: map[string]bool{}}
	ll := addr("169.254.1.1")
	old := `*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:CONSUL-OVERLAY - [0:0]
:CONSUL-OVERLAY-INPUT - [0:0]
-A INPUT -j CONSUL-OVERLAY-INPUT
-A FORWARD -j CONSUL-OVERLAY
-A CONSUL-OVERLAY -i vxbr-000010 -o vxbr-000010 -m comment --comment consul-overlay -j ACCEPT
-A CONSUL-OVERLAY -i vxbr-000011 -o vxbr-000011 -m comment --comment consul-overlay-x -j ACCEPT
-A CONSUL-OVERLAY -i vxbr-000012 -o vxbr-000012 -j ACCEPT
-A CONSUL-OVERLAY -o vxbr-000010 -m comment --comment consul-overlay -j DROP
-A CONSUL-OVERLAY -i vxbr-000010 -m comment --comment consul-overlay -j DROP
-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-000010 -p tcp -m tcp --dport 8500 -m comment --comment consul-overlay -j RETURN
-A CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-000010 -p udp -m udp --dport 53 -m comment --comment consul-overlay -j RETURN
COMMIT
`
	spec := fwSpec{bridges: map[string]Network{"vxbr-000010": {VNI: 0x10, ConsulAPI: true}}, complete: true, shared: sharedWant, ll: ll, notrack: true}
	plan := func(save string) []string {
		l := listing{}
		parseListing(l, "", save)
		var b batch
		f.planBase(&b, l)
		f.planForward(&b, "iptables", l, spec)
		f.planInput(&b, "iptables", l, spec)
		f.planRaw(&b, l, spec)
		var out []string
		for _, w := range b {
			out = append(out, w.table+": "+strings.Join(w.args, " "))
		}
		return out
	}
	got := plan(old)
	for _, want := range []string{
		"filter: -D CONSUL-OVERLAY -i vxbr-000010 -o vxbr-000010 -m comment --comment consul-overlay -j ACCEPT",
		"filter: -D CONSUL-OVERLAY -i vxbr-000012 -o vxbr-000012 -j ACCEPT",
		"filter: -I CONSUL-OVERLAY 1 -i vxbr-+ -m physdev --physdev-is-bridged -m comment --comment consul-overlay -j ACCEPT",
		// An earlier release's unconditional jump makes way for ours.
		"filter: -I FORWARD 1 -i vxbr-+ -j CONSUL-OVERLAY",
		"filter: -I FORWARD 4 -o vxg-+ -j CONSUL-OVERLAY",
		"filter: -D FORWARD -j CONSUL-OVERLAY",
		"filter: -D CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-000010 -p udp -m udp --dport 53 -m comment --comment consul-overlay -j RETURN",
		// The API RETURN moves above the REJECT inserted now.
		"filter: -D CONSUL-OVERLAY-INPUT -d 169.254.1.1/32 -i vxbr-000010 -p tcp -m tcp --dport 8500 -m comment --comment consul-overlay -j RETURN",
		"raw: -A PREROUTING -i vxbr-+ -m addrtype ! --dst-type LOCAL -m comment --comment consul-overlay -j NOTRACK",
	} {
		if !slices.Contains(got, want) {
			t.Errorf("plan lacks %q:\n%s", want, strings.Join(got, "\n"))
		}
	}
	for _, w := range got {
		if strings.Contains(w, "consul-overlay-x") {
			t.Errorf("plan touches another owner's rule: %s", w)
		}
	}
	last := got[len(got)-2] // before the raw rule
	if last != "filter: -I CONSUL-OVERLAY-INPUT 1 -d 169.254.1.1/32 -i vxbr-000010 -p tcp -m tcp --dport 8500 -m comment --comment consul-overlay -j RETURN" {
		t.Errorf("API RETURN not inserted last (on top):\n%s", strings.Join(got, "\n"))
	}

	// The listing after the plan: nothing more to do.
	accept, drops := forwardRules(OwnerAlias)
	host, drop := linkLocalHostRules(ll, OwnerAlias)
	var in []string
	in = append(in, strings.Join(linkLocalAPIRule(ll, "vxbr-000010", OwnerAlias), " "))
	in = append(in, strings.Join(host, " "))
	for _, r := range linkLocalWildcardRules(ll, OwnerAlias) {
		in = append(in, strings.Join(r, " "))
	}
	in = append(in, strings.Join(drop, " "))
	done := "*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING " + strings.Join(notrackRule(OwnerAlias), " ") + "\nCOMMIT\n*filter\n:INPUT ACCEPT\n:FORWARD DROP\n:CONSUL-OVERLAY -\n:CONSUL-OVERLAY-INPUT -\n" +
		"-A INPUT -j CONSUL-OVERLAY-INPUT\n" + strings.Join(forwardJumpLines(), "\n") + "\n" +
		"-A CONSUL-OVERLAY " + strings.Join(accept, " ") + "\n" +
		"-A CONSUL-OVERLAY -i vxbr-000011 -o vxbr-000011 -m comment --comment consul-overlay-x -j ACCEPT\n" +
		"-A CONSUL-OVERLAY " + strings.Join(drops[0], " ") + "\n-A CONSUL-OVERLAY " + strings.Join(drops[1], " ") + "\n"
	for _, r := range in {
		done += "-A CONSUL-OVERLAY-INPUT " + r + "\n"
	}
	done += "COMMIT\n"
	if got := plan(done); len(got) != 0 {
		t.Errorf("plan on a matching listing:\n%s", strings.Join(got, "\n"))
	}
}
