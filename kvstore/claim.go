package kvstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// Defaults of ClaimConfig.
const (
	// DefaultClaimTTL is the TTL of the claim's health check: a holder
	// that stops passing it (every TTL/6, at its agent) loses the key
	// TTL after its last pass, when the agent marks the check critical
	// and the servers invalidate the session. 20 s is what a session
	// with Consul's least TTL, 10 s renewed every 3.3 s, tolerated: the
	// servers end one twice its TTL after its last renewal. A holder
	// gets as long as before to pass again on an overloaded agent, and
	// is taken for dead as soon as before.
	DefaultClaimTTL = 20 * time.Second
	// claimPassesPerTTL: the check is passed every TTL/6 (3.3 s).
	claimPassesPerTTL = 6
	// claimDeregisterAfter: an agent that outlives the holder removes the
	// holder's service and check this long after the check went critical
	// (a restarted holder registers them again).
	claimDeregisterAfter = time.Hour
	// claimServiceName is the agent service a claim's check belongs to,
	// unless ClaimConfig.ServiceName names another.
	claimServiceName = "consul-overlay"
	// claimCheckOutput is what every pass writes: the same output each
	// time, so a pass changes nothing the agent would send to the servers.
	claimCheckOutput = "alive: holds its key in Consul KV"
	// claimLockDelay is the session's lock-delay. Zero would be Consul's
	// default of 15 s, during which a restarted host could not take its
	// own key back; 1 ms is as good as none.
	claimLockDelay = time.Millisecond
	// claimTouchesPerTTL: while the claim holds no session it writes its
	// key anew (touch) every TTL/2 (10 s), three times within the least
	// grace period a reaper gives a host whose key has no session (30 s).
	claimTouchesPerTTL = 2
	// claimRetryMax bounds the backoff of re-acquiring a lost claim.
	claimRetryMax = 2 * time.Second
)

// ErrHeld: Claim found the key held by another live session. The error is
// a *HeldError carrying the holder's value.
var ErrHeld = errors.New("held by another live session")

// HeldError is Claim's refusal: Key is held by Session, whose value is
// Value (what the holder wrote, so the caller can name it).
type HeldError struct {
	Key     string // full key, prefix included
	Session string
	Value   []byte
}

func (e *HeldError) Error() string {
	return fmt.Sprintf("consul claim %q: %v (session %s)", e.Key, ErrHeld, e.Session)
}

// Unwrap makes errors.Is(err, ErrHeld) true.
func (e *HeldError) Unwrap() error { return ErrHeld }

// ClaimConfig tunes Claim. Zero values are the defaults named on each field.
type ClaimConfig struct {
	// Name of the Consul session, shown by `consul operator` and the UI.
	// Zero: "consul-overlay".
	Name string
	// TTL of the claim's health check, at least 10s; the check is passed
	// every TTL/6. Zero: DefaultClaimTTL.
	TTL time.Duration
	// ServiceID names the agent service whose TTL check the session is
	// bound to; unique per holder on one agent. Zero: derived from the
	// key ("consul-overlay-claim-" and a hash of it).
	ServiceID string
	// ServiceName is that service's name. Zero: "consul-overlay".
	ServiceName string
	// ServiceMeta is that service's metadata.
	ServiceMeta map[string]string
	// Takeover is asked, with the holder's value, when the key is held by
	// another session: true destroys that session and takes the key (the
	// caller has proved the holder is a dead incarnation of itself). Nil:
	// never take over.
	Takeover func(holder []byte) bool
	// OnLost is called (from the claim's goroutine) when the session was
	// invalidated or the key is no longer held by it; the claim then
	// re-acquires the key until it succeeds or is released. OnRegained is
	// called when it holds the key again, OnCheckError when a pass of
	// the check, a look at the session or a re-acquire failed without the
	// session being known lost (an outage, a refusal). Nil: not called.
	OnLost       func(err error)
	OnRegained   func(session string)
	OnCheckError func(err error)
}

