package vxlan

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// Ownership marks. A link is ours only if its name matches one of the exact
// patterns below; Reconcile removes a stray link only if it also carries
// this Manager's owner mark (OwnerMark) as its alias. Docker's own
// br-<12 hex> bridges and veth<7 hex> links never match.
const (
	// OwnerAlias is the owner mark of the default (empty) owner: the link
	// alias (ifalias) and firewall comment of a Manager whose Config.Owner
	// is "". Before owners existed every instance used it, so links that
	// carry it belong to the default owner.
	OwnerAlias = "consul-overlay"

	// maxOwnerLen bounds Config.Owner, so the firewall rule comment stays
	// well within iptables' 256 bytes and link aliases stay short.
	maxOwnerLen = 64

	vxlanPrefix  = "vx-"
	bridgePrefix = "vxbr-"
	hostPrefix   = "vxh-"
	contPrefix   = "vxc-"
	// The gateway pair of a network in the data-plane namespace: vxp- on
	// the bridge, vxg- in the host's namespace.
	portPrefix    = "vxp-"
	gatewayPrefix = "vxg-"

	// endpointNameLen is how many characters of an endpoint ID go into
	// its link names: "vxh-" + 10 = 14, within IFNAMSIZ-1 = 15.
	endpointNameLen = 10

	// MaxVNI is the largest VXLAN network identifier (24 bits).
	MaxVNI = 1<<24 - 1
)

var (
	vxlanNameRE   = regexp.MustCompile(`^vx-([0-9a-f]{6})$`)
	bridgeNameRE  = regexp.MustCompile(`^vxbr-([0-9a-f]{6})$`)
	portNameRE    = regexp.MustCompile(`^vxp-([0-9a-f]{6})$`)
	gatewayNameRE = regexp.MustCompile(`^vxg-([0-9a-f]{6})$`)
	hostNameRE    = regexp.MustCompile(`^vxh-([0-9A-Za-z]{10})$`)
	contNameRE    = regexp.MustCompile(`^vxc-([0-9A-Za-z]{10})$`)
	// networkNameREs are the names of a network's links, in either
	// namespace.
	networkNameREs = []*regexp.Regexp{vxlanNameRE, bridgeNameRE, gatewayNameRE, portNameRE}
	endpointIDRE   = regexp.MustCompile(`^[0-9A-Za-z]{10}`)
	// ownerRE keeps the owner mark free of characters that iptables -S
	// would quote, so rules read back exactly as they were written.
	ownerRE = regexp.MustCompile(`^[0-9A-Za-z_-]*$`)
)

// OwnerMark is the link alias and firewall rule comment of an owner's
// objects: "consul-overlay" for the default owner "", otherwise
// "consul-overlay-<owner>".
func OwnerMark(owner string) string {
	if owner == "" {
		return OwnerAlias
	}
	return OwnerAlias + "-" + owner
}

// ownerOfMark returns the owner an alias or rule comment names; ok is false
// if it is no consul-overlay mark at all (no alias, or someone else's).
func ownerOfMark(mark string) (owner string, ok bool) {
	if mark == OwnerAlias {
		return "", true
	}
	if rest, found := strings.CutPrefix(mark, OwnerAlias+"-"); found && rest != "" {
		return rest, true
	}
	return "", false
}

func validOwner(owner string) error {
	if len(owner) > maxOwnerLen || !ownerRE.MatchString(owner) {
		return fmt.Errorf("owner %q: want at most %d letters, digits, '-' or '_'", owner, maxOwnerLen)
	}
	return nil
}

// ErrForeign reports that an object with one of our names belongs to
// another consul-overlay instance (another owner) in this namespace. The
// error is a *ForeignLinkError, which names the other owner.
var ErrForeign = errors.New("belongs to another consul-overlay instance")

// ForeignLinkError is returned when a link that a call would modify
// carries another owner's mark. The link is left as it is.
type ForeignLinkError struct {
	Link  string // the link's name, for example "vx-001000"
	Owner string // the other owner; "" is the default owner
}

func (e *ForeignLinkError) Error() string {
	if e.Owner == "" {
		return fmt.Sprintf("%s belongs to the default consul-overlay instance (alias %q)", e.Link, OwnerAlias)
	}
	return fmt.Sprintf("%s belongs to consul-overlay instance %s", e.Link, e.Owner)
}

