package cluster

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"consul-overlay/kvstore"
)

// Evicted says what EvictHost removed.
type Evicted struct {
	// Left are the logical networks the host was removed from.
	Left []string
	// Removed are those of Left it was the last member of: removed with
	// their VNI and subnet reservations.
	Removed []string
	// Node is the host's node name as its records gave it ("" if none
	// did).
	Node string
}

// EvictHost removes host hostID, which the cluster has declared gone,
// from the cluster state, exactly as the host itself would by leaving
// every logical network: for each network it is a member of, its endpoint
// records go, then its membership (every Docker NetworkID of it), and a
// network it was the last member of goes with its VNI and subnet
// reservations (Leave's last-leaver path). Endpoint records of the host in
// networks it is no member of (left by a crash) are removed too, then its
// join records; its members/<host-id> record goes first. Other hosts' watches
// then withdraw its peers.
//
// Every write is the compare-and-set or transaction Leave makes, so two
// hosts evicting one host at once, or a host joining a network meanwhile,
// are safe; EvictHost is idempotent. It refuses this Cluster's own host.
func (c *Cluster) EvictHost(ctx context.Context, hostID string) (Evicted, error) {
	var ev Evicted
	if hostID == "" || strings.ContainsAny(hostID, "/ ") {
		return ev, fmt.Errorf("evict host %q: not a host ID", hostID)
	}
	if hostID == c.cfg.HostID {
		return ev, fmt.Errorf("evict host %s: this is this host", hostID)
	}
	if f, ok := kvstore.FenceOf(ctx); ok {
		// Every write of the eviction holds only while the fence does
		// (the reaper: the gone host's record is the one it judged).
		c = &Cluster{cfg: c.cfg, log: c.log, store: kvstore.Fence(c.store, f), vtep: c.VTEP(), hook: c.hook}
	}
	pairs, err := c.store.List(ctx, "networks/")
	if err != nil {
		return ev, fmt.Errorf("evict host %s: list logical networks: %w", hostID, err)
	}
	var keys []string
	members := map[string]Member{}
	for _, p := range pairs {
		rest, ok := strings.CutPrefix(p.Key, "networks/")
		if !ok {
			continue
		}
		key, tail, ok := strings.Cut(rest, "/")
		if !ok {
			continue
		}
		if tail == "config" {
			var rec Network
			if err := kvstore.Decode(p.Value, &rec); err != nil {
				c.log.Warn("evict: skip unreadable network record", "key", p.Key, "error", err)
				continue
			}
			if m, ok := rec.Hosts[hostID]; ok {
				members[key] = m
				if ev.Node == "" {
					ev.Node = m.Node
				}
			}
		}
		if len(keys) == 0 || keys[len(keys)-1] != key {
			keys = append(keys, key)
		}
	}
	if node, err := c.hostNode(ctx, hostID); err == nil && node != "" {
		ev.Node = node
	} else if err != nil {
		return ev, err
	}
	// members/<id> goes first: an eviction stopped part way (a crash, or
	// the reaper's fence when the host takes its record back) leaves it
	// missing, which the host's own check (reaper.CheckSelf) reads as an
	// eviction and repairs (reaper.Reassert), and which the next reap of a
	// host still gone finishes.
	if err := c.store.Delete(ctx, hostKey(hostID)); err != nil {
		return ev, fmt.Errorf("evict host %s: remove %s: %w", hostID, hostKey(hostID), err)
	}
	var errs []error
	for _, key := range keys {
		m, member := members[key]
		if member {
			as := c.as(hostID, m.Node)
			ids := append([]string(nil), m.NetworkIDs...)
			sort.Strings(ids)
			for _, id := range ids {
				if err := as.Leave(ctx, key, id); err != nil {
					errs = append(errs, fmt.Errorf("evict host %s: %w", hostID, err))
				}
			}
			ev.Left = append(ev.Left, key)
			if _, err := c.store.Get(ctx, configKey(key)); errors.Is(err, kvstore.ErrNotFound) {
				ev.Removed = append(ev.Removed, key)
			}
			c.log.Info("evicted host left logical network", "host", hostID, "node", m.Node, "key", key, "network_ids", ids)
		}
		// Records of the host the membership did not cover (a crash
		// between a record and its membership's removal).
		if err := c.sweep(ctx, key, func(ep *Endpoint) bool { return ep.HostID == hostID }); err != nil {
			errs = append(errs, fmt.Errorf("evict host %s: %w", hostID, err))
		}
		if err := c.sweepPeerRecords(ctx, key, func(r PeerRecord) bool { return r.HostID == hostID }); err != nil {
			errs = append(errs, fmt.Errorf("evict host %s: %w", hostID, err))
		}
	}
	if err := c.deleteJoinsOf(ctx, hostID); err != nil {
		errs = append(errs, fmt.Errorf("evict host %s: %w", hostID, err))
	}
	if len(errs) > 0 {
		return ev, errors.Join(errs...)
	}
	return ev, nil
}

// as returns a Cluster acting as host hostID on the same store, to remove
// its state with the host's own code paths.
func (c *Cluster) as(hostID, node string) *Cluster {
	cfg := c.cfg
	cfg.HostID = hostID
	if node == "" {
		node = hostID
	}
	cfg.Node = node
	return &Cluster{cfg: cfg, log: c.log, store: c.store, vtep: c.VTEP(), hook: c.hook, acting: true}
}

// hostNode reads the node name of members/<hostID>; "" if there is none.
func (c *Cluster) hostNode(ctx context.Context, hostID string) (string, error) {
	p, err := c.store.Get(ctx, hostKey(hostID))
	if errors.Is(err, kvstore.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read %s: %w", hostKey(hostID), err)
	}
	var h Host
	if kvstore.Decode(p.Value, &h) != nil {
		return "", nil
	}
	return h.Node, nil
}

// HostRecorded reports whether members/<hostID> exists: a host that had
// memberships and finds its record gone was evicted while it was away.
func (c *Cluster) HostRecorded(ctx context.Context, hostID string) (bool, error) {
	_, err := c.store.Get(ctx, hostKey(hostID))
	if errors.Is(err, kvstore.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", hostKey(hostID), err)
	}
	return true, nil
}
