package discovery

import (
	"context"
	"errors"
	"slices"
	"time"

	"consul-overlay/internal/dockerapi"
)

// The events that can complete an endpoint's metadata: a container
// starting (a Join happens inside every start), a running container being
// connected to a network (a Join without a start), and a container being
// destroyed (its cached metadata can go).
var eventFilters = map[string][]string{
	"type":  {"container", "network"},
	"event": {"start", "connect", "destroy"},
}

// watchDocker follows the engine's events for as long as ctx lasts,
// resubscribing with backoff. Each subscription asks the engine to replay
// from the last event seen, and after subscribing every endpoint still
// without metadata gets inspected, so events missed in between are made up
// for.
func (r *Registrar) watchDocker(ctx context.Context) {
	var since time.Time
	var backoff time.Duration
	unavailable := false
	for ctx.Err() == nil {
		events, errc, err := r.cfg.Docker.Events(ctx, since, eventFilters)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !unavailable {
				r.log.Warn("docker events unavailable, container metadata will wait", "socket", r.cfg.Docker.Socket(), "err", err)
				unavailable = true
			}
			backoff = min(max(2*backoff, retryMin), r.cfg.RetryMax)
			if !sleep(ctx, backoff) {
				return
			}
			continue
		}
		if unavailable {
			r.log.Info("docker events available again", "socket", r.cfg.Docker.Socket())
			unavailable = false
		}
		backoff = 0
		r.mu.Lock()
		r.queueMissingMetaLocked()
		r.mu.Unlock()
		r.subscriptions.Add(1)
		for ev := range events {
			if !ev.Time.IsZero() {
				since = ev.Time
			}
			r.handleEvent(ev)
		}
		err = <-errc
		if ctx.Err() != nil {
			return
		}
		r.log.Debug("docker event stream ended, resubscribing", "err", err)
		if since.IsZero() {
			since = time.Now().Add(-time.Second)
		}
	}
}

func (r *Registrar) handleEvent(ev dockerapi.Event) {
	var cid string
	switch {
	case ev.Type == "container" && ev.Action == "destroy":
		r.mu.Lock()
		if len(ev.ActorID) >= 12 {
			delete(r.meta, ev.ActorID[:12])
		}
		r.mu.Unlock()
		return
	case ev.Type == "container" && ev.Action == "start":
		cid = ev.ActorID
	case ev.Type == "network" && ev.Action == "connect":
		cid = ev.Attributes["container"]
	default:
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	// The event names the container, not its endpoints. An endpoint whose
	// container the driver could not name (Docker's SandboxKey names the
	// sandbox, not the container) may be this one's: inspect to find out.
	for _, e := range r.eps {
		if e.info == nil && (e.ep.ContainerID == "" || idMatches(cid, e.ep.ContainerID)) {
			r.queueInspectLocked(cid)
			return
		}
	}
}

// queueMissingMetaLocked queues an inspection for every endpoint whose
// container is known by ID but not yet by metadata. Caller holds mu.
func (r *Registrar) queueMissingMetaLocked() {
	if r.cfg.Docker == nil {
		return
	}
	for _, e := range r.eps {
		if e.info == nil && e.ep.ContainerID != "" {
			r.queueInspectLocked(e.ep.ContainerID)
		}
	}
}

// queueInspectLocked queues one inspection unless it is already queued or
// the queue is full (anti-entropy queues it again). Caller holds mu.
func (r *Registrar) queueInspectLocked(cid string) {
	if r.inspectOn[cid] {
		return
	}
	select {
	case r.inspectC <- cid:
		r.inspectOn[cid] = true
	default:
	}
}

// inspector fetches queued containers' metadata and completes the
// registrations of their endpoints.
func (r *Registrar) inspector(ctx context.Context) {
	for {
		var cid string
		select {
		case <-ctx.Done():
			return
		case cid = <-r.inspectC:
		}
		cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
		c, err := r.cfg.Docker.Inspect(cctx, cid)
		cancel()
		r.mu.Lock()
		delete(r.inspectOn, cid)
		if err != nil {
			r.mu.Unlock()
			if !errors.Is(err, dockerapi.ErrNotFound) && ctx.Err() == nil {
				r.log.Debug("inspect container failed; anti-entropy will retry", "container", cid, "err", err)
			}
			continue
		}
		n := r.setMetaLocked(&c)
		r.mu.Unlock()
		if n > 0 {
			r.log.Debug("container metadata arrived", "container", c.ID, "name", c.Name, "endpoints", n)
			r.wake()
		}
	}
}

// setMetaLocked caches a container's metadata and hands it to its
// endpoints, marking them dirty. It returns how many changed. Caller holds
// mu.
func (r *Registrar) setMetaLocked(c *dockerapi.Container) int {
	if len(c.ID) < 12 {
		return 0
	}
	r.meta[c.ID[:12]] = c
	n := 0
	for id, e := range r.eps {
		if e.info == nil && belongs(c.ID, c.EndpointIDs, e.ep) {
			e.info = c
			r.dirty[id] = true
			n++
		}
	}
	return n
}

// metaLocked returns the cached metadata of the endpoint's container, or
// nil. Caller holds mu.
func (r *Registrar) metaLocked(ep Endpoint) *dockerapi.Container {
	if p := ep.ContainerID; len(p) >= 12 {
		if c := r.meta[p[:12]]; c != nil && idMatches(c.ID, p) {
			return c
		}
	}
	for _, c := range r.meta {
		if slices.Contains(c.EndpointIDs, ep.ID) {
			return c
		}
	}
	return nil
}

// sleep waits d or until ctx ends; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
