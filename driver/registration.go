package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/discovery"
	"consul-overlay/ipam"
	"consul-overlay/vxlan"
)

// endpointOptions keeps the endpoint's own driver options (docker run
// --network name=app,driver-opt=SERVICE_NAME=web): string values that are
// not Docker's com.docker.* keys.
func endpointOptions(opts map[string]interface{}) map[string]string {
	var out map[string]string
	for k, v := range opts {
		s, ok := v.(string)
		if !ok || strings.HasPrefix(k, "com.docker.") {
			continue
		}
		if out == nil {
			out = map[string]string{}
		}
		out[k] = s
	}
	return out
}

// joined records what Join learned (the container, its exposed ports) and
// hands the endpoint to the registrar. The endpoint record, which every
// member host watches, is not written again: what Join learned is kept in
// memory and written to this host's join record (cluster.Joined, outside
// the watched keys) in the background, for a restart to read back.
func (d *Driver) joined(l *logical, ep *localEndpoint, req *network.JoinRequest) {
	sandbox := discovery.ContainerIDFromSandboxKey(req.SandboxKey)
	if sandbox == "" {
		sandbox = "joined" // a SandboxKey of another form: still joined
	}
	var ports []discovery.Port
	if p, err := discovery.ParseExposedPorts(req.Options[discovery.ExposedPortsOption]); err == nil {
		ports = p
	}
	j := cluster.Joined{Sandbox: sandbox}
	d.mu.Lock()
	ep.left = false
	ep.rec.Sandbox = sandbox
	if len(ep.rec.Ports) == 0 {
		ep.rec.Ports, j.Ports = ports, ports
	}
	rec := ep.rec
	d.mu.Unlock()
	d.snapshotChanged()
	j.NetworkKey = rec.NetworkKey
	d.bg.setJoined(rec.ID, &j)
	d.point("join/after-record")
	if d.cfg.Registrar != nil {
		d.cfg.Registrar.Register(serviceEndpoint(l.rec, &rec))
	}
}

// serviceEndpoint describes a joined endpoint to the registrar.
func serviceEndpoint(net cluster.Network, ep *cluster.Endpoint) discovery.Endpoint {
	e := discovery.Endpoint{
		ID:        ep.ID,
		Network:   net.Name,
		NetworkID: ep.NetworkID,
		Ports:     ep.Ports,
		// The registrar finds the container by its endpoint ID: Docker's
		// SandboxKey names the sandbox, not the container.
		Options:       ep.Options,
		Register:      true,
		ServicePrefix: net.Options[optServicePrefix],
	}
	if e.Network == "" {
		e.Network = net.Key
	}
	if v, ok := net.Options[optRegister]; ok {
		e.Register, _ = strconv.ParseBool(v)
	}
	if p, err := netip.ParsePrefix(ep.IPv4); err == nil {
		e.IPv4 = p.Addr()
	}
	if p, err := netip.ParsePrefix(ep.IPv6); err == nil {
		e.IPv6 = p.Addr()
	}
	return e
}

