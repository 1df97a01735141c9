package kvstore

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

// leanStore is a store whose Watch is WatchLean, so that the Watch contract
// runs against it. It copies each snapshot's pairs: a lean watch shares
// them with its next snapshots, and the contract's receiver writes on the
// ones it gets.
type leanStore struct{ Store }

func (l leanStore) Watch(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	in, err := WatchLean(ctx, l.Store, prefix)
	if err != nil {
		return nil, err
	}
	out := make(chan []*Pair)
	go func() {
		defer close(out)
		for snap := range in {
			select {
			case out <- clonePairs(snap):
			case <-ctx.Done():
			}
		}
	}()
	return out, nil
}

func (l leanStore) TxnIndex(ctx context.Context, ops []Op) (uint64, error) {
	return TxnIndex(ctx, l.Store, ops)
}

func leanBackend(b newBackend) newBackend {
	return func(t *testing.T) openFunc {
		open := b(t)
		return func(t *testing.T, prefix string) Store { return leanStore{open(t, prefix)} }
	}
}

// countingProxy forwards to agent and counts each request by method, path
// and the query's names (keys, recurse, index), and the bytes answered.
type countingProxy struct {
	mu     sync.Mutex
	counts map[string]int
	bytes  int
	// failTxn is how many of the next transactions are answered 500
	// without reaching the agent.
	failTxn int
	// wait, when set, replaces every blocking query's wait.
	wait string
	// plain counts the requests read in Consul's default mode (without
	// "consistent"), by the same names.
	plain map[string]int
	// stale answers a default-mode read of a path (/v1/kv/...) as a
	// server behind the others would: with the body held (an earlier
	// answer), or 404 when it is nil.
	stale map[string][]byte
}

func (c *countingProxy) take() (map[string]int, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m, b := c.counts, c.bytes
	c.counts, c.bytes, c.plain = map[string]int{}, 0, map[string]int{}
	return m, b
}

type countingWriter struct {
	http.ResponseWriter
	n *int
}

func (w countingWriter) Write(b []byte) (int, error) {
	*w.n += len(b)
	return w.ResponseWriter.Write(b)
}

func startCountingProxy(t *testing.T, agent *testenv.ConsulAgent) (*countingProxy, string) {
	c := &countingProxy{counts: map[string]int{}, plain: map[string]int{}, stale: map[string][]byte{}}
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: agent.Addr})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		c.mu.Lock()
		if c.wait != "" && q.Has("wait") {
			q.Set("wait", c.wait)
			r.URL.RawQuery = q.Encode()
		}
		c.mu.Unlock()
		var flags []string
		for _, f := range []string{"keys", "recurse", "index"} {
			if q.Has(f) {
				flags = append(flags, f)
			}
		}
		name := r.Method + " " + r.URL.Path
		if len(flags) > 0 {
			name += "?" + strings.Join(flags, "&")
		}
		c.mu.Lock()
		fail := r.URL.Path == "/v1/txn" && c.failTxn > 0
		if fail {
			c.failTxn--
		}
		plain := !q.Has("consistent") && !q.Has("stale")
		if plain {
			c.plain[name]++
		}
		old, stale := c.stale[r.URL.Path]
		stale = stale && plain && r.Method == http.MethodGet
		c.mu.Unlock()
		if fail {
			http.Error(w, "injected failure", http.StatusInternalServerError)
			return
		}
		var n int
		switch {
		case stale && old == nil:
			w.Header().Set("X-Consul-Index", "1")
			w.WriteHeader(http.StatusNotFound)
		case stale:
			w.Header().Set("Content-Type", "application/json")
			n, _ = w.Write(old)
		default:
			rp.ServeHTTP(countingWriter{w, &n}, r)
		}
		c.mu.Lock()
		c.counts[name]++
		c.bytes += n
		c.mu.Unlock()
	}))
	t.Cleanup(srv.Close)
	return c, strings.TrimPrefix(srv.URL, "http://")
}

