// Package vxlan is consul-overlay's data plane: the only code that programs
// the kernel. It knows nothing of Docker or Consul. Callers give it the
// desired state: networks, local endpoints, remote peers. It makes the
// kernel of one network namespace match.
//
// # Topology
//
// All devices live in the host namespace, so they survive a plugin
// restart. Per network (VNI v, printed as 6 hex digits):
//
//	container ns          host ns
//	 eth0 ──veth── vxh-<id10> ─┐
//	                           ├─ vxbr-<v> (bridge, optional gateway addresses)
//	 eth0 ──veth── vxh-<id10> ─┤
//	                           └─ vx-<v> (VXLAN: VNI v, local VTEP, UDP port,
//	                                      nolearning, proxy) ── underlay UDP
//
// EnsureEndpoint creates the veth pair vxh-<id10>/vxc-<id10>: the host end
// goes on the bridge, the container end stays in the host namespace with
// the endpoint's MAC until Docker moves it into the container and renames
// it. Both ends get the network's MTU; Docker does not set one.
//
// # Static peers, no flooding
//
// Nothing is learned. For every remote endpoint address the VXLAN device
// gets:
//   - a permanent neighbour entry IP→MAC. The device's proxy flag makes it
//     answer ARP requests and IPv6 neighbour solicitations from these
//     entries locally, so no neighbour request crosses the underlay;
//   - an FDB entry MAC→remote VTEP, written with replace semantics
//     (NeighSet) so a stale entry never blocks it.
//
// Per remote VTEP it gets one destination on the all-zeros FDB entry
// (NeighAppend), so broadcast and multicast (and unknown unicast) still
// reach every host of the network. The entries are derived from the set of
// desired peers, which makes them refcounted: the FDB entry of a MAC stays
// while any address of it is a peer (IPv4 and IPv6 of one endpoint share
// it); the all-zeros destination stays while any peer is behind the VTEP;
// if two peers claim one IP, the latest added is programmed and the other
// takes over when it goes. Peers of a network not yet ensured are kept and
// programmed when it is.
//
// # MTU
//
// The underlay MTU is read from the link that holds the VTEP address (or
// given in Config). A network's MTU is that minus 50 bytes on an IPv4
// underlay and 70 on an IPv6 one (inner Ethernet, VXLAN, UDP and outer IP
// headers), unless the network overrides it. A packet too big for it fails
// at the sender with "message too long" instead of vanishing.
//
// # Ownership and restarts
//
// Every link we create has a deterministic name of at most 15 characters
// (vx-%06x, vxbr-%06x, vxh- and vxc- plus the first 10 characters of the
// endpoint ID) and the alias "consul-overlay". Reconcile removes only links
// that match one of those exact names and carry the alias, and that the
// desired state does not mention; Docker's br-<hex> bridges and veth<hex>
// links never match. Ensure calls keep a device that already matches and
// fix attributes (MTU, master, up, MAC, addresses) in place, so a plugin
// restart followed by Reconcile does not drop a packet; Reconcile returns
// the writes it made, zero when the kernel already matched. Every create
// path undoes what it created when a later step fails.
//
// # Firewall
//
// With dockerd running, FORWARD's policy is DROP and br_netfilter sends
// bridged frames through iptables. The package keeps a chain
// CONSUL-OVERLAY, jumped to from the top of FORWARD, with three rules per
// bridge in iptables and ip6tables: bridged traffic within the network is
// accepted; anything routed into or out of the bridge is dropped, which
// keeps overlays isolated from each other and from docker_gwbridge even
// though the bridge may carry a gateway address. The commands are
// configurable; without them the package logs a warning and carries on.
//
// # Kernel tweaks
//
// New raises the neighbour table limits (gc_thresh1/2/3 to 8192, 49152 and
// 65536, IPv4 and IPv6) once and only upwards, as Docker's overlay does.
//
// # Concurrency
//
// A Manager serialises its calls with one mutex; kernel writes are quick.
// It uses a netlink handle bound to its namespace, never switching the
// namespace of a goroutine.
package vxlan
