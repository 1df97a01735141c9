package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/vxlan"
)

// The driver keeps a copy of its own state on disk (Config.SnapshotPath,
// the plugin's DATA_DIR/driver-state.json): the logical networks its
// Docker networks are bound to and its endpoints, joined or not. The store
// is the truth; the copy is for one case only. A host that was evicted
// while it was away (cut off from Consul longer than HOST_GRACE) and
// restarts before its liveness check re-asserted its state finds nothing
// of itself in the store, while its containers still run. Without the copy
// it cannot tell what they use, so it can neither serve nor re-assert, and
// it refused every call until someone removed the containers. With it, the
// restore takes its networks and endpoints from the copy, keeps everything
// in the kernel, and the liveness check re-asserts them (reaper.Heal).
//
// The copy is written after a change (batched over snapshotDelay: a
// change in the last 50 ms before a kill -9 may be missing) and
// compared every snapshotEvery, never before the restore has succeeded,
// and only when something changed. It is not fsynced: a kill -9 keeps
// what the kernel holds; a machine crash takes the containers with it. It
// is trusted only by the same host identity on the same store
// (Config.StoreTag), and only to keep what containers run.

// SnapshotName is the copy's file name in DATA_DIR.
const SnapshotName = "driver-state.json"

const (
	snapshotSchema = 1
	snapshotDelay  = 50 * time.Millisecond
	snapshotEvery  = time.Minute
)

// snapshot is the file's content.
type snapshot struct {
	Schema int    `json:"schema"`
	HostID string `json:"host_id"`
	// Store names the store the state is in (Config.StoreTag).
	Store    string             `json:"store"`
	Networks []snapshotNetwork  `json:"networks"`
	Endpoint []cluster.Endpoint `json:"endpoints"`
}

// snapshotNetwork is one logical network and this host's Docker networks
// bound to it.
type snapshotNetwork struct {
	Network    cluster.Network `json:"network"`
	NetworkIDs []string        `json:"network_ids"`
}

// snapshotChanged asks the writer to write the copy soon.
func (d *Driver) snapshotChanged() {
	select {
	case d.snapKick <- struct{}{}:
	default:
	}
}

// takeSnapshot encodes the driver's state now.
func (d *Driver) takeSnapshot() ([]byte, error) {
	s := snapshot{Schema: snapshotSchema, HostID: d.cfg.HostID, Store: d.cfg.StoreTag}
	d.mu.Lock()
	for _, l := range d.logicals {
		ids := make([]string, 0, len(l.ids))
		for id := range l.ids {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		s.Networks = append(s.Networks, snapshotNetwork{Network: l.rec, NetworkIDs: ids})
	}
	for _, ep := range d.endpoints {
		if ep.removed {
			continue
		}
		rec := ep.rec
		if ep.left {
			rec.Sandbox = ""
		}
		s.Endpoint = append(s.Endpoint, rec)
	}
	d.mu.Unlock()
	slices.SortFunc(s.Networks, func(a, b snapshotNetwork) int { return strings.Compare(a.Network.Key, b.Network.Key) })
	slices.SortFunc(s.Endpoint, func(a, b cluster.Endpoint) int { return strings.Compare(a.ID, b.ID) })
	return json.Marshal(s)
}

// writeSnapshots keeps the copy up to date until ctx ends, then writes it
// a last time. It runs once the restore succeeded.
func (d *Driver) writeSnapshots(ctx context.Context) {
	if d.cfg.SnapshotPath == "" {
		return
	}
	// Temporary files a kill -9 left in the middle of a write.
	if old, _ := filepath.Glob(filepath.Join(filepath.Dir(d.cfg.SnapshotPath), "."+filepath.Base(d.cfg.SnapshotPath)+".*")); len(old) > 0 {
		for _, f := range old {
			os.Remove(f)
		}
	}
	var last []byte
	write := func() {
		b, err := d.takeSnapshot()
		if err != nil {
			d.log.Error("state copy not encoded", "error", err)
			return
		}
		if bytes.Equal(b, last) {
			return
		}
		if err := writeFileAtomic(d.cfg.SnapshotPath, b); err != nil {
			d.log.Warn("state copy not written to DATA_DIR; a restart after an eviction cannot take back what containers run from it", "path", d.cfg.SnapshotPath, "error", err)
			return
		}
		last = b
	}
	write()
	tick := time.NewTicker(snapshotEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			write()
			return
		case <-tick.C:
		case <-d.snapKick:
			select {
			case <-ctx.Done():
			case <-time.After(snapshotDelay):
			}
		}
		write()
	}
}

