package ipam

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"strings"
	"time"

	"consul-overlay/internal/fault"
	"consul-overlay/kvstore"
)

const (
	// maxAddrAttempts bounds the claims one address request tries; each
	// failed claim means another host took that address (or changed the
	// pool) at the same moment.
	maxAddrAttempts = 1024
	// maxHeldSkips bounds the addresses Config.Held reports that one
	// request skips without spending an attempt: more than the endpoints
	// of one host, so a Held gone wrong still ends the walk of a /64.
	maxHeldSkips = 1 << 16
	// probeLimit is how many taken addresses in a row are probed one by one
	// before the pool's address records are listed to find a free one.
	probeLimit = 8
	// maxScatter caps the random step after a lost claim (see scatter).
	maxScatter = 256
)

// poolState is what an address request reads first: the pool record (its
// ModifyIndex guards every address claim) and the cursor.
type poolState struct {
	metaIdx uint64
	rec     poolRecord
	cursor  netip.Addr // last address handed out; zero if none
}

// burstCache is how long a host reuses the pool state of its last
// allocation instead of reading it again. Within a burst each allocation is
// then one transaction, and concurrent hosts each keep to their own stretch
// of addresses instead of colliding at the shared cursor. The cache is only
// a hint: every claim checks the pool record's version in the store, so a
// stale entry costs one failed claim and a read. It is short so that a host
// allocating again later starts from the shared cursor, not from where it
// stopped (which could hand out an address released meanwhile).
const burstCache = time.Second

type cachedPool struct {
	st poolState
	at time.Time
}

func (d *Driver) cached(poolID string) (poolState, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	c, ok := d.cache[poolID]
	if !ok || time.Since(c.at) > burstCache {
		delete(d.cache, poolID)
		return poolState{}, false
	}
	return c.st, true
}

func (d *Driver) remember(poolID string, st poolState) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cache == nil {
		d.cache = map[string]cachedPool{}
	}
	for id, c := range d.cache { // keep it small: drop what has expired
		if time.Since(c.at) > burstCache {
			delete(d.cache, id)
		}
	}
	d.cache[poolID] = cachedPool{st: st, at: time.Now()}
}

func (d *Driver) forget(poolID string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.cache, poolID)
}

// loadPool reads a pool's record and cursor in one List. A pool that no host
// holds, or whose ip-range differs from the ID's, is ErrUnknownPool.
func (d *Driver) loadPool(ctx context.Context, op string, ref poolRef) (poolState, error) {
	var st poolState
	pairs, err := d.store.List(ctx, poolDir(ref.space, ref.subnet))
	if err != nil {
		return st, storeErr(op, err)
	}
	found := false
	mkey, nkey := metaKey(ref.space, ref.subnet), nextKey(ref.space, ref.subnet)
	for _, p := range pairs {
		switch p.Key {
		case mkey:
			if err := decode(p.Key, p.Value, &st.rec); err != nil {
				return st, storeErr(op, err)
			}
			st.metaIdx, found = p.ModifyIndex, true
		case nkey:
			if a, err := netip.ParseAddr(string(p.Value)); err == nil {
				st.cursor = a
			}
		}
	}
	switch {
	case !found:
		return st, fmt.Errorf("%s: no host holds pool %q: %w", op, ref.id(), ErrUnknownPool)
	case len(st.rec.Holders) == 0:
		return st, fmt.Errorf("%s: pool %q has been released: %w", op, ref.id(), ErrUnknownPool)
	case st.rec.SubPool != ref.subPool:
		return st, fmt.Errorf("%s: subnet %s is now in use with ip-range %q, not this pool ID's: %w", op, ref.subnet, st.rec.SubPool, ErrUnknownPool)
	}
	return st, nil
}

type identity struct{ endpoint, mac string }

func (i identity) present() bool { return i.endpoint != "" || i.mac != "" }

// matches tells whether the request comes from the endpoint r was granted
// to: by endpoint name when both have one (Docker v29+ sends it; another
// container with the same --mac-address is not the same endpoint), by MAC
// otherwise.
func (i identity) matches(r *addrRecord) bool {
	if i.endpoint != "" && r.Endpoint != "" {
		return i.endpoint == r.Endpoint
	}
	return i.mac != "" && strings.EqualFold(i.mac, r.MAC)
}

