package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

// TestWatchVTEP changes the source address of the default route in a test
// namespace and expects the callback with the new address, once, within a
// second; a failing callback is retried; VTEP_INTERFACE follows its link.
func TestWatchVTEP(t *testing.T) {
	ns := testenv.NewNetNS(t)
	for _, args := range [][]string{
		{"ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1"},
		{"ip", "link", "set", "ul0", "up"},
		{"ip", "link", "set", "ul1", "up"},
		{"ip", "addr", "add", "192.0.2.10/24", "dev", "ul0"},
		{"ip", "addr", "add", "192.0.2.20/24", "dev", "ul0"},
		{"ip", "route", "add", "default", "via", "192.0.2.1", "dev", "ul0", "src", "192.0.2.10"},
	} {
		ns.MustRun(t, args...)
	}
	cfg := Config{}
	resolve := func() (netip.Addr, error) { return resolveVTEPWith(ns.Handle(), cfg) }
	first, err := resolve()
	if err != nil || first != netip.MustParseAddr("192.0.2.10") {
		t.Fatalf("resolve = %v, %v; want 192.0.2.10 (the default route's source)", first, err)
	}

	type change struct {
		a  netip.Addr
		at time.Time
	}
	var mu sync.Mutex
	var calls []change
	failNext := true
	onChange := func(_ context.Context, a netip.Addr) error {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, change{a, time.Now()})
		if failNext {
			failNext = false
			return errors.New("driver busy")
		}
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchVTEP(ctx, first, 100*time.Millisecond, resolve, onChange, slog.New(slog.NewTextHandler(io.Discard, nil)))
	}()
	defer func() { cancel(); <-done }()

	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	if len(calls) != 0 {
		t.Fatalf("callback called %d times with no change", len(calls))
	}
	mu.Unlock()

	changed := time.Now()
	ns.MustRun(t, "ip", "route", "replace", "default", "via", "192.0.2.1", "dev", "ul0", "src", "192.0.2.20")
	want := netip.MustParseAddr("192.0.2.20")
	deadline := time.Now().Add(2 * time.Second)
	for {
		mu.Lock()
		n := len(calls)
		mu.Unlock()
		if n >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // no more calls once applied
	mu.Lock()
	got := append([]change(nil), calls...)
	mu.Unlock()
	if len(got) != 2 || got[0].a != want || got[1].a != want {
		t.Fatalf("callback calls = %v, want two with %s (the first failed and is retried)", got, want)
	}
	if d := got[0].at.Sub(changed); d > time.Second {
		t.Fatalf("first callback %s after the route changed, want within 1s", d)
	}
	t.Logf("route changed; callback after %s, retried after %s", got[0].at.Sub(changed).Round(time.Millisecond), got[1].at.Sub(changed).Round(time.Millisecond))

	// No default route for a moment: nothing is called, the VTEP stays.
	ns.MustRun(t, "ip", "route", "del", "default")
	time.Sleep(300 * time.Millisecond)
	ns.MustRun(t, "ip", "route", "add", "default", "via", "192.0.2.1", "dev", "ul0", "src", "192.0.2.20")
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	if len(calls) != 2 {
		t.Fatalf("callback called %d times across a removed and restored route, want still 2", len(calls))
	}
	mu.Unlock()

	// VTEP_INTERFACE: the link's first global address.
	cfg2 := Config{VTEPIface: "ul1"}
	if _, err := resolveVTEPWith(ns.Handle(), cfg2); err == nil {
		t.Fatal("VTEP_INTERFACE=ul1 without an address resolved")
	}
	ns.MustRun(t, "ip", "addr", "add", "2001:db8::5/64", "dev", "ul1", "nodad")
	if a, err := resolveVTEPWith(ns.Handle(), cfg2); err != nil || a != netip.MustParseAddr("2001:db8::5") {
		t.Fatalf("VTEP_INTERFACE=ul1 = %v, %v; want 2001:db8::5", a, err)
	}
}
