package driver

import (
	"context"
	"sync"
	"time"

	"consul-overlay/cluster"
)

// Work the driver does off Docker's critical path: removing the veth pairs
// of deleted endpoints (a netlink delete takes 10-20 ms) and writing the
// join records (cluster.Joined) that a restarted plugin reads back. Both
// are idempotent and keyed by endpoint ID, so only the latest wish per
// endpoint is kept; a failure is logged and retried with a backoff until
// it sticks. What a crash loses is recovered at the next start: Reconcile
// removes veths no endpoint record backs, and restore removes join
// records of endpoints that are gone and marks endpoints whose interface
// a container holds as joined.

const (
	backgroundRetryMin = 100 * time.Millisecond
	backgroundRetryMax = 2 * time.Second
	// closeFlushTimeout bounds the last flush at Close.
	closeFlushTimeout = 5 * time.Second
)

// background is the driver's queue of such work. Guarded by its mu, which
// is taken alone (never with Driver.mu).
type background struct {
	mu sync.Mutex
	// veths are endpoint IDs whose veth pair is to be removed.
	veths map[string]bool
	// joins are the join records to write, by endpoint ID; nil: remove.
	joins map[string]*cluster.Joined
	wake  chan struct{}
}

func newBackground() *background {
	return &background{veths: map[string]bool{}, joins: map[string]*cluster.Joined{}, wake: make(chan struct{}, 1)}
}

func (b *background) poke() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// deleteVeth queues the removal of endpoint id's veth pair.
func (b *background) deleteVeth(id string) {
	b.mu.Lock()
	b.veths[id] = true
	b.mu.Unlock()
	b.poke()
}

// keepVeth drops a queued removal of endpoint id's veth pair (a Join of
// that endpoint came after all); it reports whether one was queued.
func (b *background) keepVeth(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	queued := b.veths[id]
	delete(b.veths, id)
	return queued
}

// setJoined queues the write (j != nil) or removal (nil) of endpoint id's
// join record, replacing any queued one.
func (b *background) setJoined(id string, j *cluster.Joined) {
	b.mu.Lock()
	b.joins[id] = j
	b.mu.Unlock()
	b.poke()
}

// runBackground works the queue until ctx ends (the driver's goroutine,
// started by Start).
func (d *Driver) runBackground(ctx context.Context) {
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	backoff := backgroundRetryMin
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.bg.wake:
		case <-retry.C:
		}
		if d.flushBackground(ctx) {
			backoff = backgroundRetryMin
			continue
		}
		if ctx.Err() != nil {
			return
		}
		retry.Reset(backoff)
		backoff = min(backoff*2, backgroundRetryMax)
	}
}

// flushBackground does the queued work once; what fails goes back in the
// queue (unless a newer wish replaced it). It reports whether all of it
// succeeded.
func (d *Driver) flushBackground(ctx context.Context) bool {
	b := d.bg
	b.mu.Lock()
	veths, joins := b.veths, b.joins
	b.veths, b.joins = map[string]bool{}, map[string]*cluster.Joined{}
	b.mu.Unlock()
	ok := true
	for id := range veths {
		if err := d.dp.DeleteEndpoint(ctx, id); err != nil {
			ok = false
			d.log.Warn("veth of a deleted endpoint not removed yet; retrying", "endpoint", short(id), "error", err)
			b.mu.Lock()
			b.veths[id] = true
			b.mu.Unlock()
			continue
		}
		d.log.Debug("veth of a deleted endpoint removed", "endpoint", short(id))
	}
	for id, j := range joins {
		var err error
		if j == nil {
			err = d.cl.DeleteJoined(ctx, id)
		} else {
			err = d.cl.PutJoined(ctx, id, *j)
		}
		if err != nil {
			ok = false
			d.log.Warn("join record not written yet; retrying", "endpoint", short(id), "remove", j == nil, "error", err)
			b.mu.Lock()
			if _, newer := b.joins[id]; !newer {
				b.joins[id] = j
			}
			b.mu.Unlock()
		}
	}
	return ok
}

// flushOnClose does what is still queued once more, with a bound, when
// the driver stops.
func (d *Driver) flushOnClose() {
	d.bg.mu.Lock()
	empty := len(d.bg.veths) == 0 && len(d.bg.joins) == 0
	d.bg.mu.Unlock()
	if empty {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), closeFlushTimeout)
	defer cancel()
	if !d.flushBackground(ctx) {
		d.bg.mu.Lock()
		d.log.Warn("work left at stop; the next start recovers it", "veths", len(d.bg.veths), "join_records", len(d.bg.joins))
		d.bg.mu.Unlock()
	}
}
