package vxlan

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrNotFound reports that an object a call depends on does not exist, for
// example EnsureEndpoint on a network that was never ensured.
var ErrNotFound = errors.New("not found")

// DefaultPort is the IANA VXLAN UDP port.
const DefaultPort = 4789

// Config configures a Manager. Zero values take the documented defaults.
type Config struct {
	// VTEP is this host's underlay address, the source of every VXLAN
	// packet (required). Peers' VTEPs must be of the same family.
	VTEP netip.Addr
	// Port is the VXLAN UDP destination port (0: 4789).
	Port int
	// UnderlayMTU is the MTU of the underlay (0: the MTU of the link that
	// holds VTEP, read once by New).
	UnderlayMTU int
	// IPTables and IP6Tables are the iptables and ip6tables commands that
	// install the per-bridge firewall rules ("": looked up in PATH; "-":
	// disabled). Both "": the flavour the host uses, iptables-nft or
	// iptables-legacy when PATH has them (flavour.go). A command that cannot be found is logged and skipped.
	IPTables, IP6Tables string
	// Firewall is the flavour choice started ahead by DetectFirewall, used
	// when IPTables and IP6Tables are both "" (nil: New makes it).
	Firewall *FirewallDetection
	// Sysctl says how New raises the neighbour table limits
	// (gc_thresh1/2/3): "" through rtnetlink (RTM_SETNEIGHTBL, which needs
	// only CAP_NET_ADMIN and no writable /proc/sys); a path: in that
	// sysctl tree (for example /proc/sys); "-": leave them alone.
	Sysctl string
	// Owner tags this instance's kernel objects, so several instances
	// (for example with different KV prefixes) can share one network
	// namespace without touching each other's links and rules: every link
	// gets the alias OwnerMark(Owner) and every firewall rule the comment
	// OwnerMark(Owner). At most 64 letters, digits, '-' or '_' ("": the
	// default owner, whose mark "consul-overlay" is the one every instance
	// used before owners existed).
	Owner string
	// LinkLocal is the well-known IPv4 address (linklocal.go) put as a /32
	// on every overlay bridge, with firewall rules that let the
	// containers of each network reach its DNS port (and, with
	// Network.ConsulAPI, its Consul API port) and keep everyone else but
	// the host off it (invalid: none, and any left from before removed).
	LinkLocal netip.Addr
	// NoTrackBridged takes bridged overlay traffic out of conntrack: a
	// raw-table NOTRACK rule (iptables and ip6tables, one rule per owner,
	// `-t raw -A PREROUTING -i vxbr-+ -m addrtype ! --dst-type LOCAL -j
	// NOTRACK`) spares each bridged frame the connection tracking; traffic
	// to and from the host stays tracked. false (the zero value, and the
	// plugin's default: BRIDGE_CONNTRACK=true): tracked, and a NOTRACK rule
	// of this owner left from before is removed.
	NoTrackBridged bool
	// DataplaneNS is the path of a network namespace (for example
	// /run/consul-overlay/<name>, pinned by NSPin, as this process sees
	// it) that gets the bridge, the VXLAN device and the endpoints' host
	// ends of every network created from now on, out of reach of the host's
	// iptables hooks (docs/dataplane-namespace.md). The VXLAN device's UDP
	// socket, the endpoints' container ends and a gateway link per network
	// (vxg-<vni>, with the gateway and well-known addresses) stay in the
	// Manager's namespace. A network whose bridge or VXLAN device is in the
	// Manager's namespace stays there: the kernel does not move a bridge.
	// "": none, every device in the Manager's namespace.
	DataplaneNS string
	// Logger receives debug lines for each kernel write and info lines
	// for lifecycle events (nil: discard).
	Logger *slog.Logger
}

// Network is the desired state of one overlay network on this host.
type Network struct {
	// VNI is the VXLAN network identifier, 1..2^24-1; it names the links.
	VNI uint32
	// MTU of the network's links (0: underlay MTU minus the VXLAN overhead,
	// 50 bytes on an IPv4 underlay and 70 on an IPv6 one).
	MTU int
	// Gateways are addresses put on the bridge (for example 10.10.0.1/24
	// and fd00::1/64), so the host can reach its own endpoints. Other
	// global addresses on the bridge are removed.
	Gateways []netip.Prefix
	// Internal (docker network create --internal) cuts the network's
	// containers off the host as well: INPUT drops everything they start
	// towards any address of the host (FORWARD already drops everything
	// routed in or out of every overlay). Connections the host starts
	// (a health check) still get their replies.
	Internal bool
	// Encrypted carries the network's VXLAN packets to and from its peers
	// in IPsec ESP (ipsec.go); its default MTU is ESPOverhead smaller.
	Encrypted bool
	// ConsulAPI lets the network's containers reach the Consul API port
	// of Config.LinkLocal; without it their connections there are reset.
	ConsulAPI bool
	// Egress makes this host the way out of the network for its own
	// containers, as Docker's bridge network is (the driver then gives
	// containers the IPv4 gateway and Docker adds no docker_gwbridge
	// endpoint): FORWARD lets what they start through to anywhere but
	// another overlay or a Docker bridge (docker+, br-+; a port published
	// there on the host's address still answers), with its replies, and
	// POSTROUTING masquerades it behind the host's address
	// (firewall.go, egressRules). IPv4 only; not with Internal, nor with
	// Config.NoTrackBridged for a bridge in the host's namespace (the
	// masquerade needs the connection tracked).
	Egress bool
}

