package discovery

import (
	"maps"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/dockerapi"
)

// Meta keys every service carries. Consul reserves the "consul-" prefix,
// hence MetaManagedBy rather than a consul-* marker.
const (
	MetaManagedBy     = "managed-by"
	ManagedByValue    = "consul-overlay"
	MetaNode          = "node"
	MetaHostID        = "host-id"
	MetaNetwork       = "network"
	MetaNetworkID     = "network-id"
	MetaEndpointID    = "endpoint-id"
	MetaContainerID   = "container-id"
	MetaContainerName = "container-name"
)

// HostServiceName is the agent service of every host's liveness check (a
// TTL check its session is bound to; see kvstore.Consul.Claim), one per
// plugin, ID HostServiceName-<host-id>, Meta host-id and node. It carries
// no managed-by: the registrar leaves it alone; the reaper removes a gone
// host's.
const HostServiceName = "consul-overlay-host"

// HostServiceID is the agent service (and check) ID of host hostID's
// liveness check, the one its session is bound to.
func HostServiceID(hostID string) string { return HostServiceName + "-" + hostID }

// CustomIDPrefix is put before every service ID that comes from a
// container or its endpoint's options (SERVICE_ID, SERVICE_<port>_ID), so
// that no container can name, and so overwrite or deregister, a service
// the plugin did not register.
const CustomIDPrefix = "consul-overlay:"

// owner identifies this host's services in the agent: the marker, the
// node name and the host identity (empty: services carry none).
type owner struct{ node, hostID string }

// owns reports whether a service in the agent is this host's: it carries
// the marker, this host's node name and this host's identity (or no
// identity when the host has none). Only such services are replaced or
// removed without a reason tied to one endpoint.
func (o owner) owns(svc *api.AgentService) bool {
	return svc != nil && svc.Meta[MetaManagedBy] == ManagedByValue &&
		svc.Meta[MetaNode] == o.node && svc.Meta[MetaHostID] == o.hostID
}

// mayReplace reports whether a service in the agent may be overwritten by
// a registration for endpoint endpointID: this host's, or written by a
// version without host identity for this very endpoint (endpoint IDs are
// unique, so it can only be this host's).
func (o owner) mayReplace(svc *api.AgentService, endpointID string) bool {
	if o.owns(svc) {
		return true
	}
	return svc != nil && svc.Meta[MetaManagedBy] == ManagedByValue && svc.Meta[MetaNode] == o.node &&
		svc.Meta[MetaHostID] == "" && svc.Meta[MetaEndpointID] == endpointID
}

// ComposeServiceLabel is the label Docker Compose puts on a service's
// containers.
const ComposeServiceLabel = "com.docker.compose.service"

// Tagged address keys set on every service (see doc.go).
const (
	TaggedLANIPv4 = "lan_ipv4"
	TaggedLANIPv6 = "lan_ipv6"
)

// DefaultCheckInterval is a check's interval when SERVICE_CHECK_INTERVAL
// is absent or not a duration (Registrator's default).
const DefaultCheckInterval = "10s"

// Consul's limits on service Meta (CONSUL.md §2.9).
const (
	metaMaxPairs  = 64
	metaMaxKeyLen = 128
	metaMaxValLen = 512
)

var metaKeyRe = regexp.MustCompile(`^[a-zA-Z0-9_-]+$`)

// serviceKeys is the SERVICE_* settings of one source, keyed by the
// lower-cased rest of the key ("name", "80_name", "check_http").
type serviceKeys map[string]string

// addKV adds "SERVICE_X=v" strings (a container's Env).
func (s serviceKeys) addKV(kvs []string) {
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if ok {
			s.add(k, v)
		}
	}
}

func (s serviceKeys) addMap(m map[string]string) {
	for k, v := range m {
		s.add(k, v)
	}
}

func (s serviceKeys) add(k, v string) {
	if rest, ok := strings.CutPrefix(k, "SERVICE_"); ok && rest != "" {
		s[strings.ToLower(rest)] = v
	}
}

// settings answers SERVICE_* lookups for one port. Sources are asked in
// order (driver options, then the container's labels over its
// environment); within a source SERVICE_<port>_KEY wins over SERVICE_KEY.
type settings struct {
	sources []serviceKeys
	port    int // 0: no port, only generic keys apply
}

// get returns the value of key, and whether it came from a per-port key.
func (s settings) get(key string) (v string, perPort, ok bool) {
	for _, src := range s.sources {
		if s.port > 0 {
			if v, ok := src[strconv.Itoa(s.port)+"_"+key]; ok {
				return v, true, true
			}
		}
		if v, ok := src[key]; ok {
			return v, false, true
		}
	}
	return "", false, false
}

func (s settings) value(key string) string {
	v, _, _ := s.get(key)
	return strings.TrimSpace(v)
}

// truthy reads a flag the way Registrator does (any non-empty value is
// set) except that false, 0, no and off clear it.
func truthy(v string) bool {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "", "false", "0", "no", "off":
		return false
	}
	return true
}

