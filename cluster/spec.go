package cluster

// Cluster-wide network definitions ("specs"): a network created once, on
// any host, exists on every host. The spec is the Docker side of such a
// network (its name, driver options, IPAM configuration, flags and
// labels), keyed by the Docker network name at specs/<name>; the logical
// network it maps to (networks/<key>/config) is the data plane side and
// is created by each host's driver as usual, when that host's engine
// creates the network from the spec.
//
// Lifecycle, every step a compare-and-set:
//   - PublishSpec creates specs/<name> create-only; a live spec with the
//     same settings is the same network (idempotent), one with other
//     settings is ErrSpecConflict and the caller must take the recorded
//     one; a retired spec is replaced by a new incarnation (the name was
//     created again);
//   - RetireSpec marks a live incarnation retired (a user removed the
//     network on some host): no host creates it any more, hosts remove it
//     where no container uses it;
//   - DeleteSpecIfUnheld deletes a retired spec in a transaction that
//     checks that its logical network's config is gone, so the record
//     goes with the last host that let go of the network.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"consul-overlay/kvstore"
)

// SpecsPrefix is the key prefix of the cluster-wide network definitions.
const SpecsPrefix = "specs/"

// ErrSpecConflict: a live spec of that name exists with other settings.
var ErrSpecConflict = errors.New("a network of that name exists in the cluster with other settings")

// maxSpecConflicts bounds the conflicts a spec remembers.
const maxSpecConflicts = 8

