package vxlan

import (
	"fmt"
	"testing"

	"github.com/vishvananda/netlink"

	"consul-overlay/internal/testenv"
)

// After SetVTEP, an encrypted network must still never leave in plain
// text. The catch-all block policy (src <vtep>/32, dst any, marked)
// is what guarantees it while no peer policy exists (no primary key yet,
// or a VTEP without a policy). syncXfrm took any marked block policy
// with a /0 destination for present, whatever its source, so after a VTEP
// change the only block policy still selected the old source address: the
// marked VXLAN packets the replaced device sent from the new address
// matched no policy at all and left unencrypted.
func TestSetVTEPMovesBlockPolicy(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	h := newHosts(t, 2, testenv.UnderlayOptions{})[0]
	probePassed(h.m)
	n := Network{VNI: 0x7b1, Encrypted: true}
	if _, err := h.m.EnsureNetwork(ctx, n); err != nil {
		t.Fatal(err)
	}
	if err := h.m.AddPeer(ctx, Peer{VNI: n.VNI, IP: addr("10.73.0.3"), MAC: MACFromIP(addr("10.73.0.3")), VTEP: addr("192.0.2.2")}); err != nil {
		t.Fatal(err)
	}
	// No key sends yet (a restart before the key ring is read, or a ring
	// without a primary): only the block policy stands between the
	// encrypted VNI and the wire.
	newVTEP := addr("192.0.2.101")
	h.NS.MustRun(t, "ip", "addr", "add", newVTEP.String()+"/24", "dev", h.Link)
	if _, err := h.m.SetVTEP(ctx, newVTEP, []Network{n}); err != nil {
		t.Fatal(err)
	}
	pols, err := h.NS.Handle().XfrmPolicyList(netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	var blocks []string
	covered := false
	for _, p := range pols {
		if p.Mark == nil || p.Mark.Value != ipsecMark(h.m.mark) || p.Action != netlink.XFRM_POLICY_BLOCK {
			continue
		}
		src, _ := prefixOf(p.Src)
		blocks = append(blocks, fmt.Sprintf("src %s dst %s", p.Src, p.Dst))
		if src.Contains(newVTEP) {
			covered = true
		}
	}
	if !covered {
		t.Errorf("after SetVTEP to %s no block policy selects the new source: marked packets of encrypted vni %d leave in plain text; block policies: %v",
			newVTEP, n.VNI, blocks)
	}
}
