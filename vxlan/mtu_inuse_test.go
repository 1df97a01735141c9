package vxlan

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"testing"

	"consul-overlay/internal/testenv"
)

// records is a slog handler that keeps the records it passes on.
type records struct {
	slog.Handler
	mu   *sync.Mutex
	list *[]slog.Record
}

func newRecords(next slog.Handler) *records {
	return &records{Handler: next, mu: &sync.Mutex{}, list: &[]slog.Record{}}
}

func (r *records) Handle(ctx context.Context, rec slog.Record) error {
	r.mu.Lock()
	*r.list = append(*r.list, rec.Clone())
	r.mu.Unlock()
	return r.Handler.Handle(ctx, rec)
}

func (r *records) WithAttrs(as []slog.Attr) slog.Handler {
	return &records{Handler: r.Handler.WithAttrs(as), mu: r.mu, list: r.list}
}

func (r *records) WithGroup(name string) slog.Handler {
	return &records{Handler: r.Handler.WithGroup(name), mu: r.mu, list: r.list}
}

// at returns the attributes of the records at level, as strings.
func (r *records) at(level slog.Level) []map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []map[string]string
	for _, rec := range *r.list {
		if rec.Level != level {
			continue
		}
		attrs := map[string]string{"msg": rec.Message}
		rec.Attrs(func(a slog.Attr) bool {
			attrs[a.Key] = a.Value.String()
			return true
		})
		out = append(out, attrs)
	}
	return out
}

// Lowering a network's MTU while a running container's veth is on its
// bridge keeps the bridge's and the VXLAN device's MTU (the container's
// end keeps the larger one, whose frames the bridge would drop), says so
// at error level, and reports the MTU in force. Once no container uses
// the network, the lower MTU takes effect.
// In both layouts: in the data-plane layout the veth's container end is
// looked for in the host's namespace.
func TestMTULoweredInUse(t *testing.T) {
	inLayouts(t, true, testMTULoweredInUse)
}

func testMTULoweredInUse(t *testing.T, dp bool) {
	th := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	rec := newRecords(testLogger(t).Handler())
	h := &testHost{Host: th.Host, dp: th.dp}
	h.m = th.managerLog(t, "mtu", slog.New(rec))
	ctx := t.Context()
	const vni = 0x58
	n := Network{VNI: vni, MTU: 1400, Gateways: []netip.Prefix{pfx("10.58.0.1/24")}}
	if _, err := h.m.EnsureNetwork(ctx, n); err != nil {
		t.Fatal(err)
	}
	c := h.run(t, vni, []netip.Prefix{pfx("10.58.0.2/24")})
	mtus := func() [2]int {
		m := [2]int{link(t, h, BridgeName(vni)).Attrs().MTU, link(t, h, VXLANName(vni)).Attrs().MTU}
		if dp { // the gateway pair follows the bridge
			for _, name := range []string{GatewayName(vni), PortName(vni)} {
				if got := link(t, h, name).Attrs().MTU; got != m[0] {
					t.Errorf("%s mtu %d, the bridge's %d", name, got, m[0])
				}
			}
		}
		return m
	}

	n.MTU = 1300
	info, err := h.m.EnsureNetwork(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	if info.MTU != 1400 || mtus() != [2]int{1400, 1400} {
		t.Errorf("lowered under a container: info mtu %d, bridge and vxlan mtu %v; want 1400 kept", info.MTU, mtus())
	}
	errs := rec.at(slog.LevelError)
	if len(errs) != 1 || errs[0]["vni"] != "88" || errs[0]["asked_mtu"] != "1300" || errs[0]["kept_mtu"] != "1400" {
		t.Errorf("error records %v, want one naming vni 88, asked_mtu 1300 and kept_mtu 1400", errs)
	}
	// A new endpoint gets the MTU in force.
	ep, err := h.m.EnsureEndpoint(ctx, Endpoint{ID: "58" + c.id[2:], VNI: vni, MAC: MACFromIP(addr("10.58.0.3"))})
	if err != nil {
		t.Fatal(err)
	}
	if ep.MTU != 1400 {
		t.Errorf("new endpoint's mtu %d, want the 1400 in force", ep.MTU)
	}

	// Its container end never left: no container uses the network once
	// c is gone.
	if err := h.m.DeleteEndpoint(ctx, c.id); err != nil {
		t.Fatal(err)
	}
	info, err = h.m.EnsureNetwork(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	if info.MTU != 1300 || mtus() != [2]int{1300, 1300} {
		t.Errorf("without containers: info mtu %d, bridge and vxlan mtu %v; want 1300", info.MTU, mtus())
	}
}
