package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"consul-overlay/kvstore"
)

// CreateEndpoint records an endpoint of this host, which publishes it to
// the other hosts. ep names the endpoint (ID, NetworkKey, NetworkID) and
// gives its addresses, MAC, options and ports; CreateEndpoint fills in the
// host, its VTEP, the network's incarnation and the time. The record is
// written only while this host is a member of that incarnation under
// ep.NetworkID (a transaction checks the config's index), so a record of a
// removed network can never appear later. Replaying the same endpoint is
// success and returns the stored record.
func (c *Cluster) CreateEndpoint(ctx context.Context, ep Endpoint) (Endpoint, error) {
	if ep.ID == "" || strings.ContainsAny(ep.ID, "/ ") {
		return Endpoint{}, fmt.Errorf("record endpoint: invalid ID %q", ep.ID)
	}
	key := ep.NetworkKey
	ep.HostID = c.cfg.HostID
	ep.Node = c.cfg.Node
	ep.Created = time.Now().UTC()
	// The first attempt checks against the config the peer watch last
	// saw, if it shows the membership: the transaction's index check
	// makes a stale one a conflict, and the next attempt reads it.
	cached, useCache := c.cachedConfig(key)
	if useCache {
		m, ok := cached.rec.Hosts[c.cfg.HostID]
		useCache = ok && slices.Contains(m.NetworkIDs, ep.NetworkID)
	}
	mu := c.peerLock(key)
	mu.Lock()
	defer mu.Unlock()
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		if err := ctx.Err(); err != nil {
			return Endpoint{}, err
		}
		// Read under the peer lock, each attempt: SetVTEP rewrites the
		// network's records under it (see republishVTEP).
		ep.VTEP = c.VTEP().String()
		var rec Network
		var index uint64
		if useCache {
			rec, index, useCache = cached.rec, cached.index, false
		} else {
			pair, err := c.store.Get(ctx, configKey(key))
			if errors.Is(err, kvstore.ErrNotFound) {
				return Endpoint{}, fmt.Errorf("record endpoint: logical network %q does not exist: %w", key, ErrNotMember)
			}
			if err != nil {
				return Endpoint{}, fmt.Errorf("record endpoint: read logical network %q: %w", key, err)
			}
			if err := kvstore.Decode(pair.Value, &rec); err != nil {
				return Endpoint{}, fmt.Errorf("record endpoint: logical network %q: %w", key, err)
			}
			index = pair.ModifyIndex
		}
		if m, ok := rec.Hosts[c.cfg.HostID]; !ok || !slices.Contains(m.NetworkIDs, ep.NetworkID) {
			return Endpoint{}, fmt.Errorf("record endpoint: network %s of this host is not in logical network %s: %w", ep.NetworkID, rec.Label(), ErrNotMember)
		}
		ep.Incarnation = rec.Incarnation
		val, err := kvstore.Encode(ep)
		if err != nil {
			return Endpoint{}, err
		}
		// The host's peer record lists the endpoint in the same
		// transaction (see PeerRecord).
		pr, prIndex, err := c.ownPeerRecord(ctx, key)
		if err != nil {
			return Endpoint{}, fmt.Errorf("record endpoint: %w", err)
		}
		if pr.Incarnation != rec.Incarnation || pr.HostID != c.cfg.HostID {
			pr = PeerRecord{HostID: c.cfg.HostID, Incarnation: rec.Incarnation, Endpoints: []string{}}
		}
		pr.VTEP = ep.VTEP
		pr = pr.with(ep)
		pop, err := c.peerOp(key, pr, prIndex)
		if err != nil {
			return Endpoint{}, err
		}
		at, err := kvstore.TxnIndex(ctx, c.store, []kvstore.Op{
			{Verb: kvstore.OpCreate, Key: endpointKey(key, ep.ID), Value: val},
			{Verb: kvstore.OpCheckIndex, Key: configKey(key), Index: index},
			pop,
		})
		if err == nil {
			c.setOwnPeers(key, pr, at)
			c.setOwnedIndex(endpointKey(key, ep.ID), at)
			return ep, nil
		}
		c.forgetOwnPeers(key)
		if !errors.Is(err, kvstore.ErrConflict) {
			return Endpoint{}, fmt.Errorf("record endpoint: %w", err)
		}
		// The config changed, or the endpoint exists (Docker replays).
		old, op, err := c.getEndpoint(ctx, key, ep.ID)
		if errors.Is(err, kvstore.ErrNotFound) {
			continue
		}
		if err != nil {
			return Endpoint{}, fmt.Errorf("record endpoint: %w", err)
		}
		if old.Incarnation != rec.Incarnation {
			// Left behind by an earlier incarnation: stale.
			if err := c.deleteIf(ctx, op, func(e *Endpoint) bool { return e.Incarnation != rec.Incarnation }); err != nil {
				return Endpoint{}, fmt.Errorf("record endpoint: %w", err)
			}
			continue
		}
		if old.HostID != ep.HostID || old.IPv4 != ep.IPv4 || old.IPv6 != ep.IPv6 {
			return Endpoint{}, fmt.Errorf("record endpoint %s: already exists on host %q with addresses %s %s: %w", ep.ID, old.Node, old.IPv4, old.IPv6, ErrExists)
		}
		return old, nil
	}
	return Endpoint{}, fmt.Errorf("record endpoint %s: gave up after %d concurrent updates", ep.ID, maxCASAttempts)
}

func (c *Cluster) getEndpoint(ctx context.Context, key, id string) (Endpoint, *kvstore.Pair, error) {
	p, err := c.store.Get(ctx, endpointKey(key, id))
	if err != nil {
		return Endpoint{}, nil, err
	}
	var ep Endpoint
	if err := kvstore.Decode(p.Value, &ep); err != nil {
		return Endpoint{}, nil, fmt.Errorf("endpoint record %q: %w", p.Key, err)
	}
	return ep, p, nil
}

