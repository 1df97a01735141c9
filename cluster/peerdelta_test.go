package cluster

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"testing"

	"consul-overlay/kvstore"
)

// TestPeerWatchDelta drives a compact peer watch through random changes of
// the peer records and the config (endpoints added and removed on several
// hosts at once, one entry given by two hosts' records, records rewritten
// unchanged, members joining and leaving) and checks after every snapshot
// that the deltas, applied one after the other to the entries of the first
// delivery, give exactly the entries of the whole list, which is the list
// a fresh watch derives from the same snapshot.
func TestPeerWatchDelta(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 16))
			f := newDeliveryFixture(t, 8, 4)
			w := compactWatch(t, f)
			model := map[dpEntry]bool{}
			// A shared entry: host02's VTEP is host01's (a host that came
			// back under a new identity), and both list one address.
			f.setVTEP(t, 2, f.recs[1].VTEP)
			for step := range 300 {
				switch n := rng.IntN(10); {
				case n == 0 && step > 0:
					f.toggleMember(t, 1+rng.IntN(7))
				case n == 1:
					// Rewritten unchanged: a new index, the same peers.
					h := 1 + rng.IntN(7)
					f.put(h)
				default:
					for range 1 + rng.IntN(3) {
						h := 1 + rng.IntN(7)
						f.flip(h, rng.IntN(6))
					}
				}
				deliver, done := w.Next(f.pairs, true)
				if done {
					t.Fatalf("step %d: watch ended", step)
				}
				d := w.Delta()
				if step == 0 && !deliver {
					t.Fatalf("step %d: no first delivery", step)
				}
				if step > 0 && deliver != (len(d.Removed)+len(d.Added) > 0) {
					t.Fatalf("step %d: deliver %v with %d removed and %d added", step, deliver, len(d.Removed), len(d.Added))
				}
				for _, p := range d.Removed {
					if !model[entryOf(p)] {
						t.Fatalf("step %d: removed %s %s %s, which was not there", step, p.IP, p.MAC, p.VTEP)
					}
					delete(model, entryOf(p))
				}
				for _, p := range d.Added {
					if model[entryOf(p)] {
						t.Fatalf("step %d: added %s %s %s, which was there", step, p.IP, p.MAC, p.VTEP)
					}
					model[entryOf(p)] = true
				}
				fresh, ok, why := newRecordCache(f.key).peers("host00", f.pairs, true)
				if !ok {
					t.Fatalf("step %d: %s", step, why)
				}
				got := w.Peers()
				if !slices.EqualFunc(got, fresh, samePeer) {
					t.Fatalf("step %d: Peers() has %d peers, a fresh watch %d", step, len(got), len(fresh))
				}
				want := map[dpEntry]bool{}
				vteps := map[netip.Addr]bool{}
				for _, p := range fresh {
					want[entryOf(p)] = true
					vteps[p.VTEP] = true
				}
				if len(want) != len(model) {
					t.Fatalf("step %d: the deltas give %d entries, the list %d", step, len(model), len(want))
				}
				for e := range want {
					if !model[e] {
						t.Fatalf("step %d: entry %s %s %s of the list missing from the deltas'", step, e.ip, net.HardwareAddr(e.mac), e.vtep)
					}
				}
				if got := w.VTEPs(); len(got) != len(vteps) {
					t.Fatalf("step %d: VTEPs %v, want %v", step, got, vteps)
				}
			}
		})
	}
}

// flip adds endpoint i of host h to its record, or removes it. Endpoint 0
// of hosts 1 and 2 is one entry (same address, MAC and VTEP).
func (f *deliveryFixture) flip(h, i int) {
	r := f.recs[h]
	host := h
	if i == 0 && h == 2 {
		host = 1
	}
	ep := Endpoint{ID: fmt.Sprintf("ee%02x%060x", h, i), HostID: r.HostID, Incarnation: "inc", IPv4: fmt.Sprintf("10.64.200.%d/16", host*8+i), MAC: fmt.Sprintf("02:42:0a:40:c8:%02x", host*8+i)}
	if r.lists(ep.ID) {
		f.recs[h] = r.without(ep.ID)
	} else {
		f.recs[h] = r.with(ep)
	}
	f.put(h)
}

// put writes host h's record at a new index.
func (f *deliveryFixture) put(h int) {
	f.index++
	f.pairs[h+1] = &kvstore.Pair{Key: f.pairs[h+1].Key, Value: encodePeerRecord(f.recs[h]), ModifyIndex: f.index}
}

func (f *deliveryFixture) setVTEP(t *testing.T, h int, vtep string) {
	f.recs[h].VTEP = vtep
	f.put(h)
	f.updateConfig(t, func(rec *Network) {
		m := rec.Hosts[f.recs[h].HostID]
		m.VTEP = vtep
		rec.Hosts[f.recs[h].HostID] = m
	})
}

// toggleMember removes host h from the config's members, or adds it back.
func (f *deliveryFixture) toggleMember(t *testing.T, h int) {
	id := f.recs[h].HostID
	f.updateConfig(t, func(rec *Network) {
		if _, ok := rec.Hosts[id]; ok {
			delete(rec.Hosts, id)
		} else {
			rec.Hosts[id] = Member{Node: id, VTEP: f.recs[h].VTEP}
		}
	})
}

func (f *deliveryFixture) updateConfig(t *testing.T, fn func(*Network)) {
	t.Helper()
	var rec Network
	if err := kvstore.Decode(f.pairs[0].Value, &rec); err != nil {
		t.Fatal(err)
	}
	fn(&rec)
	b, err := kvstore.Encode(rec)
	if err != nil {
		t.Fatal(err)
	}
	f.index++
	f.pairs[0] = &kvstore.Pair{Key: f.pairs[0].Key, Value: b, ModifyIndex: f.index}
}
