package vxlan

import (
	"context"
	"fmt"
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

func TestChooseFlavour(t *testing.T) {
	nft := func(chains, rules int) flavourState {
		return flavourState{name: "nft", iptables: "/x/iptables-nft", ip6tables: "/x/ip6tables-nft", dockerChains: chains, rules: rules}
	}
	legacy := func(chains, rules int) flavourState {
		return flavourState{name: "legacy", iptables: "/x/iptables-legacy", ip6tables: "/x/ip6tables-legacy", dockerChains: chains, rules: rules}
	}
	for _, tt := range []struct {
		name        string
		states      []flavourState
		want        string // "" for no choice
		wantSettled bool
	}{
		{"none installed", nil, "", false},
		{"only legacy", []flavourState{legacy(0, 0)}, "legacy", true},
		{"dockerd in legacy", []flavourState{nft(0, 3), legacy(6, 12)}, "legacy", true},
		{"dockerd in nft, stray legacy rules", []flavourState{nft(6, 12), legacy(0, 40)}, "nft", true},
		{"dockerd in both, more in legacy", []flavourState{nft(2, 2), legacy(6, 12)}, "legacy", true},
		{"no dockerd, rules in legacy", []flavourState{nft(0, 0), legacy(0, 4)}, "legacy", true},
		{"no dockerd, equal rules", []flavourState{nft(0, 4), legacy(0, 4)}, "nft", true},
		{"nothing anywhere: provisional nft", []flavourState{nft(0, 0), legacy(0, 0)}, "nft", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, ok := chooseFlavour(tt.states)
			if ok != (tt.want != "") || (ok && (c.name != tt.want || c.settled != tt.wantSettled)) {
				t.Errorf("chooseFlavour = %q settled %t ok %t (%s), want %q settled %t", c.name, c.settled, ok, c.reason, tt.want, tt.wantSettled)
			}
		})
	}
}

