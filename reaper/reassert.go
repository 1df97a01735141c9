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
	ReassertPool(ctx context.Context, want ipam.PoolHolds) (string, error)
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
// still run: for each local network, its pool and gateway holds (as many
// as its bound Docker networks took, see reassertPools), its
// membership under each Docker network ID (the network is created again,
// with its VNI, if no host has it now), and for each endpoint whose
// addresses are still free or this host's, its addresses and its record.
// An endpoint whose address another host holds now is not recorded again:
// the conflict is logged at error level, naming the address and the other
// holder, and reported. Every step is idempotent (a replayed join, an
// existing record, an address this host holds change nothing), so it is
// safe to run whenever CheckSelf or CheckRecords finds something missing.
// Each write is made through held (see Holder), so nothing removed since
// local was read is written back. Errors of one network do not stop the
// others; they are joined.
func Reassert(ctx context.Context, hostID, node string, cl Rejoiner, ip Reclaimer, held Holder, local []LocalNetwork, log *slog.Logger) (Reasserted, error) {
	var out Reasserted
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("host", hostID, "node", node)
	var errs []error
	specs := make([]cluster.NetworkSpec, len(local))
	valid := make([]bool, len(local))
	for i, ln := range local {
		spec, err := specOf(ln.Network)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		specs[i], valid[i] = spec, true
	}
	pools, err := reassertPools(ctx, ip, held, local, specs, valid, log)
	if err != nil {
		errs = append(errs, err)
	}
	for i, ln := range local {
		n := ln.Network
		spec := specs[i]
		if !valid[i] {
			continue
		}
		// This network's pools by subnet.
		netPools := map[netip.Prefix]string{}
		for j, s := range spec.Subnets {
			id := pools[poolKeyOf(spec, j)]
			if id == "" {
				log.Info("not re-asserting a network whose pool is not held", "network", netName(n), "subnet", s)
				break
			}
			netPools[s.Masked()] = id
		}
		if len(netPools) != len(spec.Subnets) {
			continue
		}
		ids := slices.Clone(ln.NetworkIDs)
		slices.Sort(ids)
		joined := false
		for _, id := range ids {
			bound, err := whileBound(held, id, func() error {
				_, err := cl.Join(ctx, n.Key, id, spec)
				return err
			})
			if !bound {
				log.Info("not re-asserting a network removed since the check", "network", netName(n), "network_id", id)
				continue
			}
			if err != nil {
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
		for _, ep := range ln.Endpoints {
			var c *Conflict
			running, err := whileJoined(held, ep.ID, func() error {
				var err error
				c, err = reassertEndpoint(ctx, cl, ip, n, netPools, ep)
				return err
			})
			switch {
			case !running:
				log.Info("not re-asserting an endpoint removed since the check", "endpoint", ep.ID, "network", netName(n))
			case err != nil:
				log.Error("cannot re-assert a running endpoint", "endpoint", ep.ID, "network", netName(n), "error", err)
				errs = append(errs, err)
			case c != nil:
				out.Conflicts = append(out.Conflicts, *c)
				log.Error("address conflict: a container of this host runs with an address another host holds now (this host was evicted while it was away); its endpoint is not recorded again: stop or reconnect this container, or the other one",
					"address", c.Addr, "endpoint", ep.ID, "network", netName(n), "pool", c.Pool, "other_host", c.Holder, "other_endpoint", c.HolderEndpoint)
			default:
				out.Endpoints++
			}
		}
		log.Info("re-asserted a running network", "network", netName(n), "vni", n.VNI, "networks", ids, "endpoints", len(ln.Endpoints))
	}
	return out, errors.Join(errs...)
}

// reassertEndpoint takes ep's addresses again from their pools (pools: by
// subnet) and records it in network n. An address another host holds now
// is returned as a conflict, and ep is not recorded.
func reassertEndpoint(ctx context.Context, cl Rejoiner, ip Reclaimer, n cluster.Network, pools map[netip.Prefix]string, ep cluster.Endpoint) (*Conflict, error) {
	for _, cidr := range []string{ep.IPv4, ep.IPv6} {
		if cidr == "" {
			continue
		}
		p, err := netip.ParsePrefix(cidr)
		if err != nil {
			return nil, fmt.Errorf("re-assert endpoint %s: address %q: %w", ep.ID, cidr, err)
		}
		poolID := pools[p.Masked()]
		if poolID == "" {
			return nil, fmt.Errorf("re-assert endpoint %s: address %s is in no subnet of network %s", ep.ID, p, n.Label())
		}
		err = ip.ReassertAddress(ctx, poolID, p.Addr(), ep.MAC)
		if errors.Is(err, ipam.ErrAddressInUse) {
			_, holder, hep, _ := ip.AddressHolder(ctx, p.Addr())
			return &Conflict{Endpoint: ep.ID, Network: n.Key, Addr: p.Addr(), Pool: poolID, Holder: holder, HolderEndpoint: hep}, nil
		}
		if err != nil {
			return nil, fmt.Errorf("re-assert endpoint %s: %w", ep.ID, err)
		}
	}
	ep.NetworkKey = n.Key
	if _, err := cl.CreateEndpoint(ctx, ep); err != nil {
		return nil, fmt.Errorf("re-assert endpoint %s: record in network %s: %w", ep.ID, n.Label(), err)
	}
	return nil, nil
}

// poolKey names a pool: its address space ("" resolved) and subnet.
type poolKey struct {
	space  string
	subnet netip.Prefix
}

// poolKeyOf is the pool of spec's subnet i.
func poolKeyOf(spec cluster.NetworkSpec, i int) poolKey {
	space := ""
	if i < len(spec.Spaces) {
		space = spec.Spaces[i]
	}
	if space == "" {
		space = ipam.LocalAddressSpace
	}
	return poolKey{space: space, subnet: spec.Subnets[i].Masked()}
}

// reassertPools takes again the pool and gateway holds of the local
// networks that are still bound, as many as they use: one per Docker
// network on a pool (two networks on one subnet hold it twice), and one
// per network using a gateway. Network create and delete are held off
// meanwhile (Holder.WhileBoundAll), so a network removed since local was
// read is not counted. Docker's IPAM calls come outside the driver's: a
// network whose release came before its DeleteNetwork is still counted
// (a hold too many, which SweepPools drops), one whose RequestPool came
// before its CreateNetwork is not (its hold is taken for another network:
// a hold too few, which that CreateNetwork takes, see the driver's
// Config.HoldPool), and one unbound whose releases come after it (an
// engine that releases after DeleteNetwork) is not counted either: the
// IPAM ignores those releases where they would leave fewer holds than the
// networks with endpoints on the pool use (ipam Config.Kept). It returns
// each pool's ID; a pool that could not be held is missing, its error
// logged and joined.
func reassertPools(ctx context.Context, ip Reclaimer, held Holder, local []LocalNetwork, specs []cluster.NetworkSpec, valid []bool, log *slog.Logger) (map[poolKey]string, error) {
	var ids []string
	for i, ln := range local {
		if valid[i] {
			ids = append(ids, ln.NetworkIDs...)
		}
	}
	pools := map[poolKey]string{}
	var errs []error
	err := whileBoundAll(held, ids, func(bound []string) error {
		isBound := map[string]bool{}
		for _, id := range bound {
			isBound[id] = true
		}
		want := map[poolKey]*ipam.PoolHolds{}
		var keys []poolKey
		for i, ln := range local {
			if !valid[i] {
				continue
			}
			nets := 0
			for _, id := range ln.NetworkIDs {
				if isBound[id] {
					nets++
				}
			}
			if nets == 0 {
				continue
			}
			spec := specs[i]
			for j, s := range spec.Subnets {
				k := poolKeyOf(spec, j)
				w := want[k]
				if w == nil {
					w = &ipam.PoolHolds{Space: k.space, Subnet: k.subnet, Gateways: map[netip.Addr]int{}}
					want[k] = w
					keys = append(keys, k)
				}
				w.Holds += nets
				for _, g := range spec.Gateways {
					if s.Contains(g.Addr()) {
						w.Gateways[g.Addr()] += nets
					}
				}
			}
		}
		for _, k := range keys {
			id, err := ip.ReassertPool(ctx, *want[k])
			if err != nil {
				log.Error("cannot take this host's pool of a running network again", "space", k.space, "subnet", k.subnet, "holds", want[k].Holds, "error", err)
				errs = append(errs, fmt.Errorf("re-assert pool %s: %w", k.subnet, err))
				continue
			}
			pools[k] = id
		}
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	return pools, errors.Join(errs...)
}

// Holder keeps what Reassert writes back in step with what still runs
// (*driver.Driver): a membership is written only while its Docker network
// is bound, an endpoint's addresses and record only while it is joined,
// and the driver holds off their removal meanwhile. The local state
// Reassert is given was read before; a `docker network rm` or `docker rm`
// since would otherwise leave a membership, a record and an address that
// nobody removes.
type Holder interface {
	WhileBound(networkID string, fn func() error) (bound bool, err error)
	// WhileBoundAll runs fn with those of networkIDs that are bound, with
	// network create and delete held off.
	WhileBoundAll(networkIDs []string, fn func(bound []string) error) error
	WhileJoined(endpointID string, fn func() error) (joined bool, err error)
}

// whileBound runs fn through h, or at once when h is nil.
func whileBound(h Holder, networkID string, fn func() error) (bool, error) {
	if h == nil {
		return true, fn()
	}
	return h.WhileBound(networkID, fn)
}

// whileBoundAll runs fn through h, or at once with every ID when h is
// nil.
func whileBoundAll(h Holder, networkIDs []string, fn func(bound []string) error) error {
	if h == nil {
		return fn(networkIDs)
	}
	return h.WhileBoundAll(networkIDs, fn)
}

// whileJoined runs fn through h, or at once when h is nil.
func whileJoined(h Holder, endpointID string, fn func() error) (bool, error) {
	if h == nil {
		return true, fn()
	}
	return h.WhileJoined(endpointID, fn)
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
