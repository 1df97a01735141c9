// Package status collects what `consul-overlay status` prints: this host's
// identity and VTEP, the store and whether it answers, every logical
// network and every host of the cluster as the store has them, and the
// drift between the store and this host's kernel, entry by entry.
//
// It only reads: the store through List and Get (cluster.ReadState, never
// cluster.View, which removes orphan records), the kernel through
// vxlan.Inspect (netlink dumps). Nothing is written, so it is safe to run
// next to a live plugin, at any time, as often as wanted.
//
// # Drift
//
// For every logical network this host is a member of, the store implies
// the kernel state (cluster.DesiredPeers, as the driver programs it): the
// devices vx-<vni> (up) and vxbr-<vni>, one permanent neighbour entry IP→MAC
// per remote endpoint address, one FDB entry MAC→VTEP per remote endpoint
// and one flood (all-zeros MAC) destination per remote VTEP; and one
// bridge port vxh-<id10> per local endpoint record. Every difference is
// one Drift: the object, "missing" (the store has it, the kernel not),
// "unexpected" (the kernel has it, the store not) or "wrong" (both have it
// with other values), and both values. Overlays of this instance's owner
// mark whose VNI no membership lists are "unexpected" devices. Firewall
// rules are not compared.
//
// A drift seen once may be a change caught between the store write and
// its programming (the driver applies changes within milliseconds); one
// that stays is real.
package status
