package driver

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"net"
	"net/netip"
	"slices"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// errUnproven: the store shows nothing of this host while the kernel holds
// overlays; restore keeps them and retries.
var errUnproven = errors.New("the store shows nothing of this host")

// vxlanPeers converts the cluster's desired peers of a network.
func vxlanPeers(vni uint32, ps []cluster.Peer) []vxlan.Peer {
	out := make([]vxlan.Peer, 0, len(ps))
	for _, p := range ps {
		out = append(out, vxlan.Peer{VNI: vni, IP: p.IP, MAC: p.MAC, VTEP: p.VTEP})
	}
	return out
}

// watchPeers keeps the kernel's peers of one logical network equal to the
// desired peers the cluster state outputs, until ctx ends. A failed kernel
// write is retried at the next change or after ResyncInterval. It drives
// the cluster's peer watch itself: one goroutine per network from the
// store's snapshots to the kernel.
func (d *Driver) watchPeers(ctx context.Context, l *logical) {
	w, err := d.cl.NewPeerWatch(ctx, l.rec.Key)
	if err != nil {
		d.log.Error("peer watch stopped; peers of this network are no longer programmed: restart the plugin", "network", networkName(l.rec), "vni", l.rec.VNI, "error", err)
		return
	}
	// Close ends the store's watch and waits for it.
	defer w.Close()
	// This network's peers leave the underlay allowlist with it.
	defer d.allowVTEPs(context.WithoutCancel(ctx), l.rec.Key, nil)
	have := false
	// inStep: the data plane holds the peers of the last delivery, set by
	// this loop, so the next change is written as its difference.
	inStep := false
	var arrived time.Time           // when the snapshot not yet programmed came
	var allowed map[netip.Addr]bool // the VTEPs last handed to allowVTEPs
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	// The peers are also re-applied now and then without a change in the
	// store: SetPeers compares with the kernel, so an entry removed by
	// hand (or by another tool) comes back.
	resync := time.NewTimer(resyncDelay(time.Now(), d.cfg.PeerResync, d.cl.HostID()))
	defer resync.Stop()
	for {
		// A change is written as such; a retry and a resync compare with
		// the kernel's tables.
		change := false
		select {
		case <-ctx.Done():
			return
		case snap, ok := <-w.Snapshots():
			deliver, done := w.Next(snap, ok)
			if done {
				return
			}
			if !deliver {
				continue
			}
			have, change = true, true
			if arrived.IsZero() {
				arrived = time.Now()
			}
		case <-w.Audits():
			if w.Audit() {
				return
			}
			continue
		case <-retry.C:
		case <-resync.C:
			resync.Reset(resyncDelay(time.Now(), d.cfg.PeerResync, d.cl.HostID()))
		}
		if !have {
			continue
		}
		ch, err := d.programPeers(ctx, l.rec.VNI, w, change, inStep)
		inStep = err == nil
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d.log.Warn("peers not programmed; retried with the next change or reconcile", "network", networkName(l.rec), "vni", l.rec.VNI, "error", err)
			retry.Reset(d.cfg.ResyncInterval)
			continue
		}
		if !arrived.IsZero() && d.cfg.ObserveWatchLag != nil {
			d.cfg.ObserveWatchLag(time.Since(arrived))
		}
		arrived = time.Time{}
		if ch.Total() > 0 {
			d.log.Debug("peers programmed", "network", networkName(l.rec), "vni", l.rec.VNI, "changes", ch.Total())
		}
		// Most changes leave the network's VTEPs as they were.
		if allowed == nil || !w.SameVTEPs(allowed) || d.allowRetry() {
			allowed = w.VTEPs()
			d.allowVTEPs(ctx, l.rec.Key, allowed)
		}
	}
}

