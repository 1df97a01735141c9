package vxlan

import (
	"net/netip"
	"strings"
	"testing"

	"consul-overlay/internal/testenv"
)

// A restart that keeps what its store does not list (Reconcile with
// KeepStrays) keeps an overlay with the FDB entries that send its
// containers' traffic to a peer's VTEP. That VTEP must stay in the
// underlay allowlist: the first SetAllowedVTEPs after the restart (the
// driver's watch of another network) pruned its RETURN rule, and the
// replies were dropped.
func TestKeepStraysKeepsAllowedVTEPs(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	hosts := newHosts(t, 2, testenv.UnderlayOptions{})
	h0, h1 := hosts[0], hosts[1]
	h0.m, h1.m = h0.restoreManager(t, ""), h1.restoreManager(t, "")
	kept := Network{VNI: 0x7a1, Gateways: []netip.Prefix{pfx("10.71.0.1/24")}}
	for _, h := range hosts {
		if _, err := h.m.EnsureNetwork(ctx, kept); err != nil {
			t.Fatal(err)
		}
	}
	c0 := h0.run(t, kept.VNI, []netip.Prefix{pfx("10.71.0.2/24")})
	c1 := h1.run(t, kept.VNI, []netip.Prefix{pfx("10.71.0.3/24")})
	c0.announce(t, h1)
	c1.announce(t, h0)
	mustPing(t, c0.ns, addr("10.71.0.3"))

	// h0's plugin restarts; its store lists another network only (the kept
	// one's record was lost), a container uses the kept one: KeepStrays.
	restarted := h0.restoreManager(t, "")
	listed := Network{VNI: 0x7a2, Gateways: []netip.Prefix{pfx("10.72.0.1/24")}}
	if _, err := restarted.Reconcile(ctx, State{Networks: []Network{listed}, KeepStrays: true}); err != nil {
		t.Fatal(err)
	}
	mustPing(t, c0.ns, addr("10.71.0.3")) // kept, as promised
	before := inputRules(t, h0, "iptables")

	// The listed network's peers (on some third host) are allowed.
	if err := restarted.SetAllowedVTEPs(ctx, []netip.Addr{addr("192.0.2.200")}); err != nil {
		t.Fatal(err)
	}
	after := inputRules(t, h0, "iptables")
	if out, err := ping(t, c0.ns, addr("10.71.0.3"), 3); err != nil {
		t.Errorf("kept overlay's container lost its peer after SetAllowedVTEPs: %v\n%s\nINPUT chain before:\n%s\nafter:\n%s\nkept FDB: %v",
			err, out, strings.Join(before, "\n"), strings.Join(after, "\n"), entries(t, h0, kept.VNI).fdb)
	}
}
