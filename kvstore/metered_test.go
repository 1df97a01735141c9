package kvstore

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

type recorder struct {
	mu      sync.Mutex
	ops     []string
	errs    []error
	updates int
}

func (r *recorder) ObserveStoreOp(op string, err error, d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ops = append(r.ops, op)
	r.errs = append(r.errs, err)
}

func (r *recorder) ObserveWatchUpdate() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.updates++
}

func TestMetered(t *testing.T) {
	e, err := NewEmbedded(EmbeddedConfig{Path: filepath.Join(t.TempDir(), "state.db")})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	s := Metered(e, rec)
	defer s.Close()
	if Metered(e, nil) != Store(e) {
		t.Error("Metered with a nil observer is not the store itself")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w, err := s.Watch(ctx, "a/")
	if err != nil {
		t.Fatal(err)
	}
	<-w // the initial snapshot
	if err := s.Create(ctx, "a/k", []byte("1")); err != nil {
		t.Fatal(err)
	}
	<-w
	p, err := s.Get(ctx, "a/k")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CAS(ctx, "a/k", []byte("2"), p.ModifyIndex+100); !errors.Is(err, ErrConflict) {
		t.Fatalf("CAS on a wrong index: %v, want ErrConflict", err)
	}
	if _, err := s.Get(ctx, "a/none"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get of a missing key: %v", err)
	}
	_ = s.Put(ctx, "a/p", []byte("x"))
	<-w
	_, _ = s.List(ctx, "a/")
	_ = s.Delete(ctx, "a/p")
	<-w
	_ = s.DeleteCAS(ctx, "a/k", 1<<40)
	_ = s.Txn(ctx, []Op{{Verb: OpCheckNotExists, Key: "a/k"}})
	cancel()
	for range w {
	}

	rec.mu.Lock()
	defer rec.mu.Unlock()
	want := []string{"watch", "create", "get", "cas", "get", "put", "list", "delete", "delete_cas", "txn"}
	if len(rec.ops) != len(want) {
		t.Fatalf("ops %v, want %v", rec.ops, want)
	}
	for i := range want {
		if rec.ops[i] != want[i] {
			t.Fatalf("ops %v, want %v", rec.ops, want)
		}
	}
	if !errors.Is(rec.errs[3], ErrConflict) || !errors.Is(rec.errs[4], ErrNotFound) || !errors.Is(rec.errs[8], ErrConflict) || !errors.Is(rec.errs[9], ErrConflict) {
		t.Errorf("errors reported: %v", rec.errs)
	}
	if rec.updates != 4 {
		t.Errorf("%d watch updates, want 4", rec.updates)
	}
}
