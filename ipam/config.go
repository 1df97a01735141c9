package ipam

import (
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"time"
)

// Names of the two address spaces this driver serves. They are stable:
// they are part of every PoolID, and PoolIDs are persisted by Docker.
const (
	LocalAddressSpace  = "ConsulOverlayLocal"
	GlobalAddressSpace = "ConsulOverlayGlobal"
)

// Option keys Docker sends in RequestAddress options.
const (
	// RequestAddressTypeOption marks the gateway request
	// (ipamapi.RequestAddressType in libnetwork).
	RequestAddressTypeOption = "RequestAddressType"
	// GatewayAddressType is the value of RequestAddressTypeOption for the
	// network's gateway.
	GatewayAddressType = "com.docker.network.gateway"
	// EndpointNameOption carries the endpoint's name (Docker v29 and later).
	EndpointNameOption = "com.docker.network.endpoint.name"
	// MACAddressOption carries the endpoint's MAC when the driver reports
	// RequiresMACAddress.
	MACAddressOption = "com.docker.network.endpoint.macaddress"
)

// Limits on pool sizes.
const (
	// MinPrefixLenV4 is the shortest IPv4 prefix accepted: /8. Larger pools
	// are refused; nothing here needs more, and a /8 is already 16M
	// addresses.
	MinPrefixLenV4 = 8
	// MaxPrefixLenV4 is the longest IPv4 prefix accepted: a /30 has two
	// usable addresses (a /31 or /32 has none once the network and
	// broadcast addresses are excluded).
	MaxPrefixLenV4 = 30
	// MinPrefixLenV6 is the shortest IPv6 prefix accepted: /32.
	MinPrefixLenV6 = 32
	// MaxPrefixLenV6 is the longest IPv6 prefix accepted: a /127 has one
	// usable address (the subnet-router anycast address is excluded).
	MaxPrefixLenV6 = 127
)

// KeptUnknown is Config.Kept's answer when it cannot tell yet (the
// network driver is still restoring its state): every hold is kept, and
// the release is applied once Config.Restored says Kept can tell.
const KeptUnknown = math.MaxInt

// Defaults for the zero values of Config.
var (
	DefaultPoolV4 = netip.MustParsePrefix("10.200.0.0/16")
	DefaultPoolV6 = netip.MustParsePrefix("fd69:6f76:6572::/48")
)

const (
	DefaultPoolV4Size = 24
	DefaultPoolV6Size = 64
	DefaultTimeout    = 5 * time.Second
	// DefaultGrace is the zero value of Config.Grace.
	DefaultGrace = time.Hour
)

// Config configures a Driver. Each zero value means the default named.
type Config struct {
	// Node is this host's identity in the store (required): it is recorded
	// as the holder of pools and addresses, and every release, reclaim and
	// sweep acts only on what Node holds. It must be unique in the cluster
	// and stable across restarts: pass the host ID that start-up persists
	// in DATA_DIR, not a node name (two hosts on one shared Consul agent
	// have the same agent node name, and would then release each other's
	// addresses and pool holds).
	Node string
	// DefaultPoolV4 is the range automatic IPv4 pools are cut from.
	// Zero: 10.200.0.0/16.
	DefaultPoolV4 netip.Prefix
	// DefaultPoolV4Size is the prefix length of automatic IPv4 pools.
	// Zero: 24.
	DefaultPoolV4Size int
	// DefaultPoolV6 is the range automatic IPv6 pools are cut from.
	// Zero: fd69:6f76:6572::/48 (ULA).
	DefaultPoolV6 netip.Prefix
	// DefaultPoolV6Size is the prefix length of automatic IPv6 pools.
	// Zero: 64.
	DefaultPoolV6Size int
	// Timeout bounds each plugin call (RequestPool, RequestAddress...), which
	// carry no context of their own. Zero: 5s.
	Timeout time.Duration
	// NoMACAddress, when false (the zero value), makes GetCapabilities
	// report RequiresMACAddress: Docker then sends every endpoint's MAC with
	// its address request. Engines older than v29 send nothing else that
	// tells a container's --ip request apart from an --aux-address request,
	// and the two need different rules (an aux address is shared by every
	// host of the network, a container's address is exclusive). Docker
	// generates a random MAC when the user gave none, so the network driver
	// then receives Interface.MacAddress set and must not return one. Set
	// NoMACAddress to leave MACs to the network driver; an explicit address
	// without endpoint name or MAC is then treated as a shared reservation.
	NoMACAddress bool
	// Grace is how long a reclaimed address (a tombstone, see
	// ReclaimAddress) waits for Docker's own ReleaseAddress before Sweep
	// frees it, and how old an address record of this host must be before
	// Sweep may take it for an orphan. It must be longer than Docker may
	// take to send the release of a removed container (dockerd releases
	// leftover endpoints at its next start) and than any RequestAddress to
	// CreateEndpoint gap. Zero: DefaultGrace (1h).
	Grace time.Duration
	// InUse, if set, reports whether an endpoint of this host's network
	// driver uses address a of pool poolID right now (created and not yet
	// deleted). Docker releases an endpoint's address only after its
	// DeleteEndpoint, so ReleaseAddress ignores the release of an address
	// that InUse reports in use: it is a stale release meant for an earlier
	// holder (a container reclaimed longer ago than Grace), and the current
	// holder keeps its address. InUse returns false for an address that is
	// not the network driver's to know (another driver's network: the
	// release then frees it, as without InUse); while the network driver
	// cannot tell yet (restoring its state after a start) it may answer
	// true: the release is then ignored, and Sweep reclaims the address
	// later if nothing holds it. It must not do I/O (it may wait briefly
	// for that restore) and must not call back into the Driver. poolID is
	// as Docker sent it; ParsePoolID splits it. Zero: every release is
	// honoured.
	InUse func(poolID string, a netip.Addr) bool
	// InContainer, if set, reports whether a running container of this
	// host holds address a of pool poolID now (the network driver asks the
	// kernel), true when that cannot be told. A request for an explicit
	// address that names the endpoint the address was granted to (Docker's
	// retry, or the container started again under its name) gets it again
	// only while no container holds it: `docker rename` renames a running
	// container's endpoint without telling IPAM, so a new container under
	// the old name is another endpoint (ErrAddressInUse). nil: not asked.
	InContainer func(poolID string, a netip.Addr) bool
	// Held, if set, reports whether an endpoint of this host's network
	// driver has address a of pool poolID now, from memory (no I/O, no
	// wait). An address that has no record but that Held reports is not
	// handed out: the store lost its record (an eviction while this host
	// was away, before the re-assertion took it back) while a container of
	// this host runs with it. The next free address is handed out instead,
	// and a request for it as an explicit address is ErrAddressInUse.
	// ReassertAddress, which takes it back for that endpoint, does not ask.
	// nil: not asked.
	Held func(poolID string, a netip.Addr) bool
	// HeldReady, if set, is called once by an address request that may
	// ask Held, first: it waits (bounded) until Held can answer, and its
	// error fails the request (a network driver still restoring its state
	// does not know its endpoints yet, and would let a running container's
	// address be handed out). nil: Held answers at once.
	HeldReady func() error
	// Kept, if set, reports how many holds of pool poolID (gw invalid), or
	// of its gateway gw, this host must keep: one per network of this host
	// on the pool (using gw) that has endpoints, since Docker releases a
	// network's pool only once it has none. A ReleasePool, or a release of
	// the gateway, that would leave fewer is not such a network's, and is
	// ignored: engines 28 and 29 send the releases of `docker network rm`
	// before its DeleteNetwork and send them again when the removal is
	// tried again after DeleteNetwork failed; and a re-assertion after an
	// eviction may have counted the network out already. It must not call
	// back into the Driver. nil: every release is honoured.
	Kept func(poolID string, gw netip.Addr) int
	// Restored, if set, is closed once Kept can tell (the network driver
	// has restored its state). A release Kept answers KeptUnknown for is
	// applied then, Kept asked again; nil: such a release is ignored, and
	// the pool sweep drops a hold no network uses. Docker's releases
	// (ReleaseAddress, ReleasePool) first wait for it, at most Timeout,
	// before their own Timeout starts: InUse and Kept wait for the same
	// restore, and a restore that ends late in that wait left the store
	// too little of the call's time.
	Restored func() <-chan struct{}
	// Logger receives debug lines for each store write. Zero: slog.Default().
	Logger *slog.Logger
}

