package vxlan

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// routeSocket is a NETLINK_ROUTE socket of the Manager's namespace for the
// two requests the netlink library spreads over several round trips: a
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
