package kvstore

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// testDeleteTree: OpDeleteTree deletes every key that starts with its key
// and nothing else, a tree with no key is no error, and a set after it in
// the same transaction stands.
func testDeleteTree(t *testing.T, open openFunc) {
	s := open(t, "t/")
	for _, k := range []string{"a/1", "a/2", "a/3/x", "ab", "b", "s@/n1"} {
		mustPut(t, s, k, "v")
	}
	if err := s.Txn(bg(t), []Op{{Verb: OpDeleteTree, Key: "a/"}}); err != nil {
		t.Fatal(err)
	}
	if got := render(mustList(t, s, "")); got != "ab=v b=v s@/n1=v" {
		t.Fatalf("after delete-tree a/: %s", got)
	}
	if err := s.Txn(bg(t), []Op{{Verb: OpDeleteTree, Key: "none/"}}); err != nil {
		t.Fatalf("delete-tree of nothing: %v", err)
	}
	at, err := TxnIndex(bg(t), s, []Op{{Verb: OpDeleteTree, Key: "s@/"}, {Verb: OpSet, Key: "s@/n2", Value: []byte("w")}})
	if err != nil {
		t.Fatal(err)
	}
	got := mustList(t, s, "s@/")
	if render(got) != "s@/n2=w" || got[0].ModifyIndex != at {
		t.Fatalf("delete-tree then set: %s (index %d, the transaction's %d)", render(got), got[0].ModifyIndex, at)
	}
}

// stampAll stamps every key under rec/ and rec itself, with the lean
// prefix rec.
func stampAll(k string) (string, bool) {
	return "rec", k == "rec" || strings.HasPrefix(k, "rec/")
}

// stampsOf returns the nonces of key's stamps in s, and their indexes.
func stampsOf(t *testing.T, s Store, key string) ([]string, []uint64) {
	t.Helper()
	var nonces []string
	var at []uint64
	for _, p := range mustList(t, s, "rec.v") {
		rec, nonce, ok := ParseStamp("rec", p.Key)
		if !ok || rec == "" || nonce == "" {
			t.Fatalf("%q under the stamps is no stamp", p.Key)
		}
		if rec == key {
			nonces, at = append(nonces, nonce), append(at, p.ModifyIndex)
		}
	}
	return nonces, at
}

