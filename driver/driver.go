package driver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/discovery"
	"consul-overlay/internal/fault"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// Dataplane is the kernel side the driver needs; *vxlan.Manager implements
// it.
type Dataplane interface {
	EnsureNetwork(ctx context.Context, n vxlan.Network) (vxlan.NetworkInfo, error)
	DeleteNetwork(ctx context.Context, vni uint32) error
	EnsureEndpoint(ctx context.Context, ep vxlan.Endpoint) (vxlan.EndpointInfo, error)
	// CreateEndpoint is EnsureEndpoint for an endpoint expected to be new
	// (fewer kernel requests when it is).
	CreateEndpoint(ctx context.Context, ep vxlan.Endpoint) (vxlan.EndpointInfo, error)
	DeleteEndpoint(ctx context.Context, id string) error
	// SetPeers makes the remote peers of a network exactly peers.
	SetPeers(ctx context.Context, vni uint32, peers []vxlan.Peer) (vxlan.Changes, error)
	// UpdatePeers is SetPeers for a change of the list: it may compare
	// with what the last call left instead of the kernel's tables.
	UpdatePeers(ctx context.Context, vni uint32, peers []vxlan.Peer) (vxlan.Changes, error)
	// ChangePeers is UpdatePeers given as the difference from the last
	// list; applied false: it wrote nothing, call UpdatePeers.
	ChangePeers(ctx context.Context, vni uint32, removed, added []vxlan.Peer) (ch vxlan.Changes, applied bool, err error)
	// Reconcile makes the kernel match a full description, removing
	// strays.
	Reconcile(ctx context.Context, desired vxlan.State) (vxlan.Changes, error)
	// Networks lists the VNIs of the overlays in the kernel.
	Networks(ctx context.Context) ([]uint32, error)
	// SetVTEP moves the local VXLAN devices of nets to a new source.
	SetVTEP(ctx context.Context, vtep netip.Addr, nets []vxlan.Network) (vxlan.Changes, error)
	// MaxMTU is the largest overlay MTU the underlay carries.
	MaxMTU() int
	// EndpointInUse tells whether a container still holds the
	// endpoint's interface (its container end left the host namespace).
	EndpointInUse(id string) (bool, error)
	// EndpointsInUse lists the endpoints (first 10 characters of their
	// IDs) whose interface a container holds.
	EndpointsInUse() ([]string, error)
	// EgressBlocked says why a network created now could not have
	// vxlan.Network.Egress on this host; nil when it could.
	EgressBlocked() error
	// NetworksInUse is EndpointsInUse by the VNI of the overlay each is
	// a port of.
	NetworksInUse() (map[uint32][]string, error)
	// SetAllowedVTEPs replaces the set of underlay addresses whose VXLAN
	// packets the host accepts.
	SetAllowedVTEPs(ctx context.Context, vteps []netip.Addr) error
}

var _ Dataplane = (*vxlan.Manager)(nil)

// Registrar registers joined endpoints as Consul services; it must not
// block (*discovery.Registrar queues the work).
type Registrar interface {
	Register(ep discovery.Endpoint)
	Deregister(endpointID string)
}

var _ Registrar = (*discovery.Registrar)(nil)

// Config configures a Driver. Zero values take the documented defaults.
type Config struct {
	// HostID is this host's identity in the cluster (required): unique,
	// opaque and stable across restarts. Memberships and endpoint records
	// are keyed by it.
	HostID string
	// Node is this host's human-readable name, for logs and messages
	// (zero: HostID).
	Node string
	// VTEP is this host's underlay address, published to peers (required).
	VTEP netip.Addr
	// Shared says the store is shared by several hosts (Consul). Networks
	// must then take their addresses from an IPAM address space that
	// OwnsAddressSpace accepts, or addresses would collide across hosts.
	Shared bool
	// OwnsAddressSpace tells whether an IPAM address space is consul-overlay's.
	// Nil accepts every space.
	OwnsAddressSpace func(space string) bool
	// CallTimeout bounds one Docker request (default 10s).
	CallTimeout time.Duration
	// Reapable: other hosts may reap this one (a shared store with the
	// reaper running), and its state is of this version's layout (not a
	// host whose identity was just adopted from a version before host
	// identities, which wrote no members/ record). Then a view with
	// memberships but no members/<host-id> is a reap stopped part way,
	// and the restore treats it as a reaped host's view.
	Reapable bool
	// VNIStart is the first VNI allocated automatically (default 4096,
	// as Docker's overlay: below it lie the 802.1Q-sized ids users pick).
	VNIStart uint32
	// ResyncInterval re-applies a network's peers after a failed kernel
	// write (default 10s).
	ResyncInterval time.Duration
	// PeerResync re-applies every network's peers to the kernel even
	// without a change in the store, repairing entries removed behind the
	// plugin's back (default 30s).
	PeerResync time.Duration
	// PruneGrace is how long PruneNetworks leaves a Docker network this
	// process bound alone, as Docker stores a network only after
	// CreateNetwork returns (default 1m).
	PruneGrace time.Duration
	// Registrar registers joined endpoints as services (nil: none).
	Registrar Registrar
	// ReclaimAddress hands an address of a reclaimed stale endpoint back to
	// the IPAM address space it came from, fenced by the endpoint's MAC and
	// creation time: an address that another container holds now is left
	// alone (nil: addresses are kept).
	ReclaimAddress func(ctx context.Context, space string, subnet netip.Prefix, a netip.Addr, mac string, created time.Time) error
	// HoldPool makes sure this host holds an IPAM pool, and each of its
	// gateways, at least as often as want says
	// (ipam.Driver.ReassertPool): CreateNetwork asks for one hold per
	// Docker network bound on the pool, the new one counted (nil: not
	// checked). A re-assertion after an eviction counts only bound
	// networks, so it misses the hold of a network whose RequestPool came
	// before its CreateNetwork; that network's ReleasePool would later
	// remove the pool, and the addresses, of a network still running.
	HoldPool func(ctx context.Context, want ipam.PoolHolds) error
	// LinkLocal is the well-known address (see package linklocal): every
	// endpoint with an IPv4 address gets a connected route to it at Join
	// (invalid: none).
	LinkLocal netip.Addr
	// ObserveWatchLag, if set, gets the time from a peer snapshot's
	// delivery by the store watch to its programming in the kernel (a
	// snapshot replaced by a newer one before it was programmed counts
	// from the first one's delivery).
	ObserveWatchLag func(time.Duration)
	// PendingDir keeps the endpoints Docker asked to delete until their
	// record is gone, so that a restart finishes the deletion (see
	// pending.go; the plugin uses DATA_DIR/deleting). Empty: kept in
	// memory only.
	PendingDir string
	// SnapshotPath keeps a copy of the driver's networks and endpoints
	// (see snapshot.go; the plugin uses DATA_DIR/driver-state.json), used
	// only by a restart after this host was evicted while containers run.
	// Empty: none.
	SnapshotPath string
	// StoreTag names the store (its address and prefix): a copy written
	// on another store is not used.
	StoreTag string
	Logger   *slog.Logger
}