// Claim is a key held by a Consul session for the life of the claim. The
// session has no TTL: it is bound to the agent's serfHealth and to a TTL
// check of an agent service that a goroutine passes every TTL/6. A pass
// is served by the agent alone (it tells the servers only when the
// check's status changes), so a live claim costs the servers nothing but
// the blocking read of its key, where a TTL session costs a renewal at the
// servers every 3.3 s. The session ends when the holder stops passing
// (the check goes critical TTL after the last pass), when the agent
// leaves or fails, or when it is destroyed; the claim then creates a new
// one and acquires the key again. Behavior is release: when the holder
// dies, the key stays with its last value and no session, which is how
// other hosts tell a live holder from a dead one.
type Claim struct {
	c    *Consul
	key  string // full key
	rel  string // key without the store's prefix (OwnFenced's operations)
	cfg  ClaimConfig
	stop context.CancelFunc
	done chan struct{}
	// suspect wakes run for a full check (pass, read the session and the key) when
	// the watch of the key saw it without this claim's session.
	suspect chan struct{}

	mu      sync.Mutex // guards session, unheld, value and beforeWrite
	session string     // "" while lost
	// unheld is a session a fenced write (OwnFenced) found no longer
	// holding the key, while session may still name it: run has not seen
	// the loss yet (its watch of the key retries with a backoff).
	unheld string
	value  []byte
	// beforeWrite, if set (tests), runs in acquire between its read of
	// value and its write of the key.
	beforeWrite func()
}

// Claim registers (or registers again) the agent service cfg.ServiceID
// with a passing TTL check, creates a session bound to that check and the
// agent's serfHealth, and acquires key with value. If another live session
// holds the key and cfg.Takeover does not allow taking it, Claim fails with
// a *HeldError (errors.Is ErrHeld) and changes nothing in KV; the service
// stays registered (it may be the holder's own, on a shared agent). A token
// without service, session or key write permission fails with
// ErrPermissionDenied.
func (c *Consul) Claim(ctx context.Context, key string, value []byte, cfg ClaimConfig) (*Claim, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	if cfg.Name == "" {
		cfg.Name = "consul-overlay"
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultClaimTTL
	}
	if cfg.TTL < 10*time.Second {
		return nil, fmt.Errorf("consul claim %q: check ttl %s: want at least 10s", c.prefix+key, cfg.TTL)
	}
	if cfg.ServiceName == "" {
		cfg.ServiceName = claimServiceName
	}
	if cfg.ServiceID == "" {
		sum := sha256.Sum256([]byte(c.prefix + key))
		cfg.ServiceID = "consul-overlay-claim-" + hex.EncodeToString(sum[:8])
	}
	cl := &Claim{c: c, key: c.prefix + key, rel: key, cfg: cfg, value: bytes.Clone(value), done: make(chan struct{}), suspect: make(chan struct{}, 1)}
	id, _, err := cl.acquire(ctx)
	if err != nil {
		return nil, err
	}
	cl.session = id
	rctx, cancel := context.WithCancel(c.ctx)
	cl.stop = cancel
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		cl.watch(rctx)
	}()
	go func() {
		defer close(cl.done)
		cl.run(rctx)
		<-watched
	}()
	return cl, nil
}

// Session returns the ID of the session holding the key, "" while it is
// lost.
func (cl *Claim) Session() string {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.session
}

// Update rewrites the claimed key's value through the holding session (it
// is also the value any re-acquire writes).
func (cl *Claim) Update(ctx context.Context, value []byte) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	cl.value = bytes.Clone(value)
	if cl.session == "" {
		return nil // the re-acquire writes it
	}
	ok, err := cl.c.acquireKey(ctx, cl.key, cl.value, cl.session)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("consul claim update %q: session %s no longer holds it", cl.key, cl.session)
	}
	return nil
}

