package ipam

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"consul-overlay/kvstore"
)

// Holder names the endpoint an address was handed to, as the network
// driver knows it. ReclaimAddress acts only if the address record names
// the same endpoint.
type Holder struct {
	// MAC is the endpoint's MAC address (required). Because the driver
	// reports RequiresMACAddress, Docker sends it with RequestAddress, the
	// address record keeps it, and the network driver receives the same
	// MAC in CreateEndpoint (Interface.MacAddress).
	MAC string
	// Created, if not zero, is when the network driver created the
	// endpoint (this host's clock). An address is requested before its
	// endpoint is created, so a record allocated after Created belongs to
	// a later endpoint that happens to have the same MAC (a user-given
	// --mac-address used again with the same --ip).
	Created time.Time
}

// Grace returns the grace period in force (Config.Grace or its default):
// how long a tombstone waits for Docker's release, and how old a record
// must be before Sweep takes it for an orphan. Sweep is meant to run a few
// times per grace period.
func (d *Driver) Grace() time.Duration { return d.cfg.Grace }

// ReclaimAddress is the network driver's release of an endpoint address
// whose container Docker no longer has (the driver reclaims it because
// Docker's DeleteEndpoint never came). It is fenced by the holder's
// identity: if the address is free, shared (a gateway or aux address), held
// by another host, or held by another endpoint (another MAC, or allocated
// after h.Created), nothing changes and it returns nil. A record without
// MAC cannot be matched and is left alone too (Sweep reclaims it once it
// is an orphan older than the grace period).
//
// A matching record is not deleted: it becomes a tombstone that keeps the
// address out of allocation until Docker's own ReleaseAddress for it
// arrives (which frees it) or, if that never comes, until Sweep frees it
// after the grace period. So Docker's release, which names only the
// address, can never free the address of a container that got it after the
// reclaim. Reclaiming a tombstone again changes nothing.
func (d *Driver) ReclaimAddress(ctx context.Context, poolID string, a netip.Addr, h Holder) error {
	ref, err := parsePoolID(poolID)
	if err != nil {
		return fmt.Errorf("reclaim address %s: %w", a, err)
	}
	op := fmt.Sprintf("reclaim address %s in pool %s", a, ref.id())
	if !ref.subnet.Contains(a) {
		return fmt.Errorf("%s: outside %s: %w", op, ref.subnet, ErrAddressOutOfRange)
	}
	hw, err := net.ParseMAC(h.MAC)
	if err != nil {
		return fmt.Errorf("%s: holder MAC %q: %w", op, h.MAC, ErrInvalidRequest)
	}
	mac := hw.String()
	key := addrKey(ref.space, ref.subnet, a)
	for attempt := 0; attempt < maxAttempts; attempt++ {
		pair, rec, err := d.getAddr(ctx, ref, a)
		if errors.Is(err, kvstore.ErrNotFound) {
			return nil // released already (Docker's release came first)
		}
		if err != nil {
			return storeErr(op, err)
		}
		switch {
		case rec.shared() || rec.Node != d.cfg.Node:
			d.log.Debug("reclaim of an address this host's endpoint does not hold ignored", "pool", ref.id(), "address", a, "holder", rec.holderNames())
			return nil
		case rec.tombstone():
			return nil
		case rec.MAC == "":
			d.log.Warn("reclaim of an address whose record names no MAC ignored; it is reclaimed as an orphan after the grace period",
				"pool", ref.id(), "address", a, "endpoint", rec.Endpoint)
			return nil
		case !strings.EqualFold(rec.MAC, mac):
			d.log.Debug("reclaim of an address now held by another endpoint ignored", "pool", ref.id(), "address", a, "mac", mac, "holder_mac", rec.MAC)
			return nil
		case !h.Created.IsZero() && !rec.At.IsZero() && rec.At.After(h.Created):
			d.log.Debug("reclaim of an address allocated after the endpoint was created ignored", "pool", ref.id(), "address", a, "mac", mac)
			return nil
		}
		rec.Reclaimed = d.now()
		err = d.store.CAS(ctx, key, encode(rec), pair.ModifyIndex)
		if errors.Is(err, kvstore.ErrConflict) {
			continue // released or changed meanwhile: look again
		}
		if err != nil {
			return storeErr(op, err)
		}
		d.log.Info("address reclaimed; kept until Docker releases it or the grace period ends",
			"pool", ref.id(), "address", a, "mac", mac, "grace", d.cfg.Grace)
		return nil
	}
	return fmt.Errorf("%s: gave up after %d concurrent updates: %w", op, maxAttempts, kvstore.ErrConflict)
}

