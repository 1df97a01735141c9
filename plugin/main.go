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
	"sync"
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
	// Subcommands (see subcommand): hosts, evict, and the read-only status
	// and doctor.
	if cmd, ok := subcommand(os.Args); ok {
		os.Exit(cmd(os.Getenv, os.Stdout, os.Stderr))
	}
	applyMemoryDefaults(os.Getenv) // GOGC=50 unless set (plugin/memory.go)
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
		if cfg.Socket == "" || !filepath.IsAbs(cfg.Socket) {
			cfg.Socket = defaultSocket
		}
	}
	// The socket opens before anything slow: Docker gives a managed plugin
	// about 9.5 s to listen and never retries a failed enable. Until the
	// drivers are wired it answers with why it is not ready yet.
	l, exited, lerr := listenUnix(cfg.Socket)
	if lerr != nil {
		log.Error("consul-overlay cannot start", "error", errors.Join(err, lerr))
		os.Exit(1)
	}
	log.Info("listening", "socket", cfg.Socket)
	if exited != 0 {
		log.Warn("the previous instance was killed while it started a program, which still held its socket: replaced",
			"previous_pid", exited, "socket", cfg.Socket)
	}
	st := &startStatus{}
	h := newSwitchHandler(limitedServer(log, func() error { return fmt.Errorf("%w: %s", errStarting, st.get()) }))
	served := make(chan error, 1)
	go func() { served <- serve(ctx, l, h) }()
	if err == nil {
		err = run(ctx, cfg, log, h, st, served)
	}
	if err != nil {
		if ctx.Err() != nil {
			log.Info("consul-overlay stopped during start", "error", err)
			os.Exit(1)
		}
		log.Error("consul-overlay cannot start", "error", err)
		serveFailure(log, h, err)
		if serr := <-served; serr != nil {
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

// errStartup marks requests answered by a plugin that could not start,
// errStarting those answered before it is ready.
var (
	errStartup  = errors.New("consul-overlay could not start")
	errStarting = errors.New("consul-overlay is starting")
)

// serveFailure makes the socket, kept open after a failed start, answer
// every driver call with the reason, so the user reads it at `docker
// network create` instead of a bare "socket not found" from a plugin that
// exited before Docker's first dial.
func serveFailure(log *slog.Logger, h *switchHandler, cause error) {
	msg := fmt.Errorf("%w: %v (fix it with `docker plugin set` and enable the plugin again)", errStartup, cause)
	h.setFinal(limitedServer(log, func() error { return msg }))
}

// limitedServer answers activation and capabilities, which must succeed
// or Docker would never show the message, and every other call with fail().
func limitedServer(log *slog.Logger, fail func() error) *server {
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
			s.routes[path] = func([]byte) (any, error) { return nil, fail() }
		}
	}
	return s
}

// startStatus is what a call made during start-up is told.
type startStatus struct {
	mu  sync.Mutex
	msg string
}

func (s *startStatus) set(msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msg = msg
}

func (s *startStatus) get() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.msg == "" {
		return "try again in a moment"
	}
	return s.msg
}

// claimRetryMax bounds the wait between attempts to claim the host record
// while the store is unreachable at start.
const claimRetryMax = 5 * time.Second