// resyncDelay is the time from now until the host's next peer resync. The
// resyncs of all the host's networks come together, at multiples of every
// from a phase of the host's own (its ID's hash): the data plane then reads
// the kernel's neighbour table once for them all (vxlan's shared dump),
// and hosts sharing a machine or a Consul server do not all resync at once.
func resyncDelay(now time.Time, every time.Duration, host string) time.Duration {
	h := fnv.New64a()
	h.Write([]byte(host))
	phase := int64(h.Sum64() % uint64(every))
	// Both in [0, every): their difference plus every is positive.
	d := time.Duration((phase - now.UnixNano()%int64(every) + int64(every)) % int64(every))
	if d == 0 {
		d = every
	}
	return d
}

// programPeers writes the peer watch's peers to the data plane: a change
// as its difference when the data plane holds the peers before it
// (inStep), else as the whole list compared with what the last call left;
// a retry or a resync (change false) compares the whole list with the
// kernel's tables.
func (d *Driver) programPeers(ctx context.Context, vni uint32, w *cluster.PeerWatch, change, inStep bool) (vxlan.Changes, error) {
	if !change {
		return d.dp.SetPeers(ctx, vni, vxlanPeers(vni, w.Peers()))
	}
	if inStep {
		delta := w.Delta()
		ch, applied, err := d.dp.ChangePeers(ctx, vni, vxlanPeers(vni, delta.Removed), vxlanPeers(vni, delta.Added))
		if applied {
			return ch, err
		}
	}
	return d.dp.UpdatePeers(ctx, vni, vxlanPeers(vni, w.Peers()))
}