// attrs returns the SERVICE_* keys that are neither consumed here nor for
// another port, the way Registrator turns them into Meta: generic keys,
// overridden by this port's keys, earlier sources over later ones.
func (s settings) attrs() map[string]string {
	out := map[string]string{}
	portPrefix := strconv.Itoa(s.port) + "_"
	for i := len(s.sources) - 1; i >= 0; i-- {
		src := s.sources[i]
		for k, v := range src {
			if !portKey(k) {
				out[k] = v
			}
		}
		if s.port == 0 {
			continue
		}
		for k, v := range src {
			if rest, ok := strings.CutPrefix(k, portPrefix); ok && rest != "" {
				out[rest] = v
			}
		}
	}
	for _, k := range []string{"name", "id", "tags", "ignore"} {
		delete(out, k)
	}
	for k := range out {
		if strings.HasPrefix(k, "check_") {
			delete(out, k)
		}
	}
	return out
}

// portKey reports whether k is a per-port key ("80_name").
func portKey(k string) bool {
	first, _, ok := strings.Cut(k, "_")
	if !ok {
		return false
	}
	_, err := strconv.Atoi(first)
	return err == nil
}

// buildServices computes the agent registrations of one endpoint: none
// when registration is off or ignored, else one per exposed port (one
// without a port when it exposes none). c is the container's metadata,
// nil while unknown. The result is deterministic.
func buildServices(o owner, ep Endpoint, c *dockerapi.Container) []*api.AgentServiceRegistration {
	if !ep.Register {
		return nil
	}
	driverOpts := serviceKeys{}
	driverOpts.addMap(ep.Options)
	container := serviceKeys{}
	if c != nil {
		container.addKV(c.Env)
		container.addMap(c.Labels) // labels override the environment
	}
	sources := []serviceKeys{driverOpts, container}

	ports := ep.Ports
	if len(ports) == 0 {
		ports = []Port{{}}
	}
	group := len(ports) > 1
	var regs []*api.AgentServiceRegistration
	for _, p := range ports {
		s := settings{sources: sources, port: p.Port}
		if truthy(s.value("ignore")) {
			continue
		}
		regs = append(regs, buildService(o, ep, c, s, p, group))
	}
	return regs
}

func buildService(o owner, ep Endpoint, c *dockerapi.Container, s settings, p Port, group bool) *api.AgentServiceRegistration {
	suffix := ""
	if p.Proto == "udp" || p.Proto == "sctp" {
		suffix = ":" + p.Proto
	}

	name, perPort, ok := s.get("name")
	name = strings.TrimSpace(name)
	if !ok || name == "" || !perPort {
		if !ok || name == "" {
			name = defaultName(ep, c)
		}
		if group {
			name += "-" + strconv.Itoa(p.Port)
		}
	}

	id, perPort, ok := s.get("id")
	id = strings.TrimSpace(id)
	switch {
	case ok && id != "" && (perPort || !group):
		id = CustomIDPrefix + id
	case ok && id != "":
		id = CustomIDPrefix + id + ":" + strconv.Itoa(p.Port) + suffix
	case p.Port > 0:
		id = ep.ID + ":" + strconv.Itoa(p.Port) + suffix
	default:
		id = ep.ID
	}

	var tags []string
	for _, t := range splitTags(s.value("tags")) {
		if !slices.Contains(tags, t) {
			tags = append(tags, t)
		}
	}
	if suffix != "" && !slices.Contains(tags, p.Proto) {
		tags = append(tags, p.Proto)
	}

	addr := ep.IPv4
	if !addr.IsValid() {
		addr = ep.IPv6
	}
	reg := &api.AgentServiceRegistration{
		ID:   id,
		Name: ep.ServicePrefix + name,
		Tags: tags,
		Port: p.Port,
		Meta: meta(o, ep, c, s),
	}
	if addr.IsValid() {
		reg.Address = addr.String()
	}
	if ep.IPv4.IsValid() || ep.IPv6.IsValid() {
		reg.TaggedAddresses = map[string]api.ServiceAddress{}
		if ep.IPv4.IsValid() {
			reg.TaggedAddresses[TaggedLANIPv4] = api.ServiceAddress{Address: ep.IPv4.String(), Port: p.Port}
		}
		if ep.IPv6.IsValid() {
			reg.TaggedAddresses[TaggedLANIPv6] = api.ServiceAddress{Address: ep.IPv6.String(), Port: p.Port}
		}
	}
	if addr.IsValid() {
		reg.Check = buildCheck(s, addr, p)
	}
	return reg
}

