package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"consul-overlay/kvstore"
)

// deliveryFixture is a compact watch's snapshot of one network: the config
// and the peer records of hosts hosts of perHost endpoints each, as the
// hosts bench's network has them (issue 16, scale).
type deliveryFixture struct {
	key   string
	pairs []*kvstore.Pair
	recs  []PeerRecord
	index uint64
}

func newDeliveryFixture(tb testing.TB, hosts, perHost int) *deliveryFixture {
	tb.Helper()
	f := &deliveryFixture{key: "bench", index: 10}
	rec := Network{Key: f.key, Incarnation: "inc", VNI: 4097, Subnets: []string{"10.64.0.0/16"}, Hosts: map[string]Member{}}
	for h := range hosts {
		id := fmt.Sprintf("host%02d", h)
		rec.Hosts[id] = Member{Node: id, VTEP: fmt.Sprintf("192.168.%d.%d", h/200, h%200+1)}
	}
	cfg, err := kvstore.Encode(rec)
	if err != nil {
		tb.Fatal(err)
	}
	f.pairs = append(f.pairs, &kvstore.Pair{Key: configKey(f.key), Value: cfg, ModifyIndex: 1})
	for h := range hosts {
		id := fmt.Sprintf("host%02d", h)
		var eps []Endpoint
		for e := range perHost {
			// Addresses interleave across hosts, as IPAM hands them out.
			n := e*hosts + h + 2
			eps = append(eps, Endpoint{
				ID: fmt.Sprintf("%02x%062x", h, e), HostID: id, Incarnation: "inc",
				IPv4: fmt.Sprintf("10.64.%d.%d/16", n/256, n%256), MAC: fmt.Sprintf("02:42:0a:40:%02x:%02x", n/256, n%256),
			})
		}
		r := recordOf(id, "inc", rec.Hosts[id].VTEP, eps)
		f.recs = append(f.recs, r)
		f.index++
		f.pairs = append(f.pairs, &kvstore.Pair{Key: peerRecordKey(f.key, id), Value: encodePeerRecord(r), ModifyIndex: f.index})
	}
	return f
}

// change gives host h's record one endpoint more, or one less when it has
// it already.
func (f *deliveryFixture) change(h int) {
	r := f.recs[h]
	ep := Endpoint{ID: fmt.Sprintf("ff%062x", h), HostID: r.HostID, Incarnation: "inc", IPv4: fmt.Sprintf("10.64.250.%d/16", h+2), MAC: fmt.Sprintf("02:42:0a:40:fa:%02x", h+2)}
	if r.lists(ep.ID) {
		f.recs[h] = r.without(ep.ID)
	} else {
		f.recs[h] = r.with(ep)
	}
	f.index++
	f.pairs[h+1] = &kvstore.Pair{Key: f.pairs[h+1].Key, Value: encodePeerRecord(f.recs[h]), ModifyIndex: f.index}
}

// compactWatch is a PeerWatch of f's network on host00 that follows the
// peer records, fed by hand: Snapshot and Next never read the store.
func compactWatch(tb testing.TB, f *deliveryFixture) *PeerWatch {
	tb.Helper()
	s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: filepath.Join(tb.TempDir(), "state.db"), Prefix: "bench/"})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	c, err := New(Config{HostID: "host00", Node: "host00", VTEP: netip.MustParseAddr("192.168.0.1")}, s)
	if err != nil {
		tb.Fatal(err)
	}
	w := &PeerWatch{c: c, key: f.key, ctx: context.Background(), dec: newRecordCache(f.key), compact: true, audit: time.NewTimer(time.Hour)}
	tb.Cleanup(func() { w.audit.Stop() })
	return w
}

// BenchmarkCompactDelivery is one change of a compact peer watch at 50
// hosts of 20 endpoints: one host's peer record changed. list: the whole
// list derived and compared with the last delivery (Snapshot); delta:
// the entries that changed (Next).
func BenchmarkCompactDelivery(b *testing.B) {
	for _, mode := range []string{"list", "delta"} {
		b.Run(mode, func(b *testing.B) {
			f := newDeliveryFixture(b, 50, 20)
			w := compactWatch(b, f)
			if _, deliver, _ := w.Snapshot(f.pairs, true); !deliver {
				b.Fatal("no first delivery")
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				f.change(1 + i%49)
				var deliver bool
				if mode == "list" {
					_, deliver, _ = w.Snapshot(f.pairs, true)
				} else {
					deliver, _ = w.Next(f.pairs, true)
				}
				if !deliver {
					b.Fatal("a change delivered nothing")
				}
			}
		})
	}
}
