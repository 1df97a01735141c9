#!/usr/bin/env bash
# plugin.sh BINARY [NAME[:TAG]]
#
# Packages BINARY (the static consul-overlay daemon) as a managed Docker
# plugin and creates it, disabled, as NAME:TAG (default consul-overlay:latest):
#   1. scripts/plugin-rootfs.sh assembles the build context in build/rootfs-src;
#   2. docker build with the repository's Dockerfile (FROM scratch, COPY);
#   3. docker create + docker export unpack that image into build/plugin/rootfs;
#   4. config.json is copied to build/plugin/config.json;
#   5. an existing plugin of that name is removed (docker plugin rm -f) and
#      docker plugin create makes the new one.
# Then: docker plugin set NAME:TAG KEY=VALUE...; docker plugin enable NAME:TAG.
# BUILD_DIR overrides build/ (the tests use their own). PLUGIN_DATAPLANE=1
# builds the plugin with the privileges DATAPLANE_NAMESPACE=true needs.
set -euo pipefail

if (($# < 1 || $# > 2)); then
	echo "usage: $0 PLUGIN_BINARY [NAME[:TAG]]" >&2
	exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(realpath "$1")
ref=${2:-consul-overlay:latest}
[[ $ref == *:* ]] || ref=$ref:latest
build=${BUILD_DIR:-$root/build}
image=consul-overlay-rootfs:build-$$
export DOCKER_BUILDKIT=0 # the legacy builder: FROM scratch needs nothing else

"$root/scripts/plugin-rootfs.sh" "$bin" "$build/rootfs-src"

cid=
cleanup() {
	if [[ -n $cid ]]; then docker rm -f "$cid" >/dev/null 2>&1 || true; fi
	docker rmi -f "$image" >/dev/null 2>&1 || true
}
trap cleanup EXIT

docker build -q -f "$root/Dockerfile" -t "$image" "$build/rootfs-src" >/dev/null
cid=$(docker create "$image")

rm -rf "$build/plugin"
mkdir -p "$build/plugin/rootfs"
docker export "$cid" | tar -x -C "$build/plugin/rootfs"
cp "$root/config.json" "$build/plugin/config.json"
if [[ ${PLUGIN_DATAPLANE:-} == 1 ]]; then
	# The data-plane namespace's privileges (DATAPLANE_NAMESPACE=true,
	# docs/dataplane-namespace.md): the host's pids, to reach the host's
	# mount namespace through /proc/1, and the capabilities to pin the
	# namespace there. Not in the default plugin, which does not use them.
	sed -i -e 's/"pidhost": false/"pidhost": true/' \
		-e 's/"CAP_NET_RAW"$/"CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"/' "$build/plugin/config.json"
	grep -q '"pidhost": true' "$build/plugin/config.json" && grep -q CAP_SYS_PTRACE "$build/plugin/config.json" ||
		{ echo "plugin.sh: config.json: could not add the data-plane privileges" >&2; exit 1; }
fi

docker plugin rm -f "$ref" >/dev/null 2>&1 || true
docker plugin create "$ref" "$build/plugin" >/dev/null
# The data mount's default source: Docker refuses to start a plugin whose
# bind-mount source is missing ("error mounting ... no such file or directory").
mkdir -p /var/lib/consul-overlay
echo "plugin.sh: created $ref (disabled): docker plugin enable $ref"