// UpdateEndpoint changes this host's endpoint record with fn, by
// compare-and-set. A missing record is kvstore.ErrNotFound; another host's
// is ErrNotOwner. fn may run more than once; it must not change the ID,
// the network, the host or the incarnation.
func (c *Cluster) UpdateEndpoint(ctx context.Context, key, id string, fn func(*Endpoint)) (Endpoint, error) {
	mu := c.peerLock(key)
	mu.Lock()
	defer mu.Unlock()
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		ep, p, err := c.getEndpoint(ctx, key, id)
		if err != nil {
			return Endpoint{}, fmt.Errorf("update endpoint %s: %w", id, err)
		}
		if ep.HostID != c.cfg.HostID {
			return Endpoint{}, fmt.Errorf("update endpoint %s of host %q: %w", id, ep.Node, ErrNotOwner)
		}
		before := peerEntry(ep)
		fn(&ep)
		val, err := kvstore.Encode(ep)
		if err != nil {
			return Endpoint{}, err
		}
		ops := []kvstore.Op{{Verb: kvstore.OpCAS, Key: p.Key, Value: val, Index: p.ModifyIndex}}
		// A change of what peers program goes to the peer record in the
		// same transaction.
		pr, prIndex, err := c.ownPeerRecord(ctx, key)
		if err != nil {
			return Endpoint{}, fmt.Errorf("update endpoint %s: %w", id, err)
		}
		write := peerEntry(ep) != before || pr.VTEP != ep.VTEP || !pr.lists(ep.ID)
		if write && pr.Incarnation == ep.Incarnation {
			pr.VTEP = ep.VTEP
			pr = pr.with(ep)
			pop, err := c.peerOp(key, pr, prIndex)
			if err != nil {
				return Endpoint{}, err
			}
			ops = append(ops, pop)
		}
		at, err := kvstore.TxnIndex(ctx, c.store, ops)
		if errors.Is(err, kvstore.ErrConflict) {
			c.forgetOwnPeers(key)
			continue
		}
		if err != nil {
			c.forgetOwnPeers(key)
			return Endpoint{}, fmt.Errorf("update endpoint %s: %w", id, err)
		}
		if len(ops) > 1 {
			c.setOwnPeers(key, pr, at)
		}
		c.setOwnedIndex(p.Key, at)
		return ep, nil
	}
	return Endpoint{}, fmt.Errorf("update endpoint %s: gave up after %d concurrent updates", id, maxCASAttempts)
}

// DeleteEndpoint removes this host's endpoint record, by a delete-CAS on
// the index read. A missing record is success; another host's record is
// ErrNotOwner and stays.
func (c *Cluster) DeleteEndpoint(ctx context.Context, key, id string) error {
	mu := c.peerLock(key)
	mu.Lock()
	defer mu.Unlock()
	// A record this host wrote, or its peer watch saw as this host's, at
	// an index is still this host's if it still has that index.
	c.mu.Lock()
	index, seen := c.owned[endpointKey(key, id)]
	c.mu.Unlock()
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		if !seen {
			ep, p, err := c.getEndpoint(ctx, key, id)
			if errors.Is(err, kvstore.ErrNotFound) {
				// Gone: make sure the peer record does not list it (a
				// record an older version removed).
				return c.unlistOwnPeer(ctx, key, id)
			}
			if err != nil {
				return fmt.Errorf("remove endpoint record %s: %w", id, err)
			}
			if ep.HostID != c.cfg.HostID {
				return fmt.Errorf("remove endpoint record %s of host %q: %w", id, ep.Node, ErrNotOwner)
			}
			index = p.ModifyIndex
		}
		ops := []kvstore.Op{{Verb: kvstore.OpDeleteCAS, Key: endpointKey(key, id), Index: index}}
		pr, prIndex, err := c.ownPeerRecord(ctx, key)
		if err != nil {
			return fmt.Errorf("remove endpoint record %s: %w", id, err)
		}
		listed := prIndex != 0 && pr.lists(id)
		switch {
		case listed:
			pr = pr.without(id)
			pop, err := c.peerOp(key, pr, prIndex)
			if err != nil {
				return err
			}
			ops = append(ops, pop)
		case prIndex != 0:
			// Not listed as far as the cache knows: only if the record
			// still is as cached. A cache refilled by a late snapshot of
			// the peer watch (after a forget) can hold a record from
			// before this endpoint was listed; the delete would then
			// leave it listed, and the other hosts would keep its
			// entries, pointing its address at a container that is gone.
			ops = append(ops, kvstore.Op{Verb: kvstore.OpCheckIndex, Key: peerRecordKey(key, c.cfg.HostID), Index: prIndex})
		default:
			ops = append(ops, kvstore.Op{Verb: kvstore.OpCheckNotExists, Key: peerRecordKey(key, c.cfg.HostID)})
		}
		at, err := kvstore.TxnIndex(ctx, c.store, ops)
		if err == nil {
			c.mu.Lock()
			delete(c.owned, endpointKey(key, id))
			c.mu.Unlock()
			if listed {
				c.setOwnPeers(key, pr, at)
			}
			c.log.Debug("endpoint record removed", "key", endpointKey(key, id), "host", c.cfg.HostID)
			return nil
		}
		c.forgetOwnPeers(key)
		if !errors.Is(err, kvstore.ErrConflict) && !errors.Is(err, kvstore.ErrNotFound) {
			return fmt.Errorf("remove endpoint record %s: %w", id, err)
		}
		// The record or the peer record changed since read: read both.
		seen = false
	}
	return fmt.Errorf("remove endpoint record %s: gave up after %d concurrent updates", id, maxCASAttempts)
}

// unlistOwnPeer removes endpoint id from this host's peer record of key,
// if it lists it. The caller holds the network's peer lock. The record is
// read from the store, not the cache (see DeleteEndpoint).
func (c *Cluster) unlistOwnPeer(ctx context.Context, key, id string) error {
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		pr, prIndex, err := c.storedOwnPeerRecord(ctx, key)
		if err != nil {
			return fmt.Errorf("remove endpoint %s from the peer record: %w", id, err)
		}
		if prIndex == 0 || !pr.lists(id) {
			return nil
		}
		pr = pr.without(id)
		pop, err := c.peerOp(key, pr, prIndex)
		if err != nil {
			return err
		}
		at, err := kvstore.TxnIndex(ctx, c.store, []kvstore.Op{pop})
		if err == nil {
			c.setOwnPeers(key, pr, at)
			return nil
		}
		c.forgetOwnPeers(key)
		if !errors.Is(err, kvstore.ErrConflict) {
			return fmt.Errorf("remove endpoint %s from the peer record: %w", id, err)
		}
	}
	return fmt.Errorf("remove endpoint %s from the peer record: gave up after %d concurrent updates", id, maxCASAttempts)
}

