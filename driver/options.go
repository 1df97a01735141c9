package driver

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
)

// Option keys Docker puts in CreateNetwork's Options map.
const (
	optGeneric    = "com.docker.network.generic"
	optEnableIPv6 = "com.docker.network.enable_ipv6"
	optInternal   = "com.docker.network.internal"
	optDockerMTU  = "com.docker.network.driver.mtu"
)

// The -o options consul-overlay takes.
const (
	optName          = "name"
	optVNI           = "vni"
	optMTU           = "mtu"
	optRegister      = "register"
	optServicePrefix = "service_prefix"
	optEncrypted     = "encrypted"
	// optConsulAPI lets the network's containers reach the host's Consul
	// API on the well-known address (port 8500).
	optConsulAPI = "consul_api"
	// optEgress says how the network's containers get out: egressDocker
	// (as Docker's overlay: Docker adds an endpoint on docker_gwbridge),
	// egressHost (each host routes and masquerades its own containers'
	// IPv4 traffic, and Join gives them its gateway) or egressAuto
	// (egressHost for a container that publishes no port, egressDocker for
	// one that does). Without it a new network gets egressAuto where it
	// can have it (defaultEgress).
	optEgress = cluster.OptionEgress
)

// The values of -o egress.
const (
	egressDocker = "docker"
	egressHost   = "host"
	egressAuto   = "auto"
)

// Limits for user-supplied values.
const (
	maxVNI = 1<<24 - 1
	// minMTU is the smallest overlay MTU accepted: IPv6 needs 1280; for an
	// IPv4-only network 576 is the classic minimum datagram size.
	minMTUv4 = 576
	minMTUv6 = 1280
)

// networkOptions is CreateNetwork's request, validated.
type networkOptions struct {
	name     string
	vni      uint32 // 0: allocate
	mtu      int    // 0: derive from the underlay
	internal bool
	ipv6     bool
	// encrypted: -o encrypted (Docker's overlay takes it without a
	// value) or -o encrypted=true: VXLAN in IPsec ESP between the hosts.
	encrypted bool
	// egressMode: -o egress (egressDocker when not given); with host or
	// auto this host is the way out of the network for its containers
	// (auto: for those that publish no port, see hostEgress).
	egressMode string
	// egressGiven: the request gave -o egress. Without it a new network
	// gets defaultEgress and an existing one keeps its record's.
	egressGiven bool
	generic     map[string]string
	subnets     []netip.Prefix // IPv4 first, as Docker sends them
	gateways    []netip.Prefix
	spaces      []string // IPAM address spaces, one per subnet
}