// Release stops passing the check, releases the key (keeping its value,
// with no session), destroys the session and deregisters the claim's
// service from the agent. Calling it twice is harmless.
func (cl *Claim) Release(ctx context.Context) error {
	cl.stop()
	<-cl.done
	cl.mu.Lock()
	defer cl.mu.Unlock()
	id := cl.session
	cl.session = ""
	if id == "" {
		return nil
	}
	var errs []error
	rctx, cancel, st := cl.c.request(ctx, cl.c.timeout)
	defer cancel()
	if _, _, err := cl.c.kv.Release(&api.KVPair{Key: cl.key, Value: cl.value, Session: id}, (&api.WriteOptions{}).WithContext(rctx)); err != nil {
		errs = append(errs, cl.c.fail(ctx, st, "kv release", cl.key, err))
	}
	if err := cl.c.destroySession(ctx, id); err != nil {
		errs = append(errs, err)
	}
	if err := cl.deregister(ctx); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// acquire creates a session and acquires the key with it, and returns the
// session and the value it wrote; on failure the session is destroyed.
func (cl *Claim) acquire(ctx context.Context) (_ string, written []byte, retErr error) {
	c := cl.c
	if err := cl.register(ctx); err != nil {
		return "", nil, err
	}
	// Registered again, a check keeps the status it had (critical, when
	// this holder's previous incarnation died): pass it.
	if err := cl.pass(ctx); err != nil {
		return "", nil, err
	}
	id, err := cl.createSession(ctx)
	if err != nil {
		return "", nil, err
	}
	defer func() {
		if retErr != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.timeout)
			defer cancel()
			if err := c.destroySession(dctx, id); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
	}()
	// A few rounds: a key whose holder just released it can still be in
	// its lock-delay, and a taken-over session needs one more try.
	for try := 0; ; try++ {
		tookOver := false
		cl.mu.Lock()
		value, hook := cl.value, cl.beforeWrite
		cl.mu.Unlock()
		if hook != nil {
			hook()
		}
		ok, err := c.acquireKey(ctx, cl.key, value, id)
		if err != nil {
			return "", nil, err
		}
		if ok {
			return id, value, nil
		}
		holder, err := c.holder(ctx, cl.key)
		if err != nil {
			return "", nil, err
		}
		if holder != nil && holder.Session != "" && holder.Session != id {
			if cl.cfg.Takeover == nil || !cl.cfg.Takeover(holder.Value) {
				return "", nil, &HeldError{Key: cl.key, Session: holder.Session, Value: holder.Value}
			}
			if err := c.destroySession(ctx, holder.Session); err != nil {
				return "", nil, fmt.Errorf("consul claim %q: take over from stale session %s: %w", cl.key, holder.Session, err)
			}
			tookOver = true
		}
		if try >= 10 {
			return "", nil, fmt.Errorf("consul claim %q: acquire refused %d times (lock-delay of a previous holder?)", cl.key, try+1)
		}
		// After a take-over only our own sessions' lock-delay stands in
		// the way (claimLockDelay): try again at once (issue 16: the
		// 100 ms pause was a tenth of a restart).
		pause := 100 * time.Millisecond
		if tookOver {
			pause = 2 * claimLockDelay
		}
		if !sleepCtx(ctx, pause) {
			return "", nil, fmt.Errorf("consul claim %q: %w", cl.key, ctx.Err())
		}
	}
}

