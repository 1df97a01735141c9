package kvstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Defaults of EmbeddedConfig.
const (
	DefaultEmbeddedPath = "/var/lib/consul-overlay/state.db"
	DefaultOpenTimeout  = time.Second
)

// File layout: bucket "kv" maps the full key to an 8-byte big-endian
// ModifyIndex followed by the value; bucket "meta" holds "index", the last
// index handed out (big-endian uint64), and "format".
var (
	bucketKV    = []byte("kv")
	bucketMeta  = []byte("meta")
	metaIndex   = []byte("index")
	metaFormat  = []byte("format")
	formatValue = []byte("1")
)

var _ Store = (*Embedded)(nil)

// EmbeddedConfig says where the embedded store lives.
type EmbeddedConfig struct {
	// Path of the bbolt file. Zero: DefaultEmbeddedPath. A missing
	// directory is created with mode 0700.
	Path string
	// Prefix is prepended to every key, as in ConsulConfig. Zero:
	// DefaultPrefix.
	Prefix string
	// OpenTimeout bounds the wait for the file lock when another process
	// has the file open; then NewEmbedded fails instead of hanging.
	// Zero: DefaultOpenTimeout.
	OpenTimeout time.Duration
}

// Embedded is the Store on a local bbolt file. It is safe for concurrent
// use. Stores opened on the same path in one process share the file (and
// see each other's writes and watches); another process is locked out.
type Embedded struct {
	file   *sharedFile
	prefix string

	// done is closed by Close; it ends every Watch, and wg waits for them.
	// mu orders wg.Add in Watch before Close's wg.Wait.
	closeOnce sync.Once
	mu        sync.Mutex
	done      chan struct{} // closed under mu
	wg        sync.WaitGroup
}

// sharedFile is one open bbolt file and the watchers of every Embedded on it.
type sharedFile struct {
	path string
	db   *bolt.DB
	refs int // guarded by openFiles.mu

	mu       sync.Mutex // guards watchers
	watchers map[*embeddedWatcher]struct{}
}

// embeddedWatcher is woken (without blocking the writer; one pending
// signal is enough) when a write touches a key under prefix.
type embeddedWatcher struct {
	prefix string // full key prefix
	wake   chan struct{}
}

// openFiles holds the process's open files by absolute path: bbolt's flock
// would otherwise lock out a second Embedded of this very process.
var openFiles = struct {
	mu sync.Mutex
	m  map[string]*sharedFile
}{m: map[string]*sharedFile{}}

// NewEmbedded opens (creating if needed) the store file.
func NewEmbedded(cfg EmbeddedConfig) (*Embedded, error) {
	if cfg.Path == "" {
		cfg.Path = DefaultEmbeddedPath
	}
	if cfg.OpenTimeout == 0 {
		cfg.OpenTimeout = DefaultOpenTimeout
	}
	prefix, err := normalizePrefix(cfg.Prefix)
	if err != nil {
		return nil, fmt.Errorf("open embedded store %s: %w", cfg.Path, err)
	}
	path, err := filepath.Abs(cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("open embedded store %s: %w", cfg.Path, err)
	}

	openFiles.mu.Lock()
	defer openFiles.mu.Unlock()
	f := openFiles.m[path]
	if f == nil {
		if f, err = openFile(path, cfg.OpenTimeout); err != nil {
			return nil, err
		}
		openFiles.m[path] = f
	}
	f.refs++
	return &Embedded{file: f, prefix: prefix, done: make(chan struct{})}, nil
}

func openFile(path string, timeout time.Duration) (*sharedFile, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open embedded store %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open embedded store %s: file locked by another process for %s: %w", path, timeout, err)
		}
		return nil, fmt.Errorf("open embedded store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(bucketKV); err != nil {
			return err
		}
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		switch v := meta.Get(metaFormat); {
		case v == nil:
			return meta.Put(metaFormat, formatValue)
		case !bytes.Equal(v, formatValue):
			return fmt.Errorf("file format %q, this build reads %q", v, formatValue)
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open embedded store %s: %w", path, err)
	}
	return &sharedFile{path: path, db: db, watchers: map[*embeddedWatcher]struct{}{}}, nil
}