// Spec is a cluster-wide network definition, stored at specs/<name>.
type Spec struct {
	// Name is the Docker network name: the cluster-wide key.
	Name string `json:"name"`
	// Incarnation is random, new each time the name is (re)published
	// after a retirement.
	Incarnation string `json:"incarnation"`
	// Key is the logical network the name maps to (networks/<key>).
	Key string `json:"key"`
	// Options are the driver options (-o), verbatim.
	Options map[string]string `json:"options,omitempty"`
	// IPAMSelf says the IPAM driver is consul-overlay itself (each host
	// uses the name its plugin is installed under); else IPAMDriver
	// names it.
	IPAMSelf    bool              `json:"ipam_self,omitempty"`
	IPAMDriver  string            `json:"ipam_driver,omitempty"`
	IPAMOptions map[string]string `json:"ipam_options,omitempty"`
	IPAM        []IPAMConfig      `json:"ipam"`
	Internal    bool              `json:"internal,omitempty"`
	Attachable  bool              `json:"attachable,omitempty"`
	IPv6        bool              `json:"ipv6,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	// Origin is the host that published this incarnation.
	Origin     string    `json:"origin"`
	OriginNode string    `json:"origin_node,omitempty"`
	Created    time.Time `json:"created"`
	// Retired is set when a user removed the network on a host: it is
	// offered to no host any more and goes once no host holds it.
	Retired   bool      `json:"retired,omitempty"`
	RetiredBy string    `json:"retired_by,omitempty"` // node name
	RetiredAt time.Time `json:"retired_at,omitempty"`
	// Conflicts are hosts that created the name with other settings and
	// were made to take these ones (the last few).
	Conflicts []SpecConflict `json:"conflicts,omitempty"`
}

// IPAMConfig is one IPAM configuration entry, as Docker reports it.
type IPAMConfig struct {
	Subnet  string            `json:"subnet"`
	IPRange string            `json:"ip_range,omitempty"`
	Gateway string            `json:"gateway,omitempty"`
	Aux     map[string]string `json:"aux,omitempty"`
}

// SpecConflict is one losing create of a spec's name.
type SpecConflict struct {
	HostID   string    `json:"host_id"`
	Node     string    `json:"node"`
	Settings string    `json:"settings"` // what that host had created
	Outcome  string    `json:"outcome"`  // what was done about it
	At       time.Time `json:"at"`
}

// SpecPair is a spec with the modify index it was read at.
type SpecPair struct {
	Spec  Spec
	Index uint64
}

// dockerNameRE is the Docker network names the store can key (Docker's
// own rule for names, bounded).
var dockerNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// ValidSpecName reports whether name can be a cluster-wide network name.
func ValidSpecName(name string) bool { return dockerNameRE.MatchString(name) }

func specKey(name string) string { return SpecsPrefix + name }

// SpecKey computes the logical network key of a spec: its first IPv4
// subnet, else its first subnet, as the driver keys a network without
// -o name.
func SpecKey(ipam []IPAMConfig) (string, error) {
	var v4, v6 []netip.Prefix
	for _, c := range ipam {
		p, err := netip.ParsePrefix(c.Subnet)
		if err != nil {
			return "", fmt.Errorf("subnet %q: %w", c.Subnet, err)
		}
		if p.Addr().Is4() {
			v4 = append(v4, p.Masked())
		} else {
			v6 = append(v6, p.Masked())
		}
	}
	return Key("", append(v4, v6...))
}

// SameSettings reports whether two specs describe the same network: the
// same options, IPAM (a gateway missing on one side matches any),
// flags and labels.
func SameSettings(a, b Spec) bool {
	return specDiff(a, b) == ""
}

// specDiff says how b differs from a ("" when the same).
func specDiff(a, b Spec) string {
	var d []string
	if !maps.Equal(nonNil(a.Options), nonNil(b.Options)) {
		d = append(d, "options")
	}
	if a.IPAMSelf != b.IPAMSelf || a.IPAMDriver != b.IPAMDriver || !maps.Equal(nonNil(a.IPAMOptions), nonNil(b.IPAMOptions)) {
		d = append(d, "ipam driver")
	}
	if !sameIPAM(a.IPAM, b.IPAM) {
		d = append(d, "ipam config")
	}
	if a.Internal != b.Internal {
		d = append(d, "internal")
	}
	if a.Attachable != b.Attachable {
		d = append(d, "attachable")
	}
	if a.IPv6 != b.IPv6 {
		d = append(d, "ipv6")
	}
	if !maps.Equal(nonNil(a.Labels), nonNil(b.Labels)) {
		d = append(d, "labels")
	}
	return strings.Join(d, ", ")
}

func nonNil(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

func sameIPAM(a, b []IPAMConfig) bool {
	if len(a) != len(b) {
		return false
	}
	as, bs := sortedIPAM(a), sortedIPAM(b)
	for i := range as {
		x, y := as[i], bs[i]
		if x.Subnet != y.Subnet || x.IPRange != y.IPRange || !maps.Equal(nonNil(x.Aux), nonNil(y.Aux)) {
			return false
		}
		if x.Gateway != "" && y.Gateway != "" && x.Gateway != y.Gateway {
			return false
		}
	}
	return true
}

func sortedIPAM(c []IPAMConfig) []IPAMConfig {
	out := slices.Clone(c)
	sort.Slice(out, func(i, j int) bool { return out[i].Subnet < out[j].Subnet })
	return out
}

// Settings summarises a spec's settings for messages.
func (s Spec) Settings() string {
	var b strings.Builder
	for i, c := range sortedIPAM(s.IPAM) {
		if i > 0 {
			b.WriteString(" ")
		}
		b.WriteString("subnet=" + c.Subnet)
		if c.Gateway != "" {
			b.WriteString(" gateway=" + c.Gateway)
		}
		if c.IPRange != "" {
			b.WriteString(" ip-range=" + c.IPRange)
		}
		for _, k := range sortedMapKeys(c.Aux) {
			b.WriteString(" aux-address=" + k + "=" + c.Aux[k])
		}
	}
	for _, k := range sortedMapKeys(s.Options) {
		b.WriteString(" -o " + k + "=" + s.Options[k])
	}
	if s.Internal {
		b.WriteString(" internal")
	}
	if s.Attachable {
		b.WriteString(" attachable")
	}
	if s.IPv6 {
		b.WriteString(" ipv6")
	}
	if !s.IPAMSelf && s.IPAMDriver != "" {
		b.WriteString(" ipam-driver=" + s.IPAMDriver)
	}
	if len(s.Labels) > 0 {
		fmt.Fprintf(&b, " labels=%d", len(s.Labels))
	}
	return strings.TrimSpace(b.String())
}

func sortedMapKeys(m map[string]string) []string {
	return slices.Sorted(maps.Keys(m))
}

// ListSpecs reads every spec.
func ListSpecs(ctx context.Context, store kvstore.Store) ([]SpecPair, error) {
	pairs, err := store.List(ctx, SpecsPrefix)
	if err != nil {
		return nil, fmt.Errorf("list cluster-wide networks: %w", err)
	}
	return DecodeSpecs(pairs)
}

// DecodeSpecs decodes the pairs of a list or watch of SpecsPrefix; an
// undecodable record is an error naming it.
func DecodeSpecs(pairs []*kvstore.Pair) ([]SpecPair, error) {
	out := make([]SpecPair, 0, len(pairs))
	var errs []error
	for _, p := range pairs {
		var s Spec
		if err := kvstore.Decode(p.Value, &s); err != nil {
			errs = append(errs, fmt.Errorf("cluster-wide network %q: %w", strings.TrimPrefix(p.Key, SpecsPrefix), err))
			continue
		}
		out = append(out, SpecPair{Spec: s, Index: p.ModifyIndex})
	}
	return out, errors.Join(errs...)
}

// GetSpec reads one spec; a missing one is kvstore.ErrNotFound.
func GetSpec(ctx context.Context, store kvstore.Store, name string) (SpecPair, error) {
	p, err := store.Get(ctx, specKey(name))
	if err != nil {
		return SpecPair{}, fmt.Errorf("read cluster-wide network %q: %w", name, err)
	}
	var s Spec
	if err := kvstore.Decode(p.Value, &s); err != nil {
		return SpecPair{}, fmt.Errorf("cluster-wide network %q: %w", name, err)
	}
	return SpecPair{Spec: s, Index: p.ModifyIndex}, nil
}

// PublishSpec records s as the cluster-wide network s.Name. It returns the
// spec in force afterwards: s itself (with a new incarnation) when it was
// created or replaced a retired one; the recorded one when that has the
// same settings; the recorded one and ErrSpecConflict when that differs.
func PublishSpec(ctx context.Context, store kvstore.Store, s Spec) (SpecPair, error) {
	if !ValidSpecName(s.Name) {
		return SpecPair{}, fmt.Errorf("publish cluster-wide network %q: not a name the cluster can key", s.Name)
	}
	if s.Key == "" {
		k, err := SpecKey(s.IPAM)
		if err != nil {
			return SpecPair{}, fmt.Errorf("publish cluster-wide network %q: %w", s.Name, err)
		}
		s.Key = k
	}
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		if err := ctx.Err(); err != nil {
			return SpecPair{}, err
		}
		cur, err := GetSpec(ctx, store, s.Name)
		var index uint64
		switch {
		case errors.Is(err, kvstore.ErrNotFound):
		case err != nil:
			return SpecPair{}, err
		case !cur.Spec.Retired:
			if d := specDiff(cur.Spec, s); d != "" {
				return cur, fmt.Errorf("network %q: the cluster has it as %q (from %s), this host as %q (%s differ): %w",
					s.Name, cur.Spec.Settings(), cur.Spec.OriginNode, s.Settings(), d, ErrSpecConflict)
			}
			return cur, nil
		default:
			index = cur.Index // created again after a retirement
		}
		n := s
		n.Incarnation = newIncarnation()
		n.Retired, n.RetiredBy, n.RetiredAt, n.Conflicts = false, "", time.Time{}, nil
		if n.Created.IsZero() {
			n.Created = time.Now().UTC()
		}
		val, err := kvstore.Encode(n)
		if err != nil {
			return SpecPair{}, err
		}
		err = store.CAS(ctx, specKey(s.Name), val, index)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return SpecPair{}, fmt.Errorf("publish cluster-wide network %q: %w", s.Name, err)
		}
		got, err := GetSpec(ctx, store, s.Name)
		if err != nil {
			return SpecPair{Spec: n}, nil
		}
		return got, nil
	}
	return SpecPair{}, fmt.Errorf("publish cluster-wide network %q: gave up after %d concurrent updates", s.Name, maxCASAttempts)
}

// RetireSpec marks incarnation of name retired by node. A spec already
// retired, missing, or of another incarnation is left alone (false).
func RetireSpec(ctx context.Context, store kvstore.Store, name, incarnation, node string) (bool, error) {
	return updateSpec(ctx, store, name, func(s *Spec) bool {
		if s.Retired || s.Incarnation != incarnation {
			return false
		}
		s.Retired, s.RetiredBy, s.RetiredAt = true, node, time.Now().UTC()
		return true
	})
}

// AddSpecConflict records a losing create on incarnation of name (one
// entry per host, the newest kept).
func AddSpecConflict(ctx context.Context, store kvstore.Store, name, incarnation string, c SpecConflict) error {
	_, err := updateSpec(ctx, store, name, func(s *Spec) bool {
		if s.Incarnation != incarnation {
			return false
		}
		s.Conflicts = slices.DeleteFunc(s.Conflicts, func(o SpecConflict) bool { return o.HostID == c.HostID })
		s.Conflicts = append(s.Conflicts, c)
		if len(s.Conflicts) > maxSpecConflicts {
			s.Conflicts = s.Conflicts[len(s.Conflicts)-maxSpecConflicts:]
		}
		return true
	})
	return err
}

// updateSpec applies f by CAS; f returns false to leave the record alone.
func updateSpec(ctx context.Context, store kvstore.Store, name string, f func(*Spec) bool) (bool, error) {
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		cur, err := GetSpec(ctx, store, name)
		if errors.Is(err, kvstore.ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		s := cur.Spec
		if !f(&s) {
			return false, nil
		}
		val, err := kvstore.Encode(s)
		if err != nil {
			return false, err
		}
		err = store.CAS(ctx, specKey(name), val, cur.Index)
		if errors.Is(err, kvstore.ErrConflict) {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("update cluster-wide network %q: %w", name, err)
		}
		return true, nil
	}
	return false, fmt.Errorf("update cluster-wide network %q: gave up after %d concurrent updates", name, maxCASAttempts)
}

// DeleteSpecIfUnheld deletes the retired spec read at index once no host
// holds its logical network (networks/<key>/config is gone), in one
// transaction. It reports whether it deleted; a spec that changed or a
// network still held is false without an error.
func DeleteSpecIfUnheld(ctx context.Context, store kvstore.Store, sp SpecPair) (bool, error) {
	if !sp.Spec.Retired {
		return false, nil
	}
	ops := []kvstore.Op{{Verb: kvstore.OpDeleteCAS, Key: specKey(sp.Spec.Name), Index: sp.Index}}
	if sp.Spec.Key != "" {
		ops = append(ops, kvstore.Op{Verb: kvstore.OpCheckNotExists, Key: configKey(sp.Spec.Key)})
	}
	err := store.Txn(ctx, ops)
	if errors.Is(err, kvstore.ErrConflict) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("delete cluster-wide network %q: %w", sp.Spec.Name, err)
	}
	return true, nil
}