// run passes the check every TTL/6; when the watch of the key (watch) saw
// it not held by the session, or a pass failed, and a look at the session
// and the key (check) confirms the session or the key is lost, it
// re-acquires.
//
// A pass goes to the agent alone and reads nothing at the servers: a
// session that ended (invalidated, destroyed, taken over) releases the
// key, and a key deleted or released under a live session changes it;
// the watch sees both, with a blocking query that costs the servers
// nothing while the key does not change.
func (cl *Claim) run(ctx context.Context) {
	// Passes keep their pace from the start of the previous one: a pass
	// the agent answers late (up to the request timeout) does not push
	// the next one back.
	every := cl.cfg.TTL / claimPassesPerTTL
	backoff := watchBackoffMin
	next := time.Now().Add(every)
	var touched time.Time // last touch while lost; zero: touch at once
	for {
		id := cl.Session()
		wait := time.Until(next)
		if id == "" {
			wait = backoff
		}
		read := false
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		case <-cl.suspect:
			t.Stop()
			read = true
		}
		if id == "" {
			if touched.IsZero() || time.Since(touched) >= cl.cfg.TTL/claimTouchesPerTTL {
				// A failed touch is tried again at the next round (the
				// backoff, at most claimRetryMax): a host whose writes
				// reach the store again writes its record within seconds.
				if err := cl.touch(ctx); err != nil {
					if ctx.Err() == nil && cl.cfg.OnCheckError != nil {
						cl.cfg.OnCheckError(err)
					}
				} else {
					touched = time.Now()
				}
			}
			nid, written, err := cl.acquire(ctx)
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				backoff = min(2*backoff, claimRetryMax)
				if cl.cfg.OnCheckError != nil {
					cl.cfg.OnCheckError(err)
				}
				continue
			}
			backoff = watchBackoffMin
			touched = time.Time{}
			next = time.Now().Add(every)
			cl.mu.Lock()
			cl.session = nid
			var uerr error
			if !bytes.Equal(written, cl.value) {
				// An Update during the re-acquire (it only kept its
				// value, as no session held the key): write it now.
				ok, err := cl.c.acquireKey(ctx, cl.key, cl.value, nid)
				switch {
				case err != nil:
					uerr = fmt.Errorf("consul claim %q: write the value updated during the re-acquire: %w", cl.key, err)
				case !ok:
					uerr = fmt.Errorf("consul claim %q: write the value updated during the re-acquire: session %s no longer holds it", cl.key, nid)
				}
			}
			cl.mu.Unlock()
			if uerr != nil && cl.cfg.OnCheckError != nil {
				cl.cfg.OnCheckError(uerr)
			}
			if cl.cfg.OnRegained != nil {
				cl.cfg.OnRegained(nid)
			}
			continue
		}
		next = time.Now().Add(every)
		lost, err := cl.check(ctx, id, read)
		if ctx.Err() != nil {
			return
		}
		switch {
		case lost != nil:
			cl.mu.Lock()
			if cl.session == id {
				cl.session = ""
			}
			cl.mu.Unlock()
			// Best effort: a session that still exists but no longer
			// holds the key is of no use.
			_ = cl.c.destroySession(ctx, id)
			if cl.cfg.OnLost != nil {
				cl.cfg.OnLost(lost)
			}
		case err != nil:
			if cl.cfg.OnCheckError != nil {
				cl.cfg.OnCheckError(err)
			}
		}
	}
}

// Touch writes the claim's value to its key anew, so that the key's
// ModifyIndex changes: through the claim's session while it holds one,
// else without a session as the claim does on its own while it holds none
// (see touch). A reaper fences every write of a reap on the host record's
// ModifyIndex: a host that is about to write back what a reap may be
// removing right now (its re-assertion) touches its record first, and a
// reap judged on the record as it was stops before its next write.
func (cl *Claim) Touch(ctx context.Context) error {
	cl.mu.Lock()
	id := cl.session
	if id != "" {
		// As Update does, under cl.mu: a value it sets meanwhile is not
		// overwritten with an older one.
		ok, err := cl.c.acquireKeyFlags(ctx, cl.key, cl.value, id, touchFlags())
		cl.mu.Unlock()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		// Lost meanwhile: the claim notices and takes it again.
	} else {
		cl.mu.Unlock()
	}
	return cl.touch(ctx)
}

// OwnFenced returns s with every write made conditional on this host's
// record, the key cl holds: each write goes in one transaction whose
// first operation is the fence, so it is applied only with it. s must use
// the prefix of the store cl was claimed on; reads go to s unchanged.
//
// While the claim holds its session, the fence checks that the session
// still holds the key (check-session): no extra request, the write is one
// transaction as before. While it holds none (lost and not taken again, or
// released), the fence writes the key anew, without a session, as touch
// does (a compare-and-set on the key as read, the time in its flags): one
// read more per write, only then.
//
// A reaper judges a host on its record without a session and fences every
// write of the reap on the record's ModifyIndex (package reaper). A write
// of the host applied with its fence therefore either finds the record
// held by the session (written since any judgement made on it without
// one: a reap under way is already stopped), or writes the record itself,
// in the same transaction, which stops the reap before its next write. So
// nothing the host writes once it reaches the store again (an address
// for `docker run`) can be freed by a reap of it still under way, whatever
// the claim knew: its view of its session may be stale for seconds after
// a reconnection (run learns of a loss from its watch, which retries with
// a backoff), and a write refused because the session no longer holds the
// key marks that session as not holding it (the claim also wakes to take
// the key again) and is sent again with a touch as its fence. A write that
// fails its own condition while the fence held fails as on s.
func OwnFenced(s Store, cl *Claim) Store { return &fenced{Store: s, src: ownFence{cl}} }

