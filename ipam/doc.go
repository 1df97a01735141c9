// Package ipam is consul-overlay's IPAM driver: pools and addresses that are
// unique across every host, kept in a kvstore.Store (Consul in a cluster,
// the embedded bbolt store on a single host). It implements
// go-plugins-helpers' ipam.Ipam and offers the same operations with a
// context (AllocatePool, FreePool, AllocateAddress, FreeAddress, PoolInfo)
// for the network driver, plus ReclaimAddress, Sweep and SweepPools (see
// "Reclaim, tombstones and sweeps").
//
// Config.Node is the host's identity in the store: every hold names it, and
// a host releases, reclaims and sweeps only what names it. It must be
// unique in the cluster and stable across restarts, so it is the host ID
// persisted in DATA_DIR, never a node name (hosts sharing one Consul agent
// share its node name).
//
// # Address spaces and pool IDs
//
// Two address spaces, LocalAddressSpace ("ConsulOverlayLocal") and
// GlobalAddressSpace ("ConsulOverlayGlobal"). Each is a separate namespace
// of non-overlapping pools, as in Docker's IPAM model; Docker picks the
// local one for local-scope drivers. Owns tells the network driver that an
// address space is ours.
//
// A PoolID is "<space>/<subnet>" or "<space>/<subnet>/<ip-range>", for
// example "ConsulOverlayLocal/10.1.0.0/24". It is derived from the request
// alone, so every host gets the same ID for the same subnet, and it parses
// back into the pool, so an ID Docker kept for days (it releases addresses
// with it, possibly after a plugin restart) is still valid. An ID whose
// subnet is now in use with another ip-range is unknown.
//
// # Rules
//
// Pools:
//   - An explicit subnet is masked to its network address. IPv4 pools are
//     /8 (MinPrefixLenV4) to /30 (MaxPrefixLenV4), IPv6 pools /32 to /127;
//     the family must match the request's V6 flag.
//   - The same subnet requested again, by any host, returns the same pool
//     and adds a hold for the host: holders are counted per node, because
//     one host may use the same pool for two networks. The same subnet
//     requested with a different ip-range is refused (ErrPoolOverlap,
//     naming the pool in use): both would hand out addresses from one
//     subnet, and a network must not mean different ranges on different
//     hosts. An ip-range equal to the subnet counts as none.
//   - A subnet that overlaps a pool in use is refused with ErrPoolOverlap
//     naming that pool and the host that created it.
//   - No subnet: the first /DefaultPoolV4Size (/24) of DefaultPoolV4
//     (10.200.0.0/16) that overlaps no pool, IPv6 likewise (/64s of
//     fd69:6f76:6572::/48). Each automatic request creates a new pool, so
//     while one is held the next request gets a different one (Docker asks
//     again when a pool collides with a host route, then releases the ones
//     it rejected). Networks spanning hosts should name their subnet.
//   - --ipam-opt options are accepted and ignored.
//   - ReleasePool drops one hold of this host. When no host holds the pool
//     any more, the pool and every key under it are removed.
//
// Addresses (a response is always ip/<pool prefix length>):
//   - Never handed out: the network address (for IPv6 the subnet-router
//     anycast address ::0) and, for IPv4, the broadcast address.
//   - The gateway (Options RequestAddressType=com.docker.network.gateway)
//     is shared by the network: Docker asks for it on every host that
//     creates the network, and every host gets the same one. It is the
//     gateway the pool already has, else the requested address, else the
//     first usable address (or the lowest free one if that is taken). A
//     different explicit gateway while one is held is refused. Holds are
//     counted per host; the last release frees it.
//   - An explicit address is granted only if usable and inside the subnet
//     (anywhere in it, not only the ip-range: Docker fails the whole
//     network on any aux-address error, PROTOCOL.md §2.1). Then:
//     with an endpoint identity (com.docker.network.endpoint.name, sent by
//     Docker v29+, or com.docker.network.endpoint.macaddress, sent when the
//     driver reports RequiresMACAddress) it is the endpoint's alone, and
//     granted again only to the same endpoint of the same host (a retry,
//     or the container started again under its name): the same name when
//     both have one, else the same MAC. Granting it again rewrites the
//     record with the request's MAC and time, so an earlier endpoint's
//     reclaim (below) no longer matches it;
//     without one it is an --aux-address, a reservation shared by every
//     host of the network and counted per host like the gateway. Engines
//     before v29 send no endpoint name, which is why GetCapabilities
//     reports RequiresMACAddress unless Config.NoMACAddress is set: without
//     it a container's --ip on such an engine would be taken for a shared
//     reservation.
//   - Otherwise the next free address of the ip-range (or subnet) after the
//     pool's cursor, which goes round the range: a released address is not
//     handed out again until the cursor comes back to it, so a stale ARP
//     entry on another host does not point at a new container. When hosts
//     race, a host that lost a claim jumps ahead of the cursor by a random
//     step (at most an eighth of the range), and each host reuses its view
//     of the pool for up to a second (burstCache); both keep concurrent
//     hosts from colliding again and again, at the price of the order being
//     round-robin only approximately. A pool with no free address is
//     ErrPoolExhausted naming the pool.
//   - Every address record names its holder: the node and, if given, the
//     endpoint name and MAC; shared records count holds per node. Endpoint
//     records carry their allocation time.
//   - ReleaseAddress and ReleasePool are idempotent: releasing what is free,
//     unknown, or held by another host changes nothing and succeeds.
//   - ReleaseAddress of an address this host reclaimed (a tombstone) frees
//     it. ReleaseAddress of an endpoint address that Config.InUse reports
//     in use by an endpoint of this host is ignored: Docker releases an
//     address only after DeleteEndpoint, so that release is a stale one
//     for an earlier holder.
//   - A tombstone is never handed out: not by the cursor, not as an
//     explicit address (ErrAddressInUse, naming it reclaimed), not even to
//     the endpoint it was reclaimed from.
//   - An address without a record that Config.Held reports an endpoint of
//     this host has (the store lost its record: an eviction while the
//     host was away, before the re-assertion takes it back) is not handed
//     out either: the cursor skips it, an explicit request for it is
//     ErrAddressInUse. Only ReassertAddress takes it, for that endpoint.
//
// Errors wrap the sentinels ErrPoolExhausted, ErrPoolOverlap,
// ErrAddressInUse, ErrAddressOutOfRange, ErrUnknownPool and
// ErrInvalidRequest. A store failure is returned as a store error (wrapping
// kvstore.ErrUnavailable or the context's error), never as one of these. A
// failed call changes nothing in the store; the one exception is the
// removal of a released pool's keys, which is cleanup after the release has
// been recorded (see below).
//
// # Key layout
//
// All keys are relative to the store's prefix:
//
//	ipam/<space>/index/v4             the pool index of the space and family:
//	ipam/<space>/index/v6             {"pools":[{subnet, subPool, node, auto}]}
//	ipam/<space>/pool/<net>_<bits>/meta  the pool record: subnet, ip-range,
//	                                     holders {node: count}, heldAt
//	                                     {node: time of its last hold},
//	                                     gateway
//	ipam/<space>/pool/<net>_<bits>/next  the cursor: the last address handed out
//	ipam/<space>/addr/<net>_<bits>/<ip>  one record per allocated address:
//	                                     {kind, node, endpoint, mac, at,
//	                                     reclaimed} or {kind, holders, at}
//	                                     for gateway and aux
//
// For example ipam/ConsulOverlayLocal/addr/10.1.0.0_24/10.1.0.7. The record
// and the cursor share a directory, so one List reads both; the address
// records are in another, so that read does not grow with the pool. An
// allocation is then one List and one transaction, and only the
// transaction within a burst (burstCache). The address records are listed
// only when eight addresses in a row turn out taken (a crowded stretch, or
// a full pool); a /16 with tens of thousands of allocations is never read
// whole on the normal path. The index holds one short entry per pool; at
// Consul's 512 KiB value limit that is several thousand pools per space and
// family. An empty index is deleted, so a store whose pools are all
// released holds no ipam key at all.
//
// # Why two hosts can never get the same address or overlapping pools
//
// Correctness rests only on the store's compare-and-set and transactions,
// which Consul applies through Raft, one at a time. Reads may be stale: a
// stale read makes the following write fail and the operation retry
// (bounded, and within the call's context); it never makes a wrong write
// succeed.
//
//  1. Pools are created and removed only by a transaction that writes the
//     index key of their space and family at the version that was read
//     (create-if-absent when there is none) and, in the same transaction,
//     creates (or deletes) the pool record. The overlap check runs on that
//     version of the index. Of two hosts racing with overlapping subnets,
//     both read version v and at most one transaction conditioned on v
//     commits; the other fails, re-reads, sees the winner and reports the
//     overlap naming it. So the index never holds two overlapping pools,
//     and an index entry exists exactly when its pool record does. A
//     single index key per space and family (rather than, say, one key per
//     smallest block) keeps the check exact for any prefix length at the
//     cost of serialising pool creation, which is rare.
//  2. Joining or leaving a pool is a compare-and-set of its record.
//  3. An address is claimed by creating its key (create-if-absent) in a
//     transaction that also checks that the pool record is at the version
//     read. Two hosts cannot both create one key. The gateway and aux
//     records, which several hosts hold, change only by compare-and-set of
//     the record at the version read. The cursor is written in the claim's
//     transaction unconditionally: it is a hint for where to look, and a
//     cursor that is a little behind costs a failed claim, not a duplicate.
//  4. A pool is released by its last holder in two steps. First its record
//     is written with no holders (compare-and-set). From then on no address
//     can be claimed in it: every claim checks the record's version, which
//     either predates the release (the check fails) or shows no holders
//     (the claim is refused as an unknown pool before it is sent). Then the
//     address records are deleted, each delete conditioned on the record's
//     own version, in transactions that also check the pool record is still
//     at the released version; finally the pool record and its index entry
//     are deleted in one transaction conditioned on the same version. If a
//     host takes the pool up again meanwhile (same subnet: a compare-and-
//     set adding a holder), every later step of the removal fails and it
//     stops, so the state of a pool in use is never removed.
//  5. A crash between the steps of 4 leaves the pool marked released: it is
//     unknown to RequestAddress, it blocks overlapping subnets until it is
//     removed, and it is removed by the next request that collides with it,
//     by the next ReleasePool of it, or taken up again by a request for the
//     same subnet. ReleasePool reports success once the release itself is
//     recorded, and logs a failure of the cleanup as a warning.
//  6. ErrPoolExhausted is reported only after one listing of the address
//     records shows no free address in the range; lost claims and store
//     errors never turn into it.
//  7. Reclaims, sweeps and tombstone releases are compare-and-sets (or
//     deletes-if-unchanged) of the one record read, so a record that
//     changed meanwhile (released, taken again, reclaimed) is left alone
//     and looked at again on the next call or sweep.
//
// The tests check this against the in-memory fake, the embedded store and
// a real Consul agent: eight hosts, each with its own client, exhausting a
// /24 concurrently get exactly 253 distinct addresses plus the shared
// gateway; two hosts racing with overlapping subnets get exactly one pool.
//
// # Reclaim, tombstones and sweeps
//
// Docker's ReleaseAddress names only the pool and the address. When the
// network driver reclaims an endpoint whose container Docker no longer has
// (its DeleteEndpoint never came), Docker may still send that release
// later (dockerd cleans up leftover endpoints at its start). Had the
// reclaim freed the address, and a new container got it meanwhile, that
// late release would free the new container's address and it would be
// handed out twice. So the reclaim is fenced and leaves a tombstone:
//
//   - ReclaimAddress(pool, address, Holder{MAC, Created}) acts only if the
//     record is this host's endpoint record with that MAC (Docker sends
//     the MAC with RequestAddress because GetCapabilities reports
//     RequiresMACAddress, and gives the driver the same one) and, if
//     Created is given, allocated before the endpoint was created.
//     Otherwise (another endpoint holds the address now, or it is free,
//     shared or another host's) it is a no-op. A record without MAC is
//     left to the sweep.
//   - The record is not deleted but marked reclaimed (a tombstone). It
//     keeps the address out of allocation until Docker's ReleaseAddress
//     for it arrives, which frees it, or until Sweep frees it once it is
//     older than Config.Grace (default 1h).
//   - A release that comes later still, after the tombstone expired and
//     the address went to a new endpoint, is ignored if Config.InUse
//     reports the address in use (see Rules). Without InUse such a very
//     late release would free it.
//
// Sweep(ctx, bound), run every few minutes by the plugin, frees this
// host's tombstones older than the grace period (except those Config.InUse
// reports in use: an endpoint holds it, the reclaim was meant for an
// earlier one; it is logged and kept), and turns into tombstones
// this host's endpoint records older than the grace period that bound
// reports unused: orphans of a RequestAddress whose answer never reached
// Docker, or of a ReleaseAddress that was lost (Docker does not retry a
// failed release). bound must answer true unless it knows the address is
// unused (another driver's network using this IPAM, a network being
// created). Gateways and aux addresses are never swept: they go with their
// pool. Records written before allocation times existed are aged from the
// driver's start. Sweep also removes pools released by their last holder
// whose removal a crash cut short.
//
// SweepPools(ctx, uses) drops this host's pool holds beyond the number of
// this host's Docker networks that use the pool (uses, from Docker's
// network list), once the host's last hold on the pool is older than the
// grace period: a RequestPool answered into a crash (Docker's retry took
// another hold) or a lost ReleasePool. A pool left without holders is
// removed.
//
// # Crash windows
//
// Each step boundary of RequestPool, RequestAddress, ReleaseAddress and
// ReleasePool has a fault point (internal/fault), and TestCrashPoints
// kills a process there with SIGKILL, restarts, replays Docker and checks
// that the retry succeeds, nothing is handed out twice and nothing is left
// after the sweeps and Docker's removals. After a crash:
//
//   - requestpool/before-commit, requestpool/join-before-commit: nothing
//     was written; the retry creates or joins the pool.
//   - requestpool/after-commit, requestpool/join-after-commit: the hold
//     was taken but Docker never learnt of it; the retry takes another.
//     SweepPools drops the extra one after the grace period.
//   - requestaddress/{gateway-,static-,}before-commit: nothing written.
//   - requestaddress/gateway-after-commit: an extra gateway hold of this
//     host; the gateway is shared and is removed with its pool.
//   - requestaddress/after-commit: an address Docker never got; its retry
//     gets another one, Sweep reclaims the orphan.
//   - requestaddress/static-after-commit: the explicit address is held
//     for the endpoint. Docker v29+ names the endpoint, so its retry gets
//     the address again. An older engine identifies the endpoint only by
//     its MAC, which is random and new on the retry: the address is then
//     in use until Sweep frees the orphan (two grace periods).
//   - releaseaddress/before-commit: Docker does not retry; Sweep frees the
//     endpoint address (a shared hold goes with its pool).
//   - releaseaddress/after-commit: done; a repeated release is a no-op.
//   - releasepool/before-commit: Docker does not retry; SweepPools drops
//     the hold once Docker's network list no longer uses the pool.
//   - releasepool/after-commit, releasepool/after-addresses: the pool is
//     marked released; Sweep, the next ReleasePool or the next colliding
//     request removes it (rule 5 above).
//
// # RequiresRequestReplay: not wanted
//
// With RequiresRequestReplay, Docker replays at every daemon start
// RequestPool for each of its networks (with the previous pool and gateway
// as explicit preferences) and RequestAddress for each endpoint's address
// (PROTOCOL.md §2.1). It exists for IPAMs that keep no state. This driver
// keeps all its state in the store, and its PoolIDs are self-describing,
// so nothing is lost across a daemon or plugin restart. A replay would
// instead do harm: RequestPool carries no network ID, so a replayed request
// is indistinguishable from a second network on the same host and would
// add a hold that no ReleasePool ever drops (the pool would never be
// removed); the same goes for the replayed gateway and aux addresses. So
// the driver does not ask for replay, and go-plugins-helpers'
// CapabilitiesResponse (which cannot express it) is enough.
package ipam