// leanSetup starts an agent and returns a counting proxy in front of it,
// the test's key root, a store that goes through the proxy and one that
// writes to the agent directly, as another host would.
func leanSetup(t *testing.T) (*countingProxy, string, *Consul, *Consul) {
	agent := testenv.StartConsul(t)
	root := "test-" + randomHex(t) + "/"
	proxy, addr := startCountingProxy(t, agent)
	return proxy, root, newConsul(t, ConsulConfig{Address: addr, Prefix: root}), newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: root})
}

// leanNet writes hosts records of 2 kB and a config under net/config
// through writer, starts a lean watch of it on s and returns it, with want,
// which receives the next snapshot and fails unless it is what List
// through w gives (stamps left out).
func leanNet(t *testing.T, s, w, writer Store, hosts int) (<-chan []*Pair, func(what string)) {
	t.Helper()
	ctx := t.Context()
	big := strings.Repeat("x", 2000)
	for i := range hosts {
		mustPut(t, writer, fmt.Sprintf("net/config/peers/h%02d", i), fmt.Sprintf("%d-%s", i, big))
	}
	mustPut(t, writer, "net/config", "cfg")
	ch, err := WatchLean(ctx, s, "net/config")
	if err != nil {
		t.Fatal(err)
	}
	return ch, func(what string) {
		t.Helper()
		got := next(t, ch, 5*time.Second)
		list, err := w.List(ctx, "net/config")
		if err != nil {
			t.Fatal(err)
		}
		list = slices.DeleteFunc(list, func(p *Pair) bool { _, _, stamp := ParseStamp("net/config", p.Key); return stamp })
		if render(got) != render(list) || !slices.EqualFunc(got, list, func(a, b *Pair) bool { return a.ModifyIndex == b.ModifyIndex }) {
			t.Fatalf("%s: the watch delivered %d pairs unlike List's %d (or other indexes)", what, len(got), len(list))
		}
	}
}