// HeldEndpoints lists this node's joined endpoints, for the registrar's
// anti-entropy. It fails until the state is restored, so the registrar
// never takes an empty list for the truth.
func (d *Driver) HeldEndpoints(ctx context.Context) ([]discovery.Endpoint, error) {
	select {
	case <-d.ready:
	default:
		return nil, errors.New("driver state not restored yet")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []discovery.Endpoint
	for _, ep := range d.endpoints {
		l := d.networks[ep.rec.NetworkID]
		if l == nil || ep.left || ep.rec.Sandbox == "" {
			continue
		}
		rec := ep.rec
		out = append(out, serviceEndpoint(l.rec, &rec))
	}
	return out, nil
}

// ReclaimEndpoint removes an endpoint whose container Docker no longer has
// (Docker's DeleteEndpoint never came, for example because the plugin was
// down): its veth, its record, and its addresses in IPAM.
func (d *Driver) ReclaimEndpoint(ctx context.Context, id string) {
	d.mu.Lock()
	ep := d.endpoints[id]
	var l *logical
	var rec cluster.Endpoint
	if ep != nil {
		l = d.networks[ep.rec.NetworkID]
		rec = ep.rec
	}
	d.mu.Unlock()
	if ep == nil {
		return
	}
	// The kernel has the last word: an interface that sits in a container
	// namespace belongs to a live container, whatever Docker's list said.
	if inUse, err := d.dp.EndpointInUse(id); err != nil || inUse {
		d.log.Warn("not reclaiming an endpoint whose interface a container still holds", "endpoint", short(id), "in_use", inUse, "error", err)
		return
	}
	if err := d.deleteEndpoint(ctx, ep); err != nil {
		d.log.Warn("stale endpoint not reclaimed; the next stale check retries", "endpoint", short(id), "error", err)
		return
	}
	if l != nil && d.cfg.ReclaimAddress != nil {
		for _, a := range []string{rec.IPv4, rec.IPv6} {
			if err := d.releaseAddress(ctx, l.rec, rec, a); err != nil {
				d.log.Warn("address of a reclaimed endpoint not released; IPAM's reclaim sweep frees it later", "endpoint", short(id), "address", a, "error", err)
			}
		}
	}
	// deleteEndpoint logged the removal at info.
	d.log.Debug("stale endpoint reclaimed", "endpoint", short(id), "address", endpointAddresses(rec))
}

// releaseAddress returns one endpoint address (CIDR, may be empty) to the
// IPAM address space of the subnet that holds it.
func (d *Driver) releaseAddress(ctx context.Context, rec cluster.Network, ep cluster.Endpoint, cidr string) error {
	if cidr == "" {
		return nil
	}
	p, err := netip.ParsePrefix(cidr)
	if err != nil {
		return err
	}
	for i, s := range rec.Subnets {
		subnet, err := netip.ParsePrefix(s)
		if err != nil || !subnet.Contains(p.Addr()) || i >= len(rec.Spaces) {
			continue
		}
		space := rec.Spaces[i]
		if d.cfg.OwnsAddressSpace != nil && !d.cfg.OwnsAddressSpace(space) {
			return nil // another IPAM's address: Docker releases it there
		}
		return d.cfg.ReclaimAddress(ctx, space, subnet, p.Addr(), ep.MAC, ep.Created)
	}
	return fmt.Errorf("no subnet of network %s holds %s", rec.Label(), p.Addr())
}

// AddressUsed tells whether an endpoint of this host holds address a of
// the subnet right now (created and not yet deleted). It never does I/O:
// IPAM asks it before letting a release from Docker free an address.
func (d *Driver) AddressUsed(subnet netip.Prefix, a netip.Addr) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, ep := range d.endpoints {
		if holds(ep.rec, subnet, a) {
			return true
		}
	}
	return false
}

// WaitRestored waits for the driver to have restored its state, at most
// wait or as long as the driver's own calls wait for it (CallTimeout),
// whichever is longer: until then it does not know its endpoints
// (AddressUsed), and an address request must not give up on a restore
// that the CreateEndpoint after it would wait for. The error says so, for
// the IPAM's Config.HeldReady.
func (d *Driver) WaitRestored(wait time.Duration) error {
	if d.readyWithin(max(wait, d.cfg.CallTimeout)) {
		return nil
	}
	d.mu.Lock()
	why := d.restoreErr
	d.mu.Unlock()
	if why != nil {
		return fmt.Errorf("consul-overlay is still restoring its state, so it cannot tell which addresses its containers have: %v; try again", why)
	}
	return errors.New("consul-overlay is still restoring its state, so it cannot tell which addresses its containers have (is Consul reachable?); try again")
}

// readyWithin waits at most wait for the driver to have restored its state
// and reports whether it has (false also once the driver is closing).
func (d *Driver) readyWithin(wait time.Duration) bool {
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-d.ready:
		return true
	case <-t.C:
	case <-d.ctx.Done():
	}
	return false
}

