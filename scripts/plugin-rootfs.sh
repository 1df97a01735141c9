#!/usr/bin/env bash
# plugin-rootfs.sh BINARY DIR
#
# Assembles the root filesystem of the consul-overlay managed plugin in DIR
# (the build context of the Dockerfile, which copies it into a FROM scratch
# image): the static plugin binary as /consul-overlay, plus a working
# iptables/ip6tables (and their -restore commands) taken from this host,
# because the data plane execs them to program its FORWARD and INPUT rules
# in the host namespace (iptables-restore --noflush: the rules of one call
# in one transaction).
#
# Both flavours of iptables are carried: the nf_tables one
# (xtables-nft-multi: iptables-nft, ...), the default of Debian 11 and
# later, and the legacy x_tables one (xtables-legacy-multi:
# iptables-legacy, ...), which older hosts and hosts switched back with
# update-alternatives use. Rules written in the flavour the host does not
# use are silently ineffective, so the plugin detects the host's flavour
# at start (vxlan/flavour.go) and runs iptables-nft or iptables-legacy;
# plain iptables is the nft one. They are copied with the shared libraries
# ldd names and the whole xtables extension directory. The nft flavour
# takes no lock file (-w is accepted and ignored); the legacy one's -w lock
# is /run/xtables.lock of the plugin's own rootfs, which does not
# serialise it with dockerd's iptables-legacy (x_tables replaces a whole
# table per write: iptables-restore --noflush keeps our writes few).
set -euo pipefail

if (($# != 2)); then
	echo "usage: $0 PLUGIN_BINARY OUTPUT_DIR" >&2
	exit 2
fi
bin=$1
out=$2

die() { echo "plugin-rootfs: $*" >&2; exit 1; }

[[ -x $bin ]] || die "plugin binary $bin missing: run make build"
if ldd "$bin" >/dev/null 2>&1; then
	die "$bin is dynamically linked: build it with CGO_ENABLED=0"
fi

multi=/usr/sbin/xtables-nft-multi
legacy=/usr/sbin/xtables-legacy-multi
for m in "$multi" "$legacy"; do
	[[ -x $m ]] || die "$m missing: apt-get install iptables"
done
# The extension dir compiled into Debian's iptables (XTABLES_LIBDIR); the
# same path in the rootfs, since /lib and /usr/lib are not merged there.
multiarch=$(basename "$(dirname "$(ldd "$multi" | awk '/libxtables/ {print $3}')")")
xtdir=/usr/lib/$multiarch/xtables
[[ -d $xtdir ]] || die "xtables extension directory $xtdir not found"

rm -rf "$out"
mkdir -p "$out"
cd "$out"

# Directories the plugin runtime needs: the socket dir (Docker mounts its
# per-plugin dir there), DATA_DIR's mount target (the data mount), /tmp,
# and the kernel file systems' mount points. Nothing else of
# the host is mounted: config.json lists no /proc/sys and no exec-root.
mkdir -p run/docker/plugins run/docker-host var/lib/consul-overlay tmp etc usr/sbin \
	proc sys dev
chmod 1777 tmp
# The docker-sock mount is the host directory that holds the socket
# (/var/run): a bind mount of the socket file itself would keep the old
# socket after the engine restarts with live-restore (dockerd makes a new
# file), and the plugin would lose the Docker API until it restarts.
# DOCKER_HOST's default unix:///run/docker.sock reaches it by this link.
ln -s docker-host/docker.sock run/docker.sock

install -m 0755 "$bin" consul-overlay

# copy_libs FILE...: copies every shared library ldd resolves for each file
# to the same path under $out (symlinks followed, so the rootfs does not
# depend on the host's /lib -> /usr/lib merge).
copy_libs() {
	local f lib
	for f in "$@"; do
		while read -r lib; do
			[[ -e .$lib ]] || cp -L --parents "$lib" .
		done < <(ldd "$f" 2>/dev/null | grep -oE '/[^ ]+' | sort -u)
	done
}

cp -L --parents "$multi" "$legacy" .
# The whole extension dir, symlinks kept (libxt_NOTRACK.so -> libxt_CT.so).
mkdir -p ".$xtdir"
cp -a "$xtdir"/. ".$xtdir"/
copy_libs "$multi" "$legacy" "$xtdir"/*.so

for fam in iptables ip6tables; do
	for suffix in "" -save -restore; do
		ln -sf xtables-nft-multi "usr/sbin/$fam$suffix"
		ln -sf xtables-nft-multi "usr/sbin/$fam-nft$suffix"
		ln -sf xtables-legacy-multi "usr/sbin/$fam-legacy$suffix"
	done
done
# The vxlan package looks for <command>-restore beside the command it runs.
for name in iptables-restore ip6tables-restore iptables-nft-restore iptables-legacy-restore; do
	[[ -L usr/sbin/$name ]] || die "usr/sbin/$name missing"
done
# Protocol names for -p and for printing rules.
[[ -f /etc/protocols ]] && cp /etc/protocols etc/protocols

echo "plugin-rootfs: assembled $(du -sh . | cut -f1) in $out"
