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
func Fence(s Store, fence Op) Store { return &fenced{Store: s, src: staticFence(fence)} }

// fenceSource gives a fenced store the operation that goes first in each
// of its transactions, and judges a transaction refused with it.
type fenceSource interface {
	// op is the fence to send with the next transaction.
	op(ctx context.Context) (Op, error)
	// refused is called when a transaction sent with fence f failed with
	// ErrConflict (err): it returns err itself when the fence held (the
	// operations' own condition failed), retry when the transaction is
	// to be sent again with a fresh op, or another error to return.
	refused(ctx context.Context, s Store, f Op, err error) (retry bool, _ error)
}

// staticFence is Fence's: one condition, checked again after a refusal.
type staticFence Op

func (f staticFence) op(context.Context) (Op, error) { return Op(f), nil }

func (f staticFence) refused(ctx context.Context, s Store, _ Op, err error) (bool, error) {
	if held, herr := holds(ctx, s, Op(f)); herr == nil && !held {
		return false, fmt.Errorf("%w: %q changed (%v)", ErrFenced, f.Key, err)
	}
	return false, err
}

type fenced struct {
	Store
	src fenceSource
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
	return deleteCASTxn(ctx, f.Store, f.Txn, key, index)
}

// deleteCASTxn is DeleteCAS of key sent as the transaction txn makes of
// it, a wrapper's (fenced, stamped), reading s as the store's DeleteCAS
// answers: a missing key is ErrNotFound, not ErrConflict.
func deleteCASTxn(ctx context.Context, s Store, txn func(context.Context, []Op) error, key string, index uint64) error {
	err := txn(ctx, []Op{{Verb: OpDeleteCAS, Key: key, Index: index}})
	if errors.Is(err, ErrConflict) {
		if _, gerr := s.Get(ctx, key); errors.Is(gerr, ErrNotFound) {
			return fmt.Errorf("delete-cas %q (index %d): %w", key, index, ErrNotFound)
		}
	}
	return err
}

func (f *fenced) Txn(ctx context.Context, ops []Op) error {
	_, err := f.TxnIndex(ctx, ops)
	return err
}

// WatchLean watches as the inner store does (see the package's
// WatchLean): a fence guards writes only.
func (f *fenced) WatchLean(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	return WatchLean(ctx, f.Store, prefix)
}

// fencedTries bounds how often a fenced transaction is sent again with a
// fresh fence (OwnFenced: the claim's state changed under it).
const fencedTries = 8

// TxnIndex keeps the store's write index (see the package's TxnIndex).
func (f *fenced) TxnIndex(ctx context.Context, ops []Op) (uint64, error) {
	if len(ops) >= MaxTxnOps {
		return 0, fmt.Errorf("fenced transaction of %d operations: at most %d", len(ops), MaxTxnOps-1)
	}
	for try := 1; ; try++ {
		fence, err := f.src.op(ctx)
		if err != nil {
			return 0, err
		}
		at, err := TxnIndex(ctx, f.Store, append([]Op{fence}, ops...))
		if err == nil || !errors.Is(err, ErrConflict) {
			return at, err
		}
		retry, err := f.src.refused(ctx, f.Store, fence, err)
		if !retry {
			return 0, err
		}
		if try >= fencedTries {
			return 0, fmt.Errorf("%w: fence on %q: the key kept changing under %d tries", ErrUnavailable, fence.Key, try)
		}
	}
}

// holds reads whether fence's condition is true now.
func holds(ctx context.Context, s Store, fence Op) (bool, error) {
	p, err := s.Get(ctx, fence.Key)
	switch {
	case errors.Is(err, ErrNotFound):
		return fence.Verb == OpCheckNotExists, nil
	case err != nil:
		return false, err
	case fence.Verb == OpCheckIndex:
		return p.ModifyIndex == fence.Index, nil
	case fence.Verb == OpCheckSession:
		return p.Session == fence.Session, nil
	default:
		return false, nil
	}
}