// setOwnedIndex records the modify index of this host's endpoint record
// at store key (0: unknown, forgotten).
func (c *Cluster) setOwnedIndex(k string, index uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if index == 0 {
		delete(c.owned, k)
		return
	}
	if c.owned == nil {
		c.owned = map[string]uint64{}
	}
	c.owned[k] = index
}

// Endpoints lists the endpoint records of logical network key.
func (c *Cluster) Endpoints(ctx context.Context, key string) ([]Endpoint, error) {
	pairs, err := c.store.List(ctx, endpointsPrefix(key))
	if err != nil {
		return nil, fmt.Errorf("list endpoints of %q: %w", key, err)
	}
	return decodeEndpoints(key, pairs), nil
}

// Network reads logical network key (kvstore.ErrNotFound if absent).
func (c *Cluster) Network(ctx context.Context, key string) (Network, error) {
	p, err := c.store.Get(ctx, configKey(key))
	if err != nil {
		return Network{}, err
	}
	var rec Network
	if err := kvstore.Decode(p.Value, &rec); err != nil {
		return Network{}, fmt.Errorf("logical network %q: %w", key, err)
	}
	return rec, nil
}

// decodeEndpoints picks the endpoint records out of pairs under
// networks/<key>/.
func decodeEndpoints(key string, pairs []*kvstore.Pair) []Endpoint {
	prefix := endpointsPrefix(key)
	var out []Endpoint
	for _, p := range pairs {
		if !strings.HasPrefix(p.Key, prefix) {
			continue
		}
		var ep Endpoint
		if err := kvstore.Decode(p.Value, &ep); err != nil {
			continue
		}
		out = append(out, ep)
	}
	return out
}

// Peer is one remote endpoint address: what the data plane programs.
type Peer struct {
	// EndpointID is shortened: a hexadecimal ID to its first 16
	// characters, as the peer records keep it (shortID).
	EndpointID string
	HostID     string
	IP         netip.Addr
	MAC        net.HardwareAddr
	VTEP       netip.Addr
}

// DesiredPeers is the set of remote peers host self should program for
// network n: every address of every endpoint record of n's incarnation
// that belongs to another member host. Sorted by IP, then endpoint.
func DesiredPeers(self string, n Network, eps []Endpoint) []Peer {
	var out []Peer
	for _, ep := range eps {
		if ep.HostID == self || ep.Incarnation != n.Incarnation {
			continue
		}
		if _, member := n.Hosts[ep.HostID]; !member {
			continue
		}
		mac, err := net.ParseMAC(ep.MAC)
		if err != nil {
			continue
		}
		vtep, err := netip.ParseAddr(ep.VTEP)
		if err != nil {
			continue
		}
		for _, a := range []string{ep.IPv4, ep.IPv6} {
			if a == "" {
				continue
			}
			pfx, err := netip.ParsePrefix(a)
			if err != nil {
				continue
			}
			out = append(out, Peer{EndpointID: shortID(ep.ID), HostID: ep.HostID, IP: pfx.Addr(), MAC: mac, VTEP: vtep})
		}
	}
	sortPeers(out)
	return out
}

// sortPeers sorts by IP, then endpoint.
func sortPeers(ps []Peer) {
	slices.SortFunc(ps, func(a, b Peer) int {
		if c := a.IP.Compare(b.IP); c != 0 {
			return c
		}
		return strings.Compare(a.EndpointID, b.EndpointID)
	})
}

// WatchPeers delivers the desired peers of logical network key (see
// DesiredPeers): once at start and after every change of the network's
// records that changes them. A snapshot whose peers equal the last ones
// delivered (a record rewritten without a peer field changing, a record
// of this host) is not delivered, and a record whose modify index did not
// change since the last snapshot is not decoded again. The channel closes
// when ctx ends. A snapshot without the network's config delivers no
// peers.
//
// It follows the whole network prefix at first and the config with the
// peer records (see PeerRecord) once a snapshot proves those equal to the
// endpoint records; back to the whole prefix when a member has no peer
// record or an audit finds one that disagrees. A snapshot that shows a
// member without a peer record is never delivered from the peer records:
// the whole prefix is read first.
//
// WatchPeers runs a PeerWatch in a goroutine of its own; a caller with a
// loop of its own drives a PeerWatch itself and saves that goroutine.
func (c *Cluster) WatchPeers(ctx context.Context, key string) (<-chan []Peer, error) {
	w, err := c.NewPeerWatch(ctx, key)
	if err != nil {
		return nil, err
	}
	out := make(chan []Peer)
	go func() {
		defer close(out)
		defer w.Close()
		for {
			select {
			case <-ctx.Done():
				return
			case snap, ok := <-w.Snapshots():
				peers, deliver, done := w.Snapshot(snap, ok)
				if done {
					return
				}
				if !deliver {
					continue
				}
				select {
				case out <- peers:
				case <-ctx.Done():
					return
				}
			case <-w.Audits():
				if w.Audit() {
					return
				}
			}
		}
	}()
	return out, nil
}

// PeerWatch is WatchPeers driven by its caller's loop: it receives from
// Snapshots and Audits and hands each receive to Snapshot or Audit, then
// calls Close once done. A PeerWatch is used by one goroutine.
type PeerWatch struct {
	c       *Cluster
	key     string
	ctx     context.Context
	wcancel context.CancelFunc
	ch      <-chan []*kvstore.Pair
	dec     *recordCache
	last    []Peer // Snapshot's last delivery
	sent    bool
	compact bool // following the config and the peer records
	audit   *time.Timer
	// The data plane entries Next last computed, and how they changed
	// (peerdelta.go).
	entries   map[dpEntry]int // entry → peers that give it
	vteps     map[netip.Addr]int
	delta     PeerDelta
	full      []Peer   // the peers, once built (fullOK)
	fullOK    bool     // full is the peers since the last change
	hosts     []string // the members whose peer records give the peers (compact)
	base      deltaBase
	computed  bool // the last Next computed the peers
	delivered bool // Next has delivered once
	// others is otherHosts of the config of modify index othersAt.
	others   []string
	othersAt uint64
}