// ownFence is OwnFenced's fence source.
type ownFence struct{ cl *Claim }

func (o ownFence) op(ctx context.Context) (Op, error) {
	cl := o.cl
	deadline := time.Now().Add(cl.c.timeout)
	for pause := 10 * time.Millisecond; ; pause = min(2*pause, claimRetryMax) {
		cl.mu.Lock()
		id, unheld, value := cl.session, cl.unheld, cl.value
		cl.mu.Unlock()
		if id != "" && id != unheld {
			return Op{Verb: OpCheckSession, Key: cl.rel, Session: id}, nil
		}
		p, err := cl.c.holder(ctx, cl.key)
		if err != nil {
			return Op{}, err
		}
		if p != nil && p.Session != "" && p.Session == cl.Session() {
			return Op{Verb: OpCheckSession, Key: cl.rel, Session: p.Session}, nil
		}
		if op, ok := cl.touchOp(p, value); ok {
			// Without a session, or removed (the last step of a reap):
			// written again.
			return op, nil
		}
		// Held by a session the claim does not know yet: its re-acquire
		// has not returned (or another instance holds the key, and the
		// claim refuses it).
		if time.Now().After(deadline) {
			return Op{}, fmt.Errorf("consul claim %q: %w: held by session %s, not this claim's", cl.key, ErrUnavailable, p.Session)
		}
		if !sleepCtx(ctx, pause) {
			return Op{}, fmt.Errorf("consul claim %q: %w", cl.key, ctx.Err())
		}
	}
}

func (o ownFence) refused(ctx context.Context, _ Store, f Op, err error) (bool, error) {
	cl := o.cl
	p, herr := cl.c.holder(ctx, cl.key)
	if herr != nil {
		return false, errors.Join(err, herr)
	}
	if f.Verb == OpCheckSession {
		if p != nil && p.Session == f.Session {
			return false, err // the fence held
		}
		cl.mu.Lock()
		if cl.session == f.Session {
			cl.unheld = f.Session
		}
		cl.mu.Unlock()
		select {
		case cl.suspect <- struct{}{}: // run confirms the loss and takes the key again
		default:
		}
		return true, nil
	}
	if (p == nil && f.Index == 0) || (p != nil && p.Session == "" && p.ModifyIndex == f.Index) {
		return false, err // the fence held: the touch was rolled back with the rest
	}
	return true, nil
}

// touch writes the claim's value to the key anew, without a session,
// while the claim holds none: a compare-and-set on the key as read (or a
// create, when it is missing), and nothing when another session holds it.
// A holder whose session ended and cannot start a new one may still reach
// the store: its agent cut off from the servers' gossip (serfHealth
// critical at the servers: no session bound to it is granted) while its
// RPC goes through, so its plugin goes on allocating addresses and writing
// records. Readers take a key without a session for a dead holder's, and
// the key's ModifyIndex changing for a holder that is back (reaper: the
// grace period counts again, and a reap in progress stops at its next
// write), so a holder that can still write is never reaped while it runs.
// A holder cut off from the store cannot touch, and is reaped as before.
func (cl *Claim) touch(ctx context.Context) error {
	c := cl.c
	p, err := c.holder(ctx, cl.key)
	if err != nil {
		return err
	}
	cl.mu.Lock()
	value := cl.value
	cl.mu.Unlock()
	op, ok := cl.touchOp(p, value)
	if !ok {
		return nil // another session's (a takeover refused): not ours to write
	}
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	// Consul applies a write that changes nothing of the entry as a
	// no-op, its ModifyIndex unchanged: only the first touch after the
	// release would count. The flags (which nothing else reads) carry the
	// time of the touch, so each one changes the entry. A CAS lost to
	// another write leaves the key changed all the same.
	if _, _, err := c.kv.CAS(&api.KVPair{Key: cl.key, Value: op.Value, Flags: op.Flags, ModifyIndex: op.Index}, (&api.WriteOptions{}).WithContext(rctx)); err != nil {
		return c.fail(ctx, st, "kv cas (touch without a session)", cl.key, err)
	}
	return nil
}