// AllocateAddress hands out an address of a pool and returns it with the
// pool's prefix length (see doc.go for the rules).
func (d *Driver) AllocateAddress(ctx context.Context, req AddressRequest) (netip.Prefix, error) {
	ref, err := parsePoolID(req.PoolID)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("request address: %w", err)
	}
	op := fmt.Sprintf("request address in pool %s", ref.id())
	if req.Address.IsValid() {
		op = fmt.Sprintf("request address %s in pool %s", req.Address, ref.id())
		if !usable(ref.subnet, req.Address) {
			return netip.Prefix{}, fmt.Errorf("%s: not a usable address of %s (outside it, or its network or broadcast address): %w", op, ref.subnet, ErrAddressOutOfRange)
		}
	}
	if !req.heldReady {
		if err := d.heldReady(req); err != nil {
			return netip.Prefix{}, fmt.Errorf("%s: %w", op, err)
		}
	}
	dynamic := !req.Gateway && !req.Address.IsValid()
	st, cached := poolState{}, false
	if dynamic {
		st, cached = d.cached(ref.id())
	}
	if !cached {
		if st, err = d.loadPool(ctx, op, ref); err != nil {
			d.forget(ref.id())
			return netip.Prefix{}, err
		}
	}
	id := identity{endpoint: req.Endpoint, mac: req.MAC}
	var a netip.Addr
	switch {
	case req.Gateway:
		a, err = d.allocGateway(ctx, op, ref, st, req.Address)
	case req.Address.IsValid():
		a, err = d.allocStatic(ctx, op, ref, st, req.Address, id, req.reassert)
	default:
		a, err = d.allocNext(ctx, op, ref, st, id)
	}
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, ref.subnet.Bits()), nil
}

// heldReady calls Config.HeldReady for a request that may ask Held (the
// next free address, or an explicit one for an endpoint; not a gateway,
// an --aux-address or ReassertAddress): Held must know this host's
// endpoints.
func (d *Driver) heldReady(req AddressRequest) error {
	if d.cfg.Held == nil || d.cfg.HeldReady == nil || req.Gateway || req.reassert {
		return nil
	}
	if req.Address.IsValid() && req.Endpoint == "" && req.MAC == "" {
		return nil
	}
	return d.cfg.HeldReady()
}

func (d *Driver) getAddr(ctx context.Context, ref poolRef, a netip.Addr) (*kvstore.Pair, *addrRecord, error) {
	key := addrKey(ref.space, ref.subnet, a)
	pair, err := d.store.Get(ctx, key)
	if err != nil {
		return nil, nil, err
	}
	var rec addrRecord
	if err := decode(key, pair.Value, &rec); err != nil {
		return nil, nil, err
	}
	return pair, &rec, nil
}

// reload re-reads the pool after a failed claim.
func (d *Driver) reload(ctx context.Context, op string, ref poolRef) (poolState, error) {
	return d.loadPool(ctx, op, ref)
}

