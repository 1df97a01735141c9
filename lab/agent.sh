#!/usr/bin/env bash
# agent.sh stop|start a|b: stops or starts a lab host's Consul client agent
# (lab-a, lab-b) with the configuration lab/up.sh wrote, as a service
# manager would: stop is SIGTERM (the agent leaves the cluster), start
# waits until the agent is a live member again and its catalog answers.
# The e2e suite stops an agent to see .consul names fail fast while other
# names still resolve.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

(($# == 2)) || die "usage: $0 stop|start a|b"
case $2 in
a) node=$LAB_NODE_A ns=$LAB_NS_A ;;
b) node=$LAB_NODE_B ns=$LAB_NS_B ;;
*) die "usage: $0 stop|start a|b" ;;
esac
conf=$LAB_STATE/consul-$node.hcl
[[ -s $conf ]] || die "$conf missing: is the lab up (lab/up.sh)?"

member_alive() {
	consul_get "$ns" /v1/agent/members | grep -q "\"Name\":\"$node\",\"Addr\":\"[^\"]*\",\"Port\":[0-9]*,\"Tags\":{[^}]*},\"Status\":1"
}

case $1 in
stop)
	stop_daemon "consul-$node" 10
	log "Consul agent $node stopped"
	;;
start)
	pid_alive "consul-$node" || start_daemon "consul-$node" "$ns" "$LAB_CONSUL_BIN" agent -config-file "$conf"
	wait_for 60 "Consul agent $node to join" member_alive
	wait_for 30 "the catalog through $node" consul_get "$ns" /v1/catalog/nodes
	log "Consul agent $node started"
	;;
*) die "usage: $0 stop|start a|b" ;;
esac
