package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	clusterstate "consul-overlay/cluster"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
	"consul-overlay/reaper"
)

// envHostGrace is how long a host's record may lack a Consul session
// before the other hosts reap it (see package reaper).
const envHostGrace = "HOST_GRACE"

// minHostGrace: a restart must fit in the grace period with room to spare
// (a kill -9 leaves the old session up to 2×TTL).
const minHostGrace = 30 * time.Second

// hostGrace reads HOST_GRACE (default reaper.DefaultGrace).
func hostGrace(getenv func(string) string) (time.Duration, error) {
	v := strings.TrimSpace(getenv(envHostGrace))
	if v == "" {
		return reaper.DefaultGrace, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < minHostGrace {
		return 0, fmt.Errorf("%s=%q: want a duration of at least %s, like 5m", envHostGrace, v, minHostGrace)
	}
	return d, nil
}

// runningState is what the liveness check reads of the driver
// (*driver.Driver): when it is restored, what it runs (its logical
// networks by Docker network ID, its joined endpoints), and the guard that
// keeps re-asserted state in step with what still runs (reaper.Holder).
type runningState interface {
	Ready() <-chan struct{}
	LocalState(ctx context.Context) (map[string]clusterstate.Network, []clusterstate.Endpoint, error)
	reaper.Holder
}

// localNetworks groups the driver's state by logical network.
func localNetworks(nets map[string]clusterstate.Network, eps []clusterstate.Endpoint) []reaper.LocalNetwork {
	byKey := map[string]*reaper.LocalNetwork{}
	var keys []string
	for id, n := range nets {
		ln := byKey[n.Key]
		if ln == nil {
			ln = &reaper.LocalNetwork{Network: n}
			byKey[n.Key] = ln
			keys = append(keys, n.Key)
		}
		ln.NetworkIDs = append(ln.NetworkIDs, id)
	}
	for _, ep := range eps {
		n, ok := nets[ep.NetworkID]
		if !ok {
			continue
		}
		ln := byKey[n.Key]
		ln.Endpoints = append(ln.Endpoints, ep)
	}
	sort.Strings(keys)
	out := make([]reaper.LocalNetwork, 0, len(keys))
	for _, k := range keys {
		out = append(out, *byKey[k])
	}
	return out
}

// selfCheckEvery is how many scans pass between two checks of this host's
// own state when nothing else triggers one.
const selfCheckEvery = 30

// startLiveness runs, until the returned stop is called, the reaper of
// gone hosts (reaper.Run: a watch of the host records and a pass every
// reaper.DefaultInterval) and this host's check of its own state
// (reaper.Heal: was it evicted while it was away, did the store lose any
// of its records; what runs is re-asserted): at start once the driver has
// restored its state, whenever its host record is held by a new session
// (regained after a loss), and every few minutes. With the embedded store
// (one host) it does nothing.
//
// WIRING (lead): in run(), after the driver is started:
//
//	stopLive, err := startLiveness(ctx, log, store, hc, drv, ip, node, hostID, vtep)
//	if err != nil {
//		return err
//	}
//	defer stopLive()
func startLiveness(ctx context.Context, log *slog.Logger, store kvstore.Store, hc *hostClaim, drv runningState, ip *ipam.Driver, node, hostID string, vtep netip.Addr) (stop func(), err error) {
	c, ok := store.(*kvstore.Consul)
	if !ok || hc == nil || hc.claim == nil {
		return func() {}, nil
	}
	grace, err := hostGrace(os.Getenv)
	if err != nil {
		return nil, err
	}
	// Its writes (Heal's re-assertions, this host's reaps of others) go
	// with this host's own fence, as the driver's (see run).
	cl, err := clusterstate.New(clusterstate.Config{HostID: hostID, Node: node, VTEP: vtep, Logger: log}, kvstore.OwnFenced(store, hc.claim))
	if err != nil {
		return nil, err
	}
	agentNode, err := c.NodeName(ctx)
	if err != nil {
		// Services are then removed from the catalog only.
		log.Warn("liveness: cannot ask the local Consul agent its node name", "error", err)
	}
	// ACL (issue 17): a catalog step the token is refused (a service rule
	// narrower than the gone host's services) is skipped with a warning
	// instead of failing the reap (see acl.go).
	r, err := reaper.New(reaper.Config{HostID: hostID, Grace: grace, Logger: log}, store, cl, ip,
		newReaperCatalog(reaper.ConsulCatalog{Client: c.Client(), LocalNode: agentNode}, log))
	if err != nil {
		return nil, err
	}
	check := func(ctx context.Context) {
		nets, eps, err := drv.LocalState(ctx)
		if err != nil {
			log.Warn("liveness: read the driver's state", "error", err)
			return
		}
		h, err := reaper.Heal(ctx, hostID, node, cl, ip, drv, hc.claim.Touch, localNetworks(nets, eps), log)
		switch {
		case err != nil && h.Reasserted != nil:
			log.Error("liveness: re-assert this host's state", "host_id", hostID, "error", err)
		case err != nil:
			log.Warn("liveness: check this host's state in the store", "error", err)
		}
	}
	lctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runLiveness(lctx, r, drv.Ready(), hc.claim.Session, check)
	}()
	log.Info("liveness: reaping hosts whose record has no session for longer than the grace period", "grace", grace)
	return func() { cancel(); <-done }, nil
}