// Sweep frees what Docker will never release. For this host's endpoint
// addresses in every pool:
//
//   - a tombstone (ReclaimAddress) older than the grace period is freed;
//   - a live record older than the grace period for which bound reports
//     false becomes a tombstone (so it is freed one grace period later,
//     unless Docker releases it first). These are orphans: the address was
//     committed by a RequestAddress whose answer never reached Docker (a
//     crash), or its release was lost (a crash inside ReleaseAddress;
//     Docker does not retry it).
//
// bound reports whether an endpoint of this host may use address a of pool
// poolID (as PoolID formats it): it must return true unless it knows the
// address is unused, in particular for pools that no network of the
// network driver uses (another driver's network with this IPAM, or a
// network being created). A nil bound skips orphans. Shared records
// (gateways and aux addresses) and other hosts' records are never touched.
// Pools released by their last holder whose removal did not finish (a
// crash inside ReleasePool) are removed.
//
// Every change is a compare-and-set of the record as read, so a record
// that Docker releases, reclaims or re-requests meanwhile is left alone.
// freed counts the addresses freed. Call it every few minutes (Grace/4 is
// plenty); it lists every address record of the store, so not much more
// often than that.
func (d *Driver) Sweep(ctx context.Context, bound func(poolID string, a netip.Addr) bool) (freed int, err error) {
	err = d.eachPool(ctx, "sweep addresses", func(ref poolRef) error {
		n, err := d.sweepPool(ctx, ref, bound)
		freed += n
		return err
	})
	return freed, err
}

func (d *Driver) sweepPool(ctx context.Context, ref poolRef, bound func(string, netip.Addr) bool) (freed int, err error) {
	op := fmt.Sprintf("sweep pool %s", ref.id())
	_, meta, err := d.readMeta(ctx, ref)
	if errors.Is(err, kvstore.ErrNotFound) {
		return 0, nil // being removed
	}
	if err != nil {
		return 0, storeErr(op, err)
	}
	if len(meta.Holders) == 0 {
		if _, err := d.reap(ctx, ref); err != nil {
			return 0, storeErr(op, err)
		}
		return 0, nil
	}
	dir := addrDir(ref.space, ref.subnet)
	pairs, err := d.store.List(ctx, dir)
	if err != nil {
		return 0, storeErr(op, err)
	}
	grace := d.cfg.Grace
	for _, p := range pairs {
		a, err := netip.ParseAddr(strings.TrimPrefix(p.Key, dir))
		if err != nil {
			continue
		}
		var rec addrRecord
		if err := decode(p.Key, p.Value, &rec); err != nil {
			d.log.Warn("sweep: unreadable address record left alone", "pool", ref.id(), "address", a, "err", err)
			continue
		}
		if rec.shared() || rec.Node != d.cfg.Node {
			continue
		}
		now := d.now()
		if rec.tombstone() {
			if now.Sub(rec.Reclaimed) < grace {
				continue
			}
			if d.cfg.InUse != nil && d.cfg.InUse(ref.id(), a) {
				// An endpoint of this host holds it: the reclaim was
				// meant for an earlier holder. Keep it out of allocation;
				// Docker's release of the endpoint frees it.
				d.log.Warn("reclaimed address kept: an endpoint of this host holds it", "pool", ref.id(), "address", a,
					"reclaimed_at", rec.Reclaimed, "mac", rec.MAC, "endpoint", rec.Endpoint)
				continue
			}
			err := d.store.DeleteCAS(ctx, p.Key, p.ModifyIndex)
			if errors.Is(err, kvstore.ErrConflict) || errors.Is(err, kvstore.ErrNotFound) {
				continue
			}
			if err != nil {
				return freed, storeErr(op, err)
			}
			freed++
			d.log.Info("reclaimed address freed: Docker did not release it within the grace period",
				"pool", ref.id(), "address", a, "reclaimed_at", rec.Reclaimed, "grace", grace)
			continue
		}
		if bound == nil {
			continue
		}
		at := rec.At
		if at.IsZero() {
			at = d.started // written by an earlier version: at least this old
		}
		if now.Sub(at) < grace || bound(ref.id(), a) {
			continue
		}
		rec.Reclaimed = now
		err = d.store.CAS(ctx, p.Key, encode(rec), p.ModifyIndex)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return freed, storeErr(op, err)
		}
		d.log.Info("orphan address reclaimed: no endpoint uses it; freed after the grace period unless Docker releases it",
			"pool", ref.id(), "address", a, "allocated_at", rec.At, "mac", rec.MAC, "endpoint", rec.Endpoint)
	}
	return freed, nil
}

