package reaper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"

	"consul-overlay/cluster"
	"consul-overlay/ipam"
)

// LocalNetwork is a logical network this host runs, as its driver knows
// it.
type LocalNetwork struct {
	// Network is the record as the driver last read it: its key, name,
	// VNI, MTU, subnets, spaces, gateways and options are used.
	Network cluster.Network
	// NetworkIDs are this host's Docker networks bound to it.
	NetworkIDs []string
	// Endpoints are the endpoints this host runs on it.
	Endpoints []cluster.Endpoint
}

// Rejoiner re-creates this host's cluster state (*cluster.Cluster).
type Rejoiner interface {
	Join(ctx context.Context, key, networkID string, spec cluster.NetworkSpec) (cluster.Network, error)
	CreateEndpoint(ctx context.Context, ep cluster.Endpoint) (cluster.Endpoint, error)
}

// Reclaimer takes this host's IPAM holds again (*ipam.Driver).
type Reclaimer interface {
	AddressOwner
	ReassertPool(ctx context.Context, space string, subnet netip.Prefix, gateway netip.Addr) (string, error)
	ReassertAddress(ctx context.Context, poolID string, a netip.Addr, mac string) error
}

var (
	_ Rejoiner  = (*cluster.Cluster)(nil)
	_ Reclaimer = (*ipam.Driver)(nil)
)

// Reasserted says what Reassert did.
type Reasserted struct {
	// Networks: memberships (Docker network IDs) joined again or found.
	Networks int
	// Endpoints: endpoint records created again or found.
	Endpoints int
	// Conflicts: addresses another host holds now; their endpoints were
	// not recorded again.
	Conflicts []Conflict
}

// Reassert re-creates the state of a host that was evicted while it was
// away (a partition longer than the grace period) and whose containers
// still run: for each local network, its pool and gateway holds, its
// membership under each Docker network ID (the network is created again,
// with its VNI, if no host has it now), and for each endpoint whose
// addresses are still free or this host's, its addresses and its record.
// An endpoint whose address another host holds now is not recorded again:
// the conflict is logged at error level, naming the address and the other
// holder, and reported. Every step is idempotent (a replayed join, an
// existing record, an address this host holds change nothing), so it is
// safe to run whenever CheckSelf finds something missing. Errors of one
// network do not stop the others; they are joined.
func Reassert(ctx context.Context, hostID, node string, cl Rejoiner, ip Reclaimer, local []LocalNetwork, log *slog.Logger) (Reasserted, error) {
	var out Reasserted
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("host", hostID, "node", node)
	var errs []error
	for _, ln := range local {
		n := ln.Network
		spec, err := specOf(n)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		pools := map[netip.Prefix]string{}
		ok := true
		for i, s := range spec.Subnets {
			space := ""
			if i < len(spec.Spaces) {
				space = spec.Spaces[i]
			}
			var gw netip.Addr
			for _, g := range spec.Gateways {
				if s.Contains(g.Addr()) {
					gw = g.Addr()
				}
			}
			id, err := ip.ReassertPool(ctx, space, s, gw)
			if err != nil {
				log.Error("cannot take this host's pool of a running network again", "network", netName(n), "subnet", s, "gateway", gw, "error", err)
				errs = append(errs, fmt.Errorf("re-assert network %s: pool %s: %w", n.Label(), s, err))
				ok = false
				break
			}
			pools[s] = id
		}
		if !ok {
			continue
		}
		ids := slices.Clone(ln.NetworkIDs)
		slices.Sort(ids)
		joined := false
		for _, id := range ids {
			if _, err := cl.Join(ctx, n.Key, id, spec); err != nil {
				log.Error("cannot join a running network again", "network", netName(n), "vni", n.VNI, "network_id", id, "error", err)
				errs = append(errs, fmt.Errorf("re-assert network %s: %w", n.Label(), err))
				continue
			}
			joined = true
			out.Networks++
		}
		if !joined {
			continue
		}
	endpoints:
		for _, ep := range ln.Endpoints {
			for _, cidr := range []string{ep.IPv4, ep.IPv6} {
				if cidr == "" {
					continue
				}
				p, err := netip.ParsePrefix(cidr)
				if err != nil {
					errs = append(errs, fmt.Errorf("re-assert endpoint %s: address %q: %w", ep.ID, cidr, err))
					continue endpoints
				}
				poolID := pools[p.Masked()]
				if poolID == "" {
					errs = append(errs, fmt.Errorf("re-assert endpoint %s: address %s is in no subnet of network %s", ep.ID, p, n.Label()))
					continue endpoints
				}
				err = ip.ReassertAddress(ctx, poolID, p.Addr(), ep.MAC)
				if errors.Is(err, ipam.ErrAddressInUse) {
					_, holder, hep, _ := ip.AddressHolder(ctx, p.Addr())
					c := Conflict{Endpoint: ep.ID, Network: n.Key, Addr: p.Addr(), Pool: poolID, Holder: holder, HolderEndpoint: hep}
					out.Conflicts = append(out.Conflicts, c)
					log.Error("address conflict: a container of this host runs with an address another host holds now (this host was evicted while it was away); its endpoint is not recorded again: stop or reconnect this container, or the other one",
						"address", p.Addr(), "endpoint", ep.ID, "network", netName(n), "pool", poolID, "other_host", holder, "other_endpoint", hep)
					continue endpoints
				}
				if err != nil {
					errs = append(errs, fmt.Errorf("re-assert endpoint %s: %w", ep.ID, err))
					continue endpoints
				}
			}
			ep.NetworkKey = n.Key
			if _, err := cl.CreateEndpoint(ctx, ep); err != nil {
				log.Error("cannot record a running endpoint again", "endpoint", ep.ID, "network", netName(n), "error", err)
				errs = append(errs, fmt.Errorf("re-assert endpoint %s: %w", ep.ID, err))
				continue
			}
			out.Endpoints++
		}
		log.Info("re-asserted a running network after an eviction", "network", netName(n), "vni", n.VNI, "networks", ids, "endpoints", len(ln.Endpoints))
	}
	return out, errors.Join(errs...)
}

// specOf is the request that re-creates network n as it was.
func specOf(n cluster.Network) (cluster.NetworkSpec, error) {
	s := cluster.NetworkSpec{Name: n.Name, VNI: n.VNI, MTU: n.MTU, Internal: n.Internal, Spaces: slices.Clone(n.Spaces), Options: n.Options}
	for _, v := range n.Subnets {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return s, fmt.Errorf("re-assert network %s: subnet %q: %w", n.Label(), v, err)
		}
		s.Subnets = append(s.Subnets, p)
	}
	for _, v := range n.Gateways {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return s, fmt.Errorf("re-assert network %s: gateway %q: %w", n.Label(), v, err)
		}
		s.Gateways = append(s.Gateways, p)
	}
	return s, nil
}

// netName is how logs name a logical network: its -o name, or its key
// when it has none.
func netName(n cluster.Network) string {
	if n.Name != "" {
		return n.Name
	}
	return n.Key
}
