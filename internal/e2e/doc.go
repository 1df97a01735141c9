// Package e2e is the end-to-end suite of consul-overlay: real Docker
// engines on two hosts, a real Consul cluster, the plugin installed from a
// registry the way a user installs it, and the docker and docker compose
// CLIs. It runs on the lab of lab/ (lab/lib.sh describes it): host A is this
// machine's own Docker engine, host B a second dockerd in the network
// namespace colab-b, joined by an underlay in 198.51.100.0/24.
//
// The tests carry the build tag e2e, so `go test ./...` compiles nothing
// here; `make e2e` runs them:
//
//	go test -tags e2e -count=1 -v ./internal/e2e/
//
// TestMain brings the lab up (lab/up.sh --owner e2e) and tears it down
// afterwards (lab/down.sh --owner e2e), also after a failure or an
// interrupt; E2E_KEEP_LAB=1 leaves it up for a look (lab/docker-b, lab/on-b),
// and the next run with it set goes on in that lab. Without it, a run first
// tears down the e2e lab a killed run left.
// TestE2E runs the scenarios in order, each a subtest that later ones may
// depend on, and TestMain prints one summary line per scenario:
//
//	e2e: PASS cli-network 14.2s
//
// Needs root, the docker CLI with the compose plugin, and the builds `make
// consul compose busybox-image plugin`; a missing prerequisite fails the
// suite (it runs only when asked for).
package e2e