// restore rebuilds the driver's view from the store (the networks this
// host is a member of and its endpoints), brings the kernel in line and
// starts the peer watches.
//
// It never trusts an empty view: if the store shows nothing of this host
// (no host record, no membership) while containers use its overlays, the
// host was evicted while it was away, or the store is not the one this
// host used (another KV_PREFIX, a token that cannot read it, another host
// identity, a lost embedded store). The state copy in DATA_DIR tells: one
// this host wrote on this store gives the networks and endpoints, and the
// restore keeps everything in the kernel (snapshot.go). Without one it
// keeps every overlay, logs the error and fails, so Start retries. Only a
// proven view reconciles the kernel, removing overlays the store does not
// list.
func (d *Driver) restore(ctx context.Context) error {
	t0 := time.Now()
	// This host's join records are read beside the view.
	type joinsRead struct {
		joins map[string]cluster.Joined
		err   error
	}
	joinsCh := make(chan joinsRead, 1)
	go func() {
		j, err := d.cl.Joins(ctx)
		joinsCh <- joinsRead{j, err}
	}()
	// And the endpoints containers hold, from the kernel (one link dump):
	// whatever the view, none of them is removed unless the view lists
	// it.
	type inUseRead struct {
		keys []string
		err  error
	}
	inUseCh := make(chan inUseRead, 1)
	go func() {
		k, err := d.dp.EndpointsInUse()
		inUseCh <- inUseRead{k, err}
	}()
	v, err := d.cl.View(ctx)
	jr := <-joinsCh
	iu := <-inUseCh
	if err != nil {
		return err
	}
	if iu.err != nil {
		return fmt.Errorf("list endpoints in use in the kernel: %w", iu.err)
	}
	held := keySet(iu.keys) // by vxlan.EndpointKey
	tView := time.Since(t0)
	// Memberships without the host record: a reap of this host stopped
	// part way (it came back during it): some networks may be gone from
	// the store while containers still use them. Reconciling on that view
	// would tear them down; treat it as the view of a reaped host.
	partial := d.cfg.Reapable && v.Proven && !v.HostRecord
	if partial {
		d.log.Error("the store shows some memberships of this host but not its host record: this host was being reaped while it was away and the reap stopped part way; treated as reaped",
			"host", d.cfg.HostID, "node", d.cfg.Node, "networks", len(v.Networks))
	}
	// The state copy in DATA_DIR (snapshot.go) fills in what the view
	// lacks when containers hold endpoints it does not show: a view
	// without this host (evicted while it was away), or a proven one a
	// re-assertion cut short left incomplete.
	var copyOf *snapshot
	var inKernel []uint32
	var unproven error
	if !v.Proven || partial {
		vnis, err := d.dp.Networks(ctx)
		if err != nil {
			return fmt.Errorf("list overlays in the kernel: %w", err)
		}
		inUse := iu.keys
		if len(vnis) > 0 && len(inUse) == 0 {
			// No container would lose its network: the overlays are what
			// a host reaped while it was away (a crash, a long partition)
			// left behind, and nothing is lost by removing them below.
			d.log.Error("the store shows nothing of this host (reaped while it was away?) and no container uses its overlays in the kernel: removing them; Docker networks of this host bound to them must be removed and created again",
				"host", d.cfg.HostID, "node", d.cfg.Node, "vni", vnis)
		} else if len(vnis) > 0 {
			unproven = fmt.Errorf("%w (host ID %q, node %q) but the kernel holds %d overlay networks (vni %v): containers use endpoints %v: keeping them and retrying; check that KV_PREFIX and the host identity are the ones this host ran with, that the Consul token can read the prefix, and that the embedded store's state.db is still in DATA_DIR; if this host was reaped while it was away, its containers' addresses may be another's now: remove these containers",
				errUnproven, d.cfg.HostID, d.cfg.Node, len(vnis), vnis, inUse)
			if s, ok := d.usableSnapshot(); ok {
				copyOf, inKernel = &s, vnis
			}
		}
	} else if d.cfg.Reapable && d.cfg.SnapshotPath != "" && len(unrecorded(iu.keys, v.Endpoints)) > 0 {
		if s, ok := d.usableSnapshot(); ok {
			vnis, err := d.dp.Networks(ctx)
			if err != nil {
				return fmt.Errorf("list overlays in the kernel: %w", err)
			}
			copyOf, inKernel = &s, vnis
		}
	}
	if unproven != nil && copyOf == nil {
		d.log.Error("state not restored: the store does not show this host", "error", unproven)
		return unproven
	}
	// Started on a new underlay address (a reboot with a new lease):
	// republish it, or the other hosts keep sending to the old one.
	if stale := staleVTEP(d.cfg.HostID, d.cfg.VTEP.String(), v); stale {
		if err := d.cl.SetVTEP(ctx, d.cfg.VTEP); err != nil {
			return fmt.Errorf("republish this host's vtep %s: %w", d.cfg.VTEP, err)
		}
		if v, err = d.cl.View(ctx); err != nil {
			return err
		}
	}
	fromCopy := false
	if copyOf != nil {
		// A network of the copy that is not this host's any more: the
		// store has its key again under another VNI (reaped, then created
		// again elsewhere), or gives its VNI to another key (freed by the
		// reap, taken by the next network created elsewhere; the view
		// lists only this host's networks, so mergeSnapshot cannot tell).
		// Taking it would program another network's peers into the old
		// overlay, or serve one the re-assertion can never write back. A
		// store that does not answer leaves the restore unsure: it fails
		// and is retried, the kernel kept.
		var kept []snapshotNetwork
		for _, sn := range copyOf.Networks {
			why, err := d.copyNetworkGone(ctx, sn.Network)
			if err != nil {
				return fmt.Errorf("check network %s of the state copy against the store: %w", sn.Network.Key, err)
			}
			if why != "" {
				d.log.Error("a network of the state copy is another's in the store now: not taken from the copy",
					"network", sn.Network.Key, "vni", sn.Network.VNI, "reason", why)
				continue
			}
			kept = append(kept, sn)
		}
		copyOf.Networks = kept
		// All of the copy for a view without this host (the copy was
		// read for it, unproven set); for a proven one, what held
		// endpoints need.
		nets, eps := mergeSnapshot(&v, *copyOf, d.cfg.HostID, d.cfg.Node, d.cfg.VTEP.String(), held, inKernel, unproven != nil)
		if len(nets) > 0 || len(eps) > 0 {
			fromCopy = true
			d.log.Error("containers use endpoints of this host that the store does not show (evicted while it was away?): networks and endpoints taken from the state copy in DATA_DIR, everything in the kernel kept; the liveness check writes them back to the store, and reports addresses other hosts took meanwhile",
				"host", d.cfg.HostID, "node", d.cfg.Node, "networks", nets, "endpoints", eps, "in_use", iu.keys)
		}
	}
	if unproven != nil && !fromCopy {
		d.log.Error("state not restored: the store does not show this host", "error", unproven)
		return unproven
	}
	// Endpoints Docker asked to delete before the restart: restored as
	// removed (no veth, no service, their addresses held) for catchUp to
	// finish. A mark without a record is done with, once the view is
	// proven to be this host's.
	marked, err := d.pend.list()
	if err != nil {
		d.log.Error("endpoints to delete not read from DATA_DIR: endpoints deleted before the restart whose record is left are restored as live", "error", err)
	}
	var live, removed []cluster.Endpoint
	for _, ep := range v.Endpoints {
		if !marked[ep.ID] {
			live = append(live, ep)
			continue
		}
		delete(marked, ep.ID)
		// The kernel has the last word: an interface a container holds
		// is a live container's, whatever the mark says. (A kernel that
		// did not answer failed the restore above, marks kept.)
		if held[vxlan.EndpointKey(ep.ID)] {
			d.log.Warn("endpoint marked for deletion whose interface a container holds: kept", "endpoint", short(ep.ID))
			if err := d.pend.clear(ep.ID); err != nil {
				d.log.Warn("mark of a kept endpoint not removed from DATA_DIR", "endpoint", short(ep.ID), "error", err)
			}
			live = append(live, ep)
			continue
		}
		removed = append(removed, ep)
	}
	if v.Proven && !partial {
		for id := range marked {
			if err := d.pend.clear(id); err != nil {
				d.log.Warn("mark of a deleted endpoint not removed from DATA_DIR", "endpoint", short(id), "error", err)
			}
		}
	}
	var state vxlan.State
	state.KeepStrays = fromCopy
	// A proven view still misses what the store lost (an eviction whose
	// re-assertion failed part way, a network created while a reap was
	// stopping, a restored snapshot): a container holding an endpoint the
	// view does not list would lose its network to the reconcile. Then
	// nothing is removed this time, and the error names the endpoints.
	var unknownKept []string
	if v.Proven && !partial || fromCopy {
		if unknown := unrecorded(iu.keys, live); len(unknown) > 0 {
			unknownKept = unknown
			state.KeepStrays = true
			d.log.Error("containers use endpoints of this host that the store has no record of (lost in an eviction, or a store restored from an older snapshot): keeping every overlay and endpoint in the kernel; other hosts do not reach these containers and their addresses are not held: remove and recreate them",
				"host", d.cfg.HostID, "endpoints", unknown)
		}
	}
	for _, n := range v.Networks {
		state.Networks = append(state.Networks, kernelNetwork(n))
		state.Peers = append(state.Peers, vxlanPeers(n.VNI, v.Peers[n.Key])...)
	}
	vniOf := map[string]uint32{}
	for _, n := range v.Networks {
		vniOf[n.Key] = n.VNI
	}
	for _, ep := range live {
		mac, err := net.ParseMAC(ep.MAC)
		if err != nil {
			continue
		}
		state.Endpoints = append(state.Endpoints, vxlan.Endpoint{ID: ep.ID, VNI: vniOf[ep.NetworkKey], MAC: mac})
	}
	t1 := time.Now()
	if jr.err != nil {
		return jr.err
	}
	d.restoreJoins(ctx, live, jr.joins, held)
	tJoins := time.Since(t1)
	t1 = time.Now()
	ch, err := d.dp.Reconcile(ctx, state)
	if err != nil {
		return fmt.Errorf("reconcile kernel: %w", err)
	}
	// What the reconcile kept without a network: no other network may
	// have these VNIs while containers use them (takenVNIs).
	var strays map[uint32]bool
	if state.KeepStrays {
		vnis, err := d.dp.Networks(ctx)
		if err != nil {
			return fmt.Errorf("list overlays in the kernel: %w", err)
		}
		strays = map[uint32]bool{}
		for _, vni := range vnis {
			strays[vni] = true
		}
		for _, n := range state.Networks {
			delete(strays, n.VNI)
		}
		if len(strays) > 0 {
			d.log.Warn("overlays kept in the kernel without a network of this host: no network is given their VNIs while containers use them",
				"vni", slices.Sorted(maps.Keys(strays)))
		}
	}
	d.log.Debug("restore timing", "view", tView, "joins", tJoins, "reconcile", time.Since(t1), "total", time.Since(t0))
	d.log.Info("state restored", "networks", len(v.Networks), "endpoints", len(live), "kernel_changes", fmt.Sprintf("%+v", ch))
	for _, ep := range removed {
		d.log.Warn("endpoint deleted before the restart whose record is left: its record and addresses are released when the store answers", "endpoint", short(ep.ID), "address", endpointAddresses(ep))
	}
	d.mu.Lock()
	d.strays = strays
	d.unrecorded = unknownKept
	for _, ep := range live {
		d.endpoints[ep.ID] = &localEndpoint{rec: ep, left: false}
	}
	for _, ep := range removed {
		d.endpoints[ep.ID] = &localEndpoint{rec: ep, left: true, removed: true}
	}
	d.mu.Unlock()
	for _, n := range v.Networks {
		m, _ := n.Member(d.cfg.HostID)
		for _, id := range m.NetworkIDs {
			d.bind(id, n, time.Time{})
		}
	}
	return nil
}

