package ipam

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"consul-overlay/kvstore"
)

// memStore is an in-memory kvstore.Store for unit tests: one global modify
// index like Consul's Raft index, all-or-none transactions, and a switch to
// simulate an outage. Integration tests use the real stores.
type memStore struct {
	mu    sync.Mutex
	kv    map[string]kvstore.Pair
	index uint64
	down  bool
	// fail, if set, is called before each operation; a non-nil error is
	// returned instead of doing it.
	fail func(op string, key string) error
	// before, if set, is called with each transaction before it is
	// applied, without the lock held (it may use the store).
	before func(ops []kvstore.Op)
	lists  map[string]int // List calls per prefix
}

var _ kvstore.Store = (*memStore)(nil)

func newMemStore() *memStore {
	return &memStore{kv: map[string]kvstore.Pair{}, lists: map[string]int{}}
}

func (m *memStore) check(ctx context.Context, op, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if m.down {
		return fmt.Errorf("mem store: %w", kvstore.ErrUnavailable)
	}
	if m.fail != nil {
		return m.fail(op, key)
	}
	return nil
}

func (m *memStore) Get(ctx context.Context, key string) (*kvstore.Pair, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(ctx, "get", key); err != nil {
		return nil, err
	}
	p, ok := m.kv[key]
	if !ok {
		return nil, fmt.Errorf("get %q: %w", key, kvstore.ErrNotFound)
	}
	p.Value = bytes.Clone(p.Value)
	return &p, nil
}

func (m *memStore) List(ctx context.Context, prefix string) ([]*kvstore.Pair, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(ctx, "list", prefix); err != nil {
		return nil, err
	}
	m.lists[prefix]++
	var out []*kvstore.Pair
	for k, p := range m.kv {
		if strings.HasPrefix(k, prefix) {
			p.Value = bytes.Clone(p.Value)
			out = append(out, &p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, nil
}

func (m *memStore) Put(ctx context.Context, key string, value []byte) error {
	return m.Txn(ctx, []kvstore.Op{{Verb: kvstore.OpSet, Key: key, Value: value}})
}

func (m *memStore) Create(ctx context.Context, key string, value []byte) error {
	return m.Txn(ctx, []kvstore.Op{{Verb: kvstore.OpCreate, Key: key, Value: value}})
}

func (m *memStore) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	if index == 0 {
		return m.Create(ctx, key, value)
	}
	return m.Txn(ctx, []kvstore.Op{{Verb: kvstore.OpCAS, Key: key, Value: value, Index: index}})
}

func (m *memStore) Delete(ctx context.Context, key string) error {
	return m.Txn(ctx, []kvstore.Op{{Verb: kvstore.OpDelete, Key: key}})
}

func (m *memStore) DeleteCAS(ctx context.Context, key string, index uint64) error {
	m.mu.Lock()
	_, ok := m.kv[key]
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("delete %q: %w", key, kvstore.ErrNotFound)
	}
	return m.Txn(ctx, []kvstore.Op{{Verb: kvstore.OpDeleteCAS, Key: key, Index: index}})
}

func (m *memStore) Txn(ctx context.Context, ops []kvstore.Op) error {
	m.mu.Lock()
	before := m.before
	m.mu.Unlock()
	if before != nil {
		before(ops)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(ops) > kvstore.MaxTxnOps {
		return fmt.Errorf("txn of %d ops exceeds %d", len(ops), kvstore.MaxTxnOps)
	}
	for _, op := range ops {
		if err := m.check(ctx, "txn", op.Key); err != nil {
			return err
		}
	}
	// Check every condition first: all or none.
	for _, op := range ops {
		p, ok := m.kv[op.Key]
		var bad bool
		switch op.Verb {
		case kvstore.OpCreate, kvstore.OpCheckNotExists:
			bad = ok
		case kvstore.OpCAS:
			bad = op.Index == 0 && ok || op.Index != 0 && (!ok || p.ModifyIndex != op.Index)
		case kvstore.OpDeleteCAS, kvstore.OpCheckIndex:
			bad = !ok || p.ModifyIndex != op.Index
		case kvstore.OpSet, kvstore.OpDelete:
		default:
			return fmt.Errorf("txn: unknown verb %d", op.Verb)
		}
		if bad {
			return fmt.Errorf("txn op %d on %q: %w", op.Verb, op.Key, kvstore.ErrConflict)
		}
	}
	m.index++
	for _, op := range ops {
		switch op.Verb {
		case kvstore.OpSet, kvstore.OpCreate, kvstore.OpCAS:
			m.kv[op.Key] = kvstore.Pair{Key: op.Key, Value: bytes.Clone(op.Value), ModifyIndex: m.index}
		case kvstore.OpDelete, kvstore.OpDeleteCAS:
			delete(m.kv, op.Key)
		}
	}
	return nil
}

func (m *memStore) Watch(ctx context.Context, prefix string) (<-chan []*kvstore.Pair, error) {
	return nil, errors.New("mem store: watch not implemented")
}

func (m *memStore) Close() error { return nil }

func (m *memStore) setDown(v bool) {
	m.mu.Lock()
	m.down = v
	m.mu.Unlock()
}

func (m *memStore) listCount(prefix string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lists[prefix]
}
