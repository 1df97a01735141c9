package kvstore

import (
	"context"
	"errors"
)

// Sentinel errors callers branch on with errors.Is.
var (
	// ErrNotFound: the key does not exist.
	ErrNotFound = errors.New("key not found")
	// ErrConflict: a create-only write found the key present, a
	// compare-and-set or delete-if-unchanged found a different modify index,
	// or a transaction's check failed.
	ErrConflict = errors.New("key modified concurrently")
	// ErrUnavailable: the store could not be reached or answered with a
	// server error. Wrapped errors name the address. Never confused with
	// ErrNotFound.
	ErrUnavailable = errors.New("store unavailable")
	// ErrPermissionDenied: the store refused the request for lack of
	// permission (Consul answered 403, or an ACL refused an operation of a
	// transaction). Retrying does not help: the token's policy must change.
	ErrPermissionDenied = errors.New("permission denied")
)

// Pair is one key and its value. Key is relative to the store's prefix.
// ModifyIndex changes on every write that changes the key; it is what CAS
// and DeleteCAS compare against. (Consul applies a write that leaves the
// value, flags and session as they were as a no-op: the ModifyIndex stays.
// A writer that must be seen to write changes something: Claim's touch
// writes the time in the flags.) Session is the Consul session holding the
// key (see Consul.Claim), "" when none does and always in the embedded
// store.
type Pair struct {
	Key         string
	Value       []byte
	ModifyIndex uint64
	Session     string
}

// OpVerb is what a transaction operation does.
type OpVerb int

const (
	// OpSet writes Value unconditionally.
	OpSet OpVerb = iota + 1
	// OpCreate writes Value only if Key does not exist.
	OpCreate
	// OpCAS writes Value only if Key's ModifyIndex equals Index.
	OpCAS
	// OpDelete deletes Key; a missing key is not an error.
	OpDelete
	// OpDeleteCAS deletes Key only if its ModifyIndex equals Index.
	OpDeleteCAS
	// OpCheckIndex fails the transaction unless Key's ModifyIndex equals Index.
	OpCheckIndex
	// OpCheckNotExists fails the transaction if Key exists.
	OpCheckNotExists
	// OpCheckSession fails the transaction unless Key is held by Session
	// (Consul's check-session; the embedded store has no sessions, so
	// it always fails there).
	OpCheckSession
	// OpDeleteTree deletes every key that starts with Key (Consul's
	// delete-tree); none is not an error. Stamped writes use it to drop a
	// record's old stamp (stamp.go).
	OpDeleteTree
)

// Op is one operation of an atomic transaction.
type Op struct {
	Verb  OpVerb
	Key   string
	Value []byte
	Index uint64
	// Session is the session OpCheckSession checks.
	Session string
	// Flags are written with Value by OpSet, OpCreate and OpCAS (Consul;
	// the embedded store keeps none). A write that changes neither value
	// nor flags is a no-op, its ModifyIndex unchanged: Claim's touches
	// write the time here to be seen.
	Flags uint64
}

// MaxTxnOps is the most operations one Txn call accepts (Consul's limit
// since 1.14 is 128; we stay at 64 so older servers work too).
const MaxTxnOps = 64

// Store is the plugin's view of a key-value store. All keys are relative to
// a prefix fixed at construction. Every method that does I/O takes a
// context and returns within its deadline.
type Store interface {
	// Get returns the pair at key, or ErrNotFound.
	Get(ctx context.Context, key string) (*Pair, error)
	// List returns every pair whose key starts with prefix, sorted by key.
	// An empty result is not an error.
	List(ctx context.Context, prefix string) ([]*Pair, error)
	// Put writes value unconditionally.
	Put(ctx context.Context, key string, value []byte) error
	// Create writes value only if key does not exist, else ErrConflict.
	Create(ctx context.Context, key string, value []byte) error
	// CAS writes value only if key's ModifyIndex equals index, else
	// ErrConflict. Index 0 means "only if absent", like Create.
	CAS(ctx context.Context, key string, value []byte, index uint64) error
	// Delete removes key; a missing key is success.
	Delete(ctx context.Context, key string) error
	// DeleteCAS removes key only if its ModifyIndex equals index, else
	// ErrConflict. A missing key is ErrNotFound.
	DeleteCAS(ctx context.Context, key string, index uint64) error
	// Txn applies ops atomically: all or none. A failed condition is
	// ErrConflict. At most MaxTxnOps operations.
	Txn(ctx context.Context, ops []Op) error
	// Watch delivers the full, current list of pairs under prefix: once at
	// start and again after every change. It keeps retrying through store
	// outages and ends (closing the channel) only when ctx is done.
	Watch(ctx context.Context, prefix string) (<-chan []*Pair, error)
	// Close releases the store's resources.
	Close() error
}

// TxnIndex applies ops like s.Txn and returns the modify index the
// transaction's writes got, when s can tell (Consul, Embedded and their
// metered wrappers can); 0 when it cannot or nothing was written. A
// caller that caches an index must treat 0 as unknown.
func TxnIndex(ctx context.Context, s Store, ops []Op) (uint64, error) {
	if t, ok := s.(interface {
		TxnIndex(context.Context, []Op) (uint64, error)
	}); ok {
		return t.TxnIndex(ctx, ops)
	}
	return 0, s.Txn(ctx, ops)
}

// WatchLean is s.Watch(ctx, prefix) for a prefix whose snapshots are large
// and change a key at a time: on Consul (and its metered wrapper) it
// delivers the same snapshots but reads only the keys that changed (see
// Consul.WatchLean); other stores watch as Watch does. A receiver must not
// change the pairs it receives.
func WatchLean(ctx context.Context, s Store, prefix string) (<-chan []*Pair, error) {
	if l, ok := s.(interface {
		WatchLean(context.Context, string) (<-chan []*Pair, error)
	}); ok {
		return l.WatchLean(ctx, prefix)
	}
	return s.Watch(ctx, prefix)
}