// writeFileAtomic replaces path with b: a reader sees the old file or the
// new one, never a part.
func writeFileAtomic(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// loadSnapshot reads the copy if this host, on this store, wrote it. ok is
// false without one (none, another host's or store's); err is an
// unreadable one.
func (d *Driver) loadSnapshot() (s snapshot, ok bool, err error) {
	if d.cfg.SnapshotPath == "" {
		return s, false, nil
	}
	b, err := os.ReadFile(d.cfg.SnapshotPath)
	if errors.Is(err, os.ErrNotExist) {
		return s, false, nil
	}
	if err != nil {
		return s, false, err
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, false, fmt.Errorf("%s: %w", d.cfg.SnapshotPath, err)
	}
	if s.Schema != snapshotSchema {
		return s, false, fmt.Errorf("%s: schema %d, this version reads %d", d.cfg.SnapshotPath, s.Schema, snapshotSchema)
	}
	if s.HostID != d.cfg.HostID || s.Store != d.cfg.StoreTag {
		d.log.Warn("state copy in DATA_DIR is of another host identity or store: not used", "path", d.cfg.SnapshotPath,
			"copy_host", s.HostID, "host", d.cfg.HostID, "copy_store", s.Store, "store", d.cfg.StoreTag)
		return s, false, nil
	}
	return s, true, nil
}

// mergeSnapshot adds to view v what the copy s holds and v does not, for
// the endpoints of the copy whose interface a container holds (held, by
// vxlan.EndpointKey): each such endpoint, its logical network with this
// host's membership as the copy has it if v lacks the network, and its
// Docker network in this host's membership if v has the network (same key
// and VNI: a re-assertion gives it a new incarnation) without it. With
// all, for an unproven view (this host evicted while it was away), the
// copy's networks no container uses are added too, as Docker still has
// them. A network whose overlay the kernel no longer has (inKernel, by
// VNI: removed just before a kill -9), or whose VNI a network of v uses
// under another key, is not added. This host's VTEP in what it adds is
// vtep, the one it runs with now. It returns the keys of the networks
// added or changed and the IDs of the endpoints added.
func mergeSnapshot(v *cluster.View, s snapshot, hostID, node, vtep string, held map[string]bool, inKernel []uint32, all bool) (nets, eps []string) {
	known := map[string]bool{}
	for _, ep := range v.Endpoints {
		known[ep.ID] = true
	}
	// The copy's endpoints to add, by network key, and their Docker
	// networks.
	add := map[string][]cluster.Endpoint{}
	for _, ep := range s.Endpoint {
		if !known[ep.ID] && held[vxlan.EndpointKey(ep.ID)] {
			add[ep.NetworkKey] = append(add[ep.NetworkKey], ep)
		}
	}
	idx := map[string]int{}
	vnis := map[uint32]string{}
	for i, n := range v.Networks {
		idx[n.Key] = i
		vnis[n.VNI] = n.Key
	}
	taken := map[string]bool{} // the copy's networks merged: their endpoints in add go in
	for _, sn := range s.Networks {
		n := sn.Network
		want := add[n.Key]
		if len(sn.NetworkIDs) == 0 || !slices.Contains(inKernel, n.VNI) || (len(want) == 0 && !all) {
			continue
		}
		// The Docker networks of the endpoints to add, or all the copy's.
		ids := sn.NetworkIDs
		if !all {
			ids = nil
			for _, ep := range want {
				if slices.Contains(sn.NetworkIDs, ep.NetworkID) && !slices.Contains(ids, ep.NetworkID) {
					ids = append(ids, ep.NetworkID)
				}
			}
		}
		i, ok := idx[n.Key]
		switch {
		case ok && v.Networks[i].VNI != n.VNI:
			continue // another network under that key now
		case ok:
			m, member := v.Networks[i].Hosts[hostID]
			if !member {
				m = cluster.Member{Node: node, VTEP: vtep}
			}
			var missing []string
			for _, id := range ids {
				if !slices.Contains(m.NetworkIDs, id) {
					missing = append(missing, id)
				}
			}
			taken[n.Key] = true
			if len(missing) == 0 {
				continue
			}
			m.NetworkIDs = append(slices.Clone(m.NetworkIDs), missing...)
			v.Networks[i].Hosts = withMember(v.Networks[i].Hosts, hostID, m)
		default:
			if k, used := vnis[n.VNI]; used && k != n.Key {
				continue // the VNI is another network's now
			}
			m := n.Hosts[hostID]
			m.NetworkIDs = slices.Clone(ids)
			if m.Node == "" {
				m.Node = node
			}
			m.VTEP = vtep
			n.Hosts = withMember(n.Hosts, hostID, m)
			v.Networks = append(v.Networks, n)
			idx[n.Key] = len(v.Networks) - 1
			vnis[n.VNI] = n.Key
			taken[n.Key] = true
		}
		nets = append(nets, n.Key)
	}
	for key, want := range add {
		if !taken[key] {
			continue
		}
		i := idx[key]
		bound := v.Networks[i].Hosts[hostID].NetworkIDs
		for _, ep := range want {
			if !slices.Contains(bound, ep.NetworkID) {
				continue
			}
			ep.VTEP = vtep
			v.Endpoints = append(v.Endpoints, ep)
			eps = append(eps, ep.ID)
		}
	}
	slices.Sort(eps)
	return nets, eps
}

// withMember returns a copy of hosts with m as host id's membership.
func withMember(hosts map[string]cluster.Member, id string, m cluster.Member) map[string]cluster.Member {
	out := make(map[string]cluster.Member, len(hosts)+1)
	maps.Copy(out, hosts)
	out[id] = m
	return out
}

// usableSnapshot returns the state copy if this host wrote it on this
// store; only a host others may reap (Config.Reapable) uses one.
func (d *Driver) usableSnapshot() (snapshot, bool) {
	if !d.cfg.Reapable {
		return snapshot{}, false
	}
	s, ok, err := d.loadSnapshot()
	if err != nil {
		d.log.Error("state copy in DATA_DIR unreadable: not used", "error", err)
		return snapshot{}, false
	}
	return s, ok
}
