package driver

import (
	"net/netip"
	"strconv"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/discovery"
)

// routeConnected is libnetwork's RouteType of a route without a next hop,
// bound to the endpoint's interface.
const routeConnected = 1

// consulAPI tells whether the network was created with -o consul_api=true.
func consulAPI(rec cluster.Network) bool {
	v, _ := strconv.ParseBool(rec.Options[optConsulAPI])
	return v
}

// linkLocalRoute is the connected route to the well-known address that
// Join gives the endpoint (ep.rec.IPv4 is its source), or nil: no address
// set, an IPv6-only endpoint, or a sandbox that already has the route
// through another consul-overlay endpoint. libnetwork adds the route with
// RouteAdd, which fails for a second route to the same /32 and would fail
// the container's second network; so the first endpoint of a sandbox
// (container) carries it, and the address is reached through that
// network: its consul_api setting is the one that counts. The sandbox is
// recorded on the endpoint here, under d.mu, so two Joins of one sandbox
// cannot both take it.
func (d *Driver) linkLocalRoute(ep *localEndpoint, sandboxKey string) *network.StaticRoute {
	if !d.cfg.LinkLocal.IsValid() {
		return nil
	}
	sandbox := discovery.ContainerIDFromSandboxKey(sandboxKey)
	d.mu.Lock()
	defer d.mu.Unlock()
	if ep.rec.IPv4 == "" {
		return nil
	}
	if sandbox != "" {
		for _, other := range d.endpoints {
			if other != ep && !other.left && other.rec.Sandbox == sandbox && other.rec.IPv4 != "" {
				d.log.Info("the container reaches the link-local address through its first consul-overlay network", "endpoint", short(ep.rec.ID), "through", short(other.rec.ID))
				return nil
			}
		}
		ep.rec.Sandbox = sandbox
	}
	ep.linkLocal = true
	return &network.StaticRoute{Destination: netip.PrefixFrom(d.cfg.LinkLocal, 32).String(), RouteType: routeConnected}
}
