package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"consul-overlay/kvstore"
)

// Peer records: what a host's peer watch reads (issue 16, scale).
//
// A host watching networks/<key>/ got the whole prefix, every endpoint
// record in full (about 870 bytes each with Consul's framing), on every
// change of any of them: the bytes of one change grew with hosts ×
// endpoints, and at 50 hosts a burst of attaches kept the Consul server
// too busy to answer. Each member host now also keeps one compact record
// of its endpoints in the network,
//
//	networks/<key>/config/peers/<host-id>   PeerRecord
//
// (host, incarnation, VTEP, and one short line per endpoint: ID, MAC,
// addresses), written in the same transaction as the endpoint record it
// follows. A peer watch follows networks/<key>/config, which covers the
// config and the peer records but not the endpoint records: a change
// costs each watcher one record per host instead of one per endpoint, and
// the watcher decodes only the record that changed. This is Flannel's
// layout (one lease per host), kept beside the endpoint records, which
// stay the source of truth for everything else.
//
// The compact watch is used only while it is proven equal to the endpoint
// records: the watch starts on the whole prefix and switches when, in one
// snapshot, every other member host has a peer record of the network's
// incarnation that lists exactly its endpoint records. It goes back to
// the whole prefix when a member has no peer record (a host running an
// older version, during a rolling upgrade), and an audit (one list of the
// whole prefix every Config.PeerAudit) catches a host whose records and
// peer record disagree (one downgraded to an older version that writes
// endpoint records only). So a mixed cluster works, at the old cost.

// PeerRecord is one host's endpoints in one logical network, at
// networks/<key>/config/peers/<host-id>.
type PeerRecord struct {
	HostID      string `json:"host_id"`
	Incarnation string `json:"incarnation"`
	VTEP        string `json:"vtep"`
	// Endpoints are "<endpoint-id> <mac> <address> [<address>]", one per
	// endpoint record of the host in this incarnation, sorted; the ID is
	// shortened (shortID) and the value is stored in binary (peercodec.go).
	Endpoints []string `json:"endpoints"`
}

// DefaultPeerAudit is how often a compact peer watch checks the peer
// records against the endpoint records.
const DefaultPeerAudit = 5 * time.Minute

func peersPrefix(key string) string         { return configKey(key) + "/peers/" }
func peerRecordKey(key, host string) string { return peersPrefix(key) + host }

// networkOf splits k, a key under networks/, into the network's key and
// the rest (ok false: not such a key).
func networkOf(k string) (key, tail string, ok bool) {
	rest, ok := strings.CutPrefix(k, "networks/")
	if !ok {
		return "", "", false
	}
	key, tail, ok = strings.Cut(rest, "/")
	return key, tail, ok && key != ""
}

// stampRule stamps the keys a compact peer watch follows: a network's
// config record and its peer records (kvstore.Stamped); the watch's
// prefix is the config key.
func stampRule(k string) (string, bool) {
	key, tail, ok := networkOf(k)
	if !ok {
		return "", false
	}
	host, peer := strings.CutPrefix(tail, "config/peers/")
	switch {
	case tail == "config":
	case peer && host != "" && !strings.Contains(host, "/"):
	default:
		return "", false
	}
	return configKey(key), true
}

// parseStamp parses k as the stamp of a network's config or peer record
// (kvstore.ParseStamp under the network's config key).
func parseStamp(k string) (record, nonce string, ok bool) {
	key, _, ok := networkOf(k)
	if !ok {
		return "", "", false
	}
	return kvstore.ParseStamp(configKey(key), k)
}

// IsStamp says whether k is the stamp of a network's config or peer
// record, not a record.
func IsStamp(k string) bool {
	_, _, ok := parseStamp(k)
	return ok
}

// StampErrors checks the stamps in ps (a List that covers the networks):
// every stamped record has exactly one stamp, written with its last change
// or after it, and every stamp stamps a listed record. Every write of
// this release keeps that; a write of an older one leaves a record
// without a stamp, or newer than it.
func StampErrors(ps []*kvstore.Pair) []string {
	type stamp struct {
		p          *kvstore.Pair
		rec, nonce string
	}
	index := map[string]uint64{}
	var stamps []stamp
	for _, p := range ps {
		if rec, nonce, ok := parseStamp(p.Key); ok {
			stamps = append(stamps, stamp{p, rec, nonce})
		} else {
			index[p.Key] = p.ModifyIndex
		}
	}
	var errs []string
	count := map[string]int{}
	for _, st := range stamps {
		at, ok := index[st.rec]
		switch {
		case st.rec == "" || st.nonce == "":
			errs = append(errs, fmt.Sprintf("malformed stamp %q", st.p.Key))
		case !ok:
			errs = append(errs, fmt.Sprintf("stamp %q of %q, which is gone", st.p.Key, st.rec))
		case st.p.ModifyIndex < at:
			errs = append(errs, fmt.Sprintf("stamp %q (index %d) older than its record (index %d)", st.p.Key, st.p.ModifyIndex, at))
		}
		count[st.rec]++
	}
	for k := range index {
		if _, ok := stampRule(k); ok && count[k] != 1 {
			errs = append(errs, fmt.Sprintf("record %q has %d stamps, want 1", k, count[k]))
		}
	}
	slices.Sort(errs)
	return errs
}

