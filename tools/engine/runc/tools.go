//go:build tools

// Package tools pins the runc that engine 29 runs containers with (Debian
// 12's runc 1.1.5 fails every container on it: "namespace time does not
// exist"). Built by `make engine` into bin/engine-29/runc.
package tools

import _ "github.com/opencontainers/runc"