func (c Config) withDefaults() (Config, error) {
	if c.Node == "" {
		return c, fmt.Errorf("ipam config: node name is required: %w", ErrInvalidRequest)
	}
	if !c.DefaultPoolV4.IsValid() {
		c.DefaultPoolV4 = DefaultPoolV4
	}
	if c.DefaultPoolV4Size == 0 {
		c.DefaultPoolV4Size = DefaultPoolV4Size
	}
	if !c.DefaultPoolV6.IsValid() {
		c.DefaultPoolV6 = DefaultPoolV6
	}
	if c.DefaultPoolV6Size == 0 {
		c.DefaultPoolV6Size = DefaultPoolV6Size
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.Timeout < 0 {
		return c, fmt.Errorf("ipam config: negative timeout %s: %w", c.Timeout, ErrInvalidRequest)
	}
	if c.Grace == 0 {
		c.Grace = DefaultGrace
	}
	if c.Grace < 0 {
		return c, fmt.Errorf("ipam config: negative grace period %s: %w", c.Grace, ErrInvalidRequest)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	c.DefaultPoolV4 = c.DefaultPoolV4.Masked()
	c.DefaultPoolV6 = c.DefaultPoolV6.Masked()
	if err := checkDefaultRange(c.DefaultPoolV4, c.DefaultPoolV4Size, false); err != nil {
		return c, err
	}
	if err := checkDefaultRange(c.DefaultPoolV6, c.DefaultPoolV6Size, true); err != nil {
		return c, err
	}
	return c, nil
}

func checkDefaultRange(r netip.Prefix, size int, v6 bool) error {
	fam := ipFamily(v6)
	if r.Addr().Is6() != v6 || r.Addr().Is4In6() {
		return fmt.Errorf("ipam config: default %s range %s has the wrong address family: %w", fam, r, ErrInvalidRequest)
	}
	lo, hi := prefixLimits(v6)
	if size < lo || size > hi {
		return fmt.Errorf("ipam config: default %s pool size /%d outside /%d../%d: %w", fam, size, lo, hi, ErrInvalidRequest)
	}
	if size < r.Bits() {
		return fmt.Errorf("ipam config: default %s pool size /%d larger than its range %s: %w", fam, size, r, ErrInvalidRequest)
	}
	return nil
}

// prefixLimits returns the shortest and longest prefix length accepted for a
// pool of the family.
func prefixLimits(v6 bool) (minLen, maxLen int) {
	if v6 {
		return MinPrefixLenV6, MaxPrefixLenV6
	}
	return MinPrefixLenV4, MaxPrefixLenV4
}
