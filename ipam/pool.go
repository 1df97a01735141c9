package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"consul-overlay/internal/fault"
	"consul-overlay/kvstore"
)

// maxAttempts bounds the compare-and-set retries of one pool operation;
// each retry follows a concurrent change by another host.
const maxAttempts = 64

func resolveSpace(s string) (string, error) {
	switch s {
	case "":
		return LocalAddressSpace, nil
	case LocalAddressSpace, GlobalAddressSpace:
		return s, nil
	}
	return "", fmt.Errorf("unknown address space %q (want %q or %q): %w", s, LocalAddressSpace, GlobalAddressSpace, ErrInvalidRequest)
}

func ipFamily(v6 bool) string {
	if v6 {
		return "ipv6"
	}
	return "ipv4"
}

// validatePoolRequest checks req and returns the pool it names (subnet zero
// for an automatic pool).
func validatePoolRequest(req PoolRequest) (poolRef, error) {
	space, err := resolveSpace(req.AddressSpace)
	if err != nil {
		return poolRef{}, err
	}
	ref := poolRef{space: space}
	if !req.Pool.IsValid() {
		if req.SubPool.IsValid() {
			return ref, fmt.Errorf("ip-range %s given without a subnet: %w", req.SubPool, ErrInvalidRequest)
		}
		return ref, nil
	}
	p := req.Pool.Masked()
	fam := ipFamily(p.Addr().Is6())
	if p.Addr().Is4In6() || p.Addr().Zone() != "" {
		return ref, fmt.Errorf("subnet %s: IPv4-mapped or zoned prefixes are not accepted: %w", req.Pool, ErrInvalidRequest)
	}
	if p.Addr().Is6() != req.V6 {
		return ref, fmt.Errorf("subnet %s is %s but the request is for %s: %w", p, fam, ipFamily(req.V6), ErrInvalidRequest)
	}
	lo, hi := prefixLimits(req.V6)
	if p.Bits() < lo {
		return ref, fmt.Errorf("subnet %s is larger than the largest supported %s pool (/%d): %w", p, fam, lo, ErrInvalidRequest)
	}
	if p.Bits() > hi {
		return ref, fmt.Errorf("subnet %s is smaller than the smallest supported %s pool (/%d): %w", p, fam, hi, ErrInvalidRequest)
	}
	ref.subnet = p
	if req.SubPool.IsValid() {
		s := req.SubPool.Masked()
		if s.Addr().Is6() != p.Addr().Is6() || s.Addr().Is4In6() || s.Addr().Zone() != "" {
			return ref, fmt.Errorf("ip-range %s is not of the family of subnet %s: %w", req.SubPool, p, ErrInvalidRequest)
		}
		if s.Bits() < p.Bits() || !p.Contains(s.Addr()) {
			return ref, fmt.Errorf("ip-range %s is not inside subnet %s: %w", s, p, ErrInvalidRequest)
		}
		if s != p {
			ref.subPool = s
		}
		if _, ok := allocSpan(p, ref.subPool); !ok {
			return ref, fmt.Errorf("ip-range %s of subnet %s holds no usable address: %w", s, p, ErrInvalidRequest)
		}
	}
	return ref, nil
}

// AllocatePool reserves a pool for this host: the subnet asked for, or, if
// none, a free one of the default size from the default range. The same
// subnet asked for again, by any host, returns the same pool.
func (d *Driver) AllocatePool(ctx context.Context, req PoolRequest) (Pool, error) {
	ref, err := validatePoolRequest(req)
	if err != nil {
		return Pool{}, fmt.Errorf("request pool: %w", err)
	}
	if !ref.subnet.IsValid() {
		return d.allocAutoPool(ctx, ref.space, req.V6)
	}
	return d.allocExplicitPool(ctx, ref)
}

