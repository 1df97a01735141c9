package cluster

import (
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"

	"consul-overlay/kvstore"
)

// TestPeerRecordCodec: every record comes back as written, whether its
// lines fit the compact form or not; Docker's endpoints take about 21
// bytes each (IPv4).
func TestPeerRecordCodec(t *testing.T) {
	docker := "4f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"
	eps := []Endpoint{
		{ID: docker, MAC: "02:42:0A:01:00:02", IPv4: "10.1.0.2/24", IPv6: "fd00::2/64"},
		{ID: "ep-1", MAC: "02:42:0a:01:00:03", IPv4: "10.1.0.3/24"},                            // not hex: kept whole
		{ID: strings.Repeat("ab", 32), MAC: "02:42:0a:01:00:04"},                               // no address
		{ID: strings.Repeat("cd", 32), MAC: "00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10"}, // not 6 bytes
		{ID: strings.Repeat("ef", 32), MAC: "02:42:0a:01:00:05", IPv6: "::ffff:10.1.0.5/64"},
		{ID: strings.Repeat("01", 32), MAC: "not a mac", IPv4: "10.1.0.6/24"},
	}
	r := PeerRecord{HostID: "id-a", Incarnation: "inc", VTEP: "192.0.2.1", Endpoints: []string{}}
	for _, ep := range eps {
		r = r.with(ep)
	}
	if !slices.Contains(r.Endpoints, "4f0a1b2c3d4e5f60 02:42:0a:01:00:02 10.1.0.2 fd00::2") {
		t.Fatalf("lines %q", r.Endpoints)
	}
	back, err := decodePeerRecord(encodePeerRecord(r))
	if err != nil || !back.equal(r) {
		t.Fatalf("decoded %+v, %v; want %+v", back, err, r)
	}
	if !r.lists(docker) || r.without(docker).lists(docker) || len(r.without(docker).Endpoints) != len(eps)-1 {
		t.Fatalf("lists/without by the full ID: %q", r.without(docker).Endpoints)
	}

	// Random records of Docker-like endpoints: exact, and compact.
	rng := rand.New(rand.NewPCG(1, 2))
	for range 50 {
		var list []Endpoint
		for range rng.IntN(40) {
			id := make([]byte, 32)
			for i := range id {
				id[i] = byte(rng.UintN(256))
			}
			ep := Endpoint{ID: hex.EncodeToString(id), MAC: "02:42:0a:01:" + hex.EncodeToString([]byte{byte(rng.UintN(256))}) + ":07", IPv4: "10.1.0." + strconv.Itoa(rng.IntN(250)+2) + "/24"}
			if rng.IntN(2) == 0 {
				ep.IPv6 = "fd00::" + strconv.Itoa(rng.IntN(9000)+2) + "/64"
			}
			list = append(list, ep)
		}
		r := recordOf("id-b", "inc", "192.0.2.2", append(list, Endpoint{ID: "x"}))
		v := encodePeerRecord(r)
		back, err := decodePeerRecord(v)
		if err != nil || !back.equal(r) {
			t.Fatalf("decoded %+v, %v; want %+v", back, err, r)
		}
		if max := 40 + 37*len(list); len(v) > max {
			t.Fatalf("%d endpoints took %d bytes, want at most %d", len(list), len(v), max)
		}
	}

	// A record an earlier version wrote (JSON, whole IDs) reads in
	// today's form; truncated or newer values are errors.
	old, err := kvstore.Encode(PeerRecord{HostID: "id-a", Incarnation: "inc", VTEP: "192.0.2.1", Endpoints: []string{docker + " 02:42:0A:01:00:02 10.1.0.2 fd00::2"}})
	if err != nil {
		t.Fatal(err)
	}
	if back, err := decodePeerRecord(old); err != nil || !back.equal(recordOf("id-a", "inc", "192.0.2.1", []Endpoint{{ID: docker, HostID: "id-a", Incarnation: "inc", MAC: "02:42:0a:01:00:02", IPv4: "10.1.0.2/24", IPv6: "fd00::2/64"}})) {
		t.Fatalf("earlier record read as %+v, %v", back, err)
	}
	v := encodePeerRecord(r)
	for i := range len(v) - 1 {
		if _, err := decodePeerRecord(v[:i]); err == nil {
			t.Fatalf("record cut at %d bytes decoded", i)
		}
	}
	newer := slices.Clone(v)
	newer[4] = 2
	if _, err := decodePeerRecord(newer); !errors.Is(err, kvstore.ErrSchema) {
		t.Fatalf("newer record: %v", err)
	}
}