// Driver is consul-overlay's network driver: a thin adapter from Docker's
// calls to the cluster state (package cluster) and the data plane.
type Driver struct {
	cfg Config
	log *slog.Logger
	cl  *cluster.Cluster
	dp  Dataplane

	ctx    context.Context // lives as long as the driver; parent of watches
	cancel context.CancelFunc
	wg     sync.WaitGroup // watches and recovery
	ready  chan struct{}  // closed once the state is restored from the store
	bg     *background    // work off Docker's critical path (background.go)
	pend   pending        // endpoints to delete, on disk (pending.go)
	// snapKick asks for the state copy to be written (snapshot.go).
	snapKick chan struct{}

	// opMu serialises network create, delete, prune and VTEP changes on
	// this host, so a network is never built and torn down at once. Never
	// held across a watch. Lock order: opMu before mu.
	opMu sync.Mutex

	// mu guards networks, logicals, endpoints, leaves, restoreErr and the
	// ids of each logical. Never held across store or netlink I/O.
	mu         sync.Mutex
	networks   map[string]*logical // by Docker NetworkID
	logicals   map[string]*logical // by logical key
	endpoints  map[string]*localEndpoint
	restoreErr error // why the last restore failed, for callers
	// leaves are the memberships that failed CreateNetworks may have left
	// in the store, by Docker NetworkID, with their logical key: catchUp
	// removes them once the store answers (undoJoin).
	leaves map[string]string
	// strays are the VNIs of the overlays the last restore kept in the
	// kernel without a network to serve them (KeepStrays): running
	// containers of a network this host no longer has may use them, and
	// no other network may have them while they do (takenVNIs).
	strays map[uint32]bool
	// unrecorded are the endpoints (vxlan.EndpointKey) containers held
	// at the last restore that the store has no record of: their
	// addresses are unknown here, so the orphan sweep frees none while
	// any of them is in use (AddressMayBeUsed).
	unrecorded []string
	// unrecordedSeen is when a container was last found holding one of
	// them (unrecordedInUse).
	unrecordedSeen time.Time

	// allowMu guards the underlay allowlist's bookkeeping: the peer VTEPs
	// of each logical network, the union last applied, and whether the
	// last write failed. Taken alone, never with mu.
	allowMu        sync.Mutex
	allowed        map[string]map[netip.Addr]bool
	allowedApplied map[netip.Addr]bool
	allowDirty     bool
	allowPrune     *time.Timer // pending pruneVTEPs, if any

	// held is taken per endpoint ID by deleteEndpoint and WhileJoined, so
	// an endpoint is never re-recorded while it is being removed.
	held keyedLock

	// crashAt, when set by tests, is asked at each fault point; true
	// makes the call stop there as a crash would (a panic that skips the
	// undo steps).
	crashAt func(point string) bool
}

// logical is a logical network this host is a member of. Several Docker
// networks of this host may be bound to it; they share its bridge.
type logical struct {
	rec cluster.Network // read-only once set
	// ids are the bound Docker NetworkIDs, with the time this process
	// bound them (zero: restored). Guarded by Driver.mu.
	ids map[string]time.Time

	cancel context.CancelFunc // stops the peer watch
	done   chan struct{}      // closed when the peer watch has stopped
}

// localEndpoint is one endpoint of this host.
type localEndpoint struct {
	rec cluster.Endpoint
	// left is set by Leave: the endpoint is no longer a service.
	left bool
	// removed is set by a DeleteEndpoint that removed the veth while the
	// store was unreachable: Docker is done with the endpoint, its record
	// and addresses go when the store answers again (catchUp).
	removed bool
	// vethMade is set by a CreateEndpoint of this process that made or
	// checked the veth pair, and cleared by the Join that follows: that
	// Join hands the names back without asking the kernel again, as
	// Docker's bridge driver does. Any other Join ensures the pair.
	vethMade bool
	// joinedHere is set by a Join of this process and cleared by Leave:
	// Docker moves the interface into the container only after Join
	// answers, so until then the kernel does not show it in use
	// (KeptHolds).
	joinedHere bool
	// linkLocal is set by the Join that gave the container its route to
	// the link-local address (linkLocalRoute), cleared by Leave.
	linkLocal bool
}

var _ network.Driver = (*Driver)(nil)

// errCrash is what a test-simulated crash panics with.
var errCrash = errors.New("simulated crash")

