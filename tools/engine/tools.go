//go:build tools

// Package tools pins Docker engine 29 (dockerd, docker-proxy), which the lab
// and the Docker suites can test against. It is built by `make engine` into
// bin/engine-29/ and never linked into the plugin. Its runc is pinned in the
// nested module runc/ (engine 29 as a library wants runc 1.4; the binary we
// run is 1.3.3, as tested).
package tools

import (
	_ "github.com/moby/moby/v2/cmd/docker-proxy"
	_ "github.com/moby/moby/v2/cmd/dockerd"
)