func (d *Driver) allocExplicitPool(ctx context.Context, ref poolRef) (Pool, error) {
	op := fmt.Sprintf("request pool %s", ref.id())
	ikey := indexKey(ref.space, ref.v6())
	// A create that failed on an index version that is still current failed
	// on the pool record, not on the index.
	failedOn, createFailed := uint64(0), false
	for attempt := 0; attempt < maxAttempts; attempt++ {
		idx, imod, err := d.readIndex(ctx, ikey)
		if err != nil {
			return Pool{}, storeErr(op, err)
		}
		if e, ok := idx.find(ref.subnet); ok {
			if e.SubPool != ref.subPool {
				reaped, err := d.reapReleased(ctx, ref.space, []indexEntry{e})
				if err != nil {
					return Pool{}, storeErr(op, err)
				}
				if reaped {
					continue
				}
				return Pool{}, fmt.Errorf("%s: subnet %s is in use as pool %q (created by host %q) with a different ip-range: %w",
					op, ref.subnet, PoolID(ref.space, e.Subnet, e.SubPool), e.Node, ErrPoolOverlap)
			}
			p, done, err := d.joinPool(ctx, op, ref)
			if err != nil {
				return Pool{}, err
			}
			if done {
				return p, nil
			}
			continue
		}
		if ov := idx.overlapping(ref.subnet); len(ov) > 0 {
			reaped, err := d.reapReleased(ctx, ref.space, ov)
			if err != nil {
				return Pool{}, storeErr(op, err)
			}
			if reaped {
				continue
			}
			e := ov[0]
			return Pool{}, fmt.Errorf("%s: subnet %s overlaps pool %q (created by host %q): %w",
				op, ref.subnet, PoolID(ref.space, e.Subnet, e.SubPool), e.Node, ErrPoolOverlap)
		}
		if createFailed && failedOn == imod {
			// The index did not change, so the create failed on the pool
			// record: one exists without an index entry.
			return Pool{}, fmt.Errorf("%s: a pool record exists at %s without an index entry (edited by hand?): %w",
				op, metaKey(ref.space, ref.subnet), kvstore.ErrConflict)
		}
		p, err := d.createPool(ctx, ref, idx, imod, false)
		if errors.Is(err, kvstore.ErrConflict) {
			failedOn, createFailed = imod, true
			continue
		}
		if err != nil {
			return Pool{}, storeErr(op, err)
		}
		return p, nil
	}
	return Pool{}, fmt.Errorf("%s: gave up after %d concurrent updates: %w", op, maxAttempts, kvstore.ErrConflict)
}

// joinPool adds this host as a holder of an existing pool. done is false if
// the pool changed underneath (retry from the index).
func (d *Driver) joinPool(ctx context.Context, op string, ref poolRef) (Pool, bool, error) {
	key := metaKey(ref.space, ref.subnet)
	pair, rec, err := d.readMeta(ctx, ref)
	if errors.Is(err, kvstore.ErrNotFound) {
		return Pool{}, false, nil // being created or removed right now
	}
	if err != nil {
		return Pool{}, false, storeErr(op, err)
	}
	if rec.SubPool != ref.subPool {
		return Pool{}, false, nil // index and record disagree only mid-change
	}
	if rec.Holders == nil {
		rec.Holders = map[string]int{}
	}
	rec.Holders[d.cfg.Node]++
	rec.touch(d.cfg.Node, d.now())
	fault.Point("requestpool/join-before-commit")
	err = d.store.CAS(ctx, key, encode(rec), pair.ModifyIndex)
	if errors.Is(err, kvstore.ErrConflict) {
		return Pool{}, false, nil
	}
	if err != nil {
		return Pool{}, false, storeErr(op, err)
	}
	fault.Point("requestpool/join-after-commit")
	d.log.Debug("joined pool", "pool", ref.id(), "holders", rec.Holders)
	return rec.pool(ref.space), true, nil
}

// createPool writes a new pool: its index entry and its record, atomically.
func (d *Driver) createPool(ctx context.Context, ref poolRef, idx poolIndex, imod uint64, auto bool) (Pool, error) {
	rec := poolRecord{Subnet: ref.subnet, SubPool: ref.subPool, Auto: auto, Holders: map[string]int{d.cfg.Node: 1}}
	rec.touch(d.cfg.Node, d.now())
	idx.Pools = append(slices.Clone(idx.Pools), indexEntry{Subnet: ref.subnet, SubPool: ref.subPool, Node: d.cfg.Node, Auto: auto})
	idx.sort()
	ops := []kvstore.Op{
		indexWriteOp(indexKey(ref.space, ref.v6()), idx, imod),
		{Verb: kvstore.OpCreate, Key: metaKey(ref.space, ref.subnet), Value: encode(rec)},
	}
	fault.Point("requestpool/before-commit")
	if err := d.store.Txn(ctx, ops); err != nil {
		return Pool{}, err
	}
	fault.Point("requestpool/after-commit")
	d.log.Info("created pool", "pool", ref.id(), "auto", auto)
	return rec.pool(ref.space), nil
}

