# shellcheck shell=bash
# lib.sh: the lab's layout and helpers, sourced by the lab scripts.
#
# The lab is two Docker hosts and a Consul cluster on one machine:
#
#   host A   the machine's own network namespace and its own dockerd
#            (/var/run/docker.sock), underlay address 198.51.100.1 on the
#            veth colab-a;
#   host B   the network namespace colab-b with a second dockerd (own
#            data-root, exec-root, containerd, socket), underlay address
#            198.51.100.2 on ul0;
#   consul   the namespace colab-c with the Consul server, 198.51.100.3;
#   switch   the namespace colab-sw with the bridge sw0 that joins the
#            three underlay links (a bridge in the host namespace would be
#            subject to the host's FORWARD DROP, br_netfilter being on).
#
# Every host runs a Consul client agent (HTTP on its 127.0.0.1, DNS on its
# underlay address, port 53, which the containers of that host use as their
# DNS server) and the consul-overlay managed plugin pointed at that agent.
# 198.51.100.0/24 is TEST-NET-2 (RFC 5737): it only ever exists on links the
# lab creates. Everything lives in namespaces the lab owns, under
# LAB_STATE (runtime state, pid files, sockets, logs) and LAB_DATA (the
# second engine's data-root, Consul data), and lab/down.sh removes it all.
#
# LAB_ENGINE chooses the engines under test (make e2e ENGINE=29):
#   20.10    (default) the layout above: host A is the machine's own engine;
#   29       both hosts run engine 29.8.1 from `make engine` (bin/engine-29:
#            dockerd, docker-proxy and runc 1.3.3; Debian's containerd). The
#            machine's own engine stays 20.10 and in use, so host A is then a
#            second dockerd in the namespace co29-a, like host B in co29-b,
#            and every name differs from the 20.10 lab's (namespaces co29-*,
#            LAB_STATE and LAB_DATA with the suffix -29): nothing of the lab
#            is in the host namespace, and it can run beside a 20.10 lab.
#            LAB_ID=x renames it (namespaces cox-*, suffix -x), so several
#            engine-29 labs can run at once.
# LAB_FIREWALL=nftables starts engine 29 with --firewall-backend nftables
# (default: its iptables backend).

LAB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_ENGINE=${LAB_ENGINE:-20.10}
LAB_FIREWALL=${LAB_FIREWALL:-}
case $LAB_ENGINE in
20.10 | "")
	LAB_ENGINE=20.10
	[[ -z $LAB_FIREWALL || $LAB_FIREWALL == iptables ]] ||
		{ echo "lab: LAB_FIREWALL=$LAB_FIREWALL needs LAB_ENGINE=29" >&2; exit 1; }
	LAB_STATE=${LAB_STATE:-/run/consul-overlay-lab}
	LAB_DATA=${LAB_DATA:-/var/lib/consul-overlay-lab}
	LAB_NS_SWITCH=colab-sw
	LAB_NS_A= # host A is the machine's own namespace and engine
	LAB_NS_B=colab-b
	LAB_NS_CONSUL=colab-c
	LAB_LINK_A=colab-a # host A's underlay link, in the host namespace
	LAB_DOCKERD=dockerd
	;;
29)
	# LAB_ID (default 29) names this lab's namespaces and directories, so
	# several engine-29 labs can run side by side (LAB_ID=x: cox-a, ...).
	LAB_ID=${LAB_ID:-29}
	[[ $LAB_ID =~ ^[a-z0-9]{1,6}$ ]] || { echo "lab: LAB_ID=$LAB_ID: want 1-6 of [a-z0-9]" >&2; exit 1; }
	LAB_STATE=${LAB_STATE:-/run/consul-overlay-lab-$LAB_ID}
	LAB_DATA=${LAB_DATA:-/var/lib/consul-overlay-lab-$LAB_ID}
	LAB_NS_SWITCH=co$LAB_ID-sw
	LAB_NS_A=co$LAB_ID-a
	LAB_NS_B=co$LAB_ID-b
	LAB_NS_CONSUL=co$LAB_ID-c
	LAB_LINK_A=ul0 # in host A's namespace
	LAB_ENGINE_DIR=${LAB_ENGINE_DIR:-$LAB_ROOT/bin/engine-29}
	LAB_DOCKERD=$LAB_ENGINE_DIR/dockerd
	;;
*)
	echo "lab: LAB_ENGINE=$LAB_ENGINE: want 20.10 or 29" >&2
	exit 1
	;;