// Is makes errors.Is(err, ErrForeign) true.
func (e *ForeignLinkError) Is(target error) bool { return target == ErrForeign }

// VXLANName is the name of the VXLAN device of a network: vx-<vni %06x>.
func VXLANName(vni uint32) string { return fmt.Sprintf("%s%06x", vxlanPrefix, vni) }

// BridgeName is the name of the bridge of a network: vxbr-<vni %06x>.
func BridgeName(vni uint32) string { return fmt.Sprintf("%s%06x", bridgePrefix, vni) }

// GatewayName is the name of the host's end of a network's gateway pair
// (a network in the data-plane namespace): vxg-<vni %06x>. It carries the
// gateway addresses and the well-known address.
func GatewayName(vni uint32) string { return fmt.Sprintf("%s%06x", gatewayPrefix, vni) }

// PortName is the name of the bridge's end of a network's gateway pair,
// in the data-plane namespace: vxp-<vni %06x>.
func PortName(vni uint32) string { return fmt.Sprintf("%s%06x", portPrefix, vni) }

// HostIfName is the name of an endpoint's host-side veth end, the one on
// the network's bridge: vxh-<first 10 characters of the endpoint ID>.
func HostIfName(endpointID string) string { return hostPrefix + endpointKey(endpointID) }

// ContainerIfName is the name of the veth end handed to Docker, which moves
// it into the container and renames it: vxc-<first 10 characters of the ID>.
func ContainerIfName(endpointID string) string { return contPrefix + endpointKey(endpointID) }

// EndpointKey is the part of an endpoint ID that names its links, as
// EndpointsInUse lists it.
func EndpointKey(id string) string { return endpointKey(id) }

// endpointKey is the part of an endpoint ID that names its links. Two IDs
// sharing their first 10 characters would share links; Docker's 64-hex IDs
// make that a 1 in 2^40 event per pair on one host.
func endpointKey(id string) string {
	if len(id) < endpointNameLen {
		return id
	}
	return id[:endpointNameLen]
}

// vniFromName parses the VNI out of one of our network link names.
func vniFromName(re *regexp.Regexp, name string) (uint32, bool) {
	m := re.FindStringSubmatch(name)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseUint(m[1], 16, 32)
	if err != nil {
		return 0, false
	}
	return uint32(v), true
}

func validVNI(vni uint32) error {
	if vni == 0 || vni > MaxVNI {
		return fmt.Errorf("vni %d out of range 1..%d", vni, MaxVNI)
	}
	return nil
}

func validEndpointID(id string) error {
	if !endpointIDRE.MatchString(id) {
		return fmt.Errorf("endpoint id %q: need at least %d leading letters or digits", id, endpointNameLen)
	}
	return nil
}

// MACFromIP derives an endpoint MAC address from its IP, as Docker does:
// 02:42 followed by the four bytes of an IPv4 address. For an IPv6 address
// (IPv6-only endpoints) it is 06:42 followed by the first four bytes of the
// SHA-256 of the address: stable, locally administered, unicast, and never
// equal to an IPv4-derived MAC. It returns nil for an invalid address.
func MACFromIP(ip netip.Addr) net.HardwareAddr {
	ip = ip.Unmap()
	switch {
	case ip.Is4():
		b := ip.As4()
		return net.HardwareAddr{0x02, 0x42, b[0], b[1], b[2], b[3]}
	case ip.Is6():
		b := ip.As16()
		sum := sha256.Sum256(b[:])
		return net.HardwareAddr{0x06, 0x42, sum[0], sum[1], sum[2], sum[3]}
	}
	return nil
}

// VXLAN encapsulation overhead: inner Ethernet 14 + VXLAN 8 + UDP 8 + outer
// IP header (IPv4 20, IPv6 40).
const (
	overheadIPv4 = 50
	overheadIPv6 = 70
	minMTU       = 68
)

// OverlayMTU is the MTU of a network's links: override when positive,
// otherwise the underlay MTU minus the VXLAN overhead of its address family.
func OverlayMTU(underlayMTU int, ipv6Underlay bool, override int) int {
	if override > 0 {
		return override
	}
	if ipv6Underlay {
		return underlayMTU - overheadIPv6
	}
	return underlayMTU - overheadIPv4
}