// unrecorded lists the endpoint keys of inUse (the endpoints containers
// hold, as the kernel names them: EndpointsInUse) that are not among live.
func unrecorded(inUse []string, live []cluster.Endpoint) []string {
	known := make(map[string]bool, len(live))
	for _, ep := range live {
		known[vxlan.EndpointKey(ep.ID)] = true
	}
	var unknown []string
	for _, k := range inUse {
		if !known[k] {
			unknown = append(unknown, k)
		}
	}
	return unknown
}

// restoreJoins gives the restored endpoint records what Join learned
// (this host's join records joins, see cluster.Joined) and removes the join
// records of endpoints that are gone. An endpoint without one whose
// interface a container holds joined all the same (the plugin stopped
// before its join record was written): it is marked joined, so the
// registrar keeps its service and the unjoined sweep leaves it alone. held
// are the endpoints whose interface a container holds, by
// vxlan.EndpointKey.
func (d *Driver) restoreJoins(ctx context.Context, eps []cluster.Endpoint, joins map[string]cluster.Joined, held map[string]bool) {
	for i := range eps {
		ep := &eps[i]
		j, ok := joins[ep.ID]
		delete(joins, ep.ID)
		if ok && ep.Sandbox == "" {
			ep.Sandbox = j.Sandbox
		}
		if ok && len(ep.Ports) == 0 {
			ep.Ports = j.Ports
		}
		if ep.Sandbox != "" {
			continue
		}
		if held[vxlan.EndpointKey(ep.ID)] {
			ep.Sandbox = "joined" // container unknown, as joined() names it
		}
	}
	for id := range joins {
		if err := d.cl.DeleteJoined(ctx, id); err != nil {
			d.log.Warn("join record of a removed endpoint not deleted", "endpoint", short(id), "error", err)
		}
	}
}