// otherHosts is otherHosts of rec, the config the cache holds, made once
// per version of it (the slice is shared: not to be changed).
func (w *PeerWatch) otherHosts(rec Network) []string {
	if at := w.dec.config.index; at == 0 || at != w.othersAt {
		w.others, w.othersAt = otherHosts(w.c.cfg.HostID, rec), at
	}
	return w.others
}

// NewPeerWatch starts following logical network key's records until ctx
// ends or Close.
func (c *Cluster) NewPeerWatch(ctx context.Context, key string) (*PeerWatch, error) {
	wctx, wcancel := context.WithCancel(ctx)
	ch, err := c.store.Watch(wctx, networkPrefix(key))
	if err != nil {
		wcancel()
		return nil, fmt.Errorf("watch logical network %q: %w", key, err)
	}
	audit := time.NewTimer(c.cfg.PeerAudit)
	audit.Stop()
	return &PeerWatch{c: c, key: key, ctx: ctx, wcancel: wcancel, ch: ch, dec: newRecordCache(key), audit: audit}, nil
}

// Snapshots is the store's watch to receive from; it changes when the
// watch switches between the whole prefix and the peer records, so call
// it for every receive.
func (w *PeerWatch) Snapshots() <-chan []*kvstore.Pair { return w.ch }

// Audits fires when the peer records are due to be checked against the
// endpoint records (never while the whole prefix is followed).
func (w *PeerWatch) Audits() <-chan time.Time {
	if w.compact {
		return w.audit.C
	}
	return nil
}

// Snapshot handles one receive from Snapshots: it returns the peers to
// deliver when they differ from the last ones (deliver), and done when the
// watch ended (the store's channel closed, ctx ended, or a switch of the
// store's watch failed). A caller that programs the data plane by the
// difference uses Next instead.
func (w *PeerWatch) Snapshot(snap []*kvstore.Pair, ok bool) (peers []Peer, deliver, done bool) {
	if _, done := w.Next(snap, ok); done || !w.computed {
		return nil, false, done
	}
	peers = w.Peers()
	if w.sent && slices.EqualFunc(peers, w.last, samePeer) {
		return nil, false, false
	}
	w.last, w.sent = peers, true
	return peers, true, false
}

// Next handles one receive from Snapshots: deliver says the peers' data
// plane entries changed (Delta has how; Peers and VTEPs what they are now),
// or that these are the watch's first peers; done that the watch ended (as
// for Snapshot). A snapshot that changed one host's peer record costs the
// peers of that record, not of the network (issue 16, scale).
func (w *PeerWatch) Next(snap []*kvstore.Pair, ok bool) (deliver, done bool) {
	w.computed = false
	if !ok {
		return false, true
	}
	c, key := w.c, w.key
	rec, found, eps := w.dec.scan(snap)
	incremental := w.compact && w.base.valid && w.base.configIndex == w.dec.config.index
	w.base.valid = false // until the entries account for this scan
	if err := w.dec.unreadable; err != nil {
		c.log.Warn("network record unreadable (a newer release wrote it, or it is damaged): peers kept as the last readable record gives them", "key", key, "error", err)
		if !w.dec.config.ok {
			return false, false
		}
	}
	c.setCachedConfig(key, w.dec.config)
	if own, ok := w.dec.records[peerRecordKey(key, c.cfg.HostID)]; ok && own.ok {
		c.setOwnPeers(key, own.rec, own.index)
	}
	if !w.compact {
		c.setOwned(key, w.dec.ownedBy(c.cfg.HostID))
	}
	var hosts []string
	valid, why := w.compact, ""
	if found {
		hosts = w.otherHosts(rec)
		valid, why = w.dec.check(rec, hosts, eps, w.compact)
	}
	if w.compact && !valid {
		c.log.Info("peer watch reads the endpoint records again", "key", key, "reason", why)
		return false, !w.follow(false)
	}
	switch {
	case !found:
		w.resetTo(nil, nil)
	case !w.compact:
		w.resetTo(DesiredPeers(c.cfg.HostID, rec, eps), nil)
	case incremental:
		w.advance(rec, hosts)
	default:
		w.resetTo(w.dec.list(hosts), hosts)
	}
	if w.compact && found {
		w.base = deltaBase{valid: true, configIndex: w.dec.config.index}
	}
	w.computed = true
	// The snapshot proves the peer records: follow them from now on.
	if !w.compact && valid && !w.follow(true) {
		return false, true
	}
	deliver = !w.delivered || len(w.delta.Removed) != 0 || len(w.delta.Added) != 0
	w.delivered = true
	return deliver, false
}

// Audit handles a receive from Audits: it reads the whole prefix and goes
// back to following it when the peer records disagree with the endpoint
// records. It returns done when the watch ended.
func (w *PeerWatch) Audit() (done bool) {
	c, key := w.c, w.key
	pairs, err := c.store.List(w.ctx, networkPrefix(key))
	switch {
	case w.ctx.Err() != nil:
		return true
	case err != nil:
		c.log.Debug("peer record audit skipped", "key", key, "error", err)
	default:
		if _, ok, why := newRecordCache(key).peers(c.cfg.HostID, pairs, false); !ok {
			c.log.Warn("peer records disagree with the endpoint records (a host running an older version?); reading the endpoint records", "key", key, "reason", why)
			return !w.follow(false)
		}
		if k, ok := w.behind(pairs); ok {
			// The lean watch reads the records whose stamps changed; a
			// write without a stamp (an older release's) in the same
			// wake as another host's stamped one goes unseen until now.
			c.log.Info("peer watch behind the store at the audit (a change in flight, or a peer record written without a stamp by an older release); reading the peer records again", "key", key, "record", k)
			return !w.follow(true)
		}
	}
	w.audit.Reset(c.cfg.PeerAudit)
	return false
}

