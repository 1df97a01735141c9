#!/usr/bin/env bash
# engine-b.sh start|stop|restart|reload: host B's dockerd, as a service
# manager would handle it. reload sends SIGHUP, which makes dockerd re-read
# $LAB_STATE/b/daemon.json (live-restore is one of the reloadable settings).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
(($(id -u) == 0)) || die "run as root"
ns_exists "$LAB_NS_B" || die "the lab is down: lab/up.sh first"
case ${1:-} in
start) engine_b_start ;;
stop) engine_b_stop ;;
restart) engine_b_stop; engine_b_start ;;
reload)
	pid_alive dockerd-b || die "host B's engine does not run"
	kill -HUP "$(<"$LAB_STATE/dockerd-b.pid")"
	;;
*) die "usage: $0 start|stop|restart|reload" ;;
esac
