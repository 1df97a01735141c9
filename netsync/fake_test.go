package netsync

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/internal/dockerapi"
)

// fakeEngine is an engine's network API in memory. Its driver is the real
// cluster state: a network created on it joins its logical network in the
// store (as the plugin's driver would in CreateNetwork) and leaves it when
// removed.
type fakeEngine struct {
	driver string
	cl     *cluster.Cluster

	mu      sync.Mutex
	down    bool
	nets    map[string]*dockerapi.NetworkDetail // by ID
	log     []dockerapi.Event
	subs    map[int]*fakeSub
	nextSub int
	creates map[string]int // name → successful creates through the API
	// noNameCheck lets a create through with a name the engine has: the
	// engine's name check is best effort, and two creates of one name
	// that overlap both succeed.
	noNameCheck bool
	// stopped counts the stopped containers attached to each network, by
	// ID: the inspect's Containers does not count them.
	stopped map[string]int
}

type fakeSub struct {
	ch   chan dockerapi.Event
	errc chan error
}

func newFakeEngine(driver string, cl *cluster.Cluster) *fakeEngine {
	return &fakeEngine{driver: driver, cl: cl, nets: map[string]*dockerapi.NetworkDetail{}, subs: map[int]*fakeSub{}, creates: map[string]int{}, stopped: map[string]int{}}
}

var errEngineDown = fmt.Errorf("dial unix /fake.sock: connection refused")

func randomID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// setDown makes the engine unreachable (ending every event stream) or
// reachable again.
func (e *fakeEngine) setDown(down bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.down = down
	if down {
		for id, s := range e.subs {
			s.errc <- dockerapi.ErrStreamClosed
			close(s.errc)
			delete(e.subs, id)
		}
	}
}

func (e *fakeEngine) emit(action string, n *dockerapi.NetworkDetail) {
	ev := dockerapi.Event{Type: "network", Action: action, ActorID: n.ID, Attributes: map[string]string{"name": n.Name, "type": n.Driver}, Time: time.Now()}
	e.log = append(e.log, ev)
	for _, s := range e.subs {
		select {
		case s.ch <- ev:
		default:
		}
	}
}

func (e *fakeEngine) byName(name string) *dockerapi.NetworkDetail {
	for _, n := range e.nets {
		if n.Name == name {
			return n
		}
	}
	return nil
}

func (e *fakeEngine) ListNetworkDetails(ctx context.Context) ([]dockerapi.NetworkDetail, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.down {
		return nil, errEngineDown
	}
	var out []dockerapi.NetworkDetail
	for _, n := range e.nets {
		d := *n
		d.Containers = -1
		out = append(out, d)
	}
	// Newest first, in a stable order: with two networks of one name, a
	// syncer that kept only the last one listed never saw the user's.
	slices.SortFunc(out, func(a, b dockerapi.NetworkDetail) int { return b.Created.Compare(a.Created) })
	return out, nil
}

func (e *fakeEngine) InspectNetworkDetail(ctx context.Context, id string) (dockerapi.NetworkDetail, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.down {
		return dockerapi.NetworkDetail{}, errEngineDown
	}
	n, ok := e.nets[id]
	if !ok {
		if n = e.byName(id); n == nil {
			return dockerapi.NetworkDetail{}, dockerapi.ErrNotFound
		}
	}
	return *n, nil
}