// peerEntry is ep's line in its host's peer record.
func peerEntry(ep Endpoint) string {
	var b strings.Builder
	b.WriteString(shortID(ep.ID))
	b.WriteByte(' ')
	b.WriteString(canonicalMAC(ep.MAC))
	for _, a := range []string{ep.IPv4, ep.IPv6} {
		if a == "" {
			continue
		}
		p, err := netip.ParsePrefix(a)
		if err != nil {
			continue // DesiredPeers skips it too
		}
		b.WriteByte(' ')
		b.WriteString(p.Addr().String())
	}
	return b.String()
}

// entryID is e's endpoint ID, shortened (shortID).
func entryID(e string) string {
	id, _, _ := strings.Cut(e, " ")
	return id
}

// recordOf is host's peer record built from eps (only host's records of
// incarnation count).
func recordOf(host, incarnation, vtep string, eps []Endpoint) PeerRecord {
	r := PeerRecord{HostID: host, Incarnation: incarnation, VTEP: vtep, Endpoints: []string{}}
	for _, ep := range eps {
		if ep.HostID == host && ep.Incarnation == incarnation {
			r.Endpoints = append(r.Endpoints, peerEntry(ep))
		}
	}
	slices.Sort(r.Endpoints)
	return r
}

// with returns r listing ep (replacing a line of the same ID).
func (r PeerRecord) with(ep Endpoint) PeerRecord {
	out := r.without(ep.ID)
	out.Endpoints = append(out.Endpoints, peerEntry(ep))
	slices.Sort(out.Endpoints)
	return out
}

// without returns r without endpoint id.
func (r PeerRecord) without(id string) PeerRecord {
	id = shortID(id)
	out := r
	out.Endpoints = make([]string, 0, len(r.Endpoints))
	for _, e := range r.Endpoints {
		if entryID(e) != id {
			out.Endpoints = append(out.Endpoints, e)
		}
	}
	return out
}

func (r PeerRecord) lists(id string) bool {
	id = shortID(id)
	return slices.ContainsFunc(r.Endpoints, func(e string) bool { return entryID(e) == id })
}

func (r PeerRecord) equal(o PeerRecord) bool {
	return r.HostID == o.HostID && r.Incarnation == o.Incarnation && r.VTEP == o.VTEP && slices.Equal(r.Endpoints, o.Endpoints)
}

// peers are the record's peers, as DesiredPeers gives them.
func (r PeerRecord) peers() []Peer {
	vtep, err := netip.ParseAddr(r.VTEP)
	if err != nil {
		return nil
	}
	var out []Peer
	for _, e := range r.Endpoints {
		f := strings.Fields(e)
		if len(f) < 3 {
			continue
		}
		mac, err := net.ParseMAC(f[1])
		if err != nil {
			continue
		}
		for _, a := range f[2:] {
			ip, err := netip.ParseAddr(a)
			if err != nil {
				continue
			}
			out = append(out, Peer{EndpointID: f[0], HostID: r.HostID, IP: ip, MAC: mac, VTEP: vtep})
		}
	}
	return out
}

// ownPeers is this host's peer record of one network as last written or
// seen, with its modify index (0: absent).
type ownPeers struct {
	rec   PeerRecord
	index uint64
}

// peerLock serializes this host's writes to its peer record of key, so
// its own concurrent calls never conflict with each other.
func (c *Cluster) peerLock(key string) *sync.Mutex {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.peerMu == nil {
		c.peerMu = map[string]*sync.Mutex{}
	}
	m, ok := c.peerMu[key]
	if !ok {
		m = &sync.Mutex{}
		c.peerMu[key] = m
	}
	return m
}

// ownPeerRecord returns this host's peer record of key and its index, from
// the cache or the store (index 0: absent). An unreadable record reads as
// empty at its index, so the next write replaces it.
func (c *Cluster) ownPeerRecord(ctx context.Context, key string) (PeerRecord, uint64, error) {
	c.mu.Lock()
	op, ok := c.own[key]
	c.mu.Unlock()
	if ok {
		return op.rec, op.index, nil
	}
	return c.storedOwnPeerRecord(ctx, key)
}

// storedOwnPeerRecord is ownPeerRecord read from the store, whatever the
// cache holds.
func (c *Cluster) storedOwnPeerRecord(ctx context.Context, key string) (PeerRecord, uint64, error) {
	p, err := c.store.Get(ctx, peerRecordKey(key, c.cfg.HostID))
	if errors.Is(err, kvstore.ErrNotFound) {
		return PeerRecord{}, 0, nil
	}
	if err != nil {
		return PeerRecord{}, 0, fmt.Errorf("read peer record of %q: %w", key, err)
	}
	r, err := decodePeerRecord(p.Value)
	if err != nil {
		r = PeerRecord{}
	}
	return r, p.ModifyIndex, nil
}

