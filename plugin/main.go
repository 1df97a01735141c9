// Command consul-overlay is a Docker network and IPAM plugin: VXLAN
// overlays across hosts, with state in Consul (or, without Consul, in an
// embedded store for a single host). It serves both drivers on one unix
// socket, as a managed plugin or as a standalone daemon.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/discovery"
	"consul-overlay/driver"
	"consul-overlay/internal/dockerapi"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cfg, err := loadConfig(os.Getenv)
	log := newLogger(cfg)
	if err != nil {
		err = fmt.Errorf("bad setting: %w", err)
	} else {
		err = run(ctx, cfg, log)
	}
	if err != nil {
		log.Error("consul-overlay cannot start", "error", err)
		if serr := serveFailure(ctx, cfg, log, err); serr != nil {
			log.Error("consul-overlay stopped", "error", serr)
		}
		os.Exit(1)
	}
}

// newLogger logs to stdout: dockerd files a managed plugin's stderr at
// error level whatever the line says, and its stdout at info.
func newLogger(cfg Config) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(os.Stdout, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stdout, opts))
}

// errStartup marks requests answered by a plugin that could not start.
var errStartup = errors.New("consul-overlay could not start")

// serveFailure keeps the socket open after a failed start and answers
// every driver call with the reason, so the user reads it at `docker
// network create` instead of a bare "socket not found" from a plugin that
// exited before Docker's first dial. Activation and capabilities still
// succeed, or Docker would never show the message.
func serveFailure(ctx context.Context, cfg Config, log *slog.Logger, cause error) error {
	socket := cfg.Socket
	if socket == "" {
		socket = defaultSocket
	}
	l, err := listenUnix(socket)
	if err != nil {
		return err
	}
	defer l.Close()
	msg := fmt.Errorf("%w: %v (fix it with `docker plugin set` and enable the plugin again)", errStartup, cause)
	fail := func([]byte) (any, error) { return nil, msg }
	s := newServer(log, nil, nil)
	for path := range s.routes {
		switch path {
		case "/Plugin.Activate":
		case "/NetworkDriver.GetCapabilities":
			s.routes[path] = func([]byte) (any, error) {
				return map[string]string{"Scope": "local", "ConnectivityScope": "global"}, nil
			}
		case "/IpamDriver.GetDefaultAddressSpaces":
			s.routes[path] = func([]byte) (any, error) {
				return map[string]string{"LocalDefaultAddressSpace": ipam.LocalAddressSpace, "GlobalDefaultAddressSpace": ipam.GlobalAddressSpace}, nil
			}
		default:
			s.routes[path] = fail
		}
	}
	return serve(ctx, l, s)
}

// run opens the socket before anything slow (Docker gives a managed plugin
// about 9.5 s to listen and never retries a failed enable), wires the
// drivers and serves until ctx ends.
func run(ctx context.Context, cfg Config, log *slog.Logger) error {
	l, err := listenUnix(cfg.Socket)
	if err != nil {
		return err
	}
	defer l.Close()
	log.Info("listening", "socket", cfg.Socket)

	store, shared, agentName, err := openStore(cfg, log)
	if err != nil {
		return err
	}
	defer store.Close()

	node, err := nodeName(cfg, agentName)
	if err != nil {
		return err
	}
	vtep, err := resolveVTEP(cfg)
	if err != nil {
		return err
	}
	dp, err := vxlan.New(vxlan.Config{VTEP: vtep, Port: cfg.VXLANPort, Sysctl: cfg.SysctlRoot, Logger: log})
	if err != nil {
		return fmt.Errorf("data plane: %w", err)
	}
	ip, err := ipam.New(ipam.Config{
		Node:              node,
		DefaultPoolV4:     cfg.PoolV4,
		DefaultPoolV4Size: cfg.PoolV4Size,
		DefaultPoolV6:     cfg.PoolV6,
		DefaultPoolV6Size: cfg.PoolV6Size,
		Logger:            log,
	}, store)
	if err != nil {
		return fmt.Errorf("ipam: %w", err)
	}
	// Registration needs the local Consul agent; the driver and the
	// registrar refer to each other (Held and OnStale call the driver).
	var drv *driver.Driver
	var reg *discovery.Registrar
	if c, ok := store.(*kvstore.Consul); ok {
		reg, err = newRegistrar(cfg, log, node, c.Client(),
			func(ctx context.Context) ([]discovery.Endpoint, error) { return drv.HeldEndpoints(ctx) },
			func(ctx context.Context, id string) { drv.ReclaimEndpoint(ctx, id) })
		if err != nil {
			return err
		}
	}
	dcfg := driver.Config{
		// TODO(startup): the host ID persisted in DATA_DIR; the node
		// name is a stand-in until start-up provides it (issue 11).
		HostID: node,
		Node:   node, VTEP: vtep, Shared: shared,
		OwnsAddressSpace: ip.Owns,
		ReleaseAddress: func(ctx context.Context, space string, subnet netip.Prefix, a netip.Addr) error {
			return ip.FreeAddress(ctx, ipam.PoolID(space, subnet, netip.Prefix{}), a)
		},
		Logger: log,
	}
	if reg != nil {
		dcfg.Registrar = reg
	}
	drv, err = driver.New(dcfg, store, dp)
	if err != nil {
		return err
	}
	drv.Start()
	defer drv.Close()
	if reg != nil {
		rctx, rcancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); reg.Run(rctx) }()
		defer func() { rcancel(); <-done }()
	}
	log.Info("consul-overlay started", "node", node, "vtep", vtep, "vxlan_port", cfg.VXLANPort, "shared_store", shared)
	return serve(ctx, l, newServer(log, drv, ip))
}

// newRegistrar builds the service registrar. The Docker API (container
// names, labels and environment) is optional: without it services are
// named from what the driver knows, and nothing is found stale.
func newRegistrar(cfg Config, log *slog.Logger, node string, agent *api.Client,
	held func(context.Context) ([]discovery.Endpoint, error), onStale func(context.Context, string)) (*discovery.Registrar, error) {
	var docker *dockerapi.Client
	if cfg.DockerSocket != "" {
		docker = dockerapi.New(cfg.DockerSocket)
	}
	reg, err := discovery.New(discovery.Config{
		Node: node, Agent: agent, Docker: docker,
		Interval: cfg.AntiEntropy,
		Held:     held, OnStale: onStale,
		Logger: log,
	})
	if err != nil {
		return nil, fmt.Errorf("service registration: %w", err)
	}
	return reg, nil
}

// openStore opens Consul when CONSUL_HTTP_ADDR is set, else the embedded
// store in DATA_DIR. agentName asks the local Consul agent for its node
// name (nil without Consul).
func openStore(cfg Config, log *slog.Logger) (kvstore.Store, bool, func() (string, error), error) {
	ccfg, set, err := kvstore.ConsulConfigFromEnv(os.Getenv)
	if err != nil {
		return nil, false, nil, err
	}
	if set {
		c, err := kvstore.NewConsul(ccfg)
		if err != nil {
			return nil, false, nil, fmt.Errorf("consul store: %w", err)
		}
		log.Info("state store: consul", "address", c.Address(), "prefix", ccfg.Prefix)
		agentName := func() (string, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			return c.NodeName(ctx)
		}
		return c, true, agentName, nil
	}
	path := filepath.Join(cfg.DataDir, "state.db")
	e, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: path, Prefix: ccfg.Prefix})
	if err != nil {
		return nil, false, nil, fmt.Errorf("embedded store: %w", err)
	}
	log.Info("state store: embedded (single host; set CONSUL_HTTP_ADDR for several hosts)", "path", path)
	return e, false, nil, nil
}
