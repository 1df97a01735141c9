package main

import (
	"context"
	"math"
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
// not heap once that is larger, re-read every memoryLimitEvery. The limit makes the runtime return free memory to the
// system and collect before a burst grows the heap past it. Following the
// live heap, it stays above what GOGC=50 lets the runtime reach (1.5 ×
// live + the rest), so a large cluster's plugin does not end up
// collecting all the time (what a fixed limit below its needs would do).
const (
	memoryFloor      = 20 << 20
	memoryLiveFactor = 2
	memoryLimitEvery = 10 * time.Second
)

// applyMemoryDefaults sets the collector's target to defaultGCPercent
// unless GOGC is set (the Go runtime has read it then, and it stays). It
// reports whether it set the default.
func applyMemoryDefaults(getenv func(string) string) bool {
	if strings.TrimSpace(getenv("GOGC")) != "" {
		return false
	}
	debug.SetGCPercent(defaultGCPercent)
	return true
}

// startMemoryLimit keeps the soft memory limit at memoryLimit(live heap)
// until ctx ends, unless GOMEMLIMIT is set (the runtime applies it then).
// stop waits for its goroutine.
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
		t := time.NewTicker(memoryLimitEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if live, other, ok := readMemory(); ok {
				debug.SetMemoryLimit(memoryLimit(live, other))
			}
		}
	}()
	return func() { cancel(); <-done }
}

// memoryLimit is the soft limit for a live heap of live bytes and other
// bytes of the runtime's memory that are not heap (goroutine stacks, the
// collector's metadata, ...): those are counted against the limit too, and
// grow with the number of watches.
func memoryLimit(live, other uint64) int64 {
	const most = math.MaxInt64 / 4
	return max(memoryFloor, memoryLiveFactor*int64(min(live, most))+int64(min(other, most)))
}

// memorySamples are what readMemory reads.
var memorySamples = []string{
	"/gc/heap/live:bytes",
	"/memory/classes/total:bytes",
	"/memory/classes/heap/free:bytes",
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/released:bytes",
	"/memory/classes/heap/unused:bytes",
}

// readMemory returns the live heap and the runtime's memory that is not
// heap.
func readMemory() (live, other uint64, ok bool) {
	s := make([]metrics.Sample, len(memorySamples))
	for i, n := range memorySamples {
		s[i].Name = n
	}
	metrics.Read(s)
	v := make([]uint64, len(s))
	for i := range s {
		if s[i].Value.Kind() != metrics.KindUint64 {
			return 0, 0, false
		}
		v[i] = s[i].Value.Uint64()
	}
	heap := v[2] + v[3] + v[4] + v[5]
	if v[1] < heap {
		return v[0], 0, true
	}
	return v[0], v[1] - heap, true
}
