package ipam

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Key layout (relative to the store's prefix; see doc.go):
//
//	ipam/<space>/index/v4|v6           poolIndex: every pool of the family
//	ipam/<space>/pool/<net>_<bits>/meta  poolRecord: holders, sub-range, gateway
//	ipam/<space>/pool/<net>_<bits>/next  cursor: the last address handed out
//	ipam/<space>/addr/<net>_<bits>/<ip>  addrRecord: one per allocated address
const keyRoot = "ipam/"

func familyName(v6 bool) string {
	if v6 {
		return "v6"
	}
	return "v4"
}

func indexKey(space string, v6 bool) string {
	return keyRoot + space + "/index/" + familyName(v6)
}

func subnetPart(subnet netip.Prefix) string {
	return subnet.Addr().String() + "_" + strconv.Itoa(subnet.Bits())
}

func poolDir(space string, subnet netip.Prefix) string {
	return keyRoot + space + "/pool/" + subnetPart(subnet) + "/"
}

func metaKey(space string, subnet netip.Prefix) string { return poolDir(space, subnet) + "meta" }
func nextKey(space string, subnet netip.Prefix) string { return poolDir(space, subnet) + "next" }

func addrDir(space string, subnet netip.Prefix) string {
	return keyRoot + space + "/addr/" + subnetPart(subnet) + "/"
}

func addrKey(space string, subnet netip.Prefix, a netip.Addr) string {
	return addrDir(space, subnet) + a.String()
}

// poolIndex lists every pool of one address space and family. It is the
// single CAS-guarded key through which pools are created and removed, which
// makes overlap detection race-free.
type poolIndex struct {
	Pools []indexEntry `json:"pools"`
}

type indexEntry struct {
	Subnet  netip.Prefix `json:"subnet"`
	SubPool netip.Prefix `json:"subPool,omitzero"`
	// Node created the pool; named in overlap errors.
	Node string `json:"node"`
	Auto bool   `json:"auto,omitempty"`
}

// poolRecord is a pool's state. Holders counts, per node, how many
// RequestPool calls are not yet released; no holders left means the pool is
// being removed.
type poolRecord struct {
	Subnet  netip.Prefix   `json:"subnet"`
	SubPool netip.Prefix   `json:"subPool,omitzero"`
	Auto    bool           `json:"auto,omitempty"`
	Holders map[string]int `json:"holders,omitempty"`
	// Gateway is the network's gateway while some host holds it, so that
	// every host asking for "the gateway" gets the same address.
	Gateway netip.Addr `json:"gateway,omitzero"`
	// HeldAt is, per node, when its last hold was taken. SweepPools drops
	// a node's surplus holds only when this is older than the grace
	// period, so a pool requested for a network being created is never
	// taken for a leak. Records written before this field existed have
	// none; their holds count from the driver's start.
	HeldAt map[string]time.Time `json:"heldAt,omitempty"`
}

// touch records that node took a hold at t.
func (r *poolRecord) touch(node string, t time.Time) {
	if r.HeldAt == nil {
		r.HeldAt = map[string]time.Time{}
	}
	r.HeldAt[node] = t
}

// Kinds of address records.
const (
	// kindEndpoint: a container's address, exclusive to one node.
	kindEndpoint = "endpoint"
	// kindGateway: the network's gateway, shared by every host holding it.
	kindGateway = "gateway"
	// kindReserved: an explicit address asked for without endpoint identity
	// (an --aux-address), shared by every host holding it.
	kindReserved = "reserved"
)

// addrRecord is one allocated address.
type addrRecord struct {
	Kind string `json:"kind"`
	// Node holds an endpoint address.
	Node     string `json:"node,omitempty"`
	Endpoint string `json:"endpoint,omitempty"`
	MAC      string `json:"mac,omitempty"`
	// Holders counts holds per node of a shared (gateway, reserved) address.
	Holders map[string]int `json:"holders,omitempty"`
	// At is when the record was created (the allocation). Records written
	// before this field existed have none; Sweep then counts their age
	// from the driver's start.
	At time.Time `json:"at,omitzero"`
	// Reclaimed, set on an endpoint record, makes it a tombstone: the
	// address was reclaimed by this host (ReclaimAddress, or Sweep for an
	// orphan) and waits for Docker's own ReleaseAddress, which consumes it.
	// A tombstone keeps the address out of allocation; Sweep frees it once
	// it is older than Config.Grace.
	Reclaimed time.Time `json:"reclaimed,omitzero"`
}

func (r *addrRecord) shared() bool { return r.Kind == kindGateway || r.Kind == kindReserved }

// tombstone reports whether r is a reclaimed endpoint address awaiting
// Docker's release.
func (r *addrRecord) tombstone() bool { return !r.shared() && !r.Reclaimed.IsZero() }

// holderNames returns the holders of r for messages.
func (r *addrRecord) holderNames() string {
	if !r.shared() {
		s := "host " + strconv.Quote(r.Node)
		if r.Endpoint != "" {
			s += " endpoint " + strconv.Quote(r.Endpoint)
		}
		if r.tombstone() {
			s += " (reclaimed at " + r.Reclaimed.UTC().Format(time.RFC3339) + ", awaiting Docker's release)"
		}
		return s
	}
	return "hosts " + nodeList(r.Holders)
}

func nodeList(h map[string]int) string {
	names := make([]string, 0, len(h))
	for n := range h {
		names = append(names, strconv.Quote(n))
	}
	slices.Sort(names)
	return strings.Join(names, ",")
}

func encode(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own plain structs are encoded.
		panic(fmt.Sprintf("ipam: encode %T: %v", v, err))
	}
	return b
}