// AddressUsedOnceReady is AddressUsed once the driver has restored its
// state; until then it cannot tell which addresses its endpoints hold. It
// waits for the restore at most wait, and answers true if the driver is
// still restoring: IPAM then ignores the release it asks about (its sweep
// reclaims the address later if no endpoint holds it), where letting it
// through could free the address of a running container (a very late
// release meant for an earlier holder, sent as dockerd and the plugin
// start).
func (d *Driver) AddressUsedOnceReady(subnet netip.Prefix, a netip.Addr, wait time.Duration) bool {
	if d.readyWithin(wait) {
		return d.AddressUsed(subnet, a)
	}
	d.log.Warn("release of an address while the driver is still restoring its state: kept; IPAM's sweep frees it later if no endpoint holds it",
		"subnet", subnet, "address", a)
	return true
}

// AddressInContainer tells whether a running container of this host holds
// address a of the subnet: an endpoint of this host has it and the kernel
// says a container holds the endpoint's interface. IPAM asks it before it
// grants an address again to a request that names the endpoint its record
// was granted to: Docker's retry, or a container started again under its
// name, whose earlier endpoint's interface went with its old container;
// but `docker rename` renames a running container's endpoint without
// telling IPAM, and a new container under the old name must not get the
// renamed one's address. When it cannot tell (still restoring after wait,
// or the kernel did not answer) it answers true: the request fails,
// naming the holder, and nothing is handed out twice.
func (d *Driver) AddressInContainer(subnet netip.Prefix, a netip.Addr, wait time.Duration) bool {
	if !d.readyWithin(wait) {
		d.log.Warn("address asked for again while the driver is still restoring its state: refused, as a running container may hold it", "subnet", subnet, "address", a)
		return true
	}
	var ids []string
	d.mu.Lock()
	for id, ep := range d.endpoints {
		if holds(ep.rec, subnet, a) {
			ids = append(ids, id)
		}
	}
	d.mu.Unlock()
	for _, id := range ids {
		inUse, err := d.dp.EndpointInUse(id)
		if err != nil {
			d.log.Warn("address asked for again: the kernel did not say whether a container holds its endpoint; refused", "endpoint", short(id), "address", a, "error", err)
			return true
		}
		if inUse {
			return true
		}
	}
	return false
}

// AddressMayBeUsed answers IPAM's sweep: false only when this host knows
// that no endpoint uses a (the driver has restored its state, one of its
// networks uses the subnet, and none of its endpoints holds a). An address
// of a subnet that no network of this host uses may belong to a network
// being created, or to another driver's network: it may be used.
func (d *Driver) AddressMayBeUsed(subnet netip.Prefix, a netip.Addr) bool {
	select {
	case <-d.ready:
	default:
		return true
	}
	if d.unrecordedInUse() {
		return true
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	known := false
	for _, l := range d.networks {
		for _, s := range l.rec.Subnets {
			if p, err := netip.ParsePrefix(s); err == nil && p.Masked() == subnet.Masked() {
				known = true
			}
		}
	}
	if !known {
		return true
	}
	for _, ep := range d.endpoints {
		if holds(ep.rec, subnet, a) {
			return true
		}
	}
	return false
}

// NetworksBySubnet counts the Docker networks bound on this host by
// subnet, for the subnets whose address space is consul-overlay's IPAM's
// (OwnsAddressSpace): each took one hold of that subnet's pool (see
// ipam.Driver.NodeHolds).
func (d *Driver) NetworksBySubnet() map[netip.Prefix]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[netip.Prefix]int{}
	for _, l := range d.networks {
		for i, s := range l.rec.Subnets {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				continue
			}
			if i < len(l.rec.Spaces) && d.cfg.OwnsAddressSpace != nil && !d.cfg.OwnsAddressSpace(l.rec.Spaces[i]) {
				continue
			}
			out[p.Masked()]++
		}
	}
	return out
}

