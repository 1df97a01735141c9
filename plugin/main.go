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
	"consul-overlay/internal/hostid"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// shutdownGrace bounds the shutdown after a signal: past it the process
// exits anyway (a second signal ends it at once).
const shutdownGrace = 15 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// Whatever start-up or shutdown is doing when the signal comes, the
	// process ends: a second signal gets the default action (stop restores
	// it), and a shutdown stuck past the grace period exits.
	context.AfterFunc(ctx, func() {
		stop()
		time.AfterFunc(shutdownGrace, func() {
			fmt.Fprintf(os.Stdout, "consul-overlay: shutdown took longer than %s, exiting\n", shutdownGrace)
			os.Exit(1)
		})
	})
	cfg, err := loadConfig(os.Getenv)
	log := newLogger(cfg)
	if err != nil {
		err = fmt.Errorf("bad setting: %w", err)
	} else {
		err = run(ctx, cfg, log)
	}
	if err != nil {
		if ctx.Err() != nil {
			log.Info("consul-overlay stopped during start", "error", err)
			os.Exit(1)
		}
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
// about 9.5 s to listen and never retries a failed enable), makes sure it
// is the only instance on its state, wires the drivers and serves until
// ctx ends. Start-up order:
//
//  1. the plugin socket (refused if a live instance serves it);
//  2. the DATA_DIR lock: a second instance on the same DATA_DIR fails here,
//     naming the first one's pid, before it touches the store;
//  3. the instance socket of (KV prefix, store) in this network namespace:
//     a second instance that would manage the same overlays here fails;
//  4. the store, the host identity (DATA_DIR/host-id), node name and VTEP;
//  5. the host record hosts/<ID>, claimed with a Consul session and read
//     back by a get and a list, before the driver reconciles anything.
func run(ctx context.Context, cfg Config, log *slog.Logger) error {
	l, err := listenUnix(cfg.Socket)
	if err != nil {
		return err
	}
	defer l.Close()
	log.Info("listening", "socket", cfg.Socket)

	lock, err := hostid.Lock(cfg.DataDir)
	if err != nil {
		return err
	}
	defer lock.Close()

	ccfg, useConsul, err := kvstore.ConsulConfigFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	storeName := "embedded"
	if useConsul {
		storeName = ccfg.Address
	}
	inst, err := hostid.ListenInstance(ccfg.Prefix, storeName,
		fmt.Sprintf("DATA_DIR %s, socket %s", cfg.DataDir, cfg.Socket))
	if err != nil {
		return err
	}
	defer inst.Close()

	store, shared, agentName, err := openStore(ctx, cfg, ccfg, useConsul, log)
	if err != nil {
		return err
	}
	defer store.Close()

	hostID, err := hostid.Load(cfg.DataDir)
	if err != nil {
		return err
	}
	node, err := nodeName(cfg, agentName)
	if err != nil {
		return err
	}
	vtep, err := resolveVTEP(cfg)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	hc, err := claimHost(ctx, store, hostRecord{
		ID: hostID, Node: node, VTEP: vtep,
		PID: os.Getpid(), Started: time.Now().UTC().Truncate(time.Second), Version: buildVersion(),
		BootID: hostid.BootID(), LockFile: lock.File(),
	}, cfg.DataDir, log)
	if err != nil {
		return err
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := hc.Release(rctx); err != nil {
			log.Warn("release host record", "host_id", hostID, "error", err)
		}
	}()

	dp, err := vxlan.New(vxlan.Config{VTEP: vtep, Port: cfg.VXLANPort, Sysctl: cfg.SysctlRoot, Logger: log})
	if err != nil {
		return fmt.Errorf("data plane: %w", err)
	}
	// WIRING (lead): ipam's Node is the owner recorded on allocations;
	// it should become hostID (not the human node name) with the ipam
	// rewrite of issue 11.
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
	// WIRING (lead): pass HostID: hostID once driver.Config has it; Node
	// stays the human-readable name.
	dcfg := driver.Config{
		Node: node, VTEP: vtep, Shared: shared,
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
	// The VTEP is watched unless VTEP_ADDR fixes it: a new underlay
	// address is handed to the driver (which moves its overlays and
	// republishes the address to its peers) and to the host record.
	if !cfg.VTEP.IsValid() {
		setVTEP := func(ctx context.Context, a netip.Addr) error {
			// WIRING (lead): driver.(*Driver).SetVTEP, asserted at run
			// time so this builds before the driver has it.
			if s, ok := any(drv).(vtepSetter); ok {
				if err := s.SetVTEP(ctx, a); err != nil {
					return err
				}
			} else {
				log.Warn("this driver cannot move to a new underlay address; peers keep the old one until a restart", "vtep", a)
			}
			return hc.SetVTEP(ctx, a)
		}
		wctx, wcancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			watchVTEP(wctx, vtep, vtepPollInterval, func() (netip.Addr, error) { return resolveVTEP(cfg) }, setVTEP, log)
		}()
		defer func() { wcancel(); <-done }()
	}
	log.Info("consul-overlay started", "node", node, "host_id", hostID, "vtep", vtep, "vxlan_port", cfg.VXLANPort, "shared_store", shared)
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

// openStore opens Consul when CONSUL_HTTP_ADDR is set (useConsul), else
// the embedded store in DATA_DIR. agentName asks the local Consul agent
// for its node name (nil without Consul).
func openStore(ctx context.Context, cfg Config, ccfg kvstore.ConsulConfig, useConsul bool, log *slog.Logger) (kvstore.Store, bool, func() (string, error), error) {
	if useConsul {
		c, err := kvstore.NewConsul(ccfg)
		if err != nil {
			return nil, false, nil, fmt.Errorf("consul store: %w", err)
		}
		log.Info("state store: consul", "address", c.Address(), "prefix", ccfg.Prefix)
		agentName := func() (string, error) {
			ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			return c.NodeName(ctx)
		}
		return c, true, agentName, nil
	}
	// The DATA_DIR lock is held, so nothing else of ours has the file
	// open; the open timeout only bounds a foreign process holding it.
	path := filepath.Join(cfg.DataDir, "state.db")
	e, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: path, Prefix: ccfg.Prefix})
	if err != nil {
		return nil, false, nil, fmt.Errorf("embedded store: %w", err)
	}
	log.Info("state store: embedded (single host; set CONSUL_HTTP_ADDR for several hosts)", "path", path)
	return e, false, nil, nil
}