// behind says whether pairs (a List of the network's prefix) hold a config
// or peer record other than the last snapshot's, and names one.
func (w *PeerWatch) behind(pairs []*kvstore.Pair) (string, bool) {
	cfgKey, pprefix := configKey(w.key), peersPrefix(w.key)
	listed := map[string]bool{}
	for _, p := range pairs {
		switch {
		case p.Key == cfgKey:
			if p.ModifyIndex != w.dec.config.index {
				return p.Key, true
			}
		case strings.HasPrefix(p.Key, pprefix):
			listed[p.Key] = true
			if r, ok := w.dec.records[p.Key]; !ok || r.index != p.ModifyIndex {
				return p.Key, true
			}
		}
	}
	for k := range w.dec.records {
		if !listed[k] {
			return k, true // gone from the store, still in the watch
		}
	}
	return "", false
}

// follow switches the store's watch to the peer records (compact) or to
// the whole prefix. It returns false when the new watch could not start.
func (w *PeerWatch) follow(compact bool) bool {
	c, key := w.c, w.key
	w.compact = compact
	w.stopStore()
	prefix := networkPrefix(key)
	if compact {
		prefix = configKey(key)
		w.audit.Reset(c.cfg.PeerAudit)
	} else {
		w.audit.Stop()
	}
	wctx, wcancel := context.WithCancel(w.ctx)
	watch := c.store.Watch
	if compact {
		// Every member's peer record comes with every change: on
		// Consul, read only the records that changed (issue 16, scale).
		watch = func(ctx context.Context, prefix string) (<-chan []*kvstore.Pair, error) {
			return kvstore.WatchLean(ctx, c.store, prefix)
		}
	}
	ch, err := watch(wctx, prefix)
	if err != nil {
		wcancel()
		c.log.Error("peer watch stopped", "key", key, "error", err)
		return false
	}
	w.wcancel, w.ch = wcancel, ch
	c.log.Debug("peer watch switched", "key", key, "peer_records", compact)
	return true
}

// stopStore ends the store's watch and waits for its goroutine (the
// channel closes when it ends). Once stopped, ch is nil until follow
// starts another.
func (w *PeerWatch) stopStore() {
	if w.ch == nil {
		return
	}
	w.wcancel()
	for range w.ch {
	}
	w.wcancel, w.ch = nil, nil
}

// Close ends the store's watch, waits for it, and forgets what the watch
// recorded of the network.
func (w *PeerWatch) Close() {
	w.stopStore()
	w.audit.Stop()
	w.c.setOwned(w.key, nil)
	w.c.setCachedConfig(w.key, cachedConfig{})
}

// samePeer compares two peers field by field.
func samePeer(a, b Peer) bool {
	return a.EndpointID == b.EndpointID && a.HostID == b.HostID && a.IP == b.IP && a.VTEP == b.VTEP && bytes.Equal(a.MAC, b.MAC)
}

// recordCache keeps the decoded records of one network's watch by key and
// modify index, so each snapshot decodes only the records that changed.
type recordCache struct {
	key       string
	config    cachedConfig
	endpoints map[string]cachedEndpoint
	records   map[string]cachedRecord
	// unreadable: the last snapshot's config record could not be decoded
	// (a newer release wrote it, or it is damaged); config keeps the last
	// readable one, and the peers are derived from that.
	unreadable error
	// changed: the peer records the last scan found changed, added or
	// gone, with the peers each gave before (nil: none, or never derived).
	changed map[string][]Peer
	// pprefix is peersPrefix(key); kbuf a buffer the lookups by host
	// build a record's key in, so that they allocate nothing.
	pprefix string
	kbuf    []byte
}

// recordKey is host h's peer record key in kbuf; a map index of
// string(recordKey(h)) allocates nothing.
func (rc *recordCache) recordKey(h string) []byte {
	rc.kbuf = append(append(rc.kbuf[:0], rc.pprefix...), h...)
	return rc.kbuf
}

type cachedRecord struct {
	index uint64
	ok    bool
	rec   PeerRecord
	peers []Peer // rec.peers(), made at the first compact delivery
}

type cachedConfig struct {
	index uint64
	ok    bool
	rec   Network
}

type cachedEndpoint struct {
	index uint64
	ok    bool
	ep    Endpoint
}

// cachedConfig returns the config of logical network key that its peer
// watch last saw, if one runs and saw it.
func (c *Cluster) cachedConfig(key string) (cachedConfig, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cc, ok := c.configs[key]
	return cc, ok && cc.ok && cc.index != 0
}

// setCachedConfig records what the peer watch of key saw (not ok: none).
func (c *Cluster) setCachedConfig(key string, cc cachedConfig) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !cc.ok || cc.index == 0 {
		delete(c.configs, key)
		return
	}
	if c.configs == nil {
		c.configs = map[string]cachedConfig{}
	}
	c.configs[key] = cc
}

// setOwned replaces the indexes of this host's records of network key
// (nil: none known).
func (c *Cluster) setOwned(key string, idx map[string]uint64) {
	prefix := endpointsPrefix(key)
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.owned {
		if _, ok := idx[k]; !ok && strings.HasPrefix(k, prefix) {
			delete(c.owned, k)
		}
	}
	if len(idx) == 0 {
		return
	}
	if c.owned == nil {
		c.owned = map[string]uint64{}
	}
	for k, i := range idx {
		c.owned[k] = i
	}
}

// ownedBy returns the modify indexes of host's records in the last
// snapshot, by store key.
func (rc *recordCache) ownedBy(host string) map[string]uint64 {
	var out map[string]uint64
	for k, e := range rc.endpoints {
		if e.ok && e.index != 0 && e.ep.HostID == host {
			if out == nil {
				out = map[string]uint64{}
			}
			out[k] = e.index
		}
	}
	return out
}

