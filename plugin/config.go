package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"consul-overlay/internal/dockerapi"
	"consul-overlay/ipam"
)

// Config is the daemon's validated configuration. Every field comes from an
// environment variable of the same name (the managed plugin's settings).
type Config struct {
	Socket  string // SOCKET: where to listen
	DataDir string // DATA_DIR: embedded store, host identity, lock, persisted node name
	// Node is NODE_NAME, the human-readable name for logs and Consul ("":
	// the Consul agent's node name, else the hostname). The host's identity
	// is not the name but DATA_DIR/host-id (see internal/hostid).
	Node      string
	VTEP      netip.Addr
	VTEPIface string // VTEP_INTERFACE: take VTEP from this link
	VXLANPort int    // VXLAN_PORT
	KVPrefix  string // KV_PREFIX
	LogLevel  slog.Level
	LogFormat string // LOG_FORMAT: text or json
	// SysctlRoot says how the neighbour table limits are raised
	// (SYSCTL_ROOT): "" through netlink (needs only CAP_NET_ADMIN, no
	// /proc/sys mount), a path through that sysctl tree, "-" not at all.
	SysctlRoot string
	// DockerSocket is the engine's API socket for container metadata
	// (DOCKER_HOST=unix://…, default /var/run/docker.sock, or
	// /run/docker.sock in the managed plugin); DOCKER_HOST=none turns the
	// Docker API off.
	DockerSocket string
	// AntiEntropy is how often registrations are compared with what this
	// host holds (ANTI_ENTROPY_INTERVAL, default 30s).
	AntiEntropy time.Duration
	// PeerResync is how often every network's peers are re-applied to
	// the kernel without a change in the store, repairing entries removed
	// by hand or by another tool (PEER_RESYNC_INTERVAL, default 30s).
	PeerResync time.Duration
	// TrackBridged keeps frames bridged within an overlay in conntrack
	// (BRIDGE_CONNTRACK, default true); false installs a raw-table
	// NOTRACK rule for them (issue 16: an experiment whose gain over
	// Docker's overlay is not proven yet, so it is off by default).
	TrackBridged bool
	// IPAMGrace is how long a reclaimed address waits for Docker's own
	// release, and how old an address nobody uses must be before it is
	// taken for an orphan of a crash (IPAM_GRACE, default 1h).
	IPAMGrace time.Duration
	// DataplaneNS, if set, is the name of a network namespace of the
	// plugin's own, pinned at /run/consul-overlay/<name> in the host's
	// mount namespace, that gets new networks' bridges, VXLAN devices and
	// endpoint ports (DATAPLANE_NAMESPACE: false, the default, for none;
	// true for the owner's mark, consul-overlay or consul-overlay-<owner>;
	// or a name of its own, for two plugins of one machine that are
	// different hosts, as the lab's are; docs/dataplane-namespace.md).
	DataplaneNS string
	// HostPID is a process whose mount namespace and root are the host's
	// and that outlives the plugin (HOST_PID, default 1: the host's init,
	// which the managed plugin sees with pidhost). Only the data-plane
	// namespace's pin uses it.
	HostPID int

	// IPAM defaults for networks created without --subnet.
	PoolV4, PoolV6         netip.Prefix
	PoolV4Size, PoolV6Size int
}

// dataplaneNameRE is a name DATAPLANE_NAMESPACE may give the namespace's
// pin (besides true and false, whose other spellings ParseBool takes).
var dataplaneNameRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// Defaults for settings left empty.
const (
	defaultSocket  = "/run/docker/plugins/consul-overlay.sock"
	defaultDataDir = "/var/lib/consul-overlay"
	defaultPort    = 4789
)