// staleVTEP reports whether the view publishes another VTEP for this host
// than vtep.
func staleVTEP(hostID, vtep string, v cluster.View) bool {
	for _, n := range v.Networks {
		if m, ok := n.Member(hostID); ok && m.VTEP != vtep {
			return true
		}
	}
	for _, ep := range v.Endpoints {
		if ep.VTEP != vtep {
			return true
		}
	}
	return false
}

// allowVTEPs records set, the VTEPs of one logical network's desired
// peers (empty: the network is gone here), and hands the union over all
// networks to the data plane's underlay allowlist: VXLAN packets from any
// other underlay address are dropped. A VTEP joins the allowlist at once; one that lost
// its last peer here leaves it only after the peer resync interval
// (pruneVTEPs), so that containers coming and going on another host cost
// no firewall write, and a new one there is programmed without waiting
// for one (issue 16: the write, an iptables-save and -restore, took
// 25-35 ms of every convergence). A failure is retried at the next
// change; the data plane allows a programmed peer's VTEP on its own, so a
// failure never cuts off a peer, it only keeps a departed host allowed.
func (d *Driver) allowVTEPs(ctx context.Context, key string, set map[netip.Addr]bool) {
	d.allowMu.Lock()
	defer d.allowMu.Unlock()
	if len(set) == 0 {
		delete(d.allowed, key)
	} else {
		d.allowed[key] = set
	}
	union := d.allowedUnion()
	// Keep what is applied until the prune: only additions are written.
	keep := maps.Clone(union)
	removed := false
	for a := range d.allowedApplied {
		if !keep[a] {
			keep[a], removed = true, true
		}
	}
	if removed && d.allowPrune == nil {
		d.allowPrune = time.AfterFunc(d.cfg.PeerResync, d.pruneVTEPs)
	}
	d.applyAllowed(ctx, keep)
}