// Path returns the absolute path of the store file.
func (s *Embedded) Path() string { return s.file.path }

// Prefix returns the normalised key prefix.
func (s *Embedded) Prefix() string { return s.prefix }

func (s *Embedded) check(ctx context.Context, op, full string) error {
	select {
	case <-s.done:
		return fmt.Errorf("embedded %s %q: store closed", op, full)
	default:
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("embedded %s %q: %w", op, full, err)
	}
	return nil
}

// Get returns the pair at key, or ErrNotFound.
func (s *Embedded) Get(ctx context.Context, key string) (*Pair, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	full := s.prefix + key
	if err := s.check(ctx, "get", full); err != nil {
		return nil, err
	}
	var p *Pair
	err := s.file.db.View(func(tx *bolt.Tx) error {
		if raw := tx.Bucket(bucketKV).Get([]byte(full)); raw != nil {
			p = decodePair(key, raw)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("embedded get %q in %s: %w", full, s.file.path, err)
	}
	if p == nil {
		return nil, fmt.Errorf("embedded get %q: %w", full, ErrNotFound)
	}
	return p, nil
}

// List returns the pairs under prefix, sorted by key.
func (s *Embedded) List(ctx context.Context, prefix string) ([]*Pair, error) {
	if err := checkListPrefix(prefix); err != nil {
		return nil, err
	}
	full := s.prefix + prefix
	if err := s.check(ctx, "list", full); err != nil {
		return nil, err
	}
	return s.list(full)
}

func (s *Embedded) list(full string) ([]*Pair, error) {
	out := []*Pair{}
	err := s.file.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketKV).Cursor()
		for k, v := c.Seek([]byte(full)); k != nil && bytes.HasPrefix(k, []byte(full)); k, v = c.Next() {
			out = append(out, decodePair(strings.TrimPrefix(string(k), s.prefix), v))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("embedded list %q in %s: %w", full, s.file.path, err)
	}
	return out, nil
}

// Put writes value unconditionally.
func (s *Embedded) Put(ctx context.Context, key string, value []byte) error {
	return s.single(ctx, Op{Verb: OpSet, Key: key, Value: value})
}

// Create writes value only if key does not exist.
func (s *Embedded) Create(ctx context.Context, key string, value []byte) error {
	return s.single(ctx, Op{Verb: OpCreate, Key: key, Value: value})
}

// CAS writes value only if key's ModifyIndex equals index; index 0 means
// "only if absent".
func (s *Embedded) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	return s.single(ctx, Op{Verb: OpCAS, Key: key, Value: value, Index: index})
}

// Delete removes key; a missing key is success.
func (s *Embedded) Delete(ctx context.Context, key string) error {
	return s.single(ctx, Op{Verb: OpDelete, Key: key})
}

// DeleteCAS removes key only if its ModifyIndex equals index; a missing key
// is ErrNotFound.
func (s *Embedded) DeleteCAS(ctx context.Context, key string, index uint64) error {
	if err := checkKey(key); err != nil {
		return err
	}
	full := s.prefix + key
	if err := s.check(ctx, "delete-cas", full); err != nil {
		return err
	}
	return s.update(func(w *writeTx) error {
		if _, ok := w.index(full); !ok {
			return fmt.Errorf("embedded delete-cas %q (index %d): %w", full, index, ErrNotFound)
		}
		return w.apply(Op{Verb: OpDeleteCAS, Index: index}, full)
	})
}

func (s *Embedded) single(ctx context.Context, op Op) error {
	if err := checkKey(op.Key); err != nil {
		return err
	}
	full := s.prefix + op.Key
	if err := s.check(ctx, op.Verb.String(), full); err != nil {
		return err
	}
	return s.update(func(w *writeTx) error { return w.apply(op, full) })
}

