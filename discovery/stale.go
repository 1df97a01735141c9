package discovery

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"consul-overlay/internal/dockerapi"
)

// reclaimStale is the engine's half of a Sync pass. A held endpoint
// (known before the pass started) is handed back to the driver only when
// all of these hold:
//
//   - the engine answering is the pinned one (engineTrusted);
//   - complete listings (all=true) of that engine have lacked its container
//     in passes at least StaleGrace apart (a start records the container's
//     endpoints in the listing only once the whole start is over, so a
//     missing endpoint alone proves nothing);
//   - the engine knows the endpoint's network (GET /networks/<id> answers);
//   - no container attached to that network without an endpoint on it (one
//     that is being created, started, restarted) turns out, inspected, to
//     own the endpoint or to be still starting (see mayOwn).
//
// Anything the engine does not answer keeps the endpoint. Caller holds
// syncMu.
func (r *Registrar) reclaimStale(ctx context.Context, start uint64) {
	if !r.engineTrusted(ctx) {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	containers, err := r.cfg.Docker.List(cctx)
	cancel()
	if err != nil {
		// Never conclude anything from an engine that did not answer.
		r.log.Debug("docker unavailable, skipping stale check", "err", err)
		return
	}
	r.queueListedMeta(containers)
	nets := map[string]string{} // network ID -> name; "" when the engine does not know it
	for _, ep := range r.missing(containers, start) {
		if !r.confirmGone(ctx, ep, containers, nets) {
			continue
		}
		if !r.dropIfMissing(ep.ID, start) {
			continue
		}
		r.log.Info("endpoint's container is gone, reclaiming the endpoint", "endpoint", ep.ID, "network", ep.Network)
		if r.cfg.Endpoints != nil {
			r.cfg.Endpoints.ReclaimEndpoint(ctx, ep.ID)
		}
	}
}

// missing updates each entry's missingSince from a complete listing and
// returns the endpoints missing for at least StaleGrace, sorted by ID. It
// also forgets the metadata of containers that are gone.
func (r *Registrar) missing(containers []dockerapi.Summary, start uint64) []Endpoint {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	var due []Endpoint
	for _, e := range r.eps {
		if e.seq > start {
			continue
		}
		if slices.ContainsFunc(containers, func(c dockerapi.Summary) bool { return belongs(c.ID, c.EndpointIDs, e.ep) }) {
			e.missingSince = time.Time{}
			continue
		}
		if e.missingSince.IsZero() {
			e.missingSince = now
			continue
		}
		if now.Sub(e.missingSince) >= r.cfg.StaleGrace {
			due = append(due, e.ep)
		}
	}
	slices.SortFunc(due, func(a, b Endpoint) int { return strings.Compare(a.ID, b.ID) })
	for k := range r.meta {
		if !slices.ContainsFunc(containers, func(c dockerapi.Summary) bool { return idMatches(c.ID, k) }) {
			delete(r.meta, k)
		}
	}
	r.queueMissingMetaLocked()
	return due
}

// confirmGone checks, with the engine, that endpoint ep's container is
// really gone: the engine knows its network, and no container that could
// be starting with it does own it. nets caches network names for the pass.
func (r *Registrar) confirmGone(ctx context.Context, ep Endpoint, containers []dockerapi.Summary, nets map[string]string) bool {
	if ep.NetworkID == "" {
		r.log.Debug("not reclaiming an endpoint without a network ID", "endpoint", ep.ID)
		return false
	}
	name, known := nets[ep.NetworkID]
	if !known {
		cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
		n, err := r.cfg.Docker.InspectNetwork(cctx, ep.NetworkID)
		cancel()
		switch {
		case errors.Is(err, dockerapi.ErrNotFound):
			r.log.Warn("the docker engine does not know the endpoint's network; not reclaiming it (is DOCKER_HOST this host's engine?)",
				"endpoint", ep.ID, "network", ep.Network, "network_id", ep.NetworkID, "socket", r.cfg.Docker.Socket())
			nets[ep.NetworkID] = ""
			return false
		case err != nil:
			r.log.Debug("inspect network failed; not reclaiming", "endpoint", ep.ID, "network_id", ep.NetworkID, "err", err)
			return false // not cached: another endpoint may try again
		}
		name = n.Name
		nets[ep.NetworkID] = name
	}
	if name == "" {
		return false
	}
	for _, c := range containers {
		if !attachedWithout(c, ep.NetworkID, name) {
			continue
		}
		if held, why := r.mayOwn(ctx, c, ep); held {
			r.log.Info("endpoint missing from the container list, but not reclaimed", "endpoint", ep.ID,
				"container", c.ID, "state", c.State, "reason", why)
			return false
		}
	}
	return true
}

// attachedWithout reports whether container c is attached to the network
// (by ID, or by name while the engine lists no ID for it) without an
// endpoint on it, and is not being removed: a container that is being
// created, started or restarted looks like that until its start is over.
func attachedWithout(c dockerapi.Summary, networkID, name string) bool {
	if c.State == "removing" || c.State == "dead" {
		return false
	}
	return slices.ContainsFunc(c.Networks, func(a dockerapi.Attachment) bool {
		return a.EndpointID == "" && (a.NetworkID == networkID || (a.NetworkID == "" && a.Name == name))
	})
}

// mayOwn inspects a container that could be starting with endpoint ep.
// Inspect reads the container's live state, where Docker records the
// endpoint as soon as it is created (before Join), and Docker holds the
// container's lock for its whole start, which inspect takes too: an
// answer without the endpoint and not "restarting" proves that no start
// of this container owns it. No answer keeps the endpoint.
func (r *Registrar) mayOwn(ctx context.Context, c dockerapi.Summary, ep Endpoint) (bool, string) {
	cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	info, err := r.cfg.Docker.Inspect(cctx, c.ID)
	cancel()
	switch {
	case errors.Is(err, dockerapi.ErrNotFound):
		return false, ""
	case err != nil:
		return true, fmt.Sprintf("the container may be starting: inspect did not answer: %v", err)
	case slices.Contains(info.EndpointIDs, ep.ID):
		r.mu.Lock()
		if e := r.eps[ep.ID]; e != nil {
			e.missingSince = time.Time{}
		}
		r.mu.Unlock()
		return true, "the container owns it (its start is not over yet)"
	case info.Status == "restarting":
		return true, "the container is restarting"
	}
	return false, ""
}

// dropIfMissing drops the entry if it is still the one judged (known
// before the pass and still missing) and reports whether it did.
func (r *Registrar) dropIfMissing(id string, start uint64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.eps[id]
	if e == nil || e.seq > start || e.missingSince.IsZero() {
		return false
	}
	r.dropLocked(id)
	return true
}

// engineTrusted reports whether the engine answering is the one this
// host's endpoints belong to: its ID (GET /info) is the pinned one. A
// mismatch is logged at error level once per change. Caller holds syncMu.
func (r *Registrar) engineTrusted(ctx context.Context) bool {
	cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	info, err := r.cfg.Docker.Info(cctx)
	cancel()
	if err != nil {
		r.log.Debug("docker unavailable, skipping stale check", "err", err)
		return false
	}
	pinned, where, err := r.pinEngine(info.ID)
	if err != nil {
		if msg := "error: " + err.Error(); r.engineMismatch != msg {
			r.engineMismatch = msg
			r.log.Error("cannot read the pinned docker engine ID; reclaiming nothing", "file", where, "err", err,
				"fix", "make the file readable, or delete it so the next pass pins the engine answering now")
		}
		return false
	}
	if pinned != info.ID {
		if r.engineMismatch != info.ID {
			r.engineMismatch = info.ID
			r.log.Error("the docker engine answering is not the one this host's endpoints belong to; reclaiming nothing",
				"engine_id", info.ID, "engine_name", info.Name, "pinned_id", pinned, "pinned_in", where, "socket", r.cfg.Docker.Socket(),
				"fix", "point DOCKER_HOST at this host's engine; if this host's engine was really replaced, delete "+where+" so the next pass pins the new ID")
		}
		return false
	}
	if r.engineMismatch != "" {
		r.engineMismatch = ""
		r.log.Info("the docker engine matches the pinned ID again", "engine_id", info.ID, "pinned_in", where)
	}
	return true
}

// pinEngine returns the pinned engine ID and where it is kept, pinning id
// if nothing is pinned yet. Caller holds syncMu.
func (r *Registrar) pinEngine(id string) (pinned, where string, err error) {
	if r.cfg.EngineIDFile == "" {
		if r.enginePinned == "" {
			r.enginePinned = id
			r.log.Info("pinned the docker engine ID in memory (no engine ID file configured)", "engine_id", id)
		}
		return r.enginePinned, "memory", nil
	}
	where = r.cfg.EngineIDFile
	b, err := os.ReadFile(where)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", where, fmt.Errorf("read docker engine ID: %w", err)
	}
	if pinned = strings.TrimSpace(string(b)); pinned != "" {
		return pinned, where, nil
	}
	if err := writeFileAtomic(where, []byte(id+"\n")); err != nil {
		return "", where, fmt.Errorf("pin docker engine ID: %w", err)
	}
	r.log.Info("pinned the docker engine ID", "engine_id", id, "file", where)
	return id, where, nil
}

// writeFileAtomic replaces path with data through a synced temporary file
// in the same directory.
func writeFileAtomic(path string, data []byte) (retErr error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			os.Remove(f.Name())
		}
	}()
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
