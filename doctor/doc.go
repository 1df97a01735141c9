// Package doctor runs the checks of `consul-overlay doctor`: the store
// answers and the token reads the prefix; the token has every permission
// the plugin needs (the plugin's own start-up probes, package consulacl,
// plus KV write); every member host of this host's
// networks answers an ICMP echo sent across the overlay (VXLAN over UDP
// 4789); the path carries packets of the overlay MTU with DF set (and, if
// not, the largest size that passes, by bisection); the firewall backend,
// kernel modules and sysctls; a second instance or a foreign owner of our
// devices; the clock against Consul's. Each check is PASS, WARN or FAIL with
// what to do.
//
// # The overlay probe
//
// Every host's bridge carries the same gateway address (an anycast
// gateway), so an echo sent from the gateway address would be answered to
// the remote host's own bridge, never to this one. The probe therefore
// speaks as one of this host's endpoints: an Ethernet frame with a local
// endpoint's MAC and IPv4 address as source and a remote endpoint's as
// destination is written with a packet socket onto this host's VXLAN
// device, which encapsulates it to the remote VTEP by its FDB entry exactly
// as it does the container's own traffic. The remote container answers
// through its host's VXLAN device (whose proxy neighbour entry names the
// local endpoint), and the reply is read from the same packet socket as it
// arrives on this host's VXLAN device (it then also reaches the local
// container, which drops an echo reply it did not ask for). The frames
// carry DF, so the same probe at the overlay MTU tests the path MTU.
//
// It needs a local endpoint with an IPv4 address on the network (WARN
// otherwise) and a remote one on each other member host (WARN otherwise).
// It sends a handful of frames and changes nothing.
package doctor