// peerFields keeps of ep what DesiredPeers and ownedBy read: the cache
// holds a decoded record per endpoint of every watched network for the
// life of the watch, and the rest (Docker IDs, options, ports, times) is
// most of a record.
func peerFields(ep Endpoint) Endpoint {
	return Endpoint{ID: ep.ID, Incarnation: ep.Incarnation, HostID: ep.HostID, VTEP: ep.VTEP, IPv4: ep.IPv4, IPv6: ep.IPv6, MAC: ep.MAC}
}

func newRecordCache(key string) *recordCache {
	return &recordCache{key: key, endpoints: map[string]cachedEndpoint{}, records: map[string]cachedRecord{}, pprefix: peersPrefix(key)}
}

// peers derives the desired peers from a snapshot: of networks/<key>/
// (compact false: from the endpoint records) or of networks/<key>/config
// (compact true: from the peer records). ok says whether the peer records
// may be read instead of the endpoint records: every other member has a
// peer record of the incarnation, and (compact false) it lists exactly the
// member's endpoint records. why names the first host for which not.
func (rc *recordCache) peers(self string, pairs []*kvstore.Pair, compact bool) (peers []Peer, ok bool, why string) {
	rec, found, eps := rc.scan(pairs)
	if !found {
		return nil, compact, ""
	}
	hosts := otherHosts(self, rec)
	ok, why = rc.check(rec, hosts, eps, compact)
	if !compact {
		return DesiredPeers(self, rec, eps), ok, why
	}
	if !ok {
		return nil, false, why
	}
	return rc.list(hosts), true, ""
}

// scan reads a snapshot into the cache: it decodes the records whose
// modify index changed, forgets those that are gone, and notes in
// rc.changed what each changed peer record gave before. found says the
// snapshot has a readable config (rec, the last readable one when the
// snapshot's is not: see unreadable); eps are the endpoint records.
func (rc *recordCache) scan(pairs []*kvstore.Pair) (rec Network, found bool, eps []Endpoint) {
	cfgKey, prefix, pprefix := configKey(rc.key), endpointsPrefix(rc.key), rc.pprefix
	nrec, neps := 0, 0 // the snapshot's peer and endpoint records
	configSeen := false
	rc.unreadable = nil
	clear(rc.changed)
	for _, p := range pairs {
		switch {
		case p.Key == cfgKey:
			configSeen = true
			if rc.config.index != p.ModifyIndex || p.ModifyIndex == 0 {
				var r Network
				if err := kvstore.Decode(p.Value, &r); err != nil {
					// Not a removal: keep what the last readable config
					// says rather than withdraw every peer.
					rc.unreadable = err
				} else {
					rc.config = cachedConfig{index: p.ModifyIndex, ok: true, rec: r}
				}
			}
			found, rec = rc.config.ok, rc.config.rec
		case strings.HasPrefix(p.Key, pprefix):
			nrec++
			r, hit := rc.records[p.Key]
			if !hit || r.index != p.ModifyIndex || p.ModifyIndex == 0 {
				rc.noteChanged(p.Key, r)
				pr, err := decodePeerRecord(p.Value)
				r = cachedRecord{index: p.ModifyIndex, ok: err == nil, rec: pr}
				rc.records[p.Key] = r
			}
		case strings.HasPrefix(p.Key, prefix):
			neps++
			e, hit := rc.endpoints[p.Key]
			if !hit || e.index != p.ModifyIndex || p.ModifyIndex == 0 {
				var ep Endpoint
				e = cachedEndpoint{index: p.ModifyIndex, ok: kvstore.Decode(p.Value, &ep) == nil, ep: peerFields(ep)}
				rc.endpoints[p.Key] = e
			}
			if e.ok {
				eps = append(eps, e.ep)
			}
		}
	}
	// Each key of the snapshot is in the cache now: the cache holds
	// others only if it holds more (a snapshot's keys are distinct).
	if len(rc.endpoints) != neps || len(rc.records) != nrec {
		seen := make(map[string]bool, len(pairs))
		for _, p := range pairs {
			seen[p.Key] = true
		}
		for k := range rc.endpoints {
			if !seen[k] {
				delete(rc.endpoints, k)
			}
		}
		for k, r := range rc.records {
			if !seen[k] {
				rc.noteChanged(k, r)
				delete(rc.records, k)
			}
		}
	}
	if !configSeen {
		rc.config = cachedConfig{}
	}
	return rec, found, eps
}

// noteChanged records, the first time in a scan, what peer record k gave
// before it changed.
func (rc *recordCache) noteChanged(k string, before cachedRecord) {
	if _, noted := rc.changed[k]; noted {
		return
	}
	if rc.changed == nil {
		rc.changed = map[string][]Peer{}
	}
	rc.changed[k] = before.peers
}

// otherHosts are rec's members but self, sorted.
func otherHosts(self string, rec Network) []string {
	hosts := make([]string, 0, len(rec.Hosts))
	for h := range rec.Hosts {
		if h != self {
			hosts = append(hosts, h)
		}
	}
	slices.Sort(hosts)
	return hosts
}

// check says whether the peer records of hosts may be read instead of
// the endpoint records (see peers).
func (rc *recordCache) check(rec Network, hosts []string, eps []Endpoint, compact bool) (ok bool, why string) {
	var byHost map[string][]Endpoint // the full watch's records, by host
	if !compact {
		byHost = make(map[string][]Endpoint, len(hosts))
		for _, ep := range eps {
			byHost[ep.HostID] = append(byHost[ep.HostID], ep)
		}
	}
	for _, h := range hosts {
		r, has := rc.records[string(rc.recordKey(h))]
		switch {
		case !has || !r.ok:
			return false, "host " + h + " has no peer record"
		case r.rec.HostID != h || r.rec.Incarnation != rec.Incarnation:
			return false, "host " + h + " has a peer record of another incarnation"
		case !compact && !slices.Equal(r.rec.Endpoints, recordOf(h, rec.Incarnation, "", byHost[h]).Endpoints):
			return false, "the peer record of host " + h + " does not list its endpoint records"
		}
	}
	return true, ""
}

