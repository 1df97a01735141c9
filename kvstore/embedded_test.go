package kvstore

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func newEmbedded(t *testing.T, cfg EmbeddedConfig) *Embedded {
	t.Helper()
	s, err := NewEmbedded(cfg)
	if err != nil {
		t.Fatalf("NewEmbedded(%+v): %v", cfg, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// embeddedBackend gives each test its own file; every store a test opens
// shares it, as independent clients of one store.
func embeddedBackend(t *testing.T) openFunc {
	path := filepath.Join(t.TempDir(), "state.db")
	return func(t *testing.T, prefix string) Store {
		return newEmbedded(t, EmbeddedConfig{Path: path, Prefix: prefix})
	}
}

func TestEmbedded(t *testing.T) {
	t.Run("Contract", func(t *testing.T) { runContract(t, embeddedBackend) })
	t.Run("FencedContract", func(t *testing.T) { runContract(t, fencedBackend(embeddedBackend), "TxnInvalid") })
	t.Run("Fence", func(t *testing.T) { testFence(t, embeddedBackend(t)) })
	t.Run("Contention", func(t *testing.T) {
		open := embeddedBackend(t)
		stores := make([]Store, 8)
		for i := range stores {
			stores[i] = open(t, "contention")
		}
		runContention(t, stores, 1000)
	})
}

func TestEmbeddedLockedByAnotherProcess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "state.db")
	// Created (directory included) and closed again.
	s, err := NewEmbedded(EmbeddedConfig{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// A separate open of the file holds bbolt's flock, as another process
	// would.
	other, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	start := time.Now()
	_, err = NewEmbedded(EmbeddedConfig{Path: path, OpenTimeout: 200 * time.Millisecond})
	elapsed := time.Since(start)
	if !errors.Is(err, bolt.ErrTimeout) || !strings.Contains(err.Error(), path) {
		t.Fatalf("NewEmbedded on a locked file = %v, want a timeout naming %s", err, path)
	}
	if elapsed > 2*time.Second {
		t.Fatalf("NewEmbedded on a locked file took %s, want about the 200ms open timeout", elapsed)
	}
}

func TestEmbeddedIndexPersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := NewEmbedded(EmbeddedConfig{Path: path, Prefix: "p"})
	if err != nil {
		t.Fatal(err)
	}
	first := mustPut(t, s, "a", "1")
	mustPut(t, s, "b", "1")
	if err := s.Delete(bg(t), "b"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := s.Get(bg(t), "a"); err == nil {
		t.Fatal("Get on a closed store succeeded")
	}

	s = newEmbedded(t, EmbeddedConfig{Path: path, Prefix: "p"})
	if got := mustGet(t, s, "a"); string(got.Value) != "1" || got.ModifyIndex != first.ModifyIndex {
		t.Fatalf("after reopen a = %+v, want value 1 index %d", got, first.ModifyIndex)
	}
	// The index keeps growing across reopen: the delete used index 3, so a
	// fresh key must get more, never a reused index a stale CAS could hit.
	if got := mustPut(t, s, "c", "1"); got.ModifyIndex <= first.ModifyIndex+2 {
		t.Fatalf("index after reopen = %d, want > %d", got.ModifyIndex, first.ModifyIndex+2)
	}
	// A failed write does not move the index.
	before := mustGet(t, s, "c").ModifyIndex
	if err := s.Create(bg(t), "c", nil); !errors.Is(err, ErrConflict) {
		t.Fatal(err)
	}
	if got := mustPut(t, s, "d", "1"); got.ModifyIndex != before+1 {
		t.Fatalf("index after a failed write = %d, want %d", got.ModifyIndex, before+1)
	}
}

func TestEmbeddedSharedFileClosesWithLastStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	a, err := NewEmbedded(EmbeddedConfig{Path: path, Prefix: "a"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewEmbedded(EmbeddedConfig{Path: path, Prefix: "b"})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	mustPut(t, b, "k", "still open") // b keeps the file open
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	// Now no handle is left: a raw open gets the lock at once.
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatalf("file still locked after every store closed: %v", err)
	}
	db.Close()
}

func TestNewEmbeddedConfig(t *testing.T) {
	dir := t.TempDir()
	if _, err := NewEmbedded(EmbeddedConfig{Path: filepath.Join(dir, "x.db"), Prefix: "/"}); err == nil {
		t.Fatal("NewEmbedded accepted prefix \"/\"")
	}
	s := newEmbedded(t, EmbeddedConfig{Path: filepath.Join(dir, "x.db")})
	if s.Prefix() != DefaultPrefix || s.Path() != filepath.Join(dir, "x.db") {
		t.Fatalf("Prefix() = %q, Path() = %q", s.Prefix(), s.Path())
	}
}