// touchOp is the write of a touch of the key whose holder reads p (nil:
// the key is missing) with the claim's value: a compare-and-set at p's
// index, or a create; not ok when another session holds the key. touch
// sends it alone, ownFence as the fence of a write.
func (cl *Claim) touchOp(p *api.KVPair, value []byte) (op Op, ok bool) {
	op = Op{Verb: OpCAS, Key: cl.rel, Value: value, Flags: touchFlags()}
	if p != nil {
		if p.Session != "" {
			return Op{}, false
		}
		op.Index = p.ModifyIndex
	}
	return op, true
}

// touchFlags is the flags a touch writes: the time, never 0 (no flags).
func touchFlags() uint64 { return uint64(time.Now().UnixNano()) | 1 }

// watch follows the key with blocking reads and wakes run (suspect) when
// it shows the key missing or held by another session than the claim's
// (or none) while the claim believes it holds it. run confirms with a
// fresh read of the session and the key before it acts: a snapshot can be
// older than a re-acquire.
func (cl *Claim) watch(ctx context.Context) {
	var p *api.KVPair
	query := func(q *api.QueryOptions) (meta *api.QueryMeta, err error) {
		p, meta, err = cl.c.kv.Get(cl.key, q)
		return meta, err
	}
	cl.c.follow(onOwnConn(ctx), query, func(uint64) bool {
		if id := cl.Session(); id != "" && (p == nil || p.Session != id) {
			select {
			case cl.suspect <- struct{}{}:
			default:
			}
		}
		// A missing key answers a blocking read on any write of the
		// store: until run has taken it again, do not spin.
		return p != nil || sleepCtx(ctx, watchEmptyPace)
	})
}

// check passes the claim's check and, if read or the pass failed, reads
// the session and the key: lost is non-nil when the session is gone or no
// longer holds the key; err is an outage, or a pass the agent refused
// while the session lives on.
func (cl *Claim) check(ctx context.Context, id string, read bool) (lost, err error) {
	c := cl.c
	passErr := cl.pass(ctx)
	if passErr == nil && !read {
		return nil, nil
	}
	// A refused pass: the agent is unreachable, or it no longer has the
	// check (restarted without its state, or it removed the check), in
	// which case the servers end the session.
	rctx, cancel, st := c.request(ctx, c.timeout)
	entry, _, err := c.client.Session().Info(id, (&api.QueryOptions{}).WithContext(rctx))
	cancel()
	if err != nil {
		return nil, errors.Join(passErr, c.fail(ctx, st, "session info", id, err))
	}
	if entry == nil {
		return fmt.Errorf("consul claim %q: session %s invalidated", cl.key, id), nil
	}
	if passErr != nil {
		return nil, passErr
	}
	p, err := c.holder(ctx, cl.key)
	if err != nil {
		return nil, err
	}
	if p == nil || p.Session != id {
		holder := ""
		if p != nil {
			holder = p.Session
		}
		return fmt.Errorf("consul claim %q: no longer held by session %s (holder %q)", cl.key, id, holder), nil
	}
	return nil, nil
}

// holder reads key with its session; nil when the key does not exist.
func (c *Consul) holder(ctx context.Context, full string) (*api.KVPair, error) {
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	p, _, err := c.kv.Get(full, (&api.QueryOptions{}).WithContext(rctx))
	if err != nil {
		return nil, c.fail(ctx, st, "kv get", full, err)
	}
	return p, nil
}

func (c *Consul) acquireKey(ctx context.Context, full string, value []byte, session string) (bool, error) {
	return c.acquireKeyFlags(ctx, full, value, session, 0)
}

