package kvstore

import (
	"context"
	"errors"
	"fmt"
)

// ErrFenced: a write made under a fence (Fence) was refused because the
// fence no longer holds (the key it checks was written or removed since).
// It is not ErrConflict: retrying the write does not help, the caller's
// premise is gone.
var ErrFenced = errors.New("fence no longer holds")

type fenceKey struct{}

// WithFence returns ctx carrying fence, for code that writes through a
// store it makes with Fence(store, fence) when FenceOf finds one: the
// reaper fences an eviction on the gone host's record being the one it
// judged.
func WithFence(ctx context.Context, fence Op) context.Context {
	return context.WithValue(ctx, fenceKey{}, fence)
}

// FenceOf returns the fence ctx carries (WithFence).
func FenceOf(ctx context.Context) (Op, bool) {
	f, ok := ctx.Value(fenceKey{}).(Op)
	return f, ok
}

// Fence returns s with every write made conditional on fence (an
// OpCheckIndex or OpCheckNotExists): each write is sent as one
// transaction whose first operation is fence, so it is applied only while
// the fence holds. A write refused because the fence no longer holds fails
// with ErrFenced; one refused for its own condition fails as it does on s
// (ErrConflict, or ErrNotFound for DeleteCAS of a missing key). Reads go
// to s unchanged. A transaction may then hold MaxTxnOps-1 operations.
func Fence(s Store, fence Op) Store { return &fenced{Store: s, fence: fence} }

type fenced struct {
	Store
	fence Op
}

func (f *fenced) Put(ctx context.Context, key string, value []byte) error {
	return f.Txn(ctx, []Op{{Verb: OpSet, Key: key, Value: value}})
}

func (f *fenced) Create(ctx context.Context, key string, value []byte) error {
	return f.Txn(ctx, []Op{{Verb: OpCreate, Key: key, Value: value}})
}

func (f *fenced) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	return f.Txn(ctx, []Op{{Verb: OpCAS, Key: key, Value: value, Index: index}})
}

func (f *fenced) Delete(ctx context.Context, key string) error {
	return f.Txn(ctx, []Op{{Verb: OpDelete, Key: key}})
}

func (f *fenced) DeleteCAS(ctx context.Context, key string, index uint64) error {
	err := f.Txn(ctx, []Op{{Verb: OpDeleteCAS, Key: key, Index: index}})
	if errors.Is(err, ErrConflict) {
		// As the store's DeleteCAS: a missing key is ErrNotFound.
		if _, gerr := f.Store.Get(ctx, key); errors.Is(gerr, ErrNotFound) {
			return fmt.Errorf("delete-cas %q (index %d): %w", key, index, ErrNotFound)
		}
	}
	return err
}

func (f *fenced) Txn(ctx context.Context, ops []Op) error {
	_, err := f.TxnIndex(ctx, ops)
	return err
}

// TxnIndex keeps the store's write index (see the package's TxnIndex).
func (f *fenced) TxnIndex(ctx context.Context, ops []Op) (uint64, error) {
	if len(ops) >= MaxTxnOps {
		return 0, fmt.Errorf("fenced transaction of %d operations: at most %d", len(ops), MaxTxnOps-1)
	}
	at, err := TxnIndex(ctx, f.Store, append([]Op{f.fence}, ops...))
	if err == nil || !errors.Is(err, ErrConflict) {
		return at, err
	}
	if held, herr := f.holds(ctx); herr == nil && !held {
		return 0, fmt.Errorf("%w: %q changed (%v)", ErrFenced, f.fence.Key, err)
	}
	return 0, err
}

// holds reads whether the fence's condition is still true.
func (f *fenced) holds(ctx context.Context) (bool, error) {
	p, err := f.Store.Get(ctx, f.fence.Key)
	switch {
	case errors.Is(err, ErrNotFound):
		return f.fence.Verb == OpCheckNotExists, nil
	case err != nil:
		return false, err
	case f.fence.Verb == OpCheckIndex:
		return p.ModifyIndex == f.fence.Index, nil
	default:
		return false, nil
	}
}