func (d *Driver) allocAutoPool(ctx context.Context, space string, v6 bool) (Pool, error) {
	rng, size := d.cfg.DefaultPoolV4, d.cfg.DefaultPoolV4Size
	if v6 {
		rng, size = d.cfg.DefaultPoolV6, d.cfg.DefaultPoolV6Size
	}
	op := fmt.Sprintf("request pool in %s (automatic /%d from %s)", space, size, rng)
	ikey := indexKey(space, v6)
	for attempt := 0; attempt < maxAttempts; attempt++ {
		idx, imod, err := d.readIndex(ctx, ikey)
		if err != nil {
			return Pool{}, storeErr(op, err)
		}
		cand, ok := idx.freeSubnet(rng, size)
		if !ok {
			var inRange []indexEntry
			for _, e := range idx.Pools {
				if e.Subnet.Overlaps(rng) {
					inRange = append(inRange, e)
				}
			}
			reaped, err := d.reapReleased(ctx, space, inRange)
			if err != nil {
				return Pool{}, storeErr(op, err)
			}
			if reaped {
				continue
			}
			return Pool{}, fmt.Errorf("%s: no free /%d left in %s: %w", op, size, rng, ErrPoolExhausted)
		}
		p, err := d.createPool(ctx, poolRef{space: space, subnet: cand}, idx, imod, true)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return Pool{}, storeErr(op, err)
		}
		return p, nil
	}
	return Pool{}, fmt.Errorf("%s: gave up after %d concurrent updates: %w", op, maxAttempts, kvstore.ErrConflict)
}

// deferRelease applies a release of a pool (gw invalid) or of its
// gateway gw again, with f, once Config.Restored says Kept can tell: kept
// is Kept's answer, and only KeptUnknown defers. It reports whether it
// deferred. A kill -9 before then loses the deferred release; the pool
// sweep drops the hold then.
func (d *Driver) deferRelease(kept int, what, poolID string, gw netip.Addr, f func(ctx context.Context) error) bool {
	if kept != KeptUnknown || d.cfg.Restored == nil {
		return false
	}
	d.log.Warn("release of a "+what+" deferred until the network driver has restored its state: it cannot tell yet which of this host's networks still use it",
		"pool", poolID, "gateway", gw)
	restored := d.cfg.Restored()
	go func() {
		<-restored
		ctx, cancel := context.WithTimeout(context.Background(), d.cfg.Timeout)
		defer cancel()
		if err := f(ctx); err != nil {
			d.log.Error("deferred release failed: the pool sweep drops the hold if no network uses it", "pool", poolID, "gateway", gw, "error", err)
		}
	}()
	return true
}

// FreePool releases this host's hold on a pool. The pool and every key under
// it are removed when no host holds it any more. Releasing a pool this host
// does not hold, or that does not exist, changes nothing and succeeds.
func (d *Driver) FreePool(ctx context.Context, poolID string) error {
	op := fmt.Sprintf("release pool %s", poolID)
	ref, err := parsePoolID(poolID)
	if err != nil {
		return fmt.Errorf("release pool: %w", err)
	}
	key := metaKey(ref.space, ref.subnet)
	d.forget(ref.id())
	for attempt := 0; attempt < maxAttempts; attempt++ {
		pair, rec, err := d.readMeta(ctx, ref)
		if errors.Is(err, kvstore.ErrNotFound) {
			d.log.Debug("release of unknown pool", "pool", poolID)
			return nil
		}
		if err != nil {
			return storeErr(op, err)
		}
		if rec.SubPool != ref.subPool {
			d.log.Warn("release of a pool ID whose subnet is now in use with another ip-range; ignored", "pool", poolID)
			return nil
		}
		n := rec.Holders[d.cfg.Node]
		if n == 0 {
			if len(rec.Holders) == 0 {
				// Released by its last holder, whose cleanup did not finish.
				d.finishRelease(ctx, ref)
			}
			return nil
		}
		if d.cfg.Kept != nil {
			if kept := d.cfg.Kept(poolID, netip.Addr{}); n-1 < kept {
				if d.deferRelease(kept, "pool", poolID, netip.Addr{}, func(ctx context.Context) error { return d.FreePool(ctx, poolID) }) {
					return nil
				}
				d.log.Warn("release of a pool ignored: this host's networks with endpoints use it (a release sent again by a retried removal, or one a re-assertion counted out)",
					"pool", poolID, "holds", n, "kept", kept)
				return nil
			}
		}
		if n == 1 {
			delete(rec.Holders, d.cfg.Node)
			delete(rec.HeldAt, d.cfg.Node)
		} else {
			rec.Holders[d.cfg.Node] = n - 1
		}
		fault.Point("releasepool/before-commit")
		err = d.store.CAS(ctx, key, encode(rec), pair.ModifyIndex)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return storeErr(op, err)
		}
		// A crash here leaves the pool released but not removed (doc.go,
		// step 5): Sweep or the next colliding request removes it.
		fault.Point("releasepool/after-commit")
		d.log.Info("released pool", "pool", poolID, "holders", rec.Holders)
		if len(rec.Holders) == 0 {
			d.finishRelease(ctx, ref)
		}
		return nil
	}
	return fmt.Errorf("%s: gave up after %d concurrent updates: %w", op, maxAttempts, kvstore.ErrConflict)
}