// allocGateway returns the network's gateway: the one the pool already has
// (every host gets the same), else want, else the first usable address, or
// the lowest free one if that is taken. The gateway record counts holds per
// host; the pool record names the gateway while it is held.
func (d *Driver) allocGateway(ctx context.Context, op string, ref poolRef, st poolState, want netip.Addr) (netip.Addr, error) {
	mkey := metaKey(ref.space, ref.subnet)
	var pick netip.Addr // the lowest free address, once the first usable was found taken
	for attempt := 0; attempt < maxAttempts; attempt++ {
		if attempt > 0 {
			var err error
			if st, err = d.reload(ctx, op, ref); err != nil {
				return netip.Addr{}, err
			}
		}
		recorded := st.rec.Gateway
		if recorded.IsValid() {
			// A recorded gateway whose address is held as something else
			// is stale (its holders released it and the pool was taken up
			// again); a missing record is re-created at the same address.
			_, rec, err := d.getAddr(ctx, ref, recorded)
			if err != nil && !errors.Is(err, kvstore.ErrNotFound) {
				return netip.Addr{}, storeErr(op, err)
			}
			if rec != nil && rec.Kind != kindGateway {
				recorded = netip.Addr{}
			}
		}
		target := want
		switch {
		case want.IsValid() && recorded.IsValid() && want != recorded:
			return netip.Addr{}, fmt.Errorf("%s: the network's gateway is already %s (all hosts must use the same): %w", op, recorded, ErrInvalidRequest)
		case target.IsValid():
		case recorded.IsValid():
			target = recorded
		case pick.IsValid():
			target = pick
		default:
			target = ref.subnet.Addr().Next()
		}
		pair, rec, err := d.getAddr(ctx, ref, target)
		if err != nil && !errors.Is(err, kvstore.ErrNotFound) {
			return netip.Addr{}, storeErr(op, err)
		}
		if rec != nil && rec.Kind != kindGateway {
			if want.IsValid() || recorded.IsValid() {
				return netip.Addr{}, fmt.Errorf("%s: gateway %s is held by %s: %w", op, target, rec.holderNames(), ErrAddressInUse)
			}
			whole, _ := allocSpan(ref.subnet, netip.Prefix{})
			if pick, err = d.firstFree(ctx, op, ref, whole, whole.lo); err != nil {
				return netip.Addr{}, err
			}
			continue
		}
		metaOp := kvstore.Op{Verb: kvstore.OpCheckIndex, Key: mkey, Index: st.metaIdx}
		if st.rec.Gateway != target {
			meta := st.rec
			meta.Gateway = target
			metaOp = kvstore.Op{Verb: kvstore.OpCAS, Key: mkey, Value: encode(meta), Index: st.metaIdx}
		}
		akey := addrKey(ref.space, ref.subnet, target)
		var addrOp kvstore.Op
		if rec == nil {
			rec = &addrRecord{Kind: kindGateway, Holders: map[string]int{d.cfg.Node: 1}, At: d.now()}
			addrOp = kvstore.Op{Verb: kvstore.OpCreate, Key: akey, Value: encode(rec)}
		} else {
			if rec.Holders == nil {
				rec.Holders = map[string]int{}
			}
			rec.Holders[d.cfg.Node]++
			addrOp = kvstore.Op{Verb: kvstore.OpCAS, Key: akey, Value: encode(rec), Index: pair.ModifyIndex}
		}
		fault.Point("requestaddress/gateway-before-commit")
		err = d.store.Txn(ctx, []kvstore.Op{metaOp, addrOp})
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return netip.Addr{}, storeErr(op, err)
		}
		// A crash here leaves a hold Docker never learnt of; Docker's retry
		// adds another. The gateway is shared and freed with its pool, so
		// the extra hold lasts no longer than the pool (see doc.go).
		fault.Point("requestaddress/gateway-after-commit")
		d.log.Debug("gateway held", "pool", ref.id(), "address", target, "holders", rec.Holders)
		return target, nil
	}
	return netip.Addr{}, fmt.Errorf("%s: gave up after %d concurrent updates: %w", op, maxAttempts, kvstore.ErrConflict)
}