// hostPeers are the peers of host h's peer record, derived once per
// version of the record.
func (rc *recordCache) hostPeers(h string) []Peer {
	r := rc.records[string(rc.recordKey(h))]
	if r.peers == nil && len(r.rec.Endpoints) != 0 {
		r.peers = r.rec.peers()
		rc.records[peerRecordKey(rc.key, h)] = r
	}
	return r.peers
}

// list is the peers of hosts' peer records, sorted (sortPeers).
func (rc *recordCache) list(hosts []string) []Peer {
	// Each record's peers are derived once (the records that changed
	// since the last delivery now), and counted before the list is made,
	// so that it is allocated once at its size.
	n := 0
	for _, h := range hosts {
		n += len(rc.hostPeers(h))
	}
	peers := make([]Peer, 0, n)
	for _, h := range hosts {
		peers = append(peers, rc.records[string(rc.recordKey(h))].peers...)
	}
	sortPeers(peers)
	return peers
}

// View is this host's part of the cluster state, read at start.
type View struct {
	// Proven says the store shows this host: its host record or at least
	// one membership. An unproven view may be a wrong prefix, a token that
	// cannot read it, a changed identity or a lost embedded store; nothing
	// should be removed on its word.
	Proven bool
	// HostRecord says members/<host-id> exists. A reap removes it first,
	// so memberships without it are a reap stopped part way (the host
	// came back during it, or the reaper crashed): the view is partial.
	HostRecord bool
	// Networks are the logical networks this host is a member of.
	Networks []Network
	// Endpoints are this host's endpoint records in those networks.
	Endpoints []Endpoint
	// Peers are the desired remote peers of each network, by key.
	Peers map[string][]Peer
}

// View reads this host's networks, endpoints and peers. It also removes
// this host's endpoint records that no membership backs any more (left
// by a crash between two writes); call it before serving requests.
func (c *Cluster) View(ctx context.Context) (View, error) {
	v := View{Peers: map[string][]Peer{}}
	// The host record and the networks at once (issue 16: a restart
	// waits for both).
	hostErr := make(chan error, 1)
	go func() {
		_, err := c.store.Get(ctx, hostKey(c.cfg.HostID))
		hostErr <- err
	}()
	pairs, err := c.store.List(ctx, "networks/")
	if herr := <-hostErr; herr == nil {
		v.Proven, v.HostRecord = true, true
	} else if !errors.Is(herr, kvstore.ErrNotFound) {
		return View{}, fmt.Errorf("read host record %q: %w", c.cfg.HostID, herr)
	}
	if err != nil {
		return View{}, fmt.Errorf("list networks: %w", err)
	}
	byKey := map[string][]*kvstore.Pair{}
	var keys []string
	for _, p := range pairs {
		parts := strings.SplitN(p.Key, "/", 3)
		if len(parts) < 3 {
			continue
		}
		if _, ok := byKey[parts[1]]; !ok {
			keys = append(keys, parts[1])
		}
		byKey[parts[1]] = append(byKey[parts[1]], p)
	}
	for _, key := range keys {
		ps := byKey[key]
		var rec Network
		found := false
		for _, p := range ps {
			if p.Key != configKey(key) {
				continue
			}
			if err := kvstore.Decode(p.Value, &rec); err != nil {
				// Whether this host is a member cannot be told: acting on
				// it could remove running networks and their records.
				return View{}, fmt.Errorf("network record %s is unreadable (a newer release wrote it, or it is damaged): %w; this host keeps its state and retries", p.Key, err)
			}
			found = true
		}
		m, member := rec.Hosts[c.cfg.HostID]
		var kept []Endpoint
		for _, p := range ps {
			if !strings.HasPrefix(p.Key, endpointsPrefix(key)) {
				continue
			}
			var ep Endpoint
			if kvstore.Decode(p.Value, &ep) != nil || ep.HostID != c.cfg.HostID {
				continue
			}
			if found && member && ep.Incarnation == rec.Incarnation && slices.Contains(m.NetworkIDs, ep.NetworkID) {
				v.Endpoints = append(v.Endpoints, ep)
				kept = append(kept, ep)
				continue
			}
			c.log.Info("removing an endpoint record of this host that no membership backs", "key", key, "endpoint", ep.ID)
			if err := c.deleteIf(ctx, p, func(e *Endpoint) bool {
				return e.HostID == c.cfg.HostID && e.Incarnation == ep.Incarnation && e.NetworkID == ep.NetworkID
			}); err != nil {
				c.log.Warn("remove orphan endpoint record", "key", key, "endpoint", ep.ID, "error", err)
			}
		}
		if !found || !member {
			c.dropOwnPeers(ctx, key, ps)
			continue
		}
		v.Proven = true
		v.Networks = append(v.Networks, rec)
		v.Peers[key] = DesiredPeers(c.cfg.HostID, rec, decodeEndpoints(key, ps))
		c.repairOwnPeers(ctx, key, rec.Incarnation, kept, ps)
	}
	return v, nil
}

// repairOwnPeers rewrites this host's peer record of key if it does not
// list exactly its endpoint records kept, of incarnation, in snapshot ps (a host
// an older version ran, or a crash between two writes). A failure is
// logged: the peer watches of the other hosts read the endpoint records
// while the peer record disagrees with them.
func (c *Cluster) repairOwnPeers(ctx context.Context, key, incarnation string, kept []Endpoint, ps []*kvstore.Pair) {
	want := recordOf(c.cfg.HostID, incarnation, c.VTEP().String(), kept)
	for _, p := range ps {
		if p.Key != peerRecordKey(key, c.cfg.HostID) {
			continue
		}
		if cur, err := decodePeerRecord(p.Value); err == nil && cur.equal(want) {
			c.setOwnPeers(key, cur, p.ModifyIndex)
			return
		}
	}
	if err := c.syncOwnPeers(ctx, key, incarnation); err != nil {
		c.log.Warn("peer record not rewritten; other hosts read this host's endpoint records instead until it is", "key", key, "error", err)
		return
	}
	c.log.Info("peer record of this host rewritten from its endpoint records", "key", key, "endpoints", len(want.Endpoints))
}

