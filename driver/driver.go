package driver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/discovery"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// Dataplane is the kernel side the driver needs; *vxlan.Manager implements
// it.
type Dataplane interface {
	EnsureNetwork(ctx context.Context, n vxlan.Network) (vxlan.NetworkInfo, error)
	DeleteNetwork(ctx context.Context, vni uint32) error
	EnsureEndpoint(ctx context.Context, ep vxlan.Endpoint) (vxlan.EndpointInfo, error)
	DeleteEndpoint(ctx context.Context, id string) error
	AddPeer(ctx context.Context, p vxlan.Peer) error
	DeletePeer(ctx context.Context, p vxlan.Peer) error
	Reconcile(ctx context.Context, desired vxlan.State) (vxlan.Changes, error)
	// MaxMTU is the largest overlay MTU the underlay carries.
	MaxMTU() int
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
	// Node is this host's name in the store (required).
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
	// VNIStart is the first VNI allocated automatically (default 4096,
	// as Docker's overlay: below it lie the 802.1Q-sized ids users pick).
	VNIStart uint32
	// ResyncInterval re-applies a network's peers after a failed kernel
	// write (default 10s).
	ResyncInterval time.Duration
	// Registrar registers joined endpoints as services (nil: none).
	Registrar Registrar
	// ReleaseAddress gives an address of a reclaimed stale endpoint back to
	// the IPAM address space it came from (nil: addresses are kept).
	ReleaseAddress func(ctx context.Context, space string, subnet netip.Prefix, a netip.Addr) error
	Logger         *slog.Logger
}

// Driver is consul-overlay's network driver.
type Driver struct {
	cfg   Config
	log   *slog.Logger
	store kvstore.Store
	dp    Dataplane

	ctx    context.Context // lives as long as the driver; parent of watches
	cancel context.CancelFunc
	wg     sync.WaitGroup // watches and recovery
	ready  chan struct{}  // closed once the state is restored from the store

	// opMu serialises network create and delete on this host, so a network
	// is never built and torn down at once. Never held across a watch.
	opMu sync.Mutex

	// mu guards networks and endpoints. Never held across store or netlink
	// I/O.
	mu        sync.Mutex
	networks  map[string]*localNetwork // by Docker NetworkID
	endpoints map[string]*endpointRecord
}

// localNetwork is a logical network this host has joined.
type localNetwork struct {
	id  string // Docker NetworkID
	rec networkRecord

	cancel context.CancelFunc // stops the peer watch
	done   chan struct{}      // closed when the peer watch has stopped

	// mu guards peers. Lock order: Driver.mu is never taken while mu is held.
	mu    sync.Mutex
	peers map[string]vxlan.Peer // programmed remote endpoints, by peerID
}

var _ network.Driver = (*Driver)(nil)

