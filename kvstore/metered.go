package kvstore

import (
	"context"
	"time"
)

// Observer receives one call per store operation of a Metered store.
// Implementations must be quick and safe for concurrent use.
type Observer interface {
	// ObserveStoreOp reports one operation: op is the method's name in
	// lower case ("get", "list", "put", "create", "cas", "delete",
	// "delete_cas", "txn", "watch"), err its result, d its duration.
	ObserveStoreOp(op string, err error, d time.Duration)
	// ObserveWatchUpdate reports one snapshot delivered by a Watch.
	ObserveWatchUpdate()
}

// metered is a Store that reports each operation to an Observer and
// otherwise delegates.
type metered struct {
	s   Store
	obs Observer
}

var _ Store = (*metered)(nil)

// Metered returns s with every operation reported to obs. The result is
// only a Store: callers that need the concrete store's other methods
// (*Consul's Claim, Client) keep s for them. A nil obs returns s.
func Metered(s Store, obs Observer) Store {
	if obs == nil {
		return s
	}
	return &metered{s: s, obs: obs}
}

func (m *metered) observe(op string, start time.Time, err error) {
	m.obs.ObserveStoreOp(op, err, time.Since(start))
}

func (m *metered) Get(ctx context.Context, key string) (p *Pair, err error) {
	defer func(start time.Time) { m.observe("get", start, err) }(time.Now())
	return m.s.Get(ctx, key)
}

func (m *metered) List(ctx context.Context, prefix string) (ps []*Pair, err error) {
	defer func(start time.Time) { m.observe("list", start, err) }(time.Now())
	return m.s.List(ctx, prefix)
}

func (m *metered) Put(ctx context.Context, key string, value []byte) (err error) {
	defer func(start time.Time) { m.observe("put", start, err) }(time.Now())
	return m.s.Put(ctx, key, value)
}

func (m *metered) Create(ctx context.Context, key string, value []byte) (err error) {
	defer func(start time.Time) { m.observe("create", start, err) }(time.Now())
	return m.s.Create(ctx, key, value)
}

func (m *metered) CAS(ctx context.Context, key string, value []byte, index uint64) (err error) {
	defer func(start time.Time) { m.observe("cas", start, err) }(time.Now())
	return m.s.CAS(ctx, key, value, index)
}

func (m *metered) Delete(ctx context.Context, key string) (err error) {
	defer func(start time.Time) { m.observe("delete", start, err) }(time.Now())
	return m.s.Delete(ctx, key)
}

func (m *metered) DeleteCAS(ctx context.Context, key string, index uint64) (err error) {
	defer func(start time.Time) { m.observe("delete_cas", start, err) }(time.Now())
	return m.s.DeleteCAS(ctx, key, index)
}

func (m *metered) Txn(ctx context.Context, ops []Op) (err error) {
	defer func(start time.Time) { m.observe("txn", start, err) }(time.Now())
	return m.s.Txn(ctx, ops)
}

func (m *metered) TxnIndex(ctx context.Context, ops []Op) (index uint64, err error) {
	defer func(start time.Time) { m.observe("txn", start, err) }(time.Now())
	return TxnIndex(ctx, m.s, ops)
}

// Watch reports the watch's start as a "watch" operation and each
// delivered snapshot as an update: the inner store's watch calls the
// observer after each snapshot it hands over (withDelivered), and its
// channel is the caller's, with no goroutine between them.
func (m *metered) Watch(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	return m.watch(ctx, prefix, m.s.Watch)
}

// WatchLean is Watch through WatchLean of the inner store.
func (m *metered) WatchLean(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	return m.watch(ctx, prefix, func(ctx context.Context, prefix string) (<-chan []*Pair, error) {
		return WatchLean(ctx, m.s, prefix)
	})
}

func (m *metered) watch(ctx context.Context, prefix string, watch func(context.Context, string) (<-chan []*Pair, error)) (<-chan []*Pair, error) {
	start := time.Now()
	ch, err := watch(withDelivered(ctx, m.obs.ObserveWatchUpdate), prefix)
	m.observe("watch", start, err)
	if err != nil {
		return nil, err
	}
	return ch, nil
}

// deliveredKey is the context key of a watch's delivery hook: the
// watches of this package call it after each snapshot they hand over, so
// that Metered counts them without a goroutine between a watch and its
// receiver (issue 16, scale: one wake-up less a change).
type deliveredKey struct{}

// withDelivered returns ctx carrying fn as the hook of the watches
// started with it.
func withDelivered(ctx context.Context, fn func()) context.Context {
	return context.WithValue(ctx, deliveredKey{}, fn)
}

// deliveredHook is the hook ctx carries, or one that does nothing.
func deliveredHook(ctx context.Context) func() {
	if fn, ok := ctx.Value(deliveredKey{}).(func()); ok {
		return fn
	}
	return func() {}
}

func (m *metered) Close() error { return m.s.Close() }
