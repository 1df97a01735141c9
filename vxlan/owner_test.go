package vxlan

import (
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"consul-overlay/internal/testenv"
)

func sameState(t *testing.T, what string, got, want ownerState) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s: state changed\ngot  %+v\nwant %+v", what, got, want)
	}
}

// Two instances with different owners in one namespace, each with a
// network across two hosts: each one's Reconcile, deletes and peer calls
// leave the other's links, entries and rules untouched and its traffic
// flowing; a link name the other holds is refused with an error naming
// it; the default owner touches neither.
func TestOwnersShareNamespace(t *testing.T) {
	t.Parallel()
	hosts := newHosts(t, 2, testenv.UnderlayOptions{})
	h0, h1 := hosts[0], hosts[1]
	ctx := t.Context()
	const vniA, vniB = 0x100, 0x200
	a0, a1 := h0.manager(t, "a"), h1.manager(t, "a")
	b0, b1 := h0.manager(t, "b"), h1.manager(t, "b")
	netA := Network{VNI: vniA, Gateways: []netip.Prefix{pfx("10.60.0.1/24")}}
	netB := Network{VNI: vniB, Gateways: []netip.Prefix{pfx("10.70.0.1/24")}}
	for _, m := range []*Manager{a0, a1} {
		if _, err := m.EnsureNetwork(ctx, netA); err != nil {
			t.Fatal(err)
		}
	}
	for _, m := range []*Manager{b0, b1} {
		if _, err := m.EnsureNetwork(ctx, netB); err != nil {
			t.Fatal(err)
		}
	}
	ca0 := h0.runWith(t, a0, vniA, []netip.Prefix{pfx("10.60.0.2/24")})
	ca1 := h1.runWith(t, a1, vniA, []netip.Prefix{pfx("10.60.0.3/24")})
	cb0 := h0.runWith(t, b0, vniB, []netip.Prefix{pfx("10.70.0.2/24")})
	cb1 := h1.runWith(t, b1, vniB, []netip.Prefix{pfx("10.70.0.3/24")})
	ca0.announceTo(t, a1)
	ca1.announceTo(t, a0)
	cb0.announceTo(t, b1)
	cb1.announceTo(t, b0)
	mustPing(t, ca0.ns, addr("10.60.0.3"))
	mustPing(t, cb0.ns, addr("10.70.0.3"))

	stateA := State{Networks: []Network{netA}, Endpoints: []Endpoint{{ID: ca0.id, VNI: vniA, MAC: ca0.mac}}, Peers: ca1.peers()}
	stateB := State{Networks: []Network{netB}, Endpoints: []Endpoint{{ID: cb0.id, VNI: vniB, MAC: cb0.mac}}, Peers: cb1.peers()}
	snapA, snapB := snapshot(t, h0, "a"), snapshot(t, h0, "b")
	if len(snapA.Links) != 3 || len(snapA.Rules) != 6 || len(snapB.Links) != 3 || len(snapB.Rules) != 6 {
		t.Fatalf("want 3 links and 6 rules per owner:\na %+v\nb %+v", snapA, snapB)
	}
	if got := link(t, h0, "vx-000100").Attrs().Alias; got != "consul-overlay-a" {
		t.Errorf("alias of vx-000100 %q, want consul-overlay-a", got)
	}

	// Each reconciles its own full state: nothing to do, the other kept.
	for _, r := range []struct {
		m     *Manager
		state State
	}{{a0, stateA}, {b0, stateB}} {
		ch, err := r.m.Reconcile(ctx, r.state)
		if err != nil {
			t.Fatal(err)
		}
		if ch != (Changes{}) {
			t.Errorf("reconcile of an owner's correct state changed %+v", ch)
		}
	}
	sameState(t, "a after both reconciles", snapshot(t, h0, "a"), snapA)
	sameState(t, "b after both reconciles", snapshot(t, h0, "b"), snapB)

	// The default owner sees neither as its own.
	if ch, err := h0.m.Reconcile(ctx, State{}); err != nil || ch != (Changes{}) {
		t.Errorf("default owner's empty reconcile: changes %+v, error %v", ch, err)
	}
	if vnis, err := h0.m.OwnedNetworks(); err != nil || len(vnis) != 0 {
		t.Errorf("default owner's networks %v (%v), want none", vnis, err)
	}
	for _, r := range []struct {
		m    *Manager
		want []uint32
	}{{a0, []uint32{vniA}}, {b0, []uint32{vniB}}} {
		if vnis, err := r.m.OwnedNetworks(); err != nil || !slices.Equal(vnis, r.want) {
			t.Errorf("OwnedNetworks %v (%v), want %v", vnis, err, r.want)
		}
	}

	// b reaches for a's names: refused or skipped, a untouched.
	_, err := b0.EnsureNetwork(ctx, Network{VNI: vniA})
	var fe *ForeignLinkError
	if !errors.Is(err, ErrForeign) || !errors.As(err, &fe) || fe.Owner != "a" ||
		!strings.Contains(err.Error(), "vxbr-000100 belongs to consul-overlay instance a") {
		t.Errorf("EnsureNetwork of a's VNI by b: %v, want the foreign error naming a", err)
	}
	_, err = b0.EnsureEndpoint(ctx, Endpoint{ID: ca0.id, VNI: vniB, MAC: ca0.mac})
	if !errors.As(err, &fe) || fe.Link != HostIfName(ca0.id) || fe.Owner != "a" {
		t.Errorf("EnsureEndpoint of a's endpoint by b: %v, want the foreign error on %s", err, HostIfName(ca0.id))
	}
	ghost := Peer{VNI: vniA, IP: addr("10.60.0.99"), MAC: MACFromIP(addr("10.60.0.99")), VTEP: h1.Addr}
	if err := b0.AddPeer(ctx, ghost); err != nil {
		t.Errorf("AddPeer by b on a's VNI: %v", err)
	}
	if err := b0.DeletePeer(ctx, ca1.peers()[0]); err != nil {
		t.Errorf("DeletePeer by b on a's VNI: %v", err)
	}
	if err := b0.DeleteEndpoint(ctx, ca0.id); err != nil {
		t.Errorf("DeleteEndpoint of a's endpoint by b: %v", err)
	}
	if err := b0.DeleteNetwork(ctx, vniA); err != nil {
		t.Errorf("DeleteNetwork of a's VNI by b: %v", err)
	}
	sameState(t, "a after b's calls on its names", snapshot(t, h0, "a"), snapA)
	mustPing(t, ca0.ns, addr("10.60.0.3"))

	// b's empty reconcile removes all of b and nothing of a.
	ch, err := b0.Reconcile(ctx, State{})
	if err != nil {
		t.Fatal(err)
	}
	if ch.Links != 3 || ch.Rules != 10 {
		t.Errorf("b's empty reconcile changed %+v, want its 3 links and 10 rules (3 FORWARD and 1 NOTRACK per command, its underlay filter's RETURN and DROP)", ch)
	}
	if s := snapshot(t, h0, "b"); len(s.Links)+len(s.Rules) != 0 {
		t.Errorf("b left %+v", s)
	}
	sameState(t, "a after b's empty reconcile", snapshot(t, h0, "a"), snapA)
	mustPing(t, ca0.ns, addr("10.60.0.3"))
	for _, cmd := range []string{"iptables", "ip6tables"} {
		checkForwardJumps(t, h0, cmd, 0, "after b's empty reconcile (the shared jumps stay)")
	}

	// Now b may take the VNI a gives up, and a's reconcile leaves it.
	if _, err := a0.Reconcile(ctx, State{}); err != nil {
		t.Fatal(err)
	}
	if _, err := b0.EnsureNetwork(ctx, netA); err != nil {
		t.Fatalf("EnsureNetwork of a freed VNI by b: %v", err)
	}
	snapB = snapshot(t, h0, "b")
	if ch, err := a0.Reconcile(ctx, State{}); err != nil || ch != (Changes{}) {
		t.Errorf("a's empty reconcile with b's network on its old VNI: changes %+v, error %v", ch, err)
	}
	sameState(t, "b after a's reconcile", snapshot(t, h0, "b"), snapB)
}

