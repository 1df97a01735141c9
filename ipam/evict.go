package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"consul-overlay/kvstore"
)

// Evicted counts what EvictNode released.
type Evicted struct {
	// Addresses: endpoint address records of the node (tombstones too)
	// deleted.
	Addresses int
	// SharedHolds: holds of shared addresses (gateways, aux addresses)
	// dropped.
	SharedHolds int
	// PoolHolds: pool holds dropped.
	PoolHolds int
	// PoolsRemoved: pools left without a holder and removed.
	PoolsRemoved int
}

// EvictNode releases everything host node holds, for a host the cluster
// has declared gone (see package reaper): its endpoint addresses
// (tombstones included), its holds of shared addresses (the gateway or an
// aux address goes with its last holder), then its pool holds; a pool left
// without a holder is removed as ReleasePool removes it. node must not be
// this Driver's own Config.Node while it runs.
//
// Every write is the compare-and-set (or delete-if-unchanged) that
// ReleaseAddress and ReleasePool do on the host's behalf, so evictions
// racing each other, or racing other hosts' allocations, are safe, and
// EvictNode is idempotent: a second call finds nothing and returns zeros.
// Records of other hosts are never touched.
func (d *Driver) EvictNode(ctx context.Context, node string) (Evicted, error) {
	var ev Evicted
	if node == "" {
		return ev, fmt.Errorf("evict host: no host ID: %w", ErrInvalidRequest)
	}
	as := d.as(node)
	if f, ok := kvstore.FenceOf(ctx); ok {
		// Every write of the eviction holds only while the fence does
		// (the reaper: the gone host's record is the one it judged).
		as.store = kvstore.Fence(as.store, f)
	}
	err := d.eachPool(ctx, "evict host "+node, func(ref poolRef) error { return as.evictPool(ctx, ref, &ev) })
	return ev, err
}

// as returns a Driver that acts as host node on the same store: its
// releases are those node's own ReleaseAddress and ReleasePool would do.
// It asks no InUse: node's endpoints are gone with it.
func (d *Driver) as(node string) *Driver {
	cfg := d.cfg
	cfg.Node = node
	cfg.InUse = nil
	cfg.Kept = nil
	return &Driver{cfg: cfg, store: d.store, log: d.log.With("evicted_host", node), now: d.now, started: d.started, cache: map[string]cachedPool{}}
}

// evictPool drops every hold of d.cfg.Node in one pool: addresses first,
// then the pool holds (the last one removes the pool).
func (d *Driver) evictPool(ctx context.Context, ref poolRef, ev *Evicted) error {
	op := fmt.Sprintf("evict host %s from pool %s", d.cfg.Node, ref.id())
	dir := addrDir(ref.space, ref.subnet)
	pairs, err := d.store.List(ctx, dir)
	if err != nil {
		return storeErr(op, err)
	}
	for _, p := range pairs {
		a, err := netip.ParseAddr(strings.TrimPrefix(p.Key, dir))
		if err != nil {
			continue
		}
		var rec addrRecord
		if decode(p.Key, p.Value, &rec) != nil {
			continue
		}
		holds := 0
		switch {
		case rec.shared():
			holds = rec.Holders[d.cfg.Node]
		case rec.Node == d.cfg.Node:
			holds = 1
		}
		// Each FreeAddress drops one hold, by compare-and-set of the
		// record as read then; a record that changed is read again.
		for i := 0; i < holds; i++ {
			if err := d.FreeAddress(ctx, ref.id(), a); err != nil {
				return fmt.Errorf("%s: %w", op, err)
			}
		}
		if holds > 0 {
			if rec.shared() {
				ev.SharedHolds += holds
			} else {
				ev.Addresses++
			}
			d.log.Info("released address of a gone host", "pool", ref.id(), "address", a, "kind", rec.Kind, "endpoint", rec.Endpoint, "holds", holds)
		}
	}
	_, meta, err := d.readMeta(ctx, ref)
	if errors.Is(err, kvstore.ErrNotFound) {
		return nil
	}
	if err != nil {
		return storeErr(op, err)
	}
	if meta.SubPool != ref.subPool {
		return nil
	}
	n := meta.Holders[d.cfg.Node]
	for i := 0; i < n; i++ {
		if err := d.FreePool(ctx, ref.id()); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
	}
	if n > 0 {
		ev.PoolHolds += n
		d.log.Info("released pool holds of a gone host", "pool", ref.id(), "holds", n)
		if _, _, err := d.readMeta(ctx, ref); errors.Is(err, kvstore.ErrNotFound) {
			ev.PoolsRemoved++
		}
	}
	return nil
}