// NetworksOn counts the Docker networks bound on this host whose subnet
// is subnet in IPAM address space space (each holds that pool once). A
// subnet recorded without its space counts for every space of
// consul-overlay's IPAM. known is false when the driver has not restored
// its state within wait.
func (d *Driver) NetworksOn(space string, subnet netip.Prefix, wait time.Duration) (n int, known bool) {
	if !d.readyWithin(wait) {
		return 0, false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	n, _ = d.networksOn(space, subnet.Masked(), netip.Addr{}, nil)
	return n, true
}

// KeptHolds is the IPAM's Config.Kept: how many holds of pool poolID (gw
// invalid), or of its gateway gw, this host's releases must leave. Each
// Docker network bound on it that has endpoints holds the pool once, and
// its gateway once: Docker removes a network only once it has none, so a
// release that would leave fewer is not such a network's. It is one sent
// again: engines 28 and 29 send a network's releases before its
// DeleteNetwork (moby daemon/libnetwork/network.go, Network.delete), and
// again when the DeleteNetwork failed and the removal is tried again. Or
// a re-assertion after an eviction counted that network out already (an
// engine that releases after DeleteNetwork, as PROTOCOL.md has it).
// Honoured, it would remove the pool, and with it the address records of
// running containers.
//
// An endpoint counts while a container holds its interface (the kernel
// says so: one link dump, only when a network on the pool has endpoints;
// a kernel that does not answer counts them all), or while this process
// made its veth or joined it and Docker has not left it (Docker moves the
// interface into the container only after Join answers): an endpoint Docker
// dropped while the plugin was down, which the restart took back from
// its record, does not keep the pool of the network Docker is removing.
// Until the driver has restored its state (waiting at most wait) it
// cannot tell: ipam.KeptUnknown, and the IPAM applies the release once
// the restore is done (Config.Restored, Ready).
func (d *Driver) KeptHolds(poolID string, gw netip.Addr, wait time.Duration) int {
	space, subnet, _, err := ipam.ParsePoolID(poolID)
	if err != nil {
		return 0
	}
	if !d.readyWithin(wait) {
		return ipam.KeptUnknown
	}
	count := func(only map[string]bool) int {
		d.mu.Lock()
		defer d.mu.Unlock()
		n, onGateway := d.networksOn(space, subnet.Masked(), gw, only)
		if gw.IsValid() {
			return onGateway
		}
		return n
	}
	used := map[string]bool{}       // networks with an endpoint that counts
	unsure := map[string][]string{} // networks with endpoints to ask the kernel about
	d.mu.Lock()
	for id, ep := range d.endpoints {
		switch {
		case ep.removed:
		case ep.vethMade, ep.joinedHere:
			used[ep.rec.NetworkID] = true
		default:
			unsure[ep.rec.NetworkID] = append(unsure[ep.rec.NetworkID], vxlan.EndpointKey(id))
		}
	}
	d.mu.Unlock()
	all := maps.Clone(used)
	for id := range unsure {
		all[id] = true
	}
	known := count(used)
	if len(unsure) == 0 || count(all) == known {
		return known
	}
	keys, err := d.dp.EndpointsInUse()
	if err != nil {
		return count(all)
	}
	inUse := keySet(keys)
	for id, eps := range unsure {
		if slices.ContainsFunc(eps, func(k string) bool { return inUse[k] }) {
			used[id] = true
		}
	}
	return count(used)
}

// networksOn counts the Docker networks bound on this host on pool subnet
// (masked) of IPAM address space space, and those of them whose gateway
// there is gw; with only set, the networks whose ID it has. Caller holds
// d.mu.
func (d *Driver) networksOn(space string, subnet netip.Prefix, gw netip.Addr, only map[string]bool) (n, onGateway int) {
	for id, l := range d.networks {
		if only != nil && !only[id] {
			continue
		}
		for i, s := range l.rec.Subnets {
			p, err := netip.ParsePrefix(s)
			if err != nil || p.Masked() != subnet {
				continue
			}
			sp := ""
			if i < len(l.rec.Spaces) {
				sp = l.rec.Spaces[i]
			}
			if sp != space && (sp != "" || d.cfg.OwnsAddressSpace == nil || !d.cfg.OwnsAddressSpace(space)) {
				continue
			}
			n++
			for _, g := range l.rec.Gateways {
				if a, err := netip.ParsePrefix(g); err == nil && gw.IsValid() && a.Addr() == gw {
					onGateway++
					break
				}
			}
		}
	}
	return n, onGateway
}

// holdPools makes sure, before a new network is bound, that this host
// holds each of its pools, and each gateway, once per Docker network on
// it, the new one counted (Config.HoldPool). Normally Docker's
// RequestPool and RequestAddress took those holds already and nothing is
// written. After an eviction they may be short: the re-assertion counts
// bound networks only, and this network's RequestPool came before. A
// surplus (a network on the pool being removed, released but not unbound
// yet) is left to the IPAM's sweep. Caller holds d.opMu, so no network is
// bound or unbound meanwhile.
func (d *Driver) holdPools(ctx context.Context, opts *networkOptions) error {
	if d.cfg.HoldPool == nil {
		return nil
	}
	for i, subnet := range opts.subnets {
		space := opts.spaces[i]
		if d.cfg.OwnsAddressSpace != nil && !d.cfg.OwnsAddressSpace(space) {
			continue
		}
		var gw netip.Addr
		for _, g := range opts.gateways {
			if subnet.Contains(g.Addr()) {
				gw = g.Addr()
			}
		}
		d.mu.Lock()
		n, onGW := d.networksOn(space, subnet, gw, nil)
		d.mu.Unlock()
		want := ipam.PoolHolds{Space: space, Subnet: subnet, Holds: n + 1}
		if gw.IsValid() {
			want.Gateways = map[netip.Addr]int{gw: onGW + 1}
		}
		if err := d.cfg.HoldPool(ctx, want); err != nil {
			return fmt.Errorf("hold pool %s for each of this host's %d networks on it: %w", subnet, n+1, err)
		}
	}
	return nil
}

// holds reports whether an endpoint record has address a in subnet.
func holds(ep cluster.Endpoint, subnet netip.Prefix, a netip.Addr) bool {
	for _, c := range []string{ep.IPv4, ep.IPv6} {
		if p, err := netip.ParsePrefix(c); err == nil && p.Addr() == a && subnet.Contains(a) {
			return true
		}
	}
	return false
}

// LocalState is this host's view as the driver holds it: each bound Docker
// network's logical network record, and the records of its joined
// endpoints that have not left. The liveness check re-asserts them after
// this host was evicted while it was only cut off from Consul. It fails
// until the state is restored.
func (d *Driver) LocalState(ctx context.Context) (map[string]cluster.Network, []cluster.Endpoint, error) {
	select {
	case <-d.ready:
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	nets := map[string]cluster.Network{}
	for id, l := range d.networks {
		nets[id] = l.rec
	}
	var eps []cluster.Endpoint
	for _, ep := range d.endpoints {
		if ep.left || ep.rec.Sandbox == "" {
			continue
		}
		eps = append(eps, ep.rec)
	}
	return nets, eps, nil
}

// adoptWindow is how long after a restore the driver looks, every
// adoptEvery, for endpoints restored unjoined that a container takes
// (adoptHeld): Docker moves the interface into the container as soon as
// Join answers. The unjoined sweep looks again later.
const (
	adoptWindow = time.Minute
	adoptEvery  = time.Second
)

// watchAdopt runs adoptHeld every adoptEvery for adoptWindow after the
// restore, or until no endpoint is left to look at.
func (d *Driver) watchAdopt(ctx context.Context) {
	t := time.NewTicker(adoptEvery)
	defer t.Stop()
	end := time.Now().Add(adoptWindow)
	for time.Now().Before(end) {
		if _, waiting := d.adoptHeld(); waiting == 0 {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// adoptHeld marks joined each endpoint restored without a join (no join
// record, and its interface not in a container at the restore) that a
// container holds now: Join answered, the plugin stopped before its join
// record was written, and Docker moved the interface into the container
// after the restart read the kernel. Without this the container would run
// unregistered, and the unjoined sweep would find its endpoint in use at
// every pass. Its service is registered (the container is unknown, as when
// the restore finds such an endpoint held; its ports are those of the
// endpoint record) and its join record written. It returns how many it
// adopted, and how many restored unjoined endpoints are left.
func (d *Driver) adoptHeld() (adopted, waiting int) {
	var ids []string
	d.mu.Lock()
	for id, ep := range d.endpoints {
		if restoredUnjoined(ep) {
			ids = append(ids, id)
		}
	}
	d.mu.Unlock()
	if len(ids) == 0 {
		return 0, 0
	}
	keys, err := d.dp.EndpointsInUse()
	if err != nil {
		d.log.Warn("endpoints restored without a join: the kernel did not say whether containers hold them; asking again later", "endpoints", len(ids), "error", err)
		return 0, len(ids)
	}
	inUse := keySet(keys)
	for _, id := range ids {
		if !inUse[vxlan.EndpointKey(id)] {
			waiting++
			continue
		}
		if d.adopt(id) {
			adopted++
		}
	}
	return adopted, waiting
}

// keySet is the set of the endpoint keys the kernel names
// (EndpointsInUse).
func keySet(keys []string) map[string]bool {
	set := make(map[string]bool, len(keys))
	for _, k := range keys {
		set[k] = true
	}
	return set
}

// restoredUnjoined tells whether ep was restored without a join and has
// not been joined, left or removed since. Caller holds d.mu.
func restoredUnjoined(ep *localEndpoint) bool {
	return ep.rec.Sandbox == "" && !ep.left && !ep.removed && !ep.vethMade && !ep.joinedHere
}

// adopt marks endpoint id joined (adoptHeld), with its removal held off,
// and reports whether it did.
func (d *Driver) adopt(id string) bool {
	unlock := d.held.lock(id)
	defer unlock()
	d.mu.Lock()
	ep := d.endpoints[id]
	if ep == nil || !restoredUnjoined(ep) {
		d.mu.Unlock()
		return false
	}
	l := d.networks[ep.rec.NetworkID]
	ep.rec.Sandbox = "joined" // container unknown, as restoreJoins names it
	rec := ep.rec
	d.mu.Unlock()
	d.snapshotChanged()
	d.bg.setJoined(id, &cluster.Joined{NetworkKey: rec.NetworkKey, Sandbox: rec.Sandbox, Ports: rec.Ports})
	d.log.Warn("an endpoint restored without its join is held by a container now (the plugin stopped between Join's answer and Docker's move of the interface): joined, its service registered; the container's exposed ports are those Docker gave CreateEndpoint",
		"endpoint", short(id), "address", endpointAddresses(rec))
	if d.cfg.Registrar != nil && l != nil {
		d.cfg.Registrar.Register(serviceEndpoint(l.rec, &rec))
	}
	return true
}

// ReclaimUnjoined reclaims, as ReclaimEndpoint does, this host's endpoints
// that were created longer than olderThan ago and never joined: Docker
// joins an endpoint right after creating it, so such a record is the
// orphan of a crash whose rollback Docker never sent. One that a container
// holds is joined instead (adoptHeld). It returns how many it reclaimed.
func (d *Driver) ReclaimUnjoined(ctx context.Context, olderThan time.Duration) int {
	select {
	case <-d.ready:
	default:
		return 0
	}
	d.adoptHeld()
	var ids []string
	d.mu.Lock()
	for id, ep := range d.endpoints {
		if ep.rec.Sandbox == "" && !ep.left && time.Since(ep.rec.Created) > olderThan {
			ids = append(ids, id)
		}
	}
	d.mu.Unlock()
	n := 0
	for _, id := range ids {
		d.ReclaimEndpoint(ctx, id)
		d.mu.Lock()
		_, still := d.endpoints[id]
		d.mu.Unlock()
		if !still {
			n++
		}
	}
	return n
}

// unrecordedRecheck is how long a finding that a container holds an
// unrecorded endpoint is taken as still true.
const unrecordedRecheck = 2 * time.Second

// unrecordedInUse tells whether a container still holds one of the
// endpoints the last restore kept without a record (Driver.unrecorded);
// once none does, they are forgotten. A kernel that does not answer
// counts as in use.
func (d *Driver) unrecordedInUse() bool {
	d.mu.Lock()
	keys := slices.Clone(d.unrecorded)
	recent := time.Since(d.unrecordedSeen) < unrecordedRecheck
	d.mu.Unlock()
	if len(keys) == 0 {
		return false
	}
	if recent {
		// A sweep asks once per address: one link dump answers them all.
		return true
	}
	inUse, err := d.dp.EndpointsInUse()
	if err != nil {
		return true
	}
	for _, k := range keys {
		if slices.Contains(inUse, k) {
			d.mu.Lock()
			d.unrecordedSeen = time.Now()
			d.mu.Unlock()
			return true
		}
	}
	d.mu.Lock()
	d.unrecorded = nil
	d.mu.Unlock()
	return false
}
