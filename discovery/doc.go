// Package discovery makes every joined endpoint a Consul service: discovery
// as a side effect of networking. It replaces gliderlabs/registrator for
// containers on consul-overlay networks and reads the same SERVICE_*
// settings, but it knows the endpoint's overlay address from the driver
// instead of guessing it from `docker inspect`.
//
// # Where services go
//
// Services are registered with the local Consul agent (the agent API, not
// the catalog), so a service's health follows its node: when the host
// dies its services turn critical with the node's serfHealth check and drop
// out of DNS. The *api.Client in Config carries the daemon's address, ACL
// token (needs service:write) and TLS settings.
//
// # One service per endpoint and exposed port
//
//   - ID: <endpoint ID>:<port> plus ":udp" or ":sctp" for those protocols;
//     <endpoint ID> alone when the container exposes no port. Stable for
//     the endpoint's life, unique per agent, and independent of the name,
//     so re-registration after metadata arrives replaces in place. An ID
//     given by the container (SERVICE_ID, below) is put in the plugin's
//     namespace: "consul-overlay:<value>".
//   - Address: the endpoint's overlay IPv4; its IPv6 on an IPv6-only
//     network. TaggedAddresses carry lan_ipv4 and, on dual-stack networks,
//     lan_ipv6 (with the same port). No wan_* addresses of our own (an
//     overlay address is not reachable from another datacenter; the agent
//     still fills in wan_ipv4 from Address by itself). Verified against
//     Consul 1.21: A queries answer with Address, AAAA queries with
//     lan_ipv6, and once lan_ipv6 is set SRV targets name the IPv6
//     address; a dual-stack network's containers reach both.
//   - Port: the exposed port (0 without one). A container exposing several
//     ports gets one service per port, named <name>-<port> as Registrator
//     does; SERVICE_<port>_NAME names one port's service exactly. The
//     count that decides "several" includes ignored ports, as in
//     Registrator. A generic SERVICE_NAME with several ports still gives
//     <name>-<port>.
//   - Tags: SERVICE_TAGS (comma-separated, "\," for a literal comma), plus
//     "udp" (or "sctp") for such ports, as Registrator does.
//   - Meta: managed-by=consul-overlay (the marker anti-entropy looks for;
//     keys starting "consul-" are reserved by Consul), node (the
//     human-readable name), host-id (Config.HostID, the host's unique
//     identity, when set), network, network-id, endpoint-id, container-id,
//     container-name; and, as
//     Registrator does, every other SERVICE_<key> as <key> (lower-cased)
//     when Consul accepts the pair. Our keys win over such attributes.
//   - Check: the first of SERVICE_CHECK_HTTP (a path), SERVICE_CHECK_HTTPS,
//     SERVICE_CHECK_TCP (true) and SERVICE_CHECK_GRPC (true), against the
//     overlay address and port, with SERVICE_CHECK_INTERVAL (default 10s),
//     SERVICE_CHECK_TIMEOUT, SERVICE_CHECK_INITIAL_STATUS,
//     SERVICE_CHECK_DEREGISTER_AFTER, SERVICE_CHECK_HTTP(S)_METHOD,
//     SERVICE_CHECK_TLS_SKIP_VERIFY and SERVICE_CHECK_GRPC_USE_TLS. IPv6
//     addresses are bracketed. Durations that do not parse are dropped
//     rather than sent to be refused. Script and TTL checks are not
//     supported (the agent refuses remote scripts; nothing would beat a
//     TTL).
//
// # Where settings come from (first match wins)
//
//  1. The endpoint's driver options (`docker run --network
//     name=app,driver-opt=SERVICE_NAME=x`, Compose driver_opts): the most
//     explicit, as they are per network attachment.
//  2. The container's labels, then its environment (a label overrides an
//     environment variable of the same key).
//
// Within each source SERVICE_<port>_<KEY> wins over SERVICE_<KEY>. Keys
// must start with SERVICE_ exactly; the rest is case-insensitive. Without a
// name from these, the name is the Compose service label
// (com.docker.compose.service), else the container name; such derived
// names are made DNS-safe (characters other than letters, digits and '-'
// become '-'). The network's service_prefix is put before every name.
// SERVICE_IGNORE (or SERVICE_<port>_IGNORE) with any value except false,
// 0, no or off skips the endpoint (or the port). SERVICE_ID (not
// recommended, as in Registrator) replaces the ID; with several ports a
// generic one gets ":<port>[:udp]" appended so the services stay distinct.
// Unlike Registrator, which uses it verbatim, the value is prefixed with
// CustomIDPrefix ("consul-overlay:"): a container, or an image's
// environment, could otherwise name any service of the agent, overwrite
// it, and deregister it when it stops. The prefix keeps the value readable
// and the IDs of one container stable.
//
// # Whose services are whose
//
// A service in the agent is this host's when it carries the marker, this
// host's node name and this host's host-id (none when Config.HostID is
// empty). Hosts sharing one agent share its node name; the host-id keeps
// them apart. The registrar writes a service ID it has not written in
// this run only after looking it up: absent, this host's, or written for
// the same endpoint by a version without host-id are taken over; anything
// else (an operator's service, another host's) is left alone, logged once
// as a warning, and the endpoint goes without that service. Every
// deregistration looks the service up first and removes it only if it is
// this host's; anti-entropy removes only this host's services.
//
// # Container metadata without slowing Docker
//
// No Docker API call happens inside Register or Deregister, which driver
// calls use: both only update a table and wake a worker. Until a
// container's metadata is known, its services are registered under the
// network's name (the endpoint's short ID if that is empty), with the
// driver options applied. The registrar follows Docker's events (start,
// network connect, destroy) and, when a container of a waiting endpoint
// starts or is connected, inspects it and re-registers with the full
// settings, typically within milliseconds of the start. The container is
// found by ID prefix: Join's SandboxKey ends in the first 12 hex digits of
// the container ID (ContainerIDFromSandboxKey). Metadata is cached per
// container, so its other endpoints and later restarts need no inspect.
// Without a Docker API (Config.Docker nil or the socket absent) the
// fallback names stay, and nothing is ever judged stale.
//
// # Consul down, restarts, anti-entropy
//
// Register returns at once whatever Consul does: networking comes first.
// Writes are retried with exponential backoff (200ms up to
// Config.RetryMax) for as long as they fail; registration replaces by ID,
// so nothing is registered twice. After the agent was unreachable, the
// first successful write re-asserts every service (an agent may come back
// without its state: dev mode, lost data dir).
//
// Sync, run at start and every Config.Interval, makes three things agree:
// the endpoints the driver holds (Config.Endpoints.HeldEndpoints), the
// containers the engine still has, and this host's services in the agent.
// It registers what is missing or different (name, address, port, tags,
// meta, tagged addresses; checks are not compared), removes what nobody
// wants, and hands held endpoints whose container is gone back to the
// driver (Config.Endpoints.ReclaimEndpoint), after removing their
// services, so the driver can release their addresses and devices.
//
// # When an endpoint is reclaimed
//
// Reclaiming frees a live container's address if it is wrong, so it needs
// proof from the right engine:
//
//   - The engine is the pinned one. Its ID (GET /info) is written to
//     Config.EngineIDFile at the first contact and compared at every pass;
//     while the engine answering on the socket has another ID (DOCKER_HOST
//     pointing at another engine), nothing is reclaimed and an error
//     naming both IDs is logged once per change. If the host's engine was
//     really replaced, deleting the file pins the new one.
//   - Only a complete listing (all=true) that answered counts, and the
//     endpoint's container must have been missing from listings in passes
//     at least Config.StaleGrace apart. Docker records a container's
//     endpoints in what it lists only when the whole start is over (the
//     listing shows the previous state, "created" or "exited", meanwhile);
//     before this fix an endpoint was judged on one listing, 5 seconds
//     after it was first seen, so a start slower than that lost its
//     endpoint.
//   - The engine knows the endpoint's network (GET /networks/<id>). An
//     endpoint without a network ID is never reclaimed.
//   - No container that could be starting with it owns it. Containers
//     attached to the endpoint's network without an endpoint on it (by
//     network ID, or by name while the engine lists none) are inspected:
//     inspect reads the live state, where Docker records the endpoint
//     before Join, and waits for the container's lock, which a start holds
//     throughout. An inspect that does not answer, that shows the
//     endpoint, or that says "restarting" keeps the endpoint.
//
// A connect of a running container is not seen this way (the listing
// shows the network only when the connect is over); the grace period
// covers it, as Docker records the endpoint right after Join. Nothing is
// ever concluded from an engine that does not answer, and only endpoints
// known before the pass started are judged.
//
// HeldEndpoints must list every endpoint the driver passed to Register and
// has not yet passed to Deregister, and fail rather than return an
// incomplete list; the registrar tracks endpoints with Register false
// too, so that stale detection covers them. ReclaimEndpoint runs on the
// anti-entropy goroutine and must not call Sync; calling Deregister is
// fine.
//
// Stopping Run leaves services registered: they belong to containers that
// keep running, and the next start reconciles.
//
// # Concurrency
//
// Register, Deregister and Sync are safe for concurrent use. Run owns a
// writer, the anti-entropy loop and (with Docker) an event watcher and an
// inspector; all stop before Run returns. Lock order: syncMu, opMu, mu;
// mu is never held across I/O. The engine pin is guarded by syncMu.
package discovery
