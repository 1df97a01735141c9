package kvstore

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
)

// Stamps: a record's version in a key's name (issue 16, scale).
//
// A lean watch (WatchLean) holds a blocking listing of its prefix's key
// names. A name says that a key exists, not that it changed, so the watch
// used to ask Consul which keys moved with a check transaction of every
// key it held: at 50 hosts, more than half of Consul's work for a change.
// A stamped write names the change instead: in the write's transaction it
// replaces the record's stamp, an empty key whose name carries a fresh
// random nonce,
//
//	<prefix>.v<rest>@/<nonce>   for the record <prefix><rest>
//
// (networks/<key>/config.v/peers/<host>@/<nonce> for a peer record), so
// the listing itself names the records that changed and the watch reads
// those alone. The stamps sit beside the records, under the watched prefix
// but outside every record's own name space: a reader that knows nothing
// of them (an older release) ignores them.
//
// A record without a stamp (written by an older release), or whose stamp
// is older than the record (a host downgraded to one), is still checked
// by the transaction at every change, and a change the listing's names do
// not explain (the index moved, no stamp did) checks every record: see
// Consul.WatchLean.

// stampInfix and stampSep build a stamp's name: <prefix>.v<rest>@/<nonce>.
// "@/" cannot occur in a record's name where it matters (host IDs have no
// slash), so each record's stamps share a prefix no other record's do.
const (
	stampInfix = ".v"
	stampSep   = "@/"
)

// StampBase is the prefix of the stamps of key, a record under the lean
// prefix prefix (key is prefix or starts with it).
func StampBase(prefix, key string) string {
	return prefix + stampInfix + strings.TrimPrefix(key, prefix) + stampSep
}

// ParseStamp says whether key is a stamp under prefix and, if so, which
// record it stamps and its nonce (both empty for a name in the stamps'
// space that is no stamp).
func ParseStamp(prefix, key string) (record, nonce string, ok bool) {
	rest, ok := strings.CutPrefix(key, prefix+stampInfix)
	if !ok {
		return "", "", false
	}
	i := strings.LastIndex(rest, stampSep)
	if i < 0 {
		return "", "", true
	}
	return prefix + rest[:i], rest[i+len(stampSep):], true
}

// newNonce is a stamp's nonce: 64 random bits, so a record's next stamp
// differs from its last.
func newNonce() string {
	return fmt.Sprintf("%016x", rand.Uint64())
}

// StampRule maps a key to the lean prefix whose watch follows it (ok
// false: the key is not stamped).
type StampRule func(key string) (prefix string, ok bool)

// Stamped returns s with every write of a key rule stamps made together
// with its stamp: a write (set, create, cas) replaces the key's stamps
// with a new one, a deletion deletes them (the deletion of the prefix's
// own key every stamp under the prefix), in the same transaction. Reads
// and other keys go to s unchanged. A transaction grows by two operations
// a stamped write and one a stamped deletion; beyond MaxTxnOps it fails.
func Stamped(s Store, rule StampRule) Store { return &stamped{Store: s, rule: rule} }

type stamped struct {
	Store
	rule StampRule
}

func (s *stamped) Put(ctx context.Context, key string, value []byte) error {
	if _, ok := s.rule(key); !ok {
		return s.Store.Put(ctx, key, value)
	}
	return s.Txn(ctx, []Op{{Verb: OpSet, Key: key, Value: value}})
}

func (s *stamped) Create(ctx context.Context, key string, value []byte) error {
	if _, ok := s.rule(key); !ok {
		return s.Store.Create(ctx, key, value)
	}
	return s.Txn(ctx, []Op{{Verb: OpCreate, Key: key, Value: value}})
}

func (s *stamped) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	if _, ok := s.rule(key); !ok {
		return s.Store.CAS(ctx, key, value, index)
	}
	return s.Txn(ctx, []Op{{Verb: OpCAS, Key: key, Value: value, Index: index}})
}

func (s *stamped) Delete(ctx context.Context, key string) error {
	if _, ok := s.rule(key); !ok {
		return s.Store.Delete(ctx, key)
	}
	return s.Txn(ctx, []Op{{Verb: OpDelete, Key: key}})
}

func (s *stamped) DeleteCAS(ctx context.Context, key string, index uint64) error {
	if _, ok := s.rule(key); !ok {
		return s.Store.DeleteCAS(ctx, key, index)
	}
	return deleteCASTxn(ctx, s.Store, s.Txn, key, index)
}

func (s *stamped) Txn(ctx context.Context, ops []Op) error {
	_, err := s.TxnIndex(ctx, ops)
	return err
}

// TxnIndex keeps the store's write index (see the package's TxnIndex).
func (s *stamped) TxnIndex(ctx context.Context, ops []Op) (uint64, error) {
	return TxnIndex(ctx, s.Store, s.withStamps(ops))
}

// withStamps is ops followed by the stamps of the keys they write or
// delete. The stamps go last, so each sees the key's own operation done.
func (s *stamped) withStamps(ops []Op) []Op {
	var extra []Op
	for _, op := range ops {
		prefix, ok := s.rule(op.Key)
		if !ok {
			continue
		}
		base := StampBase(prefix, op.Key)
		switch op.Verb {
		case OpSet, OpCreate, OpCAS:
			extra = append(extra,
				Op{Verb: OpDeleteTree, Key: base},
				Op{Verb: OpSet, Key: base + newNonce(), Value: []byte{}})
		case OpDelete, OpDeleteCAS:
			if op.Key == prefix {
				// The prefix's own key (a network's config) goes last:
				// every stamp under it goes with it, also those an older
				// release left when it deleted a record without them.
				base = prefix + stampInfix
			}
			extra = append(extra, Op{Verb: OpDeleteTree, Key: base})
		}
	}
	if len(extra) == 0 {
		return ops
	}
	return append(append(make([]Op, 0, len(ops)+len(extra)), ops...), extra...)
}

// WatchLean watches as the inner store does (see the package's
// WatchLean).
func (s *stamped) WatchLean(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	return WatchLean(ctx, s.Store, prefix)
}
