package discovery

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"path"
	"slices"
	"strings"
)

// Port is one exposed port of a container.
type Port struct {
	// Proto is "tcp", "udp" or "sctp".
	Proto string
	Port  int
}

func (p Port) String() string { return fmt.Sprintf("%d/%s", p.Port, p.Proto) }

// Endpoint is what the registrar needs to know of a joined endpoint.
type Endpoint struct {
	// ID is Docker's endpoint ID; service IDs derive from it.
	ID string
	// Network is the network's name as users know it; NetworkID is
	// Docker's network ID. Both go into the service's Meta. An endpoint
	// without NetworkID is never reclaimed (the engine must confirm it
	// knows the network first).
	Network   string
	NetworkID string
	// IPv4 and IPv6 are the endpoint's overlay addresses; either may be
	// the zero Addr.
	IPv4, IPv6 netip.Addr
	// Ports are the container's exposed ports (ParseExposedPorts).
	Ports []Port
	// ContainerID is the container's ID or a prefix of it of at least 12
	// hex digits. Empty: unknown; the container is then found by the
	// endpoint ID it lists.
	ContainerID string
	// Options are the endpoint's driver options (CreateEndpoint Options
	// with string values). Keys starting with SERVICE_ take part in name,
	// tag and check resolution; others are ignored.
	Options map[string]string
	// Register is the network's registration switch (`-o register=false`
	// clears it). An endpoint with Register false is still tracked, for
	// anti-entropy, but has no service.
	Register bool
	// ServicePrefix is prepended to every service name of the endpoint
	// (`-o service_prefix=`).
	ServicePrefix string
}

func (e Endpoint) equal(o Endpoint) bool {
	return e.ID == o.ID && e.Network == o.Network && e.NetworkID == o.NetworkID &&
		e.IPv4 == o.IPv4 && e.IPv6 == o.IPv6 && slices.Equal(e.Ports, o.Ports) &&
		e.ContainerID == o.ContainerID && maps.Equal(e.Options, o.Options) &&
		e.Register == o.Register && e.ServicePrefix == o.ServicePrefix
}

// ExposedPortsOption is the CreateEndpoint (and Join) option that carries
// the container's exposed ports.
const ExposedPortsOption = "com.docker.network.endpoint.exposedports"

// IP protocol numbers Docker uses in TransportPort.Proto.
var protoNames = map[int]string{6: "tcp", 17: "udp", 132: "sctp"}

// ParseExposedPorts reads the value of ExposedPortsOption as it comes out
// of decoding the request's JSON into an interface{}: a list of objects
// {"Proto": 6|17|132, "Port": 1..65535}. A JSON string or []byte holding
// such a list is accepted too. nil means no ports. The result is sorted by
// port, then protocol (tcp, udp, sctp), without duplicates.
func ParseExposedPorts(v any) ([]Port, error) {
	switch x := v.(type) {
	case nil:
		return nil, nil
	case string:
		return parseExposedPortsJSON([]byte(x))
	case []byte:
		return parseExposedPortsJSON(x)
	case json.RawMessage:
		return parseExposedPortsJSON(x)
	}
	list, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("exposed ports: want a list, got %T", v)
	}
	ports := make([]Port, 0, len(list))
	for i, item := range list {
		obj, ok := item.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("exposed ports[%d]: want an object, got %T", i, item)
		}
		proto, err := smallInt(obj["Proto"], 255)
		if err != nil {
			return nil, fmt.Errorf("exposed ports[%d]: Proto: %w", i, err)
		}
		name, ok := protoNames[proto]
		if !ok {
			return nil, fmt.Errorf("exposed ports[%d]: unknown protocol number %d", i, proto)
		}
		port, err := smallInt(obj["Port"], 65535)
		if err != nil || port == 0 {
			return nil, fmt.Errorf("exposed ports[%d]: Port %v: want 1..65535", i, obj["Port"])
		}
		ports = append(ports, Port{Proto: name, Port: port})
	}
	slices.SortFunc(ports, comparePorts)
	return slices.Compact(ports), nil
}

func parseExposedPortsJSON(b []byte) ([]Port, error) {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("exposed ports: %w", err)
	}
	if _, ok := v.(string); ok {
		return nil, fmt.Errorf("exposed ports: want a list, got a string")
	}
	return ParseExposedPorts(v)
}

// smallInt accepts a JSON number (float64, or json.Number) that is a whole
// number in [0, max].
func smallInt(v any, max int) (int, error) {
	var f float64
	switch x := v.(type) {
	case float64:
		f = x
	case json.Number:
		var err error
		if f, err = x.Float64(); err != nil {
			return 0, err
		}
	case int:
		f = float64(x)
	default:
		return 0, fmt.Errorf("want a number, got %T", v)
	}
	if f != float64(int(f)) || f < 0 || f > float64(max) {
		return 0, fmt.Errorf("%v is not a whole number in 0..%d", v, max)
	}
	return int(f), nil
}

var protoOrder = map[string]int{"tcp": 0, "udp": 1, "sctp": 2}

func comparePorts(a, b Port) int {
	if a.Port != b.Port {
		return a.Port - b.Port
	}
	return protoOrder[a.Proto] - protoOrder[b.Proto]
}

// ContainerIDFromSandboxKey returns the 12-hex-digit ID a Join request's
// SandboxKey ends in (<exec-root>/netns/<id>). Docker names the file after
// the container's network sandbox, not the container (checked on 20.10:
// SandboxKey /var/run/docker/netns/f0d97946764d is the sandbox f0d97946…
// of container d34d99cc…), so this is no container ID: the registrar finds
// containers by their endpoint IDs. Anything else (for example the host's
// "default" namespace) gives "".
func ContainerIDFromSandboxKey(key string) string {
	if key == "" || strings.HasSuffix(key, "/") {
		return ""
	}
	base := path.Base(key)
	if len(base) < 12 || len(base) > 64 {
		return ""
	}
	for _, c := range base {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return ""
		}
	}
	return base
}
