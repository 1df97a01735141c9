package kvstore

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/maphash"
	"maps"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
)

// Watch tuning. A blocking query waits at most watchWait on the server
// (plus Consul's jitter of up to watchWait/16); after a failure the watch
// retries with a backoff doubling from watchBackoffMin to watchBackoffMax.
//
// A prefix that holds no key wakes its blocking query on every write
// anywhere in the store: Consul answers such a list with the index of
// the whole KV table and its watch sits on the nearest ancestor that
// exists. The watch then finds nothing new each time; it asks again only
// after a pause, watchEmptyPace doubling up to watchEmptyPaceMax while
// such answers repeat, so an empty prefix (ipsec/ without encrypted
// networks, specs/ without cluster-wide ones) costs each host at most one
// query per watchEmptyPaceMax while the store is written, instead of one
// per write. A first key there is seen at most a pause later (the next
// query, on the old index, returns at once).
const (
	watchWait         = 30 * time.Second
	watchBackoffMin   = 50 * time.Millisecond
	watchBackoffMax   = 2 * time.Second
	watchEmptyPace    = 500 * time.Millisecond
	watchEmptyPaceMax = 2 * time.Second
)

var _ Store = (*Consul)(nil)

// Consul is the Store on Consul KV. It is safe for concurrent use.
type Consul struct {
	client    *api.Client
	kv        *api.KV
	transport *http.Transport
	// watchTr carries the requests of the watches' own goroutines (see
	// onOwnConn).
	watchTr *watchTransport
	addr    string // host:port, named in errors
	prefix  string
	timeout time.Duration

	// ctx is cancelled by Close; it ends every Watch, and wg waits for them.
	// mu orders wg.Add in Watch before Close's wg.Wait.
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	closed bool // guarded by mu
	wg     sync.WaitGroup
}