// testStamped: through Stamped, every write of a stamped key replaces its
// one stamp in the same transaction (the stamp's index is the write's),
// every deletion takes its stamps, a refused write leaves the old stamp,
// and other keys are written as they are.
func testStamped(t *testing.T, open openFunc) {
	s := Stamped(open(t, "t/"), stampAll)
	ctx := bg(t)
	var last string
	wantOne := func(what, key string) {
		t.Helper()
		nonces, at := stampsOf(t, s, key)
		if len(nonces) != 1 {
			t.Fatalf("%s: %q has stamps %v, want one", what, key, nonces)
		}
		if p := mustGet(t, s, key); at[0] != p.ModifyIndex {
			t.Fatalf("%s: stamp index %d, the record's %d", what, at[0], p.ModifyIndex)
		}
		if nonces[0] == last {
			t.Fatalf("%s: the stamp did not change", what)
		}
		last = nonces[0]
	}
	if err := s.Create(ctx, "rec/a", []byte("1")); err != nil {
		t.Fatal(err)
	}
	wantOne("create", "rec/a")
	mustPut(t, s, "rec/a", "2")
	wantOne("put", "rec/a")
	p := mustGet(t, s, "rec/a")
	if err := s.CAS(ctx, "rec/a", []byte("3"), p.ModifyIndex); err != nil {
		t.Fatal(err)
	}
	wantOne("cas", "rec/a")
	kept := last
	if err := s.CAS(ctx, "rec/a", []byte("4"), p.ModifyIndex); !errors.Is(err, ErrConflict) {
		t.Fatalf("a stale CAS: %v, want ErrConflict", err)
	}
	if err := s.Create(ctx, "rec/a", []byte("5")); !errors.Is(err, ErrConflict) {
		t.Fatalf("a Create of an existing key: %v, want ErrConflict", err)
	}
	if nonces, _ := stampsOf(t, s, "rec/a"); !slices.Equal(nonces, []string{kept}) {
		t.Fatalf("refused writes changed the stamps: %v, want [%s]", nonces, kept)
	}
	mustPut(t, s, "rec", "cfg")
	last = ""
	wantOne("put of the prefix's own key", "rec")
	if err := s.Txn(ctx, []Op{{Verb: OpSet, Key: "rec/b", Value: []byte("b")}, {Verb: OpSet, Key: "other", Value: []byte("o")}}); err != nil {
		t.Fatal(err)
	}
	last = ""
	wantOne("txn", "rec/b")
	if nonces, _ := stampsOf(t, s, "rec/a"); !slices.Equal(nonces, []string{kept}) {
		t.Fatalf("a write of rec/b changed rec/a's stamps: %v", nonces)
	}
	if got := mustList(t, s, "other"); len(got) != 1 {
		t.Fatalf("other: %s", render(got))
	}
	p = mustGet(t, s, "rec/b")
	if err := s.DeleteCAS(ctx, "rec/b", p.ModifyIndex+100); !errors.Is(err, ErrConflict) {
		t.Fatalf("a stale DeleteCAS: %v, want ErrConflict", err)
	}
	if err := s.DeleteCAS(ctx, "rec/b", p.ModifyIndex); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteCAS(ctx, "rec/b", p.ModifyIndex); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a DeleteCAS of a missing key: %v, want ErrNotFound", err)
	}
	if err := s.Delete(ctx, "rec/a"); err != nil {
		t.Fatal(err)
	}
	if got := render(mustList(t, s, "rec")); !strings.HasPrefix(got, "rec=cfg rec.v@/") || strings.Count(got, " ") != 1 {
		t.Fatalf("after both deletions: %s, want the prefix's key and its stamp", got)
	}
	// A stamp left by a deletion without stamps (an older release's) goes
	// with the prefix's own key.
	mustPut(t, s, "rec/c", "c")
	if err := s.(*stamped).Store.Delete(ctx, "rec/c"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "rec"); err != nil {
		t.Fatal(err)
	}
	if got := mustList(t, s, "rec"); len(got) != 0 {
		t.Fatalf("after the prefix's own key was deleted: %s", render(got))
	}
	var ops []Op
	for i := range MaxTxnOps/2 + 1 {
		ops = append(ops, Op{Verb: OpSet, Key: fmt.Sprintf("rec/%d", i), Value: []byte("v")})
	}
	if err := s.Txn(ctx, ops); err == nil {
		t.Fatalf("%d stamped writes in one transaction (%d operations with their stamps) succeeded", len(ops), 3*len(ops))
	}
}

// until receives snapshots from ch until each of keys is in one at the
// index the store gives it now.
func until(t *testing.T, ch <-chan []*Pair, s Store, what string, keys ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		snap := next(t, ch, 5*time.Second)
		ok := true
		for _, k := range keys {
			p := mustGet(t, s, k)
			i := slices.IndexFunc(snap, func(q *Pair) bool { return q.Key == k })
			ok = ok && i >= 0 && snap[i].ModifyIndex == p.ModifyIndex
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the watch never delivered %v as the store holds them", what, keys)
		}
	}
}