// dropOwnPeers removes this host's peer record of a network it is no
// member of (a crash between two writes).
func (c *Cluster) dropOwnPeers(ctx context.Context, key string, ps []*kvstore.Pair) {
	for _, p := range ps {
		if p.Key != peerRecordKey(key, c.cfg.HostID) {
			continue
		}
		if err := c.store.DeleteCAS(ctx, p.Key, p.ModifyIndex); err != nil && !errors.Is(err, kvstore.ErrNotFound) && !errors.Is(err, kvstore.ErrConflict) {
			c.log.Warn("remove a peer record of this host that no membership backs", "key", key, "error", err)
		}
		c.forgetOwnPeers(key)
	}
}

// SetVTEP publishes a new underlay address for this host: in its host
// record, its memberships and its endpoint records, each by
// compare-and-set, so the other hosts' watches reprogram their peers. It
// carries on past failures and joins them; calling it again retries.
func (c *Cluster) SetVTEP(ctx context.Context, addr netip.Addr) error {
	if !addr.IsValid() {
		return errors.New("set vtep: no address")
	}
	addr = addr.Unmap()
	c.mu.Lock()
	c.vtep = addr
	c.mu.Unlock()
	vtep := addr.String()
	var errs []error
	if err := c.casLoop(ctx, hostKey(c.cfg.HostID), func(b []byte) ([]byte, bool, error) {
		var h Host
		if err := kvstore.Decode(b, &h); err != nil {
			return nil, false, err
		}
		if h.VTEP == vtep {
			return nil, false, nil
		}
		h.VTEP = vtep
		v, err := kvstore.Encode(h)
		return v, true, err
	}); err != nil {
		errs = append(errs, err)
	}
	pairs, err := c.store.List(ctx, "networks/")
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("set vtep: list networks: %w", err))...)
	}
	// Network by network, under the network's peer lock, from a list made
	// under it: CreateEndpoint and UpdateEndpoint read the VTEP and write
	// under that lock, so a record one of them wrote with the old VTEP
	// before this took the lock is in the list and rewritten, and one
	// written after reads the new VTEP. (Unlocked, a CreateEndpoint that
	// had read the old VTEP could write it after this rewrote the
	// network's records.)
	var keys []string
	for _, p := range pairs {
		k, _, ok := strings.Cut(strings.TrimPrefix(p.Key, "networks/"), "/")
		if ok && !slices.Contains(keys, k) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, key := range keys {
		errs = append(errs, c.republishVTEP(ctx, key, vtep)...)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("set vtep %s: %w", vtep, err)
	}
	c.log.Info("vtep republished", "vtep", vtep)
	return nil
}

// republishVTEP rewrites this host's membership, peer record and
// endpoint records of logical network key with vtep, under the network's
// peer lock.
func (c *Cluster) republishVTEP(ctx context.Context, key, vtep string) []error {
	mu := c.peerLock(key)
	mu.Lock()
	defer mu.Unlock()
	pairs, err := c.store.List(ctx, networkPrefix(key))
	if err != nil {
		return []error{fmt.Errorf("set vtep: list network %q: %w", key, err)}
	}
	var errs []error
	for _, p := range pairs {
		switch {
		case strings.HasSuffix(p.Key, "/config"):
			var rec Network
			if kvstore.Decode(p.Value, &rec) != nil {
				continue
			}
			if m, ok := rec.Hosts[c.cfg.HostID]; !ok || m.VTEP == vtep {
				continue
			}
			errs = append(errs, c.casLoop(ctx, p.Key, func(b []byte) ([]byte, bool, error) {
				var rec Network
				if err := kvstore.Decode(b, &rec); err != nil {
					return nil, false, err
				}
				m, ok := rec.Hosts[c.cfg.HostID]
				if !ok || m.VTEP == vtep {
					return nil, false, nil
				}
				m.VTEP = vtep
				rec.Hosts[c.cfg.HostID] = m
				v, err := kvstore.Encode(rec)
				return v, true, err
			}))
		case strings.HasSuffix(p.Key, "/config/peers/"+c.cfg.HostID):
			if r, err := decodePeerRecord(p.Value); err != nil || r.VTEP == vtep {
				continue
			}
			key := strings.TrimSuffix(strings.TrimPrefix(p.Key, "networks/"), "/config/peers/"+c.cfg.HostID)
			c.forgetOwnPeers(key)
			errs = append(errs, c.casLoop(ctx, p.Key, func(b []byte) ([]byte, bool, error) {
				r, err := decodePeerRecord(b)
				if err != nil {
					return nil, false, err
				}
				if r.VTEP == vtep {
					return nil, false, nil
				}
				r.VTEP = vtep
				return encodePeerRecord(r), true, nil
			}))
		case strings.Contains(p.Key, "/endpoints/"):
			var ep Endpoint
			if kvstore.Decode(p.Value, &ep) != nil || ep.HostID != c.cfg.HostID || ep.VTEP == vtep {
				continue
			}
			errs = append(errs, c.casLoop(ctx, p.Key, func(b []byte) ([]byte, bool, error) {
				var ep Endpoint
				if err := kvstore.Decode(b, &ep); err != nil {
					return nil, false, err
				}
				if ep.HostID != c.cfg.HostID || ep.VTEP == vtep {
					return nil, false, nil
				}
				ep.VTEP = vtep
				v, err := kvstore.Encode(ep)
				return v, true, err
			}))
		}
	}
	return errs
}

// casLoop rewrites key with fn by compare-and-set until it sticks. fn
// returns write=false to leave the key alone. A missing key is success.
func (c *Cluster) casLoop(ctx context.Context, key string, fn func([]byte) (val []byte, write bool, err error)) error {
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		p, err := c.store.Get(ctx, key)
		if errors.Is(err, kvstore.ErrNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %q: %w", key, err)
		}
		val, write, err := fn(p.Value)
		if err != nil {
			return fmt.Errorf("%q: %w", key, err)
		}
		if !write {
			return nil
		}
		err = c.store.CAS(ctx, key, val, p.ModifyIndex)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return fmt.Errorf("write %q: %w", key, err)
		}
		return nil
	}
	return fmt.Errorf("write %q: gave up after %d concurrent updates", key, maxCASAttempts)
}