// run makes sure this is the only instance on its state, wires the
// drivers, switches h to them and serves until ctx ends and the server
// has stopped (served). Start-up order:
//
//  1. the DATA_DIR lock: a second instance on the same DATA_DIR fails here,
//     naming the first one's pid, before it touches the store;
//  2. the instance socket of (KV prefix, store) in this network namespace:
//     a second instance that would manage the same overlays here fails;
//  3. the store, the host identity (DATA_DIR/host-id), node name and VTEP;
//  4. the host record hosts/<ID>, claimed with a Consul session and read
//     back by a get and a list, before the driver reconciles anything.
//     While the store is unreachable this step is retried (calls are told
//     so); every other failure ends the start.
func run(ctx context.Context, cfg Config, log *slog.Logger, h *switchHandler, st *startStatus, served <-chan error) error {
	lock, err := hostid.Lock(cfg.DataDir)
	if err != nil {
		return err
	}
	defer lock.Close()
	logWaited(log, "DATA_DIR lock", lock.Waited())
	defer startMemoryLimit(ctx, os.Getenv)()                       // unless GOMEMLIMIT is set (plugin/memory.go)
	stopPprof, err := startPprof(ctx, os.Getenv, cfg.DataDir, log) // debug only (plugin/pprof.go)
	if err != nil {
		return err
	}
	defer stopPprof()
	// The firewall flavour (iptables-nft or -legacy) is chosen while the
	// store is reached and the host record claimed: the save commands only
	// read (issue 16).
	fwDetect := vxlan.DetectFirewall(ctx, log)

	ccfg, useConsul, err := kvstore.ConsulConfigFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	storeName := "embedded"
	if useConsul {
		storeName = ccfg.Address
	}
	// Issue 14: the well-known address's settings (plugin/linklocal.go).
	llSettings, err := linkLocalFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	// Issue 13: the cluster-wide networks' settings (plugin/netsync.go).
	syncSettings, err := netSyncFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	syncSettings.retireFile = filepath.Join(cfg.DataDir, "netsync-retiring.json")
	inst, err := hostid.ListenInstance(ccfg.Prefix, storeName,
		fmt.Sprintf("DATA_DIR %s, socket %s", cfg.DataDir, cfg.Socket))
	if err != nil {
		return err
	}
	defer inst.Close()
	logWaited(log, "instance socket", inst.Waited())

	store, shared, agentName, err := openStore(ctx, cfg, ccfg, useConsul, log)
	if err != nil {
		return err
	}
	defer store.Close()

	// A host upgraded from a version before host identities keeps the
	// identity its records are keyed by (its node name).
	legacy, err := legacyIdentity(ctx, store, cfg, st, log)
	if err != nil {
		return err
	}
	hostID, err := hostid.LoadOr(cfg.DataDir, legacy)
	if err != nil {
		return err
	}
	// ACL (issue 17): the token's permissions besides the KV prefix (agent
	// read without NODE_NAME, session and service write), before anything
	// is written to the store; a refusal names the missing rule.
	if err := checkConsulPermissions(ctx, store, cfg.Node != "", hostID, st, log); err != nil {
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
	rec := hostRecord{
		ID: hostID, Node: node, VTEP: vtep,
		PID: os.Getpid(), Started: time.Now().UTC().Truncate(time.Second), Version: buildVersion(),
		BootID: hostid.BootID(), LockFile: lock.File(),
	}
	if agentName != nil {
		// Where the registrar's services go: the reaper of another host
		// looks for them there once this one is gone.
		if n, err := agentName(); err == nil && n != node {
			rec.AgentNode = n
		}
	}
	var hc *hostClaim
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, claimRetryMax) {
		if hc, err = claimHost(ctx, store, rec, cfg.DataDir, log); err == nil {
			break
		}
		if !errors.Is(err, kvstore.ErrUnavailable) || ctx.Err() != nil {
			return err
		}
		st.set(fmt.Sprintf("waiting for the state store: %v", err))
		log.Warn("state store unreachable at start; retrying", "error", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (while waiting for the store: %v)", ctx.Err(), err)
		case <-time.After(wait):
		}
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := hc.Release(rctx); err != nil {
			log.Warn("release host record", "host_id", hostID, "error", err)
		}
	}()

	// Issue 14: DNS (and the Consul API proxy) on the well-known address,
	// bound before any bridge carries it.
	linkLocal, stopLinkLocal, err := startLinkLocal(ctx, log, llSettings, ccfg, useConsul)
	if err != nil {
		return err
	}
	defer stopLinkLocal()
	owner := ownerTag(ccfg.Prefix, storeName)
	vcfg := vxlan.Config{VTEP: vtep, Port: cfg.VXLANPort, Sysctl: cfg.SysctlRoot, Owner: owner, LinkLocal: linkLocal, NoTrackBridged: !cfg.TrackBridged, Firewall: fwDetect, Logger: log}
	// What the metrics read of the kernel: both namespaces with a
	// data-plane namespace.
	inspect := func() ([]vxlan.KernelNetwork, error) { return vxlan.Inspect(nil, owner) }
	if cfg.DataplaneNS != "" {
		dpns, closeDP, err := openDataplane(ctx, log, cfg.DataplaneNS, cfg.HostPID, owner)
		if err != nil {
			return err
		}
		defer closeDP()
		dph, err := dpns.handle()
		if err != nil {
			return fmt.Errorf("data-plane namespace %s: %w", dpns.path, err)
		}
		defer dph.Close()
		vcfg.DataplaneNS = dpns.procPath()
		inspect = func() ([]vxlan.KernelNetwork, error) { return vxlan.InspectDataplane(nil, dph, owner) }
	}
	dp, err := vxlan.New(vcfg)
	if err != nil {
		return fmt.Errorf("data plane: %w", err)
	}
	// Only a warning: it lists the links beside the restore (issue 16).
	foreignDone := make(chan struct{})
	go func() {
		defer close(foreignDone)
		if foreign, err := dp.ForeignOwners(); err == nil && len(foreign) > 0 {
			for owner, links := range foreign {
				log.Warn("the kernel holds overlays of another consul-overlay instance; they are left alone. If KV_PREFIX or CONSUL_HTTP_ADDR changed, set them back: the containers on those overlays are not managed by this instance",
					"other_instance", vxlan.OwnerMark(owner), "links", links, "kv_prefix", ccfg.Prefix, "consul", storeName)
			}
		}
	}()
	defer func() { <-foreignDone }()
	// Encrypted networks (issue 17): the key ring, before the driver
	// reconciles, so a restart keeps its states.
	icfg, err := ipsecSettings(os.Getenv)
	if err != nil {
		return err
	}
	stopIPsec, err := startIPsec(ctx, log, store, dp, icfg)
	if err != nil {
		return err
	}
	defer stopIPsec()
	// This host's own writes (IPAM, the driver's records, the cluster-wide
	// networks) go with a fence on its host record (kvstore.OwnFenced):
	// held by its session, or written anew in the same transaction. A
	// reap of this host under way (it came back past the grace period)
	// stops before it can free or remove anything written from now on,
	// even in the seconds before the claim learns its session is gone.
	// With the session held this costs nothing: the same one request.
	own := store
	if hc.claim != nil {
		own = kvstore.OwnFenced(store, hc.claim)
	}
	// OPS hook (issue 18): metrics on METRICS_ADDR; the drivers get the
	// metered store and data plane (own and dp themselves when off).
	mstore, mdp, stopMetrics, err := startMetrics(ctx, log, own, dp, inspect)
	if err != nil {
		return err
	}
	defer stopMetrics()
	// Registration needs the local Consul agent; the driver and the
	// registrar refer to each other (the registrar's Endpoints is the
	// driver), and IPAM asks the driver which addresses its endpoints use.
	var drv *driver.Driver
	var ip *ipam.Driver
	_, consulStore := store.(*kvstore.Consul)
	// How long Docker's ReleaseAddress waits for the driver's restore to
	// tell whether an endpoint holds the address (see AddressUsedOnceReady).
	const releaseWaitsForRestore = 5 * time.Second
	if cfg.IPAMGrace < time.Minute {
		// The sweep takes an unused address older than the grace for a
		// crash's orphan: Docker's RequestAddress comes before its
		// CreateEndpoint, and a slow store can stretch that gap.
		log.Warn("IPAM_GRACE below a minute: an address may be freed between Docker's address request and its endpoint's creation, and handed out twice; meant for tests", "ipam_grace", cfg.IPAMGrace)
	}
	// ipam's Node is the owner recorded on allocations: the unique host
	// identity, never the human node name that hosts may share.
	ip, err = ipam.New(ipam.Config{
		Node:  hostID,
		Grace: cfg.IPAMGrace,
		InUse: func(poolID string, a netip.Addr) bool {
			_, subnet, _, err := ipam.ParsePoolID(poolID)
			return err == nil && drv != nil && drv.AddressUsedOnceReady(subnet, a, releaseWaitsForRestore)
		},
		InContainer: func(poolID string, a netip.Addr) bool {
			if drv == nil {
				return true
			}
			return addressInContainer(log, drv, ip, hostID, poolID, a, releaseWaitsForRestore)
		},
		HeldReady: func() error {
			if drv == nil {
				return errors.New("consul-overlay's network driver is not started yet; try again")
			}
			return drv.WaitRestored(releaseWaitsForRestore)
		},
		Held: func(poolID string, a netip.Addr) bool {
			_, subnet, _, err := ipam.ParsePoolID(poolID)
			return err == nil && drv != nil && drv.AddressUsed(subnet, a)
		},
		Restored: func() <-chan struct{} { return drv.Ready() },
		Kept: func(poolID string, gw netip.Addr) int {
			if drv == nil {
				return 0
			}
			return drv.KeptHolds(poolID, gw, releaseWaitsForRestore)
		},
		DefaultPoolV4:     cfg.PoolV4,
		DefaultPoolV4Size: cfg.PoolV4Size,
		DefaultPoolV6:     cfg.PoolV6,
		DefaultPoolV6Size: cfg.PoolV6Size,
		Logger:            log,
	}, mstore) // OPS hook (issue 18): metered store
	if err != nil {
		return fmt.Errorf("ipam: %w", err)
	}
	// The engine's API (optional): container metadata for the registrar,
	// and the pinned engine's word for the background clean-ups.
	var docker *dockerapi.Client
	if cfg.DockerSocket != "" {
		docker = dockerapi.New(cfg.DockerSocket)
	}
	var reg *discovery.Registrar
	if c, ok := store.(*kvstore.Consul); ok {
		reg, err = newRegistrar(cfg, log, node, hostID, c.Client(), docker, lateEndpoints{&drv})
		if err != nil {
			return err
		}
	}
	// HostID identifies this host in every record; Node is the
	// human-readable name for logs and Consul.
	dcfg := driver.Config{
		HostID: hostID,
		Node:   node, VTEP: vtep, Shared: shared,
		OwnsAddressSpace: ip.Owns,
		ReclaimAddress: func(ctx context.Context, space string, subnet netip.Prefix, a netip.Addr, mac string, created time.Time) error {
			return ip.ReclaimAddress(ctx, ipam.PoolID(space, subnet, netip.Prefix{}), a, ipam.Holder{MAC: mac, Created: created})
		},
		HoldPool: ip.HoldPool,
		// The reaper runs on a Consul store; a host whose identity was
		// adopted now has no members/ record until its first check.
		Reapable:        consulStore && legacy == "",
		ObserveWatchLag: observeWatchLag,
		PeerResync:      cfg.PeerResync,
		LinkLocal:       linkLocal, // issue 14
		PendingDir:      filepath.Join(cfg.DataDir, driver.PendingDirName),
		StoreTag:        "kv_prefix=" + ccfg.Prefix, // the Consul address may be written another way next time
		Logger:          log,
	}
	if dcfg.Reapable {
		// A restart after an eviction takes what containers run from it.
		dcfg.SnapshotPath = filepath.Join(cfg.DataDir, driver.SnapshotName)
	}
	if reg != nil {
		dcfg.Registrar = reg
		meterRegistrar(log, reg)
	}
	drv, err = driver.New(dcfg, mstore, mdp) // OPS hook (issue 18): metered store and data plane
	if err != nil {
		return err
	}
	drv.Start()
	defer drv.Close()
	// Liveness (issue 12): every host reaps hosts gone longer than
	// HOST_GRACE, and this host re-asserts its state if it was evicted
	// while only cut off from Consul.
	stopLive, err := startLiveness(ctx, log, store, hc, drv, ip, node, hostID, vtep)
	if err != nil {
		return err
	}
	defer stopLive()
	{
		hctx, hcancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			housekeeping(hctx, log, drv, ip, docker, cfg.DataDir, min(5*time.Minute, ip.Grace()/4))
		}()
		defer func() { hcancel(); <-done }()
	}
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
	h.setFinal(newServer(log, drv, ip))
	// Cluster-wide networks (issue 13): after the drivers serve, since
	// the syncer creates networks through the engine, which calls them.
	stopSync, err := startNetSync(ctx, log, syncSettings, mstore, shared, docker, cfg.Socket, hostID, node)
	if err != nil {
		return err
	}
	defer stopSync()
	log.Info("consul-overlay started", "node", node, "host_id", hostID, "vtep", vtep, "vxlan_port", cfg.VXLANPort, "shared_store", shared)
	// The server stops first (in-flight calls finish), then the deferred
	// clean-ups run.
	return <-served
}

