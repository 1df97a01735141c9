package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"consul-overlay/kvstore"
)

// MaxVNI is the largest VXLAN network identifier (24 bits).
const MaxVNI = 1<<24 - 1

// maxCASAttempts bounds the compare-and-set retries of one call.
const maxCASAttempts = 32

// Sentinel errors callers branch on with errors.Is.
var (
	// ErrIncompatible: the logical network exists with other settings
	// (subnets, VNI, MTU) than the request, or a subnet or VNI is taken by
	// another logical network. The error says what differs.
	ErrIncompatible = errors.New("incompatible with the cluster's networks")
	// ErrNotMember: this host is not a member of the logical network (or
	// not under that Docker NetworkID).
	ErrNotMember = errors.New("not a member of the logical network")
	// ErrNotOwner: the endpoint record belongs to another host.
	ErrNotOwner = errors.New("endpoint belongs to another host")
	// ErrExists: an endpoint ID is already recorded with other addresses
	// or on another host.
	ErrExists = errors.New("endpoint already exists")
)

// Config configures a Cluster.
type Config struct {
	// HostID identifies this host in the cluster (required): unique,
	// opaque, stable across restarts. Memberships and endpoint records
	// are keyed and compared by it.
	HostID string
	// Node is this host's human-readable name, for messages (zero:
	// HostID).
	Node string
	// VTEP is this host's underlay address, published to peers (required).
	VTEP netip.Addr
	// VNIStart is the first VNI allocated automatically (zero: 4096).
	VNIStart uint32
	// Logger receives info lines for lifecycle events (nil: discard).
	Logger *slog.Logger
	// PeerAudit is how often a peer watch that reads the peer records
	// checks them against the endpoint records (zero: DefaultPeerAudit).
	PeerAudit time.Duration
}

// Cluster is this host's view of, and its writes to, the cluster state in
// the store. It is safe for concurrent use.
type Cluster struct {
	cfg   Config
	log   *slog.Logger
	store kvstore.Store

	mu   sync.Mutex // guards vtep and configs
	vtep netip.Addr
	// configs are the network configs the peer watches last saw, by
	// logical key, with their modify index: CreateEndpoint's first
	// attempt checks against it instead of reading the config again.
	configs map[string]cachedConfig
	// owned are the modify indexes of this host's endpoint records that
	// the peer watches last saw, by store key: DeleteEndpoint's first
	// attempt deletes on it instead of reading the record again.
	owned map[string]uint64
	// own is this host's peer record of each network as last written or
	// seen; peerMu serializes this host's writes to it, by network.
	own    map[string]ownPeers
	peerMu map[string]*sync.Mutex

	// acting: this Cluster acts as another host to evict it (see as);
	// its peer records keep that host's VTEP.
	acting bool

	// hook, when set by tests, runs at named points between two store
	// writes, to interleave another host's calls there.
	hook func(point string)
}

// New returns a Cluster on store.
func New(cfg Config, store kvstore.Store) (*Cluster, error) {
	if cfg.HostID == "" {
		return nil, errors.New("cluster: host ID is required")
	}
	if strings.ContainsAny(cfg.HostID, "/ ") {
		return nil, fmt.Errorf("cluster: host ID %q: no slashes or spaces", cfg.HostID)
	}
	if !cfg.VTEP.IsValid() {
		return nil, errors.New("cluster: VTEP address is required")
	}
	if store == nil {
		return nil, errors.New("cluster: store is required")
	}
	if cfg.Node == "" {
		cfg.Node = cfg.HostID
	}
	if cfg.VNIStart == 0 {
		cfg.VNIStart = 4096
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.PeerAudit <= 0 {
		cfg.PeerAudit = DefaultPeerAudit
	}
	// Every write of a network's config or peer records is stamped, so
	// the peer watches read what changed without checking every record
	// (kvstore/stamp.go).
	store = kvstore.Stamped(store, stampRule)
	return &Cluster{cfg: cfg, log: cfg.Logger, store: store, vtep: cfg.VTEP.Unmap()}, nil
}

// HostID is this host's identity.
func (c *Cluster) HostID() string { return c.cfg.HostID }

// VTEP is the underlay address this host publishes.
func (c *Cluster) VTEP() netip.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.vtep
}

