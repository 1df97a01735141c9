package driver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"consul-overlay/kvstore"
)

// maxCASAttempts bounds the compare-and-set retries of one request.
const maxCASAttempts = 32

// subnetKey reserves a subnet for one logical network, so two networks can
// never claim the same subnet even when hosts race.
func subnetKey(p netip.Prefix) string {
	return "subnets/" + strings.NewReplacer("/", "_", ":", "-").Replace(p.Masked().String())
}

// joinLogical adds this host to the logical network key, creating the
// network (with a VNI and subnet reservations) if no host has it yet. It
// refuses a request that disagrees with the recorded network.
func (d *Driver) joinLogical(ctx context.Context, networkID, key string, o *networkOptions) (networkRecord, error) {
	member := hostMember{NetworkID: networkID, VTEP: d.cfg.VTEP.String(), Since: time.Now().UTC()}
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		if err := ctx.Err(); err != nil {
			return networkRecord{}, err
		}
		pair, err := d.store.Get(ctx, configKey(key))
		if errors.Is(err, kvstore.ErrNotFound) {
			rec, err := d.createLogical(ctx, key, o, member)
			if errors.Is(err, kvstore.ErrConflict) {
				continue // another host created it, or took the VNI: look again
			}
			return rec, err
		}
		if err != nil {
			return networkRecord{}, fmt.Errorf("read logical network %q: %w", key, err)
		}
		var rec networkRecord
		if err := kvstore.Decode(pair.Value, &rec); err != nil {
			return networkRecord{}, fmt.Errorf("logical network %q: %w", key, err)
		}
		if err := checkCompatible(&rec, o, d.cfg.Node); err != nil {
			return networkRecord{}, err
		}
		if m, ok := rec.Hosts[d.cfg.Node]; ok && m.NetworkID == networkID {
			return rec, nil // replayed request
		} else if ok {
			d.log.Warn("taking over a stale membership of this host", "logical", key, "old_network", short(m.NetworkID), "network", short(networkID))
		}
		if rec.Hosts == nil {
			rec.Hosts = map[string]hostMember{}
		}
		rec.Hosts[d.cfg.Node] = member
		val, err := kvstore.Encode(rec)
		if err != nil {
			return networkRecord{}, err
		}
		err = d.store.CAS(ctx, configKey(key), val, pair.ModifyIndex)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return networkRecord{}, fmt.Errorf("join logical network %s: %w", rec.label(), err)
		}
		return rec, nil
	}
	return networkRecord{}, fmt.Errorf("join logical network %q: gave up after %d concurrent updates", key, maxCASAttempts)
}

// checkCompatible refuses a host whose request disagrees with the network
// other hosts already share: the error says what differs and what to do.
func checkCompatible(rec *networkRecord, o *networkOptions, node string) error {
	want := prefixStrings(o.subnets)
	if !sameSubnets(rec.Subnets, want) {
		return fmt.Errorf("logical network %s already exists with subnet %s (hosts: %s); this host asked for %s: use the same --subnet, or another -o name",
			rec.label(), strings.Join(rec.Subnets, ", "), rec.hostNames(), strings.Join(want, ", "))
	}
	if o.vni != 0 && o.vni != rec.VNI {
		return fmt.Errorf("logical network %s uses vni %d; this host asked for vni %d: drop -o vni or use %d", rec.label(), rec.VNI, o.vni, rec.VNI)
	}
	if o.mtu != rec.MTU {
		have := "derived from the underlay"
		if rec.MTU != 0 {
			have = strconv.Itoa(rec.MTU)
		}
		asked := "none"
		if o.mtu != 0 {
			asked = strconv.Itoa(o.mtu)
		}
		return fmt.Errorf("logical network %s has mtu %s; this host asked for %s: every host must use the same -o mtu", rec.label(), have, asked)
	}
	return nil
}