// New returns a driver; Start restores its state and must be called before
// it serves requests.
func New(cfg Config, store kvstore.Store, dp Dataplane) (*Driver, error) {
	if cfg.HostID == "" {
		return nil, errors.New("driver: host ID is required")
	}
	if cfg.Node == "" {
		cfg.Node = cfg.HostID
	}
	if !cfg.VTEP.IsValid() {
		return nil, errors.New("driver: VTEP address is required")
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = 10 * time.Second
	}
	if cfg.PeerResync <= 0 {
		cfg.PeerResync = 30 * time.Second
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = 10 * time.Second
	}
	if cfg.PruneGrace <= 0 {
		cfg.PruneGrace = time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cl, err := cluster.New(cluster.Config{HostID: cfg.HostID, Node: cfg.Node, VTEP: cfg.VTEP, VNIStart: cfg.VNIStart, Logger: cfg.Logger}, store)
	if err != nil {
		return nil, fmt.Errorf("driver: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Driver{
		cfg:       cfg,
		log:       cfg.Logger,
		cl:        cl,
		dp:        dp,
		ctx:       ctx,
		cancel:    cancel,
		ready:     make(chan struct{}),
		networks:  map[string]*logical{},
		logicals:  map[string]*logical{},
		endpoints: map[string]*localEndpoint{},
		leaves:    map[string]string{},
		allowed:   map[string]map[netip.Addr]bool{},
		bg:        newBackground(),
		pend:      pending{dir: cfg.PendingDir},
		snapKick:  make(chan struct{}, 1),
	}, nil
}

// Start restores the driver's state from the store in the background:
// the networks this host has joined, its endpoints, and the kernel state
// (reconciled without disturbing running containers). Requests wait for it
// up to their timeout. It retries while the store is unreachable, and
// while the store shows nothing of this host but the kernel holds
// overlays (see restore).
func (d *Driver) Start() {
	d.wg.Add(2)
	go func() {
		defer d.wg.Done()
		d.runBackground(d.ctx)
	}()
	go func() {
		defer d.wg.Done()
		backoff := 500 * time.Millisecond
		for {
			err := d.restore(d.ctx)
			if err == nil {
				d.mu.Lock()
				d.restoreErr = nil
				d.mu.Unlock()
				close(d.ready)
				d.wg.Add(2)
				go func() {
					defer d.wg.Done()
					d.writeSnapshots(d.ctx)
				}()
				go func() {
					defer d.wg.Done()
					d.watchAdopt(d.ctx)
				}()
				d.catchUp(d.ctx)
				return
			}
			d.mu.Lock()
			d.restoreErr = err
			d.mu.Unlock()
			if !errors.Is(err, errUnproven) {
				d.log.Warn("restore state from the store failed; retrying", "error", err, "retry_in", backoff)
			}
			select {
			case <-d.ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 10*time.Second)
		}
	}()
}

// Ready is closed once Start has restored the state.
func (d *Driver) Ready() <-chan struct{} { return d.ready }

// Close stops the watches and does what background work is left (bounded).
// Kernel state stays: containers keep running.
func (d *Driver) Close() error {
	d.cancel()
	d.wg.Wait()
	d.flushOnClose()
	return nil
}

// callCtx bounds one Docker request and waits for the restore.
func (d *Driver) callCtx(op string) (context.Context, context.CancelFunc, error) {
	ctx, cancel := context.WithTimeout(d.ctx, d.cfg.CallTimeout)
	select {
	case <-d.ready:
		return ctx, cancel, nil
	case <-ctx.Done():
		cancel()
		d.mu.Lock()
		why := d.restoreErr
		d.mu.Unlock()
		if why != nil {
			return nil, nil, fmt.Errorf("%s: consul-overlay is still restoring its state from the store: %v; try again", op, why)
		}
		return nil, nil, fmt.Errorf("%s: consul-overlay is still restoring its state from the store (is Consul reachable?); try again", op)
	}
}

// point marks a step boundary: the crash-injection tests kill the process
// here (fault.Point), unit tests stop the call here.
func (d *Driver) point(name string) {
	fault.Point(name)
	if d.crashAt != nil && d.crashAt(name) {
		panic(errCrash)
	}
}

// GetCapabilities: local scope, because Docker 23+ refuses global scope off
// Swarm; global connectivity, because the overlay spans hosts.
func (d *Driver) GetCapabilities() (*network.CapabilitiesResponse, error) {
	return &network.CapabilitiesResponse{Scope: network.LocalScope, ConnectivityScope: network.GlobalScope}, nil
}

// CreateNetwork binds Docker network NetworkID of this host to a logical
// network (creating it in the store if it is the first host) and builds
// the overlay in the kernel. A second Docker network of this host with
// the same logical network (Docker's retry with a new ID after a crash)
// shares its overlay.
func (d *Driver) CreateNetwork(req *network.CreateNetworkRequest) (retErr error) {
	op := fmt.Sprintf("create network %s", short(req.NetworkID))
	ctx, cancel, err := d.callCtx(op)
	if err != nil {
		return err
	}
	defer cancel()
	if req.NetworkID == "" {
		return fmt.Errorf("%s: request has no NetworkID", op)
	}
	opts, err := parseNetworkOptions(req)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if len(opts.subnets) == 0 {
		return fmt.Errorf("%s: no subnet from IPAM; use --ipam-driver consul-overlay", op)
	}
	if d.cfg.Shared && d.cfg.OwnsAddressSpace != nil {
		for i, s := range opts.spaces {
			if !d.cfg.OwnsAddressSpace(s) {
				return fmt.Errorf("%s: subnet %s comes from IPAM address space %q, not consul-overlay's, so addresses would not be unique across hosts: create the network with --ipam-driver consul-overlay", op, opts.subnets[i], s)
			}
		}
	}
	key, err := cluster.Key(opts.name, opts.subnets)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}

	d.opMu.Lock()
	defer d.opMu.Unlock()
	if max := d.dp.MaxMTU(); opts.mtu > max {
		return fmt.Errorf("%s: option mtu=%d: the underlay carries at most %d bytes of overlay payload (its MTU minus the VXLAN overhead)", op, opts.mtu, max)
	}
	if max := d.dp.MaxMTU() - vxlan.ESPOverhead; opts.encrypted && opts.mtu > max {
		return fmt.Errorf("%s: option mtu=%d: an encrypted network carries at most %d bytes of overlay payload (the underlay's MTU minus the VXLAN overhead and %d bytes of ESP)", op, opts.mtu, max, vxlan.ESPOverhead)
	}
	if l := d.network(req.NetworkID); l != nil {
		if l.rec.Key == key {
			return nil // replayed request
		}
		return fmt.Errorf("%s: already exists as logical network %s", op, l.rec.Label())
	}
	taken, err := d.takenVNIs(key)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := d.holdPools(ctx, opts); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	d.mu.Lock()
	delete(d.leaves, req.NetworkID) // asked again: this call decides
	d.mu.Unlock()

	// The record keeps the -o options; a new network without -o egress
	// also its default (an existing one keeps its own, differingSettings).
	options, egressWhy := opts.generic, ""
	if !opts.egressGiven {
		var m string
		if m, egressWhy = defaultEgress(opts, d.dp.EgressBlocked); m != egressDocker {
			options = maps.Clone(opts.generic)
			options[cluster.OptionEgressDefault] = m
		}
	}
	rec, err := d.cl.Join(ctx, key, req.NetworkID, cluster.NetworkSpec{
		Name: opts.name, VNI: opts.vni, MTU: opts.mtu, Internal: opts.internal,
		Subnets: opts.subnets, Gateways: opts.gateways, Spaces: opts.spaces, Options: options,
		Avoid: slices.Collect(maps.Keys(taken)),
	})
	if err != nil {
		err = fmt.Errorf("%s: %w", op, err)
		if outcomeUnknown(err) {
			// The store may have applied the membership without the
			// answer reaching us. Docker stores no network for a failed
			// create and never deletes it: the membership, and with a
			// new network its VNI and subnets, would stay taken.
			err = errors.Join(err, d.undoJoin(ctx, key, req.NetworkID))
		}
		return err
	}
	defer func() {
		if retErr != nil {
			if err := d.cl.Leave(context.WithoutCancel(ctx), rec.Key, req.NetworkID); err != nil {
				retErr = errors.Join(retErr, fmt.Errorf("undo: %w", err))
			}
		}
	}()
	d.point("createnetwork/after-membership")
	if diff := differingSettings(rec, opts); len(diff) > 0 {
		return fmt.Errorf("%s: logical network %s exists with other settings (%s): create it with the same options, or another -o name: %w",
			op, rec.Label(), strings.Join(diff, "; "), cluster.ErrIncompatible)
	}

	if why, ok := taken[rec.VNI]; ok {
		// The store gave the network this VNI (free there: another
		// host's allocation, or -o vni=): sharing the overlay would
		// join the two networks. (Normally the store refuses the VNI
		// of a network this host runs itself.)
		return fmt.Errorf("%s: logical network %s has vni %d: %s", op, rec.Label(), rec.VNI, why)
	}
	if _, err := d.dp.EnsureNetwork(ctx, kernelNetwork(rec)); err != nil {
		return fmt.Errorf("%s: build overlay for logical network %s (vni %d): %w", op, rec.Label(), rec.VNI, err)
	}
	d.point("createnetwork/after-kernel")
	d.bind(req.NetworkID, rec, time.Now())
	attrs := []any{"subnets", rec.Subnets, "host", d.cfg.HostID, "egress", egressMode(rec)}
	if egressWhy != "" && rec.Egress() == "" {
		// A network nobody chose an egress for: why it is not auto.
		attrs = append(attrs, "egress_not_auto", egressWhy)
	}
	d.log.Info("network created", netAttrs(rec, req.NetworkID, attrs...)...)
	return nil
}

// takenVNIs returns the VNIs no network but logical network key may have
// on this host, each with the reason: the overlays of this host's other
// logical networks (the store frees their VNIs when it reaps this host
// while it is away, before the liveness check writes them back), and
// those the last restore kept without a network (Driver.strays) while a
// container holds an endpoint on them. Sharing one would join two
// networks on one link, and the removal of either would take the other's
// overlay. A stray no container uses any more is forgotten: a network may
// have its VNI, and EnsureNetwork takes the overlay over. One link dump,
// only while there are strays. Caller holds d.opMu.
func (d *Driver) takenVNIs(key string) (map[uint32]string, error) {
	taken := map[uint32]string{}
	d.mu.Lock()
	for k, l := range d.logicals {
		if k != key {
			taken[l.rec.VNI] = fmt.Sprintf("this host runs logical network %s on vni %d, which the store no longer reserves for it (reaped while this host was away?): one overlay would join the two networks", l.rec.Label(), l.rec.VNI)
		}
	}
	n := len(d.strays)
	d.mu.Unlock()
	if n == 0 {
		return taken, nil
	}
	byVNI, err := d.dp.NetworksInUse()
	if err != nil {
		return nil, fmt.Errorf("cannot tell which overlays kept in the kernel for running containers are in use: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for vni := range d.strays {
		keys := byVNI[vni]
		if len(keys) == 0 {
			delete(d.strays, vni)
			continue
		}
		if _, ok := taken[vni]; !ok {
			taken[vni] = fmt.Sprintf("this host keeps an overlay with vni %d for running containers of a network it no longer serves (the store gave it up while the host was away; see the log at the last start), endpoints %v: one overlay would join the two networks. Remove those containers (docker network inspect lists endpoint IDs; these are their first 10 characters), then create the network again",
				vni, keys)
		}
	}
	return taken, nil
}

// undoJoin removes Docker network id from logical network key after a
// CreateNetwork whose membership write may have been applied unanswered.
// If the store does not answer, catchUp retries it. Caller holds d.opMu.
func (d *Driver) undoJoin(ctx context.Context, key, id string) error {
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
	defer cancel()
	err := d.cl.Leave(uctx, key, id)
	if err == nil {
		return nil
	}
	d.mu.Lock()
	d.leaves[id] = key
	d.mu.Unlock()
	d.log.Warn("membership of a failed network create not removed yet; removed when the store answers",
		"network", key, "network_id", short(id), "error", err)
	return fmt.Errorf("undo: leave logical network %q (retried when the store answers): %w", key, err)
}

// finishLeaves retries the undoJoins the store did not answer (catchUp). A
// network Docker created under the ID since is left alone.
func (d *Driver) finishLeaves(ctx context.Context) {
	d.mu.Lock()
	n := len(d.leaves)
	d.mu.Unlock()
	if n == 0 {
		return
	}
	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	leaves := maps.Clone(d.leaves)
	d.mu.Unlock()
	for id, key := range leaves {
		if d.network(id) == nil {
			// Bounded: network calls wait for opMu meanwhile.
			lctx, cancel := context.WithTimeout(ctx, undoTimeout)
			err := d.cl.Leave(lctx, key, id)
			cancel()
			if err != nil {
				continue
			}
			d.log.Info("membership of a failed network create removed", "network", key, "network_id", short(id))
		}
		d.mu.Lock()
		delete(d.leaves, id)
		d.mu.Unlock()
	}
}

// kernelNetwork is the data-plane description of a logical network.
func kernelNetwork(rec cluster.Network) vxlan.Network {
	n := vxlan.Network{VNI: rec.VNI, MTU: rec.MTU, Internal: rec.Internal, Encrypted: encryptedNetwork(rec.Options), ConsulAPI: consulAPI(rec), Egress: egress(rec)}
	for _, g := range rec.Gateways {
		if p, err := netip.ParsePrefix(g); err == nil {
			n.Gateways = append(n.Gateways, p)
		}
	}
	return n
}

// bind records Docker network id as bound to logical network rec and
// starts the network's peer watch if it is the first.
func (d *Driver) bind(id string, rec cluster.Network, at time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	l := d.logicals[rec.Key]
	if l == nil {
		ctx, cancel := context.WithCancel(d.ctx)
		l = &logical{rec: rec, ids: map[string]time.Time{}, cancel: cancel, done: make(chan struct{})}
		d.logicals[rec.Key] = l
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			defer close(l.done)
			d.watchPeers(ctx, l)
		}()
	}
	l.ids[id] = at
	d.networks[id] = l
	d.snapshotChanged()
}

// DeleteNetwork unbinds the Docker network from its logical network; the
// overlay goes from the kernel with the last Docker network of this host
// bound to it, and the network's record and VNI go from the store with the
// last host. Unknown IDs are success.
func (d *Driver) DeleteNetwork(req *network.DeleteNetworkRequest) error {
	op := fmt.Sprintf("delete network %s", short(req.NetworkID))
	ctx, cancel, err := d.callCtx(op)
	if err != nil {
		return err
	}
	defer cancel()
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.deleteNetwork(ctx, req.NetworkID); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return nil
}

// deleteNetwork is DeleteNetwork with d.opMu held.
func (d *Driver) deleteNetwork(ctx context.Context, id string) error {
	l := d.network(id)
	if l == nil {
		return nil
	}
	// Docker deletes endpoints first; remove what a crash may have left.
	for _, ep := range d.localEndpoints(id) {
		if err := d.deleteEndpoint(ctx, ep); err != nil {
			return err
		}
	}
	d.point("deletenetwork/after-endpoints")
	if err := d.cl.Leave(ctx, l.rec.Key, id); err != nil {
		return err
	}
	d.point("deletenetwork/after-leave")
	d.mu.Lock()
	delete(l.ids, id)
	delete(d.networks, id)
	last := len(l.ids) == 0
	if last {
		delete(d.logicals, l.rec.Key)
	}
	d.mu.Unlock()
	d.snapshotChanged()
	if last {
		l.cancel()
		<-l.done
		if err := d.dp.DeleteNetwork(ctx, l.rec.VNI); err != nil {
			// The store no longer lists the network; the next reconcile
			// removes what is left in the kernel.
			d.log.Warn("overlay not removed from the kernel; the next reconcile removes it", netAttrs(l.rec, id, "error", err)...)
		}
		d.point("deletenetwork/after-kernel")
	}
	d.log.Info("network removed", netAttrs(l.rec, id, "host", d.cfg.HostID, "last", last)...)
	return nil
}

// PruneNetworks unbinds this host's Docker networks that Docker no longer
// has (exists reports false), as DeleteNetwork would: a crash between the
// membership write and Docker's answer leaves such a network, and Docker
// retries CreateNetwork under a new ID. Networks bound by this process less
// than PruneGrace ago are left alone (Docker stores a network only after
// CreateNetwork returns). Call it outside Docker's calls: exists asks
// Docker.
func (d *Driver) PruneNetworks(ctx context.Context, exists func(ctx context.Context, networkID string) (bool, error)) error {
	select {
	case <-d.ready:
	default:
		return errors.New("prune networks: driver state not restored yet")
	}
	type cand struct {
		id   string
		name string
	}
	var cands []cand
	d.mu.Lock()
	for id, l := range d.networks {
		if at := l.ids[id]; !at.IsZero() && time.Since(at) < d.cfg.PruneGrace {
			continue
		}
		cands = append(cands, cand{id, networkName(l.rec)})
	}
	d.mu.Unlock()
	var errs []error
	for _, c := range cands {
		ok, err := exists(ctx, c.id)
		if err != nil {
			errs = append(errs, fmt.Errorf("prune network %s: %w", short(c.id), err))
			continue
		}
		if ok {
			continue
		}
		d.log.Info("removing a network Docker does not have", "network", c.name, "network_id", short(c.id))
		d.opMu.Lock()
		err = d.deleteNetwork(ctx, c.id)
		d.opMu.Unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("prune network %s: %w", short(c.id), err))
		}
	}
	return errors.Join(errs...)
}

