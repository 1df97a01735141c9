package kvstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// openFunc opens a new, independent client of one backing store (one Consul
// agent, one bbolt file) with the given key prefix. The store is closed when
// the test ends.
type openFunc func(t *testing.T, prefix string) Store

// newBackend returns an openFunc on a backing store private to test t.
type newBackend func(t *testing.T) openFunc

// runContract is the behaviour every Store must have; skip names tests a
// wrapper cannot pass by design (a fenced store holds one operation fewer
// per transaction).
func runContract(t *testing.T, backend newBackend, skip ...string) {
	tests := []struct {
		name string
		fn   func(t *testing.T, open openFunc)
	}{
		{"GetPut", testGetPut},
		{"List", testList},
		{"Create", testCreate},
		{"CAS", testCAS},
		{"Delete", testDelete},
		{"DeleteCAS", testDeleteCAS},
		{"TxnApplies", testTxnApplies},
		{"TxnConflictRollsBack", testTxnConflict},
		{"TxnIndex", testTxnIndex},
		{"DeleteTree", testDeleteTree},
		{"Stamped", testStamped},
		{"TxnInvalid", testTxnInvalid},
		{"InvalidKeys", testInvalidKeys},
		{"PrefixIsolation", testPrefixIsolation},
		{"Watch", testWatch},
		{"WatchEndsOnClose", testWatchEndsOnClose},
	}
	for _, tt := range tests {
		if slices.Contains(skip, tt.name) {
			continue
		}
		t.Run(tt.name, func(t *testing.T) { tt.fn(t, backend(t)) })
	}
}

func bg(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func mustGet(t *testing.T, s Store, key string) *Pair {
	t.Helper()
	p, err := s.Get(bg(t), key)
	if err != nil {
		t.Fatalf("Get(%q): %v", key, err)
	}
	return p
}

func mustPut(t *testing.T, s Store, key, value string) *Pair {
	t.Helper()
	if err := s.Put(bg(t), key, []byte(value)); err != nil {
		t.Fatalf("Put(%q): %v", key, err)
	}
	return mustGet(t, s, key)
}

func mustList(t *testing.T, s Store, prefix string) []*Pair {
	t.Helper()
	ps, err := s.List(bg(t), prefix)
	if err != nil {
		t.Fatalf("List(%q): %v", prefix, err)
	}
	return ps
}

func wantMissing(t *testing.T, s Store, key string) {
	t.Helper()
	if p, err := s.Get(bg(t), key); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get(%q) = %+v, %v; want ErrNotFound", key, p, err)
	}
}

// render shows a snapshot as "k=v k=v" for comparisons and messages.
func render(ps []*Pair) string {
	parts := make([]string, len(ps))
	for i, p := range ps {
		parts[i] = p.Key + "=" + string(p.Value)
	}
	return strings.Join(parts, " ")
}

func testGetPut(t *testing.T, open openFunc) {
	s := open(t, "getput")
	ctx := bg(t)
	wantMissing(t, s, "a")

	p1 := mustPut(t, s, "a", "one")
	if p1.Key != "a" || string(p1.Value) != "one" || p1.ModifyIndex == 0 {
		t.Fatalf("after Put: %+v, want a=one with an index", p1)
	}
	p2 := mustPut(t, s, "a", "two")
	if string(p2.Value) != "two" || p2.ModifyIndex <= p1.ModifyIndex {
		t.Fatalf("after second Put: %+v; want two with index > %d", p2, p1.ModifyIndex)
	}

	bin := []byte{0, 1, 0xfe, 0xff, '\n'}
	if err := s.Put(ctx, "bin", bin); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, s, "bin").Value; !bytes.Equal(got, bin) {
		t.Fatalf("binary value = %v, want %v", got, bin)
	}
	if err := s.Put(ctx, "empty", nil); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, s, "empty"); len(got.Value) != 0 || got.ModifyIndex == 0 {
		t.Fatalf("empty value read back as %+v", got)
	}
	if err := s.Put(ctx, "deep/nested/key with space", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, s, "deep/nested/key with space"); string(got.Value) != "x" {
		t.Fatalf("nested key = %+v", got)
	}
}