// Txn applies ops in one bbolt transaction: all or none. As on Consul,
// every write of the transaction gets the same ModifyIndex and each
// operation sees the effects of those before it; OpDeleteCAS on a missing
// key fails.
func (s *Embedded) Txn(ctx context.Context, ops []Op) error {
	_, err := s.TxnIndex(ctx, ops)
	return err
}

// TxnIndex is Txn that also returns the modify index its writes got (0:
// the transaction wrote nothing).
func (s *Embedded) TxnIndex(ctx context.Context, ops []Op) (uint64, error) {
	if err := checkOps(ops); err != nil {
		return 0, err
	}
	if len(ops) == 0 {
		return 0, nil
	}
	if err := s.check(ctx, "txn", s.prefix+ops[0].Key); err != nil {
		return 0, err
	}
	var index uint64
	err := s.update(func(w *writeTx) error {
		for i, op := range ops {
			if err := w.apply(op, s.prefix+op.Key); err != nil {
				return fmt.Errorf("embedded txn (%d ops): op %d: %w", len(ops), i, err)
			}
		}
		if len(w.touched) > 0 {
			index = w.next
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return index, nil
}

// writeTx is one read-write bbolt transaction; every write in it gets the
// index next.
type writeTx struct {
	kv      *bolt.Bucket
	next    uint64
	touched []string
}

func (w *writeTx) index(full string) (uint64, bool) {
	raw := w.kv.Get([]byte(full))
	if raw == nil {
		return 0, false
	}
	if len(raw) < 8 {
		return 0, true // see decodePair
	}
	return binary.BigEndian.Uint64(raw[:8]), true
}

// apply performs one operation, or returns ErrConflict when its condition
// does not hold.
func (w *writeTx) apply(op Op, full string) error {
	cur, exists := w.index(full)
	conflict := func(why string) error {
		return fmt.Errorf("embedded %v %q: %s: %w", op.Verb, full, why, ErrConflict)
	}
	indexMismatch := func() error {
		if !exists {
			return conflict("key does not exist")
		}
		return conflict(fmt.Sprintf("modify index %d, want %d", cur, op.Index))
	}
	switch op.Verb {
	case OpSet:
		return w.put(full, op.Value)
	case OpCreate:
		if exists {
			return conflict("key exists")
		}
		return w.put(full, op.Value)
	case OpCAS:
		if op.Index == 0 && exists {
			return conflict("key exists")
		}
		if op.Index != 0 && (!exists || cur != op.Index) {
			return indexMismatch()
		}
		return w.put(full, op.Value)
	case OpDelete:
		if !exists {
			return nil
		}
		return w.del(full)
	case OpDeleteCAS:
		if !exists || cur != op.Index {
			return indexMismatch()
		}
		return w.del(full)
	case OpCheckIndex:
		if !exists || cur != op.Index {
			return indexMismatch()
		}
		return nil
	case OpCheckNotExists:
		if exists {
			return conflict("key exists")
		}
		return nil
	case OpCheckSession:
		return conflict("no key is held by a session in the embedded store")
	case OpDeleteTree:
		var keys []string
		c := w.kv.Cursor()
		for k, _ := c.Seek([]byte(full)); k != nil && bytes.HasPrefix(k, []byte(full)); k, _ = c.Next() {
			keys = append(keys, string(k))
		}
		for _, k := range keys {
			if err := w.del(k); err != nil {
				return err
			}
		}
		return nil
	}
	return fmt.Errorf("embedded %v %q: unknown verb", op.Verb, full)
}

// put writes value with the transaction's index. Like Consul, it leaves an
// unchanged value alone, index included.
func (w *writeTx) put(full string, value []byte) error {
	if old := w.kv.Get([]byte(full)); len(old) >= 8 && bytes.Equal(old[8:], value) {
		return nil
	}
	raw := make([]byte, 8+len(value))
	binary.BigEndian.PutUint64(raw, w.next)
	copy(raw[8:], value)
	w.touched = append(w.touched, full)
	return w.kv.Put([]byte(full), raw)
}

func (w *writeTx) del(full string) error {
	w.touched = append(w.touched, full)
	return w.kv.Delete([]byte(full))
}

// update runs fn in a read-write transaction, persists the advanced index
// if fn wrote anything, and wakes the watchers of the keys it touched.
func (s *Embedded) update(fn func(*writeTx) error) error {
	var touched []string
	err := s.file.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		var last uint64
		if raw := meta.Get(metaIndex); len(raw) == 8 {
			last = binary.BigEndian.Uint64(raw)
		}
		w := &writeTx{kv: tx.Bucket(bucketKV), next: last + 1}
		if err := fn(w); err != nil {
			return err
		}
		if len(w.touched) == 0 {
			return nil
		}
		var raw [8]byte
		binary.BigEndian.PutUint64(raw[:], w.next)
		touched = w.touched
		return meta.Put(metaIndex, raw[:])
	})
	if err != nil {
		if errors.Is(err, ErrConflict) || errors.Is(err, ErrNotFound) {
			return err
		}
		return fmt.Errorf("embedded write to %s: %w", s.file.path, err)
	}
	s.file.wake(touched)
	return nil
}

// wake signals every watcher with a touched key under its prefix. It never
// blocks: a watcher with a signal pending will read the newest state anyway.
func (f *sharedFile) wake(touched []string) {
	if len(touched) == 0 {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for w := range f.watchers {
		for _, k := range touched {
			if strings.HasPrefix(k, w.prefix) {
				select {
				case w.wake <- struct{}{}:
				default:
				}
				break
			}
		}
	}
}

// Watch delivers a snapshot of prefix at start and after every write that
// touched it. Bursts coalesce: a slow receiver gets the newest state, and
// writers never wait for receivers. It ends, closing the channel, when ctx
// is done or the store is closed.
func (s *Embedded) Watch(ctx context.Context, prefix string) (<-chan []*Pair, error) {
	if err := checkListPrefix(prefix); err != nil {
		return nil, err
	}
	full := s.prefix + prefix
	if err := s.check(ctx, "watch", full); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.done:
		return nil, fmt.Errorf("embedded watch %q: store closed", full)
	default:
	}
	w := &embeddedWatcher{prefix: full, wake: make(chan struct{}, 1)}
	// Registered before the first read, so no write can fall in between.
	s.file.mu.Lock()
	s.file.watchers[w] = struct{}{}
	s.file.mu.Unlock()

	out := make(chan []*Pair)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(out)
		defer func() {
			s.file.mu.Lock()
			delete(s.file.watchers, w)
			s.file.mu.Unlock()
		}()
		var last []*Pair
		delivered := false
		note := deliveredHook(ctx)
		for {
			snap, err := s.list(full)
			if err == nil && (!delivered || !equalPairs(snap, last)) {
				select {
				case out <- clonePairs(snap):
					note()
					last, delivered = snap, true
				case <-ctx.Done():
					return
				case <-s.done:
					return
				}
			}
			// A failed read (it should not happen on a local file) is
			// retried on the next write.
			select {
			case <-w.wake:
			case <-ctx.Done():
				return
			case <-s.done:
				return
			}
		}
	}()
	return out, nil
}

// Close ends this store's watches and, when it is the last store of the
// process on the file, closes the file. Closing twice is harmless.
func (s *Embedded) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.mu.Lock()
		close(s.done)
		s.mu.Unlock()
		s.wg.Wait()
		openFiles.mu.Lock()
		defer openFiles.mu.Unlock()
		s.file.refs--
		if s.file.refs > 0 {
			return
		}
		delete(openFiles.m, s.file.path)
		if cerr := s.file.db.Close(); cerr != nil {
			err = fmt.Errorf("close embedded store %s: %w", s.file.path, cerr)
		}
	})
	return err
}

// decodePair reads a stored value; a record too short to hold an index
// (never written by this package) reads as index 0, which no CAS matches.
func decodePair(key string, raw []byte) *Pair {
	p := &Pair{Key: key}
	if len(raw) < 8 {
		return p
	}
	p.ModifyIndex = binary.BigEndian.Uint64(raw[:8])
	if len(raw) > 8 {
		p.Value = bytes.Clone(raw[8:])
	}
	return p
}
