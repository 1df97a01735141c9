package driver

import (
	"fmt"

	"consul-overlay/discovery"
	"net/netip"
	"regexp"
	"sort"
	"strings"
	"time"
)

// networkRecord is the logical network as stored at networks/<key>/config.
type networkRecord struct {
	Key  string `json:"key"`
	Name string `json:"name,omitempty"` // -o name, empty when keyed by subnet
	VNI  uint32 `json:"vni"`
	// MTU is the user's -o mtu; 0 means each host derives it from its
	// underlay.
	MTU      int                   `json:"mtu,omitempty"`
	Subnets  []string              `json:"subnets"`            // pools, IPv4 first
	Spaces   []string              `json:"spaces,omitempty"`   // IPAM address space of each subnet
	Gateways []string              `json:"gateways,omitempty"` // CIDR, one per subnet that has one
	Internal bool                  `json:"internal,omitempty"`
	Options  map[string]string     `json:"options,omitempty"` // the -o options of the first host
	Hosts    map[string]hostMember `json:"hosts"`
	Created  time.Time             `json:"created"`
}

// hostMember is one host's membership in a logical network.
type hostMember struct {
	NetworkID string    `json:"network_id"` // the host's local Docker NetworkID
	VTEP      string    `json:"vtep"`
	Since     time.Time `json:"since"`
}

// endpointRecord is one endpoint, stored at networks/<key>/endpoints/<id>.
type endpointRecord struct {
	ID         string `json:"id"`
	NetworkKey string `json:"network_key"`
	NetworkID  string `json:"network_id"` // local Docker NetworkID on Node
	Node       string `json:"node"`
	VTEP       string `json:"vtep"`
	IPv4       string `json:"ipv4,omitempty"` // CIDR as Docker gave it
	IPv6       string `json:"ipv6,omitempty"`
	MAC        string `json:"mac"`
	// Options are the endpoint's own driver options (string values, not
	// Docker's com.docker.* keys): SERVICE_* settings for registration.
	Options map[string]string `json:"options,omitempty"`
	// Ports are the container's exposed ports.
	Ports []discovery.Port `json:"ports,omitempty"`
	// Sandbox is the ID Join's SandboxKey ends in (Docker's sandbox, not
	// the container): set once the endpoint has joined.
	Sandbox string    `json:"sandbox,omitempty"`
	Created time.Time `json:"created"`

	// left is set by Leave: the endpoint is no longer a service. Local to
	// this process; guarded by Driver.mu.
	left bool
}

// vniRecord reserves a VNI for one logical network at vnis/<vni>.
type vniRecord struct {
	Key string `json:"key"`
}

func configKey(key string) string       { return "networks/" + key + "/config" }
func networkPrefix(key string) string   { return "networks/" + key + "/" }
func endpointsPrefix(key string) string { return "networks/" + key + "/endpoints/" }
func endpointKey(key, id string) string { return endpointsPrefix(key) + id }
func vniKey(vni uint32) string          { return fmt.Sprintf("vnis/%d", vni) }

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// logicalKey is the store key of a logical network: its name, or without
// one, its first subnet ("subnet-10.10.0.0_24").
func logicalKey(name string, subnets []netip.Prefix) (string, error) {
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
	as := append([]string(nil), a...)
	bs := append([]string(nil), b...)
	sort.Strings(as)
	sort.Strings(bs)
	for i := range as {
		if as[i] != bs[i] {
			return false
		}
	}
	return true
}

// hostNames lists a network's member hosts, sorted, for error messages.
func (r *networkRecord) hostNames() string {
	names := make([]string, 0, len(r.Hosts))
	for n := range r.Hosts {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// label names a logical network for messages: its -o name or its key.
func (r *networkRecord) label() string {
	if r.Name != "" {
		return fmt.Sprintf("%q", r.Name)
	}
	return fmt.Sprintf("%q", r.Key)
}