// NetworkInfo describes the links of an ensured network.
type NetworkInfo struct {
	Bridge string // vxbr-<vni %06x>
	VXLAN  string // vx-<vni %06x>
	MTU    int    // in force: higher than asked while containers keep it (keptMTU)
	// Gateway is the gateway link in the host's namespace, vxg-<vni
	// %06x>, of a network whose bridge and VXLAN device are in the
	// data-plane namespace; "" when they are in the host's.
	Gateway string
}

// Endpoint is the desired state of one local endpoint.
type Endpoint struct {
	// ID is the endpoint's identifier (Docker's 64-hex endpoint ID). Its
	// first 10 characters, letters or digits, name the veth ends.
	ID string
	// VNI is the network the endpoint belongs to; the network must exist.
	VNI uint32
	// MAC is the address of the container end (6 bytes, unicast).
	MAC net.HardwareAddr
}

// EndpointInfo describes an ensured endpoint's veth pair.
type EndpointInfo struct {
	HostIf      string // vxh-<id[:10]>, on the network's bridge
	ContainerIf string // vxc-<id[:10]>, in the host namespace until Docker moves it
	MTU         int
}

// Peer is one remote endpoint address reachable through a remote VTEP.
// A dual-stack endpoint is two Peers with the same MAC.
type Peer struct {
	VNI  uint32
	IP   netip.Addr
	MAC  net.HardwareAddr
	VTEP netip.Addr
}

// State is a full description of what the kernel should hold for this
// Manager's owner.
type State struct {
	Networks  []Network
	Endpoints []Endpoint
	Peers     []Peer
	// KeepStrays makes Reconcile ensure what is listed and remove nothing
	// else: no unlisted link, neighbour or FDB entry, or firewall rule.
	// Set it when the caller cannot prove that its list is complete (for
	// example the store shows none of the networks OwnedNetworks reports).
	KeepStrays bool
}

// Changes counts the kernel writes one call made. The zero value means the
// kernel already matched.
type Changes struct {
	Links      int // links created, replaced or removed
	LinkAttrs  int // link attributes changed in place: MTU, MAC, master, alias, up
	Addrs      int // bridge addresses added or removed
	Neighbours int // neighbour (IP to MAC) entries written or removed
	FDB        int // FDB entries (MAC to VTEP, and all-zeros flood entries) written or removed
	Rules      int // iptables and ip6tables chains and rules added or removed
	IPsec      int // xfrm states and policies written or removed
}

// Total is the number of kernel writes.
func (c Changes) Total() int {
	return c.Links + c.LinkAttrs + c.Addrs + c.Neighbours + c.FDB + c.Rules + c.IPsec
}

// Manager programs overlay networks into the kernel of one network
// namespace. It is safe for concurrent use: mu serialises every call.
type Manager struct {
	cfg       Config
	mark      string // OwnerMark(cfg.Owner): our links' alias, our rules' comment
	log       *slog.Logger
	nl        *netlink.Handle // host.nl: xfrm, the underlay, and what is host-wide
	host      *netNS          // the namespace the Manager programs (layout.go)
	dp        *netNS          // Config.DataplaneNS; nil: none
	ownHandle bool
	closeOnce sync.Once
	done      chan struct{} // closed by Close: background work ends
	fw        *firewall
	mtu       int // underlay MTU

	// mu serialises all kernel programming and guards peers.
	mu sync.Mutex
	// peers holds the desired remote peers per VNI, including those of
	// networks not ensured yet (programmed when the network is).
	peers map[uint32]*peerSet
	// sec is the encryption state (ipsec.go); guarded by mu.
	sec ipsecState
	// kept holds, per VNI, the VTEPs the FDB entries of an overlay send
	// to that a Reconcile with KeepStrays kept without being given it:
	// they stay in the underlay allowlist (wantVTEPs) until a complete
	// Reconcile or the network's DeleteNetwork; guarded by mu.
	kept map[uint32]map[netip.Addr]bool
	// inKernel is the peer set the last successful sync of each network
	// left in its VXLAN device (syncPeerEntries); guarded by mu.
	inKernel map[uint32]kernelPeers
	// scratchKeys and scratchWant are setPeers' and updateInPlace's
	// working space, reused from call to call (guarded by mu).
	scratchKeys []peerKey
	scratchWant map[peerKey]struct{}
	// perDevice, set by tests, makes Reconcile read each device's tables
	// on its own instead of dumping them once.
	perDevice bool

	// failAt, when set by tests, is called before each kernel write of a
	// create path with the step's name; an error fails that step.
	failAt func(step string) error
}