// createLogical creates a new logical network: the config, its VNI and its
// subnet reservations in one transaction. ErrConflict means another host
// won a race; the caller looks again.
func (d *Driver) createLogical(ctx context.Context, key string, o *networkOptions, member hostMember) (networkRecord, error) {
	rec := networkRecord{
		Key: key, Name: o.name, MTU: o.mtu, Internal: o.internal,
		Subnets: prefixStrings(o.subnets), Spaces: o.spaces, Options: o.generic,
		Hosts: map[string]hostMember{d.cfg.Node: member}, Created: time.Now().UTC(),
	}
	for _, g := range o.gateways {
		rec.Gateways = append(rec.Gateways, g.String())
	}
	if err := d.checkSubnetsFree(ctx, key, o.subnets); err != nil {
		return rec, err
	}
	vni := o.vni
	if vni != 0 {
		if owner, err := d.vniOwner(ctx, vni); err != nil {
			return rec, err
		} else if owner != "" && owner != key {
			return rec, fmt.Errorf("vni %d is taken by logical network %q: choose another -o vni or leave it out", vni, owner)
		}
	} else {
		var err error
		if vni, err = d.freeVNI(ctx); err != nil {
			return rec, err
		}
	}
	rec.VNI = vni
	val, err := kvstore.Encode(rec)
	if err != nil {
		return rec, err
	}
	vval, err := kvstore.Encode(vniRecord{Key: key})
	if err != nil {
		return rec, err
	}
	ops := []kvstore.Op{
		{Verb: kvstore.OpCreate, Key: configKey(key), Value: val},
		{Verb: kvstore.OpCreate, Key: vniKey(vni), Value: vval},
	}
	for _, s := range o.subnets {
		ops = append(ops, kvstore.Op{Verb: kvstore.OpCreate, Key: subnetKey(s), Value: vval})
	}
	if err := d.store.Txn(ctx, ops); err != nil {
		if errors.Is(err, kvstore.ErrConflict) {
			return rec, err
		}
		return rec, fmt.Errorf("create logical network %s: %w", rec.label(), err)
	}
	d.log.Info("logical network created", "logical", key, "vni", vni, "subnets", rec.Subnets)
	return rec, nil
}

// checkSubnetsFree refuses subnets that overlap another logical network's.
func (d *Driver) checkSubnetsFree(ctx context.Context, key string, subnets []netip.Prefix) error {
	pairs, err := d.store.List(ctx, "networks/")
	if err != nil {
		return fmt.Errorf("list logical networks: %w", err)
	}
	for _, p := range pairs {
		if !strings.HasSuffix(p.Key, "/config") {
			continue
		}
		var other networkRecord
		if err := kvstore.Decode(p.Value, &other); err != nil {
			d.log.Warn("skip unreadable network record", "key", p.Key, "error", err)
			continue
		}
		if other.Key == key {
			continue
		}
		for _, os := range other.Subnets {
			op, err := netip.ParsePrefix(os)
			if err != nil {
				continue
			}
			for _, s := range subnets {
				if s.Overlaps(op) {
					return fmt.Errorf("subnet %s overlaps subnet %s of logical network %s (hosts: %s): choose another --subnet, or use -o name=%s to join that network",
						s, op, other.label(), other.hostNames(), other.Name)
				}
			}
		}
	}
	// A reservation without a config is a network being created or torn
	// down right now by another host.
	for _, s := range subnets {
		p, err := d.store.Get(ctx, subnetKey(s))
		if errors.Is(err, kvstore.ErrNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read subnet reservation %s: %w", s, err)
		}
		var v vniRecord
		if kvstore.Decode(p.Value, &v) == nil && v.Key != key {
			return fmt.Errorf("subnet %s is reserved by logical network %q: choose another --subnet", s, v.Key)
		}
	}
	return nil
}

func (d *Driver) vniOwner(ctx context.Context, vni uint32) (string, error) {
	p, err := d.store.Get(ctx, vniKey(vni))
	if errors.Is(err, kvstore.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read vni %d: %w", vni, err)
	}
	var v vniRecord
	if err := kvstore.Decode(p.Value, &v); err != nil {
		return "", fmt.Errorf("vni %d: %w", vni, err)
	}
	return v.Key, nil
}