// allocStatic grants an explicit address. With an endpoint identity it is
// exclusive (granted again only to the same endpoint of the same host);
// without one it is a reservation (an --aux-address) shared by every host
// of the network and counted per host.
func (d *Driver) allocStatic(ctx context.Context, op string, ref poolRef, st poolState, a netip.Addr, id identity, reassert bool) (netip.Addr, error) {
	key := addrKey(ref.space, ref.subnet, a)
	mkey := metaKey(ref.space, ref.subnet)
	for attempt := 0; attempt < maxAttempts; attempt++ {
		if attempt > 0 {
			var err error
			if st, err = d.reload(ctx, op, ref); err != nil {
				return netip.Addr{}, err
			}
		}
		fence := kvstore.Op{Verb: kvstore.OpCheckIndex, Key: mkey, Index: st.metaIdx}
		pair, rec, err := d.getAddr(ctx, ref, a)
		var ops []kvstore.Op
		switch {
		case errors.Is(err, kvstore.ErrNotFound):
			if id.present() && !reassert && d.heldHere(ref, a) {
				d.log.Warn("address not handed out: an endpoint of this host has it, whose record the store lost (evicted while away?)", "pool", ref.id(), "address", a)
				return netip.Addr{}, fmt.Errorf("%s: an endpoint of this host has it, whose record the store lost (evicted while away?): %w", op, ErrAddressInUse)
			}
			if id.present() {
				rec = &addrRecord{Kind: kindEndpoint, Node: d.cfg.Node, Endpoint: id.endpoint, MAC: id.mac, At: d.now()}
			} else {
				rec = &addrRecord{Kind: kindReserved, Holders: map[string]int{d.cfg.Node: 1}, At: d.now()}
			}
			ops = []kvstore.Op{fence, {Verb: kvstore.OpCreate, Key: key, Value: encode(rec)}}
		case err != nil:
			return netip.Addr{}, storeErr(op, err)
		case id.present():
			if rec.Kind != kindEndpoint || rec.Node != d.cfg.Node || !id.matches(rec) || rec.tombstone() {
				return netip.Addr{}, fmt.Errorf("%s: held by %s: %w", op, rec.holderNames(), ErrAddressInUse)
			}
			if d.cfg.InContainer != nil && d.cfg.InContainer(ref.id(), a) {
				return netip.Addr{}, fmt.Errorf("%s: held by %s, and a running container of this host has it (renamed since?): %w", op, rec.holderNames(), ErrAddressInUse)
			}
			// The same endpoint asking again: Docker's retry, or the
			// container started again under its name while the driver
			// still has its earlier endpoint (gone with a plugin that was
			// down), which the driver reclaims later. The record takes
			// this request's MAC and time, so that the earlier endpoint's
			// reclaim (fenced by MAC and creation time) no longer matches
			// it and cannot free the address under the new endpoint.
			if id.endpoint != "" {
				rec.Endpoint = id.endpoint
			}
			if id.mac != "" {
				rec.MAC = id.mac
			}
			rec.At = d.now()
			ops = []kvstore.Op{fence, {Verb: kvstore.OpCAS, Key: key, Value: encode(rec), Index: pair.ModifyIndex}}
		case rec.Kind == kindReserved:
			if rec.Holders == nil {
				rec.Holders = map[string]int{}
			}
			rec.Holders[d.cfg.Node]++
			ops = []kvstore.Op{fence, {Verb: kvstore.OpCAS, Key: key, Value: encode(rec), Index: pair.ModifyIndex}}
		default:
			return netip.Addr{}, fmt.Errorf("%s: held by %s as %s: %w", op, rec.holderNames(), rec.Kind, ErrAddressInUse)
		}
		fault.Point("requestaddress/static-before-commit")
		err = d.store.Txn(ctx, ops)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return netip.Addr{}, storeErr(op, err)
		}
		// A crash here leaves an address Docker never got. Docker's retry
		// with the same endpoint name gets it again (v29+); otherwise
		// Sweep reclaims it as an orphan.
		fault.Point("requestaddress/static-after-commit")
		d.log.Debug("address held", "pool", ref.id(), "address", a, "kind", rec.Kind, "endpoint", id.endpoint)
		return a, nil
	}
	return netip.Addr{}, fmt.Errorf("%s: gave up after %d concurrent updates: %w", op, maxAttempts, kvstore.ErrConflict)
}

// allocNext hands out the next free address after the pool's cursor. Each
// claim is one transaction: the pool record unchanged, the address key
// created (it must not exist), the cursor set. A failed claim moves on to
// the next address; after probeLimit taken addresses in a row the address
// records are listed once to skip to a free one, and the pool is exhausted
// only when such a listing shows no free address.
func (d *Driver) allocNext(ctx context.Context, op string, ref poolRef, st poolState, id identity) (netip.Addr, error) {
	sp, ok := allocSpan(ref.subnet, ref.subPool)
	if !ok {
		return netip.Addr{}, fmt.Errorf("%s: no usable address: %w", op, ErrPoolExhausted)
	}
	mkey, nkey := metaKey(ref.space, ref.subnet), nextKey(ref.space, ref.subnet)
	rec := addrRecord{Kind: kindEndpoint, Node: d.cfg.Node, Endpoint: id.endpoint, MAC: id.mac, At: d.now()}
	val := encode(rec)
	cand := sp.next(st.cursor)
	var taken map[netip.Addr]bool // from the last listing, plus claims lost since
	here := map[netip.Addr]bool{} // free in the store, but an endpoint of this host has them
	streak, skips := 0, 0
	for attempt := 0; attempt < maxAddrAttempts; attempt++ {
		if taken != nil || streak >= probeLimit {
			a, ok := netip.Addr{}, false
			if taken != nil && streak < probeLimit {
				a, ok = walkFree(sp, cand, taken)
			}
			if !ok {
				var err error
				if taken, err = d.listTaken(ctx, op, ref); err != nil {
					return netip.Addr{}, err
				}
				maps.Copy(taken, here)
				streak = 0
				if a, ok = walkFree(sp, cand, taken); !ok {
					return netip.Addr{}, fmt.Errorf("%s: all addresses of %s are in use: %w", op, spanName(ref), ErrPoolExhausted)
				}
			}
			cand = a
		}
		if d.heldHere(ref, cand) {
			// Not a claim lost to another host: it costs no attempt
			// (each held address is skipped once, so the walk ends),
			// and once the records are listed no new listing either.
			here[cand] = true
			if taken != nil {
				taken[cand] = true
			} else {
				streak++
			}
			cand = sp.next(cand)
			if skips++; skips <= maxHeldSkips {
				attempt--
			}
			continue
		}
		ops := []kvstore.Op{
			{Verb: kvstore.OpCheckIndex, Key: mkey, Index: st.metaIdx},
			{Verb: kvstore.OpCreate, Key: addrKey(ref.space, ref.subnet, cand), Value: val},
			{Verb: kvstore.OpSet, Key: nkey, Value: []byte(cand.String())},
		}
		fault.Point("requestaddress/before-commit")
		err := d.store.Txn(ctx, ops)
		if err == nil {
			// A crash here leaves an address Docker never got: its retry
			// gets another, and Sweep reclaims this one as an orphan.
			fault.Point("requestaddress/after-commit")
			d.log.Debug("address allocated", "pool", ref.id(), "address", cand, "endpoint", id.endpoint)
			st.cursor = cand
			d.remember(ref.id(), st)
			return cand, nil
		}
		if !errors.Is(err, kvstore.ErrConflict) {
			return netip.Addr{}, storeErr(op, err)
		}
		// Find out whether the address or the pool changed.
		st2, err := d.reload(ctx, op, ref)
		if err != nil {
			d.forget(ref.id())
			return netip.Addr{}, err
		}
		if st2.metaIdx != st.metaIdx {
			st = st2
			continue // the pool changed (a host joined or left); retry cand
		}
		if taken != nil {
			taken[cand] = true
		}
		streak++
		if st2.cursor.IsValid() && st2.cursor != st.cursor && sp.contains(st2.cursor) {
			// Other hosts are allocating right now: follow the cursor
			// rather than probe the addresses they just took one by one,
			// and spread out from it.
			cand = sp.advance(st2.cursor, 1+rand.IntN(scatter(streak, sp)))
		} else {
			cand = sp.next(cand) // taken before (a gateway, a static address)
		}
		st.cursor = st2.cursor
	}
	return netip.Addr{}, fmt.Errorf("%s: gave up after %d claims lost to other hosts: %w", op, maxAddrAttempts, kvstore.ErrConflict)
}

