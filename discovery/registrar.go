package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/dockerapi"
)

// Defaults of Config.
const (
	DefaultInterval   = 30 * time.Second
	DefaultRetryMax   = 10 * time.Second
	DefaultTimeout    = 5 * time.Second
	DefaultStaleGrace = 30 * time.Second
)

const (
	retryMin     = 200 * time.Millisecond
	tombstoneTTL = time.Hour // how long a deregistered endpoint stays deregistered against Held
	inspectQueue = 256
)

// Endpoints is the driver's side of anti-entropy. *driver.Driver
// implements it.
type Endpoints interface {
	// HeldEndpoints returns the endpoints this host holds (joined and not
	// yet left). It must fail rather than return an incomplete list (for
	// example while the driver restores its state).
	HeldEndpoints(ctx context.Context) ([]Endpoint, error)
	// ReclaimEndpoint releases an endpoint whose container the engine no
	// longer has (its addresses and devices). Its services are already
	// gone by then. It runs on the anti-entropy goroutine and must not
	// call Sync; calling Deregister is fine.
	ReclaimEndpoint(ctx context.Context, endpointID string)
}

// Config configures a Registrar. Zero values mean what each field says.
type Config struct {
	// Node names this host in every service's Meta (key "node"): the
	// human-readable name, also the Consul node's. Zero: os.Hostname().
	Node string
	// HostID is this host's identity, unique in the cluster, in every
	// service's Meta (key "host-id"). A service is this host's only when
	// both its node and host-id match, so hosts that share one agent (and
	// so one node name) never touch each other's services. Zero: services
	// carry no host-id and are recognised by node name alone, which is
	// only safe when every host has its own agent.
	HostID string
	// Agent is the client of the local Consul agent, carrying the
	// daemon's address, ACL token and TLS settings. Required.
	Agent *api.Client
	// Docker is the engine's API. Nil: no container metadata (names fall
	// back, see doc.go) and no stale detection.
	Docker *dockerapi.Client
	// EngineIDFile is where the ID of the Docker engine this host's
	// endpoints belong to is pinned (a file in DATA_DIR). Written at the
	// first successful contact with the engine, compared at every
	// anti-entropy pass after: while the engine answering on the socket
	// has another ID, nothing is reclaimed. Zero: the ID is pinned in
	// memory at first contact, so an engine swapped while the plugin runs
	// is caught but a wrong engine at start is not.
	EngineIDFile string
	// Interval is the anti-entropy period. Zero: DefaultInterval.
	Interval time.Duration
	// StaleGrace is how long a held endpoint must have been missing from
	// the engine's complete container listings (in passes at least this
	// far apart) before it may be reclaimed. Zero: DefaultStaleGrace.
	StaleGrace time.Duration
	// RetryMax caps the backoff between attempts to reach the agent.
	// Zero: DefaultRetryMax.
	RetryMax time.Duration
	// Timeout bounds each Consul and Docker call. Zero: DefaultTimeout.
	Timeout time.Duration
	// Endpoints is the driver: anti-entropy registers what it holds,
	// drops what it does not, and hands back endpoints whose container is
	// gone (see doc.go for when). Nil: the endpoints given to Register are
	// the truth and nothing is reclaimed.
	Endpoints Endpoints
	// Logger receives lifecycle and retry messages. Nil: discarded.
	Logger *slog.Logger
}

// Registrar keeps one Consul service per joined endpoint (per exposed
// port) in the local agent. See the package documentation.
type Registrar struct {
	cfg     Config
	agent   *api.Agent
	log     *slog.Logger
	running atomic.Bool
	// For tests: completed Sync passes and event subscriptions.
	syncPasses    atomic.Int64
	subscriptions atomic.Int64

	kick     chan struct{} // wakes the worker; capacity 1
	inspectC chan string   // container IDs to inspect

	syncMu sync.Mutex // one anti-entropy pass at a time; taken before opMu
	opMu   sync.Mutex // serialises agent writes (apply); taken before mu

	mu        sync.Mutex
	seq       uint64                          // bumped by every change of eps
	eps       map[string]*entry               // by endpoint ID
	gone      map[string]time.Time            // deregistered endpoint IDs, until tombstoneTTL
	dirty     map[string]bool                 // endpoint IDs whose services must be written
	orphans   map[string]bool                 // service IDs to remove from the agent
	meta      map[string]*dockerapi.Container // container metadata by the first 12 hex digits of its ID
	inspectOn map[string]bool                 // container IDs queued for inspection
	agentDown bool                            // a write failed; re-assert everything after the next success
	refused   map[string]string               // service IDs held by someone else, already logged → the endpoint refused

	// Engine pinning; guarded by syncMu (only Sync uses them).
	enginePinned   string // the pinned engine ID when EngineIDFile is empty
	engineMismatch string // the foreign engine ID last logged, "" while the engine matches
}

