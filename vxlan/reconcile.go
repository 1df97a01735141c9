package vxlan

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
)

// Reconcile makes the kernel match desired, a full description of this
// owner's networks, endpoints and remote peers on this host:
//   - links with our exact names and our owner mark that desired does not
//     mention are removed (endpoints first, then networks);
//   - each desired network and endpoint is ensured; anything that already
//     matches is left alone, so a running container loses no packet;
//   - each network's neighbour and FDB entries become exactly those of its
//     peers, and the peer set replaces the one AddPeer/DeletePeer built;
//   - the firewall is made to match in one transaction per command, before
//     any device is created: our rules of bridges that are not desired are
//     removed (and those of older versions), and the jumps put back in
//     place.
//
// Links, entries and rules of other owners are never touched; a desired
// network or endpoint whose link name another owner holds fails with a
// *ForeignLinkError.
//
// With desired.KeepStrays, desired is not taken as complete: the listed
// networks, endpoints and peers are ensured (the peers are added to the
// known ones) and nothing is removed: no link, no neighbour or FDB entry,
// no rule. Use it when the caller cannot prove its view is complete. A
// desired state with an item that fails validation (reported in the
// error) is treated alike: that item is listed, so nothing is removed.
//
// It carries on past failures, joins them into the error, and returns the
// writes it made: a second call on an unchanged kernel returns zero
// Changes.
func (m *Manager) Reconcile(ctx context.Context, desired State) (Changes, error) {
	var errs []error
	nets := map[uint32]Network{}
	for _, n := range desired.Networks {
		if err := validVNI(n.VNI); err != nil {
			errs = append(errs, fmt.Errorf("network: %w", err))
			continue
		}
		if _, dup := nets[n.VNI]; dup {
			errs = append(errs, fmt.Errorf("network vni %d listed twice", n.VNI))
			continue
		}
		nets[n.VNI] = n
	}
	eps := map[string]Endpoint{} // by endpointKey
	for _, ep := range desired.Endpoints {
		if err := m.checkEndpoint(ep); err != nil {
			errs = append(errs, fmt.Errorf("endpoint: %w", err))
			continue
		}
		if _, ok := nets[ep.VNI]; !ok {
			errs = append(errs, fmt.Errorf("endpoint %s: network vni %d is not desired: %w", endpointKey(ep.ID), ep.VNI, ErrNotFound))
			continue
		}
		eps[endpointKey(ep.ID)] = ep
	}
	type vniPeer struct {
		vni uint32
		k   peerKey
	}
	var listed []vniPeer
	for _, p := range desired.Peers {
		k, err := m.checkPeer(p)
		if err != nil {
			errs = append(errs, fmt.Errorf("peer: %w", err))
			continue
		}
		listed = append(listed, vniPeer{p.VNI, k})
	}
	// A listed item that fails validation is still listed: taking the
	// rest for the whole truth would remove it (a running container's
	// veth pair, say). Nothing is removed then; the error says why.
	keep := desired.KeepStrays || len(errs) > 0

	m.mu.Lock()
	defer m.mu.Unlock()
	m.inKernel = nil // the sets below change in place; every device is compared
	if !keep {
		m.peers = map[uint32]*peerSet{}
	}
	for _, p := range listed {
		if m.peers[p.vni] == nil {
			m.peers[p.vni] = newPeerSet()
		}
		m.peers[p.vni].add(p.k)
	}
	// An egress network that can no longer have its way out (a setting
	// changed across the restart) keeps everything it has, said loudly.
	for vni, n := range nets {
		if err := m.egressRefused(n); err != nil {
			m.log.Error("egress network without its way out: its containers' traffic to the outside fails", "vni", vni, "error", err)
		}
	}
	var ch Changes
	var phases []any
	last := time.Now()
	phase := func(name string) {
		now := time.Now()
		phases = append(phases, name, now.Sub(last))
		last = now
	}

	// Encryption and the firewall of every network at once (one listing
	// and at most one transaction per command), before any VXLAN device
	// is created. They run iptables and xfrm commands while this goroutine
	// reads the kernel's tables and removes the strays: nothing of the
	// one depends on the other (issue 16: 50-180 ms of a restart).
	var spec fwSpec
	if m.fw.enabled() {
		hostLinks, err := m.hostLinkNames()
		if err != nil {
			return Changes{}, errors.Join(append(errs, fmt.Errorf("firewall: %w", err))...)
		}
		bridges := map[string]Network{}
		for vni, n := range nets {
			bridges[fwIface(vni, hostLinks)] = n
		}
		sh := sharedWant
		switch {
		case len(nets) == 0 && keep:
			sh = sharedKeep
		case len(nets) == 0:
			sh = sharedDrop
		}
		spec = m.fwSpec(bridges, sh)
		spec.underlay, spec.complete = len(nets) > 0, !keep
	}
	var (
		fwCh   Changes
		fwErrs []error
		fwDone bool
		fwTook [2]time.Duration
	)
	fwWait := make(chan struct{})
	go func() {
		defer close(fwWait)
		t := time.Now()
		if err := m.reconcileIPsec(ctx, nets, keep, &fwCh); err != nil {
			fwErrs = append(fwErrs, err)
		}
		fwTook[0] = time.Since(t)
		if m.fw.enabled() {
			k, err := m.fw.sync(ctx, spec)
			fwCh.Rules += k
			if err != nil {
				fwErrs = append(fwErrs, fmt.Errorf("firewall: %w", err))
			} else {
				fwDone = true
			}
		}
		fwTook[1] = time.Since(t) - fwTook[0]
	}()

	// One dump of the kernel's tables of each namespace for every network
	// and endpoint (kerneldump.go); without it each device is read on its
	// own.
	nss := m.namespaces()
	links := make([][]netlink.Link, len(nss))
	for i, ns := range nss {
		if !keep {
			var err error
			if links[i], err = ns.linkList(); err != nil {
				<-fwWait
				return ch, errors.Join(append(errs, fmt.Errorf("%s: %w", ns.where(), err))...)
			}
		}
		if m.perDevice {
			// tests: the reads of EnsureNetwork and EnsureEndpoint
		} else if d, err := ns.dumpKernel(links[i]); err != nil {
			m.log.Warn("kernel tables not read at once; reading them device by device", "ns", ns.where(), "error", err)
		} else {
			ns.snap = d
			defer func() { ns.snap = nil }()
		}
	}
	if keep {
		m.keepVTEPs(nets)
	} else {
		m.kept = nil
	}
	phase("dump")
	// Strays first: a stray device may hold a VNI or a name we need.
	if !keep {
		for i, ns := range nss {
			errs = append(errs, m.removeStrays(ns, links[i], nets, eps, &ch)...)
		}
	}
	phase("strays")
	<-fwWait
	phase("firewall-wait")
	phases = append(phases, "ipsec", fwTook[0], "firewall", fwTook[1])
	errs = append(errs, fwErrs...)
	ch.add(fwCh)
	vnis := make([]uint32, 0, len(nets))
	for vni := range nets {
		vnis = append(vnis, vni)
	}
	slices.Sort(vnis)
	for _, vni := range vnis {
		if _, err := m.ensureNetworkFW(ctx, nets[vni], keep, fwDone, &ch); err != nil {
			errs = append(errs, err)
		}
	}
	phase("networks")
	for _, ep := range eps {
		if _, err := m.ensureEndpoint(ep, &ch); err != nil {
			errs = append(errs, err)
		}
	}
	phase("endpoints")
	m.log.Debug("reconcile timing", phases...)
	if ch.Total() > 0 {
		m.log.Info("kernel reconciled", "networks", len(nets), "endpoints", len(eps), "keep_strays", keep, "changes", fmt.Sprintf("%+v", ch))
	}
	return ch, errors.Join(errs...)
}