func testList(t *testing.T, open openFunc) {
	s := open(t, "list")
	if ps := mustList(t, s, ""); len(ps) != 0 {
		t.Fatalf("List of an empty store = %s, want nothing", render(ps))
	}
	for _, k := range []string{"net/b", "net/a", "netx", "ep/1", "net/a/sub"} {
		mustPut(t, s, k, "v-"+k)
	}
	tests := []struct{ prefix, want string }{
		{"", "ep/1=v-ep/1 net/a=v-net/a net/a/sub=v-net/a/sub net/b=v-net/b netx=v-netx"},
		{"net/", "net/a=v-net/a net/a/sub=v-net/a/sub net/b=v-net/b"},
		{"net", "net/a=v-net/a net/a/sub=v-net/a/sub net/b=v-net/b netx=v-netx"},
		{"net/a", "net/a=v-net/a net/a/sub=v-net/a/sub"},
		{"nothing/", ""},
	}
	for _, tt := range tests {
		if got := render(mustList(t, s, tt.prefix)); got != tt.want {
			t.Errorf("List(%q) = %q, want %q", tt.prefix, got, tt.want)
		}
	}
	for _, p := range mustList(t, s, "") {
		if p.ModifyIndex == 0 {
			t.Errorf("List pair %q has no ModifyIndex", p.Key)
		}
	}
}

func testCreate(t *testing.T, open openFunc) {
	s := open(t, "create")
	ctx := bg(t)
	if err := s.Create(ctx, "k", []byte("first")); err != nil {
		t.Fatalf("Create on absent key: %v", err)
	}
	err := s.Create(ctx, "k", []byte("second"))
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("Create on existing key = %v, want ErrConflict", err)
	}
	if got := mustGet(t, s, "k"); string(got.Value) != "first" {
		t.Fatalf("a failed Create changed the value to %q", got.Value)
	}
}

func testCAS(t *testing.T, open openFunc) {
	s := open(t, "cas")
	ctx := bg(t)
	p := mustPut(t, s, "k", "v1")

	if err := s.CAS(ctx, "k", []byte("stale"), p.ModifyIndex+1000); !errors.Is(err, ErrConflict) {
		t.Fatalf("CAS with a wrong index = %v, want ErrConflict", err)
	}
	if err := s.CAS(ctx, "k", []byte("zero"), 0); !errors.Is(err, ErrConflict) {
		t.Fatalf("CAS index 0 on an existing key = %v, want ErrConflict", err)
	}
	if got := mustGet(t, s, "k"); string(got.Value) != "v1" || got.ModifyIndex != p.ModifyIndex {
		t.Fatalf("failed CAS changed the key: %+v", got)
	}
	if err := s.CAS(ctx, "k", []byte("v2"), p.ModifyIndex); err != nil {
		t.Fatalf("CAS with the current index: %v", err)
	}
	p2 := mustGet(t, s, "k")
	if string(p2.Value) != "v2" || p2.ModifyIndex <= p.ModifyIndex {
		t.Fatalf("after CAS: %+v", p2)
	}
	// The old index is now stale.
	if err := s.CAS(ctx, "k", []byte("v3"), p.ModifyIndex); !errors.Is(err, ErrConflict) {
		t.Fatalf("CAS with the replaced index = %v, want ErrConflict", err)
	}
	// Absent keys: index 0 creates, any other index conflicts.
	if err := s.CAS(ctx, "new", []byte("n"), p2.ModifyIndex); !errors.Is(err, ErrConflict) {
		t.Fatalf("CAS with an index on an absent key = %v, want ErrConflict", err)
	}
	wantMissing(t, s, "new")
	if err := s.CAS(ctx, "new", []byte("n"), 0); err != nil {
		t.Fatalf("CAS index 0 on an absent key: %v", err)
	}
	if got := mustGet(t, s, "new"); string(got.Value) != "n" {
		t.Fatalf("CAS-created key = %+v", got)
	}
}