func (c *Cluster) at(point string) {
	if c.hook != nil {
		c.hook(point)
	}
}

// NetworkSpec is what a host asks for when it joins a logical network.
type NetworkSpec struct {
	Name     string         // -o name ("" when keyed by subnet)
	VNI      uint32         // 0: allocate
	MTU      int            // 0: derived from the underlay
	Internal bool           //
	Subnets  []netip.Prefix // IPv4 first
	Gateways []netip.Prefix
	Spaces   []string // IPAM address space of each subnet
	Options  map[string]string
	// Avoid are VNIs an allocated VNI must not be (0 in VNI): the
	// overlays of this host's other networks (the store may have freed
	// their VNIs in a reap) and those it keeps in its kernel for
	// containers of a network it no longer serves. A network other hosts
	// already have keeps its VNI.
	Avoid []uint32
}

// Join adds Docker network networkID of this host to the logical network
// key, creating the network (with a VNI and subnet reservations) if no
// host has it yet. A request that disagrees with the recorded network is
// ErrIncompatible. Joining again with the same ID is success; with another
// ID, the ID is added to the membership (both share the network).
func (c *Cluster) Join(ctx context.Context, key, networkID string, spec NetworkSpec) (Network, error) {
	if networkID == "" {
		return Network{}, errors.New("join logical network: no NetworkID")
	}
	if err := c.ensureHost(ctx); err != nil {
		return Network{}, err
	}
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		if err := ctx.Err(); err != nil {
			return Network{}, err
		}
		pair, err := c.store.Get(ctx, configKey(key))
		if errors.Is(err, kvstore.ErrNotFound) {
			rec, err := c.create(ctx, key, networkID, spec)
			if errors.Is(err, kvstore.ErrConflict) {
				continue // another host created it, or took the VNI: look again
			}
			return rec, err
		}
		if err != nil {
			return Network{}, fmt.Errorf("read logical network %q: %w", key, err)
		}
		var rec Network
		if err := kvstore.Decode(pair.Value, &rec); err != nil {
			return Network{}, fmt.Errorf("logical network %q: %w", key, err)
		}
		if err := checkCompatible(&rec, spec); err != nil {
			return Network{}, err
		}
		m, ok := rec.Hosts[c.cfg.HostID]
		if ok && slices.Contains(m.NetworkIDs, networkID) {
			return rec, nil // replayed request
		}
		if !ok {
			m = Member{Node: c.cfg.Node, Since: time.Now().UTC()}
		} else {
			c.log.Warn("binding another Docker network to a logical network this host has joined", "key", key, "network_ids", m.NetworkIDs, "network_id", networkID)
		}
		m.NetworkIDs = append(slices.Clone(m.NetworkIDs), networkID)
		m.VTEP = c.VTEP().String()
		if rec.Hosts == nil {
			rec.Hosts = map[string]Member{}
		}
		rec.Hosts[c.cfg.HostID] = m
		val, err := kvstore.Encode(rec)
		if err != nil {
			return Network{}, err
		}
		ops := []kvstore.Op{{Verb: kvstore.OpCAS, Key: configKey(key), Value: val, Index: pair.ModifyIndex}}
		if !ok {
			// A new member has no endpoint record of this incarnation
			// yet: its peer record starts empty, with the membership.
			pop, err := c.emptyPeersOp(key, rec.Incarnation)
			if err != nil {
				return Network{}, err
			}
			ops = append(ops, pop)
		}
		c.at("join/before-cas")
		err = c.store.Txn(ctx, ops)
		if errors.Is(err, kvstore.ErrConflict) {
			continue // changed, or removed by the last host leaving it
		}
		if err != nil {
			return Network{}, fmt.Errorf("join logical network %s: %w", rec.Label(), err)
		}
		return rec, nil
	}
	return Network{}, fmt.Errorf("join logical network %q: gave up after %d concurrent updates", key, maxCASAttempts)
}

