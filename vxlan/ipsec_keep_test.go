package vxlan

import (
	"testing"

	"consul-overlay/internal/testenv"
)

// A Reconcile with KeepStrays (a restart that keeps what the store does
// not list) keeps the ESP rules of an encrypted overlay it was not given:
// without its ESP-OUT mark the overlay's packets leave in plain text, and
// without its ESP-IN drop plain packets of its VNI are taken. It removed
// them: the encrypted set is rebuilt from the listed networks alone.
func TestKeepStraysKeepsESPRulesOfKeptNetwork(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	h := newHosts(t, 1, testenv.UnderlayOptions{})[0]
	probePassed(h.m)
	kept := Network{VNI: 0x7b2, Encrypted: true}
	if _, err := h.m.EnsureNetwork(ctx, kept); err != nil {
		t.Fatal(err)
	}
	before := map[string][]string{}
	for _, chain := range []string{ESPOutChain, ESPInChain} {
		before[chain] = mangleRules(t, h, chain)
		if len(before[chain]) != 1 {
			t.Fatalf("setup: %s %v", chain, before[chain])
		}
	}
	restarted := h.manager(t, "")
	listed := Network{VNI: 0x7b3}
	if _, err := restarted.Reconcile(ctx, State{Networks: []Network{listed}, KeepStrays: true}); err != nil {
		t.Fatal(err)
	}
	for _, chain := range []string{ESPOutChain, ESPInChain} {
		if got := mangleRules(t, h, chain); len(got) != len(before[chain]) {
			t.Errorf("KeepStrays reconcile changed %s of the kept encrypted vni %d:\nbefore %v\nafter  %v", chain, kept.VNI, before[chain], got)
		}
	}
}

// probePassed takes m's IPsec support probe as passed: the ESP rules and
// xfrm policies these tests check need no ESP in the kernel, so a run
// does not depend on esp4 being there.
func probePassed(m *Manager) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.sec.didProbe, m.sec.probed = true, nil
}
