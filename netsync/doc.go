// Package netsync makes a network created once, on any host, exist on
// every host: the cluster-wide networks of consul-overlay.
//
// A Syncer runs in the background on each host, next to the driver, and
// talks to its own engine's API and to the cluster's specs in the store
// (cluster.Spec at specs/<name>). It never runs inside a driver call:
// CreateNetwork does not tell the driver the network's name or labels,
// and calling the engine from inside a driver call can deadlock the
// daemon, so the Docker-side facts are read from the engine after the
// fact (its network events and its network list).
//
// What it does, level-triggered on every change (engine event, spec
// change, periodic pass):
//
//   - a network of this plugin's driver without -o name (the per-host
//     mode keeps -o name) that this host's engine has and the cluster
//     does not: publish it (cluster.PublishSpec, create-only). The same
//     name with the same settings is the same network. Other settings:
//     the spec in the store won; this host's network is removed when no
//     container uses it and created again from the spec, and the conflict
//     is logged at error (name, both settings, what to do) and recorded
//     in the spec;
//   - a live spec this host's engine lacks: create it through the
//     engine's API under the name the plugin is installed as here, with
//     the spec's explicit IPAM configuration, so the driver joins the same
//     logical network (keyed by the first subnet);
//   - a user's `docker network rm` (a destroy event for a network that
//     matched the live spec, not one this syncer removed): retire the
//     spec (cluster.RetireSpec);
//   - a retired spec: remove the network here where no container uses it
//     (hosts whose containers use it keep it until the last one leaves),
//     and delete the spec once no host holds its logical network
//     (cluster.DeleteSpecIfUnheld);
//   - the engine unreachable: retry with a bounded backoff, and catch up
//     with a full pass when it answers again (the event stream is resumed
//     from the last event seen, so a removal is not missed).
//
// Creates on the engine are by name: a retry after an outage does not
// create a network twice. The engine's check for a taken name is best
// effort, though: a create from a spec that overlaps a user's create of
// the name gives two networks of one name. The syncer keeps the one with
// the spec's settings (or the one it created, or the older) and handles
// the other as a duplicate: removed when unused, and with other settings
// a conflict the spec won.
package netsync
