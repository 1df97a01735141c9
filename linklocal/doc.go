// Package linklocal serves the well-known address that every container on a
// consul-overlay network reaches on its own host (by default 169.254.1.1,
// the classic Docker-and-Consul recipe's choice), in the host's network
// namespace:
//
//   - DNS on port 53, UDP and TCP (Forwarder): names under the Consul
//     domain go to the host's own Consul agent, every other name to the
//     host's upstream resolvers. Answers are cached as long as their TTLs
//     say (Consul's default TTL of 0 means not at all); a UDP answer that
//     does not fit the client's buffer is sent truncated, so the client asks
//     again over TCP, and a truncated answer from a server is fetched again
//     over TCP. A Consul agent that does not answer gives SERVFAIL within
//     Config.ConsulTimeout, while other names still resolve.
//   - The Consul agent's HTTP API on port 8500 (APIProxy): requests are
//     passed on as they come, with the caller's X-Consul-Token or
//     Authorization header and never a token of the plugin's.
//
// The sockets are bound with IP_FREEBIND, so they can be opened before the
// address exists: package vxlan puts it on each overlay bridge and filters
// who may reach which port (only the containers of networks that allow it,
// and the host itself; never the underlay). This package knows nothing of
// Docker, bridges or firewalls.
package linklocal
