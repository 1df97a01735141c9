package driver

import "sync"

// keyedLock is a mutex per key (an endpoint ID), made on first use and
// dropped when its last holder unlocks it.
type keyedLock struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	sync.Mutex
	users int
}

// lock locks key and returns its unlock.
func (k *keyedLock) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.users++
	k.mu.Unlock()
	e.Lock()
	return func() {
		e.Unlock()
		k.mu.Lock()
		e.users--
		if e.users == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}

// WhileBound runs fn while Docker network networkID is bound on this host,
// with network create, delete and prune held off, and reports whether it
// was bound. The liveness check re-asserts a membership the store lost
// through it (reaper.Reassert), so that a `docker network rm` that
// finishes between the check's read of the driver's state and its write
// does not leave a membership nobody removes.
func (d *Driver) WhileBound(networkID string, fn func() error) (bool, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	_, bound := d.networks[networkID]
	d.mu.Unlock()
	if !bound {
		return false, nil
	}
	return true, fn()
}

// WhileBoundAll runs fn with those of networkIDs that are bound on this
// host, with network create, delete and prune held off. The liveness check
// counts the pool holds this host's networks need through it
// (reaper.Reassert): a network removed since the check read the driver's
// state is not counted, and one counted releases its hold afterwards.
func (d *Driver) WhileBoundAll(networkIDs []string, fn func(bound []string) error) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	bound := make([]string, 0, len(networkIDs))
	for _, id := range networkIDs {
		if _, ok := d.networks[id]; ok {
			bound = append(bound, id)
		}
	}
	d.mu.Unlock()
	return fn(bound)
}

// WhileJoined runs fn while endpoint id is joined on this host (a running
// container's, not left, not being removed), with its removal held off,
// and reports whether it was joined. The liveness check re-asserts an
// endpoint's address and record through it (reaper.Reassert): a `docker
// rm` whose DeleteEndpoint ran between the check's read and its writes
// would otherwise leave a record and an address nobody removes.
func (d *Driver) WhileJoined(id string, fn func() error) (bool, error) {
	unlock := d.held.lock(id)
	defer unlock()
	d.mu.Lock()
	ep := d.endpoints[id]
	joined := ep != nil && !ep.left && !ep.removed && ep.rec.Sandbox != ""
	d.mu.Unlock()
	if !joined {
		return false, nil
	}
	return true, fn()
}