// freeVNI picks the lowest unreserved VNI from VNIStart. The caller claims
// it with a create-only write, so a race costs a retry, never a duplicate.
func (d *Driver) freeVNI(ctx context.Context) (uint32, error) {
	pairs, err := d.store.List(ctx, "vnis/")
	if err != nil {
		return 0, fmt.Errorf("list reserved vnis: %w", err)
	}
	used := make(map[uint32]bool, len(pairs))
	for _, p := range pairs {
		n, err := strconv.ParseUint(strings.TrimPrefix(p.Key, "vnis/"), 10, 32)
		if err == nil {
			used[uint32(n)] = true
		}
	}
	for v := d.cfg.VNIStart; v <= maxVNI; v++ {
		if !used[v] {
			return v, nil
		}
	}
	return 0, errors.New("no free vni left")
}

// leaveLogical removes this host's membership (for Docker network
// networkID) from logical network key. The last host to leave removes the
// network: its config, VNI, subnet reservations and endpoint records.
func (d *Driver) leaveLogical(ctx context.Context, key, networkID string) error {
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		pair, err := d.store.Get(ctx, configKey(key))
		if errors.Is(err, kvstore.ErrNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read logical network %q: %w", key, err)
		}
		var rec networkRecord
		if err := kvstore.Decode(pair.Value, &rec); err != nil {
			return fmt.Errorf("logical network %q: %w", key, err)
		}
		if m, ok := rec.Hosts[d.cfg.Node]; !ok || m.NetworkID != networkID {
			return nil
		}
		delete(rec.Hosts, d.cfg.Node)
		if len(rec.Hosts) > 0 {
			val, err := kvstore.Encode(rec)
			if err != nil {
				return err
			}
			err = d.store.CAS(ctx, configKey(key), val, pair.ModifyIndex)
			if errors.Is(err, kvstore.ErrConflict) {
				continue
			}
			if err != nil {
				return fmt.Errorf("leave logical network %s: %w", rec.label(), err)
			}
			return d.deleteNodeEndpoints(ctx, key)
		}
		ops := []kvstore.Op{
			{Verb: kvstore.OpDeleteCAS, Key: configKey(key), Index: pair.ModifyIndex},
			{Verb: kvstore.OpDelete, Key: vniKey(rec.VNI)},
		}
		for _, s := range rec.Subnets {
			if p, err := netip.ParsePrefix(s); err == nil {
				ops = append(ops, kvstore.Op{Verb: kvstore.OpDelete, Key: subnetKey(p)})
			}
		}
		err = d.store.Txn(ctx, ops)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return fmt.Errorf("remove logical network %s: %w", rec.label(), err)
		}
		// No host is left: every endpoint record of the network is stale.
		eps, err := d.store.List(ctx, endpointsPrefix(key))
		if err != nil {
			return fmt.Errorf("list endpoints of removed network %s: %w", rec.label(), err)
		}
		for _, p := range eps {
			if err := d.store.Delete(ctx, p.Key); err != nil {
				return fmt.Errorf("remove endpoint record %q: %w", p.Key, err)
			}
		}
		d.log.Info("logical network removed", "logical", key, "vni", rec.VNI)
		return nil
	}
	return fmt.Errorf("leave logical network %q: gave up after %d concurrent updates", key, maxCASAttempts)
}

// deleteNodeEndpoints removes this node's endpoint records of a network
// it left (normally none: Docker deletes endpoints first).
func (d *Driver) deleteNodeEndpoints(ctx context.Context, key string) error {
	eps, err := d.store.List(ctx, endpointsPrefix(key))
	if err != nil {
		return fmt.Errorf("list endpoints of %q: %w", key, err)
	}
	for _, p := range eps {
		var ep endpointRecord
		if kvstore.Decode(p.Value, &ep) != nil || ep.Node != d.cfg.Node {
			continue
		}
		if err := d.store.Delete(ctx, p.Key); err != nil {
			return fmt.Errorf("remove endpoint record %q: %w", p.Key, err)
		}
	}
	return nil
}