// heldHere reports whether an endpoint of this host has address a of the
// pool (Config.Held).
func (d *Driver) heldHere(ref poolRef, a netip.Addr) bool {
	return d.cfg.Held != nil && d.cfg.Held(ref.id(), a)
}

// scatter is the window a host picks its next candidate from after losing
// streak claims in a row. Hosts that lost the same race then spread out
// instead of all trying the same next address again; the window grows with
// each further loss, up to maxScatter and to an eighth of the range. So a
// jump lands at most an eighth of a round ahead of the cursor, on
// addresses last handed out (and released) most of a round ago; the
// addresses jumped over are taken by the next hosts or in the next round.
func scatter(streak int, sp span) int {
	return max(1, min(8<<min(streak, 10), maxScatter, int(min(sp.size()/8, maxScatter))))
}

func spanName(ref poolRef) string {
	if ref.subPool.IsValid() {
		return "ip-range " + ref.subPool.String()
	}
	return ref.subnet.String()
}

// walkFree returns the first address from start on (wrapping) not in taken.
// It looks at no more than len(taken)+1 addresses.
func walkFree(sp span, start netip.Addr, taken map[netip.Addr]bool) (netip.Addr, bool) {
	a := start
	for {
		if !taken[a] {
			return a, true
		}
		a = sp.next(a)
		if a == start {
			return netip.Addr{}, false
		}
	}
}

// listTaken lists the pool's address records.
func (d *Driver) listTaken(ctx context.Context, op string, ref poolRef) (map[netip.Addr]bool, error) {
	dir := addrDir(ref.space, ref.subnet)
	pairs, err := d.store.List(ctx, dir)
	if err != nil {
		return nil, storeErr(op, err)
	}
	taken := make(map[netip.Addr]bool, len(pairs))
	for _, p := range pairs {
		if a, err := netip.ParseAddr(strings.TrimPrefix(p.Key, dir)); err == nil {
			taken[a] = true
		}
	}
	return taken, nil
}

// firstFree returns the first address of sp from start on that has no
// record, from one listing.
func (d *Driver) firstFree(ctx context.Context, op string, ref poolRef, sp span, start netip.Addr) (netip.Addr, error) {
	taken, err := d.listTaken(ctx, op, ref)
	if err != nil {
		return netip.Addr{}, err
	}
	a, ok := walkFree(sp, start, taken)
	if !ok {
		return netip.Addr{}, fmt.Errorf("%s: all addresses of %s are in use: %w", op, ref.subnet, ErrPoolExhausted)
	}
	return a, nil
}

