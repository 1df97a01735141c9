// Package cluster owns consul-overlay's cluster state in the store: the
// logical networks, the hosts' memberships, the VNI and subnet
// reservations, the endpoint records, and the watch that turns them into
// each host's desired set of remote peers. It knows nothing of Docker's
// protocol or the kernel: the driver adapts Docker's calls to it, and the
// data plane takes its peers declaratively (vxlan.Manager.SetPeers).
//
// # Identity
//
// A host is its HostID: unique in the cluster, opaque, stable across
// restarts. Memberships and endpoint records are keyed and compared by it,
// never by the human-readable node name, so two hosts behind one shared
// Consul agent (one node name) are two hosts.
//
// # Key layout
//
// All keys are under the store's prefix; values are kvstore.Encode
// envelopes.
//
//	members/<host-id>               Host: node name, VTEP. Written on the
//	                                host's first membership and kept; its
//	                                presence proves at start that the store
//	                                view is this host's. (hosts/<host-id>
//	                                is the plugin's claimed host record,
//	                                written at every start: not a proof.)
//	networks/<key>/config           Network: incarnation, VNI, subnets,
//	                                gateways, MTU, options, and the member
//	                                hosts by host ID (node name, VTEP, the
//	                                host's Docker NetworkIDs bound to it).
//	networks/<key>/config/peers/<host-id>
//	                                PeerRecord: the host's endpoints in
//	                                the network (ID prefix, MAC, addresses,
//	                                in binary: about 21 bytes each, see
//	                                peercodec.go), with its VTEP and the
//	                                incarnation; written in the same
//	                                transaction as the endpoint records,
//	                                with the membership, and what the peer
//	                                watches read (see PeerRecord).
//	networks/<key>/config.v@/<nonce>, networks/<key>/config.v/peers/<host-id>@/<nonce>
//	                                The stamps of the config and of each
//	                                peer record: empty keys, replaced with
//	                                a new random nonce in the transaction
//	                                of every write of their record (New
//	                                wraps the store with kvstore.Stamped),
//	                                so a peer watch's key listing names
//	                                the records that changed.
//	networks/<key>/endpoints/<id>   Endpoint: host ID, node, VTEP, the
//	                                network's incarnation, Docker NetworkID,
//	                                addresses, MAC, options, ports. Written
//	                                once, at CreateEndpoint (records of
//	                                older versions may carry the sandbox).
//	joins/<host-id>/<id>            Joined: what Join learned (the sandbox,
//	                                ports Join alone gave). Outside
//	                                networks/<key>/ so that a join wakes no
//	                                peer watch; read back by its own host at
//	                                start, removed with the endpoint.
//	vnis/<vni>                      reservation {key, incarnation}
//	subnets/<subnet>                reservation {key, incarnation}; the
//	                                subnet with "/" as "_" and ":" as "-".
//
// <key> is "name-<name>" for a network created with -o name, else
// "subnet-<first subnet>" (see Key).
//
// # Writes and fencing
//
// Every write that can race is a compare-and-set or a transaction:
//   - the first host creates a network's config, VNI and subnet
//     reservations in one create-only transaction, with a new random
//     incarnation; a host racing it with other settings gets
//     ErrIncompatible;
//   - a join or a leave rewrites the config by CAS on the index it read;
//   - the last member deletes the config (delete-CAS) and the reservations
//     that name its incarnation (delete-CAS) in one transaction, then the
//     endpoint records of that incarnation, each by delete-CAS. A host
//     joining at that moment finds its CAS failing, re-creates the network
//     with a new incarnation, and its records survive the sweep;
//   - an endpoint record is created in a transaction that checks the
//     config's index, so it exists only while its host is a member of that
//     incarnation under that NetworkID; records of another incarnation are
//     stale by construction and removed when seen (by the next creator, or
//     the last member before it removes the config);
//   - a host updates and deletes only its own records (host ID match), by
//     CAS on the index read; another host's record is ErrNotOwner.
//
// A host's several Docker NetworkIDs on one logical network (Docker retries
// CreateNetwork under a new ID after a crash) share the membership; it goes
// with the last of them, after the host's endpoint records of that ID.
//
// # Peers
//
// DesiredPeers derives, for one host and one network, every address of
// every endpoint record of the network's incarnation that belongs to
// another member host. WatchPeers delivers it after every change that
// changes it, reading the members' peer records (networks/<key>/config
// and below: one record per host, not one per endpoint) once they are
// proven equal to the endpoint records, else the whole of networks/<key>/
// (decoding only the records whose modify index moved); SetVTEP
// republishes the host's address in its host record, memberships, peer
// records and endpoint records so the other hosts' watches reprogram
// their peers.
package cluster
