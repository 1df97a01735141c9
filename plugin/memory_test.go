package main

import (
	"context"
	"math"
	"runtime/debug"
	"testing"
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
	live, other, ok := readMemory()
	if !ok || live == 0 && other == 0 {
		t.Errorf("readMemory = %d, %d, %v", live, other, ok)
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
