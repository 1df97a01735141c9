package netsync

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/internal/dockerapi"
	"consul-overlay/kvstore"
)

// engineStaleAfter is how long the engine may not answer before the
// syncer says so at error level.
const engineStaleAfter = 30 * time.Second

// Engine is the part of the engine's API the syncer uses;
// *dockerapi.Client implements it.
type Engine interface {
	ListNetworkDetails(ctx context.Context) ([]dockerapi.NetworkDetail, error)
	InspectNetworkDetail(ctx context.Context, id string) (dockerapi.NetworkDetail, error)
	CreateNetwork(ctx context.Context, req dockerapi.NetworkCreate) (string, error)
	RemoveNetwork(ctx context.Context, id string) error
	// NetworkContainers counts the containers attached to a network (by
	// ID and name), created and stopped ones included.
	NetworkContainers(ctx context.Context, id, name string) (int, error)
	Events(ctx context.Context, since time.Time, filters map[string][]string) (<-chan dockerapi.Event, <-chan error, error)
}

var _ Engine = (*dockerapi.Client)(nil)

// Config configures a Syncer. Zero values take the documented defaults.
type Config struct {
	// HostID and Node identify this host in the specs (HostID required).
	HostID, Node string
	// DriverName returns the name this plugin's network driver has on the
	// engine (for a managed plugin, the name it is installed as); it is
	// asked until it answers, then the answer is kept (required).
	DriverName func(ctx context.Context) (string, error)
	// Resync is the period of the full pass that runs without any event,
	// which also retries failed steps (default 5s).
	Resync time.Duration
	// RetryMax bounds the wait between attempts to reach the engine
	// (default 1s; the first retry comes after 100ms).
	RetryMax time.Duration
	// GoneGrace is how long a network this host had, that disappeared
	// without its destroy event, waits for the event before it is created
	// again from the spec (default 2s).
	GoneGrace time.Duration
	// RetireFile, when set, keeps on disk the networks a user removed
	// here whose retirement the store has not taken yet (DATA_DIR), so a
	// restart retries it instead of creating them again from their live
	// spec. "" keeps them in memory only.
	RetireFile string
	Logger     *slog.Logger
}

// Syncer keeps one host's engine and the cluster's specs in step (see the
// package documentation). Run it once.
type Syncer struct {
	cfg    Config
	log    *slog.Logger
	store  kvstore.Store
	engine Engine

	driver string // resolved driver name ("" until known)

	// State of the run loop; touched only by Run's goroutine.
	specs       map[string]cluster.SpecPair
	haveSpecs   bool
	known       map[string]string // name → ID of a cluster-wide network seen here
	matched     map[string]string // network ID → incarnation it matched
	own         map[string]bool   // IDs this syncer created
	removing    map[string]bool   // IDs this syncer removed (their destroy is ours)
	retiredSeen map[string]bool   // incarnations seen or made retired
	// toRetire: name → incarnation a user removed here whose retirement
	// the store did not take yet; each pass tries again.
	toRetire     map[string]string
	missingSince map[string]time.Time // name → when a known network was first missed
	reported     map[string]string    // dedup key → last message logged once

	mu        sync.Mutex // guards conflicts and lastErr, read by Status
	conflicts map[string]Conflict
	lastErr   string
	ready     chan struct{} // closed after the first complete pass
	readyOnce sync.Once
}

// Conflict is a network created here that lost to the cluster's spec.
type Conflict struct {
	Network  string
	Cluster  string // the spec's settings
	Here     string // this host's settings
	Origin   string // node that published the spec
	Outcome  string
	Occurred time.Time
}