// CreateEndpoint records the endpoint, which publishes it to the other
// hosts, and creates its veth pair on the network's bridge at the same
// time (as Docker's bridge driver does, so that Join only hands the names
// back); it returns the endpoint's MAC address if Docker did not give one.
// If either half fails, the other is undone (settleEndpoint).
func (d *Driver) CreateEndpoint(req *network.CreateEndpointRequest) (*network.CreateEndpointResponse, error) {
	op := fmt.Sprintf("create endpoint %s", short(req.EndpointID))
	ctx, cancel, err := d.callCtx(op)
	if err != nil {
		return nil, err
	}
	defer cancel()
	l, err := d.knownNetwork(op, req.NetworkID)
	if err != nil {
		return nil, err
	}
	if req.EndpointID == "" || strings.ContainsAny(req.EndpointID, "/ ") {
		return nil, fmt.Errorf("%s: invalid endpoint ID %q", op, req.EndpointID)
	}
	iface := req.Interface
	if iface == nil {
		iface = &network.EndpointInterface{}
	}
	rec := cluster.Endpoint{
		ID: req.EndpointID, NetworkKey: l.rec.Key, NetworkID: req.NetworkID,
		Options: endpointOptions(req.Options),
	}
	if ports, err := discovery.ParseExposedPorts(req.Options[discovery.ExposedPortsOption]); err != nil {
		// Networking first: a port list we cannot read only costs the
		// service its port.
		d.log.Warn("exposed ports unreadable; the endpoint's service is registered without a port", netAttrs(l.rec, req.NetworkID, "endpoint", short(req.EndpointID), "error", err)...)
	} else {
		rec.Ports = ports
	}
	var v4, v6 netip.Prefix
	if iface.Address != "" {
		if v4, err = netip.ParsePrefix(iface.Address); err != nil || !v4.Addr().Is4() {
			return nil, fmt.Errorf("%s: address %q is not an IPv4 CIDR", op, iface.Address)
		}
		rec.IPv4 = v4.String()
	}
	if iface.AddressIPv6 != "" {
		if v6, err = netip.ParsePrefix(iface.AddressIPv6); err != nil || !v6.Addr().Is6() {
			return nil, fmt.Errorf("%s: address %q is not an IPv6 CIDR", op, iface.AddressIPv6)
		}
		rec.IPv6 = v6.String()
	}
	if !v4.IsValid() && !v6.IsValid() {
		return nil, fmt.Errorf("%s: no address from IPAM", op)
	}
	resp := &network.CreateEndpointResponse{}
	if iface.MacAddress != "" {
		mac, err := net.ParseMAC(iface.MacAddress)
		if err != nil || len(mac) != 6 {
			return nil, fmt.Errorf("%s: MAC address %q is not an Ethernet address", op, iface.MacAddress)
		}
		rec.MAC = mac.String()
	} else {
		a := v4.Addr()
		if !a.IsValid() {
			a = v6.Addr()
		}
		rec.MAC = vxlan.MACFromIP(a).String()
		// Answer only the fields Docker left empty.
		resp.Interface = &network.EndpointInterface{MacAddress: rec.MAC}
	}

	// The veth pair is made while the record is written: the two are
	// independent, and an attach then costs the slower of the two
	// instead of their sum. Join only hands the names back (issue 16).
	d.mu.Lock()
	known := d.endpoints[rec.ID] != nil
	d.mu.Unlock()
	if d.bg.keepVeth(rec.ID) {
		d.log.Warn("create of an endpoint whose veth was being removed; keeping it", "endpoint", short(rec.ID))
	}
	hw, _ := net.ParseMAC(rec.MAC) // parsed or derived above
	kep := vxlan.Endpoint{ID: rec.ID, VNI: l.rec.VNI, MAC: hw}
	type vethResult struct {
		err  error
		took time.Duration
	}
	veth := make(chan vethResult, 1)
	start := time.Now()
	go func() {
		_, err := d.dp.CreateEndpoint(ctx, kep)
		veth <- vethResult{err, time.Since(start)}
	}()
	// Docker may replay CreateEndpoint (also after a crash that left the
	// record): the same endpoint is success.
	stored, txnErr := d.cl.CreateEndpoint(ctx, rec)
	recordTook := time.Since(start)
	if txnErr == nil {
		rec = stored
	}
	v := <-veth
	// Which half the attach waited for.
	d.log.Debug("endpoint record and veth pair done", "endpoint", short(rec.ID), "record", recordTook, "veth", v.took)
	if err := d.settleEndpoint(ctx, op, rec, known, txnErr, v.err); err != nil {
		return nil, err
	}
	d.point("createendpoint/after-record")
	d.mu.Lock()
	if old := d.endpoints[rec.ID]; old != nil {
		// A replay: what Join learned lives here and in the join
		// record, not in the endpoint record.
		sandbox, ports := old.rec.Sandbox, old.rec.Ports
		old.rec = rec
		if old.rec.Sandbox == "" {
			old.rec.Sandbox = sandbox
		}
		if len(old.rec.Ports) == 0 {
			old.rec.Ports = ports
		}
		old.vethMade = true
	} else {
		d.endpoints[rec.ID] = &localEndpoint{rec: rec, vethMade: true}
	}
	d.mu.Unlock()
	d.snapshotChanged()
	d.log.Info("endpoint created", netAttrs(l.rec, req.NetworkID, "endpoint", short(rec.ID), "address", endpointAddresses(rec), "mac", rec.MAC, "host", d.cfg.HostID)...)
	return resp, nil
}