// loadConfig reads the settings. A bad value is an error naming the setting.
func loadConfig(getenv func(string) string) (Config, error) {
	c := Config{
		Socket:     getenv("SOCKET"),
		DataDir:    getenv("DATA_DIR"),
		Node:       strings.TrimSpace(getenv("NODE_NAME")),
		VTEPIface:  strings.TrimSpace(getenv("VTEP_INTERFACE")),
		KVPrefix:   getenv("KV_PREFIX"),
		SysctlRoot: strings.TrimSpace(getenv("SYSCTL_ROOT")),
		VXLANPort:  defaultPort,
		LogFormat:  "text",
	}
	if c.Socket == "" {
		c.Socket = defaultSocket
	}
	if !filepath.IsAbs(c.Socket) {
		return c, fmt.Errorf("SOCKET=%q: want an absolute path", c.Socket)
	}
	if c.DataDir == "" {
		c.DataDir = defaultDataDir
	}
	if !filepath.IsAbs(c.DataDir) {
		return c, fmt.Errorf("DATA_DIR=%q: want an absolute path", c.DataDir)
	}
	if v := strings.TrimSpace(getenv("VTEP_ADDR")); v != "" {
		a, err := netip.ParseAddr(v)
		if err != nil || a.IsUnspecified() || a.IsMulticast() {
			return c, fmt.Errorf("VTEP_ADDR=%q: want this host's unicast underlay IP address", v)
		}
		c.VTEP = a.Unmap()
		if c.VTEPIface != "" {
			return c, errors.New("VTEP_ADDR and VTEP_INTERFACE are both set: set one")
		}
	}
	if v := strings.TrimSpace(getenv("VXLAN_PORT")); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 65535 {
			return c, fmt.Errorf("VXLAN_PORT=%q: want a UDP port from 1 to 65535", v)
		}
		c.VXLANPort = n
	}
	switch v := strings.ToLower(strings.TrimSpace(getenv("LOG_LEVEL"))); v {
	case "", "info":
		c.LogLevel = slog.LevelInfo
	case "debug":
		c.LogLevel = slog.LevelDebug
	case "warn", "warning":
		c.LogLevel = slog.LevelWarn
	case "error":
		c.LogLevel = slog.LevelError
	default:
		return c, fmt.Errorf("LOG_LEVEL=%q: want debug, info, warn or error", v)
	}
	switch v := strings.ToLower(strings.TrimSpace(getenv("LOG_FORMAT"))); v {
	case "", "text":
	case "json":
		c.LogFormat = "json"
	default:
		return c, fmt.Errorf("LOG_FORMAT=%q: want text or json", v)
	}
	if v := strings.TrimSpace(getenv("DOCKER_HOST")); v != "none" {
		p, err := dockerapi.SocketPath(getenv)
		if err != nil {
			return c, err
		}
		c.DockerSocket = p
	}
	c.AntiEntropy = 30 * time.Second
	if v := strings.TrimSpace(getenv("ANTI_ENTROPY_INTERVAL")); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second {
			return c, fmt.Errorf("ANTI_ENTROPY_INTERVAL=%q: want a duration of at least 1s, like 30s", v)
		}
		c.AntiEntropy = d
	}
	c.PeerResync = 30 * time.Second
	if v := strings.TrimSpace(getenv("PEER_RESYNC_INTERVAL")); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second {
			return c, fmt.Errorf("PEER_RESYNC_INTERVAL=%q: want a duration of at least 1s, like 30s", v)
		}
		c.PeerResync = d
	}
	c.TrackBridged = true
	if v := strings.TrimSpace(getenv("BRIDGE_CONNTRACK")); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return c, fmt.Errorf("BRIDGE_CONNTRACK=%q: want true or false", v)
		}
		c.TrackBridged = b
	}
	if v := strings.TrimSpace(getenv("DATAPLANE_NAMESPACE")); v != "" {
		b, err := strconv.ParseBool(v)
		switch {
		case err == nil && b:
			c.DataplaneNS = "true" // the owner's mark, known once the store is
		case err == nil:
		case dataplaneNameRE.MatchString(v):
			c.DataplaneNS = v
		default:
			return c, fmt.Errorf("DATAPLANE_NAMESPACE=%q: want true, false, or a name of up to 64 letters, digits, '-' or '_'", v)
		}
	}
	if v := strings.TrimSpace(getenv("HOST_PID")); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return c, fmt.Errorf("HOST_PID=%q: want a process ID, like 1", v)
		}
		c.HostPID = n
	}
	c.IPAMGrace = ipam.DefaultGrace
	if v := strings.TrimSpace(getenv("IPAM_GRACE")); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second {
			return c, fmt.Errorf("IPAM_GRACE=%q: want a duration of at least 1s, like 1h", v)
		}
		c.IPAMGrace = d
	}
	var err error
	if c.PoolV4, c.PoolV4Size, err = poolSetting(getenv, "IPAM_DEFAULT_POOL", false); err != nil {
		return c, err
	}
	if c.PoolV6, c.PoolV6Size, err = poolSetting(getenv, "IPAM_DEFAULT_POOL_V6", true); err != nil {
		return c, err
	}
	return c, nil
}