esac
LAB_UNDERLAY=198.51.100.0/24
LAB_ADDR_A=198.51.100.1
LAB_ADDR_B=198.51.100.2
LAB_ADDR_CONSUL=198.51.100.3
LAB_NODE_A=lab-a
LAB_NODE_B=lab-b
# LAB_CONSUL_SERVERS=3 runs three Consul servers instead of one, so that
# the chaos suite can take the leader away: lab-consul (above), and
# lab-consul2 and lab-consul3 in the namespaces ${LAB_NS_CONSUL}2 and 3 at
# 198.51.100.4 and .5 (lab_servers lists them).
LAB_CONSUL_SERVERS=${LAB_CONSUL_SERVERS:-1}
[[ $LAB_CONSUL_SERVERS == 1 || $LAB_CONSUL_SERVERS == 3 ]] ||
	{ echo "lab: LAB_CONSUL_SERVERS=$LAB_CONSUL_SERVERS: want 1 or 3" >&2; exit 1; }

# lab_servers: one line per Consul server: NAME NS ADDR.
lab_servers() {
	echo "lab-consul $LAB_NS_CONSUL $LAB_ADDR_CONSUL"
	if [[ $LAB_CONSUL_SERVERS == 3 ]]; then
		echo "lab-consul2 ${LAB_NS_CONSUL}2 198.51.100.4"
		echo "lab-consul3 ${LAB_NS_CONSUL}3 198.51.100.5"
	fi
}

# Consul ports: not the defaults, so the lab's agent in the host namespace
# does not clash with other agents there; DNS on 53 of the underlay
# addresses only (nothing else listens there), for the containers.
LAB_HTTP_PORT=${LAB_HTTP_PORT:-18500}
LAB_SERF_LAN_PORT=${LAB_SERF_LAN_PORT:-18301}
LAB_SERF_WAN_PORT=${LAB_SERF_WAN_PORT:-18302}
LAB_SERVER_PORT=${LAB_SERVER_PORT:-18300}
LAB_DNS_PORT=53
# The lab's "outside world" resolver (lab/dnsd: the zone lab.test), in the
# Consul server's namespace; both hosts' plugins use it as their upstream
# (LINKLOCAL_UPSTREAM), so containers resolve outside names through the
# well-known address 169.254.1.1 like any other. Not 53: the server's
# Consul DNS has that port.
LAB_UPSTREAM_PORT=${LAB_UPSTREAM_PORT:-5353}
# The plugin registry, on 127.0.0.1 of host A and of host B (two front ends
# over one storage directory, see up_registry in up.sh).
LAB_REGISTRY_PORT=${LAB_REGISTRY_PORT:-15000}

LAB_PLUGIN=${LAB_PLUGIN:-consul-overlay:latest}
# Where both hosts install the plugin from (with --alias $LAB_PLUGIN).
LAB_REMOTE=127.0.0.1:$LAB_REGISTRY_PORT/$LAB_PLUGIN
LAB_BUSYBOX=consul-overlay-test/busybox:latest
# Label of everything the lab creates on host A's engine, which it shares
# with whatever else runs there: lab/down.sh removes what carries it.
LAB_LABEL=consul-overlay-lab

LAB_DOCKER_B=unix://$LAB_STATE/b/docker.sock
LAB_DOCKER_A= # the default engine
[[ -n $LAB_NS_A ]] && LAB_DOCKER_A=unix://$LAB_STATE/a/docker.sock
LAB_CONSUL_BIN=${CONSUL_BIN:-$LAB_ROOT/bin/consul}

log() { printf '%s lab: %s\n' "$(date +%T)" "$*" >&2; }
die() {
	printf 'lab: error: %s\n' "$*" >&2
	exit 1
}

# docker_b runs the docker CLI against host B's engine, docker_a against
# host A's.
docker_b() { docker -H "$LAB_DOCKER_B" "$@"; }
docker_a() {
	if [[ -n $LAB_DOCKER_A ]]; then
		docker -H "$LAB_DOCKER_A" "$@"
	else
		docker "$@"
	fi
}

# in_ns NS CMD...: runs CMD in the network namespace NS (only the network
# namespace: nsenter, not `ip netns exec`, which also remounts /sys and
# hides the host's cgroups from dockerd).
in_ns() {
	local ns=$1
	shift
	nsenter --net="/run/netns/$ns" "$@"
}

ns_exists() { [[ -e /run/netns/$1 ]]; }

# running PID: the process exists and is not a zombie (the daemons are
# reparented to init, which may reap them late).
running() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != Z ]]
}

# pid_alive NAME: the process whose pid is in $LAB_STATE/NAME.pid runs.
pid_alive() {
	local f=$LAB_STATE/$1.pid
	[[ -s $f ]] && running "$(<"$f")"
}

# start_daemon NAME NS CMD...: starts CMD in its own session, in network
# namespace NS ("" for the host's), with stdin from /dev/null and its output
# in $LAB_STATE/NAME.log, and records its pid in $LAB_STATE/NAME.pid.
# Nothing is inherited, so a caller that collects output (go test) does not
# wait for the daemon.
start_daemon() {
	local name=$1 ns=$2
	shift 2
	local -a pre=()
	[[ -n $ns ]] && pre=(nsenter --net="/run/netns/$ns")
	# setsid and nsenter exec the command, so $! is the daemon's pid.
	"${pre[@]}" setsid "$@" </dev/null >>"$LAB_STATE/$name.log" 2>&1 &
	echo $! >"$LAB_STATE/$name.pid"
}

