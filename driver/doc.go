// Package driver implements Docker's remote network driver protocol for
// consul-overlay: one VXLAN overlay per logical network, shared by every
// host that creates a Docker network with the same -o name (or, without a
// name, the same subnet).
//
// Docker 23+ has no cluster store, so the driver reports Scope "local":
// each host's engine owns its own NetworkID, and the driver ties those
// local IDs to one logical network through the cluster state. The driver
// is a thin adapter: package cluster owns the store's schema, the
// compare-and-set writes, the memberships (keyed by the host's HostID,
// never its node name) and the watch; the data plane (package vxlan)
// programs the kernel. For each logical network this host is a member of,
// one goroutine drives the cluster's peer watch (cluster.PeerWatch: the
// store's snapshots in, the desired peers out) and hands a change to the
// data plane as its difference (ChangePeers), or the peers whole when the
// data plane cannot take the difference, at a retry and at the periodic
// resync (UpdatePeers, SetPeers); the driver keeps no peer table of its
// own.
// See package cluster for the key layout and the fencing rules.
//
// Several Docker networks of this host may be bound to one logical network
// (after a crash made Docker retry CreateNetwork under a new ID); they
// share one bridge and VNI, which go with the last of them. PruneNetworks
// unbinds the IDs Docker no longer has.
//
// At start the driver restores its view from the store. It never trusts an
// empty view: when the store shows nothing of this host (no host record,
// no membership) while the kernel holds overlays, it keeps them, logs an
// error naming what to check, and retries; only a proven view reconciles
// the kernel and removes overlays the store does not list. A host started
// on another underlay address than it published republishes it, as
// SetVTEP does at run time.
//
// Each step boundary of CreateNetwork, CreateEndpoint, Join, Leave,
// DeleteEndpoint and DeleteNetwork is a fault point (internal/fault) that
// the crash-injection tests kill the process at; each call's retry after
// such a crash succeeds and leaks nothing.
//
// Handlers never call the Docker API and never block beyond their timeout:
// a store outage fails calls that need the store with a clear error while
// the kernel state, and so running containers, stay untouched.
package driver
