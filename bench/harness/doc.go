// Package harness plays dockerd's part against consul-overlay plugin
// daemons running in test hosts (network namespaces on a shared underlay
// from internal/testenv): it starts the plugin binary in a host's
// namespace, speaks the plugin protocol over its unix socket exactly as the
// engine does, and does libnetwork's work on the container side (move the
// interface into a container namespace, rename it, set its addresses).
//
// It is the benchmarks' copy of the logic in plugin/harness_test.go, split
// into steps (RequestAddress, CreateEndpoint, Join, MoveTo) so that each
// can be timed, and with errors returned instead of failing the test where
// a caller needs to measure or retry. Everything it creates is removed by
// t.Cleanup.
package harness