// New returns a syncer of store and engine.
func New(cfg Config, store kvstore.Store, engine Engine) (*Syncer, error) {
	if cfg.HostID == "" {
		return nil, errors.New("netsync: host ID is required")
	}
	if store == nil || engine == nil || cfg.DriverName == nil {
		return nil, errors.New("netsync: store, engine and DriverName are required")
	}
	if cfg.Node == "" {
		cfg.Node = cfg.HostID
	}
	if cfg.Resync <= 0 {
		cfg.Resync = 5 * time.Second
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = time.Second
	}
	if cfg.GoneGrace <= 0 {
		cfg.GoneGrace = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Syncer{
		cfg: cfg, log: cfg.Logger, store: store, engine: engine,
		specs: map[string]cluster.SpecPair{}, known: map[string]string{}, matched: map[string]string{},
		own: map[string]bool{}, removing: map[string]bool{}, retiredSeen: map[string]bool{}, toRetire: map[string]string{},
		missingSince: map[string]time.Time{}, reported: map[string]string{},
		conflicts: map[string]Conflict{}, ready: make(chan struct{}),
	}
	pending, err := loadRetiring(cfg.RetireFile)
	if err != nil {
		// The syncer runs without them: only networks a user removed
		// while the store refused, if any, may be created here again.
		s.log.Error("networks to retire not read from DATA_DIR; a network removed here before the last stop may be created here again from its spec", "error", err)
	}
	for name, inc := range pending {
		s.toRetire[name] = inc
		s.retiredSeen[inc] = true
		s.log.Warn("cluster-wide network removed here before the last stop, its retirement not taken by the store yet: retrying", "network", name)
	}
	return s, nil
}

// Ready is closed after the first complete pass (engine and store caught
// up).
func (s *Syncer) Ready() <-chan struct{} { return s.ready }

// Status returns the conflicts this host lost and the last error of a
// pass ("" after a clean one).
func (s *Syncer) Status() (conflicts []Conflict, lastErr string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range slices.Sorted(maps.Keys(s.conflicts)) {
		conflicts = append(conflicts, s.conflicts[k])
	}
	return conflicts, s.lastErr
}

// Run syncs until ctx ends.
func (s *Syncer) Run(ctx context.Context) {
	specCh, err := s.store.Watch(ctx, cluster.SpecsPrefix)
	if err != nil {
		s.log.Error("cluster-wide networks: cannot watch the store; networks are not propagated", "error", err)
		return
	}
	var (
		events      <-chan dockerapi.Event
		errc        <-chan error
		since       time.Time
		backoff     = 100 * time.Millisecond
		nextConnect time.Time
		dirty       = true
		wake        = time.NewTimer(0)
		engineDown  bool
		downSince   time.Time
		downLoud    bool
	)
	defer wake.Stop()
	for {
		now := time.Now()
		if errc == nil && !now.Before(nextConnect) {
			ev, ec, err := s.engine.Events(ctx, since, map[string][]string{"type": {"network"}})
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				if !engineDown {
					s.log.Warn("cluster-wide networks: the engine's API does not answer; retrying", "error", err)
					engineDown, downSince, downLoud = true, now, false
				} else if !downLoud && now.Sub(downSince) > engineStaleAfter {
					// A managed plugin installed with the socket file as
					// its docker-sock source (older installs) keeps the
					// old file across a live-restore engine restart.
					s.log.Error("cluster-wide networks: the engine's API has not answered for a while; networks are not propagated to or from this host. Check that dockerd runs; if it restarted with live-restore and the plugin's docker-sock source is the socket file rather than its directory, set docker-sock.source to the directory (see Upgrade in the README) and restart the plugin",
						"error", err, "since", downSince.UTC().Format(time.RFC3339))
					downLoud = true
				}
				s.setErr(err)
				nextConnect = now.Add(backoff)
				backoff = min(2*backoff, s.cfg.RetryMax)
			} else {
				if engineDown {
					s.log.Info("cluster-wide networks: the engine's API answers again; catching up")
					engineDown = false
				}
				events, errc = ev, ec
				backoff = 100 * time.Millisecond
				dirty = true
			}
		}
		next := s.cfg.Resync
		if errc == nil {
			next = min(next, time.Until(nextConnect))
		}
		if dirty && errc != nil && s.haveSpecs {
			if err := s.pass(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				s.setErr(err)
				s.once("pass", "cluster-wide networks: a pass failed; retrying", err)
				next = min(next, backoff)
				backoff = min(2*backoff, s.cfg.RetryMax)
			} else {
				s.setErr(nil)
				backoff = 100 * time.Millisecond
				dirty = false
				s.readyOnce.Do(func() { close(s.ready) })
			}
			if len(s.missingSince) > 0 {
				next = min(next, s.cfg.GoneGrace/4)
			}
		}
		resetTimer(wake, max(next, 10*time.Millisecond))
		select {
		case <-ctx.Done():
			return
		case pairs, ok := <-specCh:
			if !ok {
				return // the store closed
			}
			s.setSpecs(pairs)
			dirty = true
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			if !ev.Time.IsZero() {
				since = ev.Time
			}
			s.handleEvent(ctx, ev)
			dirty = true
		case err := <-errc:
			events, errc = nil, nil
			if ctx.Err() != nil {
				return
			}
			s.log.Info("cluster-wide networks: the engine's event stream ended; resubscribing", "error", err)
			nextConnect = time.Now().Add(100 * time.Millisecond)
		case <-wake.C:
			dirty = true
		}
	}
}