// AddressHolder tells who holds address a, in whichever pool of either
// address space contains it: poolID "" when no pool does; holder "" when
// the address is free in its pool; else the holder's host ID (for a shared
// address, the holders' list) and, for an endpoint address, the endpoint
// name. A host coming back after it was evicted asks this to tell whether
// it may take its addresses again or another host holds them now.
func (d *Driver) AddressHolder(ctx context.Context, a netip.Addr) (poolID, holder, endpoint string, err error) {
	a = a.Unmap()
	for _, space := range []string{LocalAddressSpace, GlobalAddressSpace} {
		idx, _, err := d.readIndex(ctx, indexKey(space, a.Is6()))
		if err != nil {
			return "", "", "", storeErr(fmt.Sprintf("find the pool of %s", a), err)
		}
		for _, e := range idx.Pools {
			if !e.Subnet.Contains(a) {
				continue
			}
			ref := poolRef{space: space, subnet: e.Subnet, subPool: e.SubPool}
			_, rec, err := d.getAddr(ctx, ref, a)
			if errors.Is(err, kvstore.ErrNotFound) {
				return ref.id(), "", "", nil
			}
			if err != nil {
				return ref.id(), "", "", storeErr(fmt.Sprintf("read address %s of pool %s", a, ref.id()), err)
			}
			if rec.shared() {
				return ref.id(), nodeList(rec.Holders), "", nil
			}
			return ref.id(), rec.Node, rec.Endpoint, nil
		}
	}
	return "", "", "", nil
}

// PoolHolds is what this host's running networks need of one pool: how
// many of them use it (each took one hold with its RequestPool) and, per
// gateway, how many of them use that gateway (each took one hold of it
// with its RequestAddress).
type PoolHolds struct {
	Space  string // "" is LocalAddressSpace
	Subnet netip.Prefix
	// Holds: this host's networks on the pool (at least 1).
	Holds int
	// Gateways: this host's networks using each gateway address.
	Gateways map[netip.Addr]int
}

// ReassertPool makes sure this host holds the pool of want.Subnet at least
// want.Holds times, and each gateway of want.Gateways at least as often as
// that many networks use it, for a host whose networks still run but
// whose holds the store lost (an eviction while it was away, a hold lost
// on its own): missing holds are taken again (the pool created again if
// nobody holds it), existing ones are kept, and a surplus is left to
// SweepPools. Holds are counted, not just present: with one hold for two
// networks, the first network's ReleasePool would remove the pool, and
// with it the addresses of the second, still running. It returns the
// pool's ID. A gateway held now as another address is ErrAddressInUse. (A
// pool that was removed is created again without the ip-range it may have
// had: the network record does not keep it.)
func (d *Driver) ReassertPool(ctx context.Context, want PoolHolds) (string, error) {
	space, err := resolveSpace(want.Space)
	if err != nil {
		return "", err
	}
	subnet := want.Subnet
	if !subnet.IsValid() {
		return "", fmt.Errorf("take pool again: no subnet: %w", ErrInvalidRequest)
	}
	if want.Holds < 1 {
		return "", fmt.Errorf("take pool %s again: %d holds: %w", subnet, want.Holds, ErrInvalidRequest)
	}
	subnet = subnet.Masked()
	op := fmt.Sprintf("take pool %s again", subnet)
	idx, _, err := d.readIndex(ctx, indexKey(space, subnet.Addr().Is6()))
	if err != nil {
		return "", storeErr(op, err)
	}
	ref := poolRef{space: space, subnet: subnet}
	held := 0
	if e, ok := idx.find(subnet); ok {
		ref.subPool = e.SubPool
		_, meta, err := d.readMeta(ctx, ref)
		if err != nil && !errors.Is(err, kvstore.ErrNotFound) {
			return "", storeErr(op, err)
		}
		if err == nil {
			held = meta.Holders[d.cfg.Node]
		}
	}
	for n := held; n < want.Holds; n++ {
		p, err := d.AllocatePool(ctx, PoolRequest{AddressSpace: space, Pool: subnet, SubPool: ref.subPool, V6: subnet.Addr().Is6()})
		if err != nil {
			return "", err
		}
		ref.subPool = p.SubPool
	}
	if held < want.Holds {
		d.log.Info("pool held again", "pool", ref.id(), "held", held, "holds", want.Holds)
	}
	gws := make([]netip.Addr, 0, len(want.Gateways))
	for gw := range want.Gateways {
		gws = append(gws, gw)
	}
	slices.SortFunc(gws, netip.Addr.Compare)
	for _, gw := range gws {
		_, rec, err := d.getAddr(ctx, ref, gw)
		if err != nil && !errors.Is(err, kvstore.ErrNotFound) {
			return "", storeErr(op, err)
		}
		have := 0
		if err == nil && rec.shared() {
			have = rec.Holders[d.cfg.Node]
		}
		for n := have; n < want.Gateways[gw]; n++ {
			if _, err := d.AllocateAddress(ctx, AddressRequest{PoolID: ref.id(), Address: gw, Gateway: true}); err != nil {
				return ref.id(), err
			}
		}
		if have < want.Gateways[gw] {
			d.log.Info("gateway held again", "pool", ref.id(), "gateway", gw, "held", have, "holds", want.Gateways[gw])
		}
	}
	return ref.id(), nil
}

