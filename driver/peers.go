package driver

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// peerID identifies one programmed neighbour: the address, its MAC and the
// VTEP behind it. A changed MAC or VTEP is a different peer.
func peerID(p vxlan.Peer) string {
	return fmt.Sprintf("%d/%s/%s/%s", p.VNI, p.IP, p.MAC, p.VTEP)
}

// remotePeers derives the peers to program from a network's endpoint
// records: every address of every endpoint on another node.
func remotePeers(vni uint32, self string, eps []*endpointRecord) map[string]vxlan.Peer {
	out := map[string]vxlan.Peer{}
	for _, ep := range eps {
		if ep.Node == self {
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
			p := vxlan.Peer{VNI: vni, IP: pfx.Addr(), MAC: mac, VTEP: vtep}
			out[peerID(p)] = p
		}
	}
	return out
}

// decodeEndpoints picks the endpoint records out of a watch snapshot of
// networks/<key>/.
func decodeEndpoints(key string, pairs []*kvstore.Pair) []*endpointRecord {
	prefix := endpointsPrefix(key)
	var out []*endpointRecord
	for _, p := range pairs {
		if !strings.HasPrefix(p.Key, prefix) {
			continue
		}
		var ep endpointRecord
		if err := kvstore.Decode(p.Value, &ep); err != nil {
			continue
		}
		out = append(out, &ep)
	}
	return out
}

// watchPeers keeps the kernel's peers of one network equal to the remote
// endpoints in the store, until ctx ends. A failed kernel write is retried
// at the next change or after ResyncInterval.
func (d *Driver) watchPeers(ctx context.Context, n *localNetwork) {
	ch, err := d.store.Watch(ctx, networkPrefix(n.rec.Key))
	if err != nil {
		d.log.Error("watch peers", "network", short(n.id), "logical", n.rec.Key, "error", err)
		return
	}
	var last []*kvstore.Pair
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case snap, ok := <-ch:
			if !ok {
				return
			}
			last = snap
		case <-retry.C:
		}
		if last == nil {
			continue
		}
		if failed := d.syncPeers(ctx, n, remotePeers(n.rec.VNI, d.cfg.Node, decodeEndpoints(n.rec.Key, last))); failed > 0 {
			retry.Reset(d.cfg.ResyncInterval)
		}
	}
}

// syncPeers programs the difference between the wanted and the programmed
// peers of a network and returns how many kernel writes failed.
func (d *Driver) syncPeers(ctx context.Context, n *localNetwork, want map[string]vxlan.Peer) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	failed := 0
	for id, p := range n.peers {
		if _, ok := want[id]; ok {
			continue
		}
		if err := d.dp.DeletePeer(ctx, p); err != nil {
			d.log.Warn("remove peer", "network", short(n.id), "peer", p.IP, "vtep", p.VTEP, "error", err)
			failed++
			continue
		}
		delete(n.peers, id)
		d.log.Debug("peer removed", "network", short(n.id), "peer", p.IP, "vtep", p.VTEP)
	}
	for id, p := range want {
		if _, ok := n.peers[id]; ok {
			continue
		}
		if err := d.dp.AddPeer(ctx, p); err != nil {
			d.log.Warn("add peer", "network", short(n.id), "peer", p.IP, "vtep", p.VTEP, "error", err)
			failed++
			continue
		}
		n.peers[id] = p
		d.log.Debug("peer added", "network", short(n.id), "peer", p.IP, "vtep", p.VTEP)
	}
	return failed
}

// restore rebuilds the driver's view from the store (the networks this
// node has joined and its endpoints), reconciles the kernel to it, and
// starts the peer watches. Devices of networks that no longer exist are
// removed by the reconcile.
func (d *Driver) restore(ctx context.Context) error {
	pairs, err := d.store.List(ctx, "networks/")
	if err != nil {
		return fmt.Errorf("list networks: %w", err)
	}
	type joined struct {
		id  string
		rec networkRecord
	}
	var nets []joined
	byKey := map[string][]*kvstore.Pair{}
	for _, p := range pairs {
		parts := strings.SplitN(p.Key, "/", 3)
		if len(parts) < 3 {
			continue
		}
		byKey[parts[1]] = append(byKey[parts[1]], p)
	}
	var state vxlan.State
	var local []*endpointRecord
	peers := map[string]map[string]vxlan.Peer{}
	for key, ps := range byKey {
		var rec networkRecord
		found := false
		for _, p := range ps {
			if p.Key == configKey(key) {
				found = kvstore.Decode(p.Value, &rec) == nil
			}
		}
		if !found {
			continue
		}
		m, ok := rec.Hosts[d.cfg.Node]
		if !ok {
			continue
		}
		nets = append(nets, joined{id: m.NetworkID, rec: rec})
		state.Networks = append(state.Networks, kernelNetwork(rec))
		eps := decodeEndpoints(key, ps)
		for _, ep := range eps {
			if ep.Node != d.cfg.Node {
				continue
			}
			mac, err := net.ParseMAC(ep.MAC)
			if err != nil {
				continue
			}
			local = append(local, ep)
			state.Endpoints = append(state.Endpoints, vxlan.Endpoint{ID: ep.ID, VNI: rec.VNI, MAC: mac})
		}
		pp := remotePeers(rec.VNI, d.cfg.Node, eps)
		peers[m.NetworkID] = pp
		for _, p := range pp {
			state.Peers = append(state.Peers, p)
		}
	}
	ch, err := d.dp.Reconcile(ctx, state)
	if err != nil {
		return fmt.Errorf("reconcile kernel: %w", err)
	}
	d.log.Info("state restored", "networks", len(nets), "endpoints", len(local), "kernel_changes", fmt.Sprintf("%+v", ch))
	d.mu.Lock()
	for _, ep := range local {
		d.endpoints[ep.ID] = ep
	}
	d.mu.Unlock()
	for _, j := range nets {
		d.addLocalNetwork(j.id, j.rec, peers[j.id])
	}
	return nil
}
