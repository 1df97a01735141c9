package main

import (
	"context"
	"math"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"time"
)

// defaultGCPercent is the garbage collector's target when GOGC is not
// set: the heap may grow by half its live size between two collections
// instead of Go's 100 %. The plugin's live heap is small (about 6 MiB
// with 1,000 endpoints in 100 networks) and allocates in bursts (a watch
// decoding a network's records), so the collections this adds cost
// little CPU, and the resident set is some 3 MiB smaller.
const defaultGCPercent = 50

// Soft memory limit when GOMEMLIMIT is not set: memoryFloor, or
// memoryLiveFactor times the live heap plus the runtime's memory that is
// not heap once that is larger, re-read every memoryCheckEvery. The limit
// makes the runtime return free memory to the system and collect before a
// burst grows the heap past it. Following the live heap, it stays above
// what GOGC=50 lets the runtime reach (1.5 × live + the rest), so a large
// cluster's plugin does not end up collecting all the time (what a fixed
// limit below its needs would do).
const (
	memoryFloor      = 20 << 20
	memoryLiveFactor = 2
	memoryCheckEvery = 2 * time.Second
)

// After a burst (a thousand attaches, a restart's reconcile) the heap
// keeps the pages the burst grew it by: the runtime returns free pages
// only above about 110 % of the collector's next target, which GOGC=50
// puts at 1.5 times the live heap plus half the goroutine stacks. Once
// the plugin is quiet (less than releaseQuiet allocated since the last
// look) while more than releaseAbove, or an eighth of the live heap, is
// free, the free pages go back to the system at once (debug.FreeOSMemory:
// one collection, then the release), at most once per releaseEvery. A
// busy plugin is left to the runtime's own pacing. With 1,000 endpoints
// in 100 networks a quiet plugin kept 1.6 to 2.9 MB free, mostly under
// the 2 MiB this took before: 1 MiB returns it (BENCHMARKS.md,
// twenty-first round), for one collection of a 6 MiB heap at most every
// releaseEvery.
const (
	releaseQuiet = 1 << 20
	releaseAbove = 1 << 20
	releaseEvery = 10 * time.Second
)

// applyMemoryDefaults sets the collector's target to defaultGCPercent
// unless GOGC is set (the Go runtime has read it then, and it stays). It
// reports whether it set the default.
//
// It also turns the runtime's heap profiling off unless DEBUG_PPROF
// serves the profiles or GODEBUG sets memprofilerate: by default Go
// samples one allocation in about every 512 KiB allocated and keeps a
// record of each sampled call stack, never freed, in a table of its own
// outside the heap. Nothing reads them unless the profiles are served,
// and with 1,000 endpoints in 100 networks they held about 0.6 MiB of
// the plugin's resident set (BENCHMARKS.md, twenty-first round),
// growing with every new call stack.
func applyMemoryDefaults(getenv func(string) string) bool {
	if !pprofEnabled(getenv) && !strings.Contains(getenv("GODEBUG"), "memprofilerate=") {
		runtime.MemProfileRate = 0
	}
	if strings.TrimSpace(getenv("GOGC")) != "" {
		return false
	}
	debug.SetGCPercent(defaultGCPercent)
	return true
}

// startMemoryLimit keeps the soft memory limit at memoryLimit(live heap)
// and returns a burst's free pages once the plugin is quiet (see
// releaseDue) until ctx ends, unless GOMEMLIMIT is set (the runtime
// applies it then, and paces the returns). stop waits for its goroutine.
func startMemoryLimit(ctx context.Context, getenv func(string) string) (stop func()) {
	if strings.TrimSpace(getenv("GOMEMLIMIT")) != "" {
		return func() {}
	}
	debug.SetMemoryLimit(memoryFloor)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer debug.SetMemoryLimit(math.MaxInt64)
		memoryLoop(ctx, memoryCheckEvery, readMemory, debug.FreeOSMemory)
	}()
	return func() { cancel(); <-done }
}

// memoryLoop sets the soft limit from read's samples every period, and
// calls release when releaseDue says so, until ctx ends.
func memoryLoop(ctx context.Context, every time.Duration, read func() (memSample, bool), release func()) {
	t := time.NewTicker(every)
	defer t.Stop()
	prev, _ := read()
	var released time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m, ok := read()
		if !ok {
			continue
		}
		debug.SetMemoryLimit(memoryLimit(m.live, m.other))
		if releaseDue(prev, m, time.Since(released)) {
			release()
			released = time.Now()
			// The next look compares with what is left.
			if after, ok := read(); ok {
				m = after
			}
		}
		prev = m
	}
}

// memoryLimit is the soft limit for a live heap of live bytes and other
// bytes of the runtime's memory that are not heap (goroutine stacks, the
// collector's metadata, ...): those are counted against the limit too, and
// grow with the number of watches.
func memoryLimit(live, other uint64) int64 {
	const most = math.MaxInt64 / 4
	return max(memoryFloor, memoryLiveFactor*int64(min(live, most))+int64(min(other, most)))
}

// releaseDue tells whether the free heap of now is worth returning: the
// plugin allocated less than releaseQuiet since prev, more than
// releaseAbove and an eighth of the live heap is free, and the last
// release is at least releaseEvery ago.
func releaseDue(prev, now memSample, sinceRelease time.Duration) bool {
	quiet := now.allocs >= prev.allocs && now.allocs-prev.allocs < releaseQuiet
	return quiet && sinceRelease >= releaseEvery && now.free > max(releaseAbove, now.live/8)
}

// memSample is what readMemory reads: the live heap, the runtime's memory
// that is not heap, the heap's free pages not returned to the system, and
// the bytes allocated since the start.
type memSample struct {
	live, other, free, allocs uint64
}

// memorySamples are what readMemory reads.
var memorySamples = []string{
	"/gc/heap/live:bytes",
	"/memory/classes/total:bytes",
	"/memory/classes/heap/free:bytes",
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/released:bytes",
	"/memory/classes/heap/unused:bytes",
	"/gc/heap/allocs:bytes",
}

// readMemory reads the runtime's memory (see memSample).
func readMemory() (memSample, bool) {
	s := make([]metrics.Sample, len(memorySamples))
	for i, n := range memorySamples {
		s[i].Name = n
	}
	metrics.Read(s)
	v := make([]uint64, len(s))
	for i := range s {
		if s[i].Value.Kind() != metrics.KindUint64 {
			return memSample{}, false
		}
		v[i] = s[i].Value.Uint64()
	}
	m := memSample{live: v[0], free: v[2], allocs: v[6]}
	if heap := v[2] + v[3] + v[4] + v[5]; v[1] >= heap {
		m.other = v[1] - heap
	}
	return m, true
}