func testDelete(t *testing.T, open openFunc) {
	s := open(t, "delete")
	ctx := bg(t)
	mustPut(t, s, "k", "v")
	mustPut(t, s, "k2", "v")
	if err := s.Delete(ctx, "k"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	wantMissing(t, s, "k")
	if err := s.Delete(ctx, "k"); err != nil {
		t.Fatalf("Delete of a missing key = %v, want success", err)
	}
	if got := render(mustList(t, s, "")); got != "k2=v" {
		t.Fatalf("Delete removed more than its key: %q left", got)
	}
}

func testDeleteCAS(t *testing.T, open openFunc) {
	s := open(t, "deletecas")
	ctx := bg(t)
	p := mustPut(t, s, "k", "v")
	if err := s.DeleteCAS(ctx, "k", p.ModifyIndex+1000); !errors.Is(err, ErrConflict) {
		t.Fatalf("DeleteCAS with a wrong index = %v, want ErrConflict", err)
	}
	if err := s.DeleteCAS(ctx, "k", 0); !errors.Is(err, ErrConflict) {
		t.Fatalf("DeleteCAS index 0 on an existing key = %v, want ErrConflict", err)
	}
	mustGet(t, s, "k")
	if err := s.DeleteCAS(ctx, "k", p.ModifyIndex); err != nil {
		t.Fatalf("DeleteCAS with the current index: %v", err)
	}
	wantMissing(t, s, "k")
	err := s.DeleteCAS(ctx, "k", p.ModifyIndex)
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrConflict) {
		t.Fatalf("DeleteCAS of a missing key = %v, want ErrNotFound only", err)
	}
}

func testTxnApplies(t *testing.T, open openFunc) {
	s := open(t, "txn")
	ctx := bg(t)
	a := mustPut(t, s, "a", "a0")
	mustPut(t, s, "b", "b0")
	c := mustPut(t, s, "c", "c0")
	d := mustPut(t, s, "d", "d0")

	err := s.Txn(ctx, []Op{
		{Verb: OpSet, Key: "new1", Value: []byte("n1")},
		{Verb: OpCreate, Key: "new2", Value: []byte("n2")},
		{Verb: OpCAS, Key: "a", Value: []byte("a1"), Index: a.ModifyIndex},
		{Verb: OpCAS, Key: "new3", Value: []byte("n3"), Index: 0},
		{Verb: OpDelete, Key: "b"},
		{Verb: OpDelete, Key: "never-existed"},
		{Verb: OpDeleteCAS, Key: "c", Index: c.ModifyIndex},
		{Verb: OpCheckIndex, Key: "d", Index: d.ModifyIndex},
		{Verb: OpCheckNotExists, Key: "zz"},
	})
	if err != nil {
		t.Fatalf("Txn: %v", err)
	}
	if got, want := render(mustList(t, s, "")), "a=a1 d=d0 new1=n1 new2=n2 new3=n3"; got != want {
		t.Fatalf("after Txn: %q, want %q", got, want)
	}
	// One transaction, one index for every write (Consul: one Raft entry).
	idx := mustGet(t, s, "new1").ModifyIndex
	for _, k := range []string{"new2", "new3", "a"} {
		if got := mustGet(t, s, k).ModifyIndex; got != idx {
			t.Errorf("%s has index %d, new1 has %d; want one index per transaction", k, got, idx)
		}
	}
	if got := mustGet(t, s, "d").ModifyIndex; got != d.ModifyIndex {
		t.Errorf("check-index changed d's index from %d to %d", d.ModifyIndex, got)
	}

	// Later operations see earlier ones.
	if err := s.Txn(ctx, []Op{
		{Verb: OpSet, Key: "seq", Value: []byte("x")},
		{Verb: OpDelete, Key: "seq"},
		{Verb: OpCheckNotExists, Key: "seq"},
	}); err != nil {
		t.Fatalf("Txn set-delete-check: %v", err)
	}
	wantMissing(t, s, "seq")
	if err := s.Txn(ctx, nil); err != nil {
		t.Fatalf("empty Txn = %v, want success", err)
	}
}

