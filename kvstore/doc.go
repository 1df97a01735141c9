// Package kvstore keeps the plugin's shared state: networks, endpoints and
// address allocations. It is the only package that talks to Consul KV.
//
// Store is implemented twice:
//
//   - Consul: Consul KV over the agent's HTTP API, shared by every host.
//     Cross-host consistency comes from compare-and-set and transactions on
//     Consul's ModifyIndex, never from reads alone: a decision made on a
//     read must be committed with CAS, DeleteCAS or a Txn check. Get, List
//     and Watch still use Consul's consistent mode: a restarted or newly
//     elected server answers default-mode reads from its state before it
//     has applied its log (keys written since its last snapshot missing:
//     a watch would withdraw live peers, a missing record pass for
//     deleted), while in consistent mode it refuses them until it has
//     caught up, which callers see as ErrUnavailable and retry. One read
//     is made in the default mode: a lean watch's read of a record its
//     consistent listing named changed, taken only when the record's
//     modify index is at least the listing's (a server behind cannot hold
//     that version), else read again in the consistent mode.
//   - Embedded: a local bbolt file for a single host without Consul. It
//     keeps its own monotonically increasing modify index in the file, so
//     CAS, DeleteCAS and Txn behave exactly as they do on Consul.
//
// Keys are relative to a prefix fixed at construction (default
// "consul-overlay/", always ending in "/"), so stores with different
// prefixes never see each other's keys. A key is non-empty, valid UTF-8
// and does not start with "/".
//
// Errors: ErrNotFound, ErrConflict, ErrUnavailable, ErrPermissionDenied and
// ErrHeld are sentinels to test with errors.Is. The Consul store bounds
// every request with a timeout and reports transport failures, timeouts and
// 5xx/429 answers as ErrUnavailable, naming the key and the agent's
// address; an outage is never reported as ErrNotFound. A 403 answer (the
// ACL token lacks a permission), and an ACL refusal inside a transaction,
// is ErrPermissionDenied. Beware that Consul answers a List the token may
// not read with the keys it may read, possibly none, and no error: a caller
// that must not act on an empty view proves it can read first (the plugin
// writes its host record and reads it back through Get and List at start).
//
// Claims (Consul only): Consul.Claim holds a key with a session of its
// own, bound to the agent's serfHealth and to a TTL check (DefaultClaimTTL,
// 20 s: as long as the servers took at most to end a session of Consul's
// least TTL, 10 s) of an agent service of the claim's
// (ClaimConfig.ServiceID), with no session TTL; behavior release,
// lock-delay 1 ms. A goroutine passes the check every TTL/6 (3.3 s), paced
// from the start of the previous pass, at the agent, which tells the
// servers only when the check's status changes, so a held claim costs the
// servers one blocking read of its key and nothing else (a TTL session
// costs a renewal at the servers every 3.3 s). The goroutine and that watch notice a lost session
// or key and then create a new session and acquire the key again. Claim
// refuses a key held by another live session with a *HeldError (ErrHeld)
// carrying the holder's value, without changing anything in KV, unless the
// caller's Takeover approves destroying that session. Release releases the
// key, keeping its value with no session, destroys the session and
// deregisters the service. Pair.Session shows the holding session to every
// reader: a key with a session belongs to a live holder; without one, its
// holder stopped or died (the check goes critical TTL after its last pass,
// and the servers end the session at once; an agent that leaves or fails
// ends it too). OwnFenced makes a holder's writes depend on its claim:
// each goes in a transaction that checks the session still holds the key
// (check-session, no extra request) or, while the claim holds none, writes
// the key anew (a touch) with it.
//
// Key layout used through claims (the rest of the schema belongs to the
// packages that write it):
//
//	<prefix>hosts/<host ID>   one per host: Encode'd record of the host
//	                          (id, node, vtep, pid, started, version,
//	                          boot_id, lock_file, session_ttl), held by
//	                          the host's session while its plugin runs.
//
// The host ID is the random identity in DATA_DIR/host-id (see
// internal/hostid). The embedded store has no sessions: the plugin writes
// the same record with Put, and its DATA_DIR lock is the only guard.
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