// undoTimeout bounds the undo of one half of a failed CreateEndpoint, which
// runs even when the call's own context has expired.
const undoTimeout = 5 * time.Second

// settleEndpoint decides CreateEndpoint's outcome from its two halves, run
// side by side: the record's transaction (txnErr) and the veth pair
// (vethErr, of which EnsureEndpoint undid its own part). Nothing is left
// half-created: a failed transaction takes the veth pair with it (removed
// before the error returns), and the record too when the store may have
// applied it without answering; a failed veth pair takes the record. known
// says this host had the endpoint before the call (a replay): the
// transaction then wrote nothing new and the pair predates the call (a
// container may hold it), so both stay.
func (d *Driver) settleEndpoint(ctx context.Context, op string, rec cluster.Endpoint, known bool, txnErr, vethErr error) error {
	if txnErr == nil && vethErr == nil {
		return nil
	}
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
	defer cancel()
	if txnErr != nil {
		err := fmt.Errorf("%s: %w", op, txnErr)
		if vethErr != nil {
			err = errors.Join(err, fmt.Errorf("%s: veth pair: %w", op, vethErr))
		}
		if known {
			return err
		}
		if vethErr == nil {
			if derr := d.dp.DeleteEndpoint(uctx, rec.ID); derr != nil {
				// Not left to chance: the background removal retries.
				d.bg.deleteVeth(rec.ID)
				err = errors.Join(err, fmt.Errorf("undo: remove its veth pair (retried in the background): %w", derr))
			}
		}
		if outcomeUnknown(txnErr) {
			// The store may have applied the transaction without the
			// answer reaching us: a record left behind would program
			// this endpoint on every host and hold its address after
			// Docker released it. Remove it as after a failed veth.
			err = errors.Join(err, d.undoRecord(uctx, rec))
		}
		return err
	}
	err := fmt.Errorf("%s: veth pair: %w", op, vethErr)
	if known {
		return err
	}
	return errors.Join(err, d.undoRecord(uctx, rec))
}