// entry is one endpoint; fields are guarded by Registrar.mu.
type entry struct {
	ep   Endpoint
	seq  uint64               // Registrar.seq when it was last set
	info *dockerapi.Container // nil until known
	ids  []string             // service IDs written to the agent for it
	// missingSince is when a trusted, complete container listing first
	// lacked the endpoint's container; zero while it is listed.
	missingSince time.Time
}

// belongs reports whether a container (its ID and endpoint IDs) is the one
// of an endpoint: Docker lists the endpoint among the container's, or the
// container ID matches the one the driver knew.
func belongs(id string, endpointIDs []string, ep Endpoint) bool {
	return slices.Contains(endpointIDs, ep.ID) || (ep.ContainerID != "" && idMatches(id, ep.ContainerID))
}

// New checks cfg and returns a registrar. It does no I/O.
func New(cfg Config) (*Registrar, error) {
	if cfg.Agent == nil {
		return nil, errors.New("new registrar: no consul agent client")
	}
	if cfg.Node == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("new registrar: node name: %w", err)
		}
		cfg.Node = h
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = DefaultRetryMax
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.StaleGrace <= 0 {
		cfg.StaleGrace = DefaultStaleGrace
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Registrar{
		cfg:       cfg,
		agent:     cfg.Agent.Agent(),
		log:       log.With("component", "discovery"),
		kick:      make(chan struct{}, 1),
		inspectC:  make(chan string, inspectQueue),
		eps:       map[string]*entry{},
		gone:      map[string]time.Time{},
		dirty:     map[string]bool{},
		orphans:   map[string]bool{},
		meta:      map[string]*dockerapi.Container{},
		inspectOn: map[string]bool{},
		refused:   map[string]string{},
	}, nil
}

// Register records a joined endpoint and returns at once; its services
// are written by Run's worker (or the next Sync). Registering an endpoint
// again replaces what was known of it. Safe to call from a driver call:
// it never waits for Consul or Docker.
func (r *Registrar) Register(ep Endpoint) {
	if ep.ID == "" {
		return
	}
	r.mu.Lock()
	delete(r.gone, ep.ID)
	r.setLocked(ep)
	r.mu.Unlock()
	r.wake()
}

// setLocked adds or updates an entry and marks it dirty. Caller holds mu.
func (r *Registrar) setLocked(ep Endpoint) {
	e := r.eps[ep.ID]
	if e == nil {
		e = &entry{}
		r.eps[ep.ID] = e
	}
	r.seq++
	e.ep, e.seq = ep, r.seq
	if e.info == nil || !belongs(e.info.ID, e.info.EndpointIDs, ep) {
		e.info = r.metaLocked(ep)
	}
	r.dirty[ep.ID] = true
}

// Deregister forgets an endpoint and returns at once; its services are
// removed by Run's worker (or the next Sync). Unknown IDs are ignored.
func (r *Registrar) Deregister(endpointID string) {
	r.mu.Lock()
	r.dropLocked(endpointID)
	r.mu.Unlock()
	r.wake()
}

// dropLocked removes an entry and queues its services for removal.
// Caller holds mu.
func (r *Registrar) dropLocked(endpointID string) {
	r.gone[endpointID] = time.Now()
	for sid, id := range r.refused {
		if id == endpointID {
			delete(r.refused, sid)
		}
	}
	e := r.eps[endpointID]
	if e == nil {
		return
	}
	for _, id := range e.ids {
		r.orphans[id] = true
	}
	delete(r.eps, endpointID)
	delete(r.dirty, endpointID)
	r.seq++
}

