#!/usr/bin/env bash
# up.sh [--owner NAME]: brings the two-host lab up (see lab/lib.sh for its
# layout) and leaves consul-overlay enabled on both engines. Idempotent: what
# already runs is kept, what is missing is made. Needs root, the packages
# lab/prereqs.sh installs, and the builds `make consul compose plugin
# busybox-image` (run here for whatever is missing).
#
# The plugin takes the real install path: host A's engine has it from
# `make plugin` (docker plugin create); it is pushed to a registry on
# 127.0.0.1 and host B's engine installs it from there with
#   docker plugin install --grant-all-permissions --alias consul-overlay:latest \
#     127.0.0.1:15000/consul-overlay:latest KEY=VALUE...
# exactly as a user would. Host B's 127.0.0.1 is its own loopback, so the
# registry has a front end in each namespace, both serving one storage
# directory; Docker pulls over plain HTTP from 127.0.0.0/8 without any
# --insecure-registry setting.
#
# --owner records who brought the lab up (demo, e2e), so that the e2e suite
# does not tear down a demo someone is looking at.
#
# LAB_ENGINE=29 (see lib.sh): host A is a second engine in its own namespace
# too, and the plugin and the busybox image are built on host A's engine 29
# (scripts/plugin.sh and scripts/busybox-image.sh with DOCKER_HOST), not on
# the machine's own engine, which this lab then does not touch.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

owner=manual
while (($#)); do
	case $1 in
	--owner) owner=$2; shift 2 ;;
	*) die "usage: $0 [--owner NAME]" ;;
	esac
done

(($(id -u) == 0)) || die "run as root"
for cmd in ip nsenter setsid dockerd docker docker-registry busybox; do
	command -v "$cmd" >/dev/null || die "$cmd not found: run lab/prereqs.sh"
done
if [[ -z $LAB_NS_A ]]; then
	docker info >/dev/null 2>&1 || die "host A's Docker engine does not answer (docker info): start dockerd"
else
	[[ -x $LAB_DOCKERD ]] || make --no-print-directory -C "$LAB_ROOT" engine >&2
fi

# LAB_DATA without LAB_STATE's owner: a lab that was never torn down (a
# killed run, then a restart that emptied /run). Its Consul data and its
# engines' networks would come back into this lab: tear it down first.
if [[ ! -s $LAB_STATE/owner && -d $LAB_DATA ]]; then
	log "$LAB_DATA is left from a lab that was never torn down: lab/down.sh first"
	"$LAB_ROOT/lab/down.sh" >&2 || die "lab/down.sh failed: remove $LAB_DATA by hand"
fi
mkdir -p "$LAB_STATE" "$LAB_DATA"
if [[ -s $LAB_STATE/owner && $(<"$LAB_STATE/owner") != "$owner" ]]; then
	die "the lab is up, brought up by $(<"$LAB_STATE/owner"): lab/down.sh first"
fi
echo "$owner" >"$LAB_STATE/owner"

# Builds that are missing. `make demo` and `make e2e` run them before.
missing=()
[[ -x $LAB_CONSUL_BIN ]] || missing+=(consul)
if [[ -z $LAB_NS_A ]]; then
	docker image inspect "$LAB_BUSYBOX" >/dev/null 2>&1 || missing+=(busybox-image)
	[[ -s $LAB_ROOT/build/plugin/config.json ]] || missing+=(plugin)
else
	# Built on host A's engine below (build_on_a).
	[[ -x $LAB_ROOT/bin/consul-overlay ]] || missing+=(build)