// outcomeUnknown tells whether a failed store write may have been applied
// all the same: the store did not answer (unreachable, timed out), as
// opposed to refusing it (a conflict, a missing network, another host's
// record).
func outcomeUnknown(err error) bool {
	return errors.Is(err, kvstore.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)
}

// undoRecord removes the record of an endpoint whose CreateEndpoint
// failed. If the store does not answer, the endpoint is kept as removed:
// its record goes when the store answers again (catchUp), and until then
// its addresses stay taken (AddressUsed).
func (d *Driver) undoRecord(ctx context.Context, rec cluster.Endpoint) error {
	derr := d.cl.DeleteEndpoint(ctx, rec.NetworkKey, rec.ID)
	if derr == nil {
		return nil
	}
	d.markPending(rec.ID)
	d.mu.Lock()
	if d.endpoints[rec.ID] == nil {
		d.endpoints[rec.ID] = &localEndpoint{rec: rec, left: true, removed: true}
	}
	d.mu.Unlock()
	d.log.Warn("record of a failed endpoint create not removed yet; removed when the store answers, its address held until then",
		"endpoint", short(rec.ID), "address", endpointAddresses(rec), "error", derr)
	return fmt.Errorf("undo: remove its record (retried when the store answers): %w", derr)
}

// DeleteEndpoint removes the endpoint's veth and its record. Unknown IDs
// are success: Docker deletes what a crash already removed.
func (d *Driver) DeleteEndpoint(req *network.DeleteEndpointRequest) error {
	op := fmt.Sprintf("delete endpoint %s", short(req.EndpointID))
	ctx, cancel, err := d.callCtx(op)
	if err != nil {
		return err
	}
	defer cancel()
	d.mu.Lock()
	ep := d.endpoints[req.EndpointID]
	d.mu.Unlock()
	if ep == nil {
		// Not ours or already gone; the veth may still exist after a crash.
		if err := d.dp.DeleteEndpoint(ctx, req.EndpointID); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		return nil
	}
	// Recorded first: whatever stops this call (the store, a kill -9),
	// the deletion is finished later, by catchUp or at the next start.
	d.markPending(req.EndpointID)
	if err := d.deleteEndpoint(ctx, ep); err != nil {
		if !errors.Is(err, kvstore.ErrUnavailable) {
			// The store refused the record's deletion (a permission, a
			// conflict storm): the service and the veth went before it
			// (deleteEndpoint), so the endpoint is removed here; its
			// record and addresses follow when the store takes the
			// deletion (catchUp retries, the mark stays for a restart).
			d.mu.Lock()
			ep.left, ep.removed = true, true
			d.mu.Unlock()
			d.log.Error("endpoint removed from this host, but the store refused to delete its record: the other hosts keep it as a peer and its addresses stay held until the deletion succeeds (retried every few seconds)",
				"endpoint", short(req.EndpointID), "address", endpointAddresses(ep.rec), "error", err)
			return fmt.Errorf("%s: %w", op, err)
		}
		if d.dp.DeleteEndpoint(ctx, req.EndpointID) != nil {
			// The kernel failed: the endpoint stays as it is, and so
			// does Docker's view of it.
			if cerr := d.pend.clear(req.EndpointID); cerr != nil {
				d.log.Warn("mark of an endpoint to delete not removed from DATA_DIR", "endpoint", short(req.EndpointID), "error", cerr)
			}
			return fmt.Errorf("%s: %w", op, err)
		}
		// The kernel part is done and the container is gone: Docker's
		// removal goes on without the store, and the record and the
		// addresses follow when it answers again (catchUp). Until then
		// the endpoint keeps its addresses (AddressUsed), so they are
		// handed to nobody else.
		d.mu.Lock()
		ep.left, ep.removed = true, true
		d.mu.Unlock()
		d.log.Warn("endpoint removed from this host while the store is unreachable; its record and addresses are released when the store answers again",
			"endpoint", short(req.EndpointID), "address", endpointAddresses(ep.rec), "error", err)
		return nil
	}
	return nil
}

// markPending records on disk that endpoint id is to be deleted
// (pending.go). A failure is logged: the deletion goes on, and only a
// restart before its record is gone would bring the endpoint back.
func (d *Driver) markPending(id string) {
	if err := d.pend.mark(id); err != nil {
		d.log.Error("endpoint to delete not recorded in DATA_DIR: if the plugin stops before its record is deleted, the next start restores it",
			"endpoint", short(id), "error", err)
	}
}

// catchUpInterval is how often catchUp retries the records of endpoints
// removed while the store was unreachable.
var catchUpInterval = 2 * time.Second

// catchUp removes, once the store answers again, the records and addresses
// of endpoints that DeleteEndpoint removed from this host while it did
// not, and of those a restart found to delete (pending.go), and the
// memberships failed network creates may have left (undoJoin) (the
// driver's own goroutine, started by Start; stops with Close).
func (d *Driver) catchUp(ctx context.Context) {
	t := time.NewTicker(catchUpInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.finishLeaves(ctx)
		var ids []string
		d.mu.Lock()
		for id, ep := range d.endpoints {
			if ep.removed {
				ids = append(ids, id)
			}
		}
		d.mu.Unlock()
		for _, id := range ids {
			d.ReclaimEndpoint(ctx, id)
			d.mu.Lock()
			_, still := d.endpoints[id]
			d.mu.Unlock()
			if !still {
				d.log.Info("record of an endpoint removed while the store did not answer deleted", "endpoint", short(id))
			}
		}
	}
}