func testTxnConflict(t *testing.T, open openFunc) {
	s := open(t, "txnconflict")
	ctx := bg(t)
	a := mustPut(t, s, "a", "a0")
	mustPut(t, s, "d", "d0")
	e := mustPut(t, s, "e", "e0")
	stale := e.ModifyIndex + 1000

	tests := []struct {
		name string
		op   Op
	}{
		{"create existing", Op{Verb: OpCreate, Key: "a", Value: []byte("x")}},
		{"cas stale index", Op{Verb: OpCAS, Key: "a", Value: []byte("x"), Index: stale}},
		{"cas index 0 on existing", Op{Verb: OpCAS, Key: "a", Value: []byte("x")}},
		{"cas on missing", Op{Verb: OpCAS, Key: "missing", Value: []byte("x"), Index: a.ModifyIndex}},
		{"delete-cas stale index", Op{Verb: OpDeleteCAS, Key: "a", Index: stale}},
		{"delete-cas missing", Op{Verb: OpDeleteCAS, Key: "missing", Index: a.ModifyIndex}},
		{"check-index stale", Op{Verb: OpCheckIndex, Key: "a", Index: stale}},
		{"check-index missing", Op{Verb: OpCheckIndex, Key: "missing", Index: a.ModifyIndex}},
		{"check-not-exists existing", Op{Verb: OpCheckNotExists, Key: "a"}},
	}
	before := render(mustList(t, s, ""))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The failing operation, on a, comes last: everything before
			// it, on other keys, would have been written had the
			// transaction not rolled back.
			ops := []Op{
				{Verb: OpSet, Key: "b", Value: []byte("b1")},
				{Verb: OpCAS, Key: "e", Value: []byte("e1"), Index: e.ModifyIndex},
				{Verb: OpDelete, Key: "d"},
				{Verb: OpCreate, Key: "c", Value: []byte("c1")},
				tt.op,
			}
			err := s.Txn(ctx, ops)
			if !errors.Is(err, ErrConflict) {
				t.Fatalf("Txn = %v, want ErrConflict", err)
			}
			if errors.Is(err, ErrUnavailable) || errors.Is(err, ErrNotFound) {
				t.Fatalf("conflict also reported as %v", err)
			}
			if after := render(mustList(t, s, "")); after != before {
				t.Fatalf("rolled-back Txn changed the store: %q, was %q", after, before)
			}
			if got := mustGet(t, s, "a").ModifyIndex; got != a.ModifyIndex {
				t.Fatalf("rolled-back Txn moved a's index from %d to %d", a.ModifyIndex, got)
			}
		})
	}
}

func testTxnInvalid(t *testing.T, open openFunc) {
	s := open(t, "txninvalid")
	ctx := bg(t)
	tooMany := make([]Op, MaxTxnOps+1)
	for i := range tooMany {
		tooMany[i] = Op{Verb: OpSet, Key: fmt.Sprintf("k%03d", i), Value: []byte("v")}
	}
	tests := []struct {
		name string
		ops  []Op
	}{
		{"too many", tooMany},
		{"unknown verb", []Op{{Verb: OpVerb(99), Key: "k"}}},
		{"zero verb", []Op{{Key: "k"}}},
		{"empty key", []Op{{Verb: OpSet, Key: "k", Value: []byte("v")}, {Verb: OpSet, Key: ""}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.Txn(ctx, tt.ops)
			if err == nil || errors.Is(err, ErrConflict) || errors.Is(err, ErrUnavailable) || errors.Is(err, ErrNotFound) {
				t.Fatalf("Txn = %v, want a validation error", err)
			}
			if ps := mustList(t, s, ""); len(ps) != 0 {
				t.Fatalf("invalid Txn wrote %s", render(ps))
			}
		})
	}
	// Exactly MaxTxnOps is fine, including the expanding OpDeleteCAS.
	maxOps := make([]Op, MaxTxnOps)
	for i := range maxOps {
		maxOps[i] = Op{Verb: OpSet, Key: fmt.Sprintf("k%03d", i), Value: []byte("v")}
	}
	if err := s.Txn(ctx, maxOps); err != nil {
		t.Fatalf("Txn of MaxTxnOps sets: %v", err)
	}
	ps := mustList(t, s, "")
	for i := range maxOps {
		maxOps[i] = Op{Verb: OpDeleteCAS, Key: ps[i].Key, Index: ps[i].ModifyIndex}
	}
	if err := s.Txn(ctx, maxOps); err != nil {
		t.Fatalf("Txn of MaxTxnOps delete-cas: %v", err)
	}
	if ps := mustList(t, s, ""); len(ps) != 0 {
		t.Fatalf("after deleting everything: %s", render(ps))
	}
}