func (r *Registrar) wake() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Run starts the worker that writes registrations (retrying with backoff
// while the agent is unreachable), the anti-entropy loop (a Sync at start
// and every Interval) and, with a Docker client, the event watcher that
// completes registrations with container metadata. It returns nil when ctx
// ends, after all its goroutines have stopped. Services stay registered:
// they belong to containers that keep running. Run may be called once.
func (r *Registrar) Run(ctx context.Context) error {
	if !r.running.CompareAndSwap(false, true) {
		return errors.New("registrar: Run called twice")
	}
	r.log.Info("service registration started", "node", r.cfg.Node, "host", r.cfg.HostID, "docker", r.cfg.Docker != nil, "interval", r.cfg.Interval)
	var wg sync.WaitGroup
	wg.Go(func() { r.work(ctx) })
	wg.Go(func() { r.antiEntropy(ctx) })
	if r.cfg.Docker != nil {
		wg.Go(func() { r.inspector(ctx) })
		wg.Go(func() { r.watchDocker(ctx) })
	}
	<-ctx.Done()
	wg.Wait()
	r.log.Info("service registration stopped", "node", r.cfg.Node)
	return nil
}

// work applies pending changes whenever woken, backing off while the agent
// fails.
func (r *Registrar) work(ctx context.Context) {
	var backoff time.Duration
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		if backoff == 0 {
			select {
			case <-ctx.Done():
				return
			case <-r.kick:
			}
		} else {
			// Wakes are not a reason to hammer an agent that is down.
			timer.Reset(backoff)
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
			}
		}
		if err := r.apply(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			if backoff == 0 {
				r.log.Warn("service registration failed, retrying with backoff", "err", err)
			} else {
				r.log.Debug("service registration failed again", "err", err)
			}
			backoff = min(max(2*backoff, retryMin), r.cfg.RetryMax)
			continue
		}
		if backoff > 0 {
			r.log.Info("service registration caught up after failures")
		}
		backoff = 0
	}
}

// antiEntropy runs Sync at start and every Interval. A failed pass (the
// driver still restoring its state, the agent down) is
// retried after a short backoff rather than a whole Interval: after a
// restart the first pass is the one that removes what went stale.
func (r *Registrar) antiEntropy(ctx context.Context) {
	retry := 500 * time.Millisecond
	for {
		wait := r.cfg.Interval
		if err := r.Sync(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("service anti-entropy pass failed; retrying", "err", err, "retry_in", retry)
			wait = min(retry, r.cfg.Interval)
			retry = min(retry*2, r.cfg.RetryMax)
		} else {
			retry = 500 * time.Millisecond
		}
		if !sleep(ctx, wait) {
			return
		}
	}
}

// apply writes what is pending: dirty endpoints first, then removals of
// services no endpoint claims. It stops at the first failure that is
// worth a retry, leaving the rest pending.
func (r *Registrar) apply(ctx context.Context) error {
	r.opMu.Lock()
	defer r.opMu.Unlock()
	for ctx.Err() == nil {
		r.mu.Lock()
		if id, ok := anyKey(r.dirty); ok {
			delete(r.dirty, id)
			e := r.eps[id]
			if e == nil {
				r.mu.Unlock()
				continue
			}
			regs := buildServices(r.owner(), e.ep, e.info)
			written := slices.Clone(e.ids)
			r.mu.Unlock()
			if err := r.write(ctx, id, e, regs, written); err != nil {
				return err
			}
			continue
		}
		if sid, ok := anyKey(r.orphans); ok {
			delete(r.orphans, sid)
			claimer, claimed := r.claimerLocked(sid)
			if claimed {
				// Another endpoint wrote this ID too: the agent may hold
				// the leaving one's registration; the claimer's goes in
				// again.
				r.dirty[claimer] = true
			}
			r.mu.Unlock()
			if claimed {
				continue
			}
			if err := r.deregister(ctx, sid); err != nil {
				r.mu.Lock()
				r.orphans[sid] = true
				r.mu.Unlock()
				return err
			}
			continue
		}
		r.mu.Unlock()
		return nil
	}
	return ctx.Err()
}

