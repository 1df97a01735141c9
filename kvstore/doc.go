// Package kvstore keeps the plugin's shared state: networks, endpoints and
// address allocations. It is the only package that talks to Consul KV.
//
// Store is implemented twice:
//
//   - Consul: Consul KV over the agent's HTTP API, shared by every host.
//     Cross-host consistency comes from compare-and-set and transactions on
//     Consul's ModifyIndex, never from reads: Get and List use Consul's
//     default consistency mode (answered by the leader, which may be stale
//     for a moment around a leader change), so a decision made on a read
//     must be committed with CAS, DeleteCAS or a Txn check.
//   - Embedded: a local bbolt file for a single host without Consul. It
//     keeps its own monotonically increasing modify index in the file, so
//     CAS, DeleteCAS and Txn behave exactly as they do on Consul.
//
// Keys are relative to a prefix fixed at construction (default
// "consul-overlay/", always ending in "/"), so stores with different
// prefixes never see each other's keys. A key is non-empty, valid UTF-8
// and does not start with "/".
//
// Errors: ErrNotFound, ErrConflict and ErrUnavailable are sentinels to test
// with errors.Is. The Consul store bounds every request with a timeout and
// reports transport failures, timeouts and 5xx/429 answers as
// ErrUnavailable, naming the key and the agent's address; an outage is
// never reported as ErrNotFound.
//
// Watch delivers full snapshots (the sorted list of pairs under a prefix):
// one at start and one after every change, coalescing bursts, so a slow
// receiver only ever sees the newest state. It survives store outages and
// ends, closing its channel, when its context is done or the store is
// closed. Every delivery is a fresh copy the receiver may keep or modify.
//
// Values that hold structured data are wrapped by Encode as
// {"schema":1,"data":...}; Decode refuses schemas it does not know, so an
// old binary never misreads a newer record.
package kvstore