// TestConsulWatchLean proves that a lean watch delivers what List gives
// after every kind of change, and that between its blocking listings of
// key names it reads the values of the keys that changed only.
func TestConsulWatchLean(t *testing.T) {
	proxy, root, s, w := leanSetup(t)
	ctx := t.Context()
	const hosts = 30
	ch, want := leanNet(t, s, w, w, hosts)
	want("first snapshot")
	time.Sleep(100 * time.Millisecond) // the first listing is out
	proxy.take()

	// One record changes: one listing of names, one check, one read.
	mustPut(t, w, "net/config/peers/h07", "7-changed")
	want("after one record changed")
	time.Sleep(100 * time.Millisecond)
	counts, bytes := proxy.take()
	if counts["GET /v1/kv/"+root+"net/config/peers/h07"] != 1 || counts["GET /v1/kv/"+root+"net/config?recurse"] != 0 || counts["PUT /v1/txn"] != 1 {
		t.Fatalf("one change made the requests %v, want one read of h07, one check transaction and no List", counts)
	}
	if limit := 2000; bytes > hosts*100+limit {
		t.Errorf("one change of %d records of 2 kB answered %d bytes; want the names and one record", hosts, bytes)
	}
	t.Logf("one change of %d: %v, %d bytes answered", hosts, counts, bytes)

	// A refresh that fails (the check transaction answered 500) is tried
	// again at once, not after the next change.
	proxy.mu.Lock()
	proxy.failTxn = 1
	proxy.mu.Unlock()
	mustPut(t, w, "net/config/peers/h08", "8-changed")
	want("after a failed refresh")

	// Writes outside the prefix, next to it, and an unchanged value
	// deliver nothing: the next snapshot is the next change's.
	mustPut(t, w, "net/endpoints/e1", "x")
	mustPut(t, w, "net/conf", "x")
	mustPut(t, w, "net/config/peers/h07", "7-changed")
	mustPut(t, w, "net/config", "cfg2")
	want("after unrelated writes and a change of the config")

	// A key added, a key deleted, both at once.
	mustPut(t, w, "net/config/peers/h99", "new")
	want("after a record was added")
	if err := w.Delete(ctx, "net/config/peers/h03"); err != nil {
		t.Fatal(err)
	}
	want("after a record was deleted")
	if err := w.Txn(ctx, []Op{{Verb: OpDelete, Key: "net/config/peers/h04"}, {Verb: OpSet, Key: "net/config/peers/h98", Value: []byte("v")}, {Verb: OpSet, Key: "net/config/peers/h05", Value: []byte("v5")}}); err != nil {
		t.Fatal(err)
	}
	want("after a delete, an add and a change at once")

	// Many changes at once are read with one List.
	proxy.take()
	var ops []Op
	for i := 10; i < 25; i++ {
		ops = append(ops, Op{Verb: OpSet, Key: fmt.Sprintf("net/config/peers/h%02d", i), Value: []byte("many")})
	}
	if err := w.Txn(ctx, ops); err != nil {
		t.Fatal(err)
	}
	want("after 15 records changed at once")
	time.Sleep(100 * time.Millisecond)
	if counts, _ := proxy.take(); counts["GET /v1/kv/"+root+"net/config?recurse"] != 1 {
		t.Fatalf("15 changes at once made the requests %v, want one List", counts)
	}

	// Down to nothing, and back.
	if err := w.Txn(ctx, []Op{{Verb: OpDelete, Key: "net/config"}}); err != nil {
		t.Fatal(err)
	}
	want("after the config was deleted")
	list, err := w.List(ctx, "net/config/")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range list {
		if err := w.Delete(ctx, p.Key); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.After(10 * time.Second)
	for len(list) != 0 {
		select {
		case list = <-ch:
		case <-deadline:
			t.Fatalf("the watch never delivered the empty prefix; last %d pairs", len(list))
		}
	}
	mustPut(t, w, "net/config", "again")
	want("after the config came back")
}

// TestConsulChanged proves Changed names exactly the keys whose index
// moved or that are gone, over more keys than one transaction takes.
func TestConsulChanged(t *testing.T) {
	agent := testenv.StartConsul(t)
	s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "test-" + randomHex(t) + "/"})
	ctx := t.Context()
	known := map[string]uint64{}
	for i := range MaxTxnOps + 10 {
		k := fmt.Sprintf("k/%03d", i)
		known[k] = mustPut(t, s, k, "v").ModifyIndex
	}
	if got, err := s.Changed(ctx, known); err != nil || len(got) != 0 {
		t.Fatalf("Changed with nothing changed = %v, %v", got, err)
	}
	mustPut(t, s, "k/003", "w")
	mustPut(t, s, "k/070", "w")
	if err := s.Delete(ctx, "k/040"); err != nil {
		t.Fatal(err)
	}
	mustPut(t, s, "k/999", "not known")
	got, err := s.Changed(ctx, known)
	slices.Sort(got)
	if err != nil || !slices.Equal(got, []string{"k/003", "k/040", "k/070"}) {
		t.Fatalf("Changed = %v, %v; want k/003 k/040 k/070", got, err)
	}
	if _, err := s.Changed(ctx, map[string]uint64{"": 1}); err == nil {
		t.Fatal("Changed of an empty key succeeded")
	}
}

// leanRecorder is a store that records which of Watch and WatchLean was
// called.
type leanRecorder struct {
	Store
	mu    sync.Mutex
	calls []string
}

func (r *leanRecorder) record(call string) (<-chan []*Pair, error) {
	r.mu.Lock()
	r.calls = append(r.calls, call)
	r.mu.Unlock()
	ch := make(chan []*Pair)
	close(ch)
	return ch, nil
}

func (r *leanRecorder) Watch(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	return r.record("watch " + prefix)
}

func (r *leanRecorder) WatchLean(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	return r.record("lean " + prefix)
}

