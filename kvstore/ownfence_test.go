package kvstore

import (
	"errors"
	"testing"

	"consul-overlay/internal/testenv"
)

// TestConsulOwnFenced: a host's own writes through OwnFenced are applied
// only with its record: while the claim's session holds it they leave the
// record alone (no extra write, the healthy path); once the session is
// gone, even while the claim still believes it holds it (its watch has
// not told it yet), a write writes the record anew in its own
// transaction, so a reap fenced on the record as judged stops before its
// next write.
func TestConsulOwnFenced(t *testing.T) {
	agent := testenv.StartConsul(t, testenv.WithNodeName("fence55-kv-"+randomHex(t)))
	if agent == nil {
		return
	}
	ctx := bg(t)
	s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "ownfence-" + randomHex(t)})
	cl, err := s.Claim(ctx, "hosts/b", []byte("b"), ClaimConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cl.Release(bg(t)) })
	own := OwnFenced(s, cl)

	// Healthy: the write goes, the record is not written.
	before := mustGet(t, s, "hosts/b")
	if err := own.Create(ctx, "addr/1", []byte("b")); err != nil {
		t.Fatalf("write while the session holds the record: %v", err)
	}
	if p := mustGet(t, s, "hosts/b"); p.ModifyIndex != before.ModifyIndex || p.Session != cl.Session() {
		t.Fatalf("a write while the session holds the record wrote it: %+v, before %+v", p, before)
	}
	// Its own failed condition is the store's answer, nothing retried.
	if err := own.Create(ctx, "addr/1", []byte("x")); !errors.Is(err, ErrConflict) {
		t.Fatalf("create of an existing key: %v, want ErrConflict", err)
	}

	// The session ends at the servers (B cut off past its check's TTL)
	// while B's claim has not seen it yet: its goroutines are stopped, so
	// it keeps the session it had, as it does until its watch's next try.
	cl.stop()
	<-cl.done
	stale := cl.Session()
	if err := s.destroySession(ctx, stale); err != nil {
		t.Fatal(err)
	}
	judged := mustGet(t, s, "hosts/b")
	if judged.Session != "" {
		t.Fatalf("setup: record still held after its session was destroyed: %+v", judged)
	}
	if cl.Session() != stale {
		t.Fatal("setup: the claim saw the loss")
	}
	// A reap judged the record as it is now, and fences on it.
	reap := Fence(s, Op{Verb: OpCheckIndex, Key: "hosts/b", Index: judged.ModifyIndex})

	// B reaches the store again: its first write (an address for docker
	// run) finds the session gone, and goes with a touch of the record.
	if err := own.Create(ctx, "addr/2", []byte("b")); err != nil {
		t.Fatalf("write after the session ended: %v", err)
	}
	rec, addr := mustGet(t, s, "hosts/b"), mustGet(t, s, "addr/2")
	if rec.ModifyIndex == judged.ModifyIndex || rec.Session != "" || string(rec.Value) != "b" {
		t.Fatalf("B's write left its record as judged: %+v (judged %+v)", rec, judged)
	}
	if rec.ModifyIndex != addr.ModifyIndex {
		t.Errorf("record written at %d, the address at %d: not in one transaction", rec.ModifyIndex, addr.ModifyIndex)
	}
	// The reap's next write (freeing the address) stops.
	if err := reap.DeleteCAS(ctx, "addr/2", addr.ModifyIndex); !errors.Is(err, ErrFenced) {
		t.Fatalf("reap's free of B's new address: %v, want ErrFenced", err)
	}
	if _, err := s.Get(ctx, "addr/2"); err != nil {
		t.Fatalf("B's new address: %v", err)
	}

	// Without a session, a write failing its own condition changes
	// nothing: the touch goes back with it.
	rec = mustGet(t, s, "hosts/b")
	if err := own.Create(ctx, "addr/2", []byte("x")); !errors.Is(err, ErrConflict) {
		t.Fatalf("create of an existing key without a session: %v, want ErrConflict", err)
	}
	if p := mustGet(t, s, "hosts/b"); p.ModifyIndex != rec.ModifyIndex {
		t.Errorf("a refused write touched the record: %d, was %d", p.ModifyIndex, rec.ModifyIndex)
	}
	// Each write without a session writes the record anew.
	if err := own.Put(ctx, "addr/3", []byte("b")); err != nil {
		t.Fatal(err)
	}
	if p := mustGet(t, s, "hosts/b"); p.ModifyIndex == rec.ModifyIndex {
		t.Error("a second write without a session left the record as it was")
	}
	// The record removed (the last step of a reap): written again.
	if err := s.Delete(ctx, "hosts/b"); err != nil {
		t.Fatal(err)
	}
	if err := own.Delete(ctx, "addr/3"); err != nil {
		t.Fatal(err)
	}
	if p := mustGet(t, s, "hosts/b"); string(p.Value) != "b" {
		t.Errorf("record after a write once it was removed: %+v", p)
	}
}
