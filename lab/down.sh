#!/usr/bin/env bash
# down.sh [--owner NAME]: tears the lab down and removes everything it made:
# on host A's engine the containers and networks labelled consul-overlay-lab
# and the lab's plugin; host B's engine with its containers, plugin,
# containerd and mounts; the Consul agents and server, the registries, the
# namespaces and links, LAB_STATE and LAB_DATA. Idempotent, and it goes on
# after a failed step, so it also cleans up after a crashed run.
#
# --owner NAME: only if the lab was brought up with that owner (or is half
# up with none); the e2e suite uses it so as not to tear down a demo.
#
# LAB_ENGINE=29 (lib.sh) tears down the engine-29 lab, where host A is an
# engine of the lab's own and goes entirely, like host B.
set -uo pipefail
source "$(dirname "$0")/lib.sh"

owner=
while (($#)); do
	case $1 in
	--owner) owner=$2; shift 2 ;;
	*) die "usage: $0 [--owner NAME]" ;;
	esac
done
(($(id -u) == 0)) || die "run as root"
if [[ -n $owner && -s $LAB_STATE/owner && $(<"$LAB_STATE/owner") != "$owner" ]]; then
	log "the lab belongs to $(<"$LAB_STATE/owner"), not $owner: left up"
	exit 0
fi

# Host A (the machine's own engine): only what carries the lab's label, then
# the lab's plugin.
down_host_a() {
	local ids
	ids=$(docker ps -aq --filter "label=$LAB_LABEL" 2>/dev/null)
	[[ -n $ids ]] && docker rm -f $ids >/dev/null
	ids=$(docker network ls -q --filter "label=$LAB_LABEL" 2>/dev/null)
	[[ -n $ids ]] && docker network rm $ids >/dev/null
	if docker plugin inspect "$LAB_PLUGIN" >/dev/null 2>&1; then
		docker plugin disable -f "$LAB_PLUGIN" >/dev/null 2>&1
		# Back to the defaults (no Consul) in case it stays installed.
		docker plugin rm -f "$LAB_PLUGIN" >/dev/null
	fi
	docker plugin rm -f "$LAB_REMOTE" >/dev/null 2>&1
	return 0
}

