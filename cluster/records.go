package cluster

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"consul-overlay/discovery"
)

// Network is a logical network as stored at networks/<key>/config.
type Network struct {
	Key  string `json:"key"`
	Name string `json:"name,omitempty"` // -o name, empty when keyed by subnet
	// Incarnation is a random ID chosen when the record is created. A
	// network removed and created again under the same key is another
	// incarnation; endpoint records carry the incarnation they belong to,
	// so a delete of one never touches the other's.
	Incarnation string `json:"incarnation"`
	VNI         uint32 `json:"vni"`
	// MTU is the user's -o mtu; 0 means each host derives it from its
	// underlay.
	MTU      int               `json:"mtu,omitempty"`
	Subnets  []string          `json:"subnets"`            // pools, IPv4 first
	Spaces   []string          `json:"spaces,omitempty"`   // IPAM address space of each subnet
	Gateways []string          `json:"gateways,omitempty"` // CIDR, one per subnet that has one
	Internal bool              `json:"internal,omitempty"`
	Options  map[string]string `json:"options,omitempty"` // the -o options of the first host
	// Hosts are the member hosts, by HostID.
	Hosts   map[string]Member `json:"hosts"`
	Created time.Time         `json:"created"`
}

// Member is one host's membership in a logical network.
type Member struct {
	Node string `json:"node"` // human-readable name, for messages
	// NetworkIDs are the host's local Docker NetworkIDs bound to the
	// logical network (normally one; more after a crash made Docker retry
	// CreateNetwork with a new ID). They share one bridge and VNI.
	NetworkIDs []string  `json:"network_ids"`
	VTEP       string    `json:"vtep"`
	Since      time.Time `json:"since"`
}

// Endpoint is one endpoint, stored at networks/<key>/endpoints/<id>.
type Endpoint struct {
	ID         string `json:"id"`
	NetworkKey string `json:"network_key"`
	// Incarnation is the incarnation of the logical network the record
	// was created in.
	Incarnation string `json:"incarnation"`
	NetworkID   string `json:"network_id"` // local Docker NetworkID on the host
	HostID      string `json:"host_id"`
	Node        string `json:"node"`
	VTEP        string `json:"vtep"`
	IPv4        string `json:"ipv4,omitempty"` // CIDR as Docker gave it
	IPv6        string `json:"ipv6,omitempty"`
	MAC         string `json:"mac"`
	// Options are the endpoint's own driver options (string values, not
	// Docker's com.docker.* keys): SERVICE_* settings for registration.
	Options map[string]string `json:"options,omitempty"`
	// Ports are the container's exposed ports.
	Ports []discovery.Port `json:"ports,omitempty"`
	// Sandbox is the ID Join's SandboxKey ends in: set once the endpoint
	// has joined, in the driver's copy (from its join record, see Joined,
	// after a restart). The stored record does not carry it, except one
	// written by an older version or re-asserted after an eviction:
	// writing it at Join would wake every member host's peer watch.
	Sandbox string    `json:"sandbox,omitempty"`
	Created time.Time `json:"created"`
}

// Host is this host's own record at members/<host-id>: written on its
// first membership and kept, it proves at start that the store view is
// this host's (right prefix, readable, same identity). It is not the
// host record hosts/<host-id> that the plugin claims at every start: that
// one exists on any view, even an empty one, so it proves nothing.
type Host struct {
	HostID  string    `json:"host_id"`
	Node    string    `json:"node"`
	VTEP    string    `json:"vtep"`
	Created time.Time `json:"created"`
}

// reservation holds a VNI (vnis/<vni>) or a subnet (subnets/<subnet>) for
// one incarnation of a logical network.
type reservation struct {
	Key         string `json:"key"`
	Incarnation string `json:"incarnation,omitempty"`
}

func configKey(key string) string       { return "networks/" + key + "/config" }
func networkPrefix(key string) string   { return "networks/" + key + "/" }
func endpointsPrefix(key string) string { return "networks/" + key + "/endpoints/" }
func endpointKey(key, id string) string { return endpointsPrefix(key) + id }
func vniKey(vni uint32) string          { return fmt.Sprintf("vnis/%d", vni) }
func hostKey(id string) string          { return "members/" + id }

