#!/usr/bin/env bash
# engine-c.sh start|stop: a third Docker host for the tests of networks
# created once (a host that starts after the network exists). It lives in
# its own network namespace ($LAB_NS_C: colab-h3, or co<LAB_ID>-h3 with
# LAB_ENGINE=29) on the lab's underlay as 198.51.100.4, with its own
# dockerd (state under $LAB_STATE/h3 and $LAB_DATA/h3), a registry front
# end on its 127.0.0.1, and the plugin installed from the lab's registry
# like host B, pointed at the Consul server (no agent of its own: it runs
# no containers that would register services).
#
# stop removes it all, and the host's records in the store (consul-overlay
# evict), so the lab is as before. lab/down.sh runs it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
(($(id -u) == 0)) || die "run as root"

LAB_NS_C=${LAB_NS_SWITCH%-sw}-h3
LAB_ADDR_C=198.51.100.4
LAB_NODE_C=lab-h3
LAB_DOCKER_C=unix://$LAB_STATE/h3/docker.sock

start() {
	ns_exists "$LAB_NS_SWITCH" || die "the lab is down: lab/up.sh first"
	if ! ns_exists "$LAB_NS_C"; then
		ip netns add "$LAB_NS_C"
		ip -n "$LAB_NS_C" link set lo up
	fi
	if ! ip -n "$LAB_NS_C" link show ul0 >/dev/null 2>&1; then
		ip -n "$LAB_NS_C" link add ul0 type veth peer name ph3 netns "$LAB_NS_SWITCH"
	fi
	ip -n "$LAB_NS_SWITCH" link set ph3 master sw0 up
	ip -n "$LAB_NS_C" addr replace "$LAB_ADDR_C/24" dev ul0
	ip -n "$LAB_NS_C" link set ul0 up
	wait_for 10 "the underlay (ping $LAB_ADDR_CONSUL from host C)" in_ns "$LAB_NS_C" ping -c 1 -W 1 "$LAB_ADDR_CONSUL"

	mkdir -p "$LAB_STATE/h3" "$LAB_DATA/h3/docker" "$LAB_DATA/h3/plugin-data"
	if ! pid_alive dockerd-h3; then
		[[ -s $LAB_STATE/h3/daemon.json ]] || echo '{}' >"$LAB_STATE/h3/daemon.json"
		local -a extra=()
		if [[ $LAB_ENGINE == 29 ]]; then
			extra=(--add-runtime "runc-lab=$LAB_ENGINE_DIR/runc" --default-runtime runc-lab
				--userland-proxy-path "$LAB_ENGINE_DIR/docker-proxy")
			[[ -n $LAB_FIREWALL ]] && extra+=(--firewall-backend "$LAB_FIREWALL")
		fi
		start_daemon dockerd-h3 "$LAB_NS_C" "$LAB_DOCKERD" \
			--config-file "$LAB_STATE/h3/daemon.json" \
			--data-root "$LAB_DATA/h3/docker" \
			--exec-root "$LAB_STATE/h3/exec" \
			--pidfile "$LAB_STATE/h3/docker.pid" \
			-H "$LAB_DOCKER_C" \
			--bridge none "${extra[@]}"
	fi
	wait_for 60 "host C's engine ($LAB_DOCKER_C)" docker -H "$LAB_DOCKER_C" info
	[[ -s $LAB_STATE/registry.yml ]] || die "no registry configuration: lab/up.sh first"
	pid_alive registry-h3 || start_daemon registry-h3 "$LAB_NS_C" docker-registry serve "$LAB_STATE/registry.yml"
	wait_for 20 "the registry on host C" in_ns "$LAB_NS_C" timeout 5 busybox wget -q -O - "http://127.0.0.1:$LAB_REGISTRY_PORT/v2/"
	if [[ $(docker -H "$LAB_DOCKER_C" plugin inspect -f '{{.Enabled}}' "$LAB_PLUGIN" 2>/dev/null) != true ]]; then
		docker -H "$LAB_DOCKER_C" plugin rm -f "$LAB_PLUGIN" >/dev/null 2>&1 || true
		log "host C: docker plugin install --alias $LAB_PLUGIN $LAB_REMOTE"
		docker -H "$LAB_DOCKER_C" plugin install --grant-all-permissions --alias "$LAB_PLUGIN" "$LAB_REMOTE" \
			"CONSUL_HTTP_ADDR=$LAB_ADDR_CONSUL:$LAB_HTTP_PORT" LOG_LEVEL=debug \
			"VTEP_ADDR=$LAB_ADDR_C" "NODE_NAME=$LAB_NODE_C" "data.source=$LAB_DATA/h3/plugin-data" \
			"docker-sock.source=$LAB_STATE/h3" >/dev/null
	fi
	log "host C up: $LAB_DOCKER_C (netns $LAB_NS_C, $LAB_ADDR_C), $LAB_PLUGIN enabled"
}

stop() {
	if pid_alive dockerd-h3 && docker -H "$LAB_DOCKER_C" info >/dev/null 2>&1; then
		local ids
		ids=$(docker -H "$LAB_DOCKER_C" ps -aq)
		[[ -n $ids ]] && docker -H "$LAB_DOCKER_C" rm -f $ids >/dev/null
		ids=$(docker -H "$LAB_DOCKER_C" network ls -q --filter type=custom)
		[[ -n $ids ]] && docker -H "$LAB_DOCKER_C" network rm $ids >/dev/null
		docker -H "$LAB_DOCKER_C" plugin disable -f "$LAB_PLUGIN" >/dev/null 2>&1 || true
		docker -H "$LAB_DOCKER_C" plugin rm -f "$LAB_PLUGIN" >/dev/null 2>&1 || true
	fi
	log "host C: stopping its engine"
	stop_daemon dockerd-h3 30
	stop_daemon registry-h3 10
	log "host C: engine stopped"
	# The host's records: it is gone for good.
	local id
	if [[ -s $LAB_DATA/h3/plugin-data/host-id && -x $LAB_ROOT/bin/consul-overlay ]] && ns_exists "$LAB_NS_C"; then
		id=$(<"$LAB_DATA/h3/plugin-data/host-id")
		in_ns "$LAB_NS_C" env CONSUL_HTTP_ADDR="$LAB_ADDR_CONSUL:$LAB_HTTP_PORT" DATA_DIR="$LAB_DATA/h3/plugin-data" \
			"$LAB_ROOT/bin/consul-overlay" evict --force "$id" >&2 || log "host C: evict $id failed"
	fi
	if ns_exists "$LAB_NS_C"; then
		# Whatever still runs there (its containerd and shims).
		local pids
		pids=$(ip netns pids "$LAB_NS_C" 2>/dev/null || true)
		[[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
		ip netns delete "$LAB_NS_C"
	fi
	awk -v d="$LAB_DATA/h3" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r |
		while read -r m; do umount -l "$m" 2>/dev/null || true; done
	awk -v d="$LAB_STATE/h3" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r |
		while read -r m; do umount -l "$m" 2>/dev/null || true; done
	rm -rf "$LAB_STATE/h3" "$LAB_DATA/h3"
}

case ${1:-} in
start) start ;;
stop) stop ;;
*) die "usage: $0 start|stop" ;;
esac
