package kvstore

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// DefaultPrefix is the key prefix when a config leaves Prefix empty.
const DefaultPrefix = "consul-overlay/"

// normalizePrefix turns a configured prefix into the form keys are joined
// to: no leading "/", exactly one trailing "/". Empty means DefaultPrefix.
func normalizePrefix(p string) (string, error) {
	if p == "" {
		return DefaultPrefix, nil
	}
	if !utf8.ValidString(p) {
		return "", fmt.Errorf("invalid key prefix %q: not valid UTF-8", p)
	}
	q := strings.Trim(p, "/")
	if q == "" {
		return "", fmt.Errorf("invalid key prefix %q: empty once slashes are trimmed", p)
	}
	if strings.TrimSpace(q) != q {
		return "", fmt.Errorf("invalid key prefix %q: leading or trailing space", p)
	}
	return q + "/", nil
}

func checkKey(key string) error {
	switch {
	case key == "":
		return errors.New("invalid key: empty")
	case strings.HasPrefix(key, "/"):
		return fmt.Errorf("invalid key %q: starts with /", key)
	case !utf8.ValidString(key):
		return fmt.Errorf("invalid key %q: not valid UTF-8", key)
	}
	return nil
}

// checkListPrefix validates the prefix of List and Watch; empty means all
// keys of the store.
func checkListPrefix(prefix string) error {
	if prefix == "" {
		return nil
	}
	if strings.HasPrefix(prefix, "/") {
		return fmt.Errorf("invalid list prefix %q: starts with /", prefix)
	}
	if !utf8.ValidString(prefix) {
		return fmt.Errorf("invalid list prefix %q: not valid UTF-8", prefix)
	}
	return nil
}

func (v OpVerb) String() string {
	switch v {
	case OpSet:
		return "set"
	case OpCreate:
		return "create"
	case OpCAS:
		return "cas"
	case OpDelete:
		return "delete"
	case OpDeleteCAS:
		return "delete-cas"
	case OpCheckIndex:
		return "check-index"
	case OpCheckNotExists:
		return "check-not-exists"
	case OpCheckSession:
		return "check-session"
	case OpDeleteTree:
		return "delete-tree"
	}
	return fmt.Sprintf("OpVerb(%d)", int(v))
}

func checkOps(ops []Op) error {
	if len(ops) > MaxTxnOps {
		return fmt.Errorf("txn of %d operations: more than %d", len(ops), MaxTxnOps)
	}
	for i, op := range ops {
		if op.Verb < OpSet || op.Verb > OpDeleteTree {
			return fmt.Errorf("txn op %d: unknown verb %v", i, op.Verb)
		}
		if err := checkKey(op.Key); err != nil {
			return fmt.Errorf("txn op %d (%v): %w", i, op.Verb, err)
		}
	}
	return nil
}

// equalPairs compares two sorted snapshots, ModifyIndex included: a
// rewrite of the same value is still a change.
func equalPairs(a, b []*Pair) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Key != b[i].Key || a[i].ModifyIndex != b[i].ModifyIndex || a[i].Session != b[i].Session || !bytes.Equal(a[i].Value, b[i].Value) {
			return false
		}
	}
	return true
}

// clonePairs deep-copies a snapshot so a receiver cannot disturb the
// watcher's copy it compares against.
func clonePairs(ps []*Pair) []*Pair {
	out := make([]*Pair, len(ps))
	for i, p := range ps {
		out[i] = &Pair{Key: p.Key, Value: bytes.Clone(p.Value), ModifyIndex: p.ModifyIndex, Session: p.Session}
	}
	return out
}