func resetTimer(t *time.Timer, d time.Duration) {
	if !t.Stop() {
		select {
		case <-t.C:
		default:
		}
	}
	t.Reset(d)
}

func (s *Syncer) setErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		s.lastErr = ""
	} else {
		s.lastErr = err.Error()
	}
}

// once logs msg at warn the first time key fails with this error text.
func (s *Syncer) once(key, msg string, err error) {
	if s.reported[key] == err.Error() {
		return
	}
	s.reported[key] = err.Error()
	s.log.Warn(msg, "error", err)
}

func (s *Syncer) setSpecs(pairs []*kvstore.Pair) {
	sps, err := cluster.DecodeSpecs(pairs)
	if err != nil {
		s.log.Warn("cluster-wide networks: unreadable records in the store are ignored", "error", err)
	}
	m := make(map[string]cluster.SpecPair, len(sps))
	for _, sp := range sps {
		m[sp.Spec.Name] = sp
		if sp.Spec.Retired {
			s.retiredSeen[sp.Spec.Incarnation] = true
		}
	}
	s.specs, s.haveSpecs = m, true
}

// ours reports whether a network's driver is this plugin (a plugin name
// without a tag stands for :latest).
func (s *Syncer) ours(driver string) bool {
	return s.driver != "" && driver != "" && withTag(driver) == withTag(s.driver)
}

// withTag adds ":latest" to a plugin reference without a tag.
func withTag(ref string) string {
	last := ref[strings.LastIndex(ref, "/")+1:]
	if strings.Contains(last, ":") {
		return ref
	}
	return ref + ":latest"
}

// clusterWide reports whether a network of the engine is one of this
// plugin's cluster-wide networks: its driver, no -o name (the per-host
// mode), a name the store can key, and a subnet.
func (s *Syncer) clusterWide(n dockerapi.NetworkDetail) bool {
	return s.ours(n.Driver) && n.Options["name"] == "" && cluster.ValidSpecName(n.Name) && len(n.IPAM.Config) > 0
}

func (s *Syncer) handleEvent(ctx context.Context, ev dockerapi.Event) {
	if ev.Type != "network" || ev.Action != "destroy" || s.driver == "" {
		return
	}
	id, name := ev.ActorID, ev.Attributes["name"]
	if s.removing[id] {
		delete(s.removing, id)
		if s.known[name] == id {
			delete(s.known, name)
		}
		delete(s.matched, id)
		return
	}
	inc, matched := s.matched[id]
	delete(s.matched, id)
	delete(s.own, id)
	if s.known[name] == id {
		delete(s.known, name)
		delete(s.missingSince, name)
	}
	if !matched {
		return
	}
	// A user removed the network here: retire it cluster-wide.
	s.retiredSeen[inc] = true
	s.retire(ctx, name, inc)
}

// retire retires incarnation inc of cluster-wide network name, which a
// user removed here; if the store does not take it, every pass tries again
// (a user's rm must not be undone by the other hosts, nor by this host's
// next start).
func (s *Syncer) retire(ctx context.Context, name, inc string) {
	if s.toRetire[name] != inc {
		// Recorded before it is tried: a kill -9 before the store takes
		// it leaves the record, and the next start retries.
		s.toRetire[name] = inc
		s.saveRetiring()
	}
	done, err := cluster.RetireSpec(ctx, s.store, name, inc, s.cfg.Node)
	if err != nil {
		if s.reported["retire/"+name] == inc {
			s.log.Debug("retiring a cluster-wide network removed here failed again", "network", name, "error", err)
		} else {
			s.reported["retire/"+name] = inc
			s.log.Error("cluster-wide network removed here, but retiring it in the cluster failed; other hosts keep it until a retry succeeds (every pass)", "network", name, "error", err)
		}
		return
	}
	delete(s.toRetire, name)
	s.saveRetiring()
	if _, retried := s.reported["retire/"+name]; retried {
		delete(s.reported, "retire/"+name)
		s.log.Info("cluster-wide network removed here retired in the cluster after all", "network", name)
	}
	if done {
		s.log.Info("cluster-wide network removed by a user here: retired on every host", "network", name)
	}
}

