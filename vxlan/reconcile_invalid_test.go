package vxlan

import (
	"net/netip"
	"testing"

	"consul-overlay/internal/testenv"
)

// Reconcile removes only what the desired state does not mention. An
// endpoint the desired state lists but that fails validation (a record
// without a usable MAC, or whose network entry was rejected) is reported
// in the error and must not be removed as a stray: a running container
// holds its veth pair. (It was.)
func TestReconcileKeepsListedInvalidEndpoint(t *testing.T) {
	inLayouts(t, true, testReconcileKeepsListedInvalidEndpoint)
}

func testReconcileKeepsListedInvalidEndpoint(t *testing.T, dp bool) {
	ctx := t.Context()
	h := newHostsIn(t, 1, testenv.UnderlayOptions{}, dp)[0]
	n := Network{VNI: 0x7d1, Gateways: []netip.Prefix{pfx("10.75.0.1/24")}}
	if _, err := h.m.EnsureNetwork(ctx, n); err != nil {
		t.Fatal(err)
	}
	c := h.run(t, n.VNI, []netip.Prefix{pfx("10.75.0.2/24")})
	mustPing(t, c.ns, addr("10.75.0.1"))
	if inUse, err := h.m.EndpointInUse(c.id); err != nil || !inUse {
		t.Fatalf("EndpointInUse %t %v", inUse, err)
	}
	_, err := h.m.Reconcile(ctx, State{
		Networks:  []Network{n},
		Endpoints: []Endpoint{{ID: c.id, VNI: n.VNI, MAC: nil}}, // listed, but its MAC is missing
	})
	t.Logf("Reconcile error (expected, the endpoint is invalid): %v", err)
	if where := inNS(t, h, HostIfName(c.id)); where == "" {
		t.Errorf("the veth of endpoint %s, listed in the desired state and used by a running container, was removed", endpointKey(c.id))
	}
	if out, err := ping(t, c.ns, addr("10.75.0.1"), 2); err != nil {
		t.Errorf("container lost its network: %v\n%s", err, out)
	}
}
