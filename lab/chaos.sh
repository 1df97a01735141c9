#!/usr/bin/env bash
# chaos.sh WHAT ACTION [NAME]: the failures the chaos suite (make chaos)
# inflicts on the lab, and their repair.
#
#   consul start|stop|kill NODE   a Consul agent (lab-a, lab-b, lab-consul)
#   engine start|stop HOST        a host's dockerd (a, b; a only on engine 29)
#
# stop is what a service manager does (SIGTERM, then SIGKILL); kill is
# SIGKILL at once. start uses the configuration lab/up.sh wrote.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
(($(id -u) == 0)) || die "run as root"
ns_exists "$LAB_NS_B" || die "the lab is down: lab/up.sh first"

# consul_ns NODE: the namespace the agent NODE runs in.
consul_ns() {
	case $1 in
	lab-consul) echo "$LAB_NS_CONSUL" ;;
	lab-consul2 | lab-consul3) echo "$LAB_NS_CONSUL${1#lab-consul}" ;;
	"$LAB_NODE_A") echo "$LAB_NS_A" ;;
	"$LAB_NODE_B") echo "$LAB_NS_B" ;;
	*) die "no Consul agent $1" ;;
	esac
}

leader_seen() { consul_get "$1" /v1/status/leader | grep -q :; }

case ${1:-}/${2:-} in
consul/start)
	ns=$(consul_ns "$3")
	pid_alive "consul-$3" ||
		start_daemon "consul-$3" "$ns" "$LAB_CONSUL_BIN" agent -config-file "$LAB_STATE/consul-$3.hcl"
	wait_for 60 "Consul agent $3 to know a leader" leader_seen "$ns"
	;;
consul/stop) consul_ns "$3" >/dev/null && stop_daemon "consul-$3" 10 ;;
consul/kill)
	consul_ns "$3" >/dev/null
	f=$LAB_STATE/consul-$3.pid
	[[ -s $f ]] && kill -KILL "$(<"$f")" 2>/dev/null
	rm -f "$f"
	;;
engine/start) engine_start "$3" ;;
engine/stop) engine_stop "$3" ;;
*) die "usage: $0 consul start|stop|kill NODE | engine start|stop HOST" ;;
esac