// add counts o's writes into c.
func (c *Changes) add(o Changes) {
	c.Links += o.Links
	c.LinkAttrs += o.LinkAttrs
	c.Addrs += o.Addrs
	c.Neighbours += o.Neighbours
	c.FDB += o.FDB
	c.Rules += o.Rules
	c.IPsec += o.IPsec
}

// removeStrays deletes the links of namespace ns (links, its dump) that
// carry both of our ownership marks (an exact name and our owner's alias)
// but belong to no desired network or endpoint. Links of other owners, and links without a mark, stay.
// A container end that Docker moved away is not in this namespace; it goes
// with its host end.
func (m *Manager) removeStrays(ns *netNS, links []netlink.Link, nets map[uint32]Network, eps map[string]Endpoint, ch *Changes) []error {
	var errs []error
	del := func(l netlink.Link, why string) {
		m.log.Info("removing stray link", "link", l.Attrs().Name, "ns", ns.where(), "reason", why)
		if err := ns.deleteLink(l); err != nil {
			errs = append(errs, err)
			return
		}
		ch.Links++
	}
	// Endpoints before networks, so no veth outlives its bridge.
	for _, l := range links {
		a := l.Attrs()
		if a.Alias != m.mark {
			continue
		}
		for _, re := range []*regexp.Regexp{hostNameRE, contNameRE} {
			mm := re.FindStringSubmatch(a.Name)
			if mm == nil {
				continue
			}
			if _, ok := eps[mm[1]]; !ok {
				del(l, "endpoint not desired")
			}
		}
	}
	for _, l := range links {
		a := l.Attrs()
		if a.Alias != m.mark {
			continue
		}
		for _, re := range networkNameREs {
			vni, ok := vniFromName(re, a.Name)
			if !ok {
				continue
			}
			if _, want := nets[vni]; !want {
				del(l, "network not desired")
			}
		}
	}
	return errs
}

