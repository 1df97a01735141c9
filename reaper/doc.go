// Package reaper tells live hosts from gone ones and removes what a gone
// host held from the cluster state, IPAM and the service catalog.
//
// # Liveness
//
// Every running plugin holds its host record hosts/<host-id> with a
// Consul session bound to its agent's serfHealth and to the host's TTL
// check on that agent (10 s, passed by the plugin every 3.3 s; see
// kvstore.Consul.Claim). A host is
// alive while its record shows a session (kvstore.Pair.Session). A record
// without one belongs to a plugin that stopped, crashed, or lost Consul:
// a restart (kill -9, upgrade, engine restart) takes the record again
// within seconds, so nothing happens at once. The first reaper that sees
// the record without a session writes hosts-lost/<host-id> (create-only):
// the time it saw it and the record's ModifyIndex then. Every reaper
// counts the grace period (Config.Grace, HOST_GRACE, default 5 min) from
// that shared time, so hosts agree on it across their restarts and clock
// differences matter only as much as the skew. A host that takes its
// record again (or writes it anew: its ModifyIndex changes) cancels the
// count: its hosts-lost record is deleted (delete-if-unchanged), or
// replaced by compare-and-set if the record lost its session again since.
// A plugin whose session ended but that still reaches the store (its
// agent cut off from the servers' gossip while its RPC works: Consul
// grants no session bound to a critical serfHealth, yet serves its KV
// writes) writes its record anew, without a session, every 10 s while it
// tries to take a session again (kvstore.Claim): its ModifyIndex changes,
// so the count starts again and a reap under way stops. A host that still
// writes to the store is never reaped; only one cut off from it is.
//
// # Reaping
//
// A host whose record has had no session for longer than the grace period
// is gone. Every live host runs Run: a blocking query (Watch) on the
// common prefix of hosts/ and hosts-lost/ brings every change of a host
// record or a count, and a pass over the latest snapshot follows each
// change and every Config.Interval (10 s), which is what sees a grace
// period end. Steady state costs each host one blocking query, no
// polling; a host due to be reaped is judged again from a fresh Scan. Any
// of the hosts, or several at once, reap it; every step is idempotent and
// every write a compare-and-set or transaction. Every write of steps 1 and
// 2 is also fenced (kvstore.Fence) on the host record being the one the
// pass judged: a host that takes its record back during the reap (a new
// session writes it) stops the reap at the reaper's next write, which
// fails with kvstore.ErrFenced; the reap ends there, logged, without error.
// The host's own writes are fenced the other way (kvstore.OwnFenced, how
// the plugin wires its IPAM, driver and cluster view): each checks that
// its session holds its record or, without one, writes the record in the
// same transaction. So a write the host makes once it reaches the store
// again (an address for `docker run` in the seconds before its claim
// notices the session is gone and writes the record) either fails or
// stops the reap before its next write: a reap never frees what the host
// wrote after it was judged.
//
//  1. the cluster state (cluster.Cluster.EvictHost): members/<host-id>
//     first (so a reap stopped part way shows as an eviction to the host's
//     own check), then its endpoint records and memberships (other hosts'
//     watches withdraw its peers); a network it was the last member of
//     goes with its VNI and subnet reservations, by the same code as a
//     last host's `network rm`;
//  2. IPAM (ipam.Driver.EvictNode): its addresses, its holds of gateways
//     and aux addresses, its pool holds; pools nobody holds any more are
//     removed;
//  3. the catalog: the services of its node whose Meta host-id is the
//     host's (with an agent shared by several hosts, only those). The
//     catalog is not in the store and no fence reaches it, so the reap
//     reads the host record again first and stops if the host took it
//     back (the window left, that read to the deregistrations, the host's
//     own anti-entropy mends within ANTI_ENTROPY_INTERVAL);
//  4. hosts/<host-id>, by delete-if-unchanged on the index read when the
//     pass began: a host that came back meanwhile keeps its new record;
//  5. hosts-lost/<host-id>.
//
// Fault points (internal/fault) after each step: reap/after-cluster,
// reap/after-ipam, reap/after-services, reap/after-host-record.
//
// A crash between the steps leaves hosts/<host-id> without a session and
// its hosts-lost record: the next pass, past the grace period already,
// runs every step again. A hosts-lost record without its host record is
// removed.
//
// A reaper acts only while its own host record is held by its session: a
// host that lost Consul does not judge the others.
//
// # Coming back
//
// A host that was only partitioned, and was reaped meanwhile (or in part:
// it came back during the reap), finds at its next start or when its claim
// is regained that the store lacks its members/<host-id> while its kernel
// runs overlays. (A plugin restarted in that state treats memberships
// without members/<host-id> as a reaped host's view: it keeps the kernel
// and refuses calls while containers use its overlays, rather than
// reconciling on a partial view.) CheckSelf reports, for each of its
// running endpoints, whether its addresses are still this host's, free, or
// held by another host; each conflict is logged at error level naming the
// address and the holder. Heal writes the host record anew first
// (kvstore.Claim.Touch), so a reap of this host still under way stops
// before its next write instead of removing what is written back. Reassert
// then takes back what is still free:
// its pool and gateway holds, its memberships (a network no host has any
// more is created again with its VNI), its addresses and its endpoint
// records. An endpoint whose address another host holds now is not
// recorded again (so the cluster never shows one address twice): it is
// logged and reported, for the operator to resolve.
//
// # Operator
//
// Hosts lists every host with its liveness; Evict reaps one at once,
// refusing a host whose record is held by a live session unless forced.
// The plugin binary offers both as `consul-overlay hosts [--json]` and
// `consul-overlay evict [--force] <host-id>`.
package reaper