type nopObserver struct{}

func (nopObserver) ObserveStoreOp(string, error, time.Duration) {}
func (nopObserver) ObserveWatchUpdate()                         {}

// TestWatchLeanThroughWrappers proves the plugin's wrappers (metered,
// fenced, own-fenced) keep the inner store's lean watch, and that a store
// without one watches as Watch does.
func TestWatchLeanThroughWrappers(t *testing.T) {
	rec := &leanRecorder{}
	wrapped := Fence(Metered(rec, nopObserver{}), Op{Verb: OpCheckNotExists, Key: "fence"})
	if _, err := WatchLean(context.Background(), wrapped, "p/"); err != nil {
		t.Fatal(err)
	}
	if _, err := wrapped.Watch(context.Background(), "q/"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond) // the metered forwarders end
	rec.mu.Lock()
	got := slices.Clone(rec.calls)
	rec.mu.Unlock()
	if want := []string{"lean p/", "watch q/"}; !slices.Equal(got, want) {
		t.Fatalf("calls through the wrappers = %q, want %q", got, want)
	}
	plain := &struct{ Store }{rec}
	if _, err := WatchLean(context.Background(), plain, "r/"); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	last := rec.calls[len(rec.calls)-1]
	rec.mu.Unlock()
	if last != "watch r/" {
		t.Fatalf("WatchLean of a store without one called %q, want its Watch", last)
	}
}

// TestConsulWatchLeanQuiet proves a lean watch of small values lists them
// at every change (one request), switches to key listings once they grow,
// and, its blocking query running out of time with nothing changed, asks
// Consul nothing else: between changes its host costs the servers its
// blocking queries alone.
func TestConsulWatchLeanQuiet(t *testing.T) {
	proxy, root, s, w := leanSetup(t)
	ctx := t.Context()
	for i := range 5 {
		mustPut(t, w, fmt.Sprintf("net/config/peers/h%d", i), "v")
	}
	ch, err := WatchLean(ctx, s, "net/config")
	if err != nil {
		t.Fatal(err)
	}
	next(t, ch, 5*time.Second)
	time.Sleep(100 * time.Millisecond)
	proxy.take()
	mustPut(t, w, "net/config/peers/h1", "small")
	next(t, ch, 5*time.Second)
	time.Sleep(100 * time.Millisecond)
	if counts, _ := proxy.take(); counts["GET /v1/kv/"+root+"net/config?recurse&index"] != 1 || len(counts) != 1 {
		t.Fatalf("a change of small values made the requests %v, want one blocking List", counts)
	}
	big := strings.Repeat("x", leanListBelow/2)
	var ops []Op
	for i := range 5 {
		ops = append(ops, Op{Verb: OpSet, Key: fmt.Sprintf("net/config/peers/h%d", i), Value: []byte(big)})
	}
	if err := w.Txn(ctx, ops); err != nil {
		t.Fatal(err)
	}
	next(t, ch, 5*time.Second)
	time.Sleep(100 * time.Millisecond)
	proxy.mu.Lock()
	proxy.wait = "100ms"
	proxy.mu.Unlock()
	mustPut(t, w, "net/config/peers/h0", "wake") // the long wait ends
	next(t, ch, 5*time.Second)
	time.Sleep(150 * time.Millisecond)
	proxy.take()
	time.Sleep(time.Second)
	counts, _ := proxy.take()
	blocking := counts["GET /v1/kv/"+root+"net/config?keys&index"]
	if blocking < 3 || len(counts) != 1 {
		t.Fatalf("a quiet second of 100 ms waits made the requests %v, want only blocking key listings (at least 3)", counts)
	}
	select {
	case snap := <-ch:
		t.Fatalf("a quiet watch delivered %d pairs", len(snap))
	default:
	}
	mustPut(t, w, "net/config/peers/h2", "changed")
	got := next(t, ch, 5*time.Second)
	if len(got) != 5 || got[2].Key != "net/config/peers/h2" || string(got[2].Value) != "changed" || string(got[3].Value) != big {
		t.Fatalf("after the quiet second, a change delivered %d pairs: %.40q", len(got), render(got))
	}
}