// NewConsul builds a Consul store. It does not contact the agent: an
// unreachable agent shows up as ErrUnavailable on the first call.
func NewConsul(cfg ConsulConfig) (*Consul, error) {
	cfg, err := cfg.normalize()
	if err != nil {
		return nil, fmt.Errorf("new consul store: %w", err)
	}
	tlsCfg, err := api.SetupTLSConfig(&api.TLSConfig{
		Address:  cfg.TLSServerName,
		CAFile:   cfg.CAFile,
		CertFile: cfg.CertFile,
		KeyFile:  cfg.KeyFile,
	})
	if err != nil {
		return nil, fmt.Errorf("new consul store for %s: tls: %w", cfg.Address, err)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext = (&net.Dialer{Timeout: cfg.Timeout, KeepAlive: 30 * time.Second}).DialContext
	tr.TLSClientConfig = tlsCfg
	tr.TLSHandshakeTimeout = cfg.Timeout
	tr.MaxIdleConnsPerHost = 16
	// No gzip: the plugin talks to the host's own agent, where compressing
	// every answer costs the agent CPU and saves nothing. With one server
	// answering every host's watches (bench `hosts`, 10 hosts) Consul's CPU
	// per change fell from 98 to 56 ms without it.
	tr.DisableCompression = true
	// Every watch holds a connection of its own (a network's peers, the
	// host records, ...: a hundred on a host with a hundred networks), and
	// each has a read and a write buffer. Requests are small (the largest,
	// a transaction, is written in a few more calls): 1 KiB instead of
	// 4 KiB for writing saves 300 KiB on such a host. So are most answers
	// (a watch's listing names a few keys per host of the network), and
	// a large one is read mostly straight into the JSON decoder's buffer,
	// past the connection's: 1 KiB for reading saves another 300 KiB of
	// heap, and measured with 1,000 endpoints in 100 networks 0.8 to
	// 2.1 MiB of resident set (BENCHMARKS.md, twenty-first round).
	tr.WriteBufferSize = 1024
	tr.ReadBufferSize = 1024
	var wtls *tls.Config
	if cfg.Scheme == "https" {
		wtls = tlsCfg
	}
	wt := newWatchTransport(cfg.Address, tr.DialContext, wtls, cfg.Timeout, tr)
	wt.proxy = tr.Proxy
	// The HTTP client and scheme are set here, so the library's
	// environment defaults apply only to what is left empty (the token).
	client, err := api.NewClient(&api.Config{
		Address:    cfg.Address,
		Scheme:     cfg.Scheme,
		Token:      cfg.Token,
		HttpClient: &http.Client{Transport: statusTransport{routeTransport{shared: tr, own: wt}}},
	})
	if err != nil {
		return nil, fmt.Errorf("new consul store for %s: %w", cfg.Address, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Consul{
		client:    client,
		kv:        client.KV(),
		transport: tr,
		watchTr:   wt,
		addr:      cfg.Address,
		prefix:    cfg.Prefix,
		timeout:   cfg.Timeout,
		ctx:       ctx,
		cancel:    cancel,
	}, nil
}

// Client returns the underlying Consul API client, for packages that need
// more than KV (service registration). Pass a context with a deadline to
// every call: the client itself has no overall timeout, because blocking
// queries must be able to wait.
func (c *Consul) Client() *api.Client { return c.client }

// Address returns the agent's host:port.
func (c *Consul) Address() string { return c.addr }

// Prefix returns the normalised key prefix.
func (c *Consul) Prefix() string { return c.prefix }

// NodeName returns the local agent's node name, a natural default for the
// plugin's host name.
func (c *Consul) NodeName(ctx context.Context) (string, error) {
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	var self struct{ Config struct{ NodeName string } }
	if _, err := c.client.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(rctx)); err != nil {
		return "", c.fail(ctx, st, "agent self", "", err)
	}
	if self.Config.NodeName == "" {
		return "", fmt.Errorf("consul agent self at %s: empty node name", c.addr)
	}
	return self.Config.NodeName, nil
}

// Get returns the pair at key, or ErrNotFound. It reads in Consul's
// consistent mode (see the package documentation).
func (c *Consul) Get(ctx context.Context, key string) (*Pair, error) {
	kvp, err := c.getKV(ctx, key, true)
	if err != nil {
		return nil, err
	}
	if kvp == nil {
		return nil, fmt.Errorf("consul kv get %q: %w", c.prefix+key, ErrNotFound)
	}
	return c.pair(kvp), nil
}

// getKV reads key, in Consul's consistent mode or its default one (nil:
// no such key).
func (c *Consul) getKV(ctx context.Context, key string, consistent bool) (*api.KVPair, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	full := c.prefix + key
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	kvp, _, err := c.kv.Get(full, (&api.QueryOptions{RequireConsistent: consistent}).WithContext(rctx))
	if err != nil {
		return nil, c.fail(ctx, st, "kv get", full, err)
	}
	return kvp, nil
}

// getSince is Get for a reader that needs key as it was at index since
// or later (a lean watch's record, named changed by a consistent listing
// at that index): it reads in Consul's default mode, which saves the
// leader's check of its quorum, and takes the answer only when the key's
// modify index is at least since. A server whose state is older (a
// deposed leader, a restarted one still applying its log) cannot hold
// that version (Raft applies the log in order), so its answer goes to
// Get: so does a key not found, or changed at an earlier index (another
// key's write moved the listing's index).
func (c *Consul) getSince(ctx context.Context, key string, since uint64) (*Pair, error) {
	kvp, err := c.getKV(ctx, key, false)
	if err != nil {
		return nil, err
	}
	if kvp != nil && since > 0 && kvp.ModifyIndex >= since {
		return c.pair(kvp), nil
	}
	return c.Get(ctx, key)
}

// List returns the pairs under prefix, sorted by key, in Consul's
// consistent mode.
func (c *Consul) List(ctx context.Context, prefix string) ([]*Pair, error) {
	if err := checkListPrefix(prefix); err != nil {
		return nil, err
	}
	full := c.prefix + prefix
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	kvps, _, err := c.kv.List(full, (&api.QueryOptions{RequireConsistent: true}).WithContext(rctx))
	if err != nil {
		return nil, c.fail(ctx, st, "kv list", full, err)
	}
	return c.pairs(kvps), nil
}

// Put writes value unconditionally.
func (c *Consul) Put(ctx context.Context, key string, value []byte) error {
	if err := checkKey(key); err != nil {
		return err
	}
	full := c.prefix + key
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	if _, err := c.kv.Put(&api.KVPair{Key: full, Value: value}, (&api.WriteOptions{}).WithContext(rctx)); err != nil {
		return c.fail(ctx, st, "kv put", full, err)
	}
	return nil
}

// Create writes value only if key does not exist (CAS with index 0).
func (c *Consul) Create(ctx context.Context, key string, value []byte) error {
	return c.cas(ctx, "kv create", key, value, 0)
}

// CAS writes value only if key's ModifyIndex equals index; index 0 means
// "only if absent".
func (c *Consul) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	return c.cas(ctx, "kv cas", key, value, index)
}

func (c *Consul) cas(ctx context.Context, op, key string, value []byte, index uint64) error {
	if err := checkKey(key); err != nil {
		return err
	}
	full := c.prefix + key
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	ok, _, err := c.kv.CAS(&api.KVPair{Key: full, Value: value, ModifyIndex: index}, (&api.WriteOptions{}).WithContext(rctx))
	if err != nil {
		return c.fail(ctx, st, op, full, err)
	}
	if !ok {
		return fmt.Errorf("consul %s %q (index %d): %w", op, full, index, ErrConflict)
	}
	return nil
}

// Delete removes key; a missing key is success.
func (c *Consul) Delete(ctx context.Context, key string) error {
	if err := checkKey(key); err != nil {
		return err
	}
	full := c.prefix + key
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	if _, err := c.kv.Delete(full, (&api.WriteOptions{}).WithContext(rctx)); err != nil {
		return c.fail(ctx, st, "kv delete", full, err)
	}
	return nil
}

// DeleteCAS removes key only if its ModifyIndex equals index. Consul's own
// ?cas delete reports success for a missing key, so this is a transaction
// of check-index and delete, whose failure message tells a missing key
// (ErrNotFound) from a changed one (ErrConflict).
func (c *Consul) DeleteCAS(ctx context.Context, key string, index uint64) error {
	if err := checkKey(key); err != nil {
		return err
	}
	full := c.prefix + key
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	ops := api.KVTxnOps{
		{Verb: api.KVCheckIndex, Key: full, Index: index},
		{Verb: api.KVDelete, Key: full},
	}
	ok, resp, _, err := c.kv.Txn(ops, (&api.QueryOptions{}).WithContext(rctx))
	if err != nil {
		return c.fail(ctx, st, "kv delete-cas", full, err)
	}
	if ok {
		return nil
	}
	what := txnErrors(resp)
	if deniedByACL(what) {
		return fmt.Errorf("consul kv delete-cas %q at %s: %w: %s", full, c.addr, ErrPermissionDenied, what)
	}
	if strings.Contains(what, "doesn't exist") {
		return fmt.Errorf("consul kv delete-cas %q (index %d): %w", full, index, ErrNotFound)
	}
	return fmt.Errorf("consul kv delete-cas %q (index %d): %w: %s", full, index, ErrConflict, what)
}

// Txn applies ops atomically in one Consul transaction. OpDeleteCAS becomes
// check-index plus delete, so that, as in DeleteCAS, a missing key fails the
// condition instead of counting as deleted; a full transaction of
// MaxTxnOps such operations is 128 Consul operations, the server limit
// since Consul 1.14.
func (c *Consul) Txn(ctx context.Context, ops []Op) error {
	_, err := c.TxnIndex(ctx, ops)
	return err
}

// TxnIndex is Txn that also returns the modify index its writes got (0:
// the transaction wrote nothing, or the answer did not say).
func (c *Consul) TxnIndex(ctx context.Context, ops []Op) (uint64, error) {
	if err := checkOps(ops); err != nil {
		return 0, err
	}
	if len(ops) == 0 {
		return 0, nil
	}
	tops := make(api.KVTxnOps, 0, len(ops)+2)
	for _, op := range ops {
		full := c.prefix + op.Key
		switch op.Verb {
		case OpSet:
			tops = append(tops, &api.KVTxnOp{Verb: api.KVSet, Key: full, Value: op.Value, Flags: op.Flags})
		case OpCreate:
			tops = append(tops, &api.KVTxnOp{Verb: api.KVCAS, Key: full, Value: op.Value, Flags: op.Flags, Index: 0})
		case OpCAS:
			tops = append(tops, &api.KVTxnOp{Verb: api.KVCAS, Key: full, Value: op.Value, Flags: op.Flags, Index: op.Index})
		case OpDelete:
			tops = append(tops, &api.KVTxnOp{Verb: api.KVDelete, Key: full})
		case OpDeleteCAS:
			tops = append(tops,
				&api.KVTxnOp{Verb: api.KVCheckIndex, Key: full, Index: op.Index},
				&api.KVTxnOp{Verb: api.KVDelete, Key: full})
		case OpCheckIndex:
			tops = append(tops, &api.KVTxnOp{Verb: api.KVCheckIndex, Key: full, Index: op.Index})
		case OpCheckNotExists:
			tops = append(tops, &api.KVTxnOp{Verb: api.KVCheckNotExists, Key: full})
		case OpCheckSession:
			tops = append(tops, &api.KVTxnOp{Verb: api.KVCheckSession, Key: full, Session: op.Session})
		case OpDeleteTree:
			tops = append(tops, &api.KVTxnOp{Verb: api.KVDeleteTree, Key: full})
		}
	}
	name := fmt.Sprintf("%d ops, first %q", len(ops), c.prefix+ops[0].Key)
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	ok, resp, _, err := c.kv.Txn(tops, (&api.QueryOptions{}).WithContext(rctx))
	if err != nil {
		return 0, c.fail(ctx, st, "txn", name, err)
	}
	if ok {
		// The results of the writes carry the new index; a check's
		// result carries the index it checked, so only written keys count.
		written := map[string]bool{}
		for _, op := range tops {
			if op.Verb == api.KVSet || op.Verb == api.KVCAS {
				written[op.Key] = true
			}
		}
		var index uint64
		if resp != nil {
			for _, r := range resp.Results {
				if r != nil && written[r.Key] {
					index = max(index, r.ModifyIndex)
				}
			}
		}
		return index, nil
	}
	what := txnErrors(resp)
	if err := c.txnDenied(name, what); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("consul txn (%s): %w: %s", name, ErrConflict, what)
}

func txnErrors(resp *api.KVTxnResponse) string {
	if resp == nil || len(resp.Errors) == 0 {
		return "rolled back"
	}
	msgs := make([]string, len(resp.Errors))
	for i, e := range resp.Errors {
		msgs[i] = fmt.Sprintf("op %d: %s", e.OpIndex, e.What)
	}
	return strings.Join(msgs, "; ")
}

// txnDenied is the error of transaction name whose failure what is an
// ACL refusal, or nil when it is not one.
func (c *Consul) txnDenied(name, what string) error {
	if !deniedByACL(what) {
		return nil
	}
	return fmt.Errorf("consul txn (%s) at %s: %w: %s", name, c.addr, ErrPermissionDenied, what)
}

// deniedByACL tells an ACL refusal inside a rolled-back transaction, which
// retrying cannot fix, from a failed condition.
func deniedByACL(what string) bool {
	w := strings.ToLower(what)
	return strings.Contains(w, "permission denied") || strings.Contains(w, "acl not found")
}

// Watch runs blocking List queries on prefix and delivers a snapshot at
// start and whenever the content changed (Consul also returns on unrelated
// index moves and on wait timeouts). Through an outage it retries with a
// bounded backoff; it ends, closing the channel, when ctx is done or the
// store is closed, cancelling its in-flight request.
func (c *Consul) Watch(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	return c.startWatch(ctx, prefix, func(ctx context.Context, out chan<- []*Pair) { c.watch(ctx, c.prefix+prefix, out) })
}

// startWatch runs a watch of prefix in a goroutine of the store's until
// ctx ends or the store is closed, closing its channel then.
func (c *Consul) startWatch(ctx context.Context, prefix string, run func(ctx context.Context, out chan<- []*Pair)) (<-chan []*Pair, error) {
	if err := checkListPrefix(prefix); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, fmt.Errorf("consul watch %q at %s: store closed", c.prefix+prefix, c.addr)
	}
	out := make(chan []*Pair)
	wctx, cancel := context.WithCancel(onOwnConn(ctx))
	stop := context.AfterFunc(c.ctx, cancel)
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer close(out)
		defer cancel()
		defer stop()
		run(wctx, out)
	}()
	return out, nil
}