// allowRetry says whether the last allowlist update failed (the next
// call of allowVTEPs writes it again).
func (d *Driver) allowRetry() bool {
	d.allowMu.Lock()
	defer d.allowMu.Unlock()
	return d.allowDirty
}

// allowedUnion is the union of every network's peer VTEPs. Caller holds
// allowMu.
func (d *Driver) allowedUnion() map[netip.Addr]bool {
	union := map[netip.Addr]bool{}
	for _, s := range d.allowed {
		for a := range s {
			union[a] = true
		}
	}
	return union
}

// applyAllowed hands set to the data plane unless it is what was applied
// last. Caller holds allowMu.
func (d *Driver) applyAllowed(ctx context.Context, set map[netip.Addr]bool) {
	if maps.Equal(set, d.allowedApplied) && !d.allowDirty {
		return
	}
	list := slices.SortedFunc(maps.Keys(set), func(a, b netip.Addr) int { return a.Compare(b) })
	if err := d.dp.SetAllowedVTEPs(ctx, list); err != nil {
		d.allowDirty = true
		d.log.Warn("update the underlay allowlist", "vteps", len(list), "error", err)
		return
	}
	d.allowDirty = false
	d.allowedApplied = set
}

// pruneVTEPs drops from the allowlist the VTEPs that no network's peers
// hold any more (allowVTEPs schedules it). Nothing is written once the
// driver is closed: a stopping plugin leaves the allowlist as it is.
func (d *Driver) pruneVTEPs() {
	d.allowMu.Lock()
	defer d.allowMu.Unlock()
	d.allowPrune = nil
	if d.ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(d.ctx, d.cfg.CallTimeout)
	defer cancel()
	d.applyAllowed(ctx, d.allowedUnion())
}

// copyNetworkGone says why network n of the state copy is another's in the
// store now ("" if it is not): its key recorded under another VNI, or its
// VNI reserved by another key.
func (d *Driver) copyNetworkGone(ctx context.Context, n cluster.Network) (string, error) {
	rec, err := d.cl.Network(ctx, n.Key)
	switch {
	case err == nil && rec.VNI != n.VNI:
		return fmt.Sprintf("created again with vni %d", rec.VNI), nil
	case err != nil && !errors.Is(err, kvstore.ErrNotFound):
		return "", err
	}
	owner, err := d.cl.VNIOwner(ctx, n.VNI)
	if err != nil {
		return "", err
	}
	if owner != "" && owner != n.Key {
		return fmt.Sprintf("vni %d reserved by %s", n.VNI, owner), nil
	}
	return "", nil
}