// New returns a driver; Start restores its state and must be called before
// it serves requests.
func New(cfg Config, store kvstore.Store, dp Dataplane) (*Driver, error) {
	if cfg.Node == "" {
		return nil, errors.New("driver: node name is required")
	}
	if !cfg.VTEP.IsValid() {
		return nil, errors.New("driver: VTEP address is required")
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = 10 * time.Second
	}
	if cfg.VNIStart == 0 {
		cfg.VNIStart = 4096
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Driver{
		cfg:       cfg,
		log:       cfg.Logger,
		store:     store,
		dp:        dp,
		ctx:       ctx,
		cancel:    cancel,
		ready:     make(chan struct{}),
		networks:  map[string]*localNetwork{},
		endpoints: map[string]*endpointRecord{},
	}, nil
}

// Start restores the driver's state from the store in the background:
// the networks this host has joined, its endpoints, and the kernel state
// (reconciled without disturbing running containers). Requests wait for it
// up to their timeout. It retries while the store is unreachable.
func (d *Driver) Start() {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		backoff := 500 * time.Millisecond
		for {
			err := d.restore(d.ctx)
			if err == nil {
				close(d.ready)
				return
			}
			d.log.Warn("restore state from the store failed; retrying", "error", err, "retry_in", backoff)
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

// Close stops the watches. Kernel state stays: containers keep running.
func (d *Driver) Close() error {
	d.cancel()
	d.wg.Wait()
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
		return nil, nil, fmt.Errorf("%s: consul-overlay is still restoring its state from the store (is Consul reachable?); try again", op)
	}
}

// GetCapabilities: local scope, because Docker 23+ refuses global scope off
// Swarm; global connectivity, because the overlay spans hosts.
func (d *Driver) GetCapabilities() (*network.CapabilitiesResponse, error) {
	return &network.CapabilitiesResponse{Scope: network.LocalScope, ConnectivityScope: network.GlobalScope}, nil
}

// CreateNetwork joins this host to a logical network (creating it in the
// store if it is the first host) and builds the overlay in the kernel.
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
	key, err := logicalKey(opts.name, opts.subnets)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if max := d.dp.MaxMTU(); opts.mtu > max {
		return fmt.Errorf("%s: option mtu=%d: the underlay carries at most %d bytes of overlay payload (its MTU minus the VXLAN overhead)", op, opts.mtu, max)
	}

	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	if n, ok := d.networks[req.NetworkID]; ok {
		d.mu.Unlock()
		if n.rec.Key == key {
			return nil // replayed request
		}
		return fmt.Errorf("%s: already exists as logical network %s", op, n.rec.label())
	}
	for _, n := range d.networks {
		if n.rec.Key == key {
			d.mu.Unlock()
			return fmt.Errorf("%s: this host already has logical network %s as Docker network %s; remove that network first", op, n.rec.label(), short(n.id))
		}
	}
	d.mu.Unlock()

	rec, err := d.joinLogical(ctx, req.NetworkID, key, opts)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer func() {
		if retErr != nil {
			if err := d.leaveLogical(context.WithoutCancel(ctx), rec.Key, req.NetworkID); err != nil {
				retErr = errors.Join(retErr, fmt.Errorf("undo: %w", err))
			}
		}
	}()

	if _, err := d.dp.EnsureNetwork(ctx, kernelNetwork(rec)); err != nil {
		return fmt.Errorf("%s: build overlay for logical network %s (vni %d): %w", op, rec.label(), rec.VNI, err)
	}
	d.addLocalNetwork(req.NetworkID, rec, nil)
	d.log.Info("network created", "network", short(req.NetworkID), "logical", rec.Key, "vni", rec.VNI, "subnets", rec.Subnets)
	return nil
}

// kernelNetwork is the data-plane description of a logical network.
func kernelNetwork(rec networkRecord) vxlan.Network {
	n := vxlan.Network{VNI: rec.VNI, MTU: rec.MTU}
	for _, g := range rec.Gateways {
		if p, err := netip.ParsePrefix(g); err == nil {
			n.Gateways = append(n.Gateways, p)
		}
	}
	return n
}

// addLocalNetwork records a joined network and starts its peer watch.
// peers are the remote endpoints already in the kernel (nil for none).
func (d *Driver) addLocalNetwork(id string, rec networkRecord, peers map[string]vxlan.Peer) {
	if peers == nil {
		peers = map[string]vxlan.Peer{}
	}
	ctx, cancel := context.WithCancel(d.ctx)
	n := &localNetwork{id: id, rec: rec, cancel: cancel, done: make(chan struct{}), peers: peers}
	d.mu.Lock()
	d.networks[id] = n
	d.mu.Unlock()
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer close(n.done)
		d.watchPeers(ctx, n)
	}()
}