// write registers regs for entry e (endpoint id) and removes services it
// had before that it no longer has. A service ID not among written (the
// IDs this run wrote for e) is first looked up in the agent: one held by
// somebody else is left alone. Caller holds opMu, not mu.
func (r *Registrar) write(ctx context.Context, id string, e *entry, regs []*api.AgentServiceRegistration, written []string) error {
	var done []string
	var failed error
	for _, reg := range regs {
		if !slices.Contains(written, reg.ID) {
			ok, err := r.mayRegister(ctx, id, reg)
			if err != nil {
				failed = err
				break
			}
			if !ok {
				continue
			}
		}
		err := r.register(ctx, reg)
		var se api.StatusError
		if err != nil && errors.As(err, &se) && se.Code == http.StatusBadRequest {
			// The agent refuses this registration as such; retrying the
			// same request cannot help. Whatever the agent holds under
			// this ID stays; anti-entropy tries again later.
			r.log.Warn("consul agent refused service", "endpoint", id, "service", reg.Name, "service_id", reg.ID, "err", err)
			done = append(done, reg.ID)
			continue
		}
		if err != nil {
			failed = err
			break
		}
		done = append(done, reg.ID)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.eps[id] != e {
		// Deregistered while we wrote: undo.
		for _, sid := range append(slices.Clone(e.ids), done...) {
			r.orphans[sid] = true
		}
		return failed
	}
	if failed != nil {
		r.dirty[id] = true
		e.ids = union(e.ids, done)
		return failed
	}
	for _, sid := range e.ids {
		if !slices.Contains(done, sid) {
			r.orphans[sid] = true
		}
	}
	e.ids = done
	return nil
}

// claimerLocked returns a live entry (its endpoint ID) that owns service
// ID sid, if any. Caller holds mu.
func (r *Registrar) claimerLocked(sid string) (string, bool) {
	for id, e := range r.eps {
		if slices.Contains(e.ids, sid) {
			return id, true
		}
	}
	return "", false
}

// owner is this host's identity in service Meta.
func (r *Registrar) owner() owner { return owner{node: r.cfg.Node, hostID: r.cfg.HostID} }

// lookup returns the agent's service with ID sid, nil if it has none.
func (r *Registrar) lookup(ctx context.Context, sid string) (*api.AgentService, error) {
	cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	defer cancel()
	svc, _, err := r.agent.Service(sid, (&api.QueryOptions{}).WithContext(cctx))
	var se api.StatusError
	if errors.As(err, &se) && se.Code == http.StatusNotFound {
		return nil, nil
	}
	r.noteAgent(err)
	if err != nil {
		return nil, fmt.Errorf("look up service %s in consul agent: %w", sid, err)
	}
	return svc, nil
}

// mayRegister reports whether reg may be written for endpoint endpointID:
// the agent has no service of that ID, or one this host may replace.
// Refusals are logged once per service ID.
func (r *Registrar) mayRegister(ctx context.Context, endpointID string, reg *api.AgentServiceRegistration) (bool, error) {
	svc, err := r.lookup(ctx, reg.ID)
	if err != nil {
		return false, err
	}
	if svc == nil || r.owner().mayReplace(svc, endpointID) {
		r.mu.Lock()
		delete(r.refused, reg.ID)
		r.mu.Unlock()
		return true, nil
	}
	r.mu.Lock()
	_, logged := r.refused[reg.ID]
	r.refused[reg.ID] = endpointID
	r.mu.Unlock()
	if !logged {
		r.log.Warn("service ID is held by a service this host did not register; leaving it alone",
			"endpoint", endpointID, "service_id", reg.ID, "holder_service", svc.Service,
			"holder_managed_by", svc.Meta[MetaManagedBy], "holder_node", svc.Meta[MetaNode], "holder_host", svc.Meta[MetaHostID])
	}
	return false, nil
}

func (r *Registrar) register(ctx context.Context, reg *api.AgentServiceRegistration) error {
	cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	defer cancel()
	opts := api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(cctx)
	err := r.agent.ServiceRegisterOpts(reg, opts)
	r.noteAgent(err)
	if err != nil {
		return fmt.Errorf("register service %q (id %s) with consul agent: %w", reg.Name, reg.ID, err)
	}
	r.log.Info("service registered", "service", reg.Name, "service_id", reg.ID, "address", reg.Address, "port", reg.Port)
	return nil
}

// deregister removes service sid from the agent if it is this host's
// (marker, node and host identity); anything else under that ID is left
// alone.
func (r *Registrar) deregister(ctx context.Context, sid string) error {
	svc, err := r.lookup(ctx, sid)
	if err != nil {
		return err
	}
	if svc == nil {
		return nil
	}
	if !r.owner().owns(svc) {
		r.log.Debug("not deregistering a service this host does not own", "service_id", sid, "service", svc.Service,
			"holder_node", svc.Meta[MetaNode], "holder_host", svc.Meta[MetaHostID])
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	defer cancel()
	err = r.agent.ServiceDeregisterOpts(sid, (&api.QueryOptions{}).WithContext(cctx))
	var se api.StatusError
	if errors.As(err, &se) && se.Code == http.StatusNotFound {
		err = nil // already gone
	}
	r.noteAgent(err)
	if err != nil {
		return fmt.Errorf("deregister service %s from consul agent: %w", sid, err)
	}
	r.log.Info("service deregistered", "service", svc.Service, "service_id", sid)
	return nil
}

// noteAgent tracks the agent's reachability. After a failure that is not
// an answer of the agent (it may have restarted and, in dev mode or with
// its data dir lost, forgotten our services) the first success marks every
// endpoint dirty, so everything is re-asserted at once rather than at the
// next anti-entropy pass.
func (r *Registrar) noteAgent(err error) {
	var se api.StatusError
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case err == nil && r.agentDown:
		r.agentDown = false
		for id := range r.eps {
			r.dirty[id] = true
		}
		r.log.Info("consul agent reachable again, re-asserting services", "endpoints", len(r.eps))
	case err != nil && !errors.As(err, &se) && !r.agentDown:
		r.agentDown = true
		r.log.Warn("consul agent unreachable, registrations pending", "err", err)
	}
}

// Sync is one anti-entropy pass: it takes the endpoints the driver holds
// as the truth (adding missing ones, dropping ones it no longer holds),
// asks the engine which containers still exist and hands held endpoints
// whose container is proven gone back to the driver (removing their
// services; see reclaimStale), compares the agent's services of this host
// with what should be registered, and writes the difference. It returns
// the first error that kept it from finishing; endpoints changed by
// Register or Deregister during the pass are left to the worker.
func (r *Registrar) Sync(ctx context.Context) error {
	r.syncMu.Lock()
	defer r.syncMu.Unlock()

	r.mu.Lock()
	start := r.seq
	for id, t := range r.gone {
		if time.Since(t) > tombstoneTTL {
			delete(r.gone, id)
		}
	}
	r.mu.Unlock()

	// Held first, then the container list: a container of an endpoint
	// held before the list was taken existed before it, so missing from
	// the list means removed (or not yet recorded: see reclaimStale).
	if r.cfg.Endpoints != nil {
		cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
		held, err := r.cfg.Endpoints.HeldEndpoints(cctx)
		cancel()
		if err != nil {
			return fmt.Errorf("sync services: held endpoints: %w", err)
		}
		r.mergeHeld(held, start)
	}

	if r.cfg.Docker != nil {
		r.reclaimStale(ctx, start)
	}

	cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	filter := fmt.Sprintf("Meta[%q] == %q", MetaManagedBy, ManagedByValue)
	services, err := r.agent.ServicesWithFilterOpts(filter, (&api.QueryOptions{}).WithContext(cctx))
	cancel()
	r.noteAgent(err)
	if err != nil {
		return fmt.Errorf("sync services: list consul agent services: %w", err)
	}
	r.compare(services)
	if err := r.apply(ctx); err != nil {
		return fmt.Errorf("sync services: %w", err)
	}
	r.syncPasses.Add(1)
	return nil
}

// mergeHeld makes the table follow the driver: held endpoints not known
// (or known differently) are set, known ones not held are dropped, except
// for changes made after the pass started (seq > start) and endpoints
// deregistered recently.
func (r *Registrar) mergeHeld(held []Endpoint, start uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make(map[string]bool, len(held))
	added := 0
	for _, ep := range held {
		if ep.ID == "" {
			continue
		}
		ids[ep.ID] = true
		if _, gone := r.gone[ep.ID]; gone {
			continue
		}
		e := r.eps[ep.ID]
		switch {
		case e == nil:
			added++
			r.setLocked(ep)
		case e.seq <= start && !e.ep.equal(ep):
			r.setLocked(ep)
		}
	}
	dropped := 0
	for id, e := range r.eps {
		if !ids[id] && e.seq <= start {
			r.dropLocked(id)
			dropped++
		}
	}
	if added+dropped > 0 {
		r.log.Info("anti-entropy followed the driver's endpoints", "added", added, "dropped", dropped)
	}
	r.queueMissingMetaLocked()
}

// queueListedMeta queues an inspection of the containers that hold
// endpoints still without metadata.
func (r *Registrar) queueListedMeta(containers []dockerapi.Summary) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.eps {
		if e.info != nil {
			continue
		}
		for _, c := range containers {
			if belongs(c.ID, c.EndpointIDs, e.ep) {
				r.queueInspectLocked(c.ID)
				break
			}
		}
	}
}