// NodeHolds counts this host's holds of each subnet's pool, the address
// spaces summed: one per Docker network of this host, of any network
// driver, whose RequestPool this IPAM answered and whose ReleasePool has
// not come (or was lost: SweepPools drops those). The orphan sweep's
// caller compares it with the network driver's own networks: a subnet
// held more often than the driver has networks on it is also another
// driver's network's, whose endpoints the driver does not see.
func (d *Driver) NodeHolds(ctx context.Context) (map[netip.Prefix]int, error) {
	const op = "count pool holds"
	out := map[netip.Prefix]int{}
	// One meta record per subnet of a space, however many entries
	// (sub-pools) the index has for it.
	seen := map[poolRef]bool{}
	err := d.eachPool(ctx, op, func(ref poolRef) error {
		meta := poolRef{space: ref.space, subnet: ref.subnet}
		if seen[meta] {
			return nil
		}
		seen[meta] = true
		_, rec, err := d.readMeta(ctx, ref)
		if errors.Is(err, kvstore.ErrNotFound) {
			return nil
		}
		if err != nil {
			return storeErr(op, err)
		}
		if n := rec.Holders[d.cfg.Node]; n > 0 {
			out[ref.subnet.Masked()] += n
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// noSurplus records that a sweep found pool id not held in surplus.
func (d *Driver) noSurplus(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.surplus, id)
}

// surplusSeen records that a sweep found pool id held in surplus with its
// record at index, and reports whether the previous sweep found the same.
func (d *Driver) surplusSeen(id string, index uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if prev, ok := d.surplus[id]; ok && prev == index {
		delete(d.surplus, id)
		return true
	}
	if d.surplus == nil {
		d.surplus = map[string]uint64{}
	}
	d.surplus[id] = index
	return false
}

// SweepPools drops this host's pool holds that no network uses: holds
// taken by a RequestPool whose answer never reached Docker (a crash after
// the commit; Docker's retry takes another hold), and holds whose
// ReleasePool was lost (a crash before the commit; Docker does not retry
// it). Without it such a hold would keep the pool, and its subnet, forever.
//
// uses reports how many networks of this host use pool poolID (as PoolID
// formats it; ParsePoolID splits it), counting every network whose IPAM
// driver is this one, whatever its network driver, and known=false when
// that cannot be told (then nothing is dropped). The answer must come from
// Docker (its network list: each network's IPAM driver and subnets), not
// from the network driver alone, which does not see other drivers'
// networks using this IPAM. A node's holds are compared only once its last
// hold is older than the grace period, so a network whose RequestPool has
// been answered but which Docker has not finished creating is never taken
// for a leak. A surplus is dropped only when a second sweep finds it with
// the pool record unchanged: Docker stops listing a network it deletes
// before it sends that network's ReleasePool, so a surplus seen once may
// be a hold on its way out, whose ReleasePool would then take a live
// network's hold. Surplus holds are dropped by compare-and-set; a pool
// left with no holder is removed as ReleasePool would. dropped counts the
// holds dropped. Call it with Sweep.
func (d *Driver) SweepPools(ctx context.Context, uses func(poolID string) (n int, known bool)) (dropped int, err error) {
	err = d.eachPool(ctx, "sweep pools", func(ref poolRef) error {
		n, err := d.sweepHolds(ctx, ref, uses)
		dropped += n
		return err
	})
	return dropped, err
}

func (d *Driver) sweepHolds(ctx context.Context, ref poolRef, uses func(string) (int, bool)) (int, error) {
	op := fmt.Sprintf("sweep holds of pool %s", ref.id())
	pair, rec, err := d.readMeta(ctx, ref)
	if errors.Is(err, kvstore.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, storeErr(op, err)
	}
	n := rec.Holders[d.cfg.Node]
	if n == 0 || rec.SubPool != ref.subPool {
		d.noSurplus(ref.id())
		return 0, nil
	}
	at, ok := rec.HeldAt[d.cfg.Node]
	if !ok {
		at = d.started
	}
	if d.now().Sub(at) < d.cfg.Grace {
		d.noSurplus(ref.id())
		return 0, nil
	}
	u, known := uses(ref.id())
	if !known || u >= n {
		d.noSurplus(ref.id())
		return 0, nil
	}
	// Docker lists no network it is deleting, and sends the network's
	// ReleasePool after that: a surplus seen once may be a hold on its
	// way out. Dropped only if the next sweep finds the pool record
	// unchanged, which that ReleasePool would have changed.
	if !d.surplusSeen(ref.id(), pair.ModifyIndex) {
		d.log.Debug("pool held more often than networks use it; dropped at the next sweep if nothing changes", "pool", ref.id(), "held", n, "used", u)
		return 0, nil
	}
	if u <= 0 {
		u = 0
		delete(rec.Holders, d.cfg.Node)
		delete(rec.HeldAt, d.cfg.Node)
	} else {
		rec.Holders[d.cfg.Node] = u
	}
	d.forget(ref.id())
	err = d.store.CAS(ctx, metaKey(ref.space, ref.subnet), encode(rec), pair.ModifyIndex)
	if errors.Is(err, kvstore.ErrConflict) {
		return 0, nil // changed meanwhile: the next sweep looks again
	}
	if err != nil {
		return 0, storeErr(op, err)
	}
	d.log.Info("dropped pool holds no network uses", "pool", ref.id(), "held", n, "used", u, "holders", rec.Holders)
	if len(rec.Holders) == 0 {
		d.finishRelease(ctx, ref)
	}
	return n - u, nil
}