// TestParseStamp: a stamp names its record and nonce; a record's name,
// the prefix's own key and names next to the stamps are not stamps.
func TestParseStamp(t *testing.T) {
	for _, tt := range []struct {
		key, record, nonce string
		ok                 bool
	}{
		{StampBase("n/config", "n/config/peers/h1") + "abc", "n/config/peers/h1", "abc", true},
		{StampBase("n/config", "n/config") + "abc", "n/config", "abc", true},
		{StampBase("n/config", "n/config/peers/h1@") + "abc", "n/config/peers/h1@", "abc", true},
		{"n/config.v/peers/junk", "", "", true},
		{"n/config/peers/h1", "", "", false},
		{"n/config", "", "", false},
		{"n/configx", "", "", false},
	} {
		rec, nonce, ok := ParseStamp("n/config", tt.key)
		if rec != tt.record || nonce != tt.nonce || ok != tt.ok {
			t.Errorf("ParseStamp(%q) = %q, %q, %v; want %q, %q, %v", tt.key, rec, nonce, ok, tt.record, tt.nonce, tt.ok)
		}
	}
	// One record's stamps never share a prefix with another's.
	if strings.HasPrefix(StampBase("n/config", "n/config/peers/h10"), StampBase("n/config", "n/config/peers/h1")) ||
		strings.HasPrefix(StampBase("n/config", "n/config/peers/h1"), StampBase("n/config", "n/config")) {
		t.Fatal("a record's stamp base is a prefix of another's")
	}
}

// TestConsulWatchLeanStamped proves that a lean watch reads a stamped
// change with its key listing and one read, without the check
// transaction; that it still delivers what writers without stamps (an
// older release) change, checking their records at every change; and that
// a record changed without a new stamp (a host downgraded to such a
// release) is checked from then on, until its writer stamps again.
func TestConsulWatchLeanStamped(t *testing.T) {
	proxy, root, s, w := leanSetup(t)
	ctx := t.Context()
	stamp := func(k string) (string, bool) {
		return "net/config", k == "net/config" || strings.HasPrefix(k, "net/config/peers/")
	}
	sw := Stamped(w, stamp) // a host of this release; w is an older one
	ch, want := leanNet(t, s, w, sw, 30)
	settle := func() map[string]int {
		time.Sleep(100 * time.Millisecond)
		counts, _ := proxy.take()
		return counts
	}
	read := func(h string) string { return "GET /v1/kv/" + root + "net/config/peers/" + h }
	txn, list := "PUT /v1/txn", "GET /v1/kv/"+root+"net/config?recurse"
	want("first snapshot")
	settle()

	mustPut(t, sw, "net/config/peers/h07", "7-changed")
	want("after a stamped change")
	if c := settle(); c[read("h07")] != 1 || c[txn] != 0 || c[list] != 0 || len(c) != 2 {
		t.Fatalf("a stamped change made the requests %v, want the key listing and one read of h07", c)
	}

	// An older release's write of a stamped record: nothing in the
	// listing names it, so every record is checked.
	mustPut(t, w, "net/config/peers/h08", "8-unstamped")
	want("after an unstamped change")
	if c := settle(); c[read("h08")] != 1 || c[txn] != 1 {
		t.Fatalf("an unstamped change made the requests %v, want a check and one read of h08", c)
	}
	// h08's stamp vouches no more: it is checked with the next change.
	mustPut(t, sw, "net/config/peers/h09", "9-changed")
	want("after a stamped change, with h08 suspect")
	if c := settle(); c[read("h09")] != 1 || c[txn] != 1 || c[read("h08")] != 0 {
		t.Fatalf("a stamped change with a suspect record made the requests %v, want a check and one read of h09", c)
	}
	// Its writer stamps again: trusted again.
	mustPut(t, sw, "net/config/peers/h08", "8-stamped")
	want("after h08 was stamped again")
	settle()
	mustPut(t, sw, "net/config/peers/h12", "12-changed")
	want("after a stamped change, h08 trusted again")
	if c := settle(); c[txn] != 0 || len(c) != 2 {
		t.Fatalf("a stamped change made the requests %v, want the key listing and one read", c)
	}

	// A record an older release adds, without a stamp: read as new, then
	// checked at every change.
	mustPut(t, w, "net/config/peers/h99", "old-host")
	want("after an unstamped record came")
	settle()
	mustPut(t, sw, "net/config/peers/h13", "13")
	want("after a stamped change, h99 unstamped")
	if c := settle(); c[txn] != 1 || c[read("h13")] != 1 {
		t.Fatalf("a stamped change with an unstamped record made the requests %v, want a check and one read", c)
	}
	mustPut(t, w, "net/config/peers/h99", "old-host-2")
	mustPut(t, sw, "net/config/peers/h14", "14")
	until(t, ch, w, "the unstamped record and a stamped one changed", "net/config/peers/h99", "net/config/peers/h14")

	// Deletions take the stamps; the config's own stamp works as any.
	if err := sw.Delete(ctx, "net/config/peers/h03"); err != nil {
		t.Fatal(err)
	}
	want("after a stamped deletion")
	mustPut(t, sw, "net/config", "cfg2")
	want("after a stamped change of the config")
	if c := settle(); c["GET /v1/kv/"+root+"net/config"] != 1 || c[list] != 0 {
		t.Fatalf("a stamped change of the config made the requests %v, want one read of it", c)
	}

	// A new watch's first List decides by the stamps' indexes: a record
	// written after its stamp is checked at every change.
	mustPut(t, w, "net/config/peers/h05", "5-unstamped")
	until(t, ch, w, "an unstamped change", "net/config/peers/h05")
	ch2, err := WatchLean(ctx, s, "net/config")
	if err != nil {
		t.Fatal(err)
	}
	next(t, ch2, 5*time.Second)
	settle()
	mustPut(t, sw, "net/config/peers/h15", "15")
	until(t, ch2, w, "a stamped change", "net/config/peers/h15")
	// Both watches check: the first saw h05 change without a new stamp,
	// the second found it newer than its stamp.
	if c := settle(); c[txn] != 2 || c[read("h15")] != 2 {
		t.Fatalf("a stamped change, with a record newer than its stamp, made the requests %v (two watches), want a check and a read each", c)
	}
}

