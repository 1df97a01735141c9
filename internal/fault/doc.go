// Package fault holds crash points for the crash-injection tests: a named
// point in the code where the test can make the plugin process die at
// once, as a kill -9 would, between two steps of a call.
//
// A point is armed by the environment variable CONSUL_OVERLAY_FAULT: a
// comma-separated list of point names. When the process reaches an armed
// point, it sends itself SIGKILL: no deferred function runs, no rollback
// happens, nothing is flushed, exactly as if the machine had killed it.
// Unarmed (always in production), Point costs one map lookup.
//
// Point names are "<call>/<step>", lower-case, for example
// "createnetwork/after-membership". The crash tests find every point by
// reading the source for fault.Point calls, so a new point is covered
// without editing a list.
package fault
