// Package vxlan is consul-overlay's data plane: the only code that programs
// the kernel. It knows nothing of Docker or Consul. Callers give it the
// desired state: networks, local endpoints, remote peers. It makes the
// kernel of one network namespace match.
//
// # Topology
//
// Without Config.DataplaneNS all devices live in the host namespace, so
// they survive a plugin restart. Per network (VNI v, printed as 6 hex
// digits):
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
// With Config.DataplaneNS (docs/dataplane-namespace.md), a network created
// from then on has its bridge, VXLAN device and endpoint host ends in that
// namespace, the data plane's, where the host's iptables hooks do not see
// its bridged frames:
//
//	container ns        data-plane ns                         host ns
//	 eth0 ──veth── vxh-<id10> ─┐
//	                           ├─ vxbr-<v> (bridge, no address)
//	 eth0 ──veth── vxh-<id10> ─┤
//	                           ├─ vxp-<v> ──veth── vxg-<v>  (gateway addresses, well-known /32)
//	                           └─ vx-<v>  (VXLAN device; its UDP socket is the host's)
//
// The VXLAN device is created by a request on the host's socket that names
// the data-plane namespace, so the kernel opens its UDP socket in the
// host's namespace (the underlay, its port and its allowlist stay there)
// and puts the device in the other; its neighbour and FDB entries are
// written there. An endpoint's pair is one request in the data-plane
// namespace whose container end (vxc-<id10>) is created in the host's,
// where Docker looks for it. The gateway pair vxp-<v>/vxg-<v> keeps the
// host on-link with the network's containers: vxg-<v> carries what the
// bridge carries in the other layout. A network whose bridge or VXLAN
// device is in the host's namespace stays there (the kernel does not move
// a bridge between namespaces, and rebuilding it would take its
// containers' links down), so a Manager reconciles both layouts and finds
// each network where it is; only new networks go to the data-plane
// namespace. Reconcile, the Delete calls, EndpointInUse, EndpointsInUse,
// NetworksInUse, OwnedNetworks, ForeignOwners and InspectDataplane read
// both namespaces. The Manager keeps a netlink handle and a route socket
// bound to each (layout.go); the caller keeps the namespace alive (NSPin).
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
// at the sender with "message too long" instead of vanishing. A lower MTU
// is not applied to the bridge and VXLAN device while a running
// container's veth is on the bridge (its end keeps the larger MTU, whose
// frames the bridge would drop): the MTU in force is kept, logged at error
// level and returned, until no container uses the network on this host.
//
// # Ownership and restarts
//
// Every link we create has a deterministic name of at most 15 characters
// (vx-%06x, vxbr-%06x, vxh- and vxc- plus the first 10 characters of the
// endpoint ID) and, as its alias, the owner mark of the Manager:
// OwnerMark(Config.Owner), "consul-overlay-<owner>", or "consul-overlay"
// for the default owner "". Several instances (owners, for example one per
// KV prefix) can share one namespace:
//   - Reconcile removes only links that match one of the exact names, carry
//     this owner's mark, and that the desired state does not mention.
//     Docker's br-<hex> bridges and veth<hex> links never match, nor do
//     other owners' links;
//   - a link of one of our names that carries another owner's mark is never
//     modified: Ensure calls fail with a *ForeignLinkError ("vx-001000
//     belongs to consul-overlay instance <owner>", errors.Is ErrForeign);
//     DeleteNetwork and DeleteEndpoint skip it and log a warning (for this
//     owner it is already gone, and Docker's cleanup must not fail); AddPeer
//     and DeletePeer keep the peer without programming another owner's
//     VXLAN device;
//   - a link without any consul-overlay mark (for example one whose creator
//     crashed between creating and marking it) is adopted by Ensure and
//     deleted by Delete calls, but not removed by Reconcile;
//   - links with the plain alias "consul-overlay", which every instance set
//     before owners existed, belong to the default owner, so an upgraded
//     plugin with Owner "" keeps reconciling its devices in place.
//
// Ensure calls keep a device that already matches and fix attributes (MTU,
// master, up, MAC, addresses) in place, so a plugin restart followed by
// Reconcile does not drop a packet; Reconcile returns the writes it made,
// zero when the kernel already matched. Every create path undoes what it
// created when a later step fails.
//
// A caller that cannot prove its desired state is complete (the store view
// may be empty or foreign) sets State.KeepStrays: Reconcile then ensures
// what is listed and removes nothing, not even neighbour and FDB entries of
// a listed network. OwnedNetworks lists the VNIs of this owner's overlays in
// the kernel, so the caller can see overlays its store does not list.
// EndpointInUse reports an endpoint whose container end is in another
// namespace (a container's): it must never be reclaimed.
//
// # Firewall
//
// With dockerd running, FORWARD's policy is DROP and br_netfilter sends
// bridged frames through iptables (in the host's namespace: a network in
// the data-plane namespace meets the host's hooks only on its gateway
// link, and its rules are on vxg-<v>, firewall.go). The package keeps a chain
// CONSUL-OVERLAY, jumped to from the top of FORWARD, with three rules per
// bridge in iptables and ip6tables: bridged traffic within the network is
// accepted; anything routed into or out of the bridge is dropped, which
// keeps overlays isolated from each other and from docker_gwbridge even
// though the bridge may carry a gateway address. Every rule carries the
// owner mark as a comment (-m comment --comment consul-overlay-<owner>),
// and an instance removes only rules with its own mark; the default owner
// also replaces the uncommented rules of plugins from before owners
// existed. The chain and the FORWARD jump are shared by all owners and
// never removed (an empty chain costs nothing; removing it would race with
// another instance). The commands are configurable; without them the
// package picks the iptables flavour (nft or legacy) that holds dockerd's
// rules, and moves its rules there if dockerd's appear in the other
// flavour after its first writes (flavour.go); without any command it logs
// a warning and carries on.
//
// # Encryption
//
// A network with Encrypted set carries its VXLAN packets to and from its
// peers' VTEPs in IPsec ESP, transport mode (ipsec.go): mangle rules pick
// the encrypted VNIs out of UDP Port with -m u32, mark them for the xfrm
// out policies and drop them on input unless they came through IPsec;
// states come from the key ring SetIPsecKeys gives. Its default MTU is
// ESPOverhead (40) bytes smaller.
//
// # The well-known address
//
// Config.LinkLocal (the well-known address, linklocal.go) adds a labelled
// /32 on every bridge (gateway link, in the data-plane layout) and, in CONSUL-OVERLAY-INPUT, the rules that let only
// the host and the overlays' containers reach its DNS and Consul API ports.
//
// # Kernel tweaks
//
// New raises the neighbour table limits (gc_thresh1/2/3 to 8192, 49152 and
// 65536, IPv4 and IPv6) once and only upwards, as Docker's overlay does.
//
// # Concurrency
//
// A Manager serialises its calls with one mutex; kernel writes are quick.
// It uses netlink handles bound to its namespaces, never switching the
// namespace of a goroutine (New opens the data-plane namespace's packet
// socket on a locked thread that returns to its namespace).
package vxlan