# stop_daemon NAME [SECONDS]: SIGTERM, then SIGKILL after SECONDS (10).
stop_daemon() {
	local name=$1 grace=${2:-10} pid i
	local f=$LAB_STATE/$name.pid
	[[ -s $f ]] || return 0
	pid=$(<"$f")
	if running "$pid"; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < grace * 10; i++)); do
			running "$pid" || break
			sleep 0.1
		done
		if running "$pid"; then
			log "$name (pid $pid) did not stop within ${grace}s: SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			sleep 0.2
		fi
	fi
	rm -f "$f"
}

# wait_for SECONDS WHAT CMD...: retries CMD every 0.5 s until it succeeds.
wait_for() {
	local secs=$1 what=$2 i
	shift 2
	for ((i = 0; i < secs * 2; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	log "timed out after ${secs}s waiting for $what"
	return 1
}

# http_get URL: the body of a GET within 5 s, with busybox (busybox 1.35's
# wget -T crashes, hence timeout).
http_get() { timeout 5 busybox wget -q -O - "$1"; }

# consul_get NS PATH: GET of the lab's Consul agent API on host A (NS "")
# or in the namespace NS, printed to stdout.
consul_get() {
	local ns=$1 path=$2
	if [[ -n $ns ]]; then
		in_ns "$ns" timeout 5 busybox wget -q -O - "http://127.0.0.1:$LAB_HTTP_PORT$path"
	else
		http_get "http://127.0.0.1:$LAB_HTTP_PORT$path"
	fi
}

# engine_start HOST (a or b): starts that host's dockerd (host B's, and
# host A's with LAB_ENGINE=29) unless it runs, and waits until it answers.
# Its own data-root, exec-root (and so its own containerd, which dockerd
# starts with its state under the exec-root), socket, pid file and
# configuration file ($LAB_STATE/HOST/daemon.json, reloaded on SIGHUP); no
# default bridge. iptables stays on: it programs the firewall of the host's
# namespace (docker_gwbridge NAT, -p), as on a real host.
#
# Engine 29 gets the runc and docker-proxy of bin/engine-29 (Debian's runc
# 1.1.5 fails every container on it: "namespace time does not exist"), and
# Debian's containerd 1.6.20, which it starts itself. Debian's docker CLI
# 20.10 (API 1.41) talks to it: engine 29.8 accepts API 1.40 and newer.
engine_start() {
	local h=$1 ns sock
	if [[ $h == a ]]; then ns=$LAB_NS_A sock=$LAB_DOCKER_A; else ns=$LAB_NS_B sock=$LAB_DOCKER_B; fi
	[[ -n $ns ]] || die "host $h has no engine of the lab's own"
	mkdir -p "$LAB_STATE/$h" "$LAB_DATA/$h/docker" "$LAB_DATA/$h/plugin-data"
	if ! pid_alive "dockerd-$h"; then
		[[ -s $LAB_STATE/$h/daemon.json ]] || echo '{}' >"$LAB_STATE/$h/daemon.json"
		local -a extra=()
		if [[ $LAB_ENGINE == 29 ]]; then
			[[ -x $LAB_DOCKERD && -x $LAB_ENGINE_DIR/runc && -x $LAB_ENGINE_DIR/docker-proxy ]] ||
				die "engine 29 not built: make engine"
			extra=(--add-runtime "runc-lab=$LAB_ENGINE_DIR/runc" --default-runtime runc-lab
				--userland-proxy-path "$LAB_ENGINE_DIR/docker-proxy")
			[[ -n $LAB_FIREWALL ]] && extra+=(--firewall-backend "$LAB_FIREWALL")
		fi
		start_daemon "dockerd-$h" "$ns" "$LAB_DOCKERD" \
			--config-file "$LAB_STATE/$h/daemon.json" \
			--data-root "$LAB_DATA/$h/docker" \
			--exec-root "$LAB_STATE/$h/exec" \
			--pidfile "$LAB_STATE/$h/docker.pid" \
			-H "$sock" \
			--bridge none "${extra[@]}"
	fi
	wait_for 60 "host ${h^^}'s engine ($sock)" docker -H "$sock" info
}

# engine_b_start: starts host B's dockerd (engine_start b).
engine_b_start() { engine_start b; }

# engine_stop HOST: stops that host's dockerd as a service manager would:
# SIGTERM, and SIGKILL only after 60 s (it stops its containers first, up to
# 10 s each, unless live-restore is on).
engine_stop() { stop_daemon "dockerd-$1" 60; }
engine_b_stop() { engine_stop b; }
