package reaper

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"

	"consul-overlay/cluster"
	"consul-overlay/ipam"
)

// LocalEndpoint is an endpoint this host's kernel runs (a joined
// container's).
type LocalEndpoint struct {
	ID      string
	Network string // for messages
	Addrs   []netip.Addr
}

// HostRecorder tells whether a host's members/<id> record exists
// (*cluster.Cluster).
type HostRecorder interface {
	HostRecorded(ctx context.Context, hostID string) (bool, error)
}

// AddressOwner tells who holds an address (*ipam.Driver).
type AddressOwner interface {
	AddressHolder(ctx context.Context, a netip.Addr) (poolID, holder, endpoint string, err error)
}

var (
	_ HostRecorder = (*cluster.Cluster)(nil)
	_ AddressOwner = (*ipam.Driver)(nil)
)

// Conflict is an address of a local endpoint that another host holds now.
type Conflict struct {
	Endpoint string
	Network  string
	Addr     netip.Addr
	Pool     string
	// Holder is the other host's ID (or the holders of a shared address),
	// HolderEndpoint its endpoint.
	Holder         string
	HolderEndpoint string
}

// SelfReport is what CheckSelf found.
type SelfReport struct {
	// Evicted: the store has no members/<host-id> of this host while it
	// runs endpoints: it was reaped while it was away.
	Evicted bool
	// Free are local endpoints' addresses that no host holds: this host
	// may take them again.
	Free []netip.Addr
	// Held are those still held by this host.
	Held []netip.Addr
	// Conflicts are those another host holds now.
	Conflicts []Conflict
}

// CheckSelf tells whether host hostID was evicted while it was away (a
// partition longer than the grace period) although its kernel still runs
// the endpoints local, and, for each of their addresses, whether it is
// still this host's, free, or another host's. Each conflict is logged at
// error level, naming the address and the other holder: two containers
// would answer for one address. Run it at start and whenever the host's
// claim is regained.
func CheckSelf(ctx context.Context, hostID, node string, cl HostRecorder, ip AddressOwner, local []LocalEndpoint, log *slog.Logger) (SelfReport, error) {
	var rep SelfReport
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(local) == 0 {
		return rep, nil
	}
	ok, err := cl.HostRecorded(ctx, hostID)
	if err != nil {
		return rep, fmt.Errorf("check whether this host was evicted: %w", err)
	}
	rep.Evicted = !ok
	for _, ep := range local {
		for _, a := range ep.Addrs {
			if !a.IsValid() {
				continue
			}
			pool, holder, hep, err := ip.AddressHolder(ctx, a)
			if err != nil {
				return rep, fmt.Errorf("check address %s of endpoint %s: %w", a, ep.ID, err)
			}
			switch {
			case holder == hostID:
				rep.Held = append(rep.Held, a)
			case holder == "":
				rep.Free = append(rep.Free, a)
			default:
				c := Conflict{Endpoint: ep.ID, Network: ep.Network, Addr: a, Pool: pool, Holder: holder, HolderEndpoint: hep}
				rep.Conflicts = append(rep.Conflicts, c)
				log.Error("address conflict: a container of this host runs with an address another host holds now (this host was evicted while it was away); stop or reconnect this container, or the other one",
					"host", hostID, "node", node, "address", a, "endpoint", ep.ID, "network", ep.Network, "pool", pool,
					"other_host", holder, "other_endpoint", hep)
			}
		}
	}
	if rep.Evicted {
		log.Error("this host was evicted from the cluster while it was away (no session for longer than the grace period): its memberships, endpoint records and services are gone while its containers still run; other hosts no longer reach them until this host re-asserts them (Reassert)",
			"host", hostID, "node", node, "endpoints", len(local), "addresses_free", len(rep.Free), "addresses_taken_by_others", len(rep.Conflicts))
	}
	return rep, nil
}
