package driver

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"consul-overlay/cluster"
)

// optPortMap is the sandbox option (Join, ProgramExternalConnectivity)
// that carries the container's port bindings: -p, and -P for each exposed
// port.
const optPortMap = "com.docker.network.portmap"

// egress tells whether the network's hosts route and masquerade its
// containers' traffic: -o egress=host, or auto (for the containers that
// publish no port).
func egress(rec cluster.Network) bool { return hostEgress(egressMode(rec)) }

// hostEgress tells whether egress mode m makes the hosts a way out:
// egressHost, or egressAuto (for the containers that publish no port).
func hostEgress(m string) bool { return m == egressHost || m == egressAuto }

// egressMode is the network's egress: its record's -o egress, or the
// default its first host chose (cluster.Network.Egress); egressDocker
// when it has neither, or a value this release does not know (as an
// older release reads one that came later).
func egressMode(rec cluster.Network) string {
	m, err := parseEgress(rec.Egress())
	if err != nil {
		return egressDocker
	}
	return m
}

// defaultEgress is the egress of a new network whose user gave no -o
// egress: egressAuto when it can have it (an IPv4 gateway, not
// --internal, and this host able to route and masquerade, see
// vxlan.Manager.EgressBlocked), so that a container that publishes no
// port goes out through its host without Docker's docker_gwbridge
// endpoint; egressDocker otherwise, with the reason auto was not chosen.
func defaultEgress(o *networkOptions, blocked func() error) (string, string) {
	switch {
	case o.internal:
		return egressDocker, "--internal"
	case !hasIPv4Gateway(o.gateways):
		return egressDocker, "no IPv4 gateway"
	}
	if err := blocked(); err != nil {
		return egressDocker, err.Error()
	}
	return egressAuto, ""
}

// hasIPv4Gateway tells whether one of gateways is an IPv4 address.
func hasIPv4Gateway(gateways []netip.Prefix) bool {
	return slices.ContainsFunc(gateways, func(g netip.Prefix) bool { return g.Addr().Is4() })
}

// ipv4Gateway is the network's IPv4 gateway address (its record holds
// prefixes such as "10.10.0.1/24"), or the zero Addr if it has none.
func ipv4Gateway(rec cluster.Network) netip.Addr {
	for _, g := range rec.Gateways {
		if p, err := netip.ParsePrefix(g); err == nil && p.Addr().Is4() {
			return p.Addr()
		}
	}
	return netip.Addr{}
}

// portBinding is libnetwork's types.PortBinding as the portmap option
// carries it in JSON.
type portBinding struct {
	Proto       int
	IP          string
	Port        int
	HostIP      string
	HostPort    int
	HostPortEnd int
}

// publishedPorts describes the port bindings of a portmap option value
// (a JSON list of portBinding, decoded into an interface{}) as -p
// arguments: "8080:80/tcp", "127.0.0.1:8080:80/tcp", or "80/tcp" for a
// host port Docker picks (-P); "?" for one it cannot read, so that an
// unreadable binding still counts. Absent, null or an empty list: none.
func publishedPorts(v any) []string {
	if v == nil {
		return nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return []string{"?"}
	}
	var raw []json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return []string{"?"}
	}
	var out []string
	for _, r := range raw {
		var pb portBinding
		if err := json.Unmarshal(r, &pb); err != nil || pb.Port == 0 {
			out = append(out, "?")
			continue
		}
		proto, ok := protoNames[pb.Proto]
		if !ok {
			proto = fmt.Sprint(pb.Proto)
		}
		s := fmt.Sprintf("%d/%s", pb.Port, proto)
		if pb.HostPort != 0 {
			host := strconv.Itoa(pb.HostPort)
			if pb.HostPortEnd > pb.HostPort {
				host += "-" + strconv.Itoa(pb.HostPortEnd)
			}
			if a, err := netip.ParseAddr(pb.HostIP); err == nil && !a.IsUnspecified() {
				ip := a.String()
				if a.Is6() {
					ip = "[" + ip + "]"
				}
				host = ip + ":" + host
			}
			s = host + ":" + s
		}
		// Engines that bind IPv4 and IPv6 separately list a port twice.
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// protoNames are the IP protocol numbers of libnetwork's port bindings.
var protoNames = map[int]string{6: "tcp", 17: "udp", 132: "sctp"}
