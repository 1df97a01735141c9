#!/usr/bin/env bash
# prereqs.sh: installs from Debian what the lab needs and is missing, and
# starts host A's dockerd if none answers (as .ci/run does, for machines
# without an init system). Run as root; apt-get runs only when something is
# missing.
set -euo pipefail
(($(id -u) == 0)) || { echo "prereqs: run as root" >&2; exit 1; }

# docker.io: engine and CLI (host A, and the second engine of host B);
# docker-registry: the registry the plugin is pushed to and installed from;
# busybox-static: the containers' image (make busybox-image) and the lab's
# HTTP client; iproute2, iptables, util-linux (nsenter, setsid), runc (the
# cleanup of a crashed engine B), iputils-ping, make.
pkgs=(docker.io docker-registry busybox-static iproute2 iptables util-linux runc iputils-ping make)
need=()
for p in "${pkgs[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
	echo "prereqs: apt-get install ${need[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
	echo "prereqs: starting dockerd (log /tmp/dockerd.log)" >&2
	setsid dockerd </dev/null >>/tmp/dockerd.log 2>&1 &
	for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
	docker info >/dev/null 2>&1 || { tail -50 /tmp/dockerd.log >&2; exit 1; }
fi