// compare marks dirty the entries whose services the agent lacks or holds
// differently, and queues for removal this node's services no entry
// wants.
func (r *Registrar) compare(services map[string]*api.AgentService) {
	r.mu.Lock()
	defer r.mu.Unlock()
	want := map[string]*api.AgentServiceRegistration{}
	owner := map[string]string{}
	for id, e := range r.eps {
		for _, reg := range buildServices(r.owner(), e.ep, e.info) {
			// Two endpoints asking for one service ID (SERVICE_ID on a
			// container of two networks): the one set first keeps it,
			// whatever the map's order, so passes do not flip it.
			if o, ok := owner[reg.ID]; ok && r.eps[o].seq < e.seq {
				continue
			}
			want[reg.ID] = reg
			owner[reg.ID] = id
		}
	}
	missing, differ, extra := 0, 0, 0
	for sid, reg := range want {
		svc, ok := services[sid]
		switch {
		case !ok:
			missing++
			r.dirty[owner[sid]] = true
		case !r.owner().mayReplace(svc, owner[sid]):
			// Another host's now (the agent lost ours and the other host
			// registered it first): it is no longer one this run wrote,
			// so the next write looks it up and leaves it alone.
			if e := r.eps[owner[sid]]; e != nil {
				e.ids = slices.DeleteFunc(slices.Clone(e.ids), func(id string) bool { return id == sid })
			}
		case !sameService(svc, reg):
			differ++
			r.dirty[owner[sid]] = true
		}
	}
	for sid, svc := range services {
		if !r.owner().owns(svc) {
			continue // another host's, sharing this agent
		}
		if _, ok := want[sid]; !ok {
			extra++
			r.orphans[sid] = true
		}
	}
	if missing+differ+extra > 0 {
		r.log.Info("anti-entropy found differences in the consul agent", "missing", missing, "different", differ, "extra", extra)
	}
}

// sameService compares what a registration sets (not checks).
func sameService(svc *api.AgentService, reg *api.AgentServiceRegistration) bool {
	if svc.Service != reg.Name || svc.Address != reg.Address || svc.Port != reg.Port ||
		!slices.Equal(svc.Tags, reg.Tags) || !maps.Equal(svc.Meta, reg.Meta) {
		return false
	}
	for _, k := range []string{TaggedLANIPv4, TaggedLANIPv6} {
		if svc.TaggedAddresses[k] != reg.TaggedAddresses[k] {
			return false
		}
	}
	return true
}

func anyKey[V any](m map[string]V) (string, bool) {
	for k := range m {
		return k, true
	}
	return "", false
}

func union(a, b []string) []string {
	out := slices.Clone(a)
	for _, s := range b {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// idMatches reports whether the full container ID id starts with prefix,
// a prefix of at least 12 hex digits.
func idMatches(id, prefix string) bool {
	return len(prefix) >= 12 && len(id) >= len(prefix) && id[:len(prefix)] == prefix
}

// Backlog is the number of changes not yet written to the Consul agent:
// endpoints whose services must be written and services to remove.
func (r *Registrar) Backlog() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.dirty) + len(r.orphans)
}
