// Package driver implements Docker's remote network driver protocol for
// consul-overlay: one VXLAN overlay per logical network, shared by every
// host that creates a Docker network with the same -o name (or, without a
// name, the same subnet).
//
// Docker 23+ has no cluster store, so the driver reports Scope "local":
// each host's engine owns its own NetworkID, and the driver ties those
// local IDs to one logical network through the store. State layout, all
// keys under the store's prefix:
//
//	networks/<key>/config          the logical network: VNI, subnets,
//	                               gateways, MTU, and the hosts that joined
//	                               it (node -> local NetworkID and VTEP)
//	networks/<key>/endpoints/<id>  one endpoint: node, VTEP, addresses, MAC
//	vnis/<vni>                     the VNI reservation, unique cluster-wide
//
// Every write is a compare-and-set or a transaction, so two hosts racing to
// create the same network, or two networks racing for one VNI, resolve to
// one winner. Each host watches networks/<key>/ for the networks it has
// joined and programs the remote endpoints into the kernel (neighbour and
// FDB entries) through the data plane; nothing is learned by flooding.
//
// Handlers never call the Docker API and never block beyond their timeout:
// a store outage fails calls that need the store with a clear error while
// the kernel state, and so running containers, stay untouched.
package driver