// acquireKeyFlags is acquireKey writing flags too (see touchFlags).
func (c *Consul) acquireKeyFlags(ctx context.Context, full string, value []byte, session string, flags uint64) (bool, error) {
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	ok, _, err := c.kv.Acquire(&api.KVPair{Key: full, Value: value, Flags: flags, Session: session}, (&api.WriteOptions{}).WithContext(rctx))
	if err != nil {
		return false, c.fail(ctx, st, "kv acquire", full, err)
	}
	return ok, nil
}

// register registers the claim's service with its TTL check (passing
// when new). Registering it again replaces the definition.
func (cl *Claim) register(ctx context.Context) error {
	c := cl.c
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	err := c.client.Agent().ServiceRegisterOpts(&api.AgentServiceRegistration{
		ID:   cl.cfg.ServiceID,
		Name: cl.cfg.ServiceName,
		Meta: cl.cfg.ServiceMeta,
		Check: &api.AgentServiceCheck{
			CheckID:                        cl.cfg.ServiceID,
			Name:                           "consul-overlay claim of " + cl.key,
			TTL:                            cl.cfg.TTL.String(),
			Status:                         api.HealthPassing,
			Notes:                          "passed every " + (cl.cfg.TTL / claimPassesPerTTL).String() + " by the holder of " + cl.key + "; its Consul session, and so its hold of the key, ends when this check goes critical",
			DeregisterCriticalServiceAfter: claimDeregisterAfter.String(),
		},
	}, api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(rctx))
	if err != nil {
		return c.fail(ctx, st, "agent service register", cl.cfg.ServiceID, err)
	}
	return nil
}

// pass passes the claim's check at the agent.
func (cl *Claim) pass(ctx context.Context) error {
	c := cl.c
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	if err := c.client.Agent().UpdateTTLOpts(cl.cfg.ServiceID, claimCheckOutput, api.HealthPassing, (&api.QueryOptions{}).WithContext(rctx)); err != nil {
		return c.fail(ctx, st, "agent check pass", cl.cfg.ServiceID, err)
	}
	return nil
}

// deregister removes the claim's service and its check from the agent.
func (cl *Claim) deregister(ctx context.Context) error {
	c := cl.c
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	if err := c.client.Agent().ServiceDeregisterOpts(cl.cfg.ServiceID, (&api.QueryOptions{}).WithContext(rctx)); err != nil {
		return c.fail(ctx, st, "agent service deregister", cl.cfg.ServiceID, err)
	}
	return nil
}

// createSession creates the claim's session, bound to the agent's
// serfHealth and the claim's check. The agent sends a registration to the
// servers right after answering it: until they have it, a session on the
// check is refused ("Missing check", or the check still critical there
// when it was registered again after a holder died), and tried again.
func (cl *Claim) createSession(ctx context.Context) (string, error) {
	c := cl.c
	pause := 5 * time.Millisecond
	deadline := time.Now().Add(c.timeout)
	for {
		rctx, cancel, st := c.request(ctx, c.timeout)
		id, _, err := c.client.Session().Create(&api.SessionEntry{
			Name:          cl.cfg.Name,
			Behavior:      api.SessionBehaviorRelease,
			LockDelay:     claimLockDelay,
			NodeChecks:    []string{"serfHealth"},
			ServiceChecks: []api.ServiceCheck{{ID: cl.cfg.ServiceID}},
		}, (&api.WriteOptions{}).WithContext(rctx))
		cancel()
		if err == nil {
			return id, nil
		}
		msg := err.Error()
		if !(strings.Contains(msg, "Missing check") || strings.Contains(msg, "in critical state")) || time.Now().After(deadline) {
			return "", c.fail(ctx, st, "session create", cl.cfg.Name, err)
		}
		if !sleepCtx(ctx, pause) {
			return "", fmt.Errorf("consul claim %q: %w", cl.key, ctx.Err())
		}
		pause = min(2*pause, 200*time.Millisecond)
	}
}

func (c *Consul) destroySession(ctx context.Context, id string) error {
	rctx, cancel, st := c.request(ctx, c.timeout)
	defer cancel()
	if _, err := c.client.Session().Destroy(id, (&api.WriteOptions{}).WithContext(rctx)); err != nil {
		return c.fail(ctx, st, "session destroy", id, err)
	}
	return nil
}
