package main

import (
	"context"
	"log/slog"
	"net/netip"
	"time"

	"consul-overlay/ipam"
)

// endpointAddresses is what addressInContainer asks the network driver
// (*driver.Driver).
type endpointAddresses interface {
	AddressInContainer(subnet netip.Prefix, a netip.Addr, wait time.Duration) bool
	NetworksOn(space string, subnet netip.Prefix, wait time.Duration) (int, bool)
}

// poolReader reads a pool's holders (*ipam.Driver).
type poolReader interface {
	PoolInfo(ctx context.Context, poolID string) (ipam.Pool, error)
}

// addressInContainer is IPAM's InContainer question (ipam.Config): may a
// running container of this host hold address a of pool poolID? IPAM asks
// it before it grants an address again to a request that names the
// endpoint it was granted to; `docker rename` of a running container
// leaves that name to a new container. The network driver can tell for
// its own endpoints only. A network of another driver using this IPAM
// (macvlan or bridge with --ipam-driver consul-overlay) has endpoints it
// never sees: when the subnet may be such a network's on this host (no
// network of the driver has it, or this host (hostID) holds the pool more
// often than the driver has networks on it), the answer is yes, and the
// request is refused naming the holder, rather than risk handing a
// running container's address out twice. So is it when the pool cannot
// be read.
func addressInContainer(log *slog.Logger, drv endpointAddresses, ip poolReader, hostID, poolID string, a netip.Addr, wait time.Duration) bool {
	space, subnet, _, err := ipam.ParsePoolID(poolID)
	if err != nil || drv == nil {
		return true
	}
	if drv.AddressInContainer(subnet, a, wait) {
		return true
	}
	// The lower of two counts around the read: a network removed meanwhile
	// hides no other driver's network. Counted in the pool's address
	// space, as its holds are.
	count := func() int {
		n, known := drv.NetworksOn(space, subnet, wait)
		if !known {
			return 0 // unknown: taken for another driver's, refused
		}
		return n
	}
	before := count()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, err := ip.PoolInfo(ctx, poolID)
	if err != nil {
		log.Warn("address asked for again: cannot read its pool to tell whether another network driver's container may hold it; refused", "pool", poolID, "address", a, "error", err)
		return true
	}
	nets := min(before, count())
	if held := p.Holders[hostID]; nets == 0 || held > nets {
		log.Warn("address asked for again on a subnet that another network driver's network on this host may use (it uses consul-overlay's IPAM; consul-overlay cannot see its containers): refused, as a running container may hold it (renamed since?)",
			"pool", poolID, "address", a, "pool_holds", held, "consul_overlay_networks", nets)
		return true
	}
	return false
}
