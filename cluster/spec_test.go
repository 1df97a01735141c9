package cluster

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"testing"

	"consul-overlay/kvstore"
)

func specStore(t *testing.T) kvstore.Store {
	s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: filepath.Join(t.TempDir(), "state.db"), Prefix: "test/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func testSpec(subnet string) Spec {
	return Spec{Name: "app", IPAMSelf: true, IPAM: []IPAMConfig{{Subnet: subnet}}, Labels: map[string]string{"a": "b"}, Origin: "h1", OriginNode: "n1"}
}

func TestSpecKey(t *testing.T) {
	tests := []struct {
		ipam []IPAMConfig
		want string
	}{
		{[]IPAMConfig{{Subnet: "10.1.0.0/24"}}, "subnet-10.1.0.0_24"},
		{[]IPAMConfig{{Subnet: "fd00::/64"}, {Subnet: "10.1.0.0/24"}}, "subnet-10.1.0.0_24"},
		{[]IPAMConfig{{Subnet: "fd00::/64"}}, "subnet-fd00--_64"},
	}
	for _, tt := range tests {
		got, err := SpecKey(tt.ipam)
		if err != nil || got != tt.want {
			t.Errorf("SpecKey(%v) = %q, %v; want %q", tt.ipam, got, err, tt.want)
		}
	}
	if _, err := SpecKey(nil); err == nil {
		t.Error("SpecKey of no subnet: no error")
	}
}

func TestSameSettings(t *testing.T) {
	a := testSpec("10.1.0.0/24")
	b := testSpec("10.1.0.0/24")
	b.IPAM[0].Gateway = "10.1.0.1/24" // a gateway on one side only matches
	if !SameSettings(a, b) {
		t.Errorf("%s and %s differ: %s", a.Settings(), b.Settings(), specDiff(a, b))
	}
	for name, f := range map[string]func(*Spec){
		"subnet":   func(s *Spec) { s.IPAM[0].Subnet = "10.2.0.0/24" },
		"labels":   func(s *Spec) { s.Labels = nil },
		"internal": func(s *Spec) { s.Internal = true },
		"options":  func(s *Spec) { s.Options = map[string]string{"mtu": "1400"} },
		"range":    func(s *Spec) { s.IPAM[0].IPRange = "10.1.0.128/25" },
	} {
		c := testSpec("10.1.0.0/24")
		f(&c)
		if SameSettings(a, c) {
			t.Errorf("%s: a change is not seen", name)
		}
	}
}

func TestSpecLifecycle(t *testing.T) {
	ctx := context.Background()
	s := specStore(t)
	first, err := PublishSpec(ctx, s, testSpec("10.1.0.0/24"))
	if err != nil {
		t.Fatal(err)
	}
	if first.Spec.Key != "subnet-10.1.0.0_24" || first.Spec.Incarnation == "" {
		t.Fatalf("published %+v", first.Spec)
	}
	// The same settings: the same spec.
	again, err := PublishSpec(ctx, s, testSpec("10.1.0.0/24"))
	if err != nil || again.Spec.Incarnation != first.Spec.Incarnation {
		t.Fatalf("republish: %v, incarnation %q, want %q", err, again.Spec.Incarnation, first.Spec.Incarnation)
	}
	// Other settings: a conflict, the recorded spec returned.
	other, err := PublishSpec(ctx, s, testSpec("10.2.0.0/24"))
	if !errors.Is(err, ErrSpecConflict) || other.Spec.IPAM[0].Subnet != "10.1.0.0/24" {
		t.Fatalf("conflict: %v, %+v", err, other.Spec)
	}
	if err := AddSpecConflict(ctx, s, "app", first.Spec.Incarnation, SpecConflict{HostID: "h2", Node: "n2", Settings: "subnet=10.2.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	// A held network is not deleted, even retired.
	cl, err := New(Config{HostID: "h1", VTEP: netip.MustParseAddr("192.0.2.1")}, s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Join(ctx, first.Spec.Key, "net1", NetworkSpec{Subnets: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}}); err != nil {
		t.Fatal(err)
	}
	if ok, err := RetireSpec(ctx, s, "app", "other-incarnation", "n2"); ok || err != nil {
		t.Fatalf("retire of another incarnation: %v %v", ok, err)
	}
	if ok, err := RetireSpec(ctx, s, "app", first.Spec.Incarnation, "n2"); !ok || err != nil {
		t.Fatalf("retire: %v %v", ok, err)
	}
	cur, err := GetSpec(ctx, s, "app")
	if err != nil || !cur.Spec.Retired || cur.Spec.RetiredBy != "n2" || len(cur.Spec.Conflicts) != 1 {
		t.Fatalf("after retire: %+v %v", cur.Spec, err)
	}
	if ok, err := DeleteSpecIfUnheld(ctx, s, cur); ok || err != nil {
		t.Fatalf("delete while held: %v %v", ok, err)
	}
	if err := cl.Leave(ctx, first.Spec.Key, "net1"); err != nil {
		t.Fatal(err)
	}
	if ok, err := DeleteSpecIfUnheld(ctx, s, cur); !ok || err != nil {
		t.Fatalf("delete once unheld: %v %v", ok, err)
	}
	if _, err := GetSpec(ctx, s, "app"); !errors.Is(err, kvstore.ErrNotFound) {
		t.Fatalf("spec still there: %v", err)
	}
	// Created again after a retirement: a new incarnation, live.
	if _, err := PublishSpec(ctx, s, testSpec("10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if ok, _ := RetireSpec(ctx, s, "app", mustGet(t, s).Spec.Incarnation, "n1"); !ok {
		t.Fatal("retire failed")
	}
	back, err := PublishSpec(ctx, s, testSpec("10.3.0.0/24"))
	if err != nil || back.Spec.Retired || back.Spec.IPAM[0].Subnet != "10.3.0.0/24" {
		t.Fatalf("publish over a retired spec: %v %+v", err, back.Spec)
	}
}

func mustGet(t *testing.T, s kvstore.Store) SpecPair {
	sp, err := GetSpec(context.Background(), s, "app")
	if err != nil {
		t.Fatal(err)
	}
	return sp
}
