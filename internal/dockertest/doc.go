// Package dockertest drives a real Docker engine through the docker CLI to
// test consul-overlay as a managed plugin: `make plugin` packages the daemon
// (a FROM scratch rootfs with iptables, see scripts/plugin.sh and
// config.json), the tests enable it, create networks with it, run containers
// from a FROM scratch busybox image (`make busybox-image`) and check that
// everything they made is gone again afterwards.
//
// The tests need root and a running engine (`docker info`); under CI=true a
// missing prerequisite fails them, elsewhere they skip. Everything they
// create has a unique name, so they do not disturb other users of the engine
// or a consul-overlay plugin that is already installed.
//
// `make test` runs them on the machine's engine; `make dockertest ENGINE=29`
// on an engine 29.8.1 in a network namespace of its own (DOCKER_HOST,
// DOCKERD_LOG; see EngineSettings and scripts/dockertest.sh).
//
// Facts about Docker 20.10 these tests rely on:
//   - a managed plugin is addressed with its tag everywhere: `-d NAME:TAG`
//     and `--ipam-driver NAME:TAG`; without the tag network create fails
//     with "could not resolve driver NAME in registry" (network driver) or
//     `invalid ipam driver: "NAME"` (IPAM driver);
//   - `docker plugin enable` fails at once when a bind-mount source of
//     config.json is missing on the host;
//   - the plugin's stdout and stderr are lines of the dockerd log with
//     plugin=<full plugin id>.
package dockertest