func testInvalidKeys(t *testing.T, open openFunc) {
	s := open(t, "invalid")
	ctx := bg(t)
	for _, key := range []string{"", "/abs", "bad\xff"} {
		calls := map[string]error{
			"Get":       func() error { _, err := s.Get(ctx, key); return err }(),
			"Put":       s.Put(ctx, key, []byte("v")),
			"Create":    s.Create(ctx, key, []byte("v")),
			"CAS":       s.CAS(ctx, key, []byte("v"), 1),
			"Delete":    s.Delete(ctx, key),
			"DeleteCAS": s.DeleteCAS(ctx, key, 1),
		}
		for name, err := range calls {
			if err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, ErrConflict) || errors.Is(err, ErrUnavailable) {
				t.Errorf("%s(%q) = %v, want a validation error", name, key, err)
			}
		}
	}
	if _, err := s.List(ctx, "/abs"); err == nil {
		t.Errorf("List(\"/abs\") succeeded, want a validation error")
	}
	if ps := mustList(t, s, ""); len(ps) != 0 {
		t.Fatalf("invalid calls wrote %s", render(ps))
	}
}

func testPrefixIsolation(t *testing.T, open openFunc) {
	a := open(t, "iso")
	b := open(t, "iso2") // a string prefix of the other's would leak without the trailing "/"
	nested := open(t, "iso/inner")
	ctx := bg(t)

	mustPut(t, a, "k", "from-a")
	mustPut(t, a, "only-a", "x")
	wantMissing(t, b, "k")
	if ps := mustList(t, b, ""); len(ps) != 0 {
		t.Fatalf("store with prefix iso2 sees %s", render(ps))
	}
	mustPut(t, b, "k", "from-b")
	if got := mustGet(t, a, "k"); string(got.Value) != "from-a" {
		t.Fatalf("a's k = %q after b wrote its own k", got.Value)
	}
	if err := b.Delete(ctx, "only-a"); err != nil {
		t.Fatal(err)
	}
	mustGet(t, a, "only-a")
	if err := b.Txn(ctx, []Op{{Verb: OpCheckNotExists, Key: "only-a"}}); err != nil {
		t.Fatalf("b's Txn sees a's key: %v", err)
	}
	// A nested prefix is a sub-tree of the outer one, with relative keys.
	mustPut(t, nested, "n", "v")
	if got := mustGet(t, a, "inner/n"); string(got.Value) != "v" {
		t.Fatalf("outer store reads nested key as %+v", got)
	}
	if got := render(mustList(t, nested, "")); got != "n=v" {
		t.Fatalf("nested store lists %q, want only its own key", got)
	}
}

// watchGoroutines counts goroutines started by a method of this package's
// stores (their "created by" frame), i.e. live watch loops.
func watchGoroutines() int {
	return strings.Count(allStacks(), "created by consul-overlay/kvstore.(*")
}

// allStacks is the stack of every goroutine.
func allStacks() string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return string(buf[:n])
		}
		buf = make([]byte, 2*len(buf))
	}
}

// waitNoWatchGoroutines fails unless every watch goroutine ends within d.
func waitNoWatchGoroutines(t *testing.T, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		n := watchGoroutines()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d watch goroutine(s) still running %s after their watch ended", n, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// next returns the next snapshot, failing if none arrives within d or the
// channel is closed.
func next(t *testing.T, ch <-chan []*Pair, d time.Duration) []*Pair {
	t.Helper()
	select {
	case ps, ok := <-ch:
		if !ok {
			t.Fatalf("watch channel closed")
		}
		return ps
	case <-time.After(d):
		t.Fatalf("no snapshot within %s", d)
	}
	return nil
}

// waitClosed drains ch until it is closed, failing after d.
func waitClosed(t *testing.T, ch <-chan []*Pair, d time.Duration) {
	t.Helper()
	timeout := time.After(d)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-timeout:
			t.Fatalf("watch channel not closed within %s", d)
		}
	}
}