// saveRetiring writes toRetire to Config.RetireFile. A failure is logged:
// the retry goes on in memory, and only a restart before it succeeds
// would create the network here again.
func (s *Syncer) saveRetiring() {
	if s.cfg.RetireFile == "" {
		return
	}
	if err := saveRetiring(s.cfg.RetireFile, s.toRetire); err != nil {
		s.log.Error("networks to retire not recorded in DATA_DIR: if the plugin stops before the store takes them, the next start creates them here again", "file", s.cfg.RetireFile, "error", err)
	}
}

// loadRetiring reads the networks to retire (name → incarnation) from
// file; a missing file is none.
func loadRetiring(file string) (map[string]string, error) {
	if file == "" {
		return nil, nil
	}
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("netsync: read the networks to retire: %w", err)
	}
	var m map[string]string
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("netsync: networks to retire in %s: %w (remove the file to drop them)", file, err)
	}
	return m, nil
}

// saveRetiring replaces file with m (removes it when m is empty), through
// a rename, so a crash leaves the old list or the new one.
func saveRetiring(file string, m map[string]string) error {
	if len(m) == 0 {
		if err := os.Remove(file); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

// pass is one full reconciliation of the engine's networks with the specs.
func (s *Syncer) pass(ctx context.Context) error {
	if s.driver == "" {
		d, err := s.cfg.DriverName(ctx)
		if err != nil {
			return fmt.Errorf("learn this plugin's driver name on the engine: %w", err)
		}
		s.driver = d
		s.log.Info("cluster-wide networks: this plugin's driver name on the engine", "driver", d)
	}
	for _, name := range slices.Sorted(maps.Keys(s.toRetire)) {
		s.retire(ctx, name, s.toRetire[name])
	}
	nets, err := s.engine.ListNetworkDetails(ctx)
	if err != nil {
		return err
	}
	local := map[string]dockerapi.NetworkDetail{}
	var extra []dockerapi.NetworkDetail // more networks of a name in local
	taken := map[string]string{}        // name → driver of networks that are not cluster-wide ones
	for _, n := range nets {
		switch {
		case !s.clusterWide(n):
			taken[n.Name] = n.Driver
		case local[n.Name].ID != "":
			keep, drop := s.keeper(local[n.Name], n)
			local[n.Name] = keep
			extra = append(extra, drop)
		default:
			local[n.Name] = n
		}
	}
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(local)) {
		n := local[name]
		s.known[name] = n.ID
		delete(s.missingSince, name)
		gone, err := s.syncLocal(ctx, n)
		if err != nil {
			errs = append(errs, err)
		}
		if gone {
			delete(local, name)
		}
	}
	for _, n := range extra {
		if err := s.syncDuplicate(ctx, n); err != nil {
			errs = append(errs, err)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(s.specs)) {
		sp := s.specs[name]
		if _, ok := local[name]; ok {
			continue
		}
		if sp.Spec.Retired {
			if _, here := taken[name]; here {
				continue
			}
			if ok, err := cluster.DeleteSpecIfUnheld(ctx, s.store, sp); err != nil {
				errs = append(errs, err)
			} else if ok {
				delete(s.specs, name)
				s.log.Info("cluster-wide network retired and held by no host: removed from the store", "network", name, "key", sp.Spec.Key)
			}
			continue
		}
		if s.retiredSeen[sp.Spec.Incarnation] {
			continue
		}
		if d, ok := taken[name]; ok {
			s.once("taken/"+name, "cluster-wide network not created here: this engine has a network of that name with another driver or -o name; remove or rename it",
				fmt.Errorf("network %q: driver %s here", name, d))
			continue
		}
		if _, had := s.known[name]; had {
			first, ok := s.missingSince[name]
			if !ok {
				s.missingSince[name] = time.Now()
				continue
			}
			if time.Since(first) < s.cfg.GoneGrace {
				continue
			}
			delete(s.known, name)
			delete(s.missingSince, name)
		}
		if err := s.create(ctx, sp); err != nil {
			errs = append(errs, err)
		}
	}
	s.forget(nets)
	return errors.Join(errs...)
}

// forget drops what the syncer remembers of networks and specs that are
// gone (nets: the engine's networks at this pass), so its memory does not
// grow with every network the engine ever had: the conflict of a name
// this engine no longer has leaves Status, and the once-only messages of
// gone networks and specs are forgotten.
func (s *Syncer) forget(nets []dockerapi.NetworkDetail) {
	ids := make(map[string]bool, len(nets))
	names := map[string]bool{}
	for _, n := range nets {
		ids[n.ID] = true
		names[n.Name] = true
	}
	incs := map[string]bool{}
	for _, sp := range s.specs {
		incs[sp.Spec.Incarnation] = true
	}
	for _, inc := range s.toRetire {
		incs[inc] = true
	}
	for inc := range s.retiredSeen {
		if !incs[inc] {
			delete(s.retiredSeen, inc)
		}
	}
	for key := range s.reported {
		kind, v, _ := strings.Cut(key, "/")
		switch kind {
		case "conflict", "duplicate", "stopped":
			if !ids[v] {
				delete(s.reported, key)
			}
		case "taken", "published":
			if _, ok := s.specs[v]; !ok {
				delete(s.reported, key)
			}
		case "retire":
			if _, ok := s.toRetire[v]; !ok {
				delete(s.reported, key)
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for name := range s.conflicts {
		if !names[name] {
			delete(s.conflicts, name)
		}
	}
}

// keeper picks which of two networks of one name on this engine the
// syncer treats as the cluster's network, and which as a duplicate. The
// engine's check for a taken name is best effort: a create from a spec
// that runs while a user's create of the name is still in the driver
// gives two networks of one name (seen on engine 20.10). The keeper is the
// one with the live spec's settings, else one this syncer created or
// matched before, else the older one.
func (s *Syncer) keeper(a, b dockerapi.NetworkDetail) (keep, drop dockerapi.NetworkDetail) {
	rank := func(n dockerapi.NetworkDetail) int {
		r := 0
		if sp, ok := s.specs[n.Name]; ok && !sp.Spec.Retired && cluster.SameSettings(sp.Spec, s.specOf(n)) {
			r += 2
		}
		if s.own[n.ID] || s.matched[n.ID] != "" {
			r++
		}
		return r
	}
	ra, rb := rank(a), rank(b)
	switch {
	case ra > rb:
		return a, b
	case rb > ra:
		return b, a
	case b.Created.Before(a.Created), b.Created.Equal(a.Created) && b.ID < a.ID:
		return b, a
	default:
		return a, b
	}
}

// syncDuplicate handles a second network of a name this engine has (see
// keeper): with the spec's settings it is removed when no container uses
// it; with other settings it lost to the spec, as a network created here
// with other settings does; under a retired spec it goes as the keeper
// does. Without a spec (the keeper's publish failed) it waits for the next
// pass.
func (s *Syncer) syncDuplicate(ctx context.Context, n dockerapi.NetworkDetail) error {
	sp, ok := s.specs[n.Name]
	switch {
	case !ok:
		return nil
	case sp.Spec.Retired:
		_, err := s.removeUnused(ctx, n, "retired cluster-wide network removed here: no container uses it")
		return err
	case cluster.SameSettings(sp.Spec, s.specOf(n)):
		gone, err := s.removeUnused(ctx, n, "second network of a cluster-wide network's name on this engine, with the same settings: removed")
		if err == nil && !gone {
			s.once("duplicate/"+n.ID, "this engine has two networks of a cluster-wide network's name; the second is kept while containers use it: remove it by ID once they are gone",
				fmt.Errorf("network %q: ID %s", n.Name, n.ID))
		}
		return err
	default:
		_, err := s.lose(ctx, n, sp, s.specOf(n))
		return err
	}
}

// syncLocal handles one cluster-wide network this engine has. gone says it
// was removed here.
func (s *Syncer) syncLocal(ctx context.Context, n dockerapi.NetworkDetail) (gone bool, err error) {
	mine := s.specOf(n)
	sp, ok := s.specs[n.Name]
	switch {
	case !ok, sp.Spec.Retired && s.createdAgain(n, sp.Spec):
		// New here (or created again after a retirement): publish.
		return s.publish(ctx, n, mine)
	case sp.Spec.Retired:
		return s.removeUnused(ctx, n, "retired cluster-wide network removed here: no container uses it")
	case cluster.SameSettings(sp.Spec, mine):
		s.matched[n.ID] = sp.Spec.Incarnation
		return false, nil
	default:
		return s.lose(ctx, n, sp, mine)
	}
}

// createdAgain tells a network created after its spec was retired (a user
// created the name again) from one kept since before (containers use it).
// A network this syncer saw matching the retired incarnation, or created
// itself, was there before; otherwise (after a restart) the engine's
// creation time decides.
func (s *Syncer) createdAgain(n dockerapi.NetworkDetail, sp cluster.Spec) bool {
	if s.matched[n.ID] == sp.Incarnation || s.own[n.ID] {
		return false
	}
	return n.Created.After(sp.RetiredAt)
}

func (s *Syncer) publish(ctx context.Context, n dockerapi.NetworkDetail, mine cluster.Spec) (bool, error) {
	got, err := cluster.PublishSpec(ctx, s.store, mine)
	if errors.Is(err, cluster.ErrSpecConflict) {
		s.specs[n.Name] = got
		return s.lose(ctx, n, got, mine)
	}
	if err != nil {
		return false, err
	}
	s.specs[n.Name] = got
	s.matched[n.ID] = got.Spec.Incarnation
	if got.Spec.Origin == s.cfg.HostID && got.Spec.Incarnation != s.reported["published/"+n.Name] {
		s.reported["published/"+n.Name] = got.Spec.Incarnation
		s.log.Info("cluster-wide network published: every host creates it", "network", n.Name, "key", got.Spec.Key, "settings", got.Spec.Settings())
	}
	return false, nil
}

// lose handles a network created here with other settings than the
// cluster's spec of its name: the spec won. The network here is removed
// (and created again from the spec by the caller's pass) when no container
// uses it, else kept; either way the conflict is logged at error once and
// recorded in the spec.
func (s *Syncer) lose(ctx context.Context, n dockerapi.NetworkDetail, win cluster.SpecPair, mine cluster.Spec) (bool, error) {
	c := Conflict{Network: n.Name, Cluster: win.Spec.Settings(), Here: mine.Settings(), Origin: win.Spec.OriginNode, Occurred: time.Now().UTC()}
	gone, err := s.removeUnused(ctx, n, "")
	switch {
	case err != nil:
		c.Outcome = "kept the network created here: removing it failed: " + err.Error()
	case gone:
		c.Outcome = "removed the network created here and created the cluster's network instead"
	default:
		c.Outcome = "kept the network created here, as containers use it: remove them and the network, and the cluster's network is created here"
	}
	key := "conflict/" + n.ID
	if s.reported[key] != c.Outcome {
		s.reported[key] = c.Outcome
		s.log.Error("network conflicts with the cluster's network of the same name: the cluster's settings win",
			"network", n.Name, "cluster_settings", c.Cluster, "cluster_origin", c.Origin, "here_settings", c.Here, "outcome", c.Outcome,
			"hint", "create a network once, on one host, and use it everywhere; to change its settings remove it (docker network rm on any host, once no container uses it) and create it again")
		s.mu.Lock()
		s.conflicts[n.Name] = c
		s.mu.Unlock()
		if rerr := cluster.AddSpecConflict(ctx, s.store, n.Name, win.Spec.Incarnation, cluster.SpecConflict{
			HostID: s.cfg.HostID, Node: s.cfg.Node, Settings: c.Here, Outcome: c.Outcome, At: c.Occurred,
		}); rerr != nil {
			s.log.Warn("record the conflict in the store", "network", n.Name, "error", rerr)
		}
	}
	return gone, err
}

// removeUnused removes network n from the engine unless a container uses
// it. gone reports that it was removed (or was gone already).
func (s *Syncer) removeUnused(ctx context.Context, n dockerapi.NetworkDetail, msg string) (bool, error) {
	d, err := s.engine.InspectNetworkDetail(ctx, n.ID)
	if errors.Is(err, dockerapi.ErrNotFound) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	if d.Containers > 0 {
		return false, nil
	}
	// The inspect counts running containers only; the engine lets a
	// network go under stopped ones, which then cannot start again (a
	// `docker compose stop` on this host, then a `network rm` elsewhere).
	if c, err := s.engine.NetworkContainers(ctx, n.ID, n.Name); err != nil || c > 0 {
		if err == nil {
			s.once("stopped/"+n.ID, "cluster-wide network kept on this host: stopped containers are attached to it; remove them, or the network, to let it go",
				fmt.Errorf("network %q: ID %s: %d stopped containers", n.Name, n.ID, c))
		}
		return false, err
	}
	s.removing[n.ID] = true
	if err := s.engine.RemoveNetwork(ctx, n.ID); err != nil {
		delete(s.removing, n.ID)
		if errors.Is(err, dockerapi.ErrConflict) {
			return false, nil // a container joined meanwhile
		}
		return false, err
	}
	if s.known[n.Name] == n.ID {
		delete(s.known, n.Name)
	}
	delete(s.own, n.ID)
	if msg != "" {
		s.log.Info(msg, "network", n.Name, "network_id", n.ID)
	}
	return true, nil
}

// create creates a live spec on this host's engine.
func (s *Syncer) create(ctx context.Context, sp cluster.SpecPair) error {
	req := requestOf(sp.Spec, s.driver)
	start := time.Now()
	id, err := s.engine.CreateNetwork(ctx, req)
	if errors.Is(err, dockerapi.ErrConflict) {
		// The engine has the name now (the next pass sees it), or, as
		// engine 20.10 answers while this plugin is still being enabled,
		// refuses for a while: either way a pass soon, not at the resync.
		return fmt.Errorf("create cluster-wide network %q here: the engine answered with a conflict; retrying: %w", sp.Spec.Name, err)
	}
	if err != nil {
		return fmt.Errorf("create cluster-wide network %q (%s) here: %w", sp.Spec.Name, sp.Spec.Settings(), err)
	}
	s.own[id] = true
	s.known[sp.Spec.Name] = id
	s.matched[id] = sp.Spec.Incarnation
	s.log.Info("cluster-wide network created here", "network", sp.Spec.Name, "network_id", id, "key", sp.Spec.Key,
		"origin", sp.Spec.OriginNode, "took", time.Since(start).Round(time.Millisecond), "since_published", time.Since(sp.Spec.Created).Round(time.Millisecond))
	return nil
}

// specOf describes a network of the engine as a spec.
func (s *Syncer) specOf(n dockerapi.NetworkDetail) cluster.Spec {
	sp := cluster.Spec{
		Name:        n.Name,
		Options:     maps.Clone(n.Options),
		IPAMOptions: maps.Clone(n.IPAM.Options),
		Internal:    n.Internal,
		Attachable:  n.Attachable,
		IPv6:        n.EnableIPv6,
		Labels:      maps.Clone(n.Labels),
		Origin:      s.cfg.HostID,
		OriginNode:  s.cfg.Node,
	}
	if s.ours(n.IPAM.Driver) {
		sp.IPAMSelf = true
	} else {
		sp.IPAMDriver = n.IPAM.Driver
	}
	for _, c := range n.IPAM.Config {
		sp.IPAM = append(sp.IPAM, cluster.IPAMConfig{Subnet: c.Subnet, IPRange: c.IPRange, Gateway: c.Gateway, Aux: maps.Clone(c.AuxiliaryAddresses)})
	}
	return sp
}

// requestOf is the engine request that creates spec sp under driver.
func requestOf(sp cluster.Spec, driver string) dockerapi.NetworkCreate {
	req := dockerapi.NetworkCreate{
		Name: sp.Name, Driver: driver,
		Internal: sp.Internal, Attachable: sp.Attachable, EnableIPv6: sp.IPv6,
		Options: maps.Clone(sp.Options), Labels: maps.Clone(sp.Labels),
		IPAM: dockerapi.NetworkIPAM{Driver: sp.IPAMDriver, Options: maps.Clone(sp.IPAMOptions)},
	}
	if sp.IPAMSelf {
		req.IPAM.Driver = driver
	}
	for _, c := range sp.IPAM {
		req.IPAM.Config = append(req.IPAM.Config, dockerapi.NetworkIPAMConfig{
			Subnet: c.Subnet, IPRange: c.IPRange, Gateway: c.Gateway, AuxiliaryAddresses: maps.Clone(c.Aux),
		})
	}
	return req
}