// subnetKey reserves a subnet for one logical network, so two networks can
// never claim the same subnet even when hosts race.
func subnetKey(p netip.Prefix) string {
	return "subnets/" + strings.NewReplacer("/", "_", ":", "-").Replace(p.Masked().String())
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// ValidName reports whether name may be a logical network's -o name.
func ValidName(name string) bool { return nameRE.MatchString(name) }

// Key is the store key of a logical network: its name, or without one,
// its first subnet ("subnet-10.10.0.0_24").
func Key(name string, subnets []netip.Prefix) (string, error) {
	if name != "" {
		if !nameRE.MatchString(name) {
			return "", fmt.Errorf("option name %q: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
		}
		return "name-" + name, nil
	}
	if len(subnets) == 0 {
		return "", fmt.Errorf("network has no subnet and no -o name to identify it across hosts")
	}
	s := subnets[0].String()
	s = strings.NewReplacer("/", "_", ":", "-").Replace(s)
	return "subnet-" + s, nil
}

// sameSubnets reports whether two subnet lists hold the same prefixes.
func sameSubnets(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	as := slices.Clone(a)
	bs := slices.Clone(b)
	sort.Strings(as)
	sort.Strings(bs)
	return slices.Equal(as, bs)
}

// hostNames lists a network's member hosts, sorted, for error messages:
// the node name, and the host ID when two members share a node name.
func (r *Network) hostNames() string {
	count := map[string]int{}
	for _, m := range r.Hosts {
		count[m.Node]++
	}
	names := make([]string, 0, len(r.Hosts))
	for id, m := range r.Hosts {
		n := m.Node
		if n == "" || count[n] > 1 {
			n = fmt.Sprintf("%s (host %s)", n, id)
		}
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// Label names a logical network for messages: its -o name or its key.
func (r Network) Label() string {
	if r.Name != "" {
		return fmt.Sprintf("%q", r.Name)
	}
	return fmt.Sprintf("%q", r.Key)
}

// OptionEgress is the key of a record's Options that holds the -o egress
// its first host gave.
const OptionEgress = "egress"

// OptionEgressDefault is the key of a record's Options under which it
// keeps the egress its first host chose for the network when that host's
// user gave no -o egress (the driver's default). A key of its own rather
// than "egress": a release that knows -o egress but not this default
// reads such a network as having none (Docker's docker_gwbridge), as it
// reads a network created before the default, instead of refusing its
// own hosts, which give no -o egress either.
const OptionEgressDefault = "egress_default"

// Egress is the network's egress as recorded: the -o egress of its first
// host, or the default that host chose (OptionEgressDefault); "" for
// neither (a network created before either).
func (r Network) Egress() string {
	if v, ok := r.Options[OptionEgress]; ok {
		return v
	}
	return r.Options[OptionEgressDefault]
}

// EgressDefaulted says whether options' egress is the first host's
// default (OptionEgressDefault) rather than a given -o egress.
func EgressDefaulted(options map[string]string) bool {
	_, given := options[OptionEgress]
	_, defaulted := options[OptionEgressDefault]
	return defaulted && !given
}

// Member returns hostID's membership.
func (r Network) Member(hostID string) (Member, bool) {
	m, ok := r.Hosts[hostID]
	return m, ok
}

// clone deep-copies the record's maps and slices so a caller's copy is
// never shared with another goroutine's.
func (r Network) clone() Network {
	r.Subnets = slices.Clone(r.Subnets)
	r.Spaces = slices.Clone(r.Spaces)
	r.Gateways = slices.Clone(r.Gateways)
	if r.Options != nil {
		o := make(map[string]string, len(r.Options))
		for k, v := range r.Options {
			o[k] = v
		}
		r.Options = o
	}
	h := make(map[string]Member, len(r.Hosts))
	for k, m := range r.Hosts {
		m.NetworkIDs = slices.Clone(m.NetworkIDs)
		h[k] = m
	}
	r.Hosts = h
	return r
}

// newIncarnation is a random 128-bit ID.
func newIncarnation() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // never fails on Linux (Go 1.24+ crashes instead)
	return hex.EncodeToString(b)
}

func prefixStrings(ps []netip.Prefix) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return out
}

// UnmarshalJSON reads a membership, including one written before host IDs
// and several NetworkIDs (a single "network_id").
func (m *Member) UnmarshalJSON(b []byte) error {
	type plain Member
	var v struct {
		plain
		NetworkID string `json:"network_id"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*m = Member(v.plain)
	if len(m.NetworkIDs) == 0 && v.NetworkID != "" {
		m.NetworkIDs = []string{v.NetworkID}
	}
	return nil
}

// UnmarshalJSON reads an endpoint record, including one written before
// host IDs: its node name stands for its host ID (as hosts were keyed by
// node name then).
func (e *Endpoint) UnmarshalJSON(b []byte) error {
	type plain Endpoint
	var v plain
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*e = Endpoint(v)
	if e.HostID == "" {
		e.HostID = e.Node
	}
	return nil
}
