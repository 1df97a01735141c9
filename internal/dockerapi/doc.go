// Package dockerapi is a tiny client of the Docker Engine API over its unix
// socket: version negotiation, container inspect and list, and the event
// stream, the engine's ID (GET /info) and network inspect. It is what the
// discovery package needs to learn a container's name, labels and
// environment, and to prove to itself that a container is gone from the
// right engine, and nothing more; it deliberately does not pull in the
// Docker client module.
//
// Versioning: the API version is never pinned. Negotiate asks the engine
// (GET /version, which needs no version prefix) and uses the engine's
// ApiVersion capped at MaxAPIVersion, the newest version whose answers this
// client has been read against; every later request carries the /v<version>/
// prefix. Engines older than MinAPIVersion are refused. Docker 20.10 speaks
// 1.41; Docker 29 speaks 1.52 and refuses anything below 1.44 by default,
// which is why the cap must follow the engines and not sit at 1.41. The
// fields read here (Id, Name, Config.Env, Config.Labels, State,
// NetworkSettings.Networks; Names, Labels, State, NetworkSettings.Networks of
// the list; ID and Name of /info; Id, Name and Driver of a network; Type,
// Action, Actor of events) have not changed between 1.24 and 1.52.
//
// Requests other than the event stream are bounded by Client.Timeout when
// the caller's context has no earlier deadline. A Client is safe for
// concurrent use; negotiation happens once, on the first call that needs
// it, and is retried on the next call after a failure.
//
// Socket location: SocketPath reads DOCKER_HOST (only unix:// is supported)
// and falls back to /var/run/docker.sock, then /run/docker.sock (where a
// managed plugin gets the socket mounted).
package dockerapi
