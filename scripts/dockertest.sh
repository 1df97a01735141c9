#!/usr/bin/env bash
# dockertest.sh: the Docker suite (internal/dockertest) on engine 29.8.1
# (`make engine`, bin/engine-29) instead of the machine's engine; run by
# `make dockertest ENGINE=29`. Needs root.
#
# The engine is started as the engine-29 lab starts its host A (lab/lib.sh,
# engine_start: own data-root, exec-root, containerd, socket, pid file, no
# default bridge, iptables on, runc 1.3.3) in a network namespace of its
# own, co$DOCKERTEST_ID-a (default codt-a), whose default route goes to a
# link ul0 ($LAB_ADDR_A, the lab's host A address) that leads nowhere; with
# nothing else of the lab: no Consul servers, registry or second host. The
# test binary runs inside that namespace with CI=true, DOCKER_HOST at the engine's socket and DOCKERD_LOG
# at its log, so that what the tests check (host links, iptables rules, -p
# on 127.0.0.1, the "outside" namespace routed from the host, the Consul
# agent on loopback that the plugin uses) is that engine's host. Everything
# goes again on exit, also when the suite fails or is interrupted
# (lab/down.sh for this LAB_ID).
#
# DOCKERTEST_RUN selects tests (go test -run), DOCKERTEST_ID the namespace
# and directories (a LAB_ID: 1-6 of [a-z0-9]; no engine-29 lab may use it).
set -euo pipefail
unset LAB_STATE LAB_DATA LAB_ENGINE_DIR
export LAB_ENGINE=29 LAB_FIREWALL= LAB_ID=${DOCKERTEST_ID:-dt}
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/lab/lib.sh"

(($(id -u) == 0)) || die "run as root"
[[ -x $LAB_DOCKERD ]] || die "engine 29 not built: make engine"
owner=dockertest
if [[ -s $LAB_STATE/owner && $(<"$LAB_STATE/owner") != "$owner" ]]; then
	die "$LAB_STATE belongs to $(<"$LAB_STATE/owner") (a lab with LAB_ID=$LAB_ID): choose another DOCKERTEST_ID"
fi
if [[ -s $LAB_STATE/owner ]]; then
	log "removing what an earlier run left"
	"$root/lab/down.sh" --owner "$owner"
elif ns_exists "$LAB_NS_A"; then
	die "network namespace $LAB_NS_A exists and is not ours: choose another DOCKERTEST_ID"
fi
mkdir -p "$LAB_STATE"
echo "$owner" >"$LAB_STATE/owner"
trap '"$root/lab/down.sh" --owner "$owner"' EXIT

start=$SECONDS
ip netns add "$LAB_NS_A"
ip -n "$LAB_NS_A" link set lo up
# An underlay as on a host, for the plugin's VTEP address (the default
# route's source): a veth pair whose peer ul0p, also in the namespace, has
# no address, so nothing sent to the world leaves the namespace.
ip -n "$LAB_NS_A" link add ul0 type veth peer name ul0p
ip -n "$LAB_NS_A" link set ul0p up
ip -n "$LAB_NS_A" addr add "$LAB_ADDR_A/24" dev ul0
ip -n "$LAB_NS_A" link set ul0 up
ip -n "$LAB_NS_A" route add default dev ul0
engine_start a
log "engine $(docker_a version -f '{{.Server.Version}}') up in netns $LAB_NS_A ($LAB_DOCKER_A) in $((SECONDS - start))s"

# Built outside the namespace (the same module cache and build cache).
cd "$root"
go test -c -o "$LAB_STATE/dockertest.test" ./internal/dockertest/
cd "$root/internal/dockertest"
rc=0
in_ns "$LAB_NS_A" env CI=true DOCKER_HOST="$LAB_DOCKER_A" DOCKERD_LOG="$LAB_STATE/dockerd-a.log" DOCKERD_PIDFILE="$LAB_STATE/a/docker.pid" \
	CONSUL_BIN="${CONSUL_BIN:-$root/bin/consul}" \
	"$LAB_STATE/dockertest.test" -test.v -test.count=1 -test.timeout 20m \
	-test.run "${DOCKERTEST_RUN:-.}" || rc=$?
log "the Docker suite on engine 29: rc=$rc after $((SECONDS - start))s"
exit "$rc"