fi
if ((${#missing[@]})); then
	log "building: make ${missing[*]}"
	make --no-print-directory -C "$LAB_ROOT" "${missing[@]}" >&2
fi

# docker compose: the CLI plugin that `make compose` built (bin/docker-compose)
# unless the docker CLI already has one.
if ! docker compose version >/dev/null 2>&1; then
	[[ -x $LAB_ROOT/bin/docker-compose ]] || make --no-print-directory -C "$LAB_ROOT" compose >&2
	install -D -m 0755 "$LAB_ROOT/bin/docker-compose" /usr/local/lib/docker/cli-plugins/docker-compose
	log "installed /usr/local/lib/docker/cli-plugins/docker-compose ($(docker compose version --short))"
fi

# --- underlay ----------------------------------------------------------------

# on_a CMD...: CMD in host A's network namespace.
on_a() {
	if [[ -n $LAB_NS_A ]]; then in_ns "$LAB_NS_A" "$@"; else "$@"; fi
}

ensure_ns() {
	ns_exists "$1" && return 0
	ip netns add "$1"
	ip -n "$1" link set lo up
}

# plug NS LINK PORT ADDR: a veth LINK in NS (the host namespace when NS is
# "") carrying ADDR/24, its peer PORT in the switch's bridge.
plug() {
	local ns=$1 link=$2 port=$3 addr=$4
	local -a ipns=()
	[[ -n $ns ]] && ipns=(-n "$ns")
	if ! ip "${ipns[@]}" link show "$link" >/dev/null 2>&1; then
		ip "${ipns[@]}" link add "$link" type veth peer name "$port" netns "$LAB_NS_SWITCH"
	fi
	ip -n "$LAB_NS_SWITCH" link set "$port" master sw0 up
	ip "${ipns[@]}" addr replace "$addr/24" dev "$link"
	ip "${ipns[@]}" link set "$link" up
}

up_underlay() {
	ensure_ns "$LAB_NS_SWITCH"
	ip -n "$LAB_NS_SWITCH" link show sw0 >/dev/null 2>&1 ||
		ip -n "$LAB_NS_SWITCH" link add sw0 type bridge
	ip -n "$LAB_NS_SWITCH" link set sw0 up
	[[ -n $LAB_NS_A ]] && ensure_ns "$LAB_NS_A"
	ensure_ns "$LAB_NS_B"
	ensure_ns "$LAB_NS_CONSUL"
	plug "$LAB_NS_A" "$LAB_LINK_A" pa "$LAB_ADDR_A"
	plug "$LAB_NS_B" ul0 pb "$LAB_ADDR_B"
	local name ns addr
	while read -r name ns addr; do
		ensure_ns "$ns"
		plug "$ns" ul0 "pc${name#lab-consul}" "$addr"
	done < <(lab_servers)
	wait_for 10 "the underlay (ping $LAB_ADDR_B)" on_a ping -c 1 -W 1 "$LAB_ADDR_B"
	wait_for 10 "the underlay (ping $LAB_ADDR_CONSUL)" on_a ping -c 1 -W 1 "$LAB_ADDR_CONSUL"
}

# --- Consul ------------------------------------------------------------------

# consul_config NAME BIND CLIENT_ADDRS DNS_ADDR SERVER(true|false): the
# agent's HCL configuration on stdout.
consul_config() {
	local name=$1 bind=$2 clients=$3 dns=$4 server=$5
	cat <<EOF
node_name      = "$name"
datacenter     = "lab"
data_dir       = "$LAB_DATA/consul/$name"
bind_addr      = "$bind"
advertise_addr = "$bind"
client_addr    = "$clients"
log_level      = "info"
disable_update_check = true
ports {
  http     = $LAB_HTTP_PORT
  https    = -1
  grpc     = -1
  grpc_tls = -1
  serf_lan = $LAB_SERF_LAN_PORT
  serf_wan = $LAB_SERF_WAN_PORT
  server   = $LAB_SERVER_PORT
  dns      = $LAB_DNS_PORT
}
addresses {
  dns = "$dns"
}
EOF
	if [[ $server == true ]]; then
		cat <<EOF
server           = true
bootstrap_expect = $LAB_CONSUL_SERVERS
# Leaving would wait for a quorum that may not come (the only server).
leave_on_terminate = false
performance { raft_multiplier = 1 }
ui_config { enabled = false }
EOF
		# Three servers find each other as the agents find them.
		[[ $LAB_CONSUL_SERVERS == 1 ]] || printf 'retry_join = [%s]\nretry_interval = "1s"\n' "$(server_addrs)"
	else
		cat <<EOF
retry_join         = [$(server_addrs)]
retry_interval     = "1s"
leave_on_terminate = true
EOF
	fi
}

# server_addrs: the servers' Serf addresses as an HCL list's items.
server_addrs() {
	local name ns addr out=
	while read -r name ns addr; do
		out+="${out:+, }\"$addr:$LAB_SERF_LAN_PORT\""
	done < <(lab_servers)
	echo "$out"
}

# start_consul NAME NS BIND CLIENTS DNS SERVER
start_consul() {
	local name=$1 ns=$2
	pid_alive "consul-$name" && return 0
	mkdir -p "$LAB_DATA/consul/$name"
	consul_config "$name" "$3" "$4" "$5" "$6" >"$LAB_STATE/consul-$name.hcl"
	start_daemon "consul-$name" "$ns" "$LAB_CONSUL_BIN" agent -config-file "$LAB_STATE/consul-$name.hcl"
}

# member_alive NS NODE: the agent in NS sees NODE as an alive member.
member_alive() {
	consul_get "$1" /v1/agent/members | grep -q "\"Name\":\"$2\",\"Addr\":\"[^\"]*\",\"Port\":[0-9]*,\"Tags\":{[^}]*},\"Status\":1"
}

up_consul() {
	local name ns addr
	while read -r name ns addr; do
		start_consul "$name" "$ns" "$addr" "127.0.0.1 $addr" "$addr" true
	done < <(lab_servers)
	start_consul "$LAB_NODE_A" "$LAB_NS_A" "$LAB_ADDR_A" 127.0.0.1 "$LAB_ADDR_A" false
	start_consul "$LAB_NODE_B" "$LAB_NS_B" "$LAB_ADDR_B" 127.0.0.1 "$LAB_ADDR_B" false
	wait_for 60 "a Consul leader" leader_known
	wait_for 60 "Consul agent $LAB_NODE_A to join" member_alive "$LAB_NS_A" "$LAB_NODE_A"
	wait_for 60 "Consul agent $LAB_NODE_B to join" member_alive "$LAB_NS_B" "$LAB_NODE_B"
	wait_for 30 "Consul agent $LAB_NODE_B to see $LAB_NODE_A" member_alive "$LAB_NS_B" "$LAB_NODE_A"
	# Consistent reads through each agent work once it knows the leader.
	wait_for 30 "the catalog through $LAB_NODE_A" consul_get "$LAB_NS_A" /v1/catalog/nodes
	wait_for 30 "the catalog through $LAB_NODE_B" consul_get "$LAB_NS_B" /v1/catalog/nodes
}

leader_known() { consul_get "$LAB_NS_CONSUL" /v1/status/leader | grep -q :; }

# --- the outside resolver -----------------------------------------------------

# up_dnsd: lab/dnsd, built into $LAB_STATE (again when its source is newer),
# serving lab.test on the Consul server's underlay address.
up_dnsd() {
	local bin=$LAB_STATE/lab-dnsd
	if [[ ! -x $bin || $LAB_ROOT/lab/dnsd/main.go -nt $bin ]]; then
		(cd "$LAB_ROOT" && CGO_ENABLED=0 go build -o "$bin" ./lab/dnsd) || die "go build ./lab/dnsd"
		stop_daemon dnsd 5
	fi
	pid_alive dnsd || start_daemon dnsd "$LAB_NS_CONSUL" "$bin" -listen "$LAB_ADDR_CONSUL:$LAB_UPSTREAM_PORT"
	wait_for 10 "the lab's resolver (lab/dnsd)" in_ns "$LAB_NS_CONSUL" busybox nslookup outside.lab.test "$LAB_ADDR_CONSUL:$LAB_UPSTREAM_PORT"
}

# --- engine B ----------------------------------------------------------------

# up_engine_a: with LAB_ENGINE=29, host A's engine, and on it the builds
# that the 20.10 lab makes on the machine's engine: the busybox image and
# the plugin (when bin/consul-overlay is newer than build/plugin).
up_engine_a() {
	[[ -n $LAB_NS_A ]] || return 0
	engine_start a
	if ! docker_a image inspect "$LAB_BUSYBOX" >/dev/null 2>&1; then
		log "host A: scripts/busybox-image.sh"
		DOCKER_HOST=$LAB_DOCKER_A "$LAB_ROOT/scripts/busybox-image.sh" "$LAB_BUSYBOX" >&2
	fi
	local conf=$LAB_ROOT/build/plugin/config.json
	# LAB_DATAPLANE=1: the plugin built with the data-plane namespace's
	# privileges, and installed with DATAPLANE_NAMESPACE (install_plugin).
	local want_dp=0 have_dp=0
	[[ ${LAB_DATAPLANE:-} == 1 ]] && want_dp=1
	grep -q CAP_SYS_PTRACE "$conf" 2>/dev/null && have_dp=1
	if [[ ! -s $conf || $LAB_ROOT/bin/consul-overlay -nt $conf || $want_dp != "$have_dp" ]] || ! docker_a plugin inspect "$LAB_PLUGIN" >/dev/null 2>&1; then
		log "host A: scripts/plugin.sh"
		DOCKER_HOST=$LAB_DOCKER_A PLUGIN_DATAPLANE=$want_dp "$LAB_ROOT/scripts/plugin.sh" "$LAB_ROOT/bin/consul-overlay" "$LAB_PLUGIN" >&2
		# A new plugin build: push it again (up_plugins).
		plugin_fresh=1
	fi
}
plugin_fresh=0

up_engine_b() {
	engine_b_start
	if ! docker_b image inspect "$LAB_BUSYBOX" >/dev/null 2>&1; then
		log "copying $LAB_BUSYBOX to host B"
		docker_a save "$LAB_BUSYBOX" | docker_b load -q >/dev/null
	fi
}

# --- registry ----------------------------------------------------------------

# Two registry processes, one on 127.0.0.1 of host A (docker plugin push)
# and one on 127.0.0.1 of host B (docker plugin install), over one storage
# directory. The filesystem driver is safe for that, and no cache is
# configured, so the second sees what the first wrote.
registry_config() {
	cat <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $LAB_DATA/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$LAB_REGISTRY_PORT
EOF
}

up_registry() {
	mkdir -p "$LAB_DATA/registry"
	registry_config >"$LAB_STATE/registry.yml"
	pid_alive registry-a || start_daemon registry-a "$LAB_NS_A" docker-registry serve "$LAB_STATE/registry.yml"
	pid_alive registry-b || start_daemon registry-b "$LAB_NS_B" docker-registry serve "$LAB_STATE/registry.yml"
	wait_for 20 "the registry on host A" on_a timeout 5 busybox wget -q -O - "http://127.0.0.1:$LAB_REGISTRY_PORT/v2/"
	wait_for 20 "the registry on host B" in_ns "$LAB_NS_B" timeout 5 busybox wget -q -O - "http://127.0.0.1:$LAB_REGISTRY_PORT/v2/"
}

# --- plugin ------------------------------------------------------------------

plugin_enabled() { [[ $("$@" plugin inspect -f '{{.Enabled}}' "$LAB_PLUGIN" 2>/dev/null) == true ]]; }

# push_plugin: pushes the plugin `make plugin` built (build/plugin) to the
# lab's registry as $LAB_REMOTE. Docker refuses to create a second plugin
# from the same rootfs while the first exists ("content sha256:...: already
# exists"), so the plugin `make plugin` created on host A is removed first:
# host A installs it back from the registry like host B.
push_plugin() {
	[[ -s $LAB_ROOT/build/plugin/config.json ]] || make --no-print-directory -C "$LAB_ROOT" plugin >&2
	docker_a plugin rm -f "$LAB_PLUGIN" >/dev/null 2>&1 || true
	docker_a plugin rm -f "$LAB_REMOTE" >/dev/null 2>&1 || true
	docker_a plugin create "$LAB_REMOTE" "$LAB_ROOT/build/plugin" >/dev/null
	log "pushing $LAB_REMOTE"
	docker_a plugin push "$LAB_REMOTE" >/dev/null
	docker_a plugin rm -f "$LAB_REMOTE" >/dev/null
}

# install_plugin HOST DOCKER...: installs $LAB_REMOTE as $LAB_PLUGIN with
# DOCKER (docker or docker_b), the settings given at install time.
install_plugin() {
	local host=$1
	shift
	local -a settings
	# The well-known address (LINKLOCAL_ADDR, 169.254.1.1 by default):
	# outside names from the lab's resolver, Consul names from the host's
	# agent, whose DNS listens on the host's underlay address.
	if [[ $host == A ]]; then
		mkdir -p "$LAB_DATA/a/plugin-data"
		settings=("VTEP_ADDR=$LAB_ADDR_A" "NODE_NAME=$LAB_NODE_A" "data.source=$LAB_DATA/a/plugin-data"
			"LINKLOCAL_CONSUL_DNS=$LAB_ADDR_A:$LAB_DNS_PORT")
		[[ -n $LAB_NS_A ]] && settings+=("docker-sock.source=$LAB_STATE/a")
	else
		settings=("VTEP_ADDR=$LAB_ADDR_B" "NODE_NAME=$LAB_NODE_B" "data.source=$LAB_DATA/b/plugin-data"
			"docker-sock.source=$LAB_STATE/b" "LINKLOCAL_CONSUL_DNS=$LAB_ADDR_B:$LAB_DNS_PORT")
	fi
	if [[ ${LAB_DATAPLANE:-} == 1 ]]; then
		# Each host's own namespace (both pins are in this machine's
		# /run/consul-overlay), pinned through a process of the lab's
		# that outlives the plugin, as HOST_PID must: this machine's
		# /proc/1 cannot be opened, and the engine's pid is gone after
		# an engine restart (lab/engine-b.sh), when the plugin starts
		# again with the same settings. It stands for the host's init,
		# which outlives its daemons: it runs outside the host's network
		# namespace (HOST_PID names a mount namespace), so the chaos
		# suite's lost host, every process of that namespace killed,
		# comes back with it. lab/down.sh stops it.
		local holder=dataplane-${host,,}
		pid_alive "$holder" || start_daemon "$holder" "" sleep infinity
		settings+=("DATAPLANE_NAMESPACE=lab${LAB_ID:+-$LAB_ID}-${host,,}" "HOST_PID=$(<"$LAB_STATE/$holder.pid")")
	fi
	"$@" plugin rm -f "$LAB_PLUGIN" >/dev/null 2>&1 || true
	log "host $host: docker plugin install --alias $LAB_PLUGIN $LAB_REMOTE"
	"$@" plugin install --grant-all-permissions --alias "$LAB_PLUGIN" "$LAB_REMOTE" \
		"CONSUL_HTTP_ADDR=127.0.0.1:$LAB_HTTP_PORT" LOG_LEVEL=debug "IPAM_GRACE=${LAB_IPAM_GRACE:-10s}" \
		"PEER_RESYNC_INTERVAL=${LAB_PEER_RESYNC:-10s}" ${LAB_HOST_GRACE:+"HOST_GRACE=$LAB_HOST_GRACE"} "LINKLOCAL_UPSTREAM=$LAB_ADDR_CONSUL:$LAB_UPSTREAM_PORT" "${settings[@]}" >/dev/null
	plugin_enabled "$@" || die "host $host: $LAB_PLUGIN installed but not enabled"
	log "host $host: $LAB_PLUGIN enabled"
}

up_plugins() {
	local have
	have=$(on_a timeout 5 busybox wget -q -O - "http://127.0.0.1:$LAB_REGISTRY_PORT/v2/${LAB_PLUGIN%%:*}/tags/list" 2>/dev/null || true)
	# Pushing removes host A's plugin (see push_plugin): reinstall it then.
	if ((plugin_fresh)) || ! plugin_enabled docker_a || [[ $have != *'"'"${LAB_PLUGIN##*:}"'"'* ]]; then
		push_plugin
		install_plugin A docker_a
	fi
	plugin_enabled docker_b || install_plugin B docker_b
}

# --- main --------------------------------------------------------------------

start=$SECONDS
up_underlay
log "underlay up: A $LAB_ADDR_A${LAB_NS_A:+ (netns $LAB_NS_A)}, B $LAB_ADDR_B (netns $LAB_NS_B), Consul $LAB_ADDR_CONSUL (netns $LAB_NS_CONSUL)"
up_consul
log "Consul up: server lab-consul, agents $LAB_NODE_A and $LAB_NODE_B"
up_dnsd
log "the lab's resolver up: lab.test on $LAB_ADDR_CONSUL:$LAB_UPSTREAM_PORT"
if [[ -n $LAB_NS_A ]]; then
	up_engine_a
	log "host A's engine up: $LAB_DOCKER_A ($(docker_a version -f '{{.Server.Version}}'), netns $LAB_NS_A)"
fi
up_engine_b
log "host B's engine up: $LAB_DOCKER_B ($(docker_b version -f '{{.Server.Version}}'))"
up_registry
up_plugins

# What other tools read: lab/docker-b, the e2e suite.
cat >"$LAB_STATE/env" <<EOF
LAB_ENGINE=$LAB_ENGINE
LAB_FIREWALL=$LAB_FIREWALL
LAB_STATE=$LAB_STATE
LAB_DATA=$LAB_DATA
LAB_NS_SWITCH=$LAB_NS_SWITCH
LAB_NS_A=$LAB_NS_A
LAB_LINK_A=$LAB_LINK_A
LAB_DOCKER_A=$LAB_DOCKER_A
LAB_NS_B=$LAB_NS_B
LAB_NS_CONSUL=$LAB_NS_CONSUL
LAB_ADDR_A=$LAB_ADDR_A
LAB_ADDR_B=$LAB_ADDR_B
LAB_ADDR_CONSUL=$LAB_ADDR_CONSUL
LAB_CONSUL_SERVERS=$LAB_CONSUL_SERVERS
LAB_NODE_A=$LAB_NODE_A
LAB_NODE_B=$LAB_NODE_B
LAB_HTTP_PORT=$LAB_HTTP_PORT
LAB_DNS_PORT=$LAB_DNS_PORT
LAB_UPSTREAM_DNS=$LAB_ADDR_CONSUL:$LAB_UPSTREAM_PORT
LAB_DOCKER_B=$LAB_DOCKER_B
LAB_PLUGIN=$LAB_PLUGIN
LAB_REMOTE=$LAB_REMOTE
LAB_PLUGIN_DIR=$LAB_ROOT/build/plugin
LAB_LABEL=$LAB_LABEL
LAB_BUSYBOX=$LAB_BUSYBOX
EOF
log "lab up in $((SECONDS - start))s (lab/down.sh tears it down)"