func (c *Consul) watch(ctx context.Context, full string, out chan<- []*Pair) {
	var (
		kvps      api.KVPairs
		last      []pairSum
		delivered bool
		pace      = watchEmptyPace
		seed      = maphash.MakeSeed()
		note      = deliveredHook(ctx)
	)
	query := func(q *api.QueryOptions) (meta *api.QueryMeta, err error) {
		kvps, meta, err = c.kv.List(full, q)
		return meta, err
	}
	c.follow(ctx, query, func(uint64) bool {
		snap := c.pairs(kvps)
		kvps = nil // not kept through the next blocking query
		if delivered && sameSums(last, snap, seed) {
			if len(snap) == 0 {
				if !sleepCtx(ctx, pace) {
					return false
				}
				pace = min(2*pace, watchEmptyPaceMax)
			}
			return true
		}
		pace = watchEmptyPace
		select {
		case out <- snap:
			note()
			// Only a digest of what was delivered stays: the receiver
			// owns the snapshot, and a watch of a network of a thousand
			// endpoints no longer keeps a second copy of their records.
			last, delivered = sums(snap, seed), true
			return true
		case <-ctx.Done():
			return false
		}
	})
}

// follow runs a blocking query round after round until ctx ends or answer
// returns false: query gets each round's options (the last index,
// Consul's wait, a consistent read, the round's context) and answer sees
// each successful round with the round's index. A failed round is tried
// again after a growing backoff, as a plain read: the agent may come back
// as a new server whose index is smaller than ours, and blocking on the
// old index would stall for a whole wait time.
func (c *Consul) follow(ctx context.Context, query func(q *api.QueryOptions) (*api.QueryMeta, error), answer func(index uint64) bool) {
	var index uint64
	backoff := watchBackoffMin
	for {
		rctx, cancel, _ := c.request(ctx, watchWait+watchWait/16+c.timeout)
		q := &api.QueryOptions{WaitIndex: index, WaitTime: watchWait, RequireConsistent: true}
		meta, err := query(q.WithContext(rctx))
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			index = 0
			if !sleepCtx(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, watchBackoffMax)
			continue
		}
		backoff = watchBackoffMin
		// Consul's index is at least 1; 0 would make the next query
		// return at once, forever. A smaller index than before means a
		// new server: taking it is the reset.
		index = max(meta.LastIndex, 1)
		if !answer(index) {
			return
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Close ends every Watch, waits for their goroutines and drops idle
// connections. The store must not be used afterwards.
func (c *Consul) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	c.transport.CloseIdleConnections()
	c.watchTr.closeAll()
	return nil
}

func (c *Consul) pair(kvp *api.KVPair) *Pair {
	p := &Pair{Key: strings.TrimPrefix(kvp.Key, c.prefix), ModifyIndex: kvp.ModifyIndex, Session: kvp.Session}
	if len(kvp.Value) > 0 {
		p.Value = kvp.Value
	}
	return p
}

func (c *Consul) pairs(kvps api.KVPairs) []*Pair {
	out := make([]*Pair, 0, len(kvps))
	for _, kvp := range kvps {
		// The prefix itself is never a key of ours (keys are non-empty).
		if !strings.HasPrefix(kvp.Key, c.prefix) || kvp.Key == c.prefix {
			continue
		}
		out = append(out, c.pair(kvp))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// httpStatus records the status code of the response to one request, so
// that errors can be classified even where the API library folds the code
// into a message (its txn call does).
type httpStatus struct{ code atomic.Int32 }

type statusKey struct{}

type statusTransport struct{ base http.RoundTripper }

func (s statusTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := s.base.RoundTrip(req)
	if resp != nil {
		if st, ok := req.Context().Value(statusKey{}).(*httpStatus); ok {
			st.code.Store(int32(resp.StatusCode))
		}
	}
	return resp, err
}

// request derives the context of one HTTP request: bounded by d and
// carrying the status recorder.
func (c *Consul) request(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc, *httpStatus) {
	st := &httpStatus{}
	rctx, cancel := context.WithTimeout(context.WithValue(ctx, statusKey{}, st), d)
	return rctx, cancel, st
}

// fail wraps a failed request's error. No answer (connection refused,
// timeout, reset), a 5xx or 429 answer, or an unreadable 2xx answer is
// ErrUnavailable; other 4xx answers (ACL denied, value too large) are the
// caller's problem and stay plain. A caller's own cancellation is reported
// as such, not as an outage.
func (c *Consul) fail(ctx context.Context, st *httpStatus, op, key string, err error) error {
	what := "consul " + op
	if key != "" {
		what += fmt.Sprintf(" %q", key)
	}
	what += " at " + c.addr
	if errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("%s: %w", what, err)
	}
	code := st.code.Load()
	if code == http.StatusForbidden {
		return fmt.Errorf("%s: %w: %w", what, ErrPermissionDenied, err)
	}
	if code >= 400 && code < 500 && code != http.StatusTooManyRequests {
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %w (Consul unreachable or without a leader): %w", what, ErrUnavailable, err)
}

// pairSum is what a watch remembers of a delivered pair to tell whether
// the next snapshot differs: its key, modify index, session and a hash of
// its value.
type pairSum struct {
	key     string
	index   uint64
	session string
	sum     uint64
}

func sums(ps []*Pair, seed maphash.Seed) []pairSum {
	out := make([]pairSum, len(ps))
	for i, p := range ps {
		out[i] = pairSum{key: p.Key, index: p.ModifyIndex, session: p.Session, sum: maphash.Bytes(seed, p.Value)}
	}
	return out
}

// sameSums reports whether ps is the snapshot summed in a. Equal modify
// indexes already mean equal values in one Consul; the hash covers a
// store that was replaced under the same indexes.
func sameSums(a []pairSum, ps []*Pair, seed maphash.Seed) bool {
	if len(a) != len(ps) {
		return false
	}
	for i, p := range ps {
		if a[i].key != p.Key || a[i].index != p.ModifyIndex || a[i].session != p.Session || a[i].sum != maphash.Bytes(seed, p.Value) {
			return false
		}
	}
	return true
}

// leanFetchMost is how many changed keys WatchLean reads one by one; more
// are read with one List of the prefix.
const leanFetchMost = 8

// WatchLean is Watch for a prefix whose snapshots are large and change a
// key at a time (issue 16, scale: a network's peer records, which every
// member host receives on every change). It delivers the same snapshots,
// but reads only what changed: its blocking query lists the prefix's key
// names, without values, and the stamps among them (stamp.go) name the
// records that changed, which are read one by one (getSince: in Consul's
// default mode, taken when as new as the listing; or the whole prefix
// with one List when more than leanFetchMost changed, after an outage,
// and when the index went back: a new server). Records the stamps cannot
// vouch for are checked with one read-only transaction of check-index
// operations, which names those whose modify index moved: a record
// without a stamp (an older release wrote it), one whose stamp is older
// than the record (a host downgraded to such a release), and every record
// when a listing's index moved but no stamp did. The keys it holds are
// the last List's, changed as the key listings and reads say; a key that
// changes after the listing is read newer, and the next listing's wake
// reads it again or finds nothing more to read. While the values it holds
// are under leanListBelow, its blocking query lists them, as Watch does.
// Snapshots carry the records, never the stamps.
//
// The pairs of a snapshot are shared with the next snapshots, so a
// receiver must not change them (the slice is its own).
func (c *Consul) WatchLean(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	return c.startWatch(ctx, prefix, func(ctx context.Context, out chan<- []*Pair) { c.watchLean(ctx, prefix, out) })
}

func (c *Consul) watchLean(ctx context.Context, prefix string, out chan<- []*Pair) {
	full := c.prefix + prefix
	var (
		st        = leanState{prefix: prefix}
		names     []string
		kvps      api.KVPairs
		listing   bool   // this round's query reads the values
		last      uint64 // the last round's index
		relist    = true
		delivered bool
		pace      = watchEmptyPace
		backoff   = watchBackoffMin
		note      = deliveredHook(ctx)
	)
	query := func(q *api.QueryOptions) (*api.QueryMeta, error) {
		if q.WaitIndex == 0 {
			relist = true // the first round, or the first after a failure
		}
		if relist {
			q.WaitIndex = 0 // a refresh that failed is tried again at once
		}
		// A prefix whose values are small is watched as Watch does: one
		// request a change, where the key listing and its reads are two
		// or more.
		listing = relist || st.bytes() < leanListBelow
		var meta *api.QueryMeta
		var err error
		if listing {
			kvps, meta, err = c.kv.List(full, q)
		} else {
			names, meta, err = c.kv.Keys(full, "", q)
		}
		return meta, err
	}
	c.follow(ctx, query, func(index uint64) bool {
		var changed bool
		if listing {
			changed = st.set(c.pairs(kvps))
			kvps = nil // not kept through the next blocking query
		} else {
			switch {
			case index < last:
				relist = true
			case index == last && delivered:
				// The wait ran out (Consul answers with the same
				// index): nothing under the prefix changed.
				return true
			}
			var err error
			changed, err = c.leanRefresh(ctx, &st, names, index, relist)
			if err != nil {
				if ctx.Err() != nil {
					return false
				}
				// Read again from scratch at the next round, which does
				// not wait for a change, after a growing backoff.
				relist = true
				if !sleepCtx(ctx, backoff) {
					return false
				}
				backoff = min(2*backoff, watchBackoffMax)
				return true
			}
		}
		relist, last, backoff = false, index, watchBackoffMin
		if delivered && !changed {
			if len(st.held) == 0 {
				// Consul answers a blocking query on an empty prefix at
				// every write anywhere: pace those.
				if !sleepCtx(ctx, pace) {
					return false
				}
				pace = min(2*pace, watchEmptyPaceMax)
			}
			return true
		}
		pace = watchEmptyPace
		snap := st.snapshot()
		select {
		case out <- snap:
			note()
			delivered = true
			return true
		case <-ctx.Done():
			return false
		}
	})
}

// leanListBelow is the size of a lean watch's values below which it lists
// them at every change, as Watch does: the key listing saves bytes from
// there on, and costs a round trip more a change (on the test machine,
// about 1.5 ms more at the median to program a peer on another host, and
// twice the tail, when it cost two).
const leanListBelow = 8 << 10

// leanState is what a lean watch holds: the records under its prefix, by
// key as the store names it (relative), stamps left out, and what it
// knows of each record's stamp.
type leanState struct {
	prefix string
	held   map[string]*Pair
	stamps map[string]stampSeen
	// names is the key listing the records and stamps are those of
	// (full keys, sorted; nil after a List): the next listing is
	// compared with it (quick).
	names []string
	// order is the records' keys, sorted, as the last snapshot had them.
	order []string
}

// snapshot is the records sorted by key, in a slice of its own.
func (st *leanState) snapshot() []*Pair {
	snap := make([]*Pair, 0, len(st.held))
	if len(st.order) == len(st.held) {
		// The same number of keys, each held: the same keys.
		for _, k := range st.order {
			p, ok := st.held[k]
			if !ok {
				break
			}
			snap = append(snap, p)
		}
		if len(snap) == len(st.held) {
			return snap
		}
		snap = snap[:0]
	}
	st.order = slices.Sorted(maps.Keys(st.held))
	for _, k := range st.order {
		snap = append(snap, st.held[k])
	}
	return snap
}

// stampSeen is a record's stamp as a lean watch last saw it.
type stampSeen struct {
	nonce string
	// trusted: the record's changes come with a new stamp (its stamp was
	// written with or after its last change), so an unchanged stamp
	// means an unchanged record.
	trusted bool
}

// bytes is the size of the records' values.
func (st *leanState) bytes() int {
	n := 0
	for _, p := range st.held {
		n += len(p.Value)
	}
	return n
}

// set makes the state the pairs ps (a List of the prefix, stamps
// included) and says whether that changed the records. A record's stamp
// is trusted when it is its only stamp and was written with the record's
// last change or after it.
func (st *leanState) set(ps []*Pair) bool {
	m := make(map[string]*Pair, len(ps))
	stamps := map[string][]*Pair{}
	for _, p := range ps {
		if rec, _, ok := ParseStamp(st.prefix, p.Key); ok {
			if rec != "" {
				stamps[rec] = append(stamps[rec], p)
			}
			continue
		}
		m[p.Key] = p
	}
	same := st.held != nil && len(st.held) == len(m)
	if same {
		for k, p := range m {
			o, ok := st.held[k]
			if same = ok && o.ModifyIndex == p.ModifyIndex && o.Session == p.Session && bytes.Equal(o.Value, p.Value); !same {
				break
			}
		}
	}
	st.held, st.names = m, nil
	st.stamps = make(map[string]stampSeen, len(m))
	for k, p := range m {
		if ss := stamps[k]; len(ss) == 1 {
			_, nonce, _ := ParseStamp(st.prefix, ss[0].Key)
			st.stamps[k] = stampSeen{nonce: nonce, trusted: ss[0].ModifyIndex >= p.ModifyIndex}
		}
	}
	return !same
}

// leanRefresh brings the state in line with names, the prefix's keys as
// the last listing gave them (full keys): a List when relist or when many
// changed, else reads of the records whose stamps changed and of new
// ones, after a check of those the stamps cannot vouch for (every record
// when nothing in the listing explains its wake). changed says whether
// the records changed.
func (c *Consul) leanRefresh(ctx context.Context, st *leanState, names []string, at uint64, relist bool) (changed bool, err error) {
	list := func() (bool, error) {
		ps, err := c.List(ctx, st.prefix)
		if err != nil {
			return false, err
		}
		return st.set(ps), nil
	}
	if relist || st.held == nil {
		return list()
	}
	if !slices.IsSorted(names) {
		slices.Sort(names)
	}
	if read, fresh, ok := st.quick(c.prefix, names); ok {
		// Only stamps changed, each of a record the stamps vouch for.
		if changed, err = c.leanRead(ctx, st, read, fresh, at); err == nil {
			st.names = names
		}
		return changed, err
	}
	st.names = nil // until this refresh succeeds
	listed := make(map[string]bool, len(names))
	stampsOf := map[string][]string{} // record → the nonces listed
	var read []string
	for _, n := range names {
		if !strings.HasPrefix(n, c.prefix) || n == c.prefix {
			continue
		}
		k := strings.TrimPrefix(n, c.prefix)
		if rec, nonce, ok := ParseStamp(st.prefix, k); ok {
			if rec != "" {
				stampsOf[rec] = append(stampsOf[rec], nonce)
			}
			continue
		}
		listed[k] = true
		if _, ok := st.held[k]; !ok {
			read = append(read, k)
		}
	}
	explained := len(read) > 0
	for k := range st.held {
		if !listed[k] {
			delete(st.held, k)
			delete(st.stamps, k)
			changed, explained = true, true
		}
	}
	fresh := map[string]string{} // records read for a new stamp → its nonce
	for _, k := range read {
		if ns := stampsOf[k]; len(ns) == 1 {
			fresh[k] = ns[0]
		}
	}
	suspect := map[string]uint64{} // records to check
	for k, p := range st.held {
		seen, has := st.stamps[k]
		ns := stampsOf[k]
		switch {
		case len(ns) == 1 && (!has || ns[0] != seen.nonce):
			read = append(read, k)
			fresh[k] = ns[0]
			explained = true
		case has && seen.trusted && len(ns) == 1:
			// The same stamp: the record did not change.
		default:
			if has && len(ns) != 1 {
				delete(st.stamps, k) // its stamp went: vouches no more
			}
			suspect[k] = p.ModifyIndex
		}
	}
	if !explained {
		// The index moved and no name says why: a write without a stamp
		// (an older release's), of a record the stamps vouched for.
		for k, p := range st.held {
			suspect[k] = p.ModifyIndex
		}
	}
	if len(read) > leanFetchMost {
		return list()
	}
	if len(suspect) > 0 {
		moved, err := c.Changed(ctx, suspect)
		if err != nil {
			return false, err
		}
		for _, k := range moved {
			if seen, ok := st.stamps[k]; ok && seen.trusted {
				// It changed without a new stamp: a writer that does
				// not stamp (a downgraded host). Checked from now on,
				// until a new stamp comes.
				st.stamps[k] = stampSeen{nonce: seen.nonce}
			}
		}
		read = append(read, moved...)
	}
	if len(read) > leanFetchMost {
		return list()
	}
	moved, err := c.leanRead(ctx, st, read, fresh, at)
	if err != nil {
		return false, err
	}
	st.names = names
	return changed || moved, nil
}

// quick compares names, a sorted key listing, with the last one the state
// holds: when they differ only by stamps replaced, one new stamp for each
// of at most leanFetchMost records the stamps vouch for, every record
// held is vouched for by its stamp, it returns the records to read and
// their new stamps' nonces. ok false: leanRefresh's full comparison
// decides (a record or a name came or went, a record is not vouched for,
// the listing moved without a stamp changing, many records changed). It
// saves that comparison's maps at every change.
func (st *leanState) quick(full string, names []string) (read []string, fresh map[string]string, ok bool) {
	if st.names == nil || len(st.stamps) != len(st.held) {
		return nil, nil, false
	}
	for _, s := range st.stamps {
		if !s.trusted {
			return nil, nil, false
		}
	}
	stampOf := func(n string) (rec, nonce string, ok bool) {
		k, ok := strings.CutPrefix(n, full)
		if !ok {
			return "", "", false
		}
		rec, nonce, ok = ParseStamp(st.prefix, k)
		if _, held := st.held[rec]; !ok || !held {
			return "", "", false
		}
		return rec, nonce, true
	}
	old := st.names
	var gone []string // the records whose stamps went
	fresh = map[string]string{}
	for i, j := 0, 0; i < len(old) || j < len(names); {
		switch {
		case j < len(names) && (i == len(old) || names[j] < old[i]):
			rec, nonce, ok := stampOf(names[j])
			if _, twice := fresh[rec]; !ok || twice {
				return nil, nil, false
			}
			fresh[rec] = nonce
			j++
		case i < len(old) && (j == len(names) || old[i] < names[j]):
			rec, nonce, ok := stampOf(old[i])
			if !ok || st.stamps[rec].nonce != nonce {
				return nil, nil, false
			}
			gone = append(gone, rec)
			i++
		default:
			i++
			j++
		}
	}
	// Each stamp gone was its record's only one (the nonce held), so
	// the records in gone are distinct: each must have a new stamp, and
	// each new stamp must have replaced its record's old one.
	if len(fresh) == 0 || len(fresh) != len(gone) || len(fresh) > leanFetchMost {
		return nil, nil, false
	}
	for _, rec := range gone {
		if _, ok := fresh[rec]; !ok {
			return nil, nil, false
		}
	}
	return gone, fresh, true
}

// leanRead reads the records read into the state, giving those in fresh
// their new stamp, trusted; changed says whether the records changed.
func (c *Consul) leanRead(ctx context.Context, st *leanState, read []string, fresh map[string]string, at uint64) (changed bool, err error) {
	for _, k := range read {
		p, err := c.getSince(ctx, k, at)
		switch {
		case errors.Is(err, ErrNotFound):
			if _, ok := st.held[k]; ok {
				delete(st.held, k)
				changed = true
			}
			delete(st.stamps, k)
		case err != nil:
			return false, err
		default:
			if o, ok := st.held[k]; !ok || o.ModifyIndex != p.ModifyIndex || o.Session != p.Session || !bytes.Equal(o.Value, p.Value) {
				// (Not so when an earlier read got this version: a
				// change after the listing is read before its wake.)
				st.held[k] = p
				changed = true
			}
			if nonce, ok := fresh[k]; ok {
				st.stamps[k] = stampSeen{nonce: nonce, trusted: true}
			}
		}
	}
	return changed, nil
}

// Changed returns the keys of known whose modify index is no longer the
// one given (or that no longer exist), from read-only transactions of
// check-index operations (MaxTxnOps at a time): Consul answers a failed
// check for every operation that failed, so the answer is as small as
// the change.
func (c *Consul) Changed(ctx context.Context, known map[string]uint64) ([]string, error) {
	keys := make([]string, 0, len(known))
	for k := range known {
		if err := checkKey(k); err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out []string
	for len(keys) > 0 {
		chunk := keys[:min(len(keys), MaxTxnOps)]
		keys = keys[len(chunk):]
		ops := make(api.KVTxnOps, len(chunk))
		for i, k := range chunk {
			ops[i] = &api.KVTxnOp{Verb: api.KVCheckIndex, Key: c.prefix + k, Index: known[k]}
		}
		name := fmt.Sprintf("%d checks, first %q", len(chunk), c.prefix+chunk[0])
		rctx, cancel, st := c.request(ctx, c.timeout)
		ok, resp, _, err := c.kv.Txn(ops, (&api.QueryOptions{RequireConsistent: true}).WithContext(rctx))
		cancel()
		if err != nil {
			return nil, c.fail(ctx, st, "txn", name, err)
		}
		if ok {
			continue
		}
		what := txnErrors(resp)
		if err := c.txnDenied(name, what); err != nil {
			return nil, err
		}
		if resp == nil || len(resp.Errors) == 0 {
			return nil, fmt.Errorf("consul txn (%s) at %s: %w: failed without naming an operation", name, c.addr, ErrUnavailable)
		}
		for _, e := range resp.Errors {
			if e.OpIndex < 0 || e.OpIndex >= len(chunk) {
				return nil, fmt.Errorf("consul txn (%s) at %s: %w: error for operation %d of %d", name, c.addr, ErrUnavailable, e.OpIndex, len(chunk))
			}
			out = append(out, chunk[e.OpIndex])
		}
	}
	return out, nil
}