// DeleteNetwork removes this host from the logical network; the network's
// record and VNI go when the last host leaves. Unknown IDs are success.
func (d *Driver) DeleteNetwork(req *network.DeleteNetworkRequest) error {
	op := fmt.Sprintf("delete network %s", short(req.NetworkID))
	ctx, cancel, err := d.callCtx(op)
	if err != nil {
		return err
	}
	defer cancel()
	d.opMu.Lock()
	defer d.opMu.Unlock()
	n := d.network(req.NetworkID)
	if n == nil {
		return nil
	}
	// Docker deletes endpoints first; remove what a crash may have left.
	for _, ep := range d.localEndpoints(req.NetworkID) {
		if err := d.deleteEndpoint(ctx, ep); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
	}
	if err := d.leaveLogical(ctx, n.rec.Key, req.NetworkID); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	n.cancel()
	<-n.done
	d.mu.Lock()
	delete(d.networks, req.NetworkID)
	d.mu.Unlock()
	if err := d.dp.DeleteNetwork(ctx, n.rec.VNI); err != nil {
		// The store no longer lists the network; the next reconcile
		// removes what is left in the kernel.
		d.log.Warn("remove overlay from the kernel", "network", short(req.NetworkID), "vni", n.rec.VNI, "error", err)
	}
	d.log.Info("network deleted", "network", short(req.NetworkID), "logical", n.rec.Key, "vni", n.rec.VNI)
	return nil
}