// runLiveness is startLiveness's loop: check runs once ready is closed,
// when session() changes to a new session, and every selfCheckEvery
// periodic passes of the reaper (reaper.Run).
func runLiveness(ctx context.Context, r *reaper.Reaper, ready <-chan struct{}, session func() string, check func(context.Context)) {
	select {
	case <-ctx.Done():
		return
	case <-ready:
	}
	check(ctx)
	last := session()
	n := 0
	r.Run(ctx, func(ctx context.Context) {
		n++
		s := session()
		if (s != "" && s != last) || n%selfCheckEvery == 0 {
			check(ctx)
		}
		if s != "" {
			last = s
		}
	})
}

// subcommand returns the operator command os.Args names, if any: the
// plugin itself runs with no arguments.
func subcommand(args []string) (func(getenv func(string) string, stdout, stderr io.Writer) int, bool) {
	if len(args) < 2 {
		return nil, false
	}
	switch args[1] {
	case "hosts", "evict":
		return func(getenv func(string) string, stdout, stderr io.Writer) int {
			return runCommand(context.Background(), args[1:], getenv, stdout, stderr)
		}, true
	case "status":
		return func(_ func(string) string, stdout, stderr io.Writer) int {
			return statusMain(args[2:], stdout, stderr)
		}, true
	case "doctor":
		return func(_ func(string) string, stdout, stderr io.Writer) int {
			return doctorMain(args[2:], stdout, stderr)
		}, true
	}
	return nil, false
}

// runCommand runs `hosts [--json]` or `evict [--force] <host-id>` with
// the plugin's settings (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, KV_PREFIX,
// HOST_GRACE, ...) and returns the exit code.
func runCommand(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fail := func(err error) int {
		fmt.Fprintf(stderr, "consul-overlay %s: %v\n", args[0], err)
		return 1
	}
	fs := flag.NewFlagSet("consul-overlay "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	force := false
	if args[0] == "evict" {
		fs.BoolVar(&force, "force", false, "evict a host whose record is held by a live session")
		fs.Usage = func() {
			fmt.Fprintln(stderr, "usage: consul-overlay evict [--force] <host-id>\n\nRemoves at once everything the cluster holds of a host known to be dead:\nits memberships, endpoint records, addresses, pool holds and services.")
			fs.PrintDefaults()
		}
	} else {
		fs.Usage = func() {
			fmt.Fprintln(stderr, "usage: consul-overlay hosts [--json]\n\nLists the hosts of the cluster: alive (record held by a session), or lost since when and gone from when.")
			fs.PrintDefaults()
		}
	}
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	if args[0] == "evict" && fs.NArg() != 1 || args[0] == "hosts" && fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	ccfg, found, err := kvstore.ConsulConfigFromEnv(getenv)
	if err != nil {
		return fail(err)
	}
	if !found {
		return fail(errors.New("set CONSUL_HTTP_ADDR (and KV_PREFIX, CONSUL_HTTP_TOKEN as the plugin has them): host liveness needs Consul"))
	}
	grace, err := hostGrace(getenv)
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	store, err := kvstore.NewConsul(ccfg)
	if err != nil {
		return fail(err)
	}
	defer store.Close()
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	// The operator acts as no host: these IDs are never a host's (a host
	// ID has no spaces; cluster.New refuses them, so use a plain word).
	const operator = "consul-overlay-operator"
	cl, err := clusterstate.New(clusterstate.Config{HostID: operator, VTEP: netip.IPv4Unspecified(), Logger: log}, store)
	if err != nil {
		return fail(err)
	}
	ip, err := ipam.New(ipam.Config{Node: operator, Logger: log}, store)
	if err != nil {
		return fail(err)
	}
	agentNode, _ := store.NodeName(ctx)
	r, err := reaper.New(reaper.Config{Grace: grace, Logger: log}, store, cl, ip,
		reaper.ConsulCatalog{Client: store.Client(), LocalNode: agentNode})
	if err != nil {
		return fail(err)
	}
	if args[0] == "evict" {
		rep, err := r.Evict(ctx, fs.Arg(0), force)
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "evicted host %s (node %q): left %d networks (%d removed), released %d addresses, %d shared and %d pool holds (%d pools removed), deregistered %d services\n",
			rep.HostID, rep.Node, len(rep.Cluster.Left), len(rep.Cluster.Removed), rep.IPAM.Addresses, rep.IPAM.SharedHolds, rep.IPAM.PoolHolds, rep.IPAM.PoolsRemoved, rep.Services)
		return 0
	}
	hosts, err := r.Hosts(ctx)
	if err != nil {
		return fail(err)
	}
	if *asJSON {
		if hosts == nil {
			hosts = []reaper.Host{}
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(hosts); err != nil {
			return fail(err)
		}
		return 0
	}
	w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "HOST ID\tNODE\tVTEP\tSTATE\tSTARTED\tVERSION")
	for _, h := range hosts {
		state := "alive"
		switch {
		case h.Alive:
		case h.LostSince.IsZero():
			state = "no session (not yet seen by a reaper)"
		case h.Gone:
			state = "gone since " + h.GoneAt.UTC().Format(time.RFC3339) + " (reaped at the next scan)"
		default:
			state = fmt.Sprintf("lost since %s, gone at %s", h.LostSince.UTC().Format(time.RFC3339), h.GoneAt.UTC().Format(time.RFC3339))
		}
		vtep, started := "-", "-"
		if h.VTEP.IsValid() {
			vtep = h.VTEP.String()
		}
		if !h.Started.IsZero() {
			started = h.Started.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", h.ID, h.Node, vtep, state, started, h.Version)
	}
	if err := w.Flush(); err != nil {
		return fail(err)
	}
	return 0
}