// deleteEndpoint removes a local endpoint from the registrar, the kernel
// and the store, in that order; each step is idempotent. The veth pair and
// the join record go in the background (background.go): the pair's names
// derive from the endpoint ID, which Docker never reuses, so nothing
// waits for them, and what a crash leaves is removed at the next start.
func (d *Driver) deleteEndpoint(ctx context.Context, ep *localEndpoint) error {
	id := ep.rec.ID
	unlock := d.held.lock(id)
	defer unlock()
	if d.cfg.Registrar != nil {
		d.cfg.Registrar.Deregister(id)
	}
	d.point("deleteendpoint/after-deregister")
	d.bg.deleteVeth(id)
	// Always: a replayed CreateEndpoint or a restart may have lost what
	// this host knew of the join, and removing no record is success.
	d.bg.setJoined(id, nil)
	d.point("deleteendpoint/after-veth")
	if err := d.cl.DeleteEndpoint(ctx, ep.rec.NetworkKey, id); err != nil {
		return err
	}
	d.point("deleteendpoint/after-record")
	if err := d.pend.clear(id); err != nil {
		d.log.Warn("mark of a deleted endpoint not removed from DATA_DIR; the next start removes it", "endpoint", short(id), "error", err)
	}
	d.mu.Lock()
	delete(d.endpoints, id)
	l := d.logicals[ep.rec.NetworkKey]
	d.mu.Unlock()
	d.snapshotChanged()
	name := ep.rec.NetworkKey
	if l != nil {
		name = networkName(l.rec)
	}
	d.log.Info("endpoint removed", "network", name, "network_id", short(ep.rec.NetworkID), "endpoint", short(id), "address", endpointAddresses(ep.rec), "host", d.cfg.HostID)
	return nil
}

// Join hands the container end of the endpoint's veth pair to Docker.
// CreateEndpoint made the pair; EnsureEndpoint checks it (three lookups, no
// write) and creates or repairs it if it is missing (an endpoint created
// by an older version, or a pair lost since). On a network of the default
// egress no gateway is returned, so Docker attaches docker_gwbridge for
// outbound traffic and -p, as it does for its own overlay. On an
// egress=host network Join returns the network's IPv4 gateway (on the
// bridge, or on the gateway link, of every host) with
// DisableGatewayService: Docker programs "default via <gateway>" and adds
// no docker_gwbridge endpoint, and the host routes and masquerades the
// container's traffic (vxlan.Network.Egress). On an egress=auto network
// Join does the one for a container that publishes no port and the other
// for one that does (the sandbox's port bindings come with Join), whose
// ports Docker then publishes through docker_gwbridge.
func (d *Driver) Join(req *network.JoinRequest) (*network.JoinResponse, error) {
	op := fmt.Sprintf("join endpoint %s", short(req.EndpointID))
	ctx, cancel, err := d.callCtx(op)
	if err != nil {
		return nil, err
	}
	defer cancel()
	l, err := d.knownNetwork(op, req.NetworkID)
	if err != nil {
		return nil, err
	}
	var gateway netip.Addr
	mode := egressMode(l.rec)
	var ports []string
	if mode == egressAuto {
		ports = publishedPorts(req.Options[optPortMap])
	}
	if hostEgress(mode) && len(ports) == 0 {
		// Checked before anything is marked joined: CreateNetwork refuses
		// egress=host or auto without an IPv4 gateway, so only a damaged
		// record lands here.
		if gateway = ipv4Gateway(l.rec); !gateway.IsValid() {
			return nil, fmt.Errorf("%s: consul-overlay network %s (Docker network %s) has egress=%s but no IPv4 gateway in its record (gateways %v): the container would have no way out",
				op, l.rec.Label(), short(req.NetworkID), mode, l.rec.Gateways)
		}
	}
	d.mu.Lock()
	ep := d.endpoints[req.EndpointID]
	var mac string
	var made bool
	if ep != nil {
		mac, made = ep.rec.MAC, ep.vethMade
		ep.vethMade = false
		ep.joinedHere = true
	}
	d.mu.Unlock()
	if ep == nil {
		return nil, fmt.Errorf("%s: unknown endpoint (CreateEndpoint was not called or failed)", op)
	}
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return nil, fmt.Errorf("%s: stored MAC %q: %w", op, mac, err)
	}
	if d.bg.keepVeth(req.EndpointID) {
		d.log.Warn("join of an endpoint whose veth was being removed; keeping it", "endpoint", short(req.EndpointID))
		made = false
	}
	ifname := vxlan.ContainerIfName(req.EndpointID)
	if !made {
		// A restart, a replay or a second Join since CreateEndpoint: the
		// pair is checked and repaired or made again.
		info, err := d.dp.EnsureEndpoint(ctx, vxlan.Endpoint{ID: req.EndpointID, VNI: l.rec.VNI, MAC: hw})
		if err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
		ifname = info.ContainerIf
	}
	d.point("join/after-veth")
	resp := &network.JoinResponse{InterfaceName: network.InterfaceName{SrcName: ifname, DstPrefix: "eth"}}
	if gateway.IsValid() {
		// IPv4 only: no GatewayIPv6, so an IPv6 container has no IPv6
		// default route (DisableGatewayService keeps docker_gwbridge
		// away for both).
		resp.Gateway = gateway.String()
		resp.DisableGatewayService = true
	}
	if r := d.linkLocalRoute(ep, req.SandboxKey); r != nil {
		resp.StaticRoutes = append(resp.StaticRoutes, r)
	}
	attrs := []any{"endpoint", short(req.EndpointID), "link", ifname, "linklocal_route", len(resp.StaticRoutes) > 0, "gateway", resp.Gateway}
	if len(ports) > 0 {
		// egress=auto: Docker publishes them through docker_gwbridge,
		// which is then the container's way out too.
		attrs = append(attrs, "published_ports", ports, "egress", egressDocker)
	}
	d.log.Info("endpoint joined", netAttrs(l.rec, req.NetworkID, attrs...)...)
	d.joined(l, ep, req)
	return resp, nil
}

// Leave is called before Docker moves the interface back to the host; the
// veth goes in DeleteEndpoint.
func (d *Driver) Leave(req *network.LeaveRequest) error {
	op := fmt.Sprintf("leave endpoint %s", short(req.EndpointID))
	_, cancel, err := d.callCtx(op)
	if err != nil {
		return err
	}
	cancel()
	d.mu.Lock()
	ep := d.endpoints[req.EndpointID]
	var l *logical
	var routeLost []string // the container's endpoints left without the route
	if ep != nil {
		ep.left = true
		ep.vethMade = false
		ep.joinedHere = false
		l = d.networks[req.NetworkID]
		if ep.linkLocal {
			ep.linkLocal = false
			for _, other := range d.endpoints {
				if other != ep && !other.left && other.rec.Sandbox == ep.rec.Sandbox {
					routeLost = append(routeLost, short(other.rec.ID))
				}
			}
		}
	}
	d.mu.Unlock()
	if len(routeLost) > 0 {
		// libnetwork takes one route to the /32 per container: it went
		// with this interface, and no other network can add it now.
		d.log.Warn("the container left the consul-overlay network that carried its route to the link-local address: it no longer reaches it (Consul DNS and API) through its other consul-overlay networks until it restarts",
			"endpoint", short(req.EndpointID), "address", d.cfg.LinkLocal, "container_endpoints", routeLost)
	}
	if d.cfg.Registrar != nil {
		d.cfg.Registrar.Deregister(req.EndpointID)
	}
	d.point("leave/after-deregister")
	if ep != nil && l != nil {
		d.log.Info("endpoint left", netAttrs(l.rec, req.NetworkID, "endpoint", short(req.EndpointID))...)
	}
	return nil
}