// TestLeanQuick: a listing that differs from the last one by records'
// stamps replaced is read from those names alone; anything else (a name
// that came or went, a record with two stamps, one whose stamp went with
// no new one, a record not vouched for, no change at all) goes to the
// full comparison.
func TestLeanQuick(t *testing.T) {
	const full, prefix = "p/", "n/config"
	rec := func(h string) string { return prefix + "/peers/" + h }
	stamp := func(r, nonce string) string { return full + StampBase(prefix, r) + nonce }
	state := func() *leanState {
		st := &leanState{prefix: prefix, held: map[string]*Pair{}, stamps: map[string]stampSeen{}}
		for _, k := range []string{prefix, rec("a"), rec("b")} {
			st.held[k] = &Pair{Key: k}
			st.stamps[k] = stampSeen{nonce: "1", trusted: true}
			st.names = append(st.names, full+k, stamp(k, "1"))
		}
		slices.Sort(st.names)
		return st
	}
	listing := func(st *leanState, drop []string, add ...string) []string {
		out := slices.DeleteFunc(slices.Clone(st.names), func(n string) bool { return slices.Contains(drop, n) })
		out = append(out, add...)
		slices.Sort(out)
		return out
	}
	st := state()
	read, fresh, ok := st.quick(full, listing(st, []string{stamp(rec("a"), "1"), stamp(prefix, "1")}, stamp(rec("a"), "2"), stamp(prefix, "3")))
	slices.Sort(read)
	if !ok || !slices.Equal(read, []string{prefix, rec("a")}) || fresh[rec("a")] != "2" || fresh[prefix] != "3" {
		t.Fatalf("two stamps replaced: read %v, fresh %v, ok %v", read, fresh, ok)
	}
	for _, c := range []struct {
		what  string
		names func(st *leanState) []string
	}{
		{"nothing changed", func(st *leanState) []string { return listing(st, nil) }},
		{"a record came", func(st *leanState) []string { return listing(st, nil, full+rec("c"), stamp(rec("c"), "1")) }},
		{"a record went", func(st *leanState) []string {
			return listing(st, []string{full + rec("b"), stamp(rec("b"), "1")})
		}},
		{"a second stamp", func(st *leanState) []string { return listing(st, nil, stamp(rec("a"), "2")) }},
		{"a stamp went, another record's came", func(st *leanState) []string {
			return listing(st, []string{stamp(rec("a"), "1")}, stamp(rec("b"), "2"))
		}},
		{"a stamp went", func(st *leanState) []string { return listing(st, []string{stamp(rec("a"), "1")}) }},
		{"a stamp of a record not held", func(st *leanState) []string { return listing(st, nil, stamp(rec("z"), "1")) }},
		{"a name outside the prefix", func(st *leanState) []string {
			return listing(st, []string{stamp(rec("a"), "1")}, "q/"+StampBase(prefix, rec("a"))+"2")
		}},
	} {
		st := state()
		if read, _, ok := st.quick(full, c.names(st)); ok {
			t.Errorf("%s: read %v from the names alone", c.what, read)
		}
	}
	st = state()
	st.stamps[rec("b")] = stampSeen{nonce: "1"}
	if _, _, ok := st.quick(full, listing(st, []string{stamp(rec("a"), "1")}, stamp(rec("a"), "2"))); ok {
		t.Error("a record the stamps do not vouch for: read from the names alone")
	}
	st = state()
	st.names = nil
	if _, _, ok := st.quick(full, listing(state(), []string{stamp(rec("a"), "1")}, stamp(rec("a"), "2"))); ok {
		t.Error("no listing held (after a List): read from the names alone")
	}
}
