package ipam

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

	"consul-overlay/kvstore"

	"github.com/docker/go-plugins-helpers/ipam"
)

var _ ipam.Ipam = (*Driver)(nil)

// Driver is the IPAM driver. Its state is in the store, so any number of
// Drivers (one per host) share it safely, and a restarted plugin continues
// where it stopped; it keeps only a short-lived cache of the pool it last
// allocated from, which every store write re-validates (see burstCache).
// Safe for concurrent use.
type Driver struct {
	cfg   Config
	store kvstore.Store
	log   *slog.Logger
	// now is the clock of allocation and reclaim times (tests set it).
	now func() time.Time
	// started is when the Driver was made: the age of an address record
	// without allocation time (written by an earlier version) counts from
	// here.
	started time.Time

	mu    sync.Mutex            // guards cache and surplus
	cache map[string]cachedPool // by pool ID
	// surplus holds, by pool ID, the index of the pool record at the
	// sweep that last found this host holding the pool more often than
	// its networks use it (SweepPools: dropped only when the next sweep
	// finds the same record).
	surplus map[string]uint64
}

// New returns a Driver for the host cfg.Node that keeps its pools and
// addresses in store.
func New(cfg Config, store kvstore.Store) (*Driver, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if store == nil {
		return nil, fmt.Errorf("ipam: nil store: %w", ErrInvalidRequest)
	}
	return &Driver{cfg: cfg, store: store, log: cfg.Logger.With("host", cfg.Node), now: time.Now, started: time.Now()}, nil
}

// AddressSpaces returns the names of the local and global address spaces.
func (d *Driver) AddressSpaces() (local, global string) {
	return LocalAddressSpace, GlobalAddressSpace
}

// Owns reports whether addressSpace is one of this driver's, that is,
// whether a network's addresses in it are unique across every host.
func (d *Driver) Owns(addressSpace string) bool { return knownSpace(addressSpace) }

// PoolRequest asks for a pool.
type PoolRequest struct {
	// AddressSpace is LocalAddressSpace or GlobalAddressSpace; "" means
	// LocalAddressSpace.
	AddressSpace string
	// Pool is the subnet wanted; zero picks a free one from the default
	// range of the family.
	Pool netip.Prefix
	// SubPool restricts dynamic allocation to a range inside Pool (zero:
	// the whole pool).
	SubPool netip.Prefix
	// V6 asks for an IPv6 pool; it must match Pool's family.
	V6 bool
	// Options are the --ipam-opt values. None is interpreted at present.
	Options map[string]string
}

// Pool describes a pool.
type Pool struct {
	ID           string
	AddressSpace string
	Subnet       netip.Prefix
	SubPool      netip.Prefix // zero if none
	Auto         bool         // chosen from the default range
	Gateway      netip.Addr   // zero until a host asks for the gateway
	Holders      map[string]int
}

// AddressRequest asks for an address.
type AddressRequest struct {
	PoolID string
	// Address is the address wanted; zero means the next free one (or, for
	// the gateway, the pool's gateway if it has one, else the first usable
	// address).
	Address netip.Addr
	// Gateway marks the request for the network's gateway, which is shared
	// by every host of the network.
	Gateway bool
	// Endpoint and MAC identify the endpoint the address is for; either
	// makes an explicit address exclusive (see doc.go).
	Endpoint string
	MAC      string
	// reassert: ReassertAddress taking an endpoint's address back for it
	// (Config.Held is not asked).
	reassert bool
	// heldReady: Config.HeldReady has answered already (RequestAddress
	// waits for it before its store calls' timeout starts).
	heldReady bool
}

// GetCapabilities implements ipam.Ipam.
func (d *Driver) GetCapabilities() (*ipam.CapabilitiesResponse, error) {
	return &ipam.CapabilitiesResponse{RequiresMACAddress: !d.cfg.NoMACAddress}, nil
}

// GetDefaultAddressSpaces implements ipam.Ipam.
func (d *Driver) GetDefaultAddressSpaces() (*ipam.AddressSpacesResponse, error) {
	return &ipam.AddressSpacesResponse{
		LocalDefaultAddressSpace:  LocalAddressSpace,
		GlobalDefaultAddressSpace: GlobalAddressSpace,
	}, nil
}

