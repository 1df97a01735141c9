package vxlan

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"consul-overlay/internal/testenv"
)

// TestCreateEndpoint: CreateEndpoint makes the same pair EnsureEndpoint
// does (up, on the bridge, the network's MTU, the endpoint's MAC, both
// ends marked); a failure at each step leaves no link; an existing pair
// (a replay) or a stray container end takes EnsureEndpoint's path and is
// kept or repaired; another owner's link is refused and left alone.
func TestCreateEndpoint(t *testing.T) {
	inLayouts(t, false, testCreateEndpoint)
}

func testCreateEndpoint(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	ctx := t.Context()
	const vni = 0x57
	if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni, Gateways: []netip.Prefix{pfx("10.57.0.1/24")}}); err != nil {
		t.Fatal(err)
	}
	nlh := h.NS.Handle() // the container end's namespace
	hh := nlh            // the host end's and the bridge's
	if dp {
		hh = h.dp.Handle()
	}
	br, err := hh.LinkByName(BridgeName(vni))
	if err != nil {
		t.Fatal(err)
	}
	ep := Endpoint{ID: strings.Repeat("57", 32), VNI: vni, MAC: MACFromIP(addr("10.57.0.2"))}
	check := func(what string) {
		t.Helper()
		host, err := hh.LinkByName(HostIfName(ep.ID))
		if err != nil {
			t.Fatalf("%s: host end: %v", what, err)
		}
		cont, err := nlh.LinkByName(ContainerIfName(ep.ID))
		if err != nil {
			t.Fatalf("%s: container end: %v", what, err)
		}
		a := host.Attrs()
		if a.MasterIndex != br.Attrs().Index || a.Flags&1 == 0 || a.MTU != br.Attrs().MTU || !h.m.owns(host) {
			t.Fatalf("%s: host end master %d (bridge %d), flags %v, mtu %d (bridge %d), alias %q", what, a.MasterIndex, br.Attrs().Index, a.Flags, a.MTU, br.Attrs().MTU, a.Alias)
		}
		c := cont.Attrs()
		if c.HardwareAddr.String() != ep.MAC.String() || c.MTU != br.Attrs().MTU || !h.m.owns(cont) {
			t.Fatalf("%s: container end mac %s, mtu %d, alias %q", what, c.HardwareAddr, c.MTU, c.Alias)
		}
	}
	before := linkNames(t, h)

	injected := errors.New("injected")
	for _, step := range endpointSteps {
		t.Run("fail/"+step, func(t *testing.T) {
			hit := false
			h.m.failAt = func(s string) error {
				if s == step {
					hit = true
					return injected
				}
				return nil
			}
			defer func() { h.m.failAt = nil }()
			_, err := h.m.CreateEndpoint(ctx, ep)
			if !hit || !errors.Is(err, injected) {
				t.Fatalf("step %s: hit %v, error %v", step, hit, err)
			}
			if !strings.Contains(err.Error(), "create endpoint "+endpointKey(ep.ID)) {
				t.Fatalf("error does not name the endpoint: %v", err)
			}
			if names := linkNames(t, h); !slices.Equal(names, before) {
				t.Fatalf("links %v, want %v", names, before)
			}
		})
	}

	if _, err := h.m.CreateEndpoint(ctx, ep); err != nil {
		t.Fatal(err)
	}
	check("created")
	// A replay keeps the pair (same index) and a detached host end is
	// put back on the bridge.
	host, _ := hh.LinkByName(HostIfName(ep.ID))
	if err := hh.LinkSetNoMaster(host); err != nil {
		t.Fatal(err)
	}
	if _, err := h.m.CreateEndpoint(ctx, ep); err != nil {
		t.Fatal(err)
	}
	check("replayed")
	if again, _ := hh.LinkByName(HostIfName(ep.ID)); again.Attrs().Index != host.Attrs().Index {
		t.Fatal("a replay replaced the pair")
	}
	// A stray container end without its host end is replaced by a pair.
	if err := hh.LinkDel(host); err != nil {
		t.Fatal(err)
	}
	if err := nlh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "stray57"}, PeerName: ContainerIfName(ep.ID)}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.m.CreateEndpoint(ctx, ep); err != nil {
		t.Fatal(err)
	}
	check("over a stray")
	// Another owner's pair is refused and left alone.
	other := h.manager(t, "other")
	oep := Endpoint{ID: strings.Repeat("58", 32), VNI: vni, MAC: MACFromIP(addr("10.57.0.3"))}
	if _, err := other.CreateEndpoint(ctx, oep); err != nil {
		t.Fatal(err)
	}
	var fe *ForeignLinkError
	if _, err := h.m.CreateEndpoint(ctx, oep); !errors.As(err, &fe) {
		t.Fatalf("CreateEndpoint over another owner's pair: %v", err)
	}
	if l, err := hh.LinkByName(HostIfName(oep.ID)); err != nil || l.Attrs().Alias != OwnerMark("other") {
		t.Fatalf("other owner's pair touched: %v", err)
	}
}