// newRegistrar builds the service registrar. The Docker API (container
// names, labels and environment) is optional: without it services are
// named from what the driver knows, and nothing is found stale.
func newRegistrar(cfg Config, log *slog.Logger, node, hostID string, agent *api.Client, docker *dockerapi.Client, eps discovery.Endpoints) (*discovery.Registrar, error) {
	reg, err := discovery.New(discovery.Config{
		Node: node, HostID: hostID, Agent: agent, Docker: docker,
		// The engine this host's containers run on, pinned at first
		// contact: a plugin pointed at another engine reclaims nothing.
		EngineIDFile: filepath.Join(cfg.DataDir, engineIDFile),
		Interval:     cfg.AntiEntropy,
		Endpoints:    eps,
		Logger:       log,
	})
	if err != nil {
		return nil, fmt.Errorf("service registration: %w", err)
	}
	return reg, nil
}

// lateEndpoints hands the registrar the driver, which is built after it.
type lateEndpoints struct{ d **driver.Driver }

func (l lateEndpoints) HeldEndpoints(ctx context.Context) ([]discovery.Endpoint, error) {
	return (*l.d).HeldEndpoints(ctx)
}

func (l lateEndpoints) ReclaimEndpoint(ctx context.Context, id string) {
	(*l.d).ReclaimEndpoint(ctx, id)
}

// openStore opens Consul when CONSUL_HTTP_ADDR is set (useConsul), else
// the embedded store in DATA_DIR. agentName asks the local Consul agent
// for its node name (nil without Consul), once: the node name and the
// host record's agent node share its answer.
func openStore(ctx context.Context, cfg Config, ccfg kvstore.ConsulConfig, useConsul bool, log *slog.Logger) (kvstore.Store, bool, func() (string, error), error) {
	if useConsul {
		c, err := kvstore.NewConsul(ccfg)
		if err != nil {
			return nil, false, nil, fmt.Errorf("consul store: %w", err)
		}
		log.Info("state store: consul", "address", c.Address(), "prefix", ccfg.Prefix)
		agentName := sync.OnceValues(func() (string, error) {
			ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			return c.NodeName(ctx)
		})
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
