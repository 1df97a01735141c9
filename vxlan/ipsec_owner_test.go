package vxlan

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"consul-overlay/internal/testenv"
)

// An encrypted network whose devices belong to another owner gets no
// xfrm state, policy or ESP rule of ours, neither from Reconcile nor from
// EnsureNetwork: ours would mark that owner's VXLAN packets and block
// them. The error names the device and its owner.
func TestIPsecForeignDevices(t *testing.T) {
	t.Parallel()
	const vni = 0x5b
	n := Network{VNI: vni, Encrypted: true, Gateways: []netip.Prefix{pfx("10.91.0.1/24")}}
	peer := Peer{VNI: vni, IP: addr("10.91.0.9"), MAC: MACFromIP(addr("10.91.0.9")), VTEP: addr("192.0.2.2")}
	for _, tt := range []struct {
		name string
		call func(ctx context.Context, m *Manager) error
	}{
		{"reconcile", func(ctx context.Context, m *Manager) error {
			_, err := m.Reconcile(ctx, State{Networks: []Network{n}, Peers: []Peer{peer}})
			return err
		}},
		{"ensure network", func(ctx context.Context, m *Manager) error {
			if err := m.AddPeer(ctx, peer); err != nil {
				return err
			}
			_, err := m.EnsureNetwork(ctx, n)
			return err
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := newHosts(t, 1, testenv.UnderlayOptions{})[0]
			ctx := t.Context()
			m := h.manager(t, "sec")
			if err := m.IPsecSupported(); err != nil {
				// No ESP in this kernel: the probe is taken as passed, so
				// that what the kernel can hold (policies, ESP chain
				// rules) would show; ESP states cannot be added.
				t.Logf("taking the ipsec probe as passed: %v", err)
				m.mu.Lock()
				m.sec.probed = nil
				m.mu.Unlock()
			}
			other := h.manager(t, "foreign")
			if _, err := other.EnsureNetwork(ctx, Network{VNI: vni, Gateways: []netip.Prefix{pfx("10.91.0.1/24")}}); err != nil {
				t.Fatal(err)
			}
			if _, err := m.SetIPsecKeys(ctx, IPsecKeys{Keys: []IPsecKey{testKey(1)}, Primary: 1}); err != nil {
				t.Fatal(err)
			}

			err := tt.call(ctx, m)
			var fe *ForeignLinkError
			if !errors.As(err, &fe) || fe.Owner != "foreign" || !strings.Contains(err.Error(), BridgeName(vni)) {
				t.Errorf("error %v, want a *ForeignLinkError naming %s and owner foreign", err, BridgeName(vni))
			}
			if st, pol := ourXfrm(t, h, "sec"); len(st)+len(pol) != 0 {
				t.Errorf("xfrm entries of ours for another owner's network:\n%s\n%s", strings.Join(st, "\n"), strings.Join(pol, "\n"))
			}
			for _, chain := range []string{ESPOutChain, ESPInChain} {
				for _, r := range mangleRules(t, h, chain) {
					if strings.Contains(r, " --comment "+m.mark+" ") {
						t.Errorf("%s: a rule of ours for another owner's network: %s", chain, r)
					}
				}
			}
		})
	}
}