// flavourWrappers writes, for each flavour command that exists on this
// machine, a wrapper that runs it in h's namespace, and returns a lookPath
// that finds only those.
func flavourWrappers(t *testing.T, h *testHost) func(string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	for _, f := range flavourNames {
		for _, fam := range []string{"iptables", "ip6tables"} {
			for _, suffix := range []string{"", "-save", "-restore"} {
				name := fam + "-" + f + suffix
				bin, err := exec.LookPath(name)
				if err != nil {
					t.Fatalf("%s: %v (apt-get install -y iptables: Debian's carries both flavours)", name, err)
				}
				script := fmt.Sprintf("#!/bin/sh\nexec nsenter --net=%s %s \"$@\"\n", h.NS.Path, bin)
				if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	return func(name string) (string, error) {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err != nil {
			return "", &exec.Error{Name: name, Err: exec.ErrNotFound}
		}
		return p, nil
	}
}

// A host whose dockerd uses the legacy flavour of iptables (its chains and
// its FORWARD policy DROP in x_tables): rules written in the nft flavour
// are loaded and ineffective, so a Manager that is not told the commands
// detects the legacy flavour, programs it, and the overlay's bridged
// traffic flows through the DROP policy.
func TestFirewallLegacyFlavour(t *testing.T) {
	t.Parallel()
	hosts, lookPath := flavourHosts(t)
	h0 := hosts[0]
	// dockerd's FORWARD on a legacy host.
	legacyDockerd(t, h0)

	// The control: the nft flavour (what the plugin's rootfs had alone)
	// programs rules that do not help.
	const vniNFT, vniAuto = 0x31, 0x32
	ctl := Network{VNI: vniNFT, Gateways: []netip.Prefix{pfx("10.31.0.1/24")}}
	for _, h := range hosts {
		if _, err := h.m.EnsureNetwork(t.Context(), ctl); err != nil {
			t.Fatal(err)
		}
	}
	c1 := h0.run(t, vniNFT, []netip.Prefix{pfx("10.31.0.2/24")})
	c2 := hosts[1].run(t, vniNFT, []netip.Prefix{pfx("10.31.0.3/24")})
	c1.announce(t, hosts[1])
	c2.announce(t, h0)
	if got := fwRules(t, h0, "iptables-nft"); len(got) == 0 {
		t.Fatal("the control wrote no rules in the nft flavour")
	}
	mustNotPing(t, c1.ns, addr("10.31.0.3"))

	// The Manager that detects the flavour (another owner in the same
	// namespace, so the control's rules stay apart).
	m := h0.manager(t, "flv")
	detectFlavour(m, lookPath)
	if m.fw.flavour.name != "legacy" || !m.fw.flavour.settled {
		t.Fatalf("flavour %q settled %t (%s), want legacy", m.fw.flavour.name, m.fw.flavour.settled, m.fw.flavour.reason)
	}
	n := Network{VNI: vniAuto, Gateways: []netip.Prefix{pfx("10.32.0.1/24"), pfx("fd00:32::1/64")}}
	if _, err := m.EnsureNetwork(t.Context(), n); err != nil {
		t.Fatal(err)
	}
	if _, err := hosts[1].m.EnsureNetwork(t.Context(), n); err != nil {
		t.Fatal(err)
	}
	a1 := h0.runWith(t, m, vniAuto, []netip.Prefix{pfx("10.32.0.2/24"), pfx("fd00:32::2/64")})
	a2 := hosts[1].run(t, vniAuto, []netip.Prefix{pfx("10.32.0.3/24"), pfx("fd00:32::3/64")})
	a1.announce(t, hosts[1])
	a2.announceTo(t, m)
	mustPing(t, a1.ns, addr("10.32.0.3"))
	mustPing(t, a1.ns, addr("fd00:32::3"))
	fa, _ := forwardRules(m.mark)
	accept := "-A " + FirewallChain + " " + strings.Join(fa, " ")
	for _, cmd := range []string{"iptables-legacy", "ip6tables-legacy"} {
		if n := ruleCounter(t, h0, cmd, accept); n == 0 {
			t.Errorf("%s: our ACCEPT rule saw no packets", cmd)
		}
	}
	for _, r := range fwRules(t, h0, "iptables-nft") {
		if strings.Contains(r, " --comment "+m.mark+" ") {
			t.Errorf("iptables-nft has a rule of the legacy host's owner: %s", r)
		}
	}
}

// The probe counts no rule of consul-overlay's: a flavour that holds only
// the rules of the plugin's own first write (at boot, before dockerd set
// its chains up) leaves the choice provisional.
func TestProbeIgnoresOwnRules(t *testing.T) {
	saved := map[string]string{
		"iptables-nft-save": strings.Join([]string{
			"*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":" + FirewallChain + " - [0:0]", ":" + InputChain + " - [0:0]",
			"-A INPUT -j " + InputChain,
			"-A FORWARD -j " + FirewallChain,
			"-A " + FirewallChain + " -i vxbr-+ -m physdev --physdev-is-bridged -m comment --comment consul-overlay -j ACCEPT",
			"-A " + InputChain + " -p udp -m udp --dport 4789 -m comment --comment \"consul-overlay-x\" -j DROP",
			"COMMIT", "*raw", "-A PREROUTING -i vxbr-+ -m comment --comment consul-overlay-y -j NOTRACK", "COMMIT",
		}, "\n"),
		"iptables-legacy-save": "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n",
	}
	d := &flavourDetector{
		log: testLogger(t),
		lookPath: func(name string) (string, error) {
			if strings.HasPrefix(name, "ip6") {
				return "", exec.ErrNotFound
			}
			return name, nil
		},
		save: func(_ context.Context, bin string) (string, error) { return saved[bin], nil },
	}
	c, ok := d.detect(t.Context(), false)
	if !ok || c.name != "nft" || c.settled {
		t.Fatalf("choice %q settled %t ok %t (%s), want provisional nft", c.name, c.settled, ok, c.reason)
	}
	// The administrator's own rule counts.
	saved["iptables-legacy-save"] += "*filter\n-A INPUT -s 10.0.0.0/8 -j ACCEPT\nCOMMIT\n"
	if c, _ := d.detect(t.Context(), false); c.name != "legacy" || !c.settled {
		t.Fatalf("choice %q settled %t (%s), want legacy settled", c.name, c.settled, c.reason)
	}
}

// A legacy host at boot: the plugin starts before dockerd has written any
// rule, so its first writes go to the provisional flavour, nft. Once
// dockerd's chains and FORWARD policy DROP appear in the legacy flavour,
// the Manager moves its rules there (and out of nft), and the overlay's
// bridged traffic, which the DROP policy would otherwise drop, flows.
// Before, the Manager's own first write settled the choice on nft for
// good.
func TestFirewallFlavourMovesAtBoot(t *testing.T) {
	t.Parallel()
	hosts, lookPath := flavourHosts(t)
	h0 := hosts[0]
	m := h0.manager(t, "boot")
	detectFlavour(m, lookPath)
	if m.fw.flavour.name != "nft" || m.fw.flavour.settled {
		t.Fatalf("flavour %q settled %t (%s), want provisional nft", m.fw.flavour.name, m.fw.flavour.settled, m.fw.flavour.reason)
	}

	const vni, vniInternal = 0x33, 0x34
	n := Network{VNI: vni, Gateways: []netip.Prefix{pfx("10.33.0.1/24"), pfx("fd00:33::1/64")}}
	internal := Network{VNI: vniInternal, Gateways: []netip.Prefix{pfx("10.34.0.1/24")}, Internal: true}
	for _, nw := range []Network{n, internal} {
		if _, err := m.EnsureNetwork(t.Context(), nw); err != nil {
			t.Fatal(err)
		}
		if _, err := hosts[1].m.EnsureNetwork(t.Context(), nw); err != nil {
			t.Fatal(err)
		}
	}
	a1 := h0.runWith(t, m, vni, []netip.Prefix{pfx("10.33.0.2/24"), pfx("fd00:33::2/64")})
	a2 := hosts[1].run(t, vni, []netip.Prefix{pfx("10.33.0.3/24"), pfx("fd00:33::3/64")})
	a1.announce(t, hosts[1])
	a2.announceTo(t, m)
	mustPing(t, a1.ns, addr("10.33.0.3"))
	ours := func(cmd string) []string {
		var out []string
		for _, chain := range []string{FirewallChain, InputChain} {
			o, _ := h0.NS.Run(t, cmd, "-w", "-S", chain)
			for _, l := range strings.Split(o, "\n") {
				if strings.HasPrefix(l, "-A ") && strings.Contains(l, " --comment "+m.mark+" ") {
					out = append(out, l)
				}
			}
		}
		return out
	}
	before := ours("iptables-nft")
	if len(before) == 0 {
		t.Fatal("no rule of ours in the provisional flavour")
	}
	if len(ours("iptables-legacy")) != 0 {
		t.Fatal("rules of ours in the legacy flavour before dockerd started")
	}

	// dockerd starts, on a legacy host.
	legacyDockerd(t, h0)
	m.watchFlavour(flavourWatch{first: 20 * time.Millisecond, most: 100 * time.Millisecond, window: time.Minute})
	testenv.Eventually(t, 30*time.Second, func() error {
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.fw.flavour.name != "legacy" || m.fw.moveFrom != nil {
			return fmt.Errorf("flavour %q, move pending %t", m.fw.flavour.name, m.fw.moveFrom != nil)
		}
		return nil
	})
	if got := ours("iptables-nft"); len(got) != 0 {
		t.Errorf("rules of ours left in the nft flavour: %q", got)
	}
	after := ours("iptables-legacy")
	slices.Sort(before)
	slices.Sort(after)
	if !slices.Equal(before, after) {
		t.Errorf("legacy holds\n%s\nwant what nft held\n%s", strings.Join(after, "\n"), strings.Join(before, "\n"))
	}
	if len(ours("ip6tables-legacy")) == 0 || len(ours("ip6tables-nft")) != 0 {
		t.Errorf("ip6tables: legacy %q, nft %q", ours("ip6tables-legacy"), ours("ip6tables-nft"))
	}
	mustPing(t, a1.ns, addr("10.33.0.3"))
	mustPing(t, a1.ns, addr("fd00:33::3"))
	fa, _ := forwardRules(m.mark)
	if n := ruleCounter(t, h0, "iptables-legacy", "-A "+FirewallChain+" "+strings.Join(fa, " ")); n == 0 {
		t.Error("our ACCEPT rule in the legacy flavour saw no packets")
	}
}

// flavourHosts is two hosts whose first bridges through iptables (as with
// dockerd, br_netfilter on), and a lookPath that finds both flavours'
// commands run in it.
func flavourHosts(t *testing.T) ([]*testHost, func(string) (string, error)) {
	t.Helper()
	hosts := newHosts(t, 2, testenv.UnderlayOptions{})
	h0 := hosts[0]
	lookPath := flavourWrappers(t, h0)
	if strings.TrimSpace(h0.NS.MustRun(t, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables")) != "1" {
		h0.NS.MustRun(t, "sysctl", "-w", "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
	}
	return hosts, lookPath
}

// legacyDockerd writes what dockerd writes on a legacy host: its chains
// and FORWARD policy DROP in the legacy flavour.
func legacyDockerd(t *testing.T, h *testHost) {
	t.Helper()
	for _, cmd := range []string{"iptables-legacy", "ip6tables-legacy"} {
		iptables(t, h, cmd, "-N", "DOCKER")
		iptables(t, h, cmd, "-N", "DOCKER-USER")
		iptables(t, h, cmd, "-A", "DOCKER-USER", "-j", "RETURN")
		iptables(t, h, cmd, "-A", "FORWARD", "-j", "DOCKER-USER")
		iptables(t, h, cmd, "-P", "FORWARD", "DROP")
	}
}

// detectFlavour gives m the firewall a Manager not told its commands has:
// the flavour chosen from what each holds, through lookPath.
func detectFlavour(m *Manager, lookPath func(string) (string, error)) {
	m.fw = newDetectedFirewall(context.Background(), m.log, &flavourDetector{log: m.log, lookPath: lookPath, save: runSave})
	m.fw.mark = m.mark
}

// Rules of this owner left in the flavour not chosen (a move cut short by
// a kill -9 between its write and its purge) are removed once the choice
// is settled; another owner's stay.
func TestPurgeOtherFlavours(t *testing.T) {
	t.Parallel()
	hosts, lookPath := flavourHosts(t)
	h0 := hosts[0]
	m := h0.manager(t, "boot")
	other := OwnerMark("other")
	iptables(t, h0, "iptables-nft", "-N", FirewallChain)
	for _, mark := range []string{m.mark, other} {
		iptables(t, h0, "iptables-nft", "-A", FirewallChain, "-i", "vxbr-+", "-m", "comment", "--comment", mark, "-j", "DROP")
		iptables(t, h0, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "10.46.0.0/24", "!", "-o", "vxbr-000046",
			"-m", "comment", "--comment", mark, "-j", "MASQUERADE")
	}
	legacyDockerd(t, h0)
	detectFlavour(m, lookPath)
	if m.fw.flavour.name != "legacy" || !m.fw.flavour.settled {
		t.Fatalf("flavour %q settled %t (%s), want legacy, settled", m.fw.flavour.name, m.fw.flavour.settled, m.fw.flavour.reason)
	}
	m.mu.Lock()
	m.purgeOtherFlavours(t.Context())
	m.mu.Unlock()
	saved := h0.NS.MustRun(t, "iptables-nft-save")
	if strings.Contains(saved, m.mark+" ") {
		t.Errorf("rules of ours left in the nft flavour:\n%s", saved)
	}
	if strings.Count(saved, "--comment "+other+" ") != 2 {
		t.Errorf("another owner's rules not both kept in the nft flavour:\n%s", saved)
	}
}