func testWatch(t *testing.T, open openFunc) {
	watcher := open(t, "watch")
	other := open(t, "watch") // another client writes, as another host would
	mustPut(t, other, "dir/a", "1")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := watcher.Watch(ctx, "dir/")
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	if got := render(next(t, ch, 5*time.Second)); got != "dir/a=1" {
		t.Fatalf("initial snapshot %q, want dir/a=1", got)
	}

	// A change by another client arrives within a second.
	start := time.Now()
	mustPut(t, other, "dir/b", "2")
	if got := render(next(t, ch, time.Second)); got != "dir/a=1 dir/b=2" {
		t.Fatalf("snapshot after put %q, want dir/a=1 dir/b=2", got)
	}
	t.Logf("change delivered after %s", time.Since(start))

	// A write outside the prefix delivers nothing: the next snapshot is
	// the one for the following change inside it.
	mustPut(t, other, "elsewhere", "x")
	mustPut(t, other, "dir-sibling", "x")
	mustPut(t, other, "dir/c", "3")
	if got := render(next(t, ch, time.Second)); got != "dir/a=1 dir/b=2 dir/c=3" {
		t.Fatalf("snapshot after unrelated writes and put %q, want dir/a=1 dir/b=2 dir/c=3", got)
	}
	// Rewriting the same value changes nothing, not even the index (as on
	// Consul), so it delivers nothing either.
	c := mustGet(t, other, "dir/c")
	if got := mustPut(t, other, "dir/c", "3"); got.ModifyIndex != c.ModifyIndex {
		t.Fatalf("rewriting an unchanged value moved the index from %d to %d", c.ModifyIndex, got.ModifyIndex)
	}
	mustPut(t, other, "dir/c", "4")
	if got := next(t, ch, time.Second); render(got) != "dir/a=1 dir/b=2 dir/c=4" || got[2].ModifyIndex <= c.ModifyIndex {
		t.Fatalf("snapshot after rewrite %q (index %d)", render(got), got[2].ModifyIndex)
	}

	// Deletes, down to an empty prefix.
	if err := other.Delete(bg(t), "dir/a"); err != nil {
		t.Fatal(err)
	}
	if got := render(next(t, ch, time.Second)); got != "dir/b=2 dir/c=4" {
		t.Fatalf("snapshot after delete %q", got)
	}
	if err := other.Txn(bg(t), []Op{{Verb: OpDelete, Key: "dir/b"}, {Verb: OpDelete, Key: "dir/c"}}); err != nil {
		t.Fatal(err)
	}
	if got := next(t, ch, time.Second); len(got) != 0 {
		t.Fatalf("snapshot after deleting everything %q, want empty", render(got))
	}

	// A burst while nobody reads: writers are not held up, and the
	// receiver ends up with the newest state.
	burstStart := time.Now()
	for i := 0; i < 50; i++ {
		mustPut(t, other, "dir/burst", strconv.Itoa(i))
	}
	t.Logf("50 writes with an idle receiver took %s", time.Since(burstStart))
	deadline := time.After(3 * time.Second)
	for got := ""; got != "dir/burst=49"; {
		select {
		case ps := <-ch:
			got = render(ps)
		case <-deadline:
			t.Fatalf("newest state never delivered after a burst; last %q", got)
		}
	}

	// Receivers own what they get.
	mustPut(t, other, "dir/own", "v")
	ps := next(t, ch, time.Second)
	for _, p := range ps {
		p.Value[0] = '!'
	}
	// Had the watcher kept the scribbled copy, this unrelated write (which
	// wakes Consul's blocking query) would produce a spurious delivery.
	mustPut(t, other, "elsewhere", "y")
	mustPut(t, other, "dir/own2", "v")
	if got := render(next(t, ch, time.Second)); got != "dir/burst=49 dir/own=v dir/own2=v" {
		t.Fatalf("snapshot after receiver scribbled on the last one: %q", got)
	}

	cancel()
	waitClosed(t, ch, 2*time.Second)
	waitNoWatchGoroutines(t, 2*time.Second)
}

