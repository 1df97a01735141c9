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
	"consul-overlay/kvstore"
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

// RecordReader reads a logical network's records (*cluster.Cluster).
type RecordReader interface {
	Network(ctx context.Context, key string) (cluster.Network, error)
	Endpoints(ctx context.Context, key string) ([]cluster.Endpoint, error)
}

var _ RecordReader = (*cluster.Cluster)(nil)

// Lost is what the store no longer records of this host's running state.
type Lost struct {
	// NetworkIDs are bound Docker networks whose membership is gone.
	NetworkIDs []string
	// Endpoints are joined endpoints whose record is gone.
	Endpoints []string
}

// Empty reports whether nothing is lost.
func (l Lost) Empty() bool { return len(l.NetworkIDs) == 0 && len(l.Endpoints) == 0 }

// CheckRecords compares what this host runs (local, as its driver holds
// it) with what the store records of it: each bound Docker network must
// be in its logical network's membership of this host, and each joined
// endpoint must have its record. What CheckSelf cannot see is found here:
// a record lost while the host record and the addresses stayed (a
// re-assertion that failed on one write, a reap stopped part way, an
// operator's delete). Until it is written again, the other hosts do not
// reach those containers, and a restart cannot tell them from strays. What
// is lost is logged at error level; Reassert writes it again. It reads one
// record and one list per logical network.
func CheckRecords(ctx context.Context, hostID string, cl RecordReader, local []LocalNetwork, log *slog.Logger) (Lost, error) {
	var lost Lost
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	for _, ln := range local {
		key := ln.Network.Key
		rec, err := cl.Network(ctx, key)
		if err != nil && !errors.Is(err, kvstore.ErrNotFound) {
			return Lost{}, fmt.Errorf("check the records of network %s: %w", ln.Network.Label(), err)
		}
		m := rec.Hosts[hostID]
		var gone []string
		for _, id := range ln.NetworkIDs {
			if !slices.Contains(m.NetworkIDs, id) {
				gone = append(gone, id)
			}
		}
		recorded := map[string]bool{}
		if len(ln.Endpoints) != 0 {
			eps, err := cl.Endpoints(ctx, key)
			if err != nil {
				return Lost{}, fmt.Errorf("check the records of network %s: %w", ln.Network.Label(), err)
			}
			for _, ep := range eps {
				if ep.HostID == hostID {
					recorded[ep.ID] = true
				}
			}
		}
		var unrecorded []string
		for _, ep := range ln.Endpoints {
			if !recorded[ep.ID] {
				unrecorded = append(unrecorded, ep.ID)
			}
		}
		if len(gone) == 0 && len(unrecorded) == 0 {
			continue
		}
		log.Error("the store lost records of what this host runs: the other hosts do not reach these containers until they are written again (re-asserting them now)",
			"host", hostID, "network", netName(ln.Network), "network_ids_without_membership", gone, "endpoints_without_record", unrecorded)
		lost.NetworkIDs = append(lost.NetworkIDs, gone...)
		lost.Endpoints = append(lost.Endpoints, unrecorded...)
	}
	return lost, nil
}

// Cluster is what Heal reads and writes of the cluster state
// (*cluster.Cluster).
type Cluster interface {
	HostRecorder
	RecordReader
	Rejoiner
}

var _ Cluster = (*cluster.Cluster)(nil)

// Healed says what Heal found and did.
type Healed struct {
	Self SelfReport
	Lost Lost
	// Reasserted is set when Heal re-asserted this host's state.
	Reasserted *Reasserted
}

// Heal is this host's periodic check of its own state in the store: it
// runs CheckSelf (was this host evicted, are its addresses still its own)
// and, when that finds nothing, CheckRecords (are its memberships and
// endpoint records all there), and re-asserts what runs (Reassert, through
// held) when either finds something missing. local is what the driver
// runs, read just before.
//
// Before it re-asserts anything it calls announce (nil: none), which
// writes this host's record anew (the plugin: kvstore.Claim.Touch). What
// is missing may be missing because a reap of this host is under way (a
// host cut off past the grace period, back in the middle of it): the
// reap's writes are fenced on the host record it judged, so once the
// record changed it stops before its next write, and cannot free
// addresses or remove records Reassert writes back after. Without that, a
// check that ran before the claim wrote the record again re-asserted what
// the reap's next step removed. If announce fails, nothing is re-asserted.
func Heal(ctx context.Context, hostID, node string, cl Cluster, ip Reclaimer, held Holder, announce func(context.Context) error, local []LocalNetwork, log *slog.Logger) (Healed, error) {
	var h Healed
	var eps []LocalEndpoint
	for _, ln := range local {
		for _, ep := range ln.Endpoints {
			le := LocalEndpoint{ID: ep.ID, Network: netName(ln.Network)}
			for _, cidr := range []string{ep.IPv4, ep.IPv6} {
				if p, err := netip.ParsePrefix(cidr); err == nil {
					le.Addrs = append(le.Addrs, p.Addr())
				}
			}
			eps = append(eps, le)
		}
	}
	var err error
	if h.Self, err = CheckSelf(ctx, hostID, node, cl, ip, eps, log); err != nil {
		return h, err
	}
	if !h.Self.Evicted && len(h.Self.Free) == 0 {
		if h.Lost, err = CheckRecords(ctx, hostID, cl, local, log); err != nil || h.Lost.Empty() {
			return h, err
		}
	}
	if announce != nil {
		if err := announce(ctx); err != nil {
			return h, fmt.Errorf("write this host's record before re-asserting its state (a reap of it under way must stop first): %w", err)
		}
	}
	r, err := Reassert(ctx, hostID, node, cl, ip, held, local, log)
	h.Reasserted = &r
	return h, err
}