// EndpointInfo reports the endpoint's VNI, MAC, VTEP, node and host.
func (d *Driver) EndpointInfo(req *network.InfoRequest) (*network.InfoResponse, error) {
	resp := &network.InfoResponse{Value: map[string]string{}}
	d.mu.Lock()
	defer d.mu.Unlock()
	ep := d.endpoints[req.EndpointID]
	l := d.networks[req.NetworkID]
	if ep == nil || l == nil {
		return resp, nil // Docker ignores errors here; keep it cheap.
	}
	resp.Value["vni"] = fmt.Sprint(l.rec.VNI)
	resp.Value["mac"] = ep.rec.MAC
	resp.Value["vtep"] = ep.rec.VTEP
	resp.Value["node"] = ep.rec.Node
	resp.Value["host"] = ep.rec.HostID
	resp.Value["network"] = l.rec.Key
	return resp, nil
}

// SetVTEP moves this host to a new underlay address: the local VXLAN
// devices send from it, and this host's memberships and endpoint records
// are republished with it (compare-and-set), so the other hosts' watches
// reprogram their peers. Calling it again retries what failed.
func (d *Driver) SetVTEP(ctx context.Context, addr netip.Addr) error {
	select {
	case <-d.ready:
	default:
		return errors.New("set vtep: driver state not restored yet")
	}
	addr = addr.Unmap()
	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	nets := make([]vxlan.Network, 0, len(d.logicals))
	for _, l := range d.logicals {
		nets = append(nets, kernelNetwork(l.rec))
	}
	d.mu.Unlock()
	var errs []error
	if _, err := d.dp.SetVTEP(ctx, addr, nets); err != nil {
		errs = append(errs, fmt.Errorf("set vtep %s in the kernel: %w", addr, err))
	}
	if err := d.cl.SetVTEP(ctx, addr); err != nil {
		errs = append(errs, err)
	}
	d.mu.Lock()
	d.cfg.VTEP = addr
	for _, ep := range d.endpoints {
		ep.rec.VTEP = addr.String()
	}
	d.mu.Unlock()
	d.snapshotChanged()
	return errors.Join(errs...)
}

// AllocateNetwork is Swarm-only and Swarm calls it only for global-scope
// drivers; consul-overlay is local-scope.
func (d *Driver) AllocateNetwork(*network.AllocateNetworkRequest) (*network.AllocateNetworkResponse, error) {
	return nil, errors.New("allocate network: consul-overlay is a local-scope driver and does not take part in Swarm allocation")
}

// FreeNetwork is the Swarm counterpart of AllocateNetwork: nothing to free.
func (d *Driver) FreeNetwork(*network.FreeNetworkRequest) error { return nil }

// DiscoverNew is sent only in Swarm mode; peers come from the store.
func (d *Driver) DiscoverNew(*network.DiscoveryNotification) error { return nil }

// DiscoverDelete: see DiscoverNew.
func (d *Driver) DiscoverDelete(*network.DiscoveryNotification) error { return nil }

// ProgramExternalConnectivity is called on the endpoint that became the
// container's gateway, with the sandbox's options. On an egress=docker
// network that is never a consul-overlay endpoint (Join returns no
// gateway): outbound traffic and published ports go through
// docker_gwbridge, which Docker manages. An egress=host network is the
// container's way out, but consul-overlay publishes no ports: a container
// with published ports (-p, or -P with exposed ports) is refused rather
// than started with ports that answer nothing. Docker then undoes the
// join (Leave, DeleteEndpoint), and restores the external connectivity
// of the gateway it had before, if any. On an egress=auto network Join
// gave a container with published ports no gateway, so only one whose
// ports Join did not see would land here, and it is refused the same way.
func (d *Driver) ProgramExternalConnectivity(req *network.ProgramExternalConnectivityRequest) error {
	ports := publishedPorts(req.Options[optPortMap])
	if len(ports) == 0 {
		return nil
	}
	op := fmt.Sprintf("program external connectivity of endpoint %s", short(req.EndpointID))
	_, cancel, err := d.callCtx(op)
	if err != nil {
		return err
	}
	cancel()
	l := d.network(req.NetworkID)
	if l == nil {
		return nil
	}
	mode := egressMode(l.rec)
	if !hostEgress(mode) {
		return nil
	}
	hint := fmt.Sprintf("publish them through a bridge network, or create the network with -o egress=%s (the default where the host can be the way out: Docker's docker_gwbridge publishes the ports of a container that publishes any) or -o egress=%s", egressAuto, egressDocker)
	if mode == egressAuto {
		hint = "Join saw no published port for this container and made the network its way out; publish them through a bridge network"
	}
	return fmt.Errorf("%s: published ports (-p %s) are not supported on consul-overlay network %s (Docker network %s) with egress=%s: %s",
		op, strings.Join(ports, ", -p "), l.rec.Label(), short(req.NetworkID), mode, hint)
}

// RevokeExternalConnectivity: see ProgramExternalConnectivity.
func (d *Driver) RevokeExternalConnectivity(*network.RevokeExternalConnectivityRequest) error {
	return nil
}

// knownNetwork is the joined network id, or an error for op naming it.
func (d *Driver) knownNetwork(op, id string) (*logical, error) {
	if l := d.network(id); l != nil {
		return l, nil
	}
	return nil, fmt.Errorf("%s: network %s is not a consul-overlay network on this host", op, short(id))
}

func (d *Driver) network(id string) *logical {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.networks[id]
}

// localEndpoints lists this host's endpoints on a Docker network.
func (d *Driver) localEndpoints(networkID string) []*localEndpoint {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*localEndpoint
	for _, ep := range d.endpoints {
		if ep.rec.NetworkID == networkID {
			out = append(out, ep)
		}
	}
	return out
}

// short abbreviates a Docker ID for messages, as the docker CLI does.
func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	if id == "" {
		return `""`
	}
	return id
}

// networkName is how logs name a logical network: its -o name, or its key
// when it has none.
func networkName(rec cluster.Network) string {
	if rec.Name != "" {
		return rec.Name
	}
	return rec.Key
}

// netAttrs are the log attributes naming a Docker network of logical
// network rec, followed by more.
func netAttrs(rec cluster.Network, networkID string, more ...any) []any {
	return append([]any{"network", networkName(rec), "network_id", short(networkID), "vni", rec.VNI}, more...)
}

// endpointAddresses is an endpoint's addresses for a log line.
func endpointAddresses(rec cluster.Endpoint) string {
	switch {
	case rec.IPv4 != "" && rec.IPv6 != "":
		return rec.IPv4 + "," + rec.IPv6
	case rec.IPv4 != "":
		return rec.IPv4
	}
	return rec.IPv6
}