func testWatchEndsOnClose(t *testing.T, open openFunc) {
	s := open(t, "watchclose")
	ch, err := s.Watch(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	next(t, ch, 5*time.Second)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	waitClosed(t, ch, 2*time.Second)
	waitNoWatchGoroutines(t, 2*time.Second)
	if _, err := s.Watch(context.Background(), ""); err == nil {
		t.Fatalf("Watch on a closed store succeeded")
	}
}

// runContention has len(stores) goroutines, each with its own client,
// increment one counter with Get+CAS until total successful increments
// reach total. The final value must be exactly total.
func runContention(t *testing.T, stores []Store, total int) {
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	per := total / len(stores)
	var (
		wg        sync.WaitGroup
		conflicts sync.Map
		errs      = make(chan error, len(stores))
	)
	start := time.Now()
	for w, s := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := 0
			for done := 0; done < per; {
				if err := ctx.Err(); err != nil {
					errs <- fmt.Errorf("worker %d after %d increments: %w", w, done, err)
					return
				}
				var cur int
				var index uint64
				p, err := s.Get(ctx, "counter")
				switch {
				case errors.Is(err, ErrNotFound):
				case err != nil:
					errs <- fmt.Errorf("worker %d: get: %w", w, err)
					return
				default:
					if cur, err = strconv.Atoi(string(p.Value)); err != nil {
						errs <- fmt.Errorf("worker %d: counter %q: %w", w, p.Value, err)
						return
					}
					index = p.ModifyIndex
				}
				err = s.CAS(ctx, "counter", []byte(strconv.Itoa(cur+1)), index)
				switch {
				case errors.Is(err, ErrConflict):
					n++
				case err != nil:
					errs <- fmt.Errorf("worker %d: cas: %w", w, err)
					return
				default:
					done++
				}
			}
			conflicts.Store(w, n)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	p := mustGet(t, stores[0], "counter")
	if string(p.Value) != strconv.Itoa(per*len(stores)) {
		t.Fatalf("counter = %s after %d workers x %d successful CAS increments, want %d", p.Value, len(stores), per, per*len(stores))
	}
	sum := 0
	conflicts.Range(func(_, v any) bool { sum += v.(int); return true })
	t.Logf("%d increments by %d clients in %s, %d conflicts retried", per*len(stores), len(stores), time.Since(start), sum)
}

// testTxnIndex: TxnIndex returns the modify index the transaction's writes
// got, the one a compare-and-set on them then needs; a check's older index
// does not count.
func testTxnIndex(t *testing.T, open openFunc) {
	s := open(t, "t/")
	ctx := context.Background()
	if err := s.Put(ctx, "old", []byte("o")); err != nil {
		t.Fatal(err)
	}
	old := mustGet(t, s, "old")
	if err := s.Put(ctx, "other", []byte("x")); err != nil {
		t.Fatal(err)
	}
	idx, err := TxnIndex(ctx, s, []Op{
		{Verb: OpCheckIndex, Key: "old", Index: old.ModifyIndex},
		{Verb: OpCreate, Key: "k1", Value: []byte("1")},
		{Verb: OpSet, Key: "k2", Value: []byte("2")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, s, "k1").ModifyIndex; idx == 0 || got != idx {
		t.Fatalf("TxnIndex = %d, k1 has index %d", idx, got)
	}
	if err := s.CAS(ctx, "k2", []byte("3"), idx); err != nil {
		t.Fatalf("CAS on the index TxnIndex returned: %v", err)
	}
	if _, err := TxnIndex(ctx, s, []Op{{Verb: OpCAS, Key: "k1", Value: []byte("x"), Index: old.ModifyIndex}}); !errors.Is(err, ErrConflict) {
		t.Fatalf("TxnIndex on a stale index: %v, want ErrConflict", err)
	}
	if idx, err := TxnIndex(ctx, s, []Op{{Verb: OpDelete, Key: "k1"}}); err != nil || (idx != 0 && idx <= old.ModifyIndex) {
		t.Fatalf("TxnIndex of a delete = %d, %v", idx, err)
	}
}