// create is the engine's create: the driver (the real cluster) first.
func (e *fakeEngine) create(ctx context.Context, req dockerapi.NetworkCreate) (string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.down {
		return "", errEngineDown
	}
	if e.byName(req.Name) != nil && !e.noNameCheck {
		return "", fmt.Errorf("network %s: %w", req.Name, dockerapi.ErrConflict)
	}
	id := randomID()
	if req.Options["name"] == "" && req.Driver == e.driver {
		var ipam []cluster.IPAMConfig
		var subnets []netip.Prefix
		for _, c := range req.IPAM.Config {
			ipam = append(ipam, cluster.IPAMConfig{Subnet: c.Subnet})
			subnets = append(subnets, netip.MustParsePrefix(c.Subnet))
		}
		key, err := cluster.SpecKey(ipam)
		if err != nil {
			return "", err
		}
		if _, err := e.cl.Join(ctx, key, id, cluster.NetworkSpec{Subnets: subnets}); err != nil {
			return "", fmt.Errorf("driver: %w", err)
		}
	}
	n := &dockerapi.NetworkDetail{
		ID: id, Name: req.Name, Created: time.Now(), Driver: req.Driver,
		Internal: req.Internal, Attachable: req.Attachable, EnableIPv6: req.EnableIPv6,
		IPAM:    dockerapi.NetworkIPAM{Driver: req.IPAM.Driver, Options: maps.Clone(req.IPAM.Options), Config: append([]dockerapi.NetworkIPAMConfig(nil), req.IPAM.Config...)},
		Options: maps.Clone(req.Options), Labels: maps.Clone(req.Labels),
	}
	if n.Options == nil {
		n.Options = map[string]string{}
	}
	e.nets[id] = n
	e.emit("create", n)
	return id, nil
}

func (e *fakeEngine) CreateNetwork(ctx context.Context, req dockerapi.NetworkCreate) (string, error) {
	id, err := e.create(ctx, req)
	if err == nil {
		e.mu.Lock()
		e.creates[req.Name]++
		e.mu.Unlock()
	}
	return id, err
}

func (e *fakeEngine) RemoveNetwork(ctx context.Context, id string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.down {
		return errEngineDown
	}
	n, ok := e.nets[id]
	if !ok {
		if n = e.byName(id); n == nil {
			return nil
		}
	}
	if n.Containers > 0 {
		return fmt.Errorf("network %s has active endpoints: %w", n.Name, dockerapi.ErrConflict)
	}
	if n.Options["name"] == "" && n.Driver == e.driver {
		var ipam []cluster.IPAMConfig
		for _, c := range n.IPAM.Config {
			ipam = append(ipam, cluster.IPAMConfig{Subnet: c.Subnet})
		}
		key, _ := cluster.SpecKey(ipam)
		if err := e.cl.Leave(ctx, key, n.ID); err != nil {
			return fmt.Errorf("driver: %w", err)
		}
	}
	delete(e.nets, n.ID)
	e.emit("destroy", n)
	return nil
}

func (e *fakeEngine) Events(ctx context.Context, since time.Time, filters map[string][]string) (<-chan dockerapi.Event, <-chan error, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.down {
		return nil, nil, errEngineDown
	}
	s := &fakeSub{ch: make(chan dockerapi.Event, 1024), errc: make(chan error, 1)}
	if !since.IsZero() {
		for _, ev := range e.log {
			if !ev.Time.Before(since) {
				s.ch <- ev
			}
		}
	}
	id := e.nextSub
	e.nextSub++
	e.subs[id] = s
	context.AfterFunc(ctx, func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		if _, ok := e.subs[id]; ok {
			s.errc <- ctx.Err()
			close(s.errc)
			delete(e.subs, id)
		}
	})
	return s.ch, s.errc, nil
}

func (e *fakeEngine) NetworkContainers(ctx context.Context, id, _ string) (int, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.down {
		return 0, errEngineDown
	}
	n, ok := e.nets[id]
	if !ok {
		return 0, nil
	}
	return n.Containers + e.stopped[id], nil
}

// stop stands for containers attached to network name stopping (delta >
// 0: they leave the inspect's count and stay attached) or being removed
// once stopped (delta < 0).
func (e *fakeEngine) stop(name string, delta int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := e.byName(name)
	if delta > 0 {
		n.Containers -= delta
	}
	e.stopped[n.ID] += delta
}

// connect and disconnect stand for containers joining and leaving.
func (e *fakeEngine) connect(name string, delta int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := e.byName(name)
	n.Containers += delta
	e.emit(map[bool]string{true: "connect", false: "disconnect"}[delta > 0], n)
}

// count is how many networks of name the engine has.
func (e *fakeEngine) count(name string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	c := 0
	for _, n := range e.nets {
		if n.Name == name {
			c++
		}
	}
	return c
}

func (e *fakeEngine) get(name string) (dockerapi.NetworkDetail, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := e.byName(name)
	if n == nil {
		return dockerapi.NetworkDetail{}, false
	}
	return *n, true
}
