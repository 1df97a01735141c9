package vxlan

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"consul-overlay/internal/testenv"
)

// A failed EnsureNetwork of a new network removes the underlay rules it
// added (the RETURN of a peer's VTEP known before the network, and the
// drop rule when there was no underlay filter yet: no other network), at
// every step after the firewall's; rules that were there before the call,
// such as an allowed VTEP of SetAllowedVTEPs and the drop rule of another
// network, stay. Without a network, SetAllowedVTEPs writes nothing: the
// filter lives with the networks.
func TestRollbackUnderlayFilter(t *testing.T) {
	t.Parallel()
	h := newHosts(t, 1, testenv.UnderlayOptions{})[0]
	ctx := t.Context()
	const vni = 0x57
	n := Network{VNI: vni, Gateways: []netip.Prefix{pfx("10.57.0.1/24")}}
	if err := h.m.AddPeer(ctx, Peer{VNI: vni, IP: addr("10.57.0.9"), MAC: MACFromIP(addr("10.57.0.9")), VTEP: addr("192.0.2.2")}); err != nil {
		t.Fatal(err)
	}
	injected := errors.New("injected")
	failEach := func(t *testing.T, want []string) {
		t.Helper()
		for _, step := range networkSteps {
			var hit bool
			h.m.failAt = func(s string) error {
				if s == step {
					hit = true
					return injected
				}
				return nil
			}
			_, err := h.m.EnsureNetwork(ctx, n)
			h.m.failAt = nil
			if !hit || !errors.Is(err, injected) {
				t.Fatalf("step %s: reached %t, error %v; want the injected one", step, hit, err)
			}
			if got := inputRules(t, h, "iptables"); !slices.Equal(got, want) {
				t.Errorf("step %s: %s after the failed EnsureNetwork:\n%s\nwant\n%s", step, InputChain, strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
		}
	}

	t.Run("no filter before", func(t *testing.T) {
		failEach(t, inputRules(t, h, "iptables"))
	})
	t.Run("filter before", func(t *testing.T) {
		// Without a network the set waits; with another network the
		// allowlist holds the set VTEP and the known peer's; a peer
		// learnt afterwards is allowed only by the network's creation.
		if err := h.m.SetAllowedVTEPs(ctx, []netip.Addr{addr("192.0.2.3")}); err != nil {
			t.Fatal(err)
		}
		if got := inputRules(t, h, "iptables"); len(got) != 0 {
			t.Fatalf("%s after SetAllowedVTEPs without a network:\n%s\nwant nothing", InputChain, strings.Join(got, "\n"))
		}
		if _, err := h.m.EnsureNetwork(ctx, Network{VNI: 0x58, Gateways: []netip.Prefix{pfx("10.58.0.1/24")}}); err != nil {
			t.Fatal(err)
		}
		if err := h.m.AddPeer(ctx, Peer{VNI: vni, IP: addr("10.57.0.10"), MAC: MACFromIP(addr("10.57.0.10")), VTEP: addr("192.0.2.4")}); err != nil {
			t.Fatal(err)
		}
		before := inputRules(t, h, "iptables")
		if len(before) != 3 {
			t.Fatalf("%s after SetAllowedVTEPs:\n%s\nwant two RETURN rules and the drop rule", InputChain, strings.Join(before, "\n"))
		}
		failEach(t, before)
		// The removed RETURN is known to be gone: the next EnsureNetwork
		// puts it back.
		if _, err := h.m.EnsureNetwork(ctx, n); err != nil {
			t.Fatal(err)
		}
		want := "-A " + InputChain + " " + strings.Join(allowRule(addr("192.0.2.4"), DefaultPort, OwnerAlias), " ")
		if got := inputRules(t, h, "iptables"); len(got) != 4 || !slices.Contains(got, want) {
			t.Errorf("%s after a successful EnsureNetwork:\n%s\nwant the rules before and %s", InputChain, strings.Join(got, "\n"), want)
		}
	})
}