// A plugin from before owners existed left links with the plain alias and
// uncommented rules: the default owner keeps reconciling them in place
// (same links, rules swapped for commented ones without a gap), removes
// its old strays, and an instance with an owner leaves them alone.
func TestOwnerUpgrade(t *testing.T) {
	t.Parallel()
	h := newHosts(t, 1, testenv.UnderlayOptions{})[0]
	ctx := t.Context()
	hh := h.NS.Handle()
	const vni, stray = 0x300, 0x301
	n := Network{VNI: vni}
	// What the old plugin made: links with alias consul-overlay and rules
	// without comments.
	mk := func(l netlink.Link) {
		t.Helper()
		if err := hh.LinkAdd(l); err != nil {
			t.Fatalf("add %s: %v", l.Attrs().Name, err)
		}
		if err := hh.LinkSetAlias(l, OwnerAlias); err != nil {
			t.Fatal(err)
		}
	}
	mk(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: BridgeName(vni), MTU: 1450}})
	br := link(t, h, BridgeName(vni))
	mk(&netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: VXLANName(vni), MTU: 1450, MasterIndex: br.Attrs().Index}, VxlanId: vni, SrcAddr: h.Addr.AsSlice(), Port: DefaultPort, Proxy: true})
	mk(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: BridgeName(stray)}})
	for _, cmd := range []string{"iptables", "ip6tables"} {
		iptables(t, h, cmd, "-N", FirewallChain)
		iptables(t, h, cmd, "-I", "FORWARD", "1", "-j", FirewallChain)
		for _, br := range []string{BridgeName(vni), BridgeName(stray)} {
			iptables(t, h, cmd, "-A", FirewallChain, "-i", br, "-o", br, "-j", "ACCEPT")
			iptables(t, h, cmd, "-A", FirewallChain, "-o", br, "-j", "DROP")
			iptables(t, h, cmd, "-A", FirewallChain, "-i", br, "-j", "DROP")
		}
	}
	idx := map[string]int{}
	for _, name := range []string{BridgeName(vni), VXLANName(vni)} {
		idx[name] = link(t, h, name).Attrs().Index
	}

	// An instance with an owner: not its links, not its rules.
	other := h.manager(t, "x")
	if ch, err := other.Reconcile(ctx, State{}); err != nil || ch != (Changes{}) {
		t.Errorf("owner x's empty reconcile: changes %+v, error %v", ch, err)
	}
	_, err := other.EnsureNetwork(ctx, n)
	var fe *ForeignLinkError
	if !errors.As(err, &fe) || fe.Owner != "" || !strings.Contains(err.Error(), "belongs to the default consul-overlay instance") {
		t.Errorf("owner x ensuring a legacy network: %v, want the foreign error naming the default owner", err)
	}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if got := len(fwRules(t, h, cmd)); got != 6 {
			t.Errorf("%s: %d rules after owner x's calls, want the 6 legacy ones", cmd, got)
		}
	}

	// The default owner, upgraded.
	ch, err := h.m.Reconcile(ctx, State{Networks: []Network{n}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("upgrade changes: %+v", ch)
	for name, i := range idx {
		if got := link(t, h, name).Attrs().Index; got != i {
			t.Errorf("%s replaced (index %d, was %d), want it kept", name, got, i)
		}
	}
	if names := linkNames(t, h); !slices.Equal(names, []string{"vx-000300", "vxbr-000300"}) {
		t.Errorf("links after upgrade %v, want the stray gone", names)
	}
	for _, cmd := range []string{"iptables", "ip6tables"} {
		accept, drops := forwardRules(OwnerAlias)
		var want []string
		for _, r := range append([][]string{accept}, drops...) {
			want = append(want, "-A "+FirewallChain+" "+strings.Join(r, " "))
		}
		if got := fwRules(t, h, cmd); !slices.Equal(got, want) {
			t.Errorf("%s rules after upgrade:\n%s\nwant:\n%s", cmd, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		// The old plugin's unconditional jump made way for ours.
		checkForwardJumps(t, h, cmd, 0, "after upgrade")
		if fwd := iptables(t, h, cmd, "-S", "FORWARD"); strings.Contains(fwd, "-A FORWARD -j "+FirewallChain+"\n") {
			t.Errorf("%s: the old plugin's jump kept after upgrade:\n%s", cmd, fwd)
		}
	}
	if ch, err := h.m.Reconcile(ctx, State{Networks: []Network{n}}); err != nil || ch != (Changes{}) {
		t.Errorf("second reconcile after upgrade: changes %+v, error %v", ch, err)
	}
}

// With KeepStrays, Reconcile ensures what is listed and removes nothing:
// not an unlisted network, nor entries of a listed one that a restarted
// instance does not know, nor rules. Without it the same list removes the
// unlisted network.
func TestReconcileKeepStrays(t *testing.T) {
	t.Parallel()
	h := newHosts(t, 1, testenv.UnderlayOptions{})[0]
	ctx := t.Context()
	m := h.manager(t, "k")
	n1, n2 := Network{VNI: 0x401}, Network{VNI: 0x402}
	p1 := Peer{VNI: n1.VNI, IP: addr("10.80.0.3"), MAC: MACFromIP(addr("10.80.0.3")), VTEP: addr("192.0.2.2")}
	p2 := Peer{VNI: n2.VNI, IP: addr("10.81.0.3"), MAC: MACFromIP(addr("10.81.0.3")), VTEP: addr("192.0.2.2")}
	for _, n := range []Network{n1, n2} {
		if _, err := m.EnsureNetwork(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []Peer{p1, p2} {
		if err := m.AddPeer(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	ep := Endpoint{ID: strings.Repeat("cd", 32), VNI: n2.VNI, MAC: MACFromIP(addr("10.81.0.2"))}
	if _, err := m.EnsureEndpoint(ctx, ep); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, h, "k")
	if len(before.Links) != 6 || len(before.Entries) != 2 || len(before.Rules) != 6 {
		t.Fatalf("setup: %+v", before)
	}

	// A restarted instance that lists only n1, without its peer.
	restarted := h.manager(t, "k")
	if vnis, err := restarted.OwnedNetworks(); err != nil || !slices.Equal(vnis, []uint32{n1.VNI, n2.VNI}) {
		t.Errorf("OwnedNetworks %v (%v)", vnis, err)
	}
	ch, err := restarted.Reconcile(ctx, State{Networks: []Network{n1}, KeepStrays: true})
	if err != nil {
		t.Fatal(err)
	}
	if ch != (Changes{}) {
		t.Errorf("KeepStrays reconcile changed %+v", ch)
	}
	sameState(t, "after KeepStrays reconcile", snapshot(t, h, "k"), before)

	// A listed peer is added; the unknown one stays.
	p1b := Peer{VNI: n1.VNI, IP: addr("10.80.0.4"), MAC: MACFromIP(addr("10.80.0.4")), VTEP: addr("192.0.2.3")}
	if _, err := restarted.Reconcile(ctx, State{Networks: []Network{n1}, Peers: []Peer{p1b}, KeepStrays: true}); err != nil {
		t.Fatal(err)
	}
	e := entries(t, h, n1.VNI)
	for _, want := range []string{"10.80.0.3 " + p1.MAC.String(), "10.80.0.4 " + p1b.MAC.String()} {
		if !slices.Contains(e.neigh, want) {
			t.Errorf("neighbour %q missing after KeepStrays reconcile with a new peer: %v", want, e.neigh)
		}
	}

	// Without KeepStrays the list is the truth.
	if _, err := restarted.Reconcile(ctx, State{Networks: []Network{n1}, Peers: []Peer{p1b}}); err != nil {
		t.Fatal(err)
	}
	if names := linkNames(t, h); !slices.Equal(names, []string{"vx-000401", "vxbr-000401"}) {
		t.Errorf("links after a full reconcile %v", names)
	}
	if e := entries(t, h, n1.VNI); !slices.Equal(e.neigh, []string{"10.80.0.4 " + p1b.MAC.String()}) {
		t.Errorf("neighbours after a full reconcile %v", e.neigh)
	}
	if vnis, err := restarted.OwnedNetworks(); err != nil || !slices.Equal(vnis, []uint32{n1.VNI}) {
		t.Errorf("OwnedNetworks after a full reconcile %v (%v)", vnis, err)
	}
}

// EndpointInUse is true exactly while the container end is in another
// namespace.
func TestEndpointInUse(t *testing.T) {
	inLayouts(t, true, testEndpointInUse)
}

func testEndpointInUse(t *testing.T, dp bool) {
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	ctx := t.Context()
	const vni = 0x500
	if _, err := h.m.EnsureNetwork(ctx, Network{VNI: vni}); err != nil {
		t.Fatal(err)
	}
	inUse := func(what, id string, want bool) {
		t.Helper()
		got, err := h.m.EndpointInUse(id)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if got != want {
			t.Errorf("%s: EndpointInUse %v, want %v", what, got, want)
		}
		// EndpointsInUse lists exactly the endpoints in use.
		keys, err := h.m.EndpointsInUse()
		if err != nil {
			t.Fatalf("%s: EndpointsInUse: %v", what, err)
		}
		if slices.Contains(keys, id[:10]) != want || (!want && len(keys) != 0) {
			t.Errorf("%s: EndpointsInUse %v, want %s listed: %v", what, keys, id[:10], want)
		}
		// NetworksInUse lists them under the overlay whose bridge they are
		// ports of.
		byVNI, err := h.m.NetworksInUse()
		if err != nil {
			t.Fatalf("%s: NetworksInUse: %v", what, err)
		}
		if slices.Contains(byVNI[vni], id[:10]) != want || (!want && len(byVNI) != 0) {
			t.Errorf("%s: NetworksInUse %v, want %s listed under vni %d: %v", what, byVNI, id[:10], vni, want)
		}
	}
	idle := Endpoint{ID: strings.Repeat("ef", 32), VNI: vni, MAC: MACFromIP(addr("10.90.0.9"))}
	inUse("no links", idle.ID, false)
	if _, err := h.m.EnsureEndpoint(ctx, idle); err != nil {
		t.Fatal(err)
	}
	inUse("pair in the host namespace", idle.ID, false)

	c := h.run(t, vni, []netip.Prefix{pfx("10.90.0.2/24")})
	inUse("container end moved into a container", c.id, true)
	// The same endpoint seen by another owner's instance: still in use.
	if got, err := h.manager(t, "o").EndpointInUse(c.id); err != nil || !got {
		t.Errorf("EndpointInUse from another owner: %v, %v; want true", got, err)
	}

	// Moved back (as Docker does on leave): not in use.
	if err := testenv.MoveBack(c.ns, h.NS, "eth0", ContainerIfName(c.id)); err != nil {
		t.Fatal(err)
	}
	inUse("container end moved back", c.id, false)
	if err := h.m.DeleteEndpoint(ctx, c.id); err != nil {
		t.Fatal(err)
	}
	inUse("deleted", c.id, false)
	if _, err := h.m.EndpointInUse("short"); err == nil {
		t.Error("EndpointInUse of an invalid id: no error")
	}
}