// ensureHost creates this host's record if it is missing.
func (c *Cluster) ensureHost(ctx context.Context) error {
	_, err := c.store.Get(ctx, hostKey(c.cfg.HostID))
	if err == nil {
		return nil
	}
	if !errors.Is(err, kvstore.ErrNotFound) {
		return fmt.Errorf("read host record %q: %w", c.cfg.HostID, err)
	}
	val, err := kvstore.Encode(Host{HostID: c.cfg.HostID, Node: c.cfg.Node, VTEP: c.VTEP().String(), Created: time.Now().UTC()})
	if err != nil {
		return err
	}
	if err := c.store.Create(ctx, hostKey(c.cfg.HostID), val); err != nil && !errors.Is(err, kvstore.ErrConflict) {
		return fmt.Errorf("record host %q: %w", c.cfg.HostID, err)
	}
	return nil
}

// emptyPeersOp writes this host's peer record of key as empty, for
// incarnation: for a host becoming a member (a record of another
// incarnation, which a crash left, is replaced).
func (c *Cluster) emptyPeersOp(key, incarnation string) (kvstore.Op, error) {
	val := encodePeerRecord(PeerRecord{HostID: c.cfg.HostID, Incarnation: incarnation, VTEP: c.VTEP().String(), Endpoints: []string{}})
	c.forgetOwnPeers(key)
	return kvstore.Op{Verb: kvstore.OpSet, Key: peerRecordKey(key, c.cfg.HostID), Value: val}, nil
}

// checkCompatible refuses a host whose request disagrees with the network
// other hosts already share: the error says what differs and what to do.
func checkCompatible(rec *Network, s NetworkSpec) error {
	want := prefixStrings(s.Subnets)
	if !sameSubnets(rec.Subnets, want) {
		return fmt.Errorf("logical network %s already exists with subnet %s (hosts: %s); this host asked for %s: use the same --subnet, or another -o name: %w",
			rec.Label(), strings.Join(rec.Subnets, ", "), rec.hostNames(), strings.Join(want, ", "), ErrIncompatible)
	}
	if s.VNI != 0 && s.VNI != rec.VNI {
		return fmt.Errorf("logical network %s uses vni %d; this host asked for vni %d: drop -o vni or use %d: %w", rec.Label(), rec.VNI, s.VNI, rec.VNI, ErrIncompatible)
	}
	if s.MTU != rec.MTU {
		have := "derived from the underlay"
		if rec.MTU != 0 {
			have = strconv.Itoa(rec.MTU)
		}
		asked := "none"
		if s.MTU != 0 {
			asked = strconv.Itoa(s.MTU)
		}
		return fmt.Errorf("logical network %s has mtu %s; this host asked for %s: every host must use the same -o mtu: %w", rec.Label(), have, asked, ErrIncompatible)
	}
	return nil
}

