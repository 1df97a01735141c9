package vxlan

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// routeSocket is a NETLINK_ROUTE socket of the Manager's namespace for the
// requests the netlink library does not make as the plugin needs them:
// one device's neighbour or FDB entries, which the library asks of the
// kernel for every device and filters itself (neighDump), and the two it
// spreads over several round trips: a
// veth pair created up, with its MTU, its peer's MAC and its master in one
// message (the library looks the new link up after creating it and sends
// the master in a request of its own), and a link's alias set by name
// (the library looks the index up first when it has none). The requests
// are built with the library's own message types (package nl).
type routeSocket struct {
	sockets map[int]*nl.SocketHandle
}

// openRouteSocket opens the socket in namespace ns (netns.None(): the
// caller's).
func openRouteSocket(ns netns.NsHandle) (*routeSocket, error) {
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open netlink route socket: %w", err)
	}
	return &routeSocket{sockets: map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: {Socket: s}}}, nil
}

func (r *routeSocket) close() {
	if r != nil {
		r.sockets[unix.NETLINK_ROUTE].Close()
	}
}

// errNoRouteSocket is the error of a request on a Manager made without
// kernel access (newManager with a nil handle, in unit tests).
var errNoRouteSocket = errors.New("the manager has no netlink route socket")

// execute sends req and waits for its acknowledgement.
func (r *routeSocket) execute(req *nl.NetlinkRequest) error {
	if r == nil {
		return errNoRouteSocket
	}
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// request starts a request of type typ that asks for an acknowledgement.
func (r *routeSocket) request(typ uint16, flags int) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(int(typ), unix.NLM_F_ACK|flags)
	if r != nil {
		req.Sockets = r.sockets
	}
	return req
}

// vethPair describes a veth pair to create: the host end up on the bridge
// with index master, the peer (container) end down with mac, in the
// namespace peerNS names (IFLA_NET_NS_FD; 0 or netns.None(): the
// request's). The peer cannot be brought up by the same request: the
// kernel configures it before it pairs the two, and a veth without its
// peer refuses to open (ENOTCONN, in either namespace; checked with
// iproute2 on 6.18).
type vethPair struct {
	name, peer string
	mtu        int
	master     int
	mac        net.HardwareAddr
	peerNS     netns.NsHandle
}

// addVethPair creates the pair in one request; an error wrapping
// unix.EEXIST means a name exists and nothing was made.
//
// Equivalent to: `ip link add <name> mtu <mtu> master <bridge> up type veth
// peer name <peer> mtu <mtu> address <mac> [netns <peerNS>]`.
func (r *routeSocket) addVethPair(v vethPair) error {
	req := r.request(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Flags, msg.Change = unix.IFF_UP, unix.IFF_UP
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(v.name)))
	req.AddData(nl.NewRtAttr(unix.IFLA_MTU, nl.Uint32Attr(uint32(v.mtu))))
	if v.master > 0 {
		req.AddData(nl.NewRtAttr(unix.IFLA_MASTER, nl.Uint32Attr(uint32(v.master))))
	}
	info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("veth"))
	peer := info.AddRtAttr(nl.IFLA_INFO_DATA, nil).AddRtAttr(nl.VETH_INFO_PEER, nil)
	nl.NewIfInfomsgChild(peer, unix.AF_UNSPEC)
	peer.AddRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(v.peer))
	if v.peerNS > 0 {
		peer.AddRtAttr(unix.IFLA_NET_NS_FD, nl.Uint32Attr(uint32(v.peerNS)))
	}
	peer.AddRtAttr(unix.IFLA_MTU, nl.Uint32Attr(uint32(v.mtu)))
	if v.mac != nil {
		peer.AddRtAttr(unix.IFLA_ADDRESS, []byte(v.mac))
	}
	req.AddData(info)
	return r.execute(req)
}

// setAlias sets the alias of the link named name.
//
// Equivalent to: `ip link set <name> alias <alias>`.
func (r *routeSocket) setAlias(name, alias string) error {
	req := r.request(unix.RTM_SETLINK, 0)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(name)))
	req.AddData(nl.NewRtAttr(unix.IFLA_IFALIAS, []byte(alias)))
	return r.execute(req)
}

// neighDump lists the neighbour (family unix.AF_INET or unix.AF_INET6)
// or FDB (unix.AF_BRIDGE) entries of the device with index idx, asking
// the kernel for that device's alone: NDA_IFINDEX for neighbours, the
// link message's index for FDB (the bridge port filter of the kernel's
// FDB dump, which also takes a device that is no port). The library's
// NeighList asks for every device's and drops the others': with one
// VXLAN device per network, the periodic resync of each network read the
// whole namespace's tables (issue 16). A kernel that does not filter
// answers with every device's entries, which are dropped here as before.
// An interrupted dump returns what it read with netlink.ErrDumpInterrupted,
// as the library does.
//
// Equivalent to: `ip neigh show dev vx-0a1b` or `bridge fdb show dev
// vx-0a1b`.
func (r *routeSocket) neighDump(idx, family int) ([]netlink.Neigh, error) {
	if r == nil {
		return nil, errNoRouteSocket
	}
	req := nl.NewNetlinkRequest(unix.RTM_GETNEIGH, unix.NLM_F_DUMP)
	req.Sockets = r.sockets
	if family == unix.AF_BRIDGE {
		m := nl.NewIfInfomsg(unix.AF_BRIDGE)
		m.Index = int32(idx)
		req.AddData(m)
	} else {
		req.AddData(&netlink.Ndmsg{Family: uint8(family)})
		req.AddData(nl.NewRtAttr(unix.NDA_IFINDEX, nl.Uint32Attr(uint32(idx))))
	}
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWNEIGH)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return nil, err
	}
	var out []netlink.Neigh
	for _, m := range msgs {
		n, derr := netlink.NeighDeserialize(m)
		if derr != nil || n.LinkIndex != idx || n.Family != family {
			continue
		}
		out = append(out, *n)
	}
	return out, err
}

// neighList lists device idx's entries of family (see neighDump) on the
// namespace's route socket, or with the library when it has none.
func (ns *netNS) neighList(idx, family int) ([]netlink.Neigh, error) {
	if ns.rt == nil {
		return ns.nl.NeighList(idx, family)
	}
	return ns.rt.neighDump(idx, family)
}
