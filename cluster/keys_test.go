package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

// The schedule every host computes from the ring: a new key receives at
// once, sends from SendFrom, and the old one is dropped at its Until.
func TestKeyRingActive(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	g := 30 * time.Second
	r := KeyRing{Keys: []EncKey{
		{ID: 1, Created: t0, SendFrom: t0, Until: t0.Add(12*time.Hour + 2*g)},
		{ID: 2, Created: t0.Add(12 * time.Hour), SendFrom: t0.Add(12*time.Hour + g)},
	}}
	for _, tc := range []struct {
		at      time.Duration
		ids     []uint32
		primary uint32
		next    time.Duration
	}{
		{12 * time.Hour, []uint32{1, 2}, 1, 12*time.Hour + g},
		{12*time.Hour + g, []uint32{1, 2}, 2, 12*time.Hour + 2*g},
		{12*time.Hour + 2*g, []uint32{2}, 2, -1},
	} {
		keys, primary, next := r.Active(t0.Add(tc.at))
		var ids []uint32
		for _, k := range keys {
			ids = append(ids, k.ID)
		}
		wantNext := time.Time{}
		if tc.next >= 0 {
			wantNext = t0.Add(tc.next)
		}
		if fmt.Sprint(ids) != fmt.Sprint(tc.ids) || primary != tc.primary || !next.Equal(wantNext) {
			t.Errorf("at +%s: keys %v primary %d next %s; want %v %d %s", tc.at, ids, primary, next, tc.ids, tc.primary, wantNext)
		}
	}
	// Neither the key's text nor its log value holds the secret.
	k := EncKey{ID: 7, Secret: []byte("0123456789abcdef0123456789abcdef")}
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("x", "key", k)
	if s := fmt.Sprint(k) + fmt.Sprintf("%v %s", k, k) + logged.String(); strings.Contains(s, "0123456789") || strings.Contains(s, "MDEy") {
		t.Errorf("key printed with its secret: %s", s)
	}
}

// The ring in a real Consul: the first Ensure makes one key, concurrent
// Ensures of several hosts agree on it, a rotation adds a key that sends
// after the grace and marks the old one, the watch delivers it, and keys
// past their Until go at the next Ensure.
func TestKeyringConsul(t *testing.T) {
	agent := testenv.StartConsul(t)
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	prefix := "keys-" + hex.EncodeToString(b) + "/"
	open := func() kvstore.Store {
		s, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: agent.Addr, Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	var mu sync.Mutex
	now := time.Now().UTC()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	cfg := KeyringConfig{Rotation: time.Hour, Grace: 10 * time.Second, Now: clock}
	var rings []*Keyring
	for range 3 {
		kr, err := NewKeyring(cfg, open())
		if err != nil {
			t.Fatal(err)
		}
		rings = append(rings, kr)
	}
	ctx := t.Context()
	w, err := rings[2].Watch(ctx, func(err error) { t.Error(err) })
	if err != nil {
		t.Fatal(err)
	}
	if r := <-w; len(r.Keys) != 0 {
		t.Fatalf("watch at start: %d keys, want none", len(r.Keys))
	}

	results := make([]KeyRing, 3)
	var wg sync.WaitGroup
	for i, kr := range rings {
		wg.Go(func() {
			r, err := kr.Ensure(ctx)
			if err != nil {
				t.Error(err)
			}
			results[i] = r
		})
	}
	wg.Wait()
	first := results[0]
	if len(first.Keys) != 1 || len(first.Keys[0].Secret) != 32 || first.Keys[0].ID == 0 {
		t.Fatalf("first key ring %+v", first.Keys)
	}
	for i, r := range results {
		if len(r.Keys) != 1 || r.Keys[0].ID != first.Keys[0].ID || !bytes.Equal(r.Keys[0].Secret, first.Keys[0].Secret) {
			t.Errorf("host %d got another ring: %v", i, r.Keys)
		}
	}
	waitRing(t, w, func(r KeyRing) bool { return len(r.Keys) == 1 })

	// Not due: Ensure changes nothing.
	advance(30 * time.Minute)
	if r, err := rings[1].Ensure(ctx); err != nil || len(r.Keys) != 1 {
		t.Fatalf("Ensure before the rotation is due: %v %v", r.Keys, err)
	}
	// Due: one rotation, whichever host comes first.
	advance(31 * time.Minute)
	for _, kr := range rings {
		if _, err := kr.Ensure(ctx); err != nil {
			t.Fatal(err)
		}
	}
	r := waitRing(t, w, func(r KeyRing) bool { return len(r.Keys) == 2 })
	old, nk := r.Keys[0], r.Keys[1]
	if old.ID != first.Keys[0].ID || old.Until.Sub(nk.Created) != 20*time.Second {
		t.Errorf("old key until %s, new created %s: want 2×grace later", old.Until, nk.Created)
	}
	if nk.SendFrom.Sub(nk.Created) != 10*time.Second {
		t.Errorf("new key sends from %s after its creation, want the grace 10s", nk.SendFrom.Sub(nk.Created))
	}
	if _, p, _ := r.Active(clock()); p != old.ID {
		t.Errorf("primary right after the rotation: %d, want the old key %d", p, old.ID)
	}
	advance(11 * time.Second)
	if _, p, _ := r.Active(clock()); p != nk.ID {
		t.Errorf("primary after the grace: %d, want the new key %d", p, nk.ID)
	}
	advance(10 * time.Second)
	if r, err := rings[0].Ensure(ctx); err != nil || len(r.Keys) != 1 || r.Keys[0].ID != nk.ID {
		t.Errorf("after 2×grace the old key should be gone: %v %v", r.Keys, err)
	}
	if _, err := NewKeyring(KeyringConfig{Rotation: time.Minute, Grace: time.Minute}, open()); err == nil {
		t.Error("a rotation shorter than 4×grace was accepted")
	}
}

func waitRing(t *testing.T, w <-chan KeyRing, ok func(KeyRing) bool) KeyRing {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for {
		select {
		case r := <-w:
			if ok(r) {
				return r
			}
		case <-ctx.Done():
			t.Fatal("the watch did not deliver the expected ring")
		}
	}
}