// create creates a new incarnation of logical network key with this host
// as its only member: the config, its VNI and its subnet reservations in
// one transaction. ErrConflict means another host won a race; the caller
// looks again.
func (c *Cluster) create(ctx context.Context, key, networkID string, s NetworkSpec) (Network, error) {
	rec := Network{
		Key: key, Name: s.Name, Incarnation: newIncarnation(), MTU: s.MTU, Internal: s.Internal,
		Subnets: prefixStrings(s.Subnets), Spaces: slices.Clone(s.Spaces), Options: s.Options,
		Hosts: map[string]Member{c.cfg.HostID: {
			Node: c.cfg.Node, NetworkIDs: []string{networkID}, VTEP: c.VTEP().String(), Since: time.Now().UTC(),
		}},
		Created: time.Now().UTC(),
	}
	for _, g := range s.Gateways {
		rec.Gateways = append(rec.Gateways, g.String())
	}
	if err := c.checkSubnetsFree(ctx, key, s.Subnets); err != nil {
		return rec, err
	}
	vni := s.VNI
	if vni != 0 {
		if owner, err := c.VNIOwner(ctx, vni); err != nil {
			return rec, err
		} else if owner != "" && owner != key {
			return rec, fmt.Errorf("vni %d is taken by logical network %q: choose another -o vni or leave it out: %w", vni, owner, ErrIncompatible)
		}
	} else {
		var err error
		if vni, err = c.freeVNI(ctx, s.Avoid); err != nil {
			return rec, err
		}
	}
	rec.VNI = vni
	val, err := kvstore.Encode(rec)
	if err != nil {
		return rec, err
	}
	rval, err := kvstore.Encode(reservation{Key: key, Incarnation: rec.Incarnation})
	if err != nil {
		return rec, err
	}
	ops := []kvstore.Op{
		{Verb: kvstore.OpCreate, Key: configKey(key), Value: val},
		{Verb: kvstore.OpCreate, Key: vniKey(vni), Value: rval},
	}
	for _, p := range s.Subnets {
		ops = append(ops, kvstore.Op{Verb: kvstore.OpCreate, Key: subnetKey(p), Value: rval})
	}
	pop, err := c.emptyPeersOp(key, rec.Incarnation)
	if err != nil {
		return rec, err
	}
	ops = append(ops, pop)
	if err := c.store.Txn(ctx, ops); err != nil {
		if errors.Is(err, kvstore.ErrConflict) {
			return rec, err
		}
		return rec, fmt.Errorf("create logical network %s: %w", rec.Label(), err)
	}
	c.log.Info("logical network created in the store", "network", logName(rec), "key", key, "vni", vni, "host", c.cfg.HostID, "subnets", rec.Subnets, "incarnation", rec.Incarnation)
	// Records a crash left of an earlier incarnation are stale now: no
	// record of it can be written any more (see CreateEndpoint).
	if err := c.sweep(ctx, key, func(ep *Endpoint) bool { return ep.Incarnation != rec.Incarnation }); err != nil {
		c.log.Warn("remove endpoint records of an earlier incarnation", "key", key, "error", err)
	}
	return rec, nil
}

// checkSubnetsFree refuses subnets that overlap another logical network's.
func (c *Cluster) checkSubnetsFree(ctx context.Context, key string, subnets []netip.Prefix) error {
	pairs, err := c.store.List(ctx, "networks/")
	if err != nil {
		return fmt.Errorf("list logical networks: %w", err)
	}
	for _, p := range pairs {
		if !strings.HasSuffix(p.Key, "/config") {
			continue
		}
		var other Network
		if err := kvstore.Decode(p.Value, &other); err != nil {
			c.log.Warn("skip unreadable network record", "key", p.Key, "error", err)
			continue
		}
		if other.Key == key {
			continue
		}
		for _, os := range other.Subnets {
			op, err := netip.ParsePrefix(os)
			if err != nil {
				continue
			}
			for _, s := range subnets {
				if s.Overlaps(op) {
					return fmt.Errorf("subnet %s overlaps subnet %s of logical network %s (hosts: %s): choose another --subnet, or use -o name=%s to join that network: %w",
						s, op, other.Label(), other.hostNames(), other.Name, ErrIncompatible)
				}
			}
		}
	}
	// A reservation without a config is a network being created or torn
	// down right now by another host.
	for _, s := range subnets {
		p, err := c.store.Get(ctx, subnetKey(s))
		if errors.Is(err, kvstore.ErrNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read subnet reservation %s: %w", s, err)
		}
		var v reservation
		if kvstore.Decode(p.Value, &v) == nil && v.Key != key {
			return fmt.Errorf("subnet %s is reserved by logical network %q: choose another --subnet: %w", s, v.Key, ErrIncompatible)
		}
	}
	return nil
}

// VNIOwner returns the key of the logical network that reserves vni in the
// store, "" if none does.
func (c *Cluster) VNIOwner(ctx context.Context, vni uint32) (string, error) {
	p, err := c.store.Get(ctx, vniKey(vni))
	if errors.Is(err, kvstore.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read vni %d: %w", vni, err)
	}
	var v reservation
	if err := kvstore.Decode(p.Value, &v); err != nil {
		return "", fmt.Errorf("vni %d: %w", vni, err)
	}
	return v.Key, nil
}