// HoldPool is ReassertPool for a network being created (the driver's
// Config.HoldPool): this host normally holds the pool and the gateway as
// often as want says already (Docker's RequestPool and RequestAddress
// took them), so it first reads the pool record and the gateway's record
// at once, and goes the way of ReassertPool only when a hold is short.
func (d *Driver) HoldPool(ctx context.Context, want PoolHolds) error {
	space, err := resolveSpace(want.Space)
	if err != nil {
		return err
	}
	if !want.Subnet.IsValid() || want.Holds < 1 || len(want.Gateways) > 1 {
		_, err := d.ReassertPool(ctx, want) // its errors
		return err
	}
	ref := poolRef{space: space, subnet: want.Subnet.Masked()}
	var gw netip.Addr
	for a := range want.Gateways {
		gw = a
	}
	gwHeld := make(chan int, 1)
	go func() {
		if !gw.IsValid() {
			gwHeld <- 0
			return
		}
		n := -1 // unknown: ReassertPool reads it again
		if _, rec, err := d.getAddr(ctx, ref, gw); err == nil && rec.shared() {
			n = rec.Holders[d.cfg.Node]
		}
		gwHeld <- n
	}()
	_, meta, err := d.readMeta(ctx, ref)
	held := -1
	if err == nil {
		held = meta.Holders[d.cfg.Node]
	}
	g := <-gwHeld
	if held >= want.Holds && (!gw.IsValid() || g >= want.Gateways[gw]) {
		return nil
	}
	_, err = d.ReassertPool(ctx, want)
	return err
}

// ReassertAddress takes address a of pool poolID again for this host's
// endpoint with MAC mac, for a host that was evicted while it was away: if
// this host holds it, nothing changes; if it is free, it is claimed again
// (create-only, as any allocation); if another host holds it, the error is
// ErrAddressInUse naming that holder, and nothing changes.
func (d *Driver) ReassertAddress(ctx context.Context, poolID string, a netip.Addr, mac string) error {
	ref, err := parsePoolID(poolID)
	if err != nil {
		return err
	}
	if !a.IsValid() {
		// AllocateAddress would hand out any free address instead.
		return fmt.Errorf("take an address of pool %s again: no address: %w", poolID, ErrInvalidRequest)
	}
	_, rec, err := d.getAddr(ctx, ref, a)
	switch {
	case err == nil && !rec.shared() && rec.Node == d.cfg.Node:
		return nil
	case err == nil:
		return fmt.Errorf("take address %s of pool %s again: held by %s: %w", a, poolID, rec.holderNames(), ErrAddressInUse)
	case !errors.Is(err, kvstore.ErrNotFound):
		return storeErr(fmt.Sprintf("read address %s of pool %s", a, poolID), err)
	}
	if _, err := d.AllocateAddress(ctx, AddressRequest{PoolID: poolID, Address: a, MAC: mac, reassert: true}); err != nil {
		return err
	}
	d.log.Info("address held again after an eviction", "pool", poolID, "address", a, "mac", mac)
	return nil
}