// CreateEndpoint records the endpoint, which publishes it to the other
// hosts, and returns its MAC address if Docker did not give one.
func (d *Driver) CreateEndpoint(req *network.CreateEndpointRequest) (*network.CreateEndpointResponse, error) {
	op := fmt.Sprintf("create endpoint %s", short(req.EndpointID))
	ctx, cancel, err := d.callCtx(op)
	if err != nil {
		return nil, err
	}
	defer cancel()
	n, err := d.knownNetwork(op, req.NetworkID)
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
	rec := endpointRecord{
		ID: req.EndpointID, NetworkKey: n.rec.Key, NetworkID: n.id,
		Node: d.cfg.Node, VTEP: d.cfg.VTEP.String(), Created: time.Now().UTC(),
		Options: endpointOptions(req.Options),
	}
	if ports, err := discovery.ParseExposedPorts(req.Options[discovery.ExposedPortsOption]); err != nil {
		// Networking first: a port list we cannot read only costs the
		// service its port.
		d.log.Warn("ignore unreadable exposed ports", "endpoint", short(req.EndpointID), "error", err)
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

	val, err := kvstore.Encode(rec)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if err := d.store.Create(ctx, endpointKey(n.rec.Key, rec.ID), val); err != nil {
		if !errors.Is(err, kvstore.ErrConflict) {
			return nil, fmt.Errorf("%s: record endpoint: %w", op, err)
		}
		// Docker may replay CreateEndpoint; the same endpoint is success.
		old, gerr := d.getEndpoint(ctx, n.rec.Key, rec.ID)
		if gerr != nil {
			return nil, fmt.Errorf("%s: record endpoint: %w", op, gerr)
		}
		if old.Node != rec.Node || old.IPv4 != rec.IPv4 || old.IPv6 != rec.IPv6 {
			return nil, fmt.Errorf("%s: endpoint already exists on host %q with addresses %s %s", op, old.Node, old.IPv4, old.IPv6)
		}
		rec = *old
	}
	d.mu.Lock()
	d.endpoints[rec.ID] = &rec
	d.mu.Unlock()
	d.log.Debug("endpoint created", "network", short(n.id), "endpoint", short(rec.ID), "ipv4", rec.IPv4, "ipv6", rec.IPv6, "mac", rec.MAC)
	return resp, nil
}

func (d *Driver) getEndpoint(ctx context.Context, key, id string) (*endpointRecord, error) {
	p, err := d.store.Get(ctx, endpointKey(key, id))
	if err != nil {
		return nil, err
	}
	var rec endpointRecord
	if err := kvstore.Decode(p.Value, &rec); err != nil {
		return nil, fmt.Errorf("endpoint %s: %w", short(id), err)
	}
	return &rec, nil
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
	if err := d.deleteEndpoint(ctx, ep); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return nil
}

// deleteEndpoint removes a local endpoint from the kernel and the store.
func (d *Driver) deleteEndpoint(ctx context.Context, ep *endpointRecord) error {
	if d.cfg.Registrar != nil {
		d.cfg.Registrar.Deregister(ep.ID)
	}
	if err := d.dp.DeleteEndpoint(ctx, ep.ID); err != nil {
		return err
	}
	if err := d.store.Delete(ctx, endpointKey(ep.NetworkKey, ep.ID)); err != nil {
		return fmt.Errorf("remove endpoint record: %w", err)
	}
	d.mu.Lock()
	delete(d.endpoints, ep.ID)
	d.mu.Unlock()
	d.log.Debug("endpoint deleted", "endpoint", short(ep.ID))
	return nil
}

// Join creates the endpoint's veth pair, attaches it to the network's
// bridge and hands the other end to Docker. No gateway is returned, so
// Docker attaches docker_gwbridge for outbound traffic and -p, as it does
// for its own overlay.
func (d *Driver) Join(req *network.JoinRequest) (*network.JoinResponse, error) {
	op := fmt.Sprintf("join endpoint %s", short(req.EndpointID))
	ctx, cancel, err := d.callCtx(op)
	if err != nil {
		return nil, err
	}
	defer cancel()
	n, err := d.knownNetwork(op, req.NetworkID)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	ep := d.endpoints[req.EndpointID]
	d.mu.Unlock()
	if ep == nil {
		return nil, fmt.Errorf("%s: unknown endpoint (CreateEndpoint was not called or failed)", op)
	}
	mac, err := net.ParseMAC(ep.MAC)
	if err != nil {
		return nil, fmt.Errorf("%s: stored MAC %q: %w", op, ep.MAC, err)
	}
	info, err := d.dp.EnsureEndpoint(ctx, vxlan.Endpoint{ID: ep.ID, VNI: n.rec.VNI, MAC: mac})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	d.log.Debug("endpoint joined", "network", short(n.id), "endpoint", short(ep.ID), "link", info.ContainerIf)
	d.joined(ctx, n, ep, req)
	return &network.JoinResponse{InterfaceName: network.InterfaceName{SrcName: info.ContainerIf, DstPrefix: "eth"}}, nil
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
	if ep := d.endpoints[req.EndpointID]; ep != nil {
		ep.left = true
	}
	d.mu.Unlock()
	if d.cfg.Registrar != nil {
		d.cfg.Registrar.Deregister(req.EndpointID)
	}
	return nil
}

// EndpointInfo reports the endpoint's VNI, MAC, VTEP and node.
func (d *Driver) EndpointInfo(req *network.InfoRequest) (*network.InfoResponse, error) {
	resp := &network.InfoResponse{Value: map[string]string{}}
	d.mu.Lock()
	ep := d.endpoints[req.EndpointID]
	n := d.networks[req.NetworkID]
	d.mu.Unlock()
	if ep == nil || n == nil {
		return resp, nil // Docker ignores errors here; keep it cheap.
	}
	resp.Value["vni"] = fmt.Sprint(n.rec.VNI)
	resp.Value["mac"] = ep.MAC
	resp.Value["vtep"] = ep.VTEP
	resp.Value["node"] = ep.Node
	resp.Value["network"] = n.rec.Key
	return resp, nil
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

// ProgramExternalConnectivity: outbound traffic and published ports go
// through docker_gwbridge, which Docker manages.
func (d *Driver) ProgramExternalConnectivity(*network.ProgramExternalConnectivityRequest) error {
	return nil
}

// RevokeExternalConnectivity: see ProgramExternalConnectivity.
func (d *Driver) RevokeExternalConnectivity(*network.RevokeExternalConnectivityRequest) error {
	return nil
}

// knownNetwork is the joined network id, or an error for op naming it.
func (d *Driver) knownNetwork(op, id string) (*localNetwork, error) {
	if n := d.network(id); n != nil {
		return n, nil
	}
	return nil, fmt.Errorf("%s: network %s is not a consul-overlay network on this host", op, short(id))
}

func (d *Driver) network(id string) *localNetwork {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.networks[id]
}

// localEndpoints lists this host's endpoints on a Docker network.
func (d *Driver) localEndpoints(networkID string) []*endpointRecord {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*endpointRecord
	for _, ep := range d.endpoints {
		if ep.NetworkID == networkID {
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