// freeVNI picks the lowest unreserved VNI from VNIStart that is not in
// avoid. The caller claims it with a create-only write, so a race costs a
// retry, never a duplicate.
func (c *Cluster) freeVNI(ctx context.Context, avoid []uint32) (uint32, error) {
	pairs, err := c.store.List(ctx, "vnis/")
	if err != nil {
		return 0, fmt.Errorf("list reserved vnis: %w", err)
	}
	used := make(map[uint32]bool, len(pairs)+len(avoid))
	for _, v := range avoid {
		used[v] = true
	}
	for _, p := range pairs {
		n, err := strconv.ParseUint(strings.TrimPrefix(p.Key, "vnis/"), 10, 32)
		if err == nil {
			used[uint32(n)] = true
		}
	}
	for v := c.cfg.VNIStart; v <= MaxVNI; v++ {
		if !used[v] {
			return v, nil
		}
	}
	return 0, errors.New("no free vni left")
}

// Leave removes Docker network networkID of this host from logical network
// key: first this host's endpoint records of that Docker network, then the
// ID from the membership. The membership goes with its last ID (and with
// it every endpoint record of this host on the network); the network goes
// with its last member: its config, VNI and subnet reservations in one
// transaction, then the endpoint records of that incarnation. Leaving a
// network this host is not a member of is success.
func (c *Cluster) Leave(ctx context.Context, key, networkID string) error {
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		pair, err := c.store.Get(ctx, configKey(key))
		if errors.Is(err, kvstore.ErrNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read logical network %q: %w", key, err)
		}
		var rec Network
		if err := kvstore.Decode(pair.Value, &rec); err != nil {
			return fmt.Errorf("logical network %q: %w", key, err)
		}
		m, ok := rec.Hosts[c.cfg.HostID]
		if !ok || !slices.Contains(m.NetworkIDs, networkID) {
			return nil
		}
		m.NetworkIDs = slices.DeleteFunc(slices.Clone(m.NetworkIDs), func(s string) bool { return s == networkID })
		last := len(m.NetworkIDs) == 0
		// This host's records go before its membership: a crash in
		// between leaves a membership Docker's retry removes.
		if err := c.sweep(ctx, key, func(ep *Endpoint) bool {
			return ep.HostID == c.cfg.HostID && (last || ep.NetworkID == networkID)
		}); err != nil {
			return fmt.Errorf("leave logical network %s: %w", rec.Label(), err)
		}
		c.at("leave/after-endpoints")
		if !last {
			rec.Hosts[c.cfg.HostID] = m
			// The peer record follows the records the sweep removed.
			if err := c.syncOwnPeers(ctx, key, rec.Incarnation); err != nil {
				return fmt.Errorf("leave logical network %s: %w", rec.Label(), err)
			}
		} else {
			delete(rec.Hosts, c.cfg.HostID)
		}
		// The membership and the peer record go together.
		peerDel := kvstore.Op{Verb: kvstore.OpDelete, Key: peerRecordKey(key, c.cfg.HostID)}
		if len(rec.Hosts) > 0 {
			val, err := kvstore.Encode(rec)
			if err != nil {
				return err
			}
			ops := []kvstore.Op{{Verb: kvstore.OpCAS, Key: configKey(key), Value: val, Index: pair.ModifyIndex}}
			if last {
				ops = append(ops, peerDel)
			}
			err = c.store.Txn(ctx, ops)
			if errors.Is(err, kvstore.ErrConflict) {
				continue
			}
			if err != nil {
				return fmt.Errorf("leave logical network %s: %w", rec.Label(), err)
			}
			if last {
				c.forgetOwnPeers(key)
			}
			return nil
		}
		// While this incarnation's config exists no other incarnation can
		// be created, so records of another one are stale (a crash left
		// them): remove them now, as nobody could tell later.
		if err := c.sweep(ctx, key, func(ep *Endpoint) bool { return ep.Incarnation != rec.Incarnation }); err != nil {
			c.log.Warn("remove endpoint records of an earlier incarnation", "key", key, "error", err)
		}
		ops := []kvstore.Op{{Verb: kvstore.OpDeleteCAS, Key: configKey(key), Index: pair.ModifyIndex}, peerDel}
		resKeys := []string{vniKey(rec.VNI)}
		for _, s := range rec.Subnets {
			if p, err := netip.ParsePrefix(s); err == nil {
				resKeys = append(resKeys, subnetKey(p))
			}
		}
		for _, k := range resKeys {
			op, err := c.releaseOp(ctx, k, &rec)
			if err != nil {
				return err
			}
			if op != nil {
				ops = append(ops, *op)
			}
		}
		err = c.store.Txn(ctx, ops)
		if errors.Is(err, kvstore.ErrConflict) {
			continue // a host joined, or a reservation changed: look again
		}
		if err != nil {
			return fmt.Errorf("remove logical network %s: %w", rec.Label(), err)
		}
		c.at("leave/after-remove")
		// No member is left: the records of this incarnation are stale. A
		// host re-creating the network meanwhile writes records of a new
		// incarnation, which stay.
		c.forgetOwnPeers(key)
		if err := c.sweep(ctx, key, func(ep *Endpoint) bool { return ep.Incarnation == rec.Incarnation }); err != nil {
			c.log.Warn("remove endpoint records of a removed network", "key", key, "error", err)
		}
		if err := c.sweepPeerRecords(ctx, key, func(r PeerRecord) bool { return r.Incarnation != "" && r.Incarnation == rec.Incarnation }); err != nil {
			c.log.Warn("remove peer records of a removed network", "key", key, "error", err)
		}
		c.log.Info("logical network removed from the store", "network", logName(rec), "key", key, "vni", rec.VNI, "host", c.cfg.HostID, "incarnation", rec.Incarnation)
		return nil
	}
	return fmt.Errorf("leave logical network %q: gave up after %d concurrent updates", key, maxCASAttempts)
}

