# Root filesystem of the consul-overlay managed Docker plugin. There is no
# base image: the build context is the directory scripts/plugin-rootfs.sh
# assembles (the static plugin binary, iptables and ip6tables with their
# libraries and extensions, the directories the plugin runtime mounts on).
# `make plugin` builds it, exports it into build/plugin/rootfs next to
# config.json and runs `docker plugin create`.
FROM scratch
COPY . /
ENTRYPOINT ["/consul-overlay"]
