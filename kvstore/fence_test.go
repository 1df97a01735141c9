package kvstore

import (
	"errors"
	"testing"
)

// fencedBackend wraps every store of backend in a fence that holds (a key
// no test writes): the wrapped store must keep the whole contract.
func fencedBackend(backend newBackend) newBackend {
	return func(t *testing.T) openFunc {
		open := backend(t)
		return func(t *testing.T, prefix string) Store {
			return Fence(open(t, prefix), Op{Verb: OpCheckNotExists, Key: "zz-fence-never-written"})
		}
	}
}

// testFence: a write under a fence that no longer holds is refused with
// ErrFenced (not ErrConflict, which callers retry) and changes nothing;
// while the fence holds, a write's own failed condition is what the store
// says (ErrConflict, ErrNotFound).
func testFence(t *testing.T, open openFunc) {
	ctx := bg(t)
	raw := open(t, "fence")
	if err := raw.Put(ctx, "host", []byte("h1")); err != nil {
		t.Fatal(err)
	}
	if err := raw.Put(ctx, "addr", []byte("a1")); err != nil {
		t.Fatal(err)
	}
	host, addr := mustGet(t, raw, "host"), mustGet(t, raw, "addr")
	f := Fence(raw, Op{Verb: OpCheckIndex, Key: "host", Index: host.ModifyIndex})
	// The fence holds: the store's own answers.
	if err := f.CAS(ctx, "addr", []byte("x"), addr.ModifyIndex+1000); !errors.Is(err, ErrConflict) || errors.Is(err, ErrFenced) {
		t.Fatalf("CAS with a stale index under a holding fence: %v, want ErrConflict", err)
	}
	if err := f.DeleteCAS(ctx, "missing", 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DeleteCAS of a missing key under a holding fence: %v, want ErrNotFound", err)
	}
	if err := f.CAS(ctx, "addr", []byte("a2"), addr.ModifyIndex); err != nil {
		t.Fatalf("CAS under a holding fence: %v", err)
	}
	addr = mustGet(t, raw, "addr")
	// The host record is written again: the fence no longer holds.
	if err := raw.Put(ctx, "host", []byte("h2")); err != nil {
		t.Fatal(err)
	}
	writes := map[string]error{
		"Put":       f.Put(ctx, "addr", []byte("x")),
		"Create":    f.Create(ctx, "new", []byte("x")),
		"CAS":       f.CAS(ctx, "addr", []byte("x"), addr.ModifyIndex),
		"Delete":    f.Delete(ctx, "addr"),
		"DeleteCAS": f.DeleteCAS(ctx, "addr", addr.ModifyIndex),
		"Txn":       f.Txn(ctx, []Op{{Verb: OpDelete, Key: "addr"}}),
	}
	for name, err := range writes {
		if !errors.Is(err, ErrFenced) || errors.Is(err, ErrConflict) {
			t.Errorf("%s after the fence broke: %v, want ErrFenced", name, err)
		}
	}
	if p := mustGet(t, raw, "addr"); string(p.Value) != "a2" || p.ModifyIndex != addr.ModifyIndex {
		t.Errorf("a fenced write went through: addr = %q at %d", p.Value, p.ModifyIndex)
	}
	if _, err := raw.Get(ctx, "new"); !errors.Is(err, ErrNotFound) {
		t.Errorf("a fenced create went through: %v", err)
	}
	// A removed key breaks an index fence too.
	if err := raw.Delete(ctx, "host"); err != nil {
		t.Fatal(err)
	}
	if err := f.Put(ctx, "addr", []byte("x")); !errors.Is(err, ErrFenced) {
		t.Errorf("Put after the fenced key was removed: %v, want ErrFenced", err)
	}
}