# down_engine HOST (a or b): an engine of the lab's own (host B's; host
# A's with LAB_ENGINE=29), everything on it, gracefully while it answers.
down_engine() {
	local h=$1 sock=$LAB_DOCKER_B
	[[ $h == a ]] && sock=$LAB_DOCKER_A
	if pid_alive "dockerd-$h" && docker -H "$sock" info >/dev/null 2>&1; then
		local ids
		ids=$(docker -H "$sock" ps -aq)
		[[ -n $ids ]] && docker -H "$sock" rm -f $ids >/dev/null
		ids=$(docker -H "$sock" network ls -q --filter type=custom)
		[[ -n $ids ]] && docker -H "$sock" network rm $ids >/dev/null
		docker -H "$sock" plugin disable -f "$LAB_PLUGIN" >/dev/null 2>&1
		docker -H "$sock" plugin rm -f "$LAB_PLUGIN" >/dev/null 2>&1
	fi
	stop_daemon "dockerd-$h" 30
	# After a crash: containers and plugins that outlived their engine
	# (runc state under the exec-root), then whatever still runs in the
	# host's namespace (its containerd and shims).
	local runc=runc root id
	[[ $LAB_ENGINE == 29 ]] && runc=$LAB_ENGINE_DIR/runc
	for root in "$LAB_STATE/$h"/exec/runtime-*/*; do
		[[ -d $root ]] || continue
		for id in $("$runc" --root "$root" list -q 2>/dev/null); do
			log "host ${h^^}: removing leftover runc container $id"
			"$runc" --root "$root" delete -f "$id" >/dev/null 2>&1
		done
	done
}

# ancestors: this script's process and those that started it, which it
# never signals (a test that runs it may show a lab namespace in
# /proc/PID/ns/net: that is its main thread's, not all of it).
ancestors() {
	local p=$$ out=" "
	while [[ -n $p && $p -gt 1 ]]; do
		out+="$p "
		p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null)
	done
	echo "$out"
}

# kill_ns_procs NS: kills the processes whose network namespace is NS.
kill_ns_procs() {
	local ns=$1 ino pid left keep
	ns_exists "$ns" || return 0
	ino=$(stat -L -c %i "/run/netns/$ns" 2>/dev/null) || return 0
	keep=$(ancestors)
	for sig in TERM KILL; do
		left=0
		for pid in /proc/[0-9]*; do
			pid=${pid#/proc/}
			[[ $keep == *" $pid "* ]] && continue
			[[ $(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) == "$ino" ]] && running "$pid" || continue
			log "netns $ns: SIG$sig to $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-80))"
			kill "-$sig" "$pid" 2>/dev/null
			left=1
		done
		((left)) || return 0
		sleep 2
	done
}

# unmount_under DIR: lazily unmounts every mount at or below DIR, deepest
# first (overlay2 layers, netns bind mounts, plugin rootfs of engine B).
unmount_under() {
	local dir=$1 mnt
	awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo |
		sort -r | while read -r mnt; do
		umount -l "$mnt" 2>/dev/null || log "umount $mnt failed"
	done
}

[[ -d $LAB_STATE || -d $LAB_DATA ]] || ns_exists "$LAB_NS_B" || { [[ -n $LAB_NS_A ]] && ns_exists "$LAB_NS_A"; } ||
	{ [[ -z $LAB_NS_A ]] && ip link show "$LAB_LINK_A" >/dev/null 2>&1; } || {
	log "lab is down"
	exit 0
}
start=$SECONDS
# The third engine of the once tests (lab/engine-c.sh), if it was left.
if ns_exists "${LAB_NS_SWITCH%-sw}-h3" || [[ -d $LAB_STATE/h3 ]]; then
	"$LAB_ROOT/lab/engine-c.sh" stop || log "engine C: stop failed"
fi
if [[ -n $LAB_NS_A ]]; then
	down_engine a
else
	down_host_a
fi
down_engine b
for d in registry-a registry-b dnsd "consul-$LAB_NODE_A" "consul-$LAB_NODE_B" consul-lab-consul consul-lab-consul2 consul-lab-consul3 dataplane-a dataplane-b; do
	stop_daemon "$d" 10
done
# Whatever still runs in the lab's namespaces (after a crash: engine B's
# containerd and shims). The second and third Consul servers' namespaces
# go whether or not this lab ran them (LAB_CONSUL_SERVERS).
namespaces=("$LAB_NS_B" "$LAB_NS_CONSUL" "${LAB_NS_CONSUL}2" "${LAB_NS_CONSUL}3" "$LAB_NS_SWITCH")
[[ -n $LAB_NS_A ]] && namespaces=("$LAB_NS_A" "${namespaces[@]}")
for ns in "${namespaces[@]}"; do
	kill_ns_procs "$ns"
done
for ns in "${namespaces[@]}"; do
	ns_exists "$ns" && ip netns delete "$ns"
done
# The data-plane namespaces of LAB_DATAPLANE=1 (lab/up.sh): their pins
# hold them (and any container link left in them) past the plugins.
for pin in /run/consul-overlay/lab${LAB_ID:+-$LAB_ID}-a /run/consul-overlay/lab${LAB_ID:+-$LAB_ID}-b; do
	[[ -e $pin ]] || continue
	umount -l "$pin" 2>/dev/null
	rm -f "$pin"
done
# Its peer was in the switch namespace, so it is normally gone already.
[[ -z $LAB_NS_A ]] && ip link del "$LAB_LINK_A" 2>/dev/null
unmount_under "$LAB_STATE"
unmount_under "$LAB_DATA"
rm -rf "$LAB_STATE" "$LAB_DATA"
log "lab down in $((SECONDS - start))s"
