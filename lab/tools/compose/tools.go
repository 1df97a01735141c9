//go:build tools

// Package tools pins Docker Compose v2, which the lab (make demo, make e2e)
// uses as a docker CLI plugin. `make compose` builds it into bin/docker-compose
// from the Go module proxy; it is never linked into the plugin.
package tools

import _ "github.com/docker/compose/v2/cmd"