// defaultName is the name without SERVICE_NAME: the Compose service, the
// container name, or, while the container is unknown, the network's name
// (the endpoint's short ID when that is empty too). Names made here are
// made DNS-safe.
func defaultName(ep Endpoint, c *dockerapi.Container) string {
	var candidates []string
	if c != nil {
		candidates = append(candidates, c.Labels[ComposeServiceLabel], strings.TrimPrefix(c.Name, "/"))
	}
	candidates = append(candidates, ep.Network)
	for _, n := range candidates {
		if n = dnsSafe(n); n != "" {
			return n
		}
	}
	short := ep.ID
	if len(short) > 12 {
		short = short[:12]
	}
	if n := dnsSafe("endpoint-" + short); n != "" {
		return n
	}
	return "endpoint"
}

var notDNS = regexp.MustCompile(`[^A-Za-z0-9-]+`)

// dnsSafe replaces what Consul's DNS interface cannot serve (anything but
// letters, digits and '-') with '-' and keeps at most 63 characters.
func dnsSafe(s string) string {
	s = strings.Trim(notDNS.ReplaceAllString(s, "-"), "-")
	if len(s) > 63 {
		s = strings.TrimRight(s[:63], "-")
	}
	return s
}

// splitTags splits on commas; "\," is a literal comma (as in Registrator).
func splitTags(v string) []string {
	if v == "" {
		return nil
	}
	const placeholder = "\x00"
	v = strings.ReplaceAll(v, `\,`, placeholder)
	var tags []string
	for _, t := range strings.Split(v, ",") {
		t = strings.TrimSpace(strings.ReplaceAll(t, placeholder, ","))
		if t != "" {
			tags = append(tags, t)
		}
	}
	return tags
}

func meta(o owner, ep Endpoint, c *dockerapi.Container, s settings) map[string]string {
	m := map[string]string{}
	// Registrator's attributes first, so that ours overwrite them.
	attrs := s.attrs()
	for _, k := range slices.Sorted(maps.Keys(attrs)) {
		v := attrs[k]
		if len(m) >= metaMaxPairs-8 || !metaKeyRe.MatchString(k) || len(k) > metaMaxKeyLen ||
			len(v) > metaMaxValLen || strings.HasPrefix(k, "consul-") {
			continue
		}
		m[k] = v
	}
	set := func(k, v string) {
		if v != "" {
			if len(v) > metaMaxValLen {
				v = v[:metaMaxValLen]
			}
			m[k] = v
		}
	}
	m[MetaManagedBy] = ManagedByValue
	set(MetaNode, o.node)
	set(MetaHostID, o.hostID)
	set(MetaNetwork, ep.Network)
	set(MetaNetworkID, ep.NetworkID)
	set(MetaEndpointID, ep.ID)
	set(MetaContainerID, ep.ContainerID)
	if c != nil {
		set(MetaContainerID, c.ID)
		set(MetaContainerName, strings.TrimPrefix(c.Name, "/"))
	}
	return m
}

// buildCheck builds the one check Registrator would: the first of
// SERVICE_CHECK_HTTP, _HTTPS, _TCP and _GRPC that is set. Checks that need
// a port are left out for an endpoint without one.
func buildCheck(s settings, addr netip.Addr, p Port) *api.AgentServiceCheck {
	hostport := addr.String()
	if p.Port > 0 {
		hostport = net.JoinHostPort(addr.String(), strconv.Itoa(p.Port))
	} else if addr.Is6() {
		hostport = "[" + addr.String() + "]"
	}
	chk := &api.AgentServiceCheck{Interval: DefaultCheckInterval}
	switch {
	case s.value("check_http") != "":
		chk.HTTP = "http://" + hostport + urlPath(s.value("check_http"))
		chk.Method = s.value("check_http_method")
	case s.value("check_https") != "":
		chk.HTTP = "https://" + hostport + urlPath(s.value("check_https"))
		chk.Method = s.value("check_https_method")
		chk.TLSSkipVerify = truthy(s.value("check_tls_skip_verify"))
	case truthy(s.value("check_tcp")) && p.Port > 0:
		chk.TCP = hostport
	case truthy(s.value("check_grpc")) && p.Port > 0:
		chk.GRPC = hostport
		chk.GRPCUseTLS = truthy(s.value("check_grpc_use_tls"))
		chk.TLSSkipVerify = truthy(s.value("check_tls_skip_verify"))
	default:
		return nil
	}
	if d := s.value("check_interval"); validDuration(d) {
		chk.Interval = d
	}
	if d := s.value("check_timeout"); validDuration(d) {
		chk.Timeout = d
	}
	if d := s.value("check_deregister_after"); validDuration(d) {
		chk.DeregisterCriticalServiceAfter = d
	}
	switch st := s.value("check_initial_status"); st {
	case api.HealthPassing, api.HealthWarning, api.HealthCritical:
		chk.Status = st
	}
	return chk
}

func urlPath(p string) string {
	if !strings.HasPrefix(p, "/") {
		p = "/" + p
	}
	return p
}

// validDuration accepts what the agent accepts for intervals and timeouts:
// a positive Go duration.
func validDuration(s string) bool {
	d, err := time.ParseDuration(s)
	return err == nil && d > 0
}
