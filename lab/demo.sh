#!/usr/bin/env bash
# demo.sh: brings the lab up (lab/up.sh), deploys lab/compose/compose.yaml on
# both hosts and shows what there is to see: the networks on both engines,
# the Consul cluster and the plugin's state in it, cross-host traffic by
# address and by Consul DNS name. `make demo` runs it after the builds;
# `make demo-down` (lab/down.sh) removes everything.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

"$LAB_ROOT/lab/up.sh" --owner demo

file=$LAB_ROOT/lab/compose/compose.yaml
# The same file on both hosts, no variables: DNS and the Consul API are the
# well-known address 169.254.1.1 on every host.
compose_a() { docker_a compose -f "$file" --progress quiet "$@"; }
compose_b() { docker_b compose -f "$file" --progress quiet "$@"; }
consul_cli() { CONSUL_HTTP_ADDR=127.0.0.1:$LAB_HTTP_PORT "$LAB_CONSUL_BIN" "$@"; }

log "host A: docker compose up -d"
compose_a up -d
log "host B: docker compose up -d"
compose_b up -d

bold= plain=
if [[ -t 1 ]]; then
	bold=$(tput bold 2>/dev/null || true)
	plain=$(tput sgr0 2>/dev/null || true)
fi
# show TITLE CMD...: prints the command as a user would type it, then its output.
show() {
	printf '\n%s== %s%s\n$ %s\n' "$bold" "$1" "$plain" "$2"
	shift 2
	"$@" 2>&1 | sed 's/^/  /' || true
}
ip_of() { "$1" inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$2"; }
on_b() { docker_b "$@"; }
# catalog_web: node, service ID and address of each instance of web.
catalog_web() {
	consul_get "" /v1/catalog/service/web | grep -oE '"(Node|ServiceID|ServiceAddress)":"[^"]*"' |
		cut -d'"' -f4 | paste - - - | awk '{printf "%-6s web  %-15s id %.12s\n", $1, $3, $2}'
}

show "Networks on host A" "docker network ls --filter driver=$LAB_PLUGIN" \
	docker network ls --filter "driver=$LAB_PLUGIN"
show "Networks on host B" "lab/docker-b network ls --filter driver=$LAB_PLUGIN" \
	docker_b network ls --filter "driver=$LAB_PLUGIN"
show "Containers on host A" "docker compose -f lab/compose/compose.yaml ps" \
	compose_a ps --format 'table {{.Name}}\t{{.Status}}'
show "Containers on host B" "lab/docker-b compose -f lab/compose/compose.yaml ps" \
	compose_b ps --format 'table {{.Name}}\t{{.Status}}'
for c in demo-web-1 demo-web-2 demo-client-1; do
	printf '  %-14s A %-14s B %s\n' "$c" "$(ip_of docker $c)" "$(ip_of on_b $c)"
done

show "Consul cluster: a server and an agent per host" "consul members" consul_cli members
show "consul-overlay's state in Consul KV" "consul kv get -keys -separator= consul-overlay/" \
	consul_cli kv get -keys -separator= consul-overlay/
show "The logical network: one VNI, both hosts' VTEPs" "consul kv get consul-overlay/networks/name-demo-app/config" \
	consul_cli kv get consul-overlay/networks/name-demo-app/config
show "Consul catalog: the containers, registered by the plugin with their overlay addresses" \
	"curl -s 127.0.0.1:$LAB_HTTP_PORT/v1/catalog/service/web" catalog_web

# The plugin registers each container as a Consul service once Docker has
# told it the container's name; give that a moment.
for _ in $(seq 1 20); do
	docker exec demo-client-1 nslookup web.service.consul >/dev/null 2>&1 && break
	sleep 1
done
web_b=$(ip_of on_b demo-web-1)
show "Cross-host ping: demo-client-1 on host A to demo-web-1 on host B ($web_b)" \
	"docker exec demo-client-1 ping -c 3 $web_b" \
	docker exec demo-client-1 ping -c 3 "$web_b"
show "Cross-host HTTP by address: host A to host B" \
	"docker exec demo-client-1 wget -q -O - http://$web_b/" \
	docker exec demo-client-1 busybox timeout 5 wget -q -O - "http://$web_b/"
show "Consul DNS from a container: host B's Consul node by name" \
	"docker exec demo-client-1 nslookup $LAB_NODE_B.node.consul" \
	docker exec demo-client-1 nslookup "$LAB_NODE_B.node.consul"
show "Consul DNS from a container on host A (embedded DNS → 169.254.1.1 → agent $LAB_NODE_A)" \
	"docker exec demo-client-1 nslookup web.service.consul" \
	docker exec demo-client-1 nslookup web.service.consul
show "Consul DNS from a container on host B" \
	"lab/docker-b exec demo-client-1 nslookup web.service.consul" \
	docker_b exec demo-client-1 nslookup web.service.consul
show "An outside name through 169.254.1.1 (the lab's resolver, lab/dnsd)" \
	"docker exec demo-client-1 nslookup outside.lab.test" \
	docker exec demo-client-1 nslookup outside.lab.test
show "The host's Consul API from a container (network option consul_api=true)" \
	"docker exec demo-client-1 wget -q -O - http://169.254.1.1:8500/v1/catalog/services" \
	docker exec demo-client-1 busybox timeout 5 wget -q -O - http://169.254.1.1:8500/v1/catalog/services
if ! docker exec demo-client-1 nslookup web.service.consul >/dev/null 2>&1; then
	printf '\n  %sNo answer for web.service.consul:%s the plugin has not registered the\n' "$bold" "$plain"
	printf '  containers as Consul services (catalog above); cross-host traffic by address works.\n'
fi
sleep 11
show "What the clients got from web.service.consul (every 5 s): pages of both hosts" \
	"docker logs --tail 4 demo-client-1; lab/docker-b logs --tail 4 demo-client-1" \
	bash -c "docker logs --tail 4 demo-client-1; DOCKER_HOST=$LAB_DOCKER_B docker logs --tail 4 demo-client-1"

cat <<EOF

${bold}== Look further${plain}
  docker network inspect demo_app               host A's view of the overlay
  lab/docker-b ps                               the docker CLI on host B ($LAB_DOCKER_B)
  lab/on-b ip -d link show type vxlan           host B's VXLAN device (lab/on-b: a command in B's namespace)
  bridge fdb show dev vx-<vni>                  static FDB entries of the remote containers (host A)
  CONSUL_HTTP_ADDR=127.0.0.1:$LAB_HTTP_PORT bin/consul catalog services -nodes
  docker exec -it demo-client-1 sh              a shell in the client on host A
  Logs: $LAB_STATE/*.log (Consul, engine B, registries); the plugins log to their engine's log.

${bold}== Tear down${plain}
  make demo-down                                (lab/down.sh: removes the lab and everything in it)
EOF