// releaseOp is the delete of one reservation of rec, conditional on the
// index read; nil if the reservation is not rec's (then it is not ours to
// delete).
func (c *Cluster) releaseOp(ctx context.Context, key string, rec *Network) (*kvstore.Op, error) {
	p, err := c.store.Get(ctx, key)
	if errors.Is(err, kvstore.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read reservation %q: %w", key, err)
	}
	var r reservation
	if err := kvstore.Decode(p.Value, &r); err != nil || r.Key != rec.Key || (r.Incarnation != "" && r.Incarnation != rec.Incarnation) {
		c.log.Warn("reservation held by another network; keeping it", "key", key, "network", logName(*rec))
		return nil, nil
	}
	return &kvstore.Op{Verb: kvstore.OpDeleteCAS, Key: key, Index: p.ModifyIndex}, nil
}

// sweep deletes the endpoint records of logical network key that match,
// each only if unchanged since it was read (a record rewritten meanwhile
// is read and matched again).
func (c *Cluster) sweep(ctx context.Context, key string, match func(*Endpoint) bool) error {
	pairs, err := c.store.List(ctx, endpointsPrefix(key))
	if err != nil {
		return fmt.Errorf("list endpoints of %q: %w", key, err)
	}
	var errs []error
	for _, p := range pairs {
		if err := c.deleteIf(ctx, p, match); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// deleteIf deletes the endpoint record p if it matches, by a delete-CAS on
// the index read; not-found is success.
func (c *Cluster) deleteIf(ctx context.Context, p *kvstore.Pair, match func(*Endpoint) bool) error {
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		var ep Endpoint
		if kvstore.Decode(p.Value, &ep) != nil || !match(&ep) {
			return nil
		}
		err := c.store.DeleteCAS(ctx, p.Key, p.ModifyIndex)
		switch {
		case err == nil:
			c.log.Debug("endpoint record removed", "key", p.Key, "host", ep.HostID)
			return nil
		case errors.Is(err, kvstore.ErrNotFound):
			return nil
		case !errors.Is(err, kvstore.ErrConflict):
			return fmt.Errorf("remove endpoint record %q: %w", p.Key, err)
		}
		// Rewritten since it was read: look again.
		np, err := c.store.Get(ctx, p.Key)
		if errors.Is(err, kvstore.ErrNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read endpoint record %q: %w", p.Key, err)
		}
		p = np
	}
	return fmt.Errorf("remove endpoint record %q: gave up after %d concurrent updates", p.Key, maxCASAttempts)
}

// logName is how logs name a logical network: its -o name, or its key
// when it has none (unquoted, unlike Label).
func logName(rec Network) string {
	if rec.Name != "" {
		return rec.Name
	}
	return rec.Key
}
