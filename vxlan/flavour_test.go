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
	"sync/atomic"
	"testing"

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
	hosts := newHosts(t, 2, testenv.UnderlayOptions{})
	h0 := hosts[0]
	lookPath := flavourWrappers(t, h0)
	if strings.TrimSpace(h0.NS.MustRun(t, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables")) != "1" {
		h0.NS.MustRun(t, "sysctl", "-w", "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
	}
	// dockerd's FORWARD on a legacy host.
	for _, cmd := range []string{"iptables-legacy", "ip6tables-legacy"} {
		iptables(t, h0, cmd, "-N", "DOCKER")
		iptables(t, h0, cmd, "-N", "DOCKER-USER")
		iptables(t, h0, cmd, "-A", "DOCKER-USER", "-j", "RETURN")
		iptables(t, h0, cmd, "-A", "FORWARD", "-j", "DOCKER-USER")
		iptables(t, h0, cmd, "-P", "FORWARD", "DROP")
	}

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
	m.fw = newDetectedFirewall(context.Background(), m.log, &flavourDetector{log: m.log, lookPath: lookPath, save: runSave})
	m.fw.mark = m.mark
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

// The plugin's own chains and rules (of any owner) do not count in the
// flavour probe: after dockerd moved to the other flavour, a restarted
// plugin follows dockerd, not the rules it wrote itself before.
func TestFlavourProbeIgnoresOwnRules(t *testing.T) {
	const own = `*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:CONSUL-OVERLAY - [0:0]
:CONSUL-OVERLAY-INPUT - [0:0]
-A INPUT -j CONSUL-OVERLAY-INPUT
-A FORWARD -j CONSUL-OVERLAY
-A CONSUL-OVERLAY -i vxbr-+ -m physdev --physdev-is-bridged -m comment --comment consul-overlay -j ACCEPT
-A CONSUL-OVERLAY -o vxbr-+ -m comment --comment consul-overlay -j DROP
-A CONSUL-OVERLAY -i vxbr-+ -m comment --comment consul-overlay -j DROP
-A CONSUL-OVERLAY-INPUT -s 192.0.2.12/32 -p udp -m udp --dport 4789 -m comment --comment consul-overlay -j RETURN
-A CONSUL-OVERLAY-INPUT -p udp -m udp --dport 4789 -m comment --comment consul-overlay -j DROP
-A CONSUL-OVERLAY-INPUT -p udp -m udp --dport 4789 -m comment --comment consul-overlay-b -j DROP
COMMIT
`
	const docker = `*filter
:FORWARD DROP [0:0]
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
`
	const admin = `*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -i lo -j ACCEPT
COMMIT
`
	for _, tt := range []struct {
		name        string
		nft, legacy string // what each flavour's save commands print
		want        string
		wantSettled bool
	}{
		{"dockerd moved to legacy, not started yet", own, "", "nft", false},
		{"no dockerd, the administrator's rules in legacy", own, admin, "legacy", true},
		{"dockerd in both, more of its rules in legacy", docker + own, docker + admin, "legacy", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := &flavourDetector{
				log:      testLogger(t),
				lookPath: func(name string) (string, error) { return "/x/" + name, nil },
				save: func(_ context.Context, bin string) (string, error) {
					if strings.Contains(bin, "-legacy-") {
						return tt.legacy, nil
					}
					return tt.nft, nil
				},
			}
			c, ok := chooseFlavour(d.probe(t.Context()))
			if !ok || c.name != tt.want || c.settled != tt.wantSettled {
				t.Errorf("chose %q settled %t ok %t (%s; %d rules counted in it), want %q settled %t", c.name, c.settled, ok, c.reason, c.rules, tt.want, tt.wantSettled)
			}
		})
	}
}

// savedRules lists the rules with mark in every table of h's namespace,
// as cmd (a save command such as iptables-nft-save) prints them.
func savedRules(t *testing.T, h *testHost, cmd, mark string) []string {
	t.Helper()
	var rules []string
	for _, l := range strings.Split(h.NS.MustRun(t, cmd), "\n") {
		if strings.HasPrefix(l, "-A ") && strings.Contains(l, " --comment "+mark+" ") {
			rules = append(rules, l)
		}
	}
	return rules
}

// When the provisional flavour choice changes (dockerd's chains appear in
// the other flavour), the rules this instance wrote in the flavour it used
// so far (underlay filter, FORWARD, internal INPUT and NOTRACK rules) move
// to the new one, even on a call that writes none of them itself (the
// DeleteNetwork of a network not here), and are gone from the old one:
// nobody would manage them there. Another owner's rules stay.
func TestFlavourSwitchMovesOwnRules(t *testing.T) {
	t.Parallel()
	h := newHosts(t, 1, testenv.UnderlayOptions{})[0]
	lookPath := flavourWrappers(t, h)
	ctx := t.Context()
	const dockerSave = "*filter\n:DOCKER - [0:0]\n:DOCKER-USER - [0:0]\n-A DOCKER-USER -j RETURN\nCOMMIT\n"
	var dockerd atomic.Bool // dockerd's chains are in the legacy flavour
	m := h.manager(t, "sw")
	m.fw = newDetectedFirewall(ctx, m.log, &flavourDetector{log: m.log, lookPath: lookPath,
		save: func(_ context.Context, bin string) (string, error) {
			if dockerd.Load() && strings.Contains(bin, "-legacy-") {
				return dockerSave, nil
			}
			return "", nil
		}})
	m.fw.mark, m.fw.notrack = m.mark, true
	if m.fw.flavour.name != "nft" || m.fw.flavour.settled {
		t.Fatalf("flavour %q settled %t (%s), want a provisional nft", m.fw.flavour.name, m.fw.flavour.settled, m.fw.flavour.reason)
	}
	// Another owner's network, with plain iptables: its rules must stay
	// wherever they are.
	if _, err := h.m.EnsureNetwork(ctx, Network{VNI: 0x5a, Gateways: []netip.Prefix{pfx("10.90.0.1/24")}}); err != nil {
		t.Fatal(err)
	}
	saves := []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"}
	other := map[string][]string{}
	for _, cmd := range saves {
		other[cmd] = savedRules(t, h, cmd, OwnerAlias)
	}

	const vni = 0x59
	n := Network{VNI: vni, Internal: true, Gateways: []netip.Prefix{pfx("10.89.0.1/24")}}
	if err := m.AddPeer(ctx, Peer{VNI: vni, IP: addr("10.89.0.9"), MAC: MACFromIP(addr("10.89.0.9")), VTEP: addr("192.0.2.2")}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.EnsureNetwork(ctx, n); err != nil {
		t.Fatal(err)
	}
	// inOrder is the rules of ours in chain, in order: a RETURN must stay
	// before its DROP.
	inOrder := func(rules []string, chain string) []string {
		var out []string
		for _, r := range rules {
			if strings.HasPrefix(r, "-A "+chain+" ") {
				out = append(out, r)
			}
		}
		return out
	}
	before, beforeInput := map[string][]string{}, map[string][]string{}
	for _, fam := range []string{"iptables", "ip6tables"} {
		before[fam] = savedRules(t, h, fam+"-nft-save", m.mark)
		beforeInput[fam] = inOrder(before[fam], InputChain)
		slices.Sort(before[fam])
	}
	if len(before["iptables"]) < 7 {
		t.Fatalf("iptables-nft holds %d rules of ours before the switch, want the underlay, FORWARD, INPUT and NOTRACK ones:\n%s", len(before["iptables"]), strings.Join(before["iptables"], "\n"))
	}

	dockerd.Store(true)
	if err := m.DeleteNetwork(ctx, 0x5b); err != nil {
		t.Fatal(err)
	}
	if m.fw.flavour.name != "legacy" {
		t.Fatalf("flavour %q after dockerd's chains appeared in legacy, want legacy", m.fw.flavour.name)
	}
	for _, fam := range []string{"iptables", "ip6tables"} {
		if got := savedRules(t, h, fam+"-nft-save", m.mark); len(got) != 0 {
			t.Errorf("%s-nft after the switch to legacy still holds rules of ours:\n%s", fam, strings.Join(got, "\n"))
		}
		got := savedRules(t, h, fam+"-legacy-save", m.mark)
		if input := inOrder(got, InputChain); !slices.Equal(input, beforeInput[fam]) {
			t.Errorf("%s-legacy %s after the switch:\n%s\nwant nft's order:\n%s", fam, InputChain, strings.Join(input, "\n"), strings.Join(beforeInput[fam], "\n"))
		}
		slices.Sort(got)
		if !slices.Equal(got, before[fam]) {
			t.Errorf("%s-legacy after the switch:\n%s\nwant what nft held:\n%s", fam, strings.Join(got, "\n"), strings.Join(before[fam], "\n"))
		}
	}
	for cmd, want := range other {
		if got := savedRules(t, h, cmd, OwnerAlias); !slices.Equal(got, want) {
			t.Errorf("%s: the other owner's rules changed:\n%s\nwant\n%s", cmd, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
}