// New returns a Manager that programs the caller's network namespace. Call
// Close to release its netlink sockets.
func New(cfg Config) (*Manager, error) {
	m, err := open(cfg, netns.None())
	if err != nil {
		return nil, err
	}
	// The packet socket belongs to the caller's namespace, as the netlink
	// sockets do; NewAt's Manager sends no announcements.
	if m.host.announce, err = newAnnouncer(); err != nil {
		m.log.Warn("remote endpoints will not be announced", "error", err)
	}
	if m.dp != nil {
		if m.dp.announce, err = newAnnouncerIn(m.dp.fd); err != nil {
			m.log.Warn("remote endpoints will not be announced in the data-plane namespace", "error", err)
		}
	}
	return m, nil
}

// NewAt returns a Manager that programs the network namespace at path
// (a bind mount such as /run/netns/NAME), so a test can drive a namespace
// without switching the thread of a long-lived goroutine. iptables
// commands run in the caller's namespace unless Config points them at a
// wrapper. Call Close to release its netlink sockets, which hold the
// namespace.
func NewAt(cfg Config, path string) (*Manager, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("vxlan: open network namespace %s: %w", path, err)
	}
	defer ns.Close()
	return open(cfg, ns)
}

// open returns a Manager with netlink sockets of its own in namespace ns
// (netns.None(): the caller's).
func open(cfg Config, ns netns.NsHandle) (*Manager, error) {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("open netlink handle: %w", err)
	}
	rt, err := openRouteSocket(ns)
	if err != nil {
		h.Close()
		return nil, err
	}
	m, err := newManager(cfg, h)
	if err != nil {
		rt.close()
		h.Close()
		return nil, err
	}
	m.ownHandle, m.host.rt = true, rt
	if cfg.DataplaneNS != "" {
		if err := m.openDataplane(ns, cfg.DataplaneNS); err != nil {
			m.Close()
			return nil, err
		}
	}
	return m, nil
}

// openDataplane opens the sockets of the data-plane namespace at path, and
// keeps both namespaces open for the requests that name one from the
// other: the host's is ns (netns.None(): the caller's).
func (m *Manager) openDataplane(ns netns.NsHandle, path string) (retErr error) {
	var err error
	if ns == netns.None() {
		m.host.fd, err = netns.Get()
	} else {
		var fd int
		fd, err = unix.FcntlInt(uintptr(ns), unix.F_DUPFD_CLOEXEC, 0)
		m.host.fd = netns.NsHandle(fd)
	}
	if err != nil {
		m.host.fd = netns.None()
		return fmt.Errorf("vxlan: open the host's network namespace: %w", err)
	}
	dp := &netNS{m: m, fd: netns.None(), dp: true}
	defer func() {
		if retErr != nil {
			dp.close(true)
		}
	}()
	if dp.fd, err = netns.GetFromPath(path); err != nil {
		dp.fd = netns.None()
		return fmt.Errorf("vxlan: open data-plane namespace %s: %w", path, err)
	}
	if dp.fd.Equal(m.host.fd) {
		return fmt.Errorf("vxlan: data-plane namespace %s is the Manager's own namespace", path)
	}
	if dp.nl, err = netlink.NewHandleAt(dp.fd); err != nil {
		return fmt.Errorf("vxlan: open netlink handle in data-plane namespace %s: %w", path, err)
	}
	if dp.rt, err = openRouteSocket(dp.fd); err != nil {
		return fmt.Errorf("vxlan: data-plane namespace %s: %w", path, err)
	}
	m.dp = dp
	m.log.Info("data-plane namespace opened", "path", path)
	return nil
}