// poolSetting reads NAME (a CIDR) and NAME_SIZE (a prefix length).
func poolSetting(getenv func(string) string, name string, v6 bool) (netip.Prefix, int, error) {
	var p netip.Prefix
	if v := strings.TrimSpace(getenv(name)); v != "" {
		var err error
		if p, err = netip.ParsePrefix(v); err != nil || p.Addr().Is6() != v6 {
			fam := "IPv4"
			if v6 {
				fam = "IPv6"
			}
			return p, 0, fmt.Errorf("%s=%q: want an %s CIDR", name, v, fam)
		}
		p = p.Masked()
	}
	size := 0
	if v := strings.TrimSpace(getenv(name + "_SIZE")); v != "" {
		n, err := strconv.Atoi(v)
		max := 32
		if v6 {
			max = 128
		}
		if err != nil || n < 1 || n > max || (p.IsValid() && n < p.Bits()) {
			return p, 0, fmt.Errorf("%s_SIZE=%q: want a prefix length from the pool's (%d) to %d", name, v, p.Bits(), max)
		}
		size = n
	}
	return p, size, nil
}

// resolveVTEP returns the underlay address: VTEP_ADDR, else the first
// global address of VTEP_INTERFACE, else the address the host uses for its
// default route. It looks in the process's network namespace.
func resolveVTEP(c Config) (netip.Addr, error) {
	return resolveVTEPWith(&netlink.Handle{}, c)
}

// resolveVTEPWith is resolveVTEP through a netlink handle (bound to a
// namespace in tests; the zero Handle is the current namespace).
func resolveVTEPWith(h *netlink.Handle, c Config) (netip.Addr, error) {
	if c.VTEP.IsValid() {
		return c.VTEP, nil
	}
	if c.VTEPIface != "" {
		link, err := h.LinkByName(c.VTEPIface)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("VTEP_INTERFACE=%q: %w", c.VTEPIface, err)
		}
		a, err := firstGlobalAddr(h, link)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("VTEP_INTERFACE=%q: %w", c.VTEPIface, err)
		}
		return a, nil
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := h.RouteListFiltered(family, &netlink.Route{Table: 254}, netlink.RT_FILTER_TABLE)
		if err != nil {
			continue
		}
		for _, r := range routes {
			if r.Dst != nil && !isDefault(r) {
				continue
			}
			if a, ok := netip.AddrFromSlice(r.Src); ok && r.Src != nil {
				return a.Unmap(), nil
			}
			link, err := h.LinkByIndex(r.LinkIndex)
			if err != nil {
				continue
			}
			if a, err := firstGlobalAddr(h, link); err == nil {
				return a, nil
			}
		}
	}
	return netip.Addr{}, errors.New("no default route to take the VTEP address from: set VTEP_ADDR or VTEP_INTERFACE")
}

func isDefault(r netlink.Route) bool {
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}

// firstGlobalAddr is a link's first global unicast address, IPv4 first.
func firstGlobalAddr(h *netlink.Handle, link netlink.Link) (netip.Addr, error) {
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		addrs, err := h.AddrList(link, family)
		if err != nil {
			return netip.Addr{}, err
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if ok && ip.Unmap().IsGlobalUnicast() {
				return ip.Unmap(), nil
			}
		}
	}
	return netip.Addr{}, fmt.Errorf("link %q has no global unicast address", link.Attrs().Name)
}

// nodeName decides this host's node name: NODE_NAME, else the name
// persisted at the first start (so a host keeps its identity even when
// Consul is down at a restart), else the local Consul agent's node name,
// else the hostname. The choice is persisted in DATA_DIR.
func nodeName(c Config, agentName func() (string, error)) (string, error) {
	if c.Node != "" {
		return c.Node, nil
	}
	path := filepath.Join(c.DataDir, "node-name")
	if b, err := os.ReadFile(path); err == nil {
		if n := strings.TrimSpace(string(b)); n != "" {
			return n, nil
		}
	}
	var name string
	if agentName != nil {
		if n, err := agentName(); err == nil && n != "" {
			name = n
		}
	}
	if name == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			return "", fmt.Errorf("no NODE_NAME, no Consul agent and no hostname: set NODE_NAME")
		}
		name = h
	}
	if err := os.MkdirAll(c.DataDir, 0o755); err != nil {
		return "", fmt.Errorf("DATA_DIR=%q: %w", c.DataDir, err)
	}
	if err := os.WriteFile(path, []byte(name+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("persist node name in %q: %w", path, err)
	}
	return name, nil
}
