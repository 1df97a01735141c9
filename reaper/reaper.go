package reaper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/internal/fault"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
)

// Key prefixes, relative to the store's prefix.
const (
	// HostsPrefix holds the plugins' claimed host records (kvstore/doc.go).
	HostsPrefix = "hosts/"
	// LostPrefix holds, per host whose record has no session, when a
	// reaper first saw it so (lostRecord).
	LostPrefix = "hosts-lost/"
	// watchPrefix covers both: Run follows them with one blocking query.
	watchPrefix = "hosts"
)

// Defaults of Config.
const (
	DefaultGrace    = 5 * time.Minute
	DefaultInterval = 10 * time.Second
)

// ErrAlive: Evict refused a host whose record is held by a live session.
var ErrAlive = errors.New("host is alive (its record is held by a live session)")

// ErrUnknownHost: no host record with that ID.
var ErrUnknownHost = errors.New("no such host")

// Config configures a Reaper.
type Config struct {
	// HostID is this host's ID: never reaped by this Reaper, and Scan acts
	// only while this host's own record is held by a session. Zero: an
	// operator's tool, which scans nothing and evicts on request.
	HostID string
	// Grace is how long a host's record may lack a session before the
	// host is gone. Zero: DefaultGrace.
	Grace time.Duration
	// Interval between two scans of Run. Zero: DefaultInterval.
	Interval time.Duration
	// Logger receives a line per step of a reap (nil: discard).
	Logger *slog.Logger
	// Now is the clock (nil: time.Now).
	Now func() time.Time
}

// ClusterEvictor removes a host's cluster state (*cluster.Cluster).
type ClusterEvictor interface {
	EvictHost(ctx context.Context, hostID string) (cluster.Evicted, error)
}

// AddressEvictor releases a host's IPAM holds (*ipam.Driver).
type AddressEvictor interface {
	EvictNode(ctx context.Context, node string) (ipam.Evicted, error)
}

var (
	_ ClusterEvictor = (*cluster.Cluster)(nil)
	_ AddressEvictor = (*ipam.Driver)(nil)
)

// Service is one catalog service of a host.
type Service struct {
	Node string
	ID   string
	Name string
}

// Catalog is the part of Consul's catalog a reap needs (ConsulCatalog).
type Catalog interface {
	// HostServices lists the services registered on node whose Meta
	// host-id is hostID.
	HostServices(ctx context.Context, node, hostID string) ([]Service, error)
	// Deregister removes one service; a missing one is success.
	Deregister(ctx context.Context, s Service) error
}

// Host is one host as the store shows it.
type Host struct {
	ID   string `json:"id"`
	Node string `json:"node"`
	// AgentNode is the node name of the Consul agent the host registered
	// its services on, when it differs from Node (NODE_NAME set to
	// another name, or the agent renamed since the name was kept).
	AgentNode string     `json:"agent_node,omitempty"`
	VTEP      netip.Addr `json:"vtep,omitzero"`
	PID       int        `json:"pid,omitempty"`
	Started   time.Time  `json:"started,omitzero"`
	Version   string     `json:"version,omitempty"`
	// Alive: the record is held by a session.
	Alive   bool   `json:"alive"`
	Session string `json:"session,omitempty"`
	// LostSince is when a reaper first saw the record without a session
	// (zero while alive, or before any reaper has seen it).
	LostSince time.Time `json:"lost_since,omitzero"`
	// GoneAt is LostSince plus the grace period: from then on the host is
	// reaped.
	GoneAt time.Time `json:"gone_at,omitzero"`
	// Gone: past GoneAt.
	Gone bool `json:"gone"`

	index uint64 // ModifyIndex of hosts/<id>
}