// finishRelease removes a pool nobody holds. The release itself is already
// recorded, so a failure here is logged, not returned: the pool stays
// marked released and the next request that collides with it, or the next
// ReleasePool of it, finishes the job.
func (d *Driver) finishRelease(ctx context.Context, ref poolRef) {
	if _, err := d.reap(ctx, ref); err != nil {
		d.log.Warn("pool released but its keys were not all removed; they will be removed later", "pool", ref.id(), "err", err)
	}
}

// reapReleased removes those of entries whose pool is released (no
// holders). It reports whether any was removed.
func (d *Driver) reapReleased(ctx context.Context, space string, entries []indexEntry) (bool, error) {
	removed := false
	for _, e := range entries {
		ok, err := d.reap(ctx, poolRef{space: space, subnet: e.Subnet, subPool: e.SubPool})
		if err != nil {
			return removed, err
		}
		removed = removed || ok
	}
	return removed, nil
}

// reap removes a pool that has no holders: its address records, cursor,
// record and index entry. It stops, reporting false, if the pool has
// holders (it was never released, or another host took it up again). Every
// delete is conditional on the pool record being unchanged, and no address
// can be created while the record shows no holders, so reap never removes
// the state of a pool in use.
func (d *Driver) reap(ctx context.Context, ref poolRef) (bool, error) {
	mkey := metaKey(ref.space, ref.subnet)
	for attempt := 0; attempt < maxAttempts; attempt++ {
		pair, rec, err := d.readMeta(ctx, ref)
		if errors.Is(err, kvstore.ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if len(rec.Holders) > 0 {
			return false, nil
		}
		m := pair.ModifyIndex
		addrs, err := d.store.List(ctx, addrDir(ref.space, ref.subnet))
		if err != nil {
			return false, err
		}
		conflict := false
		for len(addrs) > 0 && !conflict {
			// One operation is the pool check; two are left for fences:
			// the reaper's evicting a gone host (kvstore.Fence) and this
			// host's own (kvstore.OwnFenced), which each add one.
			n := min(len(addrs), kvstore.MaxTxnOps-3)
			ops := []kvstore.Op{{Verb: kvstore.OpCheckIndex, Key: mkey, Index: m}}
			for _, p := range addrs[:n] {
				ops = append(ops, kvstore.Op{Verb: kvstore.OpDeleteCAS, Key: p.Key, Index: p.ModifyIndex})
			}
			err := d.store.Txn(ctx, ops)
			if errors.Is(err, kvstore.ErrConflict) {
				conflict = true
				break
			}
			if err != nil {
				return false, err
			}
			d.log.Debug("removed address records of released pool", "pool", ref.id(), "count", n)
			addrs = addrs[n:]
		}
		if conflict {
			continue
		}
		fault.Point("releasepool/after-addresses")
		ikey := indexKey(ref.space, ref.v6())
		idx, imod, err := d.readIndex(ctx, ikey)
		if err != nil {
			return false, err
		}
		ops := []kvstore.Op{
			{Verb: kvstore.OpDeleteCAS, Key: mkey, Index: m},
			{Verb: kvstore.OpDelete, Key: nextKey(ref.space, ref.subnet)},
		}
		if idx.remove(ref.subnet) {
			ops = append(ops, indexWriteOp(ikey, idx, imod))
		}
		err = d.store.Txn(ctx, ops)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return false, err
		}
		d.log.Info("removed pool", "pool", ref.id())
		return true, nil
	}
	return false, fmt.Errorf("remove pool %s: gave up after %d concurrent updates: %w", ref.id(), maxAttempts, kvstore.ErrConflict)
}

// PoolInfo returns a pool held by some host, or ErrUnknownPool.
func (d *Driver) PoolInfo(ctx context.Context, poolID string) (Pool, error) {
	op := fmt.Sprintf("pool info %s", poolID)
	ref, err := parsePoolID(poolID)
	if err != nil {
		return Pool{}, fmt.Errorf("pool info: %w", err)
	}
	_, rec, err := d.readMeta(ctx, ref)
	if errors.Is(err, kvstore.ErrNotFound) || (err == nil && (rec.SubPool != ref.subPool || len(rec.Holders) == 0)) {
		return Pool{}, fmt.Errorf("%s: no host holds it: %w", op, ErrUnknownPool)
	}
	if err != nil {
		return Pool{}, storeErr(op, err)
	}
	return rec.pool(ref.space), nil
}

