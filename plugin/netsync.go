package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"consul-overlay/internal/dockerapi"
	"consul-overlay/kvstore"
	"consul-overlay/netsync"
)

// Settings of the cluster-wide networks (read here, not in Config, so the
// feature stays in one file):
//
//	CLUSTER_NETWORKS  true (default): networks created without -o name
//	                  exist on every host; false: every network is per host
//	DRIVER_NAME       the name this plugin is installed as on this engine
//	                  (default: learned from the engine's plugin list, or
//	                  the socket's name for a standalone daemon)
const (
	envClusterNetworks = "CLUSTER_NETWORKS"
	envDriverName      = "DRIVER_NAME"
)

// netSyncSettings are CLUSTER_NETWORKS and DRIVER_NAME.
type netSyncSettings struct {
	on    bool
	fixed string // DRIVER_NAME, "" to learn it
	// getenv is the process's environment, which tells this instance
	// from others when several plugins serve the socket (driverName).
	getenv func(string) string
	// retireFile keeps the user's removals the store has not taken yet
	// (DATA_DIR/netsync-retiring.json; netsync.Config.RetireFile).
	retireFile string
}

// netSyncFromEnv reads the settings at start, before anything is served,
// so a bad value stops the plugin before it touches the kernel.
func netSyncFromEnv(getenv func(string) string) (netSyncSettings, error) {
	st := netSyncSettings{on: true, fixed: strings.TrimSpace(getenv(envDriverName)), getenv: getenv}
	if v := strings.TrimSpace(getenv(envClusterNetworks)); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return st, fmt.Errorf("%s=%q: want true or false", envClusterNetworks, v)
		}
		st.on = b
	}
	return st, nil
}

// startNetSync starts the cluster-wide network syncer on a shared store
// with the engine's API; it returns the function that stops it and waits.
// Without either it does nothing and says so.
func startNetSync(ctx context.Context, log *slog.Logger, st netSyncSettings, store kvstore.Store, shared bool,
	docker *dockerapi.Client, socket, hostID, node string) (func(), error) {
	switch {
	case !st.on:
		log.Info("cluster-wide networks off (CLUSTER_NETWORKS=false): every network is per host")
		return func() {}, nil
	case !shared:
		return func() {}, nil // one host: nothing to propagate
	case docker == nil:
		log.Warn("cluster-wide networks off: the engine's API is not reachable (DOCKER_HOST=none); networks are per host")
		return func() {}, nil
	}
	s, err := netsync.New(netsync.Config{
		HostID: hostID, Node: node, Logger: log, RetireFile: st.retireFile,
		DriverName: func(ctx context.Context) (string, error) {
			if st.fixed != "" {
				return st.fixed, nil
			}
			return driverName(ctx, docker, socket, st.getenv)
		},
	}, store, docker)
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); s.Run(sctx) }()
	return func() { cancel(); <-done }, nil
}

// driverName learns the name this plugin's network driver has on the
// engine: the managed plugin that serves a network driver on a socket of
// this name, else, when no managed plugin has that socket (a standalone
// daemon), the socket's name. When several do (two instances under two
// aliases, or two versions during an upgrade), the ones whose settings
// are not this process's environment (getenv) are other instances; of
// those left, the enabled one (while this plugin starts, the engine may
// not list it as enabled yet, so an instance is never taken for another
// on that alone). Otherwise it fails, and the caller asks again later.
func driverName(ctx context.Context, docker *dockerapi.Client, socket string, getenv func(string) string) (string, error) {
	ps, err := docker.Plugins(ctx)
	if err != nil {
		return "", err
	}
	base := filepath.Base(socket)
	var all, mine, enabled []string
	for _, p := range ps {
		if p.Socket != base || !slices.Contains(p.Types, "docker.networkdriver/1.0") {
			continue
		}
		all = append(all, p.Name)
		if !sameSettings(p.Env, getenv) {
			continue
		}
		mine = append(mine, p.Name)
		if p.Enabled {
			enabled = append(enabled, p.Name)
		}
	}
	switch {
	case len(all) == 0:
		return strings.TrimSuffix(base, ".sock"), nil
	case len(all) == 1:
		return all[0], nil
	case len(mine) == 1:
		return mine[0], nil
	case len(mine) > 1 && len(enabled) == 1:
		return enabled[0], nil
	}
	return "", fmt.Errorf("several plugins serve %s (%s) and their settings do not tell which one this is: set %s to the one this is", base, strings.Join(all, ", "), envDriverName)
}

// sameSettings reports whether every setting of env ("NAME=value") has
// its value in getenv: a managed plugin's process runs with them.
func sameSettings(env []string, getenv func(string) string) bool {
	if getenv == nil {
		return true
	}
	for _, kv := range env {
		name, value, _ := strings.Cut(kv, "=")
		if getenv(name) != value {
			return false
		}
	}
	return true
}