// hostNodes are the catalog nodes host h's services may be on: its agent's
// node, and Node when it differs.
func hostNodes(h Host) []string {
	var out []string
	for _, n := range []string{h.AgentNode, h.Node} {
		if n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// hostRecord is the part of the plugin's hosts/<id> record we read.
type hostRecord struct {
	ID        string     `json:"id"`
	Node      string     `json:"node"`
	AgentNode string     `json:"agent_node"`
	VTEP      netip.Addr `json:"vtep"`
	PID       int        `json:"pid"`
	Started   time.Time  `json:"started"`
	Version   string     `json:"version"`
}

// lostRecord is hosts-lost/<id>.
type lostRecord struct {
	Since time.Time `json:"since"`
	// HostIndex is the ModifyIndex of hosts/<id> the reaper saw without
	// a session: a record written since (the host came back, and maybe
	// went again) starts a new count.
	HostIndex uint64 `json:"host_index"`
	SeenBy    string `json:"seen_by,omitempty"`
}

// Reaper finds gone hosts and removes their state. Safe for concurrent
// use; any number of Reapers, on any hosts, may run at once.
type Reaper struct {
	cfg   Config
	log   *slog.Logger
	store kvstore.Store
	cl    ClusterEvictor
	ip    AddressEvictor
	cat   Catalog
}

// New returns a Reaper. cat may be nil (no catalog: services are left).
func New(cfg Config, store kvstore.Store, cl ClusterEvictor, ip AddressEvictor, cat Catalog) (*Reaper, error) {
	if store == nil || cl == nil || ip == nil {
		return nil, errors.New("reaper: store, cluster and ipam are required")
	}
	if cfg.Grace < 0 || cfg.Interval < 0 {
		return nil, errors.New("reaper: negative grace or interval")
	}
	if cfg.Grace == 0 {
		cfg.Grace = DefaultGrace
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Reaper{cfg: cfg, log: cfg.Logger, store: store, cl: cl, ip: ip, cat: cat}, nil
}

// Grace is the grace period in force.
func (r *Reaper) Grace() time.Duration { return r.cfg.Grace }

// Hosts lists every host record, sorted by node name then ID, with its
// liveness. It writes nothing.
func (r *Reaper) Hosts(ctx context.Context) ([]Host, error) {
	hosts, _, err := r.hosts(ctx)
	return hosts, err
}

// hosts reads hosts/ and hosts-lost/; lost maps host ID to its
// hosts-lost pair.
func (r *Reaper) hosts(ctx context.Context) ([]Host, map[string]*kvstore.Pair, error) {
	pairs, err := r.store.List(ctx, HostsPrefix)
	if err != nil {
		return nil, nil, fmt.Errorf("list host records: %w", err)
	}
	lpairs, err := r.store.List(ctx, LostPrefix)
	if err != nil {
		return nil, nil, fmt.Errorf("list lost hosts: %w", err)
	}
	hosts, lost := r.view(pairs, lpairs)
	return hosts, lost, nil
}

// view reads the pairs of hosts/ and hosts-lost/ into hosts with their
// liveness at r.cfg.Now().
func (r *Reaper) view(pairs, lpairs []*kvstore.Pair) ([]Host, map[string]*kvstore.Pair) {
	lost := map[string]*kvstore.Pair{}
	for _, p := range lpairs {
		lost[strings.TrimPrefix(p.Key, LostPrefix)] = p
	}
	now := r.cfg.Now()
	var out []Host
	for _, p := range pairs {
		id := strings.TrimPrefix(p.Key, HostsPrefix)
		if id == "" || strings.Contains(id, "/") {
			continue
		}
		var rec hostRecord
		if err := kvstore.Decode(p.Value, &rec); err != nil {
			r.log.Warn("unreadable host record", "key", p.Key, "error", err)
		}
		h := Host{ID: id, Node: rec.Node, AgentNode: rec.AgentNode, VTEP: rec.VTEP, PID: rec.PID, Started: rec.Started, Version: rec.Version,
			Alive: p.Session != "", Session: p.Session, index: p.ModifyIndex}
		if lp := lost[id]; lp != nil && !h.Alive {
			var l lostRecord
			if kvstore.Decode(lp.Value, &l) == nil && l.HostIndex == p.ModifyIndex {
				h.LostSince = l.Since
				h.GoneAt = l.Since.Add(r.cfg.Grace)
				h.Gone = !now.Before(h.GoneAt)
			}
		}
		out = append(out, h)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Node != out[j].Node {
			return out[i].Node < out[j].Node
		}
		return out[i].ID < out[j].ID
	})
	return out, lost
}

// Run follows hosts/ and hosts-lost/ with one blocking query (a Watch of
// their common prefix) and passes over the latest snapshot whenever it
// changes and every Config.Interval, until ctx is done. The periodic pass
// is what notices a grace period ending; it reads nothing unless a host
// is due to be reaped, when a fresh Scan decides. tick, if not nil, is
// called after each periodic pass. Errors are logged.
//
// Listing both prefixes every Interval cost every host two requests per
// 10 s, polling; the watch costs a blocking query, answered when a host
// record or a count changes (or at the wait time).
func (r *Reaper) Run(ctx context.Context, tick func(context.Context)) {
	t := time.NewTicker(r.cfg.Interval)
	defer t.Stop()
	ch, err := r.store.Watch(ctx, watchPrefix)
	if err != nil {
		// Only a closed store: nothing to follow, poll as before.
		r.log.Warn("host liveness: cannot watch the host records; listing them every interval", "error", err)
	}
	var (
		snap []*kvstore.Pair
		have bool
	)
	for {
		periodic := false
		select {
		case <-ctx.Done():
			return
		case s, ok := <-ch:
			if !ok {
				return
			}
			snap, have = s, true
		case <-t.C:
			periodic = true
		}
		var err error
		switch {
		case have:
			err = r.scanSnapshot(ctx, snap)
		case ch == nil && periodic:
			err = r.Scan(ctx)
		}
		if err != nil && ctx.Err() == nil {
			r.log.Warn("host liveness scan", "error", err)
		}
		if periodic && tick != nil {
			tick(ctx)
		}
	}
}

// scanSnapshot is Scan over a Watch snapshot of hosts/ and hosts-lost/.
// Marking a host lost or clearing a count is a compare-and-set on what
// the snapshot showed, so an old snapshot can only lose a race; a reap is
// not undone by anything, so when a host is due one the pass is a fresh
// Scan.
func (r *Reaper) scanSnapshot(ctx context.Context, snap []*kvstore.Pair) error {
	var pairs, lpairs []*kvstore.Pair
	for _, p := range snap {
		switch {
		case strings.HasPrefix(p.Key, HostsPrefix):
			pairs = append(pairs, p)
		case strings.HasPrefix(p.Key, LostPrefix):
			lpairs = append(lpairs, p)
		}
	}
	hosts, lost := r.view(pairs, lpairs)
	for _, h := range hosts {
		if h.Gone && h.ID != r.cfg.HostID {
			return r.Scan(ctx)
		}
	}
	return r.scan(ctx, hosts, lost)
}

// Scan makes one pass: it starts the count of hosts whose record lost its
// session, cancels it for hosts that came back, and reaps the hosts past
// the grace period. It does nothing while this host's own record is not
// held by a session.
func (r *Reaper) Scan(ctx context.Context) error {
	hosts, lost, err := r.hosts(ctx)
	if err != nil {
		return err
	}
	return r.scan(ctx, hosts, lost)
}

// scan is Scan's pass over hosts and lost as read.
func (r *Reaper) scan(ctx context.Context, hosts []Host, lost map[string]*kvstore.Pair) error {
	if r.cfg.HostID != "" {
		self := false
		for _, h := range hosts {
			if h.ID == r.cfg.HostID {
				self = h.Alive
			}
		}
		if !self {
			r.log.Debug("host liveness: this host's record has no session; not judging others", "host", r.cfg.HostID)
			return nil
		}
	}
	var errs []error
	seen := map[string]bool{}
	for _, h := range hosts {
		seen[h.ID] = true
		lp := lost[h.ID]
		switch {
		case h.Alive || h.ID == r.cfg.HostID:
			if lp != nil {
				if err := r.store.DeleteCAS(ctx, lp.Key, lp.ModifyIndex); err != nil && !errors.Is(err, kvstore.ErrNotFound) && !errors.Is(err, kvstore.ErrConflict) {
					errs = append(errs, fmt.Errorf("clear %s: %w", lp.Key, err))
				} else if err == nil {
					r.log.Info("host is back within the grace period; nothing reclaimed", "host", h.ID, "node", h.Node)
				}
			}
		case h.LostSince.IsZero():
			if err := r.markLost(ctx, h, lp); err != nil {
				errs = append(errs, err)
			}
		case h.Gone:
			if _, err := r.reap(ctx, h, false); err != nil {
				errs = append(errs, err)
			}
		}
	}
	// A count whose host record is gone: a reap cut short after it
	// removed the record.
	for id, lp := range lost {
		if !seen[id] {
			if err := r.store.DeleteCAS(ctx, lp.Key, lp.ModifyIndex); err != nil && !errors.Is(err, kvstore.ErrNotFound) && !errors.Is(err, kvstore.ErrConflict) {
				errs = append(errs, fmt.Errorf("remove %s: %w", lp.Key, err))
			}
		}
	}
	return errors.Join(errs...)
}

// markLost starts the grace period of h: creates hosts-lost/<id>, or
// replaces one about an older record of h. Losing the race to another
// reaper is fine: its time is the one everybody counts from.
func (r *Reaper) markLost(ctx context.Context, h Host, lp *kvstore.Pair) error {
	val, err := kvstore.Encode(lostRecord{Since: r.cfg.Now().UTC(), HostIndex: h.index, SeenBy: r.cfg.HostID})
	if err != nil {
		return err
	}
	var index uint64
	if lp != nil {
		index = lp.ModifyIndex
	}
	err = r.store.CAS(ctx, LostPrefix+h.ID, val, index)
	if errors.Is(err, kvstore.ErrConflict) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("record host %s (%s) lost: %w", h.ID, h.Node, err)
	}
	if lp != nil {
		// The record was written again since the count began, and has
		// no session now: the host was alive meanwhile. A host that
		// reaches the store without a session (its agent cut off from
		// the servers' gossip) writes it every 10 s and is never gone.
		r.log.Warn("host record written again without a session: the host is alive but holds no Consul session (its agent cut off from the servers' gossip?); the grace period starts again",
			"host", h.ID, "node", h.Node, "grace", r.cfg.Grace, "gone_at", r.cfg.Now().Add(r.cfg.Grace).UTC())
		return nil
	}
	r.log.Info("host record has no session: the host is gone unless it comes back within the grace period",
		"host", h.ID, "node", h.Node, "grace", r.cfg.Grace, "gone_at", r.cfg.Now().Add(r.cfg.Grace).UTC())
	return nil
}

// Reaped says what a reap removed.
type Reaped struct {
	HostID   string
	Node     string
	Cluster  cluster.Evicted
	IPAM     ipam.Evicted
	Services int
}

// Evict reaps host hostID now, whatever the grace period. A host whose
// record is held by a live session is refused with ErrAlive unless force
// is set (the operator knows better: a host cut off from its agent whose
// session its agent still keeps: a plugin cut off from Consul whose
// check has not gone critical yet). An unknown host is ErrUnknownHost.
func (r *Reaper) Evict(ctx context.Context, hostID string, force bool) (Reaped, error) {
	if hostID == r.cfg.HostID {
		return Reaped{}, fmt.Errorf("evict host %s: this is this host", hostID)
	}
	hosts, err := r.Hosts(ctx)
	if err != nil {
		return Reaped{}, err
	}
	for _, h := range hosts {
		if h.ID != hostID {
			continue
		}
		if h.Alive && !force {
			return Reaped{HostID: h.ID, Node: h.Node}, fmt.Errorf("evict host %s (node %q): %w; use --force if it is dead anyway", h.ID, h.Node, ErrAlive)
		}
		return r.reap(ctx, h, force)
	}
	if force {
		// No host record (removed by hand, or by a reap cut short): what
		// else the host left still goes.
		return r.reap(ctx, Host{ID: hostID}, true)
	}
	return Reaped{HostID: hostID}, fmt.Errorf("evict host %s: %w (--force removes what the store still holds of it)", hostID, ErrUnknownHost)
}

// stillJudged reports whether h's host record is still the one judged
// lost: present, at the same index and without a session. False means
// the host came back, or another host reaped it meanwhile.
func (r *Reaper) stillJudged(ctx context.Context, h Host) (bool, error) {
	p, err := r.store.Get(ctx, HostsPrefix+h.ID)
	if errors.Is(err, kvstore.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reap host %s (%s): %w", h.ID, h.Node, err)
	}
	return p.Session == "" && p.ModifyIndex == h.index, nil
}

// reap removes everything of host h; see the package doc for the order.
// Unless force, it first checks that the host record is still the one
// judged (same index, no session).
func (r *Reaper) reap(ctx context.Context, h Host, force bool) (Reaped, error) {
	out := Reaped{HostID: h.ID, Node: h.Node}
	log := r.log.With("host", h.ID, "node", h.Node)
	if !force {
		judged, err := r.stillJudged(ctx, h)
		if err != nil {
			return out, err
		}
		if !judged {
			log.Info("host came back (or another host reaped it) just before it was reaped; nothing reclaimed")
			return out, nil
		}
	}
	log.Info("reaping gone host", "lost_since", h.LostSince, "grace", r.cfg.Grace, "alive", h.Alive)
	if !force {
		// Every write of the eviction is fenced on the host record being
		// the one judged: a host that takes it back meanwhile (a new
		// session writes it) stops the reap before its next write, so
		// nothing it asserts again is taken from it.
		ctx = kvstore.WithFence(ctx, kvstore.Op{Verb: kvstore.OpCheckIndex, Key: HostsPrefix + h.ID, Index: h.index})
	}
	cameBack := func(err error) bool {
		if !errors.Is(err, kvstore.ErrFenced) {
			return false
		}
		log.Warn("reap: the host came back while it was reaped; stopped before its next write (its own check finds what it lost)", "error", err)
		return true
	}
	ev, err := r.cl.EvictHost(ctx, h.ID)
	out.Cluster = ev
	if cameBack(err) {
		return out, nil
	}
	if err != nil {
		return out, fmt.Errorf("reap host %s (%s): %w", h.ID, h.Node, err)
	}
	log.Info("reap: memberships and endpoint records removed", "left", ev.Left, "networks_removed", ev.Removed)
	fault.Point("reap/after-cluster")
	iv, err := r.ip.EvictNode(ctx, h.ID)
	out.IPAM = iv
	if cameBack(err) {
		return out, nil
	}
	if err != nil {
		return out, fmt.Errorf("reap host %s (%s): ipam: %w", h.ID, h.Node, err)
	}
	log.Info("reap: address and pool holds released", "addresses", iv.Addresses, "shared_holds", iv.SharedHolds, "pool_holds", iv.PoolHolds, "pools_removed", iv.PoolsRemoved)
	fault.Point("reap/after-ipam")
	if r.cat != nil && !force {
		// The catalog is not in the store, so the fence does not cover
		// it: a host that came back since the last fenced write keeps
		// its services (the window left is this read to the
		// deregistrations, and the host's anti-entropy mends that).
		judged, err := r.stillJudged(ctx, h)
		if err != nil {
			return out, err
		}
		if !judged {
			log.Warn("reap: the host's record changed while it was reaped (it came back, or another host reaped it); stopped before its services (a host that came back finds what it lost by its own check)")
			return out, nil
		}
	}
	if r.cat != nil {
		// The services are on the agent's node; a record of a version
		// that did not write it names only Node.
		for _, node := range hostNodes(h) {
			svcs, err := r.cat.HostServices(ctx, node, h.ID)
			if err != nil {
				return out, fmt.Errorf("reap host %s (%s): list its services on node %q: %w", h.ID, h.Node, node, err)
			}
			for _, s := range svcs {
				if err := r.cat.Deregister(ctx, s); err != nil {
					return out, fmt.Errorf("reap host %s (%s): deregister service %s: %w", h.ID, h.Node, s.ID, err)
				}
				out.Services++
			}
		}
		log.Info("reap: services deregistered", "services", out.Services, "agent_node", h.AgentNode)
	}
	fault.Point("reap/after-services")
	err = r.store.DeleteCAS(ctx, HostsPrefix+h.ID, h.index)
	switch {
	case errors.Is(err, kvstore.ErrConflict):
		// The host wrote its record again meanwhile: it is back, and its
		// own check (CheckSelf) finds what it lost.
		log.Warn("reap: the host came back while it was reaped; it keeps its new host record")
	case err != nil && !errors.Is(err, kvstore.ErrNotFound):
		return out, fmt.Errorf("reap host %s (%s): remove its host record: %w", h.ID, h.Node, err)
	}
	fault.Point("reap/after-host-record")
	if p, err := r.store.Get(ctx, LostPrefix+h.ID); err == nil {
		if err := r.store.DeleteCAS(ctx, p.Key, p.ModifyIndex); err != nil && !errors.Is(err, kvstore.ErrNotFound) && !errors.Is(err, kvstore.ErrConflict) {
			return out, fmt.Errorf("reap host %s (%s): remove %s: %w", h.ID, h.Node, p.Key, err)
		}
	} else if !errors.Is(err, kvstore.ErrNotFound) {
		return out, fmt.Errorf("reap host %s (%s): %w", h.ID, h.Node, err)
	}
	log.Info("reaped gone host")
	return out, nil
}