// RequestPool implements ipam.Ipam.
func (d *Driver) RequestPool(r *ipam.RequestPoolRequest) (*ipam.RequestPoolResponse, error) {
	req, err := decodePoolRequest(r)
	if err != nil {
		return nil, fmt.Errorf("request pool: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), d.cfg.Timeout)
	defer cancel()
	p, err := d.AllocatePool(ctx, req)
	if err != nil {
		return nil, err
	}
	return &ipam.RequestPoolResponse{PoolID: p.ID, Pool: p.Subnet.String(), Data: map[string]string{}}, nil
}

// ReleasePool implements ipam.Ipam.
func (d *Driver) ReleasePool(r *ipam.ReleasePoolRequest) error {
	if r == nil {
		return fmt.Errorf("release pool: empty request: %w", ErrInvalidRequest)
	}
	d.awaitRestored()
	ctx, cancel := context.WithTimeout(context.Background(), d.cfg.Timeout)
	defer cancel()
	return d.FreePool(ctx, r.PoolID)
}

// RequestAddress implements ipam.Ipam.
func (d *Driver) RequestAddress(r *ipam.RequestAddressRequest) (*ipam.RequestAddressResponse, error) {
	req, err := decodeAddressRequest(r)
	if err != nil {
		return nil, fmt.Errorf("request address: %w", err)
	}
	// The wait for the network driver's restore is not the store's time.
	if err := d.heldReady(req); err != nil {
		return nil, fmt.Errorf("request address in pool %s: %w", r.PoolID, err)
	}
	req.heldReady = true
	ctx, cancel := context.WithTimeout(context.Background(), d.cfg.Timeout)
	defer cancel()
	a, err := d.AllocateAddress(ctx, req)
	if err != nil {
		return nil, err
	}
	return &ipam.RequestAddressResponse{Address: a.String(), Data: map[string]string{}}, nil
}

// ReleaseAddress implements ipam.Ipam.
func (d *Driver) ReleaseAddress(r *ipam.ReleaseAddressRequest) error {
	if r == nil {
		return fmt.Errorf("release address: empty request: %w", ErrInvalidRequest)
	}
	a, err := parseAddr(r.Address)
	if err != nil {
		return fmt.Errorf("release address in pool %q: %w", r.PoolID, err)
	}
	d.awaitRestored()
	ctx, cancel := context.WithTimeout(context.Background(), d.cfg.Timeout)
	defer cancel()
	return d.FreeAddress(ctx, r.PoolID, a)
}

// awaitRestored waits, at most Config.Timeout, for the network driver's
// restore (Config.Restored) before a release's store time starts: its
// InUse and Kept answers wait for the same restore.
func (d *Driver) awaitRestored() {
	if d.cfg.Restored == nil {
		return
	}
	t := time.NewTimer(d.cfg.Timeout)
	defer t.Stop()
	select {
	case <-d.cfg.Restored():
	case <-t.C:
	}
}

// decodePoolRequest turns Docker's strings into a PoolRequest.
func decodePoolRequest(r *ipam.RequestPoolRequest) (PoolRequest, error) {
	if r == nil {
		return PoolRequest{}, fmt.Errorf("empty request: %w", ErrInvalidRequest)
	}
	req := PoolRequest{AddressSpace: r.AddressSpace, V6: r.V6, Options: r.Options}
	var err error
	if strings.TrimSpace(r.Pool) != "" {
		if req.Pool, err = parsePrefix("pool", r.Pool); err != nil {
			return req, err
		}
	}
	if strings.TrimSpace(r.SubPool) != "" {
		if req.SubPool, err = parsePrefix("ip-range", r.SubPool); err != nil {
			return req, err
		}
	}
	return req, nil
}

// decodeAddressRequest turns Docker's strings into an AddressRequest.
func decodeAddressRequest(r *ipam.RequestAddressRequest) (AddressRequest, error) {
	if r == nil {
		return AddressRequest{}, fmt.Errorf("empty request: %w", ErrInvalidRequest)
	}
	req := AddressRequest{PoolID: r.PoolID}
	if strings.TrimSpace(r.Address) != "" {
		a, err := parseAddr(r.Address)
		if err != nil {
			return req, fmt.Errorf("pool %q: %w", r.PoolID, err)
		}
		req.Address = a
	}
	req.Gateway = r.Options[RequestAddressTypeOption] == GatewayAddressType
	req.Endpoint = r.Options[EndpointNameOption]
	if m := r.Options[MACAddressOption]; m != "" {
		hw, err := net.ParseMAC(m)
		if err != nil {
			return req, fmt.Errorf("pool %q: mac address %q: %w", r.PoolID, m, ErrInvalidRequest)
		}
		req.MAC = hw.String()
	}
	return req, nil
}

// storeErr wraps a store failure for op so it is never mistaken for a
// pool or address condition.
func storeErr(op string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("%s: store did not answer in time: %w", op, err)
	}
	return fmt.Errorf("%s: store: %w", op, err)
}