func (r *poolRecord) pool(space string) Pool {
	return Pool{
		ID:           PoolID(space, r.Subnet, r.SubPool),
		AddressSpace: space,
		Subnet:       r.Subnet,
		SubPool:      r.SubPool,
		Auto:         r.Auto,
		Gateway:      r.Gateway,
		Holders:      r.Holders,
	}
}

// eachPool calls fn with every pool the indexes list, of both address
// spaces and both families, and stops at fn's first error, which it
// returns as is; a failed index read is returned as storeErr(op, err).
func (d *Driver) eachPool(ctx context.Context, op string, fn func(poolRef) error) error {
	for _, space := range []string{LocalAddressSpace, GlobalAddressSpace} {
		for _, v6 := range []bool{false, true} {
			idx, _, err := d.readIndex(ctx, indexKey(space, v6))
			if err != nil {
				return storeErr(op, err)
			}
			for _, e := range idx.Pools {
				if err := fn(poolRef{space: space, subnet: e.Subnet, subPool: e.SubPool}); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func (d *Driver) readIndex(ctx context.Context, key string) (poolIndex, uint64, error) {
	var idx poolIndex
	pair, err := d.store.Get(ctx, key)
	if errors.Is(err, kvstore.ErrNotFound) {
		return idx, 0, nil
	}
	if err != nil {
		return idx, 0, err
	}
	if err := decode(key, pair.Value, &idx); err != nil {
		return idx, 0, err
	}
	return idx, pair.ModifyIndex, nil
}

func (d *Driver) readMeta(ctx context.Context, ref poolRef) (*kvstore.Pair, poolRecord, error) {
	var rec poolRecord
	key := metaKey(ref.space, ref.subnet)
	pair, err := d.store.Get(ctx, key)
	if err != nil {
		return nil, rec, err
	}
	if err := decode(key, pair.Value, &rec); err != nil {
		return nil, rec, err
	}
	return pair, rec, nil
}

// indexWriteOp writes idx over the version imod read (0: absent); an empty
// index is deleted so that no key is left behind.
func indexWriteOp(key string, idx poolIndex, imod uint64) kvstore.Op {
	switch {
	case len(idx.Pools) == 0:
		return kvstore.Op{Verb: kvstore.OpDeleteCAS, Key: key, Index: imod}
	case imod == 0:
		return kvstore.Op{Verb: kvstore.OpCreate, Key: key, Value: encode(idx)}
	default:
		return kvstore.Op{Verb: kvstore.OpCAS, Key: key, Value: encode(idx), Index: imod}
	}
}

func (x *poolIndex) sort() {
	slices.SortFunc(x.Pools, func(a, b indexEntry) int { return a.Subnet.Addr().Compare(b.Subnet.Addr()) })
}

func (x *poolIndex) find(subnet netip.Prefix) (indexEntry, bool) {
	for _, e := range x.Pools {
		if e.Subnet == subnet {
			return e, true
		}
	}
	return indexEntry{}, false
}

func (x *poolIndex) remove(subnet netip.Prefix) bool {
	n := len(x.Pools)
	x.Pools = slices.DeleteFunc(slices.Clone(x.Pools), func(e indexEntry) bool { return e.Subnet == subnet })
	return len(x.Pools) != n
}

func (x *poolIndex) overlapping(p netip.Prefix) []indexEntry {
	var out []indexEntry
	for _, e := range x.Pools {
		if e.Subnet.Overlaps(p) {
			out = append(out, e)
		}
	}
	return out
}

// freeSubnet returns the first /size in rng that overlaps no pool. Prefixes
// either nest or are disjoint, so on a collision the scan jumps past the
// larger of the candidate and the pool it hit.
func (x *poolIndex) freeSubnet(rng netip.Prefix, size int) (netip.Prefix, bool) {
	end := lastAddr(rng)
	cand := netip.PrefixFrom(rng.Addr(), size)
	for {
		var hit *indexEntry
		for i := range x.Pools {
			if x.Pools[i].Subnet.Overlaps(cand) {
				hit = &x.Pools[i]
				break
			}
		}
		if hit == nil {
			return cand, true
		}
		last := lastAddr(cand)
		if hit.Subnet.Bits() < size {
			last = lastAddr(hit.Subnet)
		}
		if last.Compare(end) >= 0 {
			return netip.Prefix{}, false
		}
		cand = netip.PrefixFrom(last.Next(), size)
	}
}