// OwnedNetworks lists, sorted, the VNIs of the overlays of this owner that
// the kernel holds: every VNI with a VXLAN device, bridge or gateway link
// named after it that carries this owner's mark, in the host's or the
// data-plane namespace. A caller compares it with its store to
// see overlays the store does not list (before reconciling them away).
//
// Equivalent to: `ip -d link show` filtered on the names vx-<6 hex> and
// vxbr-<6 hex> with alias consul-overlay-<owner>.
func (m *Manager) OwnedNetworks() ([]uint32, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var vnis []uint32
	for _, ns := range m.namespaces() {
		links, err := ns.linkList()
		if err != nil {
			return nil, fmt.Errorf("owned networks: %s: %w", ns.where(), err)
		}
		for _, l := range links {
			if !m.owns(l) {
				continue
			}
			for _, re := range networkNameREs {
				if vni, ok := vniFromName(re, l.Attrs().Name); ok && !slices.Contains(vnis, vni) {
					vnis = append(vnis, vni)
				}
			}
		}
	}
	slices.Sort(vnis)
	return vnis, nil
}

// EndpointsInUse lists the endpoint keys (the first 10 characters of the
// endpoint IDs) of the veth pairs in this namespace whose container end
// has left it: a running container uses each (see EndpointInUse). Before
// removing overlays or endpoints the store does not show, the driver asks
// whether any container would lose its network. Links of another owner
// are left out: they are never ours to remove. One dump of the
// namespace's links answers for all of them.
//
// Equivalent to: `ip -d link show` listing the vxh-* links whose peer is
// in another namespace ("link-netnsid").
func (m *Manager) EndpointsInUse() ([]string, error) {
	inUse, err := m.inUse()
	if err != nil {
		return nil, fmt.Errorf("endpoints in use: %w", err)
	}
	return slices.Sorted(maps.Keys(inUse)), nil
}

// NetworksInUse is EndpointsInUse by overlay: the VNI of the bridge each
// endpoint in use is a port of, and its keys, sorted. An endpoint on no
// overlay bridge of this owner is left out. The driver asks it before it
// gives a VNI to a network, so that an overlay it kept for running
// containers of a network it no longer serves is not shared with another.
//
// Equivalent to: EndpointsInUse, each with the vxbr-* link `ip -d link
// show` names as its "master".
func (m *Manager) NetworksInUse() (map[uint32][]string, error) {
	inUse, err := m.inUse()
	if err != nil {
		return nil, fmt.Errorf("networks in use: %w", err)
	}
	byVNI := map[uint32][]string{}
	for _, key := range slices.Sorted(maps.Keys(inUse)) {
		if vni := inUse[key]; vni != 0 {
			byVNI[vni] = append(byVNI[vni], key)
		}
	}
	return byVNI, nil
}

// inUse maps the key of each endpoint in use (EndpointsInUse) to the VNI
// of the overlay bridge of this owner it is a port of (0: none), from one
// link dump of each namespace.
func (m *Manager) inUse() (map[string]uint32, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	inUse := map[string]uint32{}
	for _, ns := range m.namespaces() {
		links, err := ns.linkList()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ns.where(), err)
		}
		away, err := m.awayCheck(ns, links)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ns.where(), err)
		}
		bridges := map[int]uint32{}
		for _, l := range links {
			if vni, ok := vniFromName(bridgeNameRE, l.Attrs().Name); ok && m.owns(l) {
				bridges[l.Attrs().Index] = vni
			}
		}
		for _, l := range links {
			key, ok := strings.CutPrefix(l.Attrs().Name, hostPrefix)
			if !ok || l.Type() != "veth" || m.foreign(l) != nil {
				continue
			}
			if away(l, key) {
				inUse[key] = bridges[l.Attrs().MasterIndex]
			}
		}
	}
	return inUse, nil
}
