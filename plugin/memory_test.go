package main

import (
	"context"
	"math"
	"runtime"
	"runtime/debug"
	"testing"
	"time"
)

func TestApplyMemoryDefaults(t *testing.T) {
	old := debug.SetGCPercent(100)
	defer debug.SetGCPercent(old)
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	if applyMemoryDefaults(env(map[string]string{"GOGC": "200"})) {
		t.Fatal("GOGC set: the default was applied anyway")
	}
	if got := debug.SetGCPercent(100); got != 100 {
		t.Fatalf("GOGC set: GC percent changed to %d", got)
	}
	if !applyMemoryDefaults(env(nil)) {
		t.Fatal("GOGC unset: the default was not applied")
	}
	if got := debug.SetGCPercent(100); got != defaultGCPercent {
		t.Fatalf("GOGC unset: GC percent %d, want %d", got, defaultGCPercent)
	}
}

// TestHeapProfilingDefault: the runtime's heap profiling is off unless
// the profiles are served (DEBUG_PPROF) or GODEBUG sets its rate.
func TestHeapProfilingDefault(t *testing.T) {
	old := runtime.MemProfileRate
	oldGC := debug.SetGCPercent(100)
	defer func() { runtime.MemProfileRate = old; debug.SetGCPercent(oldGC) }()
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	for _, c := range []struct {
		env  map[string]string
		want int
	}{
		{nil, 0},
		{map[string]string{"DEBUG_PPROF": "0"}, 0},
		{map[string]string{"DEBUG_PPROF": "1"}, 4096},
		{map[string]string{"DEBUG_PPROF": "true"}, 4096},
		{map[string]string{"DEBUG_PPROF": "bogus"}, 4096}, // refused at start, with its reason
		{map[string]string{"GODEBUG": "x=1,memprofilerate=1"}, 4096},
	} {
		runtime.MemProfileRate = 4096
		applyMemoryDefaults(env(c.env))
		if runtime.MemProfileRate != c.want {
			t.Errorf("env %v: MemProfileRate %d, want %d", c.env, runtime.MemProfileRate, c.want)
		}
	}
}

func TestMemoryLimit(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		live, other uint64
		want        int64
	}{
		{0, 0, memoryFloor},
		{6 * mib, 8 * mib, memoryFloor},                         // 1,000 endpoints, 100 networks
		{40 * mib, 30 * mib, (2*40 + 30) * mib},                 // a large cluster: above GOGC's 1.5 × live + other
		{1 << 63, 1 << 63, math.MaxInt64/4*2 + math.MaxInt64/4}, // no overflow
	} {
		if got := memoryLimit(c.live, c.other); got != c.want {
			t.Errorf("memoryLimit(%d, %d) = %d, want %d", c.live, c.other, got, c.want)
		}
		if got := memoryLimit(c.live, c.other); c.live < 1<<40 && float64(got) < 1.5*float64(c.live)+float64(c.other) {
			t.Errorf("memoryLimit(%d, %d) = %d: below what GOGC=50 lets the heap reach", c.live, c.other, got)
		}
	}
	m, ok := readMemory()
	if !ok || m.other == 0 || m.allocs == 0 { // live is 0 before the first collection
		t.Errorf("readMemory = %+v, %v", m, ok)
	}
}

func TestReleaseDue(t *testing.T) {
	const mib = 1 << 20
	prev := memSample{live: 6 * mib, free: 1 * mib, allocs: 500 * mib}
	for _, c := range []struct {
		name  string
		now   memSample
		since time.Duration
		want  bool
	}{
		{"quiet after a burst", memSample{live: 6 * mib, free: 5 * mib, allocs: 500*mib + 100<<10}, time.Hour, true},
		{"still busy", memSample{live: 6 * mib, free: 5 * mib, allocs: 520 * mib}, time.Hour, false},
		{"quiet, 1.5 MiB free", memSample{live: 6 * mib, free: 3 * mib / 2, allocs: 500 * mib}, time.Hour, true},
		{"little free", memSample{live: 6 * mib, free: 1 * mib, allocs: 500 * mib}, time.Hour, false},
		{"free below an eighth of a large live heap", memSample{live: 40 * mib, free: 4 * mib, allocs: 500 * mib}, time.Hour, false},
		{"free above an eighth of a large live heap", memSample{live: 40 * mib, free: 6 * mib, allocs: 500 * mib}, time.Hour, true},
		{"released a moment ago", memSample{live: 6 * mib, free: 5 * mib, allocs: 500 * mib}, time.Second, false},
		{"counter went back", memSample{live: 6 * mib, free: 5 * mib, allocs: 1}, time.Hour, false},
	} {
		if got := releaseDue(prev, c.now, c.since); got != c.want {
			t.Errorf("%s: releaseDue = %v, want %v", c.name, got, c.want)
		}
	}
}

// TestMemoryLoop: the loop sets the limit from each sample and releases
// once when a burst's free pages sit in a quiet process, not while it
// allocates, and not again within releaseEvery.
func TestMemoryLoop(t *testing.T) {
	defer debug.SetMemoryLimit(math.MaxInt64)
	const mib = 1 << 20
	samples := make(chan memSample)
	released := make(chan struct{}, 10)
	ctx, cancel := context.WithCancel(context.Background())
	read := func() (memSample, bool) {
		select {
		case m := <-samples:
			return m, true
		case <-ctx.Done():
			return memSample{}, false
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		memoryLoop(ctx, time.Millisecond, read, func() { released <- struct{}{} })
	}()
	samples <- memSample{live: 30 * mib, other: 10 * mib, allocs: 100 * mib}
	samples <- memSample{live: 30 * mib, other: 10 * mib, free: 20 * mib, allocs: 200 * mib} // busy
	samples <- memSample{live: 30 * mib, other: 10 * mib, free: 20 * mib, allocs: 200 * mib} // quiet: released
	samples <- memSample{live: 30 * mib, other: 10 * mib, allocs: 200 * mib}                 // after the release
	samples <- memSample{live: 30 * mib, other: 10 * mib, free: 20 * mib, allocs: 200 * mib} // within releaseEvery
	samples <- memSample{live: 30 * mib, other: 10 * mib, free: 20 * mib, allocs: 200 * mib}
	cancel()
	<-done
	if n := len(released); n != 1 {
		t.Errorf("%d releases, want 1", n)
	}
	if got, want := debug.SetMemoryLimit(-1), int64((2*30+10)*mib); got != want {
		t.Errorf("limit %d, want %d", got, want)
	}
}

func TestStartMemoryLimit(t *testing.T) {
	defer debug.SetMemoryLimit(math.MaxInt64)
	stop := startMemoryLimit(context.Background(), func(string) string { return "" })
	if got := debug.SetMemoryLimit(-1); got != memoryFloor {
		t.Errorf("limit %d after start, want %d", got, memoryFloor)
	}
	stop()
	if got := debug.SetMemoryLimit(-1); got != math.MaxInt64 {
		t.Errorf("limit %d after stop, want none", got)
	}
	debug.SetMemoryLimit(12345678)
	startMemoryLimit(context.Background(), func(k string) string { return map[string]string{"GOMEMLIMIT": "12345678B"}[k] })()
	if got := debug.SetMemoryLimit(-1); got != 12345678 {
		t.Errorf("GOMEMLIMIT set: limit changed to %d", got)
	}
}