// setOwnPeers records this host's peer record of key at index; index 0
// (unknown or absent) forgets it, so the next write reads it. A record
// older than the one known is ignored.
func (c *Cluster) setOwnPeers(key string, r PeerRecord, index uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if index == 0 {
		delete(c.own, key)
		return
	}
	if cur, ok := c.own[key]; ok && cur.index >= index {
		return
	}
	if c.own == nil {
		c.own = map[string]ownPeers{}
	}
	c.own[key] = ownPeers{rec: r, index: index}
}

func (c *Cluster) forgetOwnPeers(key string) { c.setOwnPeers(key, PeerRecord{}, 0) }

// MaxPeerRecord is the largest peer record written: Consul refuses a
// value over 512 KiB. At about 21 bytes an IPv4 endpoint (37 with an IPv6
// address too) it holds some 10,000 to 19,000 endpoints of one host in one
// network.
const MaxPeerRecord = 400 << 10

// ErrTooManyEndpoints: this host's peer record of a network is full.
var ErrTooManyEndpoints = errors.New("too many endpoints of this host in one network")

// peerOp writes r as this host's peer record of key: a create when index
// is 0, else a compare-and-set on index.
func (c *Cluster) peerOp(key string, r PeerRecord, index uint64) (kvstore.Op, error) {
	val := encodePeerRecord(r)
	if len(val) > MaxPeerRecord {
		return kvstore.Op{}, fmt.Errorf("peer record of logical network %q: %d endpoints of this host take %d bytes, more than %d: %w", key, len(r.Endpoints), len(val), MaxPeerRecord, ErrTooManyEndpoints)
	}
	if index == 0 {
		return kvstore.Op{Verb: kvstore.OpCreate, Key: peerRecordKey(key, c.cfg.HostID), Value: val}, nil
	}
	return kvstore.Op{Verb: kvstore.OpCAS, Key: peerRecordKey(key, c.cfg.HostID), Value: val, Index: index}, nil
}

// syncOwnPeers rewrites this host's peer record of logical network key
// from its endpoint records of incarnation, if it differs: the repair
// after a crash between two writes, after a sweep, and on the first start
// of this version on a host whose records an older one wrote.
func (c *Cluster) syncOwnPeers(ctx context.Context, key, incarnation string) error {
	mu := c.peerLock(key)
	mu.Lock()
	defer mu.Unlock()
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		c.forgetOwnPeers(key)
		cur, index, err := c.ownPeerRecord(ctx, key)
		if err != nil {
			return err
		}
		eps, err := c.Endpoints(ctx, key)
		if err != nil {
			return err
		}
		vtep := c.VTEP().String()
		if c.acting && cur.VTEP != "" {
			vtep = cur.VTEP
		}
		want := recordOf(c.cfg.HostID, incarnation, vtep, eps)
		if index != 0 && cur.equal(want) {
			c.setOwnPeers(key, cur, index)
			return nil
		}
		op, err := c.peerOp(key, want, index)
		if err != nil {
			return err
		}
		at, err := kvstore.TxnIndex(ctx, c.store, []kvstore.Op{op})
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return fmt.Errorf("write peer record of %q: %w", key, err)
		}
		c.setOwnPeers(key, want, at)
		c.log.Debug("peer record rewritten from the endpoint records", "key", key, "endpoints", len(want.Endpoints))
		return nil
	}
	return fmt.Errorf("write peer record of %q: gave up after %d concurrent updates", key, maxCASAttempts)
}

// sweepPeerRecords deletes the peer records of key that match, each only
// if unchanged since it was read.
func (c *Cluster) sweepPeerRecords(ctx context.Context, key string, match func(PeerRecord) bool) error {
	pairs, err := c.store.List(ctx, peersPrefix(key))
	if err != nil {
		return fmt.Errorf("list peer records of %q: %w", key, err)
	}
	var errs []error
	for _, p := range pairs {
		r, err := decodePeerRecord(p.Value)
		if err != nil {
			r = PeerRecord{HostID: strings.TrimPrefix(p.Key, peersPrefix(key))}
		}
		if !match(r) {
			continue
		}
		if err := c.store.DeleteCAS(ctx, p.Key, p.ModifyIndex); err != nil && !errors.Is(err, kvstore.ErrNotFound) && !errors.Is(err, kvstore.ErrConflict) {
			errs = append(errs, fmt.Errorf("remove peer record %q: %w", p.Key, err))
		}
		if r.HostID == c.cfg.HostID {
			c.forgetOwnPeers(key)
		}
	}
	return errors.Join(errs...)
}