// newManager returns a Manager that programs the namespace h is bound to
// (nil: a Manager for checks that touch no kernel). It has no route
// socket: its caller adds one.
func newManager(cfg Config, h *netlink.Handle) (*Manager, error) {
	if !cfg.VTEP.IsValid() {
		return nil, errors.New("vxlan: VTEP address is required")
	}
	cfg.VTEP = cfg.VTEP.Unmap()
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.Port < 1 || cfg.Port > 65535 {
		return nil, fmt.Errorf("vxlan: port %d out of range", cfg.Port)
	}
	if err := validOwner(cfg.Owner); err != nil {
		return nil, fmt.Errorf("vxlan: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.LinkLocal = cfg.LinkLocal.Unmap(); cfg.LinkLocal.IsValid() && (!cfg.LinkLocal.Is4() || cfg.LinkLocal.IsUnspecified() || cfg.LinkLocal.IsLoopback() || cfg.LinkLocal.IsMulticast()) {
		return nil, fmt.Errorf("vxlan: link-local address %s: want a unicast IPv4 address", cfg.LinkLocal)
	}
	m := &Manager{
		cfg:   cfg,
		mark:  OwnerMark(cfg.Owner),
		log:   cfg.Logger,
		nl:    h,
		done:  make(chan struct{}),
		peers: map[uint32]*peerSet{},
	}
	m.host = &netNS{m: m, nl: h, fd: netns.None()}
	m.mtu = cfg.UnderlayMTU
	if m.mtu == 0 {
		mtu, link, err := m.underlayMTU()
		if err != nil {
			return nil, err
		}
		m.mtu = mtu
		m.log.Info("underlay detected", "link", link, "vtep", cfg.VTEP, "mtu", mtu)
	}
	if OverlayMTU(m.mtu, cfg.VTEP.Is6(), 0) < minMTU {
		return nil, fmt.Errorf("vxlan: underlay MTU %d leaves no room for VXLAN", m.mtu)
	}
	if cfg.IPTables == "" && cfg.IP6Tables == "" && cfg.Firewall != nil {
		m.fw = cfg.Firewall.firewall(m.log)
	} else if cfg.IPTables == "" && cfg.IP6Tables == "" {
		m.fw = newDetectedFirewall(context.Background(), m.log, newFlavourDetector(m.log))
	} else {
		m.fw = newFirewall(m.log, cfg.IPTables, cfg.IP6Tables)
	}
	m.fw.mark = m.mark
	m.fw.notrack = cfg.NoTrackBridged
	switch {
	case h == nil || m.fw.detector == nil:
	case !m.fw.flavour.settled:
		m.watchFlavour(defaultFlavourWatch)
	case len(m.fw.flavour.others) > 0:
		go func() {
			m.mu.Lock()
			defer m.mu.Unlock()
			m.purgeOtherFlavours(context.Background())
		}()
	}
	switch cfg.Sysctl {
	case "-":
	case "":
		raiseNeighTables(m.log)
	default:
		raiseGCThresh(cfg.Sysctl, m.log)
	}
	return m, nil
}

// Close releases the sockets New or NewAt opened. A second Close does
// nothing.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		close(m.done)
		m.dp.close(true)
		m.host.close(m.ownHandle)
	})
	return nil
}

// underlayMTU finds the link that holds the VTEP address.
func (m *Manager) underlayMTU() (int, string, error) {
	family := netlink.FAMILY_V4
	if m.cfg.VTEP.Is6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return m.nl.AddrList(nil, family) })
	if err != nil {
		return 0, "", fmt.Errorf("vxlan: list addresses: %w", err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || ip.Unmap() != m.cfg.VTEP {
			continue
		}
		l, err := m.nl.LinkByIndex(a.LinkIndex)
		if err != nil {
			return 0, "", fmt.Errorf("vxlan: link %d holding vtep %s: %w", a.LinkIndex, m.cfg.VTEP, err)
		}
		return l.Attrs().MTU, l.Attrs().Name, nil
	}
	return 0, "", fmt.Errorf("vxlan: vtep %s is not an address of any link (set Config.UnderlayMTU or fix the VTEP): %w", m.cfg.VTEP, ErrNotFound)
}

// step runs the fault-injection hook.
func (m *Manager) step(name string) error {
	if m.failAt == nil {
		return nil
	}
	if err := m.failAt(name); err != nil {
		return fmt.Errorf("step %s: %w", name, err)
	}
	return nil
}

// stepOnce returns a function that passes fault point name the first
// time it is called and does nothing after: a sync's writes pass their
// point once, before the first addition.
func (m *Manager) stepOnce(name string) func() error {
	stepped := false
	return func() error {
		if stepped {
			return nil
		}
		stepped = true
		return m.step(name)
	}
}

// networkMTU is the MTU a network's links get.
func (m *Manager) networkMTU(n Network) int {
	if n.Encrypted && n.MTU == 0 {
		return m.MaxEncryptedMTU()
	}
	return OverlayMTU(m.mtu, m.cfg.VTEP.Is6(), n.MTU)
}

// MaxEncryptedMTU is MaxMTU less the ESP overhead: the largest MTU, and the
// default, of an encrypted network.
func (m *Manager) MaxEncryptedMTU() int { return m.MaxMTU() - ESPOverhead }

// MaxMTU is the largest overlay MTU the underlay carries without
// fragmenting: the underlay's MTU minus the VXLAN overhead. It is also the
// MTU of a network that does not override it.
func (m *Manager) MaxMTU() int {
	return OverlayMTU(m.mtu, m.cfg.VTEP.Is6(), 0)
}