func decode(key string, b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decode %s: %w", key, err)
	}
	return nil
}

// PoolID formats the pool ID Docker keeps: "<space>/<subnet>" or
// "<space>/<subnet>/<sub-range>". It is deterministic, so every host gets
// the same ID for the same subnet, and self-describing, so it stays valid
// across plugin restarts.
func PoolID(space string, subnet, sub netip.Prefix) string {
	id := space + "/" + subnet.String()
	if sub.IsValid() {
		id += "/" + sub.String()
	}
	return id
}

// ParsePoolID splits a pool ID made by PoolID into its address space,
// subnet and sub-range (zero if none). A malformed ID is ErrInvalidRequest.
func ParsePoolID(id string) (space string, subnet, subPool netip.Prefix, err error) {
	ref, err := parsePoolID(id)
	if err != nil {
		return "", netip.Prefix{}, netip.Prefix{}, err
	}
	return ref.space, ref.subnet, ref.subPool, nil
}

type poolRef struct {
	space   string
	subnet  netip.Prefix
	subPool netip.Prefix
}

func (r poolRef) id() string { return PoolID(r.space, r.subnet, r.subPool) }
func (r poolRef) v6() bool   { return r.subnet.Addr().Is6() }

// parsePoolID parses and validates a pool ID made by PoolID.
func parsePoolID(id string) (poolRef, error) {
	bad := func(why string) (poolRef, error) {
		return poolRef{}, fmt.Errorf("pool ID %q: %s: %w", id, why, ErrInvalidRequest)
	}
	parts := strings.Split(id, "/")
	if len(parts) != 3 && len(parts) != 5 {
		return bad("want <address space>/<subnet>[/<sub-range>]")
	}
	ref := poolRef{space: parts[0]}
	if !knownSpace(ref.space) {
		return bad("unknown address space")
	}
	p, err := netip.ParsePrefix(parts[1] + "/" + parts[2])
	if err != nil || p != p.Masked() || p.Addr().Is4In6() {
		return bad("malformed subnet")
	}
	ref.subnet = p
	if len(parts) == 5 {
		s, err := netip.ParsePrefix(parts[3] + "/" + parts[4])
		if err != nil || s != s.Masked() || s == p || s.Bits() < p.Bits() || !p.Contains(s.Addr()) {
			return bad("malformed sub-range")
		}
		ref.subPool = s
	}
	if ref.id() != id {
		return bad("not in canonical form")
	}
	return ref, nil
}

func knownSpace(s string) bool { return s == LocalAddressSpace || s == GlobalAddressSpace }