// FreeAddress releases this host's hold on an address: Docker's
// ReleaseAddress, which names nothing but the pool and the address.
// Releasing an address that is free, or held by another host, changes
// nothing and succeeds. An endpoint address reclaimed by this host (a
// tombstone) is freed: this is the release it was waiting for. An endpoint
// address that Config.InUse reports in use is kept: the release is a stale
// one for an earlier holder.
func (d *Driver) FreeAddress(ctx context.Context, poolID string, a netip.Addr) error {
	ref, err := parsePoolID(poolID)
	if err != nil {
		return fmt.Errorf("release address %s: %w", a, err)
	}
	op := fmt.Sprintf("release address %s in pool %s", a, ref.id())
	if !ref.subnet.Contains(a) {
		return fmt.Errorf("%s: outside %s: %w", op, ref.subnet, ErrAddressOutOfRange)
	}
	key := addrKey(ref.space, ref.subnet, a)
	for attempt := 0; attempt < maxAttempts; attempt++ {
		pair, rec, err := d.getAddr(ctx, ref, a)
		if errors.Is(err, kvstore.ErrNotFound) {
			return nil
		}
		if err != nil {
			return storeErr(op, err)
		}
		var ops []kvstore.Op
		if !rec.shared() {
			if rec.Node != d.cfg.Node {
				d.log.Warn("release of an address held by another host ignored", "pool", ref.id(), "address", a, "holder", rec.Node)
				return nil
			}
			if !rec.tombstone() && d.cfg.InUse != nil && d.cfg.InUse(poolID, a) {
				d.log.Warn("release of an address an endpoint of this host still uses ignored (a stale release for an earlier holder)",
					"pool", ref.id(), "address", a, "endpoint", rec.Endpoint, "mac", rec.MAC)
				return nil
			}
			ops = []kvstore.Op{{Verb: kvstore.OpDeleteCAS, Key: key, Index: pair.ModifyIndex}}
		} else {
			n := rec.Holders[d.cfg.Node]
			if n > 0 && rec.Kind == kindGateway && d.cfg.Kept != nil {
				if kept := d.cfg.Kept(poolID, a); n-1 < kept {
					if d.deferRelease(kept, "gateway", poolID, a, func(ctx context.Context) error { return d.FreeAddress(ctx, poolID, a) }) {
						return nil
					}
					d.log.Warn("release of a gateway ignored: this host's networks with endpoints use it (a release sent again by a retried removal, or one a re-assertion counted out)",
						"pool", ref.id(), "address", a, "holds", n, "kept", kept)
					return nil
				}
			}
			switch {
			case n == 0:
				return nil
			case n > 1:
				rec.Holders[d.cfg.Node] = n - 1
				ops = []kvstore.Op{{Verb: kvstore.OpCAS, Key: key, Value: encode(rec), Index: pair.ModifyIndex}}
			case len(rec.Holders) > 1:
				delete(rec.Holders, d.cfg.Node)
				ops = []kvstore.Op{{Verb: kvstore.OpCAS, Key: key, Value: encode(rec), Index: pair.ModifyIndex}}
			default:
				ops = []kvstore.Op{{Verb: kvstore.OpDeleteCAS, Key: key, Index: pair.ModifyIndex}}
				if rec.Kind == kindGateway {
					// The last hold on the gateway: the pool forgets it.
					mpair, meta, err := d.readMeta(ctx, ref)
					if err != nil && !errors.Is(err, kvstore.ErrNotFound) {
						return storeErr(op, err)
					}
					if err == nil && meta.Gateway == a {
						meta.Gateway = netip.Addr{}
						ops = append(ops, kvstore.Op{Verb: kvstore.OpCAS, Key: metaKey(ref.space, ref.subnet), Value: encode(meta), Index: mpair.ModifyIndex})
					}
				}
			}
		}
		// Docker does not retry a failed release (it only logs it): after a
		// crash before the commit, Sweep reclaims an endpoint address, and
		// a shared hold goes with its pool.
		fault.Point("releaseaddress/before-commit")
		err = d.store.Txn(ctx, ops)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return storeErr(op, err)
		}
		fault.Point("releaseaddress/after-commit")
		d.log.Debug("address released", "pool", ref.id(), "address", a, "kind", rec.Kind, "tombstone", rec.tombstone())
		return nil
	}
	return fmt.Errorf("%s: gave up after %d concurrent updates: %w", op, maxAttempts, kvstore.ErrConflict)
}
