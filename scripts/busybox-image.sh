#!/usr/bin/env bash
# busybox-image.sh [IMAGE]
#
# Builds the tests' container image (default consul-overlay-test/busybox:latest)
# FROM scratch out of Debian's static busybox (apt-get install busybox-static):
# /bin/busybox plus a symlink per applet the tests use. There is no image
# registry to pull from. Quick and idempotent: an image labelled with the
# same busybox checksum is kept.
set -euo pipefail

image=${1:-consul-overlay-test/busybox:latest}
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}

busybox=
for b in /bin/busybox /usr/bin/busybox; do
	if [[ -x $b ]] && ! ldd "$b" >/dev/null 2>&1; then busybox=$b; break; fi
done
[[ -n $busybox ]] || { echo "busybox-image: no static busybox: apt-get install busybox-static" >&2; exit 1; }
sum=$(sha256sum "$busybox" | cut -c1-64)

old=$(docker image inspect -f '{{.Id}} {{index .Config.Labels "busybox.sha256"}}' "$image" 2>/dev/null || true)
have=${old#* }
old=${old%% *}
if [[ $have == "$sum" ]]; then
	exit 0
fi

# A context of its own, so that concurrent runs (test packages) do not clash.
mkdir -p "$build"
ctx=$(mktemp -d "$build/busybox-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/tmp" "$ctx/rootfs/etc" "$ctx/rootfs/www" "$ctx/rootfs/root"
chmod 1777 "$ctx/rootfs/tmp"
install -m 0755 "$busybox" "$ctx/rootfs/bin/busybox"
for applet in sh ash cat echo env hostname ip ifconfig route ping ping6 wget httpd nc \
	sleep ls ps kill mkdir rm sed grep awk true false top arp nslookup traceroute; do
	ln -s busybox "$ctx/rootfs/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$ctx/rootfs/etc/passwd"
echo 'root:x:0:' >"$ctx/rootfs/etc/group"
echo 'consul-overlay-test' >"$ctx/rootfs/www/index.html"
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
LABEL busybox.sha256=$sum
CMD ["/bin/sh"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" >/dev/null
# The image this one replaces, unless a container still uses it.
if [[ -n $old ]]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
echo "busybox-image: built $image"