// TestConsulWatchLeanReadsBehind proves that a lean watch reads a record
// its listing named changed in Consul's default mode and takes the answer
// only when it is at least as new as the listing: an answer from a
// server behind the others (an older version, or the key missing, as a
// restarted server still applying its log gives) is read again in the
// consistent mode, and the snapshot holds the new version.
func TestConsulWatchLeanReadsBehind(t *testing.T) {
	proxy, root, s, w := leanSetup(t)
	stamp := func(k string) (string, bool) {
		return "net/config", k == "net/config" || strings.HasPrefix(k, "net/config/peers/")
	}
	sw := Stamped(w, stamp)
	_, want := leanNet(t, s, w, sw, 30)
	path := func(h string) string { return "/v1/kv/" + root + "net/config/peers/" + h }
	settle := func() (map[string]int, map[string]int) {
		time.Sleep(100 * time.Millisecond)
		proxy.mu.Lock()
		plain := proxy.plain
		proxy.mu.Unlock()
		counts, _ := proxy.take()
		return counts, plain
	}
	want("first snapshot")
	settle()

	// A change read from an up-to-date server: one read, default mode.
	mustPut(t, sw, "net/config/peers/h07", "7-changed")
	want("after a stamped change")
	if c, plain := settle(); c["GET "+path("h07")] != 1 || plain["GET "+path("h07")] != 1 {
		t.Fatalf("a stamped change made the requests %v (%v in the default mode), want one read of h07 in the default mode", c, plain)
	}

	// The server answering the default-mode read is behind: it gives
	// h08's version before the change, then (h09) no key at all.
	resp, err := http.Get("http://" + w.addr + path("h08"))
	if err != nil {
		t.Fatal(err)
	}
	before, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("reading h08 before its change: %d, %v", resp.StatusCode, err)
	}
	proxy.mu.Lock()
	proxy.stale[path("h08")] = before
	proxy.stale[path("h09")] = nil
	proxy.mu.Unlock()
	for _, h := range []string{"h08", "h09"} {
		mustPut(t, sw, "net/config/peers/"+h, h+"-changed")
		want("after a stamped change of " + h + ", read from a server behind")
		if c, plain := settle(); c["GET "+path(h)] != 2 || plain["GET "+path(h)] != 1 {
			t.Fatalf("a change of %s read from a server behind made the requests %v (%v in the default mode), want a read in the default mode and one in the consistent mode", h, c, plain)
		}
	}
}