// parseNetworkOptions validates CreateNetwork's options and IPAM data. Any
// unknown -o option is an error: a typo must not be silently ignored.
func parseNetworkOptions(req *network.CreateNetworkRequest) (*networkOptions, error) {
	o := &networkOptions{generic: map[string]string{}, egressMode: egressDocker}
	if v, ok := req.Options[optGeneric]; ok && v != nil {
		m, ok := v.(map[string]interface{})
		if !ok {
			return nil, fmt.Errorf("option %s: want an object of strings, got %T", optGeneric, v)
		}
		for k, val := range m {
			s, ok := val.(string)
			if !ok {
				return nil, fmt.Errorf("option %q: want a string value, got %T", k, val)
			}
			o.generic[k] = s
		}
	}
	o.internal = boolOption(req.Options[optInternal])
	o.ipv6 = boolOption(req.Options[optEnableIPv6])

	var unknown []string
	for k, v := range o.generic {
		switch k {
		case optName:
			o.name = v
		case optVNI:
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
			if err != nil || n < 1 || n > maxVNI {
				return nil, fmt.Errorf("option vni=%q: want a number from 1 to %d", v, maxVNI)
			}
			o.vni = uint32(n)
		case optRegister:
			if _, err := strconv.ParseBool(v); err != nil {
				return nil, fmt.Errorf("option register=%q: want true or false", v)
			}
		case optConsulAPI:
			if _, err := strconv.ParseBool(v); err != nil {
				return nil, fmt.Errorf("option consul_api=%q: want true or false", v)
			}
		case optEgress:
			m, err := parseEgress(v)
			if err != nil {
				return nil, err
			}
			o.egressMode, o.egressGiven = m, true
		case optServicePrefix:
			if strings.ContainsAny(v, " /") {
				return nil, fmt.Errorf("option service_prefix=%q: no spaces or slashes in a service name", v)
			}
		case optEncrypted:
			b, err := parseEncrypted(v)
			if err != nil {
				return nil, err
			}
			o.encrypted = b
		case optMTU, optDockerMTU:
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil || n <= 0 {
				return nil, fmt.Errorf("option %s=%q: want a positive number of bytes", k, v)
			}
			if o.mtu != 0 && o.mtu != n {
				return nil, fmt.Errorf("options mtu and %s disagree (%d and %d): give one", optDockerMTU, o.mtu, n)
			}
			o.mtu = n
		default:
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return nil, fmt.Errorf("unknown option %s: consul-overlay takes -o name=, vni=, mtu= (or %s), register=, service_prefix=, encrypted=, consul_api=, egress=", strings.Join(unknown, ", "), optDockerMTU)
	}
	if hostEgress(o.egressMode) && o.internal {
		return nil, fmt.Errorf("option egress=%s: an --internal network has no way out; create it without one of them", o.egressMode)
	}

	for _, list := range [][]*network.IPAMData{req.IPv4Data, req.IPv6Data} {
		for _, d := range list {
			if d == nil || d.Pool == "" {
				continue
			}
			p, err := netip.ParsePrefix(d.Pool)
			if err != nil {
				return nil, fmt.Errorf("ipam pool %q: %v", d.Pool, err)
			}
			o.subnets = append(o.subnets, p.Masked())
			o.spaces = append(o.spaces, d.AddressSpace)
			if d.Gateway != "" {
				g, err := netip.ParsePrefix(d.Gateway)
				if err != nil {
					return nil, fmt.Errorf("ipam gateway %q of pool %s: %v", d.Gateway, d.Pool, err)
				}
				o.gateways = append(o.gateways, g)
			}
		}
	}
	if hostEgress(o.egressMode) && !hasIPv4Gateway(o.gateways) {
		return nil, fmt.Errorf("option egress=%s: the network has no IPv4 gateway for its containers to route through (egress is IPv4 only; an IPv6-only network cannot have it)", o.egressMode)
	}
	if o.mtu != 0 {
		min := minMTUv4
		for _, s := range o.subnets {
			if s.Addr().Is6() {
				min = minMTUv6
			}
		}
		if o.mtu < min {
			return nil, fmt.Errorf("option mtu=%d: below the minimum of %d for this network", o.mtu, min)
		}
	}
	return o, nil
}

// boolOption reads a boolean Docker option, which arrives as a JSON bool or
// sometimes as a string. Absent is false.
func boolOption(v interface{}) bool {
	switch b := v.(type) {
	case bool:
		return b
	case string:
		r, _ := strconv.ParseBool(b)
		return r
	}
	return false
}

// parseEncrypted reads -o encrypted: empty (Docker's `-o encrypted`) is
// true, otherwise a boolean.
func parseEncrypted(v string) (bool, error) {
	if strings.TrimSpace(v) == "" {
		return true, nil
	}
	b, err := strconv.ParseBool(strings.TrimSpace(v))
	if err != nil {
		return false, fmt.Errorf("option encrypted=%q: want true or false", v)
	}
	return b, nil
}

// parseEgress reads -o egress: egressDocker, egressHost or egressAuto.
func parseEgress(v string) (string, error) {
	switch m := strings.TrimSpace(v); m {
	case egressDocker, egressHost, egressAuto:
		return m, nil
	}
	return "", fmt.Errorf("option egress=%q: want %s (the default: Docker's docker_gwbridge), %s (this host routes and masquerades the containers' IPv4 traffic) or %s (%s for a container that publishes no port, %s for one that does)",
		v, egressDocker, egressHost, egressAuto, egressHost, egressDocker)
}

// differingSettings lists the settings of a CreateNetwork (o) that differ
// from the logical network rec it joins:
// every host of a logical network programs its bridge and registers its
// containers from the one record, so a host that asked for another
// (--internal, consul_api, egress, register, service_prefix, encrypted)
// would get the first host's silently, for example the Consul API
// reachable from containers of a network that did not ask for it, or
// containers masqueraded by the host (egress=host) when their network
// asked for docker_gwbridge. Both sides are read as the data plane
// (kernelNetwork) and the registrar (serviceEndpoint) read a record. Each
// difference reads "setting=recorded, this request asked".
func differingSettings(rec cluster.Network, o *networkOptions) []string {
	asked := cluster.Network{Internal: o.internal, Options: o.generic}
	hk, ak := kernelNetwork(rec), kernelNetwork(asked)
	hs, as := serviceEndpoint(rec, &cluster.Endpoint{}), serviceEndpoint(asked, &cluster.Endpoint{})
	var out []string
	differs := func(name string, recorded, wanted any) {
		if recorded != wanted {
			out = append(out, fmt.Sprintf("%s=%v, this request %v", name, recorded, wanted))
		}
	}
	differs("internal", hk.Internal, ak.Internal)
	differs("encrypted", hk.Encrypted, ak.Encrypted)
	differs(optConsulAPI, hk.ConsulAPI, ak.ConsulAPI)
	if o.egressGiven {
		// Without -o egress a host takes the network's, whatever it is
		// (a default is chosen only for a new network).
		differs(optEgress, egressMode(rec), o.egressMode)
	}
	differs(optRegister, hs.Register, as.Register)
	differs(optServicePrefix, fmt.Sprintf("%q", hs.ServicePrefix), fmt.Sprintf("%q", as.ServicePrefix))
	return out
}

// encryptedNetwork reports whether a logical network's record asks for
// encryption (the -o options of its first host).
func encryptedNetwork(options map[string]string) bool {
	v, ok := options[optEncrypted]
	if !ok {
		return false
	}
	b, err := parseEncrypted(v)
	return err == nil && b
}
